#!/usr/bin/env python
"""Exactness of merge/unmerge: max |W - W0| after N merge/unmerge cycles, deltaw vs PEFT, same model, same run.

PEFT unmerges by subtracting a recomputed delta, which rounds differently from the add in bf16/fp16 and drifts;
deltaw keeps W0 and recomputes from it, so the round trip is exact by construction. This script measures both.

    python benchmarks/merge_drift.py [--cycles 1000] [--dtype bf16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltaw

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def small_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora" not in k}


def max_drift(model: torch.nn.Module, w0: dict[str, torch.Tensor]) -> float:
    now = base_weights(model)
    return max((now[k].float() - v.float()).abs().max().item() for k, v in w0.items())


def randomize(params, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def run_deltaw(dtype: torch.dtype, cycles: int) -> tuple[list[tuple[int, float]], float]:
    model = small_llama(dtype)
    w0 = base_weights(model)
    deltaw.attach(model, deltaw.LoraConfig(r=16, alpha=32, target_modules=TARGETS), "a")
    randomize(deltaw.adapter_parameters(model, "a"))
    marks, t0 = [], time.perf_counter()
    for i in range(1, cycles + 1):
        deltaw.merge(model, "a")
        deltaw.unmerge(model, "a")
        if i in (1, 10, 100, cycles):
            marks.append((i, max_drift(model, w0)))
    return marks, (time.perf_counter() - t0) / cycles * 1e3


def run_peft(dtype: torch.dtype, cycles: int) -> tuple[list[tuple[int, float]], float] | None:
    try:
        import peft
    except ImportError:
        return None
    model = small_llama(dtype)
    w0 = base_weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    randomize([p for n, p in pm.named_parameters() if "lora_" in n])
    marks, t0 = [], time.perf_counter()
    for i in range(1, cycles + 1):
        pm.merge_adapter()
        pm.unmerge_adapter()
        if i in (1, 10, 100, cycles):
            marks.append((i, max_drift(pm.base_model.model, w0)))
    return marks, (time.perf_counter() - t0) / cycles * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    dtype = DTYPES[args.dtype]
    ours, our_ms = run_deltaw(dtype, args.cycles)
    theirs = run_peft(dtype, args.cycles)
    print(f"| cycles ({args.dtype}, small Llama, r=16, 7 projections) | deltaw max abs(W-W0) | PEFT max abs(W-W0) |")
    print("|---:|---:|---:|")
    for j, (i, d) in enumerate(ours):
        p = f"{theirs[0][j][1]:.3g}" if theirs else "n/a"
        print(f"| {i} | {d:.3g} | {p} |")
    print(f"\nmean time per merge+unmerge cycle: deltaw {our_ms:.2f} ms"
          + (f", PEFT {theirs[1]:.2f} ms" if theirs else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "cycles": args.cycles, "deltaw": ours,
                       "peft": theirs[0] if theirs else None}, f, indent=2)


if __name__ == "__main__":
    main()
