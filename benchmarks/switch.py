#!/usr/bin/env python
"""Activate / switch the adapter among 4 resident ones (deltaw.activate vs PEFT set_adapter), and what a switch leaves
for the next step."""

import statistics
import sys
import time

import torch

import deltaw
from _common import DecodeStep, Result, Target, repeats, standalone, summarize, timed_ms

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
    med = summarize(dw_t), summarize(peft_t)
    after = {k: _first_step_extra_ms(switch, step, names, repeats(env.quick, 20, 6))
             for k, switch, step in (("deltaw", dw, DecodeStep(c.dw, 1)), ("peft", peft, DecodeStep(c.peft, 1)))}
    deltaw.activate(c.dw, names[0])
    c.peft.set_adapter(names[0])
    note = (f"{len(c.names)} resident; work left for the next step (B=1 decode step right after a switch minus "
            f"a steady one, paired median): deltaw {after['deltaw']:+.2f} ms, PEFT {after['peft']:+.2f} ms")
    return Result(MEASURE, med[0], med[1], None, note=note, extra={"first_step_extra_ms": after})


def _first_step_extra_ms(switch, step, names, rounds):
    """What a switch leaves for the next forward (work done lazily: deltaw plans each adapter once per layer, on
    its first step, and never again for a resident adapter). Every adapter has run a step before the rounds.
    The difference of two ~60 ms steps is noisy (±0.3 ms over 20 rounds): it shows deferred work of a ms or more,
    which the activate timing above would not."""
    with torch.inference_mode():
        for name in names:
            switch(name)
            step()
        extra = []
        for i in range(rounds):
            steady = timed_ms(step)
            nxt = names[(i + 1) % len(names)]
            extra.append(timed_ms(lambda: (switch(nxt), step())) - steady)
    return statistics.median(extra)


if __name__ == "__main__":
    standalone(sys.modules[__name__])
