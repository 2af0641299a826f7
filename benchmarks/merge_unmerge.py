#!/usr/bin/env python
"""Merge one r=16 adapter into the SmolLM2-135M-shape model and unmerge it; deltaw must restore W0 bit for bit.

deltaw runs its defaults: ``unmerge`` keeps the merged weights' memory (CPU) and the next merge writes into it,
so the repeats time that steady state; the first cycle, into fresh memory, is reported in the note."""

import sys

import torch

import deltaw
from _common import Result, Target, base_weights, merged_as_expected, repeats, standalone, summarize, timed_ms

MEASURE = "merge_unmerge"
TARGET = Target(100.0, "ms", "≤ 100 ms, exact")


def run(env):
    c = env.smol_resident(4)
    name = c.names[0]
    before_dw = {k: v.clone() for k, v in base_weights(c.dw).items()}
    before_peft = {k: v.clone() for k, v in base_weights(c.peft).items()}
    c.peft.set_adapter(name)

    def dw_cycle():
        deltaw.merge(c.dw, name)
        deltaw.unmerge(c.dw)

    def peft_cycle():
        c.peft.merge_adapter([name])
        c.peft.unmerge_adapter()

    deltaw.merge(c.dw, name)
    right, check = merged_as_expected(c.dw, name, before_dw)
    deltaw.unmerge(c.dw)
    dw_t, peft_t = [], []
    with torch.no_grad():
        for i in range(repeats(env.quick, 10, 4) + 1):
            dw_ms, peft_ms = timed_ms(dw_cycle), timed_ms(peft_cycle)
            if i:
                dw_t.append(dw_ms)
                peft_t.append(peft_ms)
            else:
                first = dw_ms
    after_dw, after_peft = base_weights(c.dw), base_weights(c.peft)
    # (the steady state's price: the merged weights' memory an unmerge keeps for the next merge)
    kept = sum(t.numel() * t.element_size() for layer in deltaw.state(c.dw).layers.values()
               if isinstance(t := layer._spare, torch.Tensor))
    exact = right and all(torch.equal(before_dw[k], after_dw[k]) for k in before_dw)
    drift = max((after_peft[k].float() - v.float()).abs().max().item() for k, v in before_peft.items())
    med = summarize(dw_t), summarize(peft_t)
    note = (f"deltaw exact: {exact} ({check}); first cycle (fresh memory) {first:.0f} ms; memory kept between "
            f"cycles {kept / 2**20:.0f} MB (unmerge(keep_memory=False) gives it back); "
            f"PEFT max |ΔW0| after round trips: {drift:.1e}")
    return Result(MEASURE, med[0], med[1], None, note=note, extra={"exact": exact})


if __name__ == "__main__":
    standalone(sys.modules[__name__])
