"""pytest plugin: the tests run on the simulated CUDA device of simcuda.py (see README.md).

Loaded by ``tools/simcuda/run`` (``-p plugin``, with this folder on PYTHONPATH), never by the normal suite. On top
of simcuda.py it provides:
  * torch.cuda's API as a machine with one GPU answers it (is_available, device_count, name, capability,
    synchronize, memory statistics, ...), so that deltaw and the tests take their CUDA paths;
  * the CUDA RNG API (manual_seed(_all), seed(_all), initial_seed, get/set_rng_state(_all)) on
    simcuda.cuda_generator, which torch.manual_seed seeds too: a checkpoint that forgot the CUDA RNG state breaks
    bit-for-bit resume here as it would on a GPU;
  * the simulation for the whole test loop (session and module fixtures included) and in every thread started
    meanwhile: a dispatch mode is per thread, and the server's threads (uvicorn, the scheduler, asyncio.to_thread
    workers) must run under it too;
  * the advisories of simcuda.py, labelled with the test's node id, in the file $SIMCUDA_ADVISORY (default
    simcuda_advisories.txt in the system's temp dir, rewritten each run), and a summary line of the ops each
    thread ran on the device.

SIMCUDA_NEG_CONTROL=no_cuda_rng_restore (a self-test of the harness) makes set_rng_state(_all) forget the state:
tests/train/test_device_train.py must then fail.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import simcuda

# ---------------------------------------------------------------------------------------------------- torch.cuda
_MASK_64 = 0xFFFF_FFFF_FFFF_FFFF

# What torch.cuda's queries answer on a machine with one GPU (capability 9.0, as an H100/H200).
_ANSWERS: dict[str, Any] = {
    "is_available": True, "device_count": 1, "is_initialized": True, "current_device": 0,
    "get_device_name": "SimCUDA (CPU-backed simulation)", "get_device_capability": (9, 0),
    "is_bf16_supported": True, "memory_allocated": 0, "max_memory_allocated": 0, "memory_reserved": 0,
    "max_memory_reserved": 0, "mem_get_info": (100 << 30, 140 << 30),  # (free, total) bytes
    # Calls with nothing to do on the simulated device:
    "_lazy_init": None, "set_device": None, "synchronize": None, "empty_cache": None,
    "reset_peak_memory_stats": None,
}


def _answering(value: Any) -> Callable[..., Any]:
    def stub(*args: Any, **kwargs: Any) -> Any:
        return value
    return stub


def _manual_seed(seed: int) -> None:
    simcuda.cuda_generator.manual_seed(int(seed) & _MASK_64)


def _seed() -> None:
    simcuda.cuda_generator.seed()


def _initial_seed() -> int:
    return simcuda.cuda_generator.initial_seed()


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return simcuda.cuda_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    simcuda.cuda_generator.set_state(new_state)


def _get_rng_state_all() -> list[torch.Tensor]:
    return [simcuda.cuda_generator.get_state()]


def _set_rng_state_all(new_states: Sequence[torch.Tensor]) -> None:
    for state in new_states:
        simcuda.cuda_generator.set_state(state)


def _forget_rng_state(*args: Any, **kwargs: Any) -> None:
    """SIMCUDA_NEG_CONTROL=no_cuda_rng_restore: set_rng_state(_all) that restores nothing."""


class _SameDevice(contextlib.ContextDecorator):
    """torch.cuda.device / device_of: with one device there is nothing to switch."""

    def __init__(self, device: Any = None) -> None:
        pass

    def __enter__(self) -> _SameDevice:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None


def _install_cuda_api() -> None:
    cuda = torch.cuda
    for name, value in _ANSWERS.items():
        setattr(cuda, name, _answering(value))
    cuda.manual_seed = cuda.manual_seed_all = _manual_seed
    cuda.seed = cuda.seed_all = _seed
    cuda.initial_seed = _initial_seed
    cuda.get_rng_state = _get_rng_state
    cuda.get_rng_state_all = _get_rng_state_all
    cuda.set_rng_state = _set_rng_state
    cuda.set_rng_state_all = _set_rng_state_all
    cuda.device = cuda.device_of = _SameDevice
    negative_control = os.environ.get("SIMCUDA_NEG_CONTROL", "")
    if negative_control == "no_cuda_rng_restore":
        cuda.set_rng_state = cuda.set_rng_state_all = _forget_rng_state
    elif negative_control:
        warnings.warn(f"SIMCUDA_NEG_CONTROL={negative_control!r} is unknown (known: no_cuda_rng_restore); ignored",
                      stacklevel=1)


_install_cuda_api()

# ---------------------------------------------------------------------------------------------------- threads
_simulating = False  # True while the test loop runs under the mode
_original_bootstrap_inner = threading.Thread._bootstrap_inner


def _bootstrap_inner(self: threading.Thread) -> None:
    """Thread start-up: enter the simulation in the new thread too while the tests run."""
    if not _simulating:
        return _original_bootstrap_inner(self)
    with simcuda.SimCudaMode():
        return _original_bootstrap_inner(self)


threading.Thread._bootstrap_inner = _bootstrap_inner

# ---------------------------------------------------------------------------------------------------- pytest hooks
_advisory_path = Path(os.environ.get("SIMCUDA_ADVISORY") or Path(tempfile.gettempdir()) / "simcuda_advisories.txt")
_advisory_handler: logging.FileHandler | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _advisory_handler
    _advisory_handler = logging.FileHandler(_advisory_path, mode="w", encoding="utf-8")
    _advisory_handler.setFormatter(logging.Formatter("%(message)s"))
    simcuda.log.addHandler(_advisory_handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _advisory_handler
    if _advisory_handler is not None:
        simcuda.log.removeHandler(_advisory_handler)
        _advisory_handler.close()
        _advisory_handler = None


def pytest_report_header(config: pytest.Config) -> str:
    return "simcuda: simulated cuda:0 (CPU-backed); mode entered for the test loop and in every new thread"


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Generator[None, object, object]:
    global _simulating
    _simulating = True
    try:
        with simcuda.SimCudaMode():
            return (yield)
    finally:
        _simulating = False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    simcuda.set_advisory_context(item.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"simcuda: ops on the simulated device, by thread: {dict(simcuda.ops_by_thread)}")
    if _advisory_handler is not None:
        _advisory_handler.flush()
    count = len(_advisory_path.read_text(encoding="utf-8").splitlines()) if _advisory_path.exists() else 0
    terminalreporter.write_line(f"simcuda: {count} advisories (once per op and test) in {_advisory_path}")
