#!/usr/bin/env python
"""Switch the merged adapter of the SmolLM2-135M-shape model (r=16, 7 projections): deltaw
``merge(b, replace=True)`` rewrites the merged weights in place from W0; PEFT unmerges (subtracts) and merges.
Not one of the issue's nine measures: the in-place path a server that switches merged adapters would take."""

import sys

import torch

import deltaw
from _common import Result, Target, base_weights, merged_as_expected, repeats, standalone, summarize, timed_ms

MEASURE = "merge_switch"
TARGET = Target(100.0, "ms", "≤ 100 ms, exact")


def _peft_switch(model, name: str) -> None:
    model.unmerge_adapter()
    model.merge_adapter([name])


def run(env):
    c = env.smol_resident(4)
    a, b = c.names[0], c.names[1]
    before = {k: v.clone() for k, v in base_weights(c.dw).items()}
    dw_t, peft_t = [], []
    with torch.no_grad():
        deltaw.merge(c.dw, a)
        c.peft.merge_adapter([a])
        for i in range(repeats(env.quick, 10, 4) + 1):
            nxt, prev = (b, a) if i % 2 == 0 else (a, b)
            dw_ms = timed_ms(lambda: deltaw.merge(c.dw, nxt, replace=True))
            peft_ms = timed_ms(lambda: _peft_switch(c.peft, nxt))
            if i:
                dw_t.append(dw_ms)
                peft_t.append(peft_ms)
        right, check = merged_as_expected(c.dw, deltaw.merged(c.dw)[0][0], before)
        deltaw.unmerge(c.dw)
        c.peft.unmerge_adapter()
    exact = right and all(torch.equal(before[k], v) for k, v in base_weights(c.dw).items())
    c.peft.set_adapter(a)
    return Result(MEASURE, summarize(dw_t), summarize(peft_t), None,
                  note=f"deltaw W0 exact after the switches and unmerge, last merge right: {exact} ({check})",
                  extra={"exact": exact})


if __name__ == "__main__":
    standalone(sys.modules[__name__])
