#!/usr/bin/env python
"""Decode B = 16 with adapter ad0 merged into the weights (deltaw.merge vs PEFT merge_adapter): ≈ the base."""

import sys
import deltaw
import torch

from _common import DecodeStep, Result, Target, adapter_bytes_deltaw, agreement, repeats, standalone, time_interleaved

MEASURE = "merged"
TARGET = Target(1.03, label="1.00 ± noise (≤ 1.03× base)")


def run(env):
    c = env.smol_resident(4)
    deltaw.activate(c.dw, c.names[0])
    c.peft.set_adapter(c.names[0])
    with torch.inference_mode():
        pristine = DecodeStep(c.base, 16)()  # before the merge (``base`` shares deltaw's weight tensors)
    deltaw.merge(c.dw, c.names[0])
    c.peft.merge_adapter([c.names[0]])
    try:
        # (the base contender runs the merged weights too: it shares deltaw's Parameters, whose data a merge
        # swaps; same shapes, same cost)
        fns = {"base": DecodeStep(c.base, 16), "deltaw": DecodeStep(c.dw, 16), "peft": DecodeStep(c.peft, 16)}
        times = time_interleaved(fns, repeats(env.quick, 30, 6), warmup=2)
        with torch.inference_mode():
            agrees, check = agreement(fns["deltaw"](), fns["peft"](), pristine)
    finally:
        deltaw.unmerge(c.dw)
        c.peft.unmerge_adapter()
    return Result(MEASURE, times["deltaw"], times["peft"], times["base"], adapter_bytes_deltaw(c.dw, c.names[0]) / 2**20,
                  check + " (base: before the merge)", {"agrees": agrees})


if __name__ == "__main__":
    standalone(sys.modules[__name__])
