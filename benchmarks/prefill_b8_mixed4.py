#!/usr/bin/env python
"""Prefill (encoder forward) of 8 × 128 tokens on BERT-base shape, 4 adapters mixed over the rows."""

import sys
import torch

import _common
from _common import Result, Target, adapter_bytes_deltaw, agreement, repeats, standalone, time_interleaved, timed_ms

MEASURE = "prefill_b8_mixed4"
TARGET = Target(1.05)


def run(env):
    from deltaw.batching import cache_nbytes, clear_cache, per_row
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
        with torch.inference_mode():
            # The first forward of a new set of rows packs the factors (the timed repeats reuse the packs, as
            # the steps of one batch do): reported, against a base forward right after it.
            cold = timed_ms(dw), timed_ms(base)
        times = time_interleaved({"base": base, "deltaw": dw, "peft": peft}, repeats(env.quick, 15, 3), warmup=1)
        with torch.inference_mode():
            agrees, check = agreement(dw().last_hidden_state, peft().last_hidden_state, base().last_hidden_state)
        packed = cache_nbytes()
    clear_cache()
    note = (f"first forward of these rows (packs {packed / 2**20:.0f} MB) {cold[0]:.0f} ms vs base {cold[1]:.0f} ms "
            f"({cold[0] / cold[1]:.3f}x); {check}")
    return Result(MEASURE, times["deltaw"], times["peft"], times["base"], adapter_bytes_deltaw(c.dw, c.names[0]) / 2**20,
                  note, {"agrees": agrees, "first_ms": cold[0], "packed_mb": packed / 2**20})


if __name__ == "__main__":
    standalone(sys.modules[__name__])
