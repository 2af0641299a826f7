"""Per-row LoRA deltas for one wrapped layer: packing and the strategies that use the packed tensors.

Decode on CPU is bound by bytes read and by per-op dispatch cost (~5-10 µs per torch op, ~210 adapted modules
per step of a 30-layer model), not by FLOPs. So every strategy below reads each needed adapter once, from
tensors packed once per ``per_row`` context (rows are fixed for a whole ``generate``), and issues 2-4 torch ops
per module:

``uniform``    every row uses the same (possibly weighted) spec: one plain LoRA (``linear`` + ``addmm_``).
``grouped``    one stacked factor per distinct row spec (weights and scaling folded in, ranks zero-padded); rows
               gathered into groups and ``bmm``-ed (``index_select``, ``bmm``, ``bmm``, ``index_add_``; a plain
               ``bmm`` + ``baddbmm_`` on views when the rows are already grouped in order). Each needed adapter
               is read once and LoRA FLOPs stay minimal: ``auto``'s decode choice without the kernel.
``rowwise``    each row's factors materialised per row once per context; ``bmm`` + ``baddbmm_`` with no gather
               or scatter of the activations: ``auto``'s prefill choice (the activations are the big tensors
               there), bounded by ``ROWWISE_MAX_BYTES`` of copies per layer.
``native``     the CPU kernel library's ``dw_lora_rows_f32`` (fp32, up to ``native.MAX_TOKENS`` entries per
               (adapter, weight) term): one call per module reads each needed adapter once, in place (no packs),
               and gives each row exactly what the one-adapter decode kernel gives it alone: ``auto``'s decode
               choice where it applies.
``dense``      the unique adapters concatenated along r; a (rows, R) mask holds each row's weight·scaling per
               column (``linear``, ``mul_``, ``masked_fill_`` of the unused columns, ``addmm_``). Reads each
               adapter once, but FLOPs grow with the number of adapters: used for embeddings (a lookup, where
               gathering per group buys nothing).
``reference``  a loop over the unique adapters through ``layer.lora_out``, each on the entries of its rows
               (``index_select``, ``index_add``): simple, autograd-correct, used whenever gradients are on, in
               training with dropout, for conv layers, and where ``dense`` / padded ``grouped`` would multiply
               rows by a non-finite factor they do not use (``LayerRows._isolates``).

See ``LayerRows._auto`` for the measurements behind the choice.

Prefill (``layers.base.START_MIN_TOKENS`` tokens or more, CPU, a Linear or Conv1D base run directly): ``uniform``,
``rowwise`` and in-order ``grouped`` also start the output from the deltas, ``bias + Σ deltas`` written once,
and the layer then adds its base product into it with one ``addmm_`` (``LayerRows.start``,
``LoraLayer.base_into``), where adding the deltas after the base GEMM read and wrote its whole output again.

All strategies compute the same sum per row; they differ only in how the rows are batched. Rows are the leading
dimension of ``x``; a leading dimension of ``k·B`` (beam search / ``num_return_sequences`` expand rows with
``repeat_interleave``, and a flattened ``(B·T, in)`` activation has the same layout) maps index i to row i // k.
"""

from __future__ import annotations

import functools
import operator
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F

from ..errors import DeltawError
from ..layers import native
from ..layers.base import LoraLayer, version_of
from ..layers.embedding import LoraEmbedding
from ..layers.linear import LoraLinear
from ..registry import Weighted

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "reference", "uniform", "native", "dense", "grouped", "rowwise")

# Packed tensors survive the context that built them, keyed on adapter identity + version, so a repeated
# ``per_row`` over the same adapters re-packs nothing. Bounded per layer (LRU) because packs copy factors.
CACHE_ENTRIES_PER_LAYER = 4
_CACHE: weakref.WeakKeyDictionary[LoraLayer, OrderedDict[Hashable, object]] = weakref.WeakKeyDictionary()

# ``rowwise`` holds B copies of the row factors; above this many bytes per layer it is never chosen by ``auto``.
ROWWISE_MAX_BYTES = 4 << 20


# Bumped by ``clear_cache``: an open context's layers compare it on every call and re-pack when it moved (a write
# through ``.data`` keeps the storage and bumps no version counter, so only the caller can say it happened).
_generation = 0
_data_ptr = torch.Tensor.data_ptr
_version = operator.attrgetter("_version")


def clear_cache() -> None:
    """Drop every packed tensor kept between ``per_row`` contexts, and the layout constants kept on devices
    (they are rebuilt on demand); an open ``per_row`` context re-packs on its next forward."""
    global _generation
    _generation += 1
    _CACHE.clear()
    _device_const.cache_clear()


def forget_adapter(layer: LoraLayer, name: str, serial: int) -> None:
    """Drop the packs of ``layer`` built from adapter ``name`` (its ``serial``): called when it is deleted, so
    that its copies do not stay in the cache (a serving LRU that deletes adapters to stay within a memory
    budget would otherwise still hold them, up to ``CACHE_ENTRIES_PER_LAYER`` packs per layer)."""
    entries = _CACHE.get(layer)
    if entries:
        for key in [k for k in entries if _mentions(k, name, serial)]:
            del entries[key]


def _mentions(key: object, name: str, serial: int) -> bool:
    """Whether a pack key holds the ``_identity`` of (name, serial), at any depth."""
    if not isinstance(key, tuple):
        return False
    if len(key) > 1 and key[0] == name and key[1] == serial:
        return True
    return any(_mentions(k, name, serial) for k in key)


def _cached(layer: LoraLayer, key: Hashable, build: Callable[[], object]) -> object:
    entries = _CACHE.get(layer)
    if entries is None:
        entries = _CACHE[layer] = OrderedDict()
    hit = entries.get(key)
    if hit is not None:
        entries.move_to_end(key)
        return hit
    # Packs are plain (non-inference) tensors built without autograd, usable in any later mode.
    with torch.inference_mode(False), torch.no_grad():
        value = build()
    log.debug("packed %s for a %s", key[0], type(layer).__name__)
    entries[key] = value
    while len(entries) > CACHE_ENTRIES_PER_LAYER:
        entries.popitem(last=False)
    return value


def layer_kind(layer: LoraLayer) -> str:
    """'linear' (Linear, GPT-2 Conv1D: A (r, in), B (out, r), channels last), 'embedding', or 'other'."""
    cls = type(layer)
    if cls.project_in is LoraLinear.project_in and cls.project_out is LoraLinear.project_out:
        return "linear"
    if (isinstance(layer, LoraEmbedding) and cls.project_in is LoraEmbedding.project_in
            and cls.project_out is LoraEmbedding.project_out):
        return "embedding"
    return "other"


def _const(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant of the batch's layout (row indexes, per-row weights, masks; read-only) on ``device``.

    On a GPU, ``torch.tensor(list, device=...)`` is a blocking copy from pageable memory that first waits for
    every queued kernel, and a mask filled element by element is one launch per element: both stall the
    pipeline of a decode step. So the value is built on the host and copied once per distinct content and
    device (an LRU of small ones; the same rows recur in every layer and step; a large mask is copied once per
    kernel build instead, so the cache never holds much device memory). On the CPU it is built fresh: that is
    free. Keyed on the bytes, so -0.0 and 0.0 (equal as floats) are two constants and NaN finds itself."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    if not 0 < host.numel() <= _CONST_CACHED_MAX:
        return host.to(device)
    return _device_const(host.view(torch.uint8).numpy().tobytes(), tuple(host.shape), dtype, device)


_CONST_CACHED_MAX = 4096  # elements: 512 cached constants then hold at most 16 MB (int64) on the device


@functools.lru_cache(maxsize=512)
def _device_const(raw: bytes, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # a normal tensor even when first asked for inside inference_mode: a grad-enabled forward may reuse it
    with torch.inference_mode(False), torch.no_grad():
        return torch.frombuffer(bytearray(raw), dtype=dtype).view(shape).to(device)


def _identity(layer: LoraLayer, name: str) -> tuple:
    """What a pack of this adapter depends on: which factors (``serial``: an adapter deleted and loaded again
    under its name may land in the same memory with the same version counters), their storage and in-place
    version (optimizer steps, ``copy_``), dtype, device and scaling. A write in place through ``.data`` changes
    neither storage nor version: call ``clear_cache()`` after one."""
    a, b = layer.lora_A._parameters[name], layer.lora_B._parameters[name]
    return (name, layer.serial[name], a.data_ptr(), version_of(a), b.data_ptr(), version_of(b), a.dtype, a.device,
            layer.scaling[name])


class LayerRows:
    """The rows of one ``per_row`` context as seen by one layer (specs restricted to the adapters it carries).

    Builds packed tensors lazily, once per strategy, and picks a strategy per input shape."""

    def __init__(self, layer: LoraLayer, specs: tuple[Weighted, ...], strategy: str = "auto",
                 batch: Callable[[], int | None] | None = None) -> None:
        self.layer = layer
        # The model's batch size in the current forward, where the context knows it (see ``RowPlan.batch``).
        self._batch = batch
        self.kind = layer_kind(layer)
        self.strategy = strategy
        self.B = len(specs)
        self.specs = specs
        self.groups: dict[Weighted, int] = {}
        row_group: list[int] = []
        for spec in specs:
            if spec:
                row_group.append(self.groups.setdefault(spec, len(self.groups)))
            else:
                row_group.append(-1)
        self.row_group = row_group
        self.G = len(self.groups)
        self.has_none = -1 in row_group
        names: dict[str, None] = {}
        for spec in self.groups:
            for n, _ in spec:
                names.setdefault(n, None)
        self.names = tuple(names)
        self.empty = self.G == 0
        self.needs_dropout = any(layer.dropout_p[n] > 0.0 for n in self.names)
        # Every row the same spec: one plain LoRA, whatever the leading dimension (e.g. MoE experts see a
        # routed subset of the tokens), so no row mapping is needed.
        self.same_for_all = self.G == 1 and not self.has_none
        # Kernels work on copies of the factors (packs) or on their memory (native): a write into a factor while
        # the context is open (its version counter), a ``.data`` swap (its storage) or ``clear_cache()`` after a
        # write through ``.data`` must send them back to packing. Inference tensors keep no version counter:
        # only their storage is watched.
        self._watch = [p for n in self.names for p in (layer.lora_A._parameters[n], layer.lora_B._parameters[n])]
        self._versioned = [p for p in self._watch if not p.is_inference()]
        self._restamp()
        self._kernels: dict[tuple, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
        # input shape -> the chosen kernel's ``start`` (bias + deltas, for ``LoraLayer.base_into``), None if none
        self._starts: dict[tuple, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None] | None] = {}
        self.chosen: dict[tuple[int, ...], str] = {}  # input shape -> strategy used (diagnostics, tests)

    # ---- entry point -----------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.empty:
            return y
        n = x.shape[0] if x.dim() > 0 else 0
        if n % self.B and not self.same_for_all:
            # Ids the model looks up once for every row (GPT-2's position ids are (1, T)): each row adds its own
            # delta, so the output gets the rows' dimension and broadcasts where the lookup's did. Embeddings
            # only: an activation of batch 1 is the model's own batch (reshaped with it downstream), or one
            # token routed to an expert.
            # The model's own batch, where the context saw it: a real batch of one is not broadcast, and k
            # entries per row (beam search) get k·B.
            total = self._batch() if self._batch is not None else None
            if n != 1 or x.dim() < 2 or self.kind != "embedding" or (
                    total is not None and (total == 1 or total % self.B)):
                raise DeltawError(
                    f"per_row was given {self.B} rows but a layer received a batch of {n} (leading dimension of "
                    f"{tuple(x.shape)}); the batch must have exactly one entry per row (or k per row, in order). "
                    "Layers that see a routed subset of the tokens (mixture-of-experts) cannot tell rows apart: "
                    "give every row the same adapter there")
            total = total or self.B
            x = x.expand(total, *x.shape[1:])
            y = y.expand(total, *y.shape[1:]).contiguous()
        if torch.is_grad_enabled() or native._fwad._current_level >= 0 or (self.needs_dropout and self.layer.training):
            return self.reference(x, y)
        return self._kernel(x)(x, y)

    def start(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``bias + Σ`` every row's delta, shaped like the layer's output, for the layer to add its base product
        into (``LoraLayer.base_into``); None where this call takes the usual order (base product, then ``__call__``).

        Why: a prefill's activations are megabytes, and adding the deltas after the base GEMM (``baddbmm_`` /
        ``addmm_`` into y) reads and writes the whole output once more; written first, the deltas are the GEMM's
        C operand instead (``layers.base.START_MIN_TOKENS``, where the layer decides to ask, says what was
        measured). Inference only, Linear-style layers, and only the strategies that have such a form
        (``uniform``, ``rowwise``, ``grouped`` on in-order rows). The layer has checked x, the weight and the bias
        (``layers.base._plain_operands``: fp32 plain tensors); each start checks the packed factors' dtype."""
        if (self.empty or self.kind != "linear" or torch.is_grad_enabled() or native._fwad._current_level >= 0
                or (self.needs_dropout and self.layer.training) or x.dim() < 2
                or (x.shape[0] % self.B and not self.same_for_all)):
            return None
        self._kernel(x)  # chooses (and packs) for this shape, as the first ``__call__`` would
        first = self._starts.get(x.shape)
        return None if first is None else first(x, bias)

    def _kernel(self, x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self._gen != _generation or self._watch and self._changed():
            self._repack()  # factors written since they were packed (an optimizer step, copy_, a .data swap)
        kernel = self._kernels.get(x.shape)
        if kernel is None:
            kernel = self._kernels[x.shape] = self._choose(x)
            self._starts[x.shape] = getattr(kernel, "start", None)
        return kernel

    def _repack(self) -> None:
        """Forget the kernels built on packed copies of the factors and note the versions the next ones see."""
        self._kernels.clear()
        self._starts.clear()
        self._restamp()

    def _restamp(self) -> None:
        self._gen = _generation
        self._ptrs = [*map(_data_ptr, self._watch)]
        self._versions = [version_of(p) for p in self._versioned]

    def _changed(self) -> bool:
        """Whether a watched factor's storage or version moved (two ``map``s: ~4 µs for 32 factors)."""
        try:
            return [*map(_data_ptr, self._watch)] != self._ptrs or [*map(_version, self._versioned)] != self._versions
        except RuntimeError:  # swapped for a tensor without storage or version counter: never the same
            return True

    def _choose(self, x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        name = self.strategy if self.strategy != "auto" else self._auto(x)
        if self.same_for_all and x.shape[0] % self.B:
            name = "uniform"  # the only kernel that needs no row mapping
        if self.kind == "other" or (self.kind == "embedding" and self.layer.base_layer.max_norm is not None):
            name = "reference"  # (max_norm renormalises rows of the table given: of each adapter's own table)
        elif name == "uniform" and not self.same_for_all:
            name = "dense"  # a forced "uniform" on a mixed batch: the closest exact kernel
        elif name in ("grouped", "rowwise", "native") and self.kind == "embedding":
            name = "dense"  # a lookup reads only the rows' ids: gathering per group buys nothing
        k = x.shape[0] // self.B
        if name == "native":
            run = self.native_kernel(x)
            if run is not None:
                self.chosen[tuple(x.shape)] = name
                return run
            name = "uniform" if self.same_for_all else "grouped"  # the kernel does not take these factors/shapes
        if name in ("dense", "grouped") and not self._isolates(name):
            name = "reference"  # (see ``_isolates``)
        self.chosen[tuple(x.shape)] = name
        if name == "reference":
            return self.reference
        if name == "uniform":
            return self.uniform_kernel()
        if name == "grouped":
            return self.grouped_kernel(k)
        if name == "rowwise":
            return self.rowwise_kernel()
        return self.dense_kernel(k)

    def _auto(self, x: torch.Tensor) -> str:
        """Strategy by batch shape (measured on SmolLM2-135M / BERT-base shapes, 2 CPU threads):

        decode (≤ 4 tokens per row): ``native`` where it applies (fp32 CPU, ≤ MAX_TOKENS entries per term; see
        ``native_kernel``; B=16, same process against ``grouped``, three rounds: 4 adapters 1.10 / 1.14 / 1.11×
        base vs 1.16 / 1.11 / 1.17×, 16 adapters 1.27 / 1.29 / 1.25× vs 1.24 / 1.29 / 1.23×, bound by the
        factors' bytes), else ``uniform`` for one spec on every row, else ``grouped`` -- each needed adapter
        read once, 2-4 ops per module (16 distinct adapters 1.29× base vs 1.45× dense; 4 adapters 1.14× vs
        1.21× dense, 1.23× rowwise);
        prefill: ``rowwise`` -- no gather/scatter of the activations (BERT 8×128, 4 adapters: 1.006× vs 1.044×
        grouped, 1.15× dense), unless the rows are already grouped in order (``grouped`` is then pure views)
        or the per-row copies would exceed two per adapter or ``ROWWISE_MAX_BYTES`` for this layer."""
        if self.kind == "other":
            return "reference"
        if self.kind == "embedding":
            return "uniform" if self.same_for_all else "dense"
        tokens_per_row = x.numel() // (self.B * x.shape[-1])
        if tokens_per_row <= 4:
            return "native"  # falls back to uniform / grouped where the kernel does not apply
        if self.same_for_all:
            return "uniform"
        if not self._grouped_in_order() and self.B <= 2 * self.G \
                and self._rowwise_bytes() <= ROWWISE_MAX_BYTES:
            return "rowwise"  # ≤ 2 copies of each needed adapter, bounded per layer
        return "grouped"

    def _isolates(self, name: str) -> bool:
        """Whether ``dense`` or ``grouped`` keeps each row to its own adapters here. Both multiply rows by factors
        they do not use -- ``dense`` every row by every adapter, ``grouped`` its padding slots (groups of unequal
        size) by their group's -- and zero those products; a NaN or inf in such a factor survives that (0 · inf
        is NaN) and would reach rows that never use the adapter, where each row alone stays finite. Where a factor
        is not finite, ``reference`` runs. Decided on the pack the kernel would use, once per pack (``_Verdict``):
        a new context over resident adapters finds its packs and their verdicts, and every pack built -- from
        whatever values the factors hold then -- is checked."""
        if name == "grouped" and len({g for g in self.row_group if g >= 0}) == self.G and len(
                {self.row_group.count(g) for g in range(self.G)}) == 1:
            return True  # equal groups: no padding slot
        if name == "dense":
            a_cat, bt_cat, _, verdict = self._pack_concat()
            return verdict.finite(a_cat, bt_cat)
        a_st, b_st, verdict = self._pack_stacks()
        return verdict.finite(a_st, b_st)

    def _grouped_in_order(self) -> bool:
        """Rows already sorted into equal-size groups (e.g. all distinct): ``grouped`` needs no gather."""
        if self.has_none or self.B % self.G:
            return False
        n = self.B // self.G
        return all(g == row // n for row, g in enumerate(self.row_group))

    def _rowwise_bytes(self) -> int:
        a = self.layer.lora_A._parameters[self.names[0]]
        r_max = max(sum(self.layer.rank(n) for n, _ in spec) for spec in self.groups)
        in_f = a.shape[1]
        out_f = self.layer.lora_B._parameters[self.names[0]].shape[0]
        return self.B * r_max * (in_f + out_f) * a.element_size()

    # ---- reference ---------------------------------------------------------------------------------------
    def reference(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ over unique adapters of lora_out(x) · (per-row weight · scaling): plain ops, autograd-correct.
        Each adapter runs on the entries of the rows that use it only (``index_select`` / ``index_add``): one
        computed for every row and zeroed by a weight of 0 would turn NaN or inf factors, or an fp16 product
        that overflows, into NaN on rows that never use it (0 · inf), values and gradients alike."""
        k = x.shape[0] // self.B
        if self.same_for_all:  # one spec for every row: plain scalars, any leading dimension
            (spec,) = self.groups
            for name, weight in spec:
                y = y + self.layer.lora_out(name, x, y.dtype) * (weight * self.layer.scaling[name])
            return y
        for name in self.names:
            scale = self.layer.scaling[name]
            weights = [dict(spec).get(name, 0.0) * scale for spec in self.specs]
            rows = [i for i, spec in enumerate(self.specs) if any(n == name for n, _ in spec)]
            w = _const([weights[i] for i in rows], y.dtype, y.device)  # (rows using it,)
            if k > 1:
                w = w.repeat_interleave(k)  # row r's weight on its k entries
            w = w.view(-1, *([1] * (y.dim() - 1)))  # (n, 1, ...) broadcasts over tokens / channels
            if len(rows) == self.B:
                y = y + self.layer.lora_out(name, x, y.dtype) * w
                continue
            idx = _const([i * k + j for i in rows for j in range(k)], torch.long, y.device)  # (n,) entries
            y = y.index_add(0, idx, self.layer.lora_out(name, x.index_select(0, idx), y.dtype) * w)
        return y

    # ---- packing -----------------------------------------------------------------------------------------
    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        layer = self.layer
        return (layer.lora_A._parameters[name].detach(), layer.lora_B._parameters[name].detach(),
                layer.scaling[name])

    def _spec_key(self, spec: Weighted) -> tuple:
        return tuple((_identity(self.layer, n), w) for n, w in spec)

    def _pack_concat(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, slice], _Verdict]:
        """Unique adapters concatenated along r: A (R, in) [embedding: Aᵀ (num, R)], Bᵀ (R, out), unscaled; and
        the pack's finiteness verdict (decided when first asked)."""
        key = ("concat", tuple(_identity(self.layer, n) for n in self.names))

        def build() -> tuple[torch.Tensor, torch.Tensor, dict[str, slice], _Verdict]:
            cols: dict[str, slice] = {}
            a_parts, bt_parts, start = [], [], 0
            for n in self.names:
                a, b, _ = self._factors(n)
                a_parts.append(a)
                bt_parts.append(b.t())
                cols[n] = slice(start, start + a.shape[0])
                start += a.shape[0]
            a_cat = torch.cat(a_parts, 0)  # (R, in) | (R, num)
            if self.kind == "embedding":
                a_cat = a_cat.t().contiguous()  # (num, R): a lookup table
            return a_cat, torch.cat(bt_parts, 0).contiguous(), cols, _Verdict()  # Bᵀ: (R, out)

        return _cached(self.layer, key, build)  # type: ignore[return-value]

    def _pack_stacks(self) -> tuple[torch.Tensor, torch.Tensor, _Verdict]:
        """One factor pair per distinct spec: Aᵀ (G, in, Rmax), (w·s·Bᵀ) (G, Rmax, out); ranks zero-padded."""
        specs = list(self.groups)
        key = ("stacks", tuple(self._spec_key(s) for s in specs))

        def build() -> tuple[torch.Tensor, torch.Tensor, _Verdict]:
            ranks = [sum(self.layer.rank(n) for n, _ in s) for s in specs]
            a0, b0, _ = self._factors(specs[0][0][0])
            r_max, in_f, out_f = max(ranks), a0.shape[1], b0.shape[0]
            # the widest factor dtype (a model cast to half after one attach holds fp16 and fp32 adapters), as
            # torch.cat promotes in the concatenated pack: no adapter is rounded to another's precision
            dtype = functools.reduce(torch.promote_types, (self._factors(n)[0].dtype for s in specs for n, _ in s))
            a_st = a0.new_zeros(len(specs), in_f, r_max, dtype=dtype)  # (G, in, Rmax)
            b_st = b0.new_zeros(len(specs), r_max, out_f, dtype=dtype)  # (G, Rmax, out)
            for g, spec in enumerate(specs):
                start = 0
                for n, w in spec:
                    a, b, s = self._factors(n)
                    r = a.shape[0]
                    a_st[g, :, start:start + r] = a.t()
                    b_st[g, start:start + r] = b.t().to(dtype) * (w * s)  # scaled in the pack's precision
                    start += r
            return a_st, b_st, _Verdict()

        return _cached(self.layer, key, build)  # type: ignore[return-value]

    # ---- kernels -----------------------------------------------------------------------------------------
    def uniform_kernel(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Every row the same spec: y += x·Aᵀ·(w·s·Bᵀ). One adapter uses its own factors (no copy)."""
        (spec,) = self.groups
        if len(spec) == 1:
            (n, w), = spec
            a, b, s = self._factors(n)
            a_in, bt, alpha = a, b.t(), w * s  # (r, in), (r, out) view
        else:
            a_cat, bt_cat, cols, _ = self._pack_concat()
            a_in, alpha = a_cat, 1.0  # (R, in) | embedding: (num, R)
            scale = _const([w * self.layer.scaling[n] for n, w in spec for _ in range(cols[n].stop - cols[n].start)],
                           bt_cat.dtype, bt_cat.device)  # (R,)
            # Columns of a single spec appear once each and in order, so the pack's rows align with ``scale``.
            bt = bt_cat * scale[:, None]  # (R, out)
        project = self._project_in(a_in, single=len(spec) == 1)

        def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            h = project(x)  # (N, ..., R)
            return _add_out(y, h, bt, alpha)

        def start(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
            if x.dtype != bt.dtype:
                return None
            h = project(x)  # (N, ..., R)
            return _start_out(h.reshape(-1, h.shape[-1]), bt, bias, alpha).view(*x.shape[:-1], bt.shape[-1])

        run.start = start
        return run

    def _project_in(self, a: torch.Tensor, single: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> (..., R) given A (R, in) for linear, or for embeddings Aᵀ (num, R) (or A (r, num) if single)."""
        dtype = a.dtype
        if self.kind == "embedding":
            table = a.t() if single else a  # (num, R)
            lookup = self.layer._lookup
            return _Lookup(lookup, table)
        return _LinearIn(a, dtype)

    def native_kernel(self, x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """One ``native.lora_rows_`` call per module: a term per (adapter, weight) over the entries (rows of x
        flattened to (N·T, in)) of the rows using it; the factors are read in place. None when the kernel does
        not take this layer's factors or batch (then ``uniform`` / ``grouped``); a call it declines (dtype,
        layout) runs the fallback kernel."""
        in_f = x.shape[-1]
        entries = x.numel() // in_f if in_f else 0
        if entries == 0 or entries % self.B and not self.same_for_all:
            return None
        if x.dtype is not torch.float32 or self.layer.base_weight().dtype is not torch.float32 or not x.is_cpu:
            return None  # (half-precision bases: the kernel is fp32 only)
        per = entries // self.B  # entries of one row: k·T, contiguous
        rows_of: dict[tuple[str, float], list[int]] = {}
        if self.same_for_all:
            (spec,) = self.groups
            for n, w in spec:
                rows_of[(n, w)] = list(range(entries))
        else:
            for row, spec in enumerate(self.specs):
                for n, w in spec:
                    rows_of.setdefault((n, w), []).extend(range(row * per, (row + 1) * per))
        terms = []
        for (n, w), rows in rows_of.items():
            a, b, s = self._factors(n)
            terms.append((a, b, w * s, rows))
        prepared = native.row_terms(terms, entries)
        if prepared is None:
            return None
        fallback: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = []

        def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if native.lora_rows_(y, x, prepared):
                return y
            if not fallback:  # (built once: this kernel serves one input shape)
                fallback.append(self.uniform_kernel() if self.same_for_all
                                else self.grouped_kernel(x.shape[0] // self.B) if self._isolates("grouped")
                                else self.reference)
            return fallback[0](x, y)

        return run

    def dense_kernel(self, k: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """h = project_in(x, A_cat) (N, ..., R); h *= mask (N, 1.., R) [w·s per row and column]; y += h·Bᵀ."""
        a_cat, bt_cat, cols, _ = self._pack_concat()
        width = a_cat.shape[1] if self.kind == "embedding" else a_cat.shape[0]
        rows = []
        for spec in self.specs:
            row = [0.0] * width
            for n, w in spec:
                row[cols[n]] = [w * self.layer.scaling[n]] * (cols[n].stop - cols[n].start)
            rows.append(row)
        mask = _const(rows, bt_cat.dtype, bt_cat.device)  # (B, R): each row's w·s per column
        if k > 1:
            mask = mask.repeat_interleave(k, 0)  # (N, R)
        unused = mask == 0  # (N, R): set to exactly 0 (a weight of 0 times an inf from fp16 overflow is NaN)
        project = self._project_in(a_cat)

        def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            h = project(x)  # (N, ..., R)
            shape = (mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1])
            h.mul_(mask.view(shape)).masked_fill_(unused.view(shape), 0.0)
            return _add_out(y, h, bt_cat, 1.0)

        return run

    def grouped_kernel(self, k: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Rows gathered into (G, rows_per_group·tokens, in) and multiplied by their group's stacked factors."""
        a_st, b_st, _ = self._pack_stacks()
        members: list[list[int]] = [[] for _ in range(self.G)]
        for row, g in enumerate(self.row_group):
            if g >= 0:
                members[g].append(row)
        width = max(len(m) for m in members)
        balanced = all(len(m) == width for m in members)
        order = [row for m in members for row in m]
        G = self.G
        if balanced and not self.has_none and order == list(range(self.B)):
            # Rows already grouped in order: pure views, two ops.
            def run_views(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                xg = x.reshape(G, -1, x.shape[-1])  # (G, n·k·T, in)
                if xg.dtype != a_st.dtype:
                    xg = xg.to(a_st.dtype)
                h = torch.bmm(xg, a_st)  # (G, n·k·T, Rmax)
                if y.dtype == b_st.dtype and y.is_contiguous():
                    y.view(G, -1, y.shape[-1]).baddbmm_(h, b_st)
                    return y
                return y + torch.bmm(h, b_st).view(y.shape).to(y.dtype)

            def start_views(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
                if x.dtype != a_st.dtype:
                    return None
                h = torch.bmm(x.reshape(G, -1, x.shape[-1]), a_st)  # (G, n·k·T, Rmax)
                return _start_out(h, b_st, bias).view(*x.shape[:-1], b_st.shape[-1])

            run_views.start = start_views
            return run_views
        pad_row = order[0]
        idx_rows = [m + [pad_row] * (width - len(m)) for m in members]  # (G, width)
        pad = None
        if not balanced:
            # zero the padded slots' output exactly (masked, not multiplied: 0 times an fp16 overflow is NaN)
            pad = _const([[j >= len(m) for j in range(width)] for m in members], torch.bool,
                         a_st.device).view(G, width, 1, 1)
        idx = _const([r for m in idx_rows for r in m], torch.long, a_st.device)  # (G·width,)
        # Index over the leading dimension N = k·B: row r owns entries r·k .. r·k + k - 1.
        idx_n = (idx[:, None] * k + torch.arange(k, device=idx.device)).view(-1) if k > 1 else idx

        def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            in_f = x.shape[-1]
            xg = x.index_select(0, idx_n)  # (G·width·k, ..., in)
            if xg.dtype != a_st.dtype:
                xg = xg.to(a_st.dtype)
            h = torch.bmm(xg.view(G, -1, in_f), a_st)  # (G, width·k·T, Rmax)
            if pad is not None:
                h.view(G, width, -1, h.shape[-1]).masked_fill_(pad, 0.0)
            d = torch.bmm(h, b_st)  # (G, width·k·T, out)
            d = d.view(idx_n.shape[0], *y.shape[1:])
            if y.dtype == d.dtype:
                return y.index_add_(0, idx_n, d) if not y.requires_grad else y.index_add(0, idx_n, d)
            return y.index_add(0, idx_n, d.to(y.dtype))

        return run

    def rowwise_kernel(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Per-row factor copies (B, in, Rmax) / (B, Rmax, out), rows without adapters get zeros: bmm + baddbmm_."""
        a_st, b_st, _ = self._pack_stacks()
        key = ("rowwise", tuple(self.row_group), self._spec_key_all())
        B = self.B

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            g = _const([x if x >= 0 else self.G for x in self.row_group], torch.long, a_st.device)  # (B,)
            a_z = torch.cat([a_st, a_st.new_zeros(1, *a_st.shape[1:])])  # a zero entry for rows with none
            b_z = torch.cat([b_st, b_st.new_zeros(1, *b_st.shape[1:])])
            return a_z.index_select(0, g), b_z.index_select(0, g)  # (B, in, Rmax), (B, Rmax, out)

        a_row, b_row = _cached(self.layer, key, build)  # type: ignore[misc]

        def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            xr = x.reshape(B, -1, x.shape[-1])  # (B, k·T, in)
            if xr.dtype != a_row.dtype:
                xr = xr.to(a_row.dtype)
            h = torch.bmm(xr, a_row)  # (B, k·T, Rmax)
            if y.dtype == b_row.dtype and y.is_contiguous():
                y.view(B, -1, y.shape[-1]).baddbmm_(h, b_row)
                return y
            return y + torch.bmm(h, b_row).view(y.shape).to(y.dtype)

        def start(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
            if x.dtype != a_row.dtype:
                return None
            h = torch.bmm(x.reshape(B, -1, x.shape[-1]), a_row)  # (B, k·T, Rmax)
            return _start_out(h, b_row, bias).view(*x.shape[:-1], b_row.shape[-1])

        run.start = start
        return run

    def _spec_key_all(self) -> tuple:
        return tuple(self._spec_key(s) for s in self.groups)


class _Verdict:
    """Whether a pack's tensors are all finite, decided the first time a kernel asks (``LayerRows._isolates``)
    and kept with the pack: a pack built later, from whatever values the factors then hold, has its own."""

    __slots__ = ("ok",)

    def __init__(self) -> None:
        self.ok: bool | None = None

    def finite(self, *tensors: torch.Tensor) -> bool:
        if self.ok is None:
            with torch.no_grad():  # (a meta tensor has no values to check)
                self.ok = all(t.is_meta or bool(torch.isfinite(t).all()) for t in tensors)
        return self.ok


class _LinearIn:
    """x -> x·Aᵀ in A's dtype (a callable object rather than a closure so it pickles and reads in a profile)."""

    def __init__(self, a: torch.Tensor, dtype: torch.dtype) -> None:
        self.a, self.dtype = a, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return F.linear(x, self.a)  # (..., in) -> (..., R)


class _Lookup:
    """ids -> table[ids] through the embedding layer's own lookup (same padding_idx / max_norm semantics)."""

    def __init__(self, lookup: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], table: torch.Tensor) -> None:
        self.lookup, self.table = lookup, table

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids, self.table)  # (...,) -> (..., R)


def _start_out(h: torch.Tensor, bt: torch.Tensor, bias: torch.Tensor | None, alpha: float = 1.0) -> torch.Tensor:
    """bias + alpha · h·Bᵀ into a new tensor: (N, R)·(R, out) or batched (G, M, R)·(G, R, out). alpha scales the
    product inside the GEMM, as the usual order's ``addmm_(alpha=)`` does (h scaled first could overflow fp16)."""
    if bias is None:  # (beta = 0: the input is never read)
        bias, beta = h.new_zeros(()), 0.0
    else:
        beta = 1.0
    if h.dim() == 2:
        return torch.addmm(bias, h, bt, beta=beta, alpha=alpha)  # (N, out)
    return torch.baddbmm(bias, h, bt, beta=beta, alpha=alpha)  # (G, M, out)


def _add_out(y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, alpha: float) -> torch.Tensor:
    """y += alpha · h·Bᵀ, in place (one ``addmm_``) when dtypes and layout allow, else out of place."""
    if y.dtype == bt.dtype and y.is_contiguous() and not y.requires_grad:
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), bt, alpha=alpha)  # (N·T, out)
        return y
    d = torch.matmul(h, bt)  # (..., out)
    if alpha != 1.0:
        d = d * alpha
    return y + d.to(y.dtype)


def cache_nbytes() -> int:
    """Bytes held by packed tensors kept between contexts (what ``clear_cache`` frees)."""
    seen: set[int] = set()
    total = 0
    for entries in list(_CACHE.values()):
        for value in entries.values():
            for t in value if isinstance(value, tuple) else (value,):
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total
