"""CLI tests reuse the tiny models of tests/train; one CPU thread (see tests/train/conftest.py)."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "train"))

torch.set_num_threads(1)
