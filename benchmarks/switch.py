#!/usr/bin/env python
"""Activate / switch the adapter among 4 resident ones (deltaw.activate vs PEFT set_adapter)."""

import sys
import time

import deltaw
from _common import Result, Target, summarize, repeats, standalone

MEASURE = "switch"
TARGET = Target(0.05, "ms", "≤ 50 µs")


def _per_call_ms(fn, names, calls):
    t0 = time.perf_counter()
    for i in range(calls):
        fn(names[i % len(names)])
    return (time.perf_counter() - t0) * 1e3 / calls


def run(env):
    c = env.smol_resident(4)
    names = c.names[:4]

    def dw(name):
        deltaw.activate(c.dw, name)

    def peft(name):
        c.peft.set_adapter(name)

    dw_t, peft_t = [], []
    for _ in range(repeats(env.quick, 15, 5)):
        dw_t.append(_per_call_ms(dw, names, 400))
        peft_t.append(_per_call_ms(peft, names, 4))
    deltaw.activate(c.dw, names[0])
    c.peft.set_adapter(names[0])
    med = summarize(dw_t), summarize(peft_t)
    return Result(MEASURE, med[0], med[1], None, note=f"{len(c.names)} resident")


if __name__ == "__main__":
    standalone(sys.modules[__name__])
