"""A simulated CUDA device: real CPU arithmetic on tensors that claim to live on ``cuda:0``.

Why: deltaw's device bugs -- a CPU tensor mixed into a CUDA op, a CPU generator handed to a CUDA random op, a
native CPU kernel reached with a device tensor -- only show on a GPU, and a GPU is rarely at hand. This module
reproduces CUDA's device-placement *rules* on a CPU-only torch, so that such code raises here as it would there.
It simulates no numerics, kernels or timing (see README.md).

How: a tensor "on cuda" is a :class:`SimTensor`, a wrapper subclass (C++ device ``meta``, no storage of its own)
around a real CPU tensor, whose ``.device`` says ``cuda:0``. Every aten op reaches :func:`_dispatch`, through
:class:`SimCudaMode` (a dispatch mode, which also sees factories called with ``device="cuda"``) or through
``SimTensor.__torch_dispatch__``. It checks the rules, runs the op on the CPU payloads and wraps the results of
ops that had a simulated-cuda operand or device. Values are real, so a run can be compared with a CPU run, and
``.item()``, ``.tolist()`` and ``bool()`` work (as on CUDA, where they synchronise).

The rules, as CUDA enforces them:
  * an op mixing a simulated-cuda tensor with a CPU tensor of dim > 0 raises "Expected all tensors to be on the
    same device" -- except copies between devices, plain advanced indexing with CPU index tensors, and the ops
    that only take a tensor apart (detach, alias, reading out a scalar); 0-dim CPU tensors pass as scalars;
  * indexing a CPU tensor with a simulated-cuda index of dim > 0, or ``index_put_`` of a CPU value of dim > 0
    into a simulated-cuda tensor, raises;
  * a random op on the device draws from its own generator (:data:`cuda_generator`, as CUDA has its own) and
    raises when handed an explicit CPU generator;
  * integer matmuls raise (CUDA has no integer GEMM behind mm/bmm/addmm/...);
  * ``data_ptr()`` is not a host address, so a ctypes kernel handed a simulated-cuda tensor faults (run Python
    with ``-X faulthandler`` to see where), as it would reading a device address on a GPU.
A 0-dim CPU tensor handed to a non-pointwise op on the device is only *advised* (logged on :data:`log`, once per
op and :func:`set_advisory_context` label): whether CUDA accepts it depends on the op.

Importing this module patches torch for the whole process (see "torch patches" below): use it in a dedicated
process only. torch.cuda's own API (is_available, the RNG functions, ...) is stubbed by simcuda_plugin.py next to it,
which a script can import too.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import logging
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.optim.optimizer as torch_optimizer
import torch.utils._device
from torch._ops import OpOverload
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
aten = torch.ops.aten

log = logging.getLogger("simcuda")
"""Advisories: one WARNING per (op, context), the message tab-separated: context, op, what, the caller's line."""

cuda_generator = torch.Generator()
"""The simulated device's random generator: random ops on the device draw from it, not from the CPU's."""
cuda_generator.manual_seed(0)

ops_by_thread: collections.Counter[str] = collections.Counter()
"""Ops run on the simulated device, by thread name (its first word), to show which threads the simulation saw."""

# Ops that CUDA runs with CPU tensors (of any dim) among a cuda tensor's operands: copies between devices, plain
# advanced indexing with CPU indices, and ops that only take a tensor apart or read a scalar out of it.
_CPU_OPERANDS_OK = frozenset({
    aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
    aten._index_put_impl_.default, aten.lift_fresh.default, aten.detach.default, aten._local_scalar_dense.default,
    aten.alias.default,
})
_INDEX_OPS = frozenset({aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
                        aten._index_put_impl_.default})
# Non-pointwise ops known to take a 0-dim CPU tensor on CUDA (no advisory for them).
_CPU_SCALAR_OK = frozenset({
    aten.where.self, aten.masked_fill.Tensor, aten.masked_fill_.Tensor, aten.fill_.Tensor, aten.fill.Tensor,
    aten.clamp.Tensor, aten.clamp_.Tensor, aten.clamp_min.Tensor, aten.clamp_max.Tensor, aten.lerp.Tensor,
    aten.lerp_.Tensor,
})
# CUDA has no integer GEMM behind these (CPU has): "addmm_cuda" / "bmm_cuda" ... not implemented for 'Long'.
_FLOAT_ONLY_MATMULS = frozenset({
    aten.mm.default, aten.bmm.default, aten.addmm.default, aten.addmm_.default, aten.baddbmm.default,
    aten.addbmm.default, aten.mv.default, aten.addmv.default, aten.dot.default, aten.vdot.default,
    aten.matmul.default,
})
# Added to a payload's address by SimTensor.data_ptr: stable and distinct per storage (cache keys keep working),
# but in a range no host mapping uses.
_DEVICE_ADDRESS_OFFSET = 0x7A00_0000_0000_0000


class DeviceMismatch(RuntimeError):
    """What CUDA would raise for operands (or a generator) on the wrong device."""


class SimTensor(torch.Tensor):
    """A tensor that reports ``cuda:0`` and keeps its values in a plain CPU tensor, :attr:`elem`.

    C++ sees a wrapper subclass on the ``meta`` device, so each property C++ would answer from that device (device,
    is_cuda, is_cpu, is_meta, data_ptr) is overridden to answer as a CUDA tensor does.
    """

    elem: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> SimTensor:
        if type(elem) is not torch.Tensor or elem.device.type != "cpu":
            raise TypeError(f"SimTensor wraps a plain CPU tensor, not {type(elem).__name__} ({elem.device})")
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=torch.device("meta"), requires_grad=elem.requires_grad)
        wrapper.elem = elem
        return wrapper

    @classmethod
    def __torch_dispatch__(cls, func: OpOverload, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _dispatch(func, args, kwargs or {})

    def __repr__(self) -> str:
        return f"SimTensor(cuda:0, {self.elem!r})"

    @property
    def device(self) -> torch.device:
        return CUDA

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def is_cpu(self) -> bool:
        return False

    @property
    def is_meta(self) -> bool:
        # C++ would say True, and nn.Module.load_state_dict then skips the parameter ("copying ... to a meta
        # parameter ... is a no-op"): every load into a simulated-cuda model would silently do nothing.
        return False

    @property
    def data(self) -> torch.Tensor:
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        # ``param.data = t`` swaps the C++ metadata only: keep the CPU payload in step.
        torch._C.TensorBase.data.__set__(self, new)
        self.elem = new.elem if isinstance(new, SimTensor) else new

    def data_ptr(self) -> int:
        # Not a host address, as on a GPU: a native (ctypes) kernel reached with a device tensor faults here too,
        # instead of silently computing on the CPU payload.
        return self.elem.data_ptr() + _DEVICE_ADDRESS_OFFSET

    def untyped_storage(self) -> torch.UntypedStorage:
        return self.elem.untyped_storage()

    def tolist(self) -> Any:
        return self.elem.tolist()  # works on CUDA (with a device-to-host sync)

    def numpy(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")

    def __getitem__(self, index: Any) -> torch.Tensor:
        return super().__getitem__(_list_indices_to_tensors(index))

    def __setitem__(self, index: Any, value: Any) -> None:
        super().__setitem__(_list_indices_to_tensors(index), value)

    def __deepcopy__(self, memo: dict[int, Any]) -> SimTensor:
        # Tensor.__deepcopy__ builds new_empty([]) and set_()s the copied storage into it; on a wrapper subclass
        # set_ reaches the CPU payload only, so the copy said shape [] (nn.Module deepcopy gave scalar weights).
        if id(self) in memo:
            return memo[id(self)]
        with torch.no_grad():
            new = SimTensor(self.elem.detach().clone(memory_format=torch.preserve_format))
        if self.requires_grad:
            new.requires_grad_(True)
        for name, value in self.__dict__.items():
            if name != "elem":
                setattr(new, name, copy.deepcopy(value, memo))
        if self.grad is not None:
            new.grad = copy.deepcopy(self.grad, memo)
        memo[id(self)] = new
        return new


def _list_indices_to_tensors(index: Any) -> Any:
    """Turn Python lists in an index (``t[[1, 3]]``, ``t[:, [3, 7]]``) into CPU long tensors.

    Why: torch builds the index tensor from a list in C++, with the Python dispatch keys excluded, on the indexed
    tensor's C++ device -- ``meta`` for a SimTensor -- so the index reaching the simulation has no values and the
    result is garbage. On CUDA the list lands on the GPU with its values; a CPU index tensor is what CUDA (and the
    simulation) accepts for plain advanced indexing, with the same result.
    """
    if isinstance(index, list):
        return torch.tensor(index)
    if isinstance(index, tuple):
        return tuple(torch.tensor(part) if isinstance(part, list) else part for part in index)
    return index


class SimCudaMode(TorchDispatchMode):
    """Routes every op of the thread through the simulation: factories with ``device="cuda"`` included.

    TorchDispatchMode is per thread; the pytest plugin enters it in every thread started while the tests run.
    """

    def __torch_dispatch__(self, func: OpOverload, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _dispatch(func, args, kwargs or {})


# ---------------------------------------------------------------------------------------------------- dispatch
def _is_sim_device(device: Any) -> bool:
    # meta counts: it is what C++ takes a SimTensor's device for (e.g. for the scalar tensor ``t[i] = 0.5`` builds
    # on the device of t). So a factory asked for the meta device inside the simulation gives a simulated-cuda
    # tensor too.
    return device is not None and torch.device(device).type in ("cuda", "meta")


def _dispatch(func: OpOverload, args: tuple, kwargs: dict) -> Any:
    """Check CUDA's rules for one op, then run it on the CPU payloads (see the module docstring)."""
    if kwargs.get("pin_memory"):  # no pinned-memory allocator on a CPU-only build; pinning is host-side only
        kwargs = {**kwargs, "pin_memory": False}
    tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    if not any(isinstance(t, SimTensor) for t in tensors) and not _is_sim_device(kwargs.get("device")):
        return func(*args, **kwargs)  # nothing of the simulated device involved
    ops_by_thread[threading.current_thread().name.split(" ")[0].split("_")[0]] += 1
    if torch.Tag.nondeterministic_seeded in func.tags:
        if (generator := _explicit_generator(func, args, kwargs)) is not None:
            raise DeviceMismatch(f"Expected a 'cuda' device type for generator but found "
                                 f"'{generator.device.type}' (op {func})")
        with _drawing_from_cuda_generator():
            return _run_on_cpu(func, args, kwargs, tensors)
    if func in _FLOAT_ONLY_MATMULS:
        _check_float_matmul(func, tensors)
    if func in _INDEX_OPS:
        _check_index(func, args, kwargs)
    elif (func not in _CPU_OPERANDS_OK and func not in _CPU_SCALAR_OK and torch.Tag.pointwise not in func.tags
          and any(_is_cpu_tensor(t) and t.dim() == 0 for t in tensors)):
        _advise(func, "0-dim CPU tensor into a non-pointwise op on cuda")
    return _run_on_cpu(func, args, kwargs, tensors)


def _is_cpu_tensor(tensor: torch.Tensor) -> bool:
    return not isinstance(tensor, SimTensor) and tensor.device.type == "cpu"


def _run_on_cpu(func: OpOverload, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> Any:
    """Raise on mixed devices, else run ``func`` on the unwrapped operands and wrap what lands on the device.

    No guard against re-entering the simulation is needed: a dispatch mode is popped off the thread's mode stack
    while its ``__torch_dispatch__`` runs, and the unwrapped operands are plain CPU tensors, so ``func`` goes
    straight to the CPU kernels.
    """
    on_device = any(isinstance(t, SimTensor) for t in tensors)
    if on_device and func not in _CPU_OPERANDS_OK:
        cpu = next((t for t in tensors if _is_cpu_tensor(t) and t.dim() > 0), None)
        if cpu is not None:
            raise DeviceMismatch(f"Expected all tensors to be on the same device, but found at least two devices, "
                                 f"cuda:0 and cpu! (op {func}, cpu operand shape {tuple(cpu.shape)})")
    if (device := kwargs.get("device")) is not None:
        if _is_sim_device(device):
            kwargs = {**kwargs, "device": torch.device("cpu")}
            on_device = True
        elif torch.device(device).type == "cpu":
            on_device = False
    if func is aten.copy_.default:  # the destination keeps its device
        on_device = isinstance(args[0], SimTensor)
    elif func is aten._local_scalar_dense.default:  # .item(): a Python number
        on_device = False
    args, kwargs = tree_map(_unwrap, (args, kwargs))
    out = func(*args, **kwargs)
    return tree_map(_wrap, out) if on_device else out


def _unwrap(x: Any) -> Any:
    return x.elem if isinstance(x, SimTensor) else x


def _wrap(x: Any) -> Any:
    return SimTensor(x) if type(x) is torch.Tensor and x.device.type == "cpu" else x


def _explicit_generator(func: OpOverload, args: tuple, kwargs: dict) -> torch.Generator | None:
    for position, argument in enumerate(func._schema.arguments):
        if argument.name == "generator":
            if argument.kwarg_only or len(args) <= position:
                return kwargs.get("generator")
            return args[position]
    return None


@contextlib.contextmanager
def _drawing_from_cuda_generator() -> Iterator[None]:
    """Let the CPU default generator carry :data:`cuda_generator`'s state while a device random op runs.

    Swapping states (rather than passing a generator) works for every random op whatever its signature, and the
    CPU generator's own sequence is left exactly as it was. Not thread-safe, like the rest of the RNG handling.
    """
    cpu = torch.default_generator
    saved = cpu.get_state()
    cpu.set_state(cuda_generator.get_state())
    try:
        yield
    finally:
        cuda_generator.set_state(cpu.get_state())
        cpu.set_state(saved)


def _check_float_matmul(func: OpOverload, tensors: list[torch.Tensor]) -> None:
    integer = next((t for t in tensors if isinstance(t, SimTensor)
                    and not (t.is_floating_point() or t.is_complex())), None)
    if integer is not None:
        name = func._schema.name.split("::")[1]
        raise NotImplementedError(f'"{name}_cuda" not implemented for '
                                  f"'{str(integer.dtype).removeprefix('torch.')}' (simcuda)")


def _check_index(func: OpOverload, args: tuple, kwargs: dict) -> None:
    indexed = args[0]
    indices = args[1] if len(args) > 1 else kwargs.get("indices")
    if not isinstance(indexed, SimTensor) and any(isinstance(t, SimTensor) and t.dim() > 0
                                                  for t in (indices or []) if t is not None):
        raise DeviceMismatch("indices should be either on cpu or on the same device as the indexed tensor (cpu) "
                             f"(op {func})")
    if func is not aten.index.Tensor and isinstance(indexed, SimTensor):
        values = args[2] if len(args) > 2 else kwargs.get("values")
        if isinstance(values, torch.Tensor) and not isinstance(values, SimTensor) and values.dim() > 0:
            raise DeviceMismatch("Expected all tensors to be on the same device, but found at least two devices, "
                                 f"cuda:0 and cpu! (op {func}, cpu values {tuple(values.shape)})")


# ---------------------------------------------------------------------------------------------------- advisories
_REPO_ROOT = Path(__file__).resolve().parents[2]
_TOOL_DIR = Path(__file__).resolve().parent
_advisory_context = "<none>"
_advised: set[tuple[str, str]] = set()


def set_advisory_context(label: str) -> None:
    """Label the advisories from now on (the plugin passes each test's node id); each (op, label) is logged once."""
    global _advisory_context
    _advisory_context = label


def _advise(func: OpOverload, what: str) -> None:
    key = (str(func), _advisory_context)
    if key in _advised:
        return
    _advised.add(key)
    log.warning("%s\t%s\t%s\t%s", _advisory_context, func, what, _project_caller())


def _project_caller() -> str:
    """The innermost line of the project's own code (not this tool, not an installed package) on the stack."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(os.path.realpath(frame.filename))
        if (path.is_relative_to(_REPO_ROOT) and not path.is_relative_to(_TOOL_DIR)
                and ".venv" not in path.parts and "site-packages" not in path.parts):
            return f"{path}:{frame.lineno}"
    return "?"


# ---------------------------------------------------------------------------------------------------- torch patches
# A factory with device="cuda" first asks torch.cuda to initialise (which a CPU-only build cannot); marked done, the
# call reaches the dispatch mode. No real CUDA is used.
torch.cuda._initialized = True


def _with_cuda_index(device: Any) -> Any:
    """``"cuda"`` -> ``cuda:0``: a CPU-only build has no CUDA guard to resolve a device without an index in C++.

    Only the spelling of the device changes.
    """
    if isinstance(device, str) and device == "cuda":
        return "cuda:0"
    if isinstance(device, torch.device) and device.type == "cuda" and device.index is None:
        return CUDA
    return device


_original_to = torch.Tensor.to


def _to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    args = tuple(_with_cuda_index(a) for a in args)
    if "device" in kwargs:
        kwargs["device"] = _with_cuda_index(kwargs["device"])
    return _original_to(self, *args, **kwargs)


def _cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False,
          memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    return _original_to(self, CUDA, non_blocking=non_blocking, memory_format=memory_format)


def _built_on_cpu_then_moved(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap torch.tensor / torch.as_tensor so that ``device="cuda"`` builds on the CPU, then moves the result.

    Why: they build the tensor in C++ with the Python dispatch keys excluded, so the simulation never sees it and
    the CPU-only build is asked for real CUDA memory. ``.to(cuda)`` afterwards goes through the simulation.
    """
    @functools.wraps(factory)
    def wrapper(data: Any, *args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if device is not None and torch.device(_with_cuda_index(device)).type == "cuda":
            return _original_to(factory(data, *args, **kwargs), CUDA)
        return factory(data, *args, device=device, **kwargs)
    return wrapper


class _InferenceModeAsNoGrad(contextlib.ContextDecorator):
    """Stands in for torch.inference_mode: no_grad for ``True``, nothing for ``False``.

    Why: a view of a wrapper-subclass tensor taken inside inference_mode fails in C++ ("Cannot set
    version_counter for inference tensor"). inference_mode's rules do not depend on the device (the CPU run of
    the same tests checks them), so no_grad is enough here.
    """

    def __init__(self, mode: bool = True) -> None:
        self.mode = mode
        self._entered: list[contextlib.AbstractContextManager[Any]] = []

    def __enter__(self) -> _InferenceModeAsNoGrad:
        context = torch.no_grad() if self.mode else contextlib.nullcontext()
        context.__enter__()
        self._entered.append(context)
        return self

    def __exit__(self, *exc_info: Any) -> bool | None:
        return self._entered.pop().__exit__(*exc_info)

    def clone(self) -> _InferenceModeAsNoGrad:
        return type(self)(self.mode)


def _install_torch_patches() -> None:
    torch.Tensor.to = _to
    torch.Tensor.cuda = _cuda
    # torch's device context managers (``with torch.device("meta")``, used by from_pretrained) recognise factories
    # by identity in a set built on first use; build it now, with the original torch.tensor / as_tensor in it.
    # Built after the patch, the originals that the wrappers call are not recognised, torch.tensor([]) ignores a
    # meta context, and from_pretrained then leaves non-persistent buffers such as Llama's rotary inv_freq
    # uninitialised.
    torch.utils._device._device_constructors()
    torch.tensor = _built_on_cpu_then_moved(torch.tensor)
    torch.as_tensor = _built_on_cpu_then_moved(torch.as_tensor)
    torch.inference_mode = _InferenceModeAsNoGrad
    torch.autograd.grad_mode.inference_mode = _InferenceModeAsNoGrad
    # torch.optim takes its foreach kernels (CUDA's default) only for exact Tensor/Parameter types; without this
    # a SimTensor would get the per-parameter loop and the path CUDA takes would go untested.
    # SIMCUDA_FOREACH=0 keeps the loop.
    foreach_types = torch_optimizer._foreach_supported_types
    if os.environ.get("SIMCUDA_FOREACH", "1") != "0" and SimTensor not in foreach_types:
        foreach_types.append(SimTensor)


_install_torch_patches()
