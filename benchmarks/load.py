#!/usr/bin/env python
"""Load an r=16 adapter of the SmolLM2-135M-shape model (all 7 projections, 19.6 MB) from disk (page cache)."""

import resource
import sys

import deltaw
from _common import Result, Target, summarize, adapter_bytes_deltaw, repeats, standalone, timed_ms

MEASURE = "load"
TARGET = Target(20.0, "ms")


def run(env):
    c = env.smol_resident(4)
    src = str(c.dirs[c.names[1]])
    dw_t, peft_t, faults = [], [], []
    for i in range(repeats(env.quick, 15, 5) + 1):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        dw_ms = timed_ms(lambda: deltaw.load(c.dw, src, "loaded", activate=False))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        deltaw.delete(c.dw, "loaded")
        peft_ms = timed_ms(lambda: c.peft.load_adapter(src, adapter_name="loaded"))
        c.peft.delete_adapter("loaded")
        if i:  # the first round warms the page cache and lazy imports
            dw_t.append(dw_ms)
            peft_t.append(peft_ms)
    c.peft.set_adapter(c.names[0])
    med = summarize(dw_t), summarize(peft_t)
    # (fresh memory costs a page fault per 4 KB: the heap's state, not deltaw's code, decides how many)
    note = f"page faults per deltaw load: median {summarize(faults[1:]):.0f}"
    return Result(MEASURE, med[0], med[1], None, adapter_bytes_deltaw(c.dw, c.names[1]) / 2**20, note)


if __name__ == "__main__":
    standalone(sys.modules[__name__])
