"""``LoraLayer``: the wrapper every adapted layer shares (LoRA paper §4.1).

    y = base(x) + Σ_live  w_i · s_i · B_i(A_i(dropout(x)))          ΔW_i = B_i · A_i,  s_i = alpha_i / r_i

The base layer is kept untouched as ``base_layer``; each adapter adds ``lora_A[name]`` (r × in) and
``lora_B[name]`` (out × r). What is live, merged or disabled is read from the model's shared ``AdapterState``.
Subclasses supply four small pieces: how x meets A, how the rank-r activations meet B, what ΔW looks like in
the base weight's layout, and the base forward with an explicit weight.

Merging keeps the pre-merge weight (``_pristine``) and always recomputes W = W0 + Σ ΔW from it, so unmerge is a
pointer swap that restores W0 bit for bit -- subtracting a recomputed delta drifts in bf16/fp16.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import threading
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from ..errors import MergeError, NonFiniteError, TargetError
from ..registry import AdapterState

def _global_hooks() -> bool:
    """Any module hook registered globally (``register_module_forward_hook`` & co.): then every call goes
    through ``nn.Module.__call__``."""
    g = _nn_module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


def _put(params: nn.ParameterDict, name: str, value: nn.Parameter) -> None:
    """``params[name] = value`` without ``nn.Module.__setattr__``'s checks when they cannot fire (a name that
    is no attribute of the dict, no global registration hook): loading 420 factors spends more time in those
    checks than in reading the file. Anything unusual takes the checked path."""
    keys = params.__dict__.get("_keys")  # the dict's key order (torch >= 1.12); anything else: checked path
    if (not isinstance(keys, dict) or name in params._parameters or name in params.__dict__
            or hasattr(type(params), name) or name in params._buffers or name in params._modules
            or getattr(_nn_module, "_global_parameter_registration_hooks", None)):
        params[name] = value
        return
    keys[name] = None
    params._parameters[name] = value


def _drop(params: nn.ParameterDict, name: str) -> None:
    """``del params[name]``, without ``nn.Module.__delattr__`` for an entry ``_put`` added directly."""
    keys = params.__dict__.get("_keys")
    if isinstance(keys, dict) and name in keys and name in params._parameters:
        del keys[name]
        del params._parameters[name]
    else:
        del params[name]


_SERIALS = itertools.count()


def version_of(t: torch.Tensor) -> int | object:
    """``t._version`` for keys that must change when ``t`` is written in place; inference-mode tensors keep no
    version counter (and may be written in inference mode), so they get a fresh object that equals nothing."""
    try:
        return t._version
    except RuntimeError:
        return object()


@functools.lru_cache(maxsize=64)
def _ones(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.ones(n, dtype=dtype, device=device)  # (n,) read-only by contract: shared by every caller


def _all_finite(t: torch.Tensor) -> bool:
    """True iff every entry of ``t`` is finite. A NaN/inf entry makes the sum NaN/inf, so one reduction settles
    the usual all-finite case; a non-finite sum (or finite entries whose sum overflowed) goes to the exact
    per-entry test."""
    return math.isfinite(_finiteness_sum(t).item()) or bool(torch.isfinite(t).all())


def _finiteness_sum(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim sum of ``t`` on its device, NaN/inf when an entry is. fp32/fp64 sum directly (run right after the
    merge wrote ``t``: +10 ms over the 135M model's 210 weights, against +25 ms for a row-sum GEMV); half
    precision, whose sum kernel is ~6x slower, sums rows with one GEMV against ones (t·1) and those sums in fp32."""
    if t.dtype in (torch.float32, torch.float64):
        return t.sum()
    if t.is_floating_point() and t.dim() >= 2 and t.is_contiguous():
        rows = t.view(t.shape[0], -1)  # (out, in·…)
        return torch.mv(rows, _ones(rows.shape[1], t.dtype, t.device)).sum(dtype=torch.float32)  # (out,) -> ()
    return t.sum(dtype=torch.float32)


class FinitenessChecks:
    """The finiteness verdicts of one merge's layers, settled together: ``.item()`` per layer made a GPU wait for
    its queue 210 times per merge of the 135M model; here the sums stay on the device and one copy reads them all.
    ``settle`` raises the first failing layer's NonFiniteError (in the order the layers were added), after which
    the caller rolls back as for an error raised in the layer itself."""

    def __init__(self) -> None:
        self._items: list[tuple[LoraLayer, list[tuple[str, float]], torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, layer: LoraLayer, mine: list[tuple[str, float]], w0: torch.Tensor, result: torch.Tensor) -> None:
        self._items.append((layer, mine, w0, result, _finiteness_sum(result)))

    def settle(self) -> None:
        items, self._items = self._items, []  # (nothing held once settled, raised or not)
        if not items:
            return
        # (fp32: MPS has no fp64; an fp64 sum beyond fp32 range only sends its layer to the exact test below)
        sums = torch.stack([s.to(device=items[0][4].device, dtype=torch.float32) for *_, s in items])
        ok = torch.isfinite(sums).tolist()  # the one device-to-host read
        # (finite entries whose sum overflowed pass the exact test)
        bad = next((i for i, good in enumerate(ok) if not good and not bool(torch.isfinite(items[i][3]).all())), None)
        error = None if bad is None else items[bad][0].nonfinite_error(items[bad][1], items[bad][2])
        items.clear()  # (a raised error's traceback keeps this frame: it must not keep the results)
        if error is not None:
            raise error

    def clear(self) -> None:
        self._items = []


def _use_count(t: torch.Tensor) -> int | None:
    """How many references hold ``t``'s memory (tensors sharing it, plus the storage object read to ask), or
    None where this torch cannot tell."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    try:
        storage = t.untyped_storage()  # held while counting: ``_cdata`` is a raw pointer into it
        return count(storage._cdata)
    except (AttributeError, RuntimeError, TypeError):
        return None


@functools.cache
def _sole_use_count() -> int | None:
    """What ``_use_count`` reports for a tensor whose memory nothing else shares, measured once."""
    return _use_count(torch.empty(1))


def _sole_user(t: torch.Tensor) -> bool:
    """True when ``t`` is the only tensor using its memory (no view, ``.detach()``, state_dict entry or saved
    autograd tensor shares it), so writing into it changes nothing anyone else can see; False when unknown."""
    count, sole = _use_count(t), _sole_use_count()
    return count is not None and sole is not None and count <= sole


def factor_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a layer's factors: its weight's, except half-precision bases get fp32 factors (the update
    B·A is tiny next to W0 and would underflow)."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def _pin_full_precision() -> Callable[[], None]:
    """Make fp32 matmuls full precision; returns what puts the user's setting back. Speaks whichever API the
    process uses: the legacy ``set_float32_matmul_precision`` or (torch >= 2.9) the per-backend
    ``torch.backends.{cuda,mkldnn}.matmul.fp32_precision``, once set, after which the legacy getter raises
    (transformers' ``enable_tf32``, e.g. ``TrainingArguments(tf32=True)``, sets them)."""
    try:
        before = torch.get_float32_matmul_precision()
    except RuntimeError:  # the per-backend API is in use
        saved = [(b, b.fp32_precision) for b in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
                 if hasattr(b, "fp32_precision")]
        for backend, _ in saved:
            backend.fp32_precision = "ieee"

        def restore() -> None:
            for backend, value in saved:
                backend.fp32_precision = value

        return restore
    if before != "highest":
        torch.set_float32_matmul_precision("highest")
    return functools.partial(torch.set_float32_matmul_precision, before)


class _Pin:
    """How many merges are running (on any thread) and what restores the setting they found."""

    lock = threading.Lock()
    users = 0
    restore: Callable[[], None] | None = None


@contextlib.contextmanager
def full_precision_products():
    """fp32 products in fp32 for a merge, whatever precision the user allows the forward: with
    ``torch.set_float32_matmul_precision("high")`` (TF32 on CUDA; "medium": bf16 on CPUs that have it) ΔW would
    be computed with a 10- or 8-bit mantissa, and the merged weight would no longer be W0 + ΔW rounded once.
    The setting is process-wide: merges on several threads share one pin, the last to finish restores it
    (forwards on other threads meanwhile run at full precision too)."""
    with _Pin.lock:
        if _Pin.users == 0:
            _Pin.restore = _pin_full_precision()
        _Pin.users += 1
    try:
        yield
    finally:
        with _Pin.lock:
            _Pin.users -= 1
            if _Pin.users == 0:
                _Pin.restore()
                _Pin.restore = None


# Tokens per call from which a Linear-style layer writes its deltas (and bias) first and adds its base product into
# them (``_deltas_first``, ``base_into``; under ``per_row`` via ``RowPlan.start``): adding them after the base GEMM
# re-read and re-wrote a prefill's whole output. Measured on prefill-sized batches only (BERT-base, 8×128 tokens,
# 4 adapters mixed, paired in one process: 1.076 -> 1.055× base; an earlier prototype 1.054 / 1.067 / 1.080 ->
# 1.040 / 1.030 / 1.014).
START_MIN_TOKENS = 256
_PLAIN = (torch.Tensor, nn.Parameter)
_F32 = torch.float32


def _plain_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``base_into``'s one ``addmm_`` computes what ``base_forward`` would, where it was measured: fp32 on
    the CPU (half precision rounds the two orders differently and was not timed), plain tensors (a weight subclass,
    e.g. a quantized one, has its own ``F.linear``), and no autocast (it would run the deltas in another dtype than
    the in-place GEMM)."""
    return (x.is_cpu and type(x) is torch.Tensor and type(weight) in _PLAIN and x.dtype is _F32
            and weight.dtype is _F32
            and (bias is None or (type(bias) in _PLAIN and bias.dtype == x.dtype)) and not _autocast_on())


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch before 2.4 (one argument-less query per device type)
        return torch.is_autocast_cpu_enabled()


def _is_zero_in(alpha: float, dtype: torch.dtype) -> bool:
    """Whether ``alpha`` (a Python float) becomes 0 as the scalar of a matmul in ``dtype`` (fp32: |alpha| at or
    below 2**-150 rounds to zero, ties to even)."""
    return abs(alpha) <= 2.0 ** -150 if dtype == torch.float32 else alpha == 0.0


class LoraLayer(nn.Module, metaclass=ABCMeta):
    """Base class; each registered layer type implements the abstract hooks below."""

    # Embeddings follow PEFT (A zeros, B normal) because a Kaiming A over 50k rows is ~1e-3 and starves B.
    zero_init_a = False
    # Set per instance in __init__ (class defaults for layers pickled before they existed): the prefill order.
    _into_ok = False
    _in_f = 0
    # A subclass's decode plan (``LoraLinear``): derived from the factors, checked on every use, and dropped
    # wherever the layer's adapters change (add, delete) or move (``_apply``), so it never keeps a deleted
    # adapter's memory alive.
    _decode = None
    _plain_base: type | None = None  # set in __init__: the base's type where base_forward may stand in for it

    def __init__(self, base_layer: nn.Module, state: AdapterState, tied_with: Sequence[str] = ()) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        # A number no other factors ever get, per adapter: caches of derived tensors (per_row packs) key on it,
        # since a deleted adapter's successor under the same name may reuse its memory and version counters.
        self.serial: dict[str, int] = {}
        # Plain attributes (not submodules / buffers): shared state and merge bookkeeping.
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_pristine", None)
        # CPU only: the merged weight's memory after an unmerge, reused by the next merge of this layer (fresh
        # pages cost more than the merge's arithmetic there; CUDA's caching allocator already reuses memory).
        object.__setattr__(self, "_spare", None)
        # ``merge_stamp`` of what the installed merged weight was computed from (None when not merged): a merge
        # may rewrite that weight in place only if it can recompute it exactly should the merge be refused.
        object.__setattr__(self, "_installed", None)
        self.tied_with = tuple(tied_with)  # other parameter names sharing base_layer.weight
        # A base layer of exactly a type whose forward ``base_forward`` reproduces may be run directly when it
        # has no hooks: nn.Module.__call__ costs more than a decode step's GEMV on 200 modules.
        # (its type, compared per call: parametrizing the base's weight swaps its class for a subclass whose
        # weight is computed, and whose ``_parameters`` no longer hold it)
        object.__setattr__(self, "_plain_base", type(base_layer) if self.is_plain_base(base_layer) else None)
        into_ok = self._base_into_matches()
        object.__setattr__(self, "_into_ok", into_ok)
        # in_features for the prefill test in forward (x.shape[-1] costs ~0.1 µs, ~200 times per decoded token)
        object.__setattr__(self, "_in_f", self.factor_shapes(1)[0][-1] if into_ok else 0)

    # The factor dicts, read per call: forward goes through these rather than ``self.lora_A`` because
    # nn.Module.__getattr__ on a submodule costs more than the LoRA matmuls of a decode step. Never cached as
    # attributes: torch.export swaps a module's ``_parameters`` dict for one of fake tensors and installs a new
    # dict afterwards, so a kept reference would hold the fakes from then on.
    @property
    def _a_params(self) -> dict[str, nn.Parameter]:
        return self._modules["lora_A"]._parameters

    @property
    def _b_params(self) -> dict[str, nn.Parameter]:
        return self._modules["lora_B"]._parameters

    @classmethod
    def is_plain_base(cls, base_layer: nn.Module) -> bool:
        """True when ``base_layer``'s forward is exactly ``base_forward(x, weight)`` (never by default; a
        subclass of the base type may override forward, so subclasses name exact types)."""
        return False

    # ---- hooks for subclasses ----------------------------------------------------------------------------
    @abstractmethod
    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(shape of A, shape of B) for rank r."""

    @abstractmethod
    def max_rank(self) -> int:
        """The largest rank that can still be low: min(in, out) in the matmul view of the weight."""

    @abstractmethod
    def project_in(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x -> rank-space activations h, channels last (or dim 1 for convs)."""

    @abstractmethod
    def project_out(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Rank-space activations -> the layer's output space (unscaled)."""

    @abstractmethod
    def delta_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """ΔW = B·A laid out like base_layer.weight (unscaled)."""

    @abstractmethod
    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's forward with an explicit weight (used for the pristine W0 while merged)."""

    def merge_refusal(self) -> str | None:
        """Why this layer's adapters cannot be merged exactly (None: they can)."""
        return None

    rank_dim = -1  # where the rank axis lives in project_in's output (channels-last by default)

    def base_weight(self) -> torch.Tensor:
        """``base_layer.weight`` read from the parameter dict when it is there: loading an adapter asks for it
        ~3 times per module and two ``nn.Module.__getattr__`` calls cost more than the rest of the lookup."""
        weight = self._modules["base_layer"]._parameters.get("weight")
        return weight if weight is not None else self.base_layer.weight

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (W0, or W while merged), as PEFT's layers expose it: model code reads
        ``module.weight`` of a layer it owns (T5's feed-forward checks ``wo.weight.dtype``; ``tie_weights`` and
        ``get_input_embeddings().weight``), and a wrapper must not turn that into an AttributeError."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (None where it has none), for the same reason as ``weight``."""
        return getattr(self.base_layer, "bias", None)

    # ---- adapters ----------------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: str,
                    factors: tuple[torch.Tensor, torch.Tensor] | None = None, trainable: bool = True) -> None:
        """Add factors of rank r, initialised per ``init`` -- or taken from ``factors`` (A, B), used as the
        parameters' storage without a copy when dtype and device already match (loading from disk)."""
        weight = self.base_weight()
        dtype = factor_dtype(weight.dtype)
        a_shape, b_shape = self.factor_shapes(r)
        if factors is not None:
            # (as-is when already in place: two no-op .to + .detach calls per factor cost ~2 ms per 200-module load)
            a, b = (t if t.dtype == dtype and t.device == weight.device and not t.requires_grad
                    else t.to(device=weight.device, dtype=dtype).detach() for t in factors)
            if tuple(a.shape) != a_shape or tuple(b.shape) != b_shape:
                raise ValueError(f"factors of shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit rank {r}: "
                                 f"expected {a_shape}, {b_shape}")
        else:
            a = torch.empty(a_shape, device=weight.device, dtype=dtype)
            b = torch.empty(b_shape, device=weight.device, dtype=dtype)
        if factors is None and weight.device.type != "meta":
            if self.zero_init_a:
                nn.init.zeros_(a)
                nn.init.normal_(b)
            elif init == "gaussian":
                nn.init.normal_(a, std=1.0 / r)
                nn.init.zeros_(b)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
        _put(self._modules["lora_A"], name, nn.Parameter(a, requires_grad=trainable))
        try:
            _put(self._modules["lora_B"], name, nn.Parameter(b, requires_grad=trainable))
        except BaseException:  # all or nothing: the caller's rollback deletes only adapters that were added
            _drop(self._modules["lora_A"], name)
            raise
        self.scaling[name] = scaling
        self.dropout_p[name] = dropout
        self.serial[name] = next(_SERIALS)
        self.forget_plan()  # (its entries name this layer's adapters)

    def forget_plan(self) -> None:
        """Drop what this layer derived from its adapters for the decode step (a subclass's plan): when an
        adapter goes, every layer forgets it, also those that only noted that it has no factors there."""
        object.__setattr__(self, "_decode", None)

    def delete_adapter(self, name: str) -> None:
        self.forget_plan()
        _drop(self._modules["lora_A"], name)
        _drop(self._modules["lora_B"], name)
        del self.scaling[name]
        del self.dropout_p[name]
        del self.serial[name]

    def require_plain_factors(self, name: str) -> bool:
        """False for an adapter this layer does not hold (adapters may target other layers); raises where it
        holds it but a factor is not in ``_parameters`` (parametrized, or replaced by a plain attribute)."""
        if name in self.scaling:
            for key in ("lora_A", "lora_B"):
                if name not in self._modules[key]._parameters:
                    found = self._modules[key]._modules.get("parametrizations")
                    how = ("parametrized (torch.nn.utils.parametrize)" if found is not None and name in found._modules
                           else "not a Parameter of it")
                    raise TargetError(f"{key}[{name!r}] of this {type(self.base_layer).__name__} layer is {how}: "
                                      f"deltaw reads LoRA factors as plain Parameters and would leave {name!r} out")
        return False

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_parameters(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lora_A[name], self.lora_B[name]

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0]

    # ---- forward -----------------------------------------------------------------------------------------
    def runs_directly(self, base: nn.Module) -> bool:
        """True when ``base(x)`` may be replaced by ``base_forward(x, weight)``: a plain base type and nothing
        that ``nn.Module.__call__`` would run besides its forward (hooks, an instance-level forward such as
        accelerate's offload hook)."""
        return type(base) is self._plain_base and not (
            base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks
            or "forward" in base.__dict__ or _global_hooks())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state: AdapterState = self._state
        base = self._modules["base_layer"]
        if state.disabled:
            return base(x) if self._pristine is None else self.pristine_forward(x)
        if self.runs_directly(base):
            weight = base._parameters["weight"]
            if self._into_ok and x.numel() >= START_MIN_TOKENS * self._in_f:
                # A prefill: the deltas (and bias) first, the base product added into them.
                d = self._deltas_first(state, x, weight, base._parameters.get("bias"))
                if d is not None:
                    return self.base_into(d, x, weight)
            y = self.base_forward(x, weight)  # what base(x) runs, minus the call machinery
        else:
            y = base(x)
        return self.add_live(state, x, y)

    def add_live(self, state: AdapterState, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base output for x) plus the live adapters' deltas, or the rows' ones under ``per_row``."""
        if state.rows is not None:
            return state.rows.apply(self, x, y)
        live = state.live
        if not live:
            return y
        params, b_params = self._a_params, self._b_params
        # Without autograd (inference, generate) nothing needs the unscaled terms: add into y with fused ops.
        # This path runs ~200 times per decoded token, so it touches only plain attributes.
        fused = not torch.is_grad_enabled()
        for name, weight in live:
            if name in params and name in b_params:
                scale = weight * self.scaling[name]
                if fused and not (self.training and self.dropout_p[name] > 0.0):
                    if scale != 0.0:  # (as addmm_ with alpha=0: a weight-0 term adds nothing, NaN factors included)
                        y = self.add_lora_(y, x, name, scale)
                else:
                    y = y + self.lora_out(name, x, y.dtype) * scale
            else:
                self.require_plain_factors(name)  # (not here at all: an adapter of other layers)
        return y

    def _deltas_first(self, state: AdapterState, x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor | None:
        """bias + every live delta (or the rows' deltas under ``per_row``) in a new tensor shaped like the output,
        for ``base_into``; None where the usual order runs (autograd on, dropout in training, another dtype, no
        live adapter here, ...). Why: see ``START_MIN_TOKENS``."""
        if not _plain_operands(x, weight, bias):
            return None
        if state.rows is not None:
            return state.rows.start(self, x, bias)
        if torch.is_grad_enabled():
            return None
        a_params, b_params = self._a_params, self._b_params
        terms = []
        for name, w in state.live:
            if name in a_params and name in b_params:
                scale = w * self.scaling[name]
                if self.training and self.dropout_p[name] > 0.0 or a_params[name].dtype != x.dtype:
                    return None
                if scale != 0.0:  # (as in forward: a weight-0 term adds nothing, NaN factors included)
                    terms.append((a_params[name], b_params[name], scale))
            else:
                self.require_plain_factors(name)
        return self.deltas_with_bias(x, bias, terms) if terms else None

    # Optional hooks, for layers whose ``base_forward`` is one GEMM plus bias (Linear, Conv1D):
    #     base_into(d, x, weight) -> d   adds the product of x with ``weight`` into d (the output's shape, the
    #                                     bias already in it) in place: the GEMM's C operand;
    #     deltas_with_bias(x, bias, terms) -> d   bias + Σ scale · (x Aᵀ) Bᵀ over terms (A, B, scale), a new tensor.
    @classmethod
    def _base_into_matches(cls) -> bool:
        """True when the hooks above sit in the classes that define what they stand in for: ``base_into`` with
        ``base_forward``, ``deltas_with_bias`` with ``project_in`` / ``project_out`` / ``add_lora_`` (the inference
        path it replaces).
        A subclass that overrides only one of those must not get an inherited hook that computes something else."""
        def owner(name: str) -> type | None:
            return next((k for k in cls.__mro__ if name in k.__dict__), None)
        into, deltas = owner("base_into"), owner("deltas_with_bias")
        return (into is not None and into is owner("base_forward") and deltas is not None
                and all(deltas is owner(name) for name in ("project_in", "project_out", "add_lora_")))

    def pristine_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output with W0 while merged weights are installed (``disabled()``).

        Runs ``base_layer(x)`` itself unless ``runs_directly``: a subclass's own forward and the layer's hooks
        must see W0 as they do unmerged. W0 stands in as a frozen Parameter of its own for the call, so the
        installed Parameter is never touched and an autograd graph built here keeps W0, not the merged weight
        that comes back afterwards."""
        base = self._modules["base_layer"]
        if self.runs_directly(base):
            return self.base_forward(x, self._pristine)
        params = base._parameters
        if "weight" not in params:
            raise MergeError(f"the base {type(base).__name__}'s weight is no longer a Parameter of it (parametrized "
                             "after the merge?): W0 cannot stand in for it; remove the parametrization first")
        installed = params["weight"]
        params["weight"] = nn.Parameter(self._pristine, requires_grad=False)
        try:
            return base(x)
        finally:
            params["weight"] = installed

    def add_lora_(self, y: torch.Tensor, x: torch.Tensor, name: str, scale: float) -> torch.Tensor:
        """y + scale·B(A(x)) with autograd off and no dropout. Channels-last layers override this to add in
        place with one ``addmm_`` (decode is bound by per-op cost); the default is the plain sum."""
        return y + self.lora_out(name, x, y.dtype) * scale

    def lora_out(self, name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """B(A(dropout(x))), unscaled, in ``dtype``."""
        a, b = self.lora_A[name], self.lora_B[name]
        p = self.dropout_p[name]
        if x.is_floating_point():  # embedding ids get neither dropout nor a cast
            if p > 0.0 and self.training:
                x = F.dropout(x, p)
            x = x.to(a.dtype)
        return self.project_out(self.project_in(x, a), b).to(dtype)

    # ---- merge -------------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._pristine is not None

    def merged_weight(self, merged: Sequence[tuple[str, float]], out: torch.Tensor | None = None,
                      checks: FinitenessChecks | None = None) -> torch.Tensor | None:
        """W0 + Σ w·s·ΔW for the adapters in ``merged`` this layer carries; None when it carries none.

        ``out`` (W0's shape and dtype) receives the result instead of a new tensor: re-merging into the weight
        already installed costs no allocation. Raises NonFiniteError if the result is not finite -- or, given
        ``checks``, leaves that verdict to ``checks.settle()`` where it is not already known (the fused CPU kernel
        knows it); without ``out`` nothing changed, with ``out`` it holds the rejected values and the caller
        restores it."""
        a_params, b_params = self._a_params, self._b_params
        mine = [(n, w) for n, w in merged if n in a_params and n in b_params or self.require_plain_factors(n)]
        if not mine:
            return None
        w0 = self._pristine if self._pristine is not None else self.base_weight().data
        if w0.device.type == "meta":
            raise MergeError("cannot merge into weights on the meta device: load the base weights first")
        why = self.merge_refusal()
        if why is None and "weight" not in self._modules["base_layer"]._parameters:
            why = "cannot merge into a base weight that is not a plain Parameter (e.g. torch.nn.utils.parametrize)"
        if why is not None:
            raise MergeError(why)
        if self.tied_with:
            raise MergeError(
                f"the weight of this layer is tied to {', '.join(self.tied_with)}; merging would change those "
                "too. Untie the weights first (e.g. clone the output head's weight)"
            )
        with torch.no_grad(), full_precision_products():
            # Merge is bound by bytes moved: one pass over W0 for the whole stack where a fused kernel exists,
            # else one addmm per adapter. Layout of W0, at least fp32 so small updates survive bf16/fp16 bases
            # (fp64 stays fp64).
            work = torch.promote_types(w0.dtype, torch.float32)
            new = w0 if work == w0.dtype else w0.to(work)
            direct = out if new is w0 else None  # fp32/fp64 W0: the first addmm writes straight into out
            terms: list[tuple[torch.Tensor, torch.Tensor, float]] = []
            for name, weight in mine:
                a, b = self._a_params[name], self._b_params[name]
                if a.dtype != work:  # (no-op .to calls cost ~3 µs each, 400 per merge)
                    a, b = a.to(work), b.to(work)
                alpha = weight * self.scaling[name]
                if _is_zero_in(alpha, work) and not (_all_finite(a) and _all_finite(b)):
                    # BLAS skips the product when alpha is 0 (also an fp64 weight that is 0 in fp32): a NaN
                    # adapter would pass on the torch path only.
                    raise NonFiniteError(f"refusing to merge: adapter {name!r} holds NaN/inf (weight 0)")
                terms.append((a, b, alpha))
            # One fused pass W0 -> result where the layer has a kernel for the whole stack; else one addmm per
            # term, the first writing straight into ``out``. (Never both: a kernel call right after torch's
            # parallel ops competes with their still-spinning worker threads -- 2x slower, measured.)
            fused = self.fused_delta(w0, terms, out=direct) if new is w0 else None
            finite = None  # known when the fused kernel computed the result
            if fused is not None:
                new, finite = fused
            else:
                for a, b, alpha in terms:
                    new = self.add_delta(new, a, b, alpha, inplace=new is not w0, out=direct)
            if new.dtype != w0.dtype:
                new = new.to(w0.dtype)
        # Scanned every time (or by the fused kernel as it wrote): nothing about W0 can be remembered safely
        # between merges (a write through ``weight.data`` does not even bump the parameter's version counter).
        if finite is None and checks is not None:
            result = new if out is None or new is out else out.copy_(new)
            checks.add(self, mine, w0, result)
            return result
        if not (finite if finite is not None else _all_finite(new)):
            raise self.nonfinite_error(mine, w0)
        return new if out is None or new is out else out.copy_(new)

    def nonfinite_error(self, mine: Sequence[tuple[str, float]], w0: torch.Tensor) -> NonFiniteError:
        """The error for a merge of ``mine`` whose result is not finite: which adapters hold NaN/inf, if any."""
        bad = [n for n, _ in mine
               if not (torch.isfinite(self._a_params[n]).all() and torch.isfinite(self._b_params[n]).all())]
        why = f"adapter(s) {bad} hold NaN/inf" if bad else "the merged weight overflows its dtype"
        return NonFiniteError(f"refusing to merge: {why} (weight {tuple(w0.shape)}, {w0.dtype})")

    def merge_stamp(self, merged: Sequence[tuple[str, float]]) -> tuple:
        """What ``merged_weight(merged)`` depends on besides W0: which factors (serial), their memory and
        in-place versions, weights and scalings. Equal stamps mean an equal result (writes through ``.data``
        bump no version counter and are not seen)."""
        a_params, b_params = self._a_params, self._b_params
        return tuple((n, w, self.serial[n], a_params[n].data_ptr(), version_of(a_params[n]), b_params[n].data_ptr(),
                      version_of(b_params[n]), self.scaling[n]) for n, w in merged if n in a_params)

    def rewritable(self, merged: Sequence[tuple[str, float]]) -> bool:
        """True when the installed merged weight is exactly ``merged_weight(merged)`` of the factors as they are
        now (nothing written into a merged adapter since), so it can be recomputed after an in-place rewrite."""
        return self._pristine is not None and self._installed is not None and \
            self._installed == self.merge_stamp(merged)

    def fused_delta(self, w0: torch.Tensor, terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, bool] | None:
        """(w0 + Σ alpha·ΔW(a, b) over ``terms`` (a, b, alpha), whether it is all finite), computed in one fused
        pass into ``out`` (or a new tensor); None when this layer type, dtype, device or total rank has no fused
        kernel (``out`` untouched). Matmul-shaped layers override it."""
        return None

    def add_delta(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, inplace: bool,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """w + alpha·ΔW(a, b): in place when ``inplace``, else into ``out`` or a new tensor. Matmul-shaped
        layers override this with one addmm."""
        delta = self.delta_weight(a, b)
        return w.add_(delta, alpha=alpha) if inplace else torch.add(w, delta, alpha=alpha, out=out)

    def spare(self) -> torch.Tensor | None:
        """Memory a merge may write its result into (``merged_weight(out=...)``): the weight the last unmerge
        took out, when it still fits W0 and nothing else uses its memory (one that does not is dropped here);
        None otherwise. A ``state_dict()`` snapshot or ``.detach()`` taken while merged shares that memory: a
        merge written into it would silently turn the snapshot into another adapter's merge."""
        spare, w0 = self._spare, self.base_weight()
        if spare is None or self._pristine is not None:
            return None
        if spare.shape != w0.shape or spare.dtype != w0.dtype or spare.device != w0.device or not _sole_user(spare):
            object.__setattr__(self, "_spare", None)
            return None
        return spare

    def set_merged(self, new_weight: torch.Tensor | None, keep_memory: bool = False) -> None:
        """Install a weight computed by ``merged_weight`` (None: restore the pristine W0 exactly; with
        ``keep_memory`` the merged weight's memory is kept as ``spare()`` for the next merge, on CPU)."""
        param = self.base_layer.weight
        if new_weight is None:
            object.__setattr__(self, "_installed", None)
            if self._pristine is not None:
                taken = param.data
                param.data = self._pristine
                object.__setattr__(self, "_pristine", None)
                object.__setattr__(self, "_spare", taken if keep_memory and taken.device.type == "cpu" else None)
            return
        if self._pristine is None:
            object.__setattr__(self, "_pristine", param.data)
        object.__setattr__(self, "_spare", None)
        param.data = new_weight

    def mark_installed(self, merged: Sequence[tuple[str, float]]) -> None:
        """Remember what the installed weight was computed from (after a merge succeeded everywhere)."""
        object.__setattr__(self, "_installed", self.merge_stamp(merged) if self._pristine is not None else None)

    def drop_spare(self) -> None:
        """Drop the kept merge memory (see ``set_merged``)."""
        object.__setattr__(self, "_spare", None)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if not isinstance(self.__dict__.get("_plain_base"), type):  # (pickled when it was a bool, or before it)
            base = self._modules["base_layer"]
            object.__setattr__(self, "_plain_base", type(base) if self.is_plain_base(base) else None)

    def __getstate__(self) -> dict:
        """Pickling / deepcopy leave out the kept merge memory (a cache, rebuilt by the next unmerge)."""
        state = self.__dict__.copy()
        state["_spare"] = None
        state.pop("_decode", None)
        return state

    def _apply(self, fn, recurse=True):  # keep the pristine copy on the same device/dtype as the module
        result = super()._apply(fn, recurse)
        object.__setattr__(self, "_spare", None)
        self.forget_plan()
        if self._pristine is not None:
            object.__setattr__(self, "_pristine", fn(self._pristine))
        return result

    def extra_repr(self) -> str:
        ranks = {n: self.rank(n) for n in self.lora_A.keys()}
        return f"adapters={ranks}, merged={self.merged}"


class ModulesToSave(nn.Module):
    """A module trained in full per adapter (e.g. a new classification head), as PEFT's ``modules_to_save``.

    The original stays as ``original_module``; each adapter gets its own copy. Which module runs (``selected``):
    the copy of the first active adapter that has one, else that of the first merged adapter that has one, else
    the original; disabled uses the original. ``merge_and_unload`` keeps the merged adapters' choice (the live,
    unmerged ones are dropped with their LoRA update).
    """

    def __init__(self, original: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        object.__setattr__(self, "_state", state)

    def add_adapter(self, name: str) -> None:
        module = copy.deepcopy(self.original_module)
        for p in module.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = module

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]

    def selected(self) -> nn.Module:
        """The copy of the first active adapter that has one, else of the first merged adapter that has one, else
        the original. Merged adapters count even when inactive: their LoRA update stays in the base weights, and
        it was trained together with this copy (a merged adapter without its head is half an adapter)."""
        state: AdapterState = self._state
        copies = self.modules_to_save
        for name, _ in itertools.chain(state.active, state.merged):
            if name in copies:
                return copies[name]
        return self.original_module

    def current(self) -> nn.Module:
        """The module this forward runs: ``selected()``, the original when disabled, the rows' own choice
        under a per_row batch."""
        state: AdapterState = self._state
        if state.disabled:
            return self.original_module
        if state.rows is not None:
            head = state.rows.single_head(self)
            return self.modules_to_save[head] if head is not None else self.original_module
        return self.selected()

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)
