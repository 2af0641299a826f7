#!/usr/bin/env python
"""Prefill (encoder forward) of 8 × 128 tokens on BERT-base shape, 4 adapters mixed over the rows."""

import sys
import torch

import _common
from _common import Result, Target, adapter_bytes_deltaw, repeats, standalone, time_interleaved

MEASURE = "prefill_b8_mixed4"
TARGET = Target(1.05)


def run(env):
    from deltaw.batching import clear_cache, per_row
    c = env.bert()
    rows = [c.names[i % 4] for i in range(8)]
    ids = torch.randint(0, 30522, (8, 128), generator=torch.Generator().manual_seed(0)).to(_common.DEVICE)
    mask = torch.ones_like(ids)

    def base():
        return c.base(input_ids=ids, attention_mask=mask)

    def dw():
        return c.dw(input_ids=ids, attention_mask=mask)

    def peft():
        return c.peft(input_ids=ids, attention_mask=mask, adapter_names=rows)

    clear_cache()
    with per_row(c.dw, rows, strategy=env.strategy):
        times = time_interleaved({"base": base, "deltaw": dw, "peft": peft}, repeats(env.quick, 15, 3), warmup=1)
    clear_cache()
    return Result(MEASURE, times["deltaw"], times["peft"], times["base"], adapter_bytes_deltaw(c.dw, c.names[0]) / 2**20)


if __name__ == "__main__":
    standalone(sys.modules[__name__])
