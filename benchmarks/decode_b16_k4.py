#!/usr/bin/env python
"""Decode one token per row, B = 16, 4 distinct adapters interleaved over the rows (a, b, c, d, a, ...)."""

import sys
from _common import Target, decode_result, standalone

MEASURE = "decode_b16_k4"
TARGET = Target(1.20)


def run(env):
    c = env.smol()
    return decode_result(env, MEASURE, 16, [c.names[i % 4] for i in range(16)])


if __name__ == "__main__":
    standalone(sys.modules[__name__])
