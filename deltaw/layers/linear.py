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


class _DecodePlan(NamedTuple):
    """What a decode step of one layer needs from its live adapters, checked once per activation: see
    ``LoraLinear.forward``. ``terms``: (name, weight, A, B, A's and B's data pointers, r) per live adapter on this
    layer, in ``state.live`` order; empty where the plan does not apply (a factor that is not a plain contiguous
    fp32 CPU Parameter, a rank above the kernel's, no kernel here, a subclass with its own update)."""
    live: tuple  # the ``state.live`` it was built for: compared by identity (a new tuple on every change)
    terms: tuple[tuple[str, float, nn.Parameter, nn.Parameter, int, int, int], ...]
    max_x: int  # x.numel() up to which a call is a decode step (native.MAX_TOKENS tokens)
    in_f: int
    out_f: int
    gemv: Callable[..., int] | None
    cls: type  # the class it was made for (a ``__class__`` swap plans again)
    # (name, A, B) of the live adapters when a factor was refused for something that may be put back (a plain
    # tensor swapped in by ``functional_call``, a non-contiguous view): a call plans again once one is replaced.
    # Empty when nothing was refused, or when a factor is of another dtype or device (a bf16 or CUDA model).
    recheck: tuple[tuple[str, torch.Tensor | None, torch.Tensor | None], ...]


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
        per-call lookups: the plan finds the live factors once per activation, and a call checks x and y, that
        each factor is still the Parameter in its dict with the planned memory and layout (a replaced parameter,
        dict or ``.data`` shows), then runs the kernel per live adapter with ``add_lora_``'s arithmetic, in its
        order: the general path's bits.
        Why: this runs ~200 times per decoded token, each right after a GEMV that streamed MBs of weight through
        the caches, so every object touched is a cache miss (135M shape, B = 1, same-process A/Bs of 100-300
        steps: 1.090 -> 1.077, 1.098 -> 1.087, 1.083 -> 1.082x the base step: small, near the noise).
        Anything else (autograd, training with dropout, prefill, per_row, disabled, hooks, autocast, other dtypes,
        devices or shapes, tracing, tensor subclasses) takes ``LoraLayer.forward``."""
        # (no plan from fakes or a trace; forward AD needs torch ops to carry the tangents)
        if type(x) is not _TENSOR or torch.is_grad_enabled() or _is_tracing() or _fwad._current_level >= 0:
            return super().forward(x)
        state: AdapterState = self._state
        plan = self._decode
        if (plan is None or plan[0] is not state.live or plan[6] is not type(self)
                or plan[7] and self._factors_replaced(plan[7])):
            plan = self._plan_decode(state)
        _, terms, max_x, in_f, out_f, gemv, _, _ = plan
        if (terms and 0 < (nx := x.numel()) <= max_x and nx < layers_base.START_MIN_TOKENS * in_f
                and state.rows is None and not state._disabled_depth
                and not (self.training and any(self.dropout_p[t[0]] > 0.0 for t in terms))):
            base = self._modules["base_layer"]
            # (runs_directly, inlined: a method call is one more cache miss per module)
            if type(base) is self._plain_base and not (
                    base._forward_hooks or base._forward_pre_hooks or base._backward_hooks
                    or base._backward_pre_hooks or "forward" in base.__dict__ or _global_hooks()):
                y = self.base_forward(x, base._parameters["weight"])
                n = nx // in_f
                if (type(y) is _TENSOR and y.dtype is _F32 and x.dtype is _F32 and x.is_cpu and x.is_contiguous()
                        and y.is_contiguous() and n * in_f == nx and y.numel() == n * out_f):
                    return self._decode_into(plan, y, x, n)
                return self.add_live(state, x, y)  # (autocast, another dtype, device or shape)
        return super().forward(x)

    def _decode_into(self, plan: _DecodePlan, y: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
        """y (n tokens) += every planned term, once each factor is checked to be the one planned."""
        _, terms, _, in_f, out_f, gemv, _, _ = plan
        a_params, b_params = self._a_params, self._b_params  # (as they are now: a replaced ParameterDict shows)
        for name, _, a, b, pa, pb, r in terms:
            if (a_params.get(name) is not a or b_params.get(name) is not b or a.data_ptr() != pa
                    or b.data_ptr() != pb or not _layout_fits(a, b, r, in_f, out_f)):
                object.__setattr__(self, "_decode", None)  # changed since planned: plan again on the next call
                return self.add_live(self._state, x, y)
        try:
            py, px = y.data_ptr(), x.data_ptr()
        except RuntimeError:  # (functorch's vmap wrappers have no storage)
            return self.add_live(self._state, x, y)
        threads = native._gemv_threads() if n >= _SPLIT_TOKENS else 1
        scaling = self.scaling
        for i, (name, weight, _, _, pa, pb, r) in enumerate(terms):
            scale = weight * scaling[name]
            # (a weight-0 term adds nothing, NaN factors included, as in add_live)
            if scale != 0.0 and gemv(py, px, pa, pb, n, r, in_f, out_f, scale, threads) != 0:
                # The kernel declined (an allocation failed): this term and the rest through add_lora_, which
                # may return a new y.
                for name, weight, *_ in terms[i:]:
                    scale = weight * scaling[name]
                    if scale != 0.0:
                        y = self.add_lora_(y, x, name, scale)
                return y
        return y

    def _plan_decode(self, state: AdapterState) -> _DecodePlan:
        """The decode plan for ``state.live`` (kept on the layer until the next change of it)."""
        in_f, out_f = self._features()
        a_params, b_params = self._a_params, self._b_params
        terms, recheck = [], ()
        for name, weight in state.live:
            a, b = a_params.get(name), b_params.get(name)
            if a is None or b is None:
                self.require_plain_factors(name)  # (raises unless the adapter is not on this layer at all)
                continue
            r = a.shape[0] if a.dim() else 0
            same_kind = a.dtype is _F32 and b.dtype is _F32 and a.is_cpu and b.is_cpu  # (as the model's: lasting)
            if not (same_kind and type(a) is _PARAMETER and type(b) is _PARAMETER and 0 < r <= native.MAX_RANK
                    and _layout_fits(a, b, r, in_f, out_f)):
                if same_kind:
                    recheck = tuple((n, a_params.get(n), b_params.get(n)) for n, _ in state.live)
                terms = []
                break
            terms.append((name, weight, a, b, a.data_ptr(), b.data_ptr(), r))
        # (the library only once the factors are known to be CPU ones: a CUDA model never compiles it)
        gemv = native.gemv_function() if terms and self._decode_applies() else None
        if gemv is None:
            terms = []
        plan = _DecodePlan(state.live, tuple(terms), native.MAX_TOKENS * in_f, in_f, out_f, gemv, type(self), recheck)
        object.__setattr__(self, "_decode", plan)
        return plan

    def _factors_replaced(self, recheck: tuple[tuple[str, torch.Tensor | None, torch.Tensor | None], ...]) -> bool:
        a_params, b_params = self._a_params, self._b_params
        return any(a_params.get(n) is not a or b_params.get(n) is not b for n, a, b in recheck)

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
