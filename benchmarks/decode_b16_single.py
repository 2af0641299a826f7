#!/usr/bin/env python
"""Decode one token per row, B = 16, one active unmerged adapter for the whole batch (no per-row plan)."""

import sys
from _common import Target, decode_result, standalone

MEASURE = "decode_b16_single"
TARGET = Target(1.10)


def run(env):
    return decode_result(env, MEASURE, 16, None)


if __name__ == "__main__":
    standalone(sys.modules[__name__])
