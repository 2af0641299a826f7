"""Shared fixtures. Tests run on CPU with deterministic seeds; the toy-model table lives in toy_models.py."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of the device-independent checks (tests marked ``device``: tests/test_api.py's model table and
    tests/*/test_device_*.py):
    ``DELTAW_TEST_DEVICE`` (default cpu, so CI runs the same code). On a GPU machine:
    ``DELTAW_TEST_DEVICE=cuda pytest -m device tests`` (benchmarks/device_check names the files).
    TF32 is switched off there: the checks compare fp32 results at 1e-5."""
    name = os.environ.get("DELTAW_TEST_DEVICE", "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        pytest.fail(f"DELTAW_TEST_DEVICE={name!r} is not a torch device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"DELTAW_TEST_DEVICE={name!r}, but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        pytest.fail(f"DELTAW_TEST_DEVICE={name!r}: the checks know cpu and cuda")
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield dev
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
