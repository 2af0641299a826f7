#!/usr/bin/env python
"""Held-out parse accuracy of the learned scene parser (SmolLM2 + the plan-parser LoRA), and its step budget.

    python benchmarks/plan_parser.py [--n 600] [--seed 2024] [--adapter DIR] [--json PATH]
    python benchmarks/plan_parser.py --sweep 200 --milestones 30,60,90,120,160,200   # how many steps are needed

Default mode: loads the cached adapter (``deltaw.plan.llm_parser.ensure_parser_adapter``; trains it first if
missing and reports how long that took) or ``--adapter DIR``, decodes ``--n`` held-out examples (templates and
vocabulary never seen in training) in batches and prints exact-match accuracy (all five fields), per field and
per template, with the rule-parser fallback *disabled* -- the model's own accuracy -- and then with it enabled
(what ``deltaw plan`` does), plus how often the fallback answered.

``--sweep STEPS``: one training run of STEPS steps with the default settings otherwise; at each milestone the
adapter is saved and scored on a separate held-out *development* set (``--dev-seed``, ``--dev-n``), so the
step budget is chosen on data the final report (``--seed``) never sees. With the constant learning rate and a
fixed example pool, the adapter at step N equals a run of N steps (see ``ParserTrainSettings``).

One CPU thread by default (``--threads``): on a shared 2-core machine two threads are often slower than one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

import deltaw
from deltaw.models import load_smollm2
from deltaw.plan import RuleParser, evaluate_parser_report, generate_examples
from deltaw.plan import llm_parser as lp


def report_lines(title: str, report) -> list[str]:
    fields = "  ".join(f"{k} {v:.1%}" for k, v in report.per_field.items())
    templates = "  ".join(f"{k} {v:.0%}" for k, v in report.per_template.items())
    return [f"{title}: {report.accuracy:.2%} exact ({report.n} examples)", f"  per field: {fields}",
            f"  per template: {templates}"]


def evaluate(args: argparse.Namespace) -> dict:
    train_seconds = None
    if args.adapter:
        adapter = Path(args.adapter)
    else:
        settings = lp.ParserTrainSettings()
        if args.steps is not None:
            settings = replace(settings, steps=args.steps)
        adapter = lp.adapter_cache_dir(settings)
        if not lp._is_adapter_dir(adapter):
            start = time.perf_counter()
            lp.ensure_parser_adapter(settings)
            train_seconds = time.perf_counter() - start
    info_path = adapter / "parser.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    examples = generate_examples(args.n, seed=args.seed, split="heldout")
    start = time.perf_counter()
    parser = lp.LlmParser.from_adapter(adapter, fallback=None, batch_size=args.batch_size)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    parser.prefetch(e.text for e in examples)
    decode_s = time.perf_counter() - start
    beam_memo: dict[tuple[str, int], list[str]] = {}  # every variant below sees the same beam answers

    def variant(**kwargs) -> lp.LlmParser:
        v = lp.LlmParser(parser.model, parser.tokenizer, **kwargs)
        v._memo = parser._memo
        plain = v.generate

        def generate(texts, beams=1):
            if beams == 1:
                return plain(texts)
            todo = [t for t in texts if (t, beams) not in beam_memo]
            beam_memo.update({(t, beams): b for t, b in zip(todo, plain(todo, beams=beams))} if todo else {})
            return [beam_memo[(t, beams)] for t in texts]

        v.generate = generate
        return v

    greedy_report = evaluate_parser_report(variant(fallback=None, retry_beams=0, snap=False), examples,
                                           keep_failures=0)  # the model's first answer, as it wrote it
    snapped = variant(fallback=None, retry_beams=0)
    snapped_report = evaluate_parser_report(snapped, examples, keep_failures=0)
    start = time.perf_counter()
    unsnapped = variant(fallback=None, snap=False)  # the previous pipeline: greedy, then grounded beams
    unsnapped_report = evaluate_parser_report(unsnapped, examples, keep_failures=0)
    retry_s = time.perf_counter() - start
    parser = variant(fallback=None)
    raw = evaluate_parser_report(parser, examples, keep_failures=args.failures)
    piped = variant()  # same answers, rule-parser fallback on
    logging.getLogger(lp.__name__).setLevel(logging.ERROR)
    with_fallback = evaluate_parser_report(piped, examples, keep_failures=0)
    rules = evaluate_parser_report(RuleParser(), examples, keep_failures=0)
    lines = [f"adapter {adapter} (settings {info.get('settings')}, trained in {info.get('train_seconds')} s)"]
    if train_seconds is not None:
        lines.append(f"trained now: {train_seconds:.0f} s")
    lines += [f"held-out split, seed {args.seed}: load {load_s:.1f} s, batched greedy decoding {decode_s:.1f} s "
              f"({decode_s / len(examples) * 1000:.0f} ms/request, batch {args.batch_size}, {torch.get_num_threads()} "
              "thread(s))"]
    lines += report_lines("LLM parser, greedy only, as written", greedy_report)
    lines += report_lines("LLM parser, greedy, spans snapped to the text", snapped_report)
    lines += report_lines("LLM parser, greedy then the first grounded of 4 beams, not snapped", unsnapped_report)
    lines += report_lines("LLM parser, no fallback (snapped; greedy, grounded beam, then unsupported fields "
                          "dropped)", raw)
    lines.append(f"  beam retry for {parser.retries} of {len(examples)} requests ({retry_s:.1f} s), usable for "
                 f"{parser.rescued}; answered with unsupported fields dropped: {parser.relaxed}")
    lines += report_lines("LLM parser + rule fallback", with_fallback)
    lines.append(f"  fallback used for {piped.fallbacks} of {len(examples)} requests")
    lines.append(f"rule parser (--no-llm): {rules.accuracy:.2%}")
    if raw.failures:
        lines.append("failures (text | expected | got):")
        lines += [f"  {t} | {e} | {g}" for t, e, g in raw.failures]
    print("\n".join(lines))
    return {"adapter": str(adapter), "settings": info.get("settings"), "train_seconds": info.get("train_seconds"),
            "n": len(examples), "seed": args.seed, "decode_seconds": decode_s, "greedy": greedy_report.to_dict(),
            "greedy_snapped": snapped_report.to_dict(), "beams_unsnapped": unsnapped_report.to_dict(),
            "raw": raw.to_dict(), "retries": parser.retries, "rescued": parser.rescued, "relaxed": parser.relaxed,
            "with_fallback": with_fallback.to_dict(), "fallbacks": piped.fallbacks, "rules": rules.accuracy}


def sweep(args: argparse.Namespace) -> dict:
    milestones = sorted({int(m) for m in args.milestones.split(",")} | {args.sweep})
    out = Path(args.sweep_dir)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty")
    model, tok = load_smollm2()
    dev = generate_examples(args.dev_n, seed=args.dev_seed, split="heldout")
    results: list[dict] = []
    start = time.perf_counter()

    def at_milestone(info) -> None:
        if info.step not in milestones:
            return
        deltaw.save(model, out / f"step-{info.step}", "default")
        t0 = time.perf_counter()
        report = lp.evaluate_llm_parser(lp.LlmParser(model, tok, fallback=None, batch_size=args.batch_size), dev)
        model.train()
        rec = {"step": info.step, "train_loss": info.loss, "dev_accuracy": report.accuracy,
               "per_field": report.per_field, "per_template": report.per_template,
               "train_seconds": time.perf_counter() - start - sum(r["eval_seconds"] for r in results),
               "eval_seconds": time.perf_counter() - t0}
        results.append(rec)
        print(f"step {info.step:4d}  loss {info.loss:.4f}  dev exact {report.accuracy:.1%}  "
              f"train {rec['train_seconds']:.0f} s", flush=True)

    settings = replace(lp.ParserTrainSettings(), steps=args.sweep)
    lp.train_parser_adapter(out / "run", settings=settings, model=model, tokenizer=tok, callbacks=[at_milestone])
    return {"sweep": results, "settings": settings.__dict__, "dev_seed": args.dev_seed, "dev_n": args.dev_n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600, help="held-out examples to score")
    ap.add_argument("--seed", type=int, default=2024, help="held-out split seed of the reported set")
    ap.add_argument("--adapter", help="score this adapter folder instead of the cached one")
    ap.add_argument("--steps", type=int, help="with no --adapter: the cached adapter for this step budget")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--failures", type=int, default=15, help="failures to print")
    ap.add_argument("--sweep", type=int, help="train STEPS steps, scoring on the dev set at each milestone")
    ap.add_argument("--milestones", default="30,60,90,120,160,200")
    ap.add_argument("--sweep-dir", default="runs/plan-parser-sweep")
    ap.add_argument("--dev-seed", type=int, default=7)
    ap.add_argument("--dev-n", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("deltaw.train").setLevel(logging.WARNING)
    result = sweep(args) if args.sweep else evaluate(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
