#!/usr/bin/env python
"""Load test of ``deltaw serve``: many concurrent clients over many adapters, against two baselines, with every
answer checked against offline generation.

    python benchmarks/serve_load.py --quick --json runs/serve_load.json
    python benchmarks/serve_load.py --clients 200 --adapters 50 --layers 30 --max-tokens 16

What it does, all on loopback (127.0.0.1, a free port) and bounded in count (``--clients`` requests) and time
(``--time-limit``):

1. builds a random-init Llama with SmolLM2-135M's shape (hidden 576, intermediate 1536, 9/3 heads, vocab 49152,
   tied head; ``--layers`` 30, fewer for a quick run) and ``--adapters`` random rank-``--rank`` adapters on all
   seven projections, saved with ``deltaw.save`` into a temporary adapters directory;
2. computes the offline reference: for every request, greedy ``model.generate`` (max_new_tokens = the request's
   max_tokens) on a separate copy of the model with that adapter active (``deltaw.using``);
3. serves the same requests (prompts as token ids, temperature 0, all sent at once by ``--clients`` concurrent
   clients from one asyncio loop) three times, each on a fresh server over the same model weights:
   ``mixed``        continuous batching over all adapters at once (per-row adapters, the deltaw server);
   ``same_adapter`` continuous batching, but a batch only ever holds one adapter (the usual LoRA server);
   ``sequential``   max_batch_size=1: one sequence at a time;
   adapters are loaded (POST /v1/adapters) before each timed run, so the numbers measure serving, not disk;
4. counts, per mode, responses that differ from the offline reference (``wrong``; 0 allowed), failed requests
   (``errors``) and requests cut by the time budget (``timeouts``: neither answers nor wrong ones; a slow box
   may cut the baselines short, whose tokens/s are then over what they finished), and generated tokens per
   second of wall time.

The tokenizer is a synthetic WordLevel vocabulary ("t0" .. "t49151"), so texts map one-to-one to token ids.
The server runs in this process (uvicorn on a thread), clients on one asyncio loop: one process, like a small
deployment on a shared CPU box; every mode pays the same overheads.

``--json PATH`` writes {"requests", "wrong", "errors", "tokens_per_s", "tokens_per_s_sequential",
"tokens_per_s_same_adapter_batching", ...} (``wrong``/``errors``/``tokens_per_s`` are the mixed mode's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import deltaw

log = logging.getLogger("benchmarks.serve_load")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 49152
EOS = 2


def smollm2_shape(layers: int, seed: int = 0) -> torch.nn.Module:
    """Random-init Llama with SmolLM2-135M's shape; same seed, same weights (so several copies agree)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def word_tokenizer():
    """WordLevel tokenizer over the whole vocabulary: id i <-> "t<i>" (0/1/2 are <unk>/<s>/</s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def make_adapters(root: Path, n: int, rank: int, layers: int, std: float) -> list[str]:
    """n random adapters (A Kaiming, B ~ N(0, std)) big enough to change greedy outputs, saved under root."""
    model = smollm2_shape(layers)
    names = [f"ad{i:02d}" for i in range(n)]
    for i, name in enumerate(names):
        torch.manual_seed(1000 + i)
        deltaw.attach(model, deltaw.LoraConfig(r=rank, alpha=2 * rank, target_modules=TARGETS), name,
                      trainable=False, activate=False)
        with torch.no_grad():
            for layer in deltaw.state(model).layers.values():
                if name in layer.lora_B:
                    layer.lora_B[name].normal_(0.0, std)
        deltaw.save(model, root / name, name)
        deltaw.delete(model, name)
    return names


def offline_reference(model: torch.nn.Module, requests: list[dict], deadline: float) -> list[list[int] | None]:
    """Greedy generate per request, the adapter active via deltaw.using; None where the time budget ran out."""
    out: list[list[int] | None] = []
    memo: dict[tuple, list[int]] = {}
    for req in requests:
        key = (tuple(req["prompt"]), req["model"], req["max_tokens"])
        if key not in memo:
            if time.monotonic() > deadline:
                out.append(None)
                continue
            adapter = None if req["model"] == "base" else req["model"]
            with deltaw.using(model, adapter), torch.inference_mode():
                ids = torch.tensor([req["prompt"]])
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=req["max_tokens"],
                                     do_sample=False, pad_token_id=0)
            new = gen[0, ids.shape[1]:].tolist()
            memo[key] = new[:new.index(EOS)] if EOS in new else new
        out.append(memo[key])
    return out


async def fire(url: str, requests: list[dict], clients: int, timeout: float) -> tuple[list[dict], float]:
    """Send every request with at most ``clients`` in flight; returns per-request results and the wall time."""
    import httpx

    sem = asyncio.Semaphore(clients)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def one(req: dict) -> dict:
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"{url}/v1/completions", json={**req, "temperature": 0})
                except httpx.HTTPError as exc:
                    return {"status": None, "error": repr(exc), "latency": time.perf_counter() - t0}
                body = r.json()
                res = {"status": r.status_code, "latency": time.perf_counter() - t0}
                if r.status_code == 200:
                    res["text"] = body["choices"][0]["text"]
                    res["tokens"] = body["usage"]["completion_tokens"]
                else:
                    res["error"] = body.get("error", {}).get("message")
                return res

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(r) for r in requests))
        return list(results), time.perf_counter() - t0


def serve_mode(mode: str, model: torch.nn.Module, tokenizer, root: Path, names: list[str], requests: list[dict],
               args: argparse.Namespace, reference: list[list[int] | None], deadline: float) -> dict:
    from deltaw.serve import DeltawServer, ServerThread, ServeSettings

    for name in deltaw.adapters(model):  # a fresh server starts with no adapter resident
        deltaw.delete(model, name)
    settings = ServeSettings(max_batch_size=1 if mode == "sequential" else args.max_batch_size,
                             batch_policy="same-adapter" if mode == "same_adapter" else "mixed",
                             max_wait_ms=args.max_wait_ms, row_strategy=args.row_strategy, base_name="base",
                             max_tokens_limit=max(64, args.max_tokens), max_queue=10 * len(requests))
    server = DeltawServer(model, tokenizer, root, settings)
    import httpx

    with ServerThread(server) as url:
        t0 = time.perf_counter()
        for name in names:
            r = httpx.post(f"{url}/v1/adapters", json={"name": name}, timeout=120)
            r.raise_for_status()
        load_s = time.perf_counter() - t0
        asyncio.run(fire(url, requests[:2], 2, 120))  # warm-up (not timed)
        budget = max(10.0, deadline - time.monotonic())
        results, wall = asyncio.run(fire(url, requests, args.clients, budget))
        steps = server.scheduler.steps
        count, total = server.metrics.batch_rows.snapshot()
    wrong, errors, timeouts, tokens, checked = 0, 0, 0, 0, 0
    examples: list[dict] = []
    for req, res, want in zip(requests, results, reference):
        if res.get("status") is None and "Timeout" in (res.get("error") or ""):
            timeouts += 1  # the mode's share of --time-limit ran out: not an answer, not a wrong one
            continue
        if res.get("status") != 200:
            errors += 1
            if len(examples) < 3:
                examples.append({"model": req["model"], "error": res.get("error")})
            continue
        tokens += res["tokens"]
        if want is None:
            continue
        checked += 1
        if res["text"] != tokenizer.decode(want, skip_special_tokens=True):
            wrong += 1
            if len(examples) < 3:
                examples.append({"model": req["model"], "got": res["text"][:80],
                                 "want": tokenizer.decode(want, skip_special_tokens=True)[:80]})
    latencies = sorted(r["latency"] for r in results)
    out = {"mode": mode, "requests": len(requests), "checked": checked, "wrong": wrong, "errors": errors,
           "timeouts": timeouts,
           "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
           "p50_latency_s": round(latencies[len(latencies) // 2], 3),
           "p99_latency_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3),
           "decode_steps": steps, "mean_rows_per_step": round(total / count, 2) if count else 0.0,
           "adapter_load_s": round(load_s, 2), "examples": examples}
    log.info("%-12s %6.1f tok/s  wall %6.1fs  p50 %.2fs  rows/step %.1f  wrong %d  errors %d  timeouts %d", mode,
             out["tokens_per_s"], wall, out["p50_latency_s"], out["mean_rows_per_step"], wrong, errors, timeouts)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers, 4 new tokens, prompts of 4-12 tokens, a 160 s "
                                                      "budget: under 3 minutes on 2 shared cores")
    p.add_argument("--clients", type=int, default=200, help="requests, all in flight at once (<= 1000)")
    p.add_argument("--adapters", type=int, default=50)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 30; --quick: 2)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 16; quick 4)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="prompt tokens (default 8 24; quick 4 12)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--row-strategy", default="auto")
    p.add_argument("--modes", default="mixed,same_adapter,sequential",
                   help="which runs, in order (the first gets the largest share of the time left)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 by default: on a shared, oversubscribed box OpenMP barriers stall "
                        "and 2 threads measured ~2x slower than 1)")
    p.add_argument("--adapter-std", type=float, default=0.05, help="std of the random lora_B entries")
    p.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run, imports aside "
                                                                   "(default 3600; quick: 160)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.layers = args.layers or (2 if args.quick else 30)
    args.max_tokens = args.max_tokens or (4 if args.quick else 16)
    args.prompt_len = tuple(args.prompt_len or ((4, 12) if args.quick else (8, 24)))
    args.time_limit = args.time_limit or (160.0 if args.quick else 3600.0)
    if not 1 <= args.clients <= 1000:
        p.error("--clients must be in 1..1000")
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in ("sequential", "same_adapter", "mixed") for m in modes):
        p.error("--modes takes sequential, same_adapter, mixed")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "deltaw.serve.adapters", "deltaw.serve.scheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    deadline = start + args.time_limit

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="deltaw-serve-load-") as tmp:
        root = Path(tmp)
        names = make_adapters(root, args.adapters, args.rank, args.layers, args.adapter_std)
        tokenizer = word_tokenizer()
        models = [names[i % len(names)] for i in range(args.clients)]
        rng.shuffle(models)
        requests = [{"model": m, "max_tokens": args.max_tokens,
                     "prompt": [1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(*args.prompt_len))]}
                    for m in models]
        log.info("built %d adapters (rank %d, %d layers) in %.1fs", len(names), args.rank, args.layers,
                 time.monotonic() - start)

        ref_model = smollm2_shape(args.layers, args.seed)
        for name in names:
            deltaw.load(ref_model, root / name, name, activate=False)
        t0 = time.monotonic()
        # The offline reference gets at most ~35% of the budget; the rest is for the three served runs.
        reference = offline_reference(ref_model, requests, t0 + 0.35 * (deadline - t0))
        ref_s = time.monotonic() - t0
        # Would a wrong-adapter answer be caught? The same prompts under other adapters must answer differently.
        probes = [({**req, "model": names[(names.index(req["model"]) + 1) % len(names)]}, want)
                  for req, want in zip(requests[:5], reference[:5]) if want is not None and len(names) > 1]
        others = offline_reference(ref_model, [q for q, _ in probes], float("inf"))
        effect = sum(o != w for o, (_, w) in zip(others, probes)) / len(probes) if probes else None
        log.info("offline reference: %d/%d requests in %.1fs; another adapter changes the answer in %s of probes",
                 sum(r is not None for r in reference), len(requests), ref_s,
                 f"{effect:.0%}" if effect is not None else "n/a")
        del ref_model

        serve_model = smollm2_shape(args.layers, args.seed)
        results: dict[str, dict] = {}
        # The measured mode runs first and may use up to 45% of the time left; the baselines share the rest
        # (one sequence at a time is the slowest). A run that cannot finish in its share reports timeouts.
        for i, mode in enumerate(modes):
            share = 1.0 if i == len(modes) - 1 else 0.45
            mode_deadline = time.monotonic() + (deadline - time.monotonic()) * share
            results[mode] = serve_mode(mode, serve_model, tokenizer, root, names, requests, args, reference,
                                       mode_deadline)

    mixed = results.get("mixed", {})
    report = {
        "requests": len(requests),
        "wrong": mixed.get("wrong"),
        "errors": mixed.get("errors"),
        "tokens_per_s": mixed.get("tokens_per_s"),
        "tokens_per_s_sequential": results.get("sequential", {}).get("tokens_per_s"),
        "tokens_per_s_same_adapter_batching": results.get("same_adapter", {}).get("tokens_per_s"),
        "checked_against_offline": mixed.get("checked"),
        "adapter_effect": effect,
        "offline_reference_s": round(ref_s, 2),
        "wrong_all_modes": sum(r["wrong"] for r in results.values()),
        "errors_all_modes": sum(r["errors"] for r in results.values()),
        "timeouts_all_modes": sum(r["timeouts"] for r in results.values()),
        "config": {"clients": args.clients, "adapters": args.adapters, "layers": args.layers, "rank": args.rank,
                   "max_tokens": args.max_tokens, "prompt_len": list(args.prompt_len),
                   "max_batch_size": args.max_batch_size, "threads": args.threads,
                   "row_strategy": args.row_strategy, "quick": args.quick},
        "modes": results,
        "total_s": round(time.monotonic() - start, 1),
    }
    seq = report["tokens_per_s_sequential"]
    same = report["tokens_per_s_same_adapter_batching"]
    if seq and mixed.get("tokens_per_s"):
        report["speedup_vs_sequential"] = round(mixed["tokens_per_s"] / seq, 2)
    if same and mixed.get("tokens_per_s"):
        report["speedup_vs_same_adapter"] = round(mixed["tokens_per_s"] / same, 2)
    print(json.dumps({k: v for k, v in report.items() if k != "modes"}, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    ok = report["wrong_all_modes"] == 0 and report["errors_all_modes"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
