#!/usr/bin/env python
"""Decode one token per row, B = 16, every row a different adapter (16 distinct r=16 adapters), 64-token cache."""

import sys
from _common import Target, decode_result, standalone

MEASURE = "decode_b16_k16"
TARGET = Target(1.40)


def run(env):
    c = env.smol()
    return decode_result(env, MEASURE, 16, [c.names[i] for i in range(16)])


if __name__ == "__main__":
    standalone(sys.modules[__name__])
