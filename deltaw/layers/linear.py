"""LoRA for ``nn.Linear`` and transformers' GPT-2 style ``Conv1D`` (weight stored (in, out): fan-in/fan-out)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import AdapterState
from . import base as layers_base
from . import native
from .base import LoraLayer, _global_hooks

_F32 = torch.float32
_TENSOR = torch.Tensor
_PARAMETER = nn.Parameter
_SPLIT_TOKENS = native.SPLIT_TOKENS
_is_tracing = native._is_tracing
_fwad = native._fwad


class _DecodePlan:
    """What a decode step of one layer needs, found once and checked on every use: see ``LoraLinear.forward``.

    ``terms`` holds an entry per adapter name seen live on this layer, filled as names go live and kept across
    activations, so that switching to a resident adapter does no per-layer work on the next step (a plan per
    active set cost ~1.6 ms on the first step after every switch, 210 layers): (A's and B's data pointers, r)
    for factors the kernel takes; ``_SKIP`` for an adapter of other layers; a ``_Refused`` stamp for factors it
    does not take. Entries hold no tensors (numbers only): a factor replaced while its adapter is not live is
    never kept alive by the plan, and each call reads the current Parameters from the layer's dicts and checks
    them against the entry. ``ok``: False where the plan does not apply at all (a subclass with its own update,
    no kernel here); ``gemv`` is fetched with the first accepted factors (a CUDA model never compiles the CPU
    library)."""

    __slots__ = ("terms", "max_x", "in_f", "out_f", "gemv", "cls", "ok")

    def __init__(self, in_f: int, out_f: int, cls: type, ok: bool) -> None:
        self.terms: dict[str, object] = {}
        self.max_x = native.MAX_TOKENS * in_f  # x.numel() up to which a call is a decode step
        self.in_f, self.out_f = in_f, out_f
        self.gemv: Callable[..., int] | None = None
        self.cls = cls  # the class it was made for (a ``__class__`` swap plans again)
        self.ok = ok


_SKIP = object()  # a live adapter that has no factors on this layer (an adapter of other layers)


class _Refused(NamedTuple):
    """Parameters the kernel does not take (another dtype or device, a non-contiguous view, a rank above the
    kernel's): the general path runs while the factors show the same memory, dtype, device and layout; any change
    plans this adapter again. (Plain tensors, e.g. from ``functional_call``, are refused for the call only.)"""
    a: tuple
    b: tuple


def _stamp(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.dtype, t.device, t.shape, t.stride()


def _layout_fits(a: torch.Tensor, b: torch.Tensor, r: int, in_f: int, out_f: int) -> bool:
    """A (r, in) and B (out, r) as the kernel reads them: fp32 and contiguous (checked when a plan is made and
    again on every call, since ``.data`` can re-view a factor at the same address)."""
    return (a.dtype is _F32 and b.dtype is _F32 and a.shape == (r, in_f) and b.shape == (out_f, r)
            and a.is_contiguous() and b.is_contiguous())


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style Conv1D, checked without importing transformers (a 1.5 s import that
    plain-PyTorch users should not pay)."""
    return any(t.__name__ == "Conv1D" and t.__module__.startswith("transformers.") for t in type(module).__mro__)


class LoraLinear(LoraLayer):
    """y = x W0ᵀ + b + s · (x Aᵀ) Bᵀ.   A: (r, in), B: (out, r)."""

    @classmethod
    def is_plain_base(cls, base_layer: nn.Module) -> bool:
        return type(base_layer) is nn.Linear

    def _features(self) -> tuple[int, int]:
        out_f, in_f = self.base_weight().shape
        return in_f, out_f

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_f, out_f = self._features()
        return (r, in_f), (out_f, r)

    def max_rank(self) -> int:
        return min(self._features())

    def project_in(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.linear(x, a)  # (..., in) -> (..., r)

    def project_out(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(h, b)  # (..., r) -> (..., out)

    def delta_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return b @ a  # (out, in)

    def add_delta(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, inplace: bool,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        m1, m2 = self._delta_factors(a, b)
        return w.addmm_(m1, m2, alpha=alpha) if inplace else torch.addmm(w, m1, m2, alpha=alpha, out=out)

    def fused_delta(self, w0: torch.Tensor, terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, bool] | None:
        # fp32 CPU only, up to the total rank where one fused pass still beats torch's GEMM pass per adapter.
        if w0.device.type != "cpu" or w0.dtype != torch.float32 or not w0.is_contiguous() or \
                sum(a.shape[0] for a, _, _ in terms) > native.FUSED_MAX_RANK or native.kernel() is None:
            return None
        parts = []
        for a, b, alpha in terms:
            m1, m2 = self._delta_factors(a, b)  # ΔW = m1·m2
            parts.append((m1, m2 if m2.is_contiguous() else m2.contiguous(), alpha))
        dest = out if out is not None else torch.empty(w0.shape, dtype=w0.dtype)
        finite = native.merge_terms_into(dest, w0, parts)
        return None if finite is None else (dest, finite)

    def _delta_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return b, a  # ΔW = B·A (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A decode step (up to ``native.MAX_TOKENS`` tokens, inference, fp32 CPU) skips the general path's
        per-call lookups: the plan finds each live adapter's factors once (kept across activations), and a call
        checks x and y, that each factor is still the Parameter in its dict with the planned memory and layout (a
        replaced parameter, dict or ``.data`` shows), then runs the kernel per live adapter with ``add_lora_``'s
        arithmetic, in its order: the general path's bits.
        Why: this runs ~200 times per decoded token, each right after a GEMV that streamed MBs of weight through
        the caches, so every object touched is a cache miss (135M shape, B = 1, same-process A/Bs: 1.090 ->
        1.077, 1.098 -> 1.087, 1.083 -> 1.082, 1.086 -> 1.078x the base step: small, near the noise).
        Anything else (autograd, training with dropout, prefill, per_row, disabled, hooks, autocast, other dtypes,
        devices or shapes, tracing, tensor subclasses) takes ``LoraLayer.forward``."""
        # (no plan from fakes or a trace; forward AD needs torch ops to carry the tangents)
        if type(x) is not _TENSOR or torch.is_grad_enabled() or _is_tracing() or _fwad._current_level >= 0:
            return super().forward(x)
        state: AdapterState = self._state
        plan = self._decode
        if plan is None or plan.cls is not type(self):
            plan = self._plan_decode()
        live = state.live
        if (plan.ok and live and 0 < (nx := x.numel()) <= plan.max_x
                and nx < layers_base.START_MIN_TOKENS * plan.in_f and state.rows is None
                and not state._disabled_depth
                and not (self.training and any(self.dropout_p.get(n, 0.0) > 0.0 for n, _ in live))):
            base = self._modules["base_layer"]
            # (runs_directly, inlined: a method call is one more cache miss per module)
            if type(base) is self._plain_base and not (
                    base._forward_hooks or base._forward_pre_hooks or base._backward_hooks
                    or base._backward_pre_hooks or "forward" in base.__dict__ or _global_hooks()):
                y = self.base_forward(x, base._parameters["weight"])
                in_f = plan.in_f
                n = nx // in_f
                if (type(y) is _TENSOR and y.dtype is _F32 and x.dtype is _F32 and x.is_cpu and x.is_contiguous()
                        and y.is_contiguous() and n * in_f == nx and y.numel() == n * plan.out_f):
                    return self._decode_into(plan, live, y, x, n)
                return self.add_live(state, x, y)  # (autocast, another dtype, device or shape)
        return super().forward(x)

    def _decode_into(self, plan: _DecodePlan, live: tuple, y: torch.Tensor, x: torch.Tensor,
                     n: int) -> torch.Tensor:
        """y (n tokens) += every live term, once each factor is checked to be what was planned."""
        terms, in_f, out_f = plan.terms, plan.in_f, plan.out_f
        a_params, b_params = self._a_params, self._b_params  # (as they are now: a replaced ParameterDict shows)
        todo = []  # (name, weight, A's and B's pointers, r) as checked: one read of each entry
        for name, weight in live:
            t = terms.get(name)
            if t is _SKIP and name not in a_params:
                continue  # (an adapter of other layers; factors set here since are planned below)
            a, b = a_params.get(name), b_params.get(name)
            try:
                same = (type(t) is tuple and type(a) is _PARAMETER and type(b) is _PARAMETER and a.data_ptr() == t[0]
                        and b.data_ptr() == t[1] and _layout_fits(a, b, t[2], in_f, out_f))
            except RuntimeError:  # (a factor without storage)
                return self.add_live(self._state, x, y)
            if not same:
                # not planned yet, refused, or changed since planned: plan this adapter (again)
                t = self._plan_term(plan, name)
                if t is _SKIP:
                    continue
                if type(t) is not tuple:
                    return self.add_live(self._state, x, y)  # (the kernel does not take these factors)
            todo.append((name, weight, t))
        try:
            py, px = y.data_ptr(), x.data_ptr()
        except RuntimeError:  # (functorch's vmap wrappers have no storage)
            return self.add_live(self._state, x, y)
        threads = native._gemv_threads() if n >= _SPLIT_TOKENS else 1
        gemv, scaling = plan.gemv, self.scaling
        for i, (name, weight, t) in enumerate(todo):
            scale = weight * scaling[name]
            # (a weight-0 term adds nothing, NaN factors included, as in add_live)
            if scale != 0.0 and gemv(py, px, t[0], t[1], n, t[2], in_f, out_f, scale, threads) != 0:
                # The kernel declined (an allocation failed): this term and the rest through add_lora_, which
                # may return a new y.
                for name, weight, _ in todo[i:]:
                    scale = weight * scaling[name]
                    if scale != 0.0:
                        y = self.add_lora_(y, x, name, scale)
                return y
        return y

    def _plan_decode(self) -> _DecodePlan:
        """A fresh plan for this layer (kept until its adapters or the module change: ``delete_adapter``,
        ``add_adapter``, ``_apply``, a class swap)."""
        in_f, out_f = self._features()
        plan = _DecodePlan(in_f, out_f, type(self), self._decode_applies())
        object.__setattr__(self, "_decode", plan)
        return plan

    def _plan_term(self, plan: _DecodePlan, name: str) -> object:
        """The entry of adapter ``name`` (stored in ``plan.terms`` and returned): see ``_DecodePlan``. Plain
        tensors (``functional_call``) are refused for this call only, nothing stored."""
        a, b = self._a_params.get(name), self._b_params.get(name)
        if a is None or b is None:
            self.require_plain_factors(name)  # (raises unless the adapter is not on this layer at all)
            plan.terms[name] = _SKIP
            return _SKIP
        if type(a) is not _PARAMETER or type(b) is not _PARAMETER:
            return None
        try:
            stamp = _Refused(_stamp(a), _stamp(b))
        except RuntimeError:  # (no storage)
            return None
        old = plan.terms.get(name)
        if old == stamp:
            return old  # (refused before, nothing changed)
        r = a.shape[0] if a.dim() else 0
        takes = (a.dtype is _F32 and b.dtype is _F32 and a.is_cpu and b.is_cpu and 0 < r <= native.MAX_RANK
                 and _layout_fits(a, b, r, plan.in_f, plan.out_f))
        if takes and plan.ok and plan.gemv is None:
            # (the library only once the factors are known to be CPU ones: a CUDA model never compiles it)
            plan.gemv = native.gemv_function()
            plan.ok = plan.gemv is not None
        entry = (stamp.a[0], stamp.b[0], r) if takes and plan.ok else stamp
        plan.terms[name] = entry
        return entry

    @classmethod
    def _decode_applies(cls) -> bool:
        """The plan stands in for LoraLinear's ``add_live``, ``add_lora_`` and ``runs_directly``: not for a
        subclass with its own."""
        return all(getattr(cls, n) is getattr(LoraLinear, n) for n in ("add_live", "add_lora_", "runs_directly"))

    def add_lora_(self, y: torch.Tensor, x: torch.Tensor, name: str, scale: float) -> torch.Tensor:
        a, b = self._a_params[name], self._b_params[name]
        # A few tokens (decode), fp32 CPU: one pass over A and B for all of them (it declines anything else, and
        # its checks are the only ones a decode step pays for).
        if native.lora_gemv_(y, x, a, b, scale):
            return y
        if x.dtype != a.dtype or y.dtype != b.dtype or not y.is_contiguous():
            return super().add_lora_(y, x, name, scale)
        if x.is_contiguous() and y.numel() <= native.MAX_TOKENS * b.shape[0]:
            if y.numel() == b.shape[0]:  # one token
                y.view(-1).addmv_(b, torch.mv(a, x.view(-1)), alpha=scale)  # (out,) += s·B·(A·x); (r,) between
                return y  # (addmm_ with Bᵀ, a transposed view, costs ~4 µs more per module at this size)
        h = F.linear(x, a)  # (..., r)
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.t(), alpha=scale)  # (N, out) += s·h·Bᵀ
        return y

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self._modules["base_layer"]._parameters["bias"])

    def base_into(self, d: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        d.view(-1, d.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())  # (N, out) += x·W0ᵀ (the GEMM's C)
        return d

    def deltas_with_bias(self, x: torch.Tensor, bias: torch.Tensor | None,
                         terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        d = None
        for a, b, scale in terms:
            h = F.linear(x2, a)  # (N, r)
            if d is None:  # the first term writes d (beta = 0: a missing bias is never read)
                d = torch.addmm(bias if bias is not None else h.new_zeros(()), h, b.t(), beta=1.0 if bias is not None
                                else 0.0, alpha=scale)  # (N, out)
            else:
                d.addmm_(h, b.t(), alpha=scale)
        return d.view(*x.shape[:-1], d.shape[-1])


class LoraConv1D(LoraLinear):
    """transformers ``Conv1D``: y = x W0 + b with W0 (in, out), so ΔW is stored transposed (Aᵀ Bᵀ)."""

    @classmethod
    def is_plain_base(cls, base_layer: nn.Module) -> bool:
        t = type(base_layer)
        return t.__name__ == "Conv1D" and t.__module__ == "transformers.pytorch_utils"

    def _features(self) -> tuple[int, int]:
        in_f, out_f = self.base_weight().shape
        return in_f, out_f

    def delta_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b @ a).T  # (in, out)

    def _delta_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a.T, b.T  # ΔW = Aᵀ·Bᵀ (in, out)

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out_shape = x.shape[:-1] + (weight.shape[1],)
        y = torch.addmm(self.base_layer.bias, x.reshape(-1, x.shape[-1]), weight)  # (N, out)
        return y.view(out_shape)

    def base_into(self, d: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        d.view(-1, d.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight)  # (N, out) += x·W0, W0 (in, out)
        return d
