"""Quality evidence on BBC News: LoRA (r = 8, 16) vs full fine-tuning, same model, data, steps and loop.

    python benchmarks/quality_bbc.py --quick       # a few minutes on 2 CPU cores
    python benchmarks/quality_bbc.py               # the full-size run (tens of minutes on 2 cores)

Two tasks:
  * language modelling: SmolLM2-135M on one BBC topic (default tech), held-out perplexity on the topic's test
    articles;
  * topic classification: all-MiniLM-L6-v2 + a new 5-way head on all topics, test accuracy and macro-F1.

Every variant runs in its own subprocess, so "peak memory" is that variant's own peak (GPU: max allocated;
CPU: peak resident set size, which includes the model itself). Step time is the median wall time over steps
after the first; step CPU is the same for process CPU time, which a busy shared machine inflates far less. All variants use deltaw.train's data stream, loss and LR schedule (cosine, 5 % warmup) and AdamW;
learning rates are the usual ones for each method: 1e-3 for LoRA, 1e-4 for full fine-tuning (a 10x lower
rate is standard: full fine-tuning moves every weight). Prints a markdown table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LORA_LR = 1e-3
FULL_LR = 1e-4


def settings(quick: bool) -> dict:
    if quick:
        return {"lm_steps": 12, "lm_seq": 128, "lm_batch": 4, "lm_eval": 16,
                "cls_steps": 40, "cls_seq": 128, "cls_batch": 16, "cls_eval": None}
    return {"lm_steps": 60, "lm_seq": 256, "lm_batch": 4, "lm_eval": 40,
            "cls_steps": 150, "cls_seq": 256, "cls_batch": 16, "cls_eval": None}


# ---- one variant (runs in a child process) -------------------------------------------------------------
def run_variant(task: str, method: str, r: int, cfg: dict, topic: str, seed: int) -> dict:
    import torch

    import deltaw
    from deltaw.train import evaluate, lr_at
    from deltaw.train.data import BatchStream, collate, limit, load_eval_dataset, pad_id_of, tokenize_causal, tokenize_classification
    from deltaw.train.loop import peak_memory_bytes
    from deltaw.train.objectives import loss_sum

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    if task == "lm":
        from deltaw.models import load_smollm2

        model, tok = load_smollm2(device=device)
        spec, steps, seq, batch, n_eval = f"bbc:{topic}", cfg["lm_steps"], cfg["lm_seq"], cfg["lm_batch"], cfg["lm_eval"]
        tokenize, objective = tokenize_causal, "causal-lm"
        label_names: list[str] = []
    else:
        from deltaw.data import BBC_TOPICS
        from deltaw.models import load_minilm_classifier

        label_names = list(BBC_TOPICS)
        model, tok = load_minilm_classifier(len(label_names), device=device, label_names=label_names)
        spec, steps, seq, batch, n_eval = "bbc", cfg["cls_steps"], cfg["cls_seq"], cfg["cls_batch"], cfg["cls_eval"]
        tokenize, objective = tokenize_classification, "classification"
    train_ds = load_eval_dataset(spec, "train")
    test_ds = limit(load_eval_dataset(spec, "test"), n_eval)
    examples = tokenize(train_ds, tok, seq, "train")
    test = tokenize(test_ds, tok, seq, "test")
    pad = pad_id_of(tok)

    if method == "base":
        params: list = []
    elif method == "lora":
        saved = ("classifier",) if task == "cls" else ()
        deltaw.attach(model, deltaw.LoraConfig(r=r, alpha=2.0 * r, target_modules="all-linear", modules_to_save=saved))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())
    trainable = sum(p.numel() for p in params)
    lr = LORA_LR if method == "lora" else FULL_LR
    step_times: list[float] = []
    step_cpu: list[float] = []
    if params:
        optimizer = torch.optim.AdamW(params, lr=lr)
        stream = BatchStream(examples, batch, seed)
        warmup = round(0.05 * steps)
        model.train()
        for step in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, warmup, lr, "cosine")
            idx = stream.indices(step)
            batch_t = collate([examples[i] for i in idx], pad, device)
            total, count, _ = loss_sum(objective, model, batch_t)
            (total / count).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
            step_cpu.append(time.process_time() - c0)
        model.eval()
    result = evaluate(model, test, objective, pad_id=pad, batch_size=8, label_names=label_names)
    return {
        "task": task, "method": method, "r": r if method == "lora" else None, "steps": steps if params else 0,
        "seq_len": seq, "batch": batch, "lr": lr if params else None, "trainable_params": trainable,
        "peak_memory_mb": peak_memory_bytes(device) / 2**20,
        "step_time_s": statistics.median(step_times[1:] or step_times) if step_times else None,
        "step_cpu_s": statistics.median(step_cpu[1:] or step_cpu) if step_cpu else None,
        "perplexity": result.perplexity, "accuracy": result.accuracy, "macro_f1": result.macro_f1,
        "eval_examples": result.n_examples, "device": str(device), "threads": torch.get_num_threads(),
    }


# ---- driver --------------------------------------------------------------------------------------------
VARIANTS = [("base", 0), ("lora", 8), ("lora", 16), ("full", 0)]


def table(rows: list[dict]) -> str:
    out = []
    lm = [r for r in rows if r["task"] == "lm"]
    cls = [r for r in rows if r["task"] == "cls"]

    def name(r: dict) -> str:
        return {"base": "base (no training)", "full": "full fine-tuning"}.get(r["method"], f"LoRA r={r['r']}")

    def common(r: dict) -> list[str]:
        step = f"{r['step_time_s']:.2f}" if r["step_time_s"] is not None else "-"
        cpu = f"{r['step_cpu_s']:.2f}" if r.get("step_cpu_s") is not None else "-"
        return [f"{r['trainable_params']:,}", f"{r['peak_memory_mb']:.0f}", step, cpu]

    if lm:
        r0 = lm[0]
        out.append(f"\nLanguage modelling: SmolLM2-135M on BBC {r0.get('topic', '')}, {r0['eval_examples']} held-out "
                   f"test articles at {r0['seq_len']} tokens; {max(r['steps'] for r in lm)} steps of {r0['batch']}\n")
        out.append("| variant | held-out perplexity | trainable params | peak memory (MB) | step time (s) | step CPU (s) |")
        out.append("|---|---|---|---|---|---|")
        out.extend(f"| {name(r)} | {r['perplexity']:.3f} | " + " | ".join(common(r)) + " |" for r in lm)
    if cls:
        r0 = cls[0]
        out.append(f"\nTopic classification: all-MiniLM-L6-v2 + 5-way head, BBC test split ({r0['eval_examples']} "
                   f"articles) at {r0['seq_len']} tokens; {max(r['steps'] for r in cls)} steps of {r0['batch']}\n")
        out.append("| variant | accuracy | macro-F1 | trainable params | peak memory (MB) | step time (s) | step CPU (s) |")
        out.append("|---|---|---|---|---|---|---|")
        out.extend(f"| {name(r)} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | " + " | ".join(common(r)) + " |"
                   for r in cls)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Short runs (a few minutes on 2 cores).")
    parser.add_argument("--topic", default="tech", help="BBC topic for the language-modelling half.")
    parser.add_argument("--tasks", default="lm,cls", help="Comma list of lm, cls.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per variant (default: torch's choice). Use 1 on a shared machine: "
                             "OpenMP spin-waiting makes 2 threads many times slower than 1 when cores are contended.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows to this file.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = settings(args.quick)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:  # task:method:r:outfile
        task, method, r, outfile = args.child.split(":", 3)
        row = run_variant(task, method, int(r), cfg, args.topic, args.seed)
        row["topic"] = args.topic
        Path(outfile).write_text(json.dumps(row))
        return 0

    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            for method, r in VARIANTS:
                outfile = Path(tmp) / f"{task}-{method}-{r}.json"
                cmd = [sys.executable, __file__, "--child", f"{task}:{method}:{r}:{outfile}", "--topic", args.topic,
                       "--seed", str(args.seed)] + (["--quick"] if args.quick else []) + (
                    ["--threads", str(args.threads)] if args.threads else [])
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-4000:])
                    return proc.returncode
                row = json.loads(outfile.read_text())
                rows.append(row)
                print(f"# {task} {method}{'' if method != 'lora' else f' r={r}'}: done in "
                      f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\n({'quick' if args.quick else 'full'} mode, {time.perf_counter() - started:.0f}s total, "
          f"{rows[0]['device']}, {rows[0]['threads']} threads; LoRA lr {LORA_LR:g} all-linear alpha=2r, full FT lr "
          f"{FULL_LR:g}; cosine schedule, AdamW, grad clip 1.0)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
