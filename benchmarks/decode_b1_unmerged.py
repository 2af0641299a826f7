#!/usr/bin/env python
"""Decode one token, B = 1, one active unmerged adapter: the per-op overhead case (210 adapted modules)."""

import sys
from _common import Target, decode_result, standalone

MEASURE = "decode_b1_unmerged"
TARGET = Target(1.08)


def run(env):
    return decode_result(env, MEASURE, 1, None)


if __name__ == "__main__":
    standalone(sys.modules[__name__])
