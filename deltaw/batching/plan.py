"""``per_row``: a different adapter (or none, or a weighted stack) for every row of one batch.

    with deltaw.batching.per_row(model, ["tech", "sport", None, {"tech": 0.5, "sport": 0.5}]):
        model.generate(**inputs)          # rows fixed for the whole call, KV cache included

While the context is open ``deltaw.state(model).rows`` holds a ``RowPlan``; every ``LoraLayer.forward`` hands its
base output to ``RowPlan.apply`` instead of adding the live adapters. A row behaves exactly as that row run alone
under ``deltaw.using(model, spec)``: adapters merged into the base weights stay in them for every row (as with
``using``), and rows add their unmerged adapters on top. Everything is validated on entry, before any compute.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .. import api
from ..errors import AdapterNameError, DeltawError, NonFiniteError
from ..layers.base import LoraLayer, ModulesToSave
from ..registry import AdapterState, Weighted
from .kernels import STRATEGIES, LayerRows

log = logging.getLogger(__name__)

RowSpec = str | Sequence[str] | Mapping[str, float] | None


class MixedHeadsError(DeltawError, ValueError):
    """Rows of one batch need different ``modules_to_save`` copies (e.g. classification heads)."""


def normalize_rows(st: AdapterState, rows: Sequence[RowSpec]) -> tuple[Weighted, ...]:
    """Each row spec -> ((name, weight), ...), every name checked against the resident adapters."""
    if isinstance(rows, (str, Mapping)) or not isinstance(rows, Sequence):
        raise TypeError(f"per_row expects one spec per row (a list), got {type(rows).__name__}")
    if not rows:
        raise ValueError("per_row needs at least one row")
    out: list[Weighted] = []
    for i, spec in enumerate(rows):
        try:
            weighted = api.normalize(spec)
            for name, _ in weighted:
                st.require(name)
        except (AdapterNameError, NonFiniteError, TypeError, ValueError) as exc:
            # the same type, the row named: in a batch of 64 the same adapter may appear in many rows
            raise type(exc)(f"row {i}: {exc}") from None
        out.append(weighted)
    return tuple(out)


class RowPlan:
    """The per-row plan ``AdapterState.rows`` points to while ``per_row`` is open.

    ``apply(layer, x, y)`` returns y plus each row's adapter delta; ``single_head(wrapper)`` names the
    modules_to_save copy all rows share (None: the original). Per-layer packed tensors are built on first use
    and kept for the life of the plan (and, keyed on adapter identity and version, across plans)."""

    def __init__(self, st: AdapterState, rows: Sequence[RowSpec], strategy: str = "auto") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown per_row strategy {strategy!r}; choose one of {STRATEGIES}")
        self.requested = normalize_rows(st, rows)
        merged = {n for n, _ in st.merged}
        if merged & {n for spec in self.requested for n, _ in spec}:
            log.info("per_row: adapters %s are merged into the base weights and apply to every row",
                     sorted(merged))
        # What each row adds on top of the (possibly merged) base: its unmerged, non-zero adapters.
        self.rows: tuple[Weighted, ...] = tuple(
            tuple((n, w) for n, w in spec if n not in merged and w != 0.0) for spec in self.requested)
        self.strategy = strategy
        self._state = st
        self._layers: dict[LoraLayer, LayerRows] = {}
        self._restricted: dict[frozenset[str], tuple[Weighted, ...]] = {}
        self._used = frozenset(n for spec in self.rows for n, _ in spec)
        self._heads: dict[ModulesToSave, str | None] = {}
        # The batch size of the model's current forward (``note_batch``), None where the model was not called
        # itself (a submodule run directly): an embedding lookup of one entry is then broadcast to the rows.
        self.batch: int | None = None
        for wrapper in st.saved_modules.values():
            self._heads[wrapper] = self._head_for(wrapper)

    def __len__(self) -> int:
        return len(self.rows)

    def apply(self, layer: LoraLayer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._rows(layer)(x, y)

    def start(self, layer: LoraLayer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """bias + the rows' deltas for ``layer`` to add its base product into, or None (see ``LayerRows.start``)."""
        return self._rows(layer).start(x, bias)

    def _rows(self, layer: LoraLayer) -> LayerRows:
        rows = self._layers.get(layer)
        if rows is None:
            rows = self._layers[layer] = self._build(layer)
        return rows

    def single_head(self, wrapper: ModulesToSave) -> str | None:
        head = self._heads.get(wrapper, ...)
        if head is ...:
            head = self._heads[wrapper] = self._head_for(wrapper)
        return head  # type: ignore[return-value]

    def strategies_used(self) -> dict[str, int]:
        """How many (layer, input shape) pairs ran each strategy so far: what ``auto`` picked."""
        counts: dict[str, int] = {}
        for rows in self._layers.values():
            for name in rows.chosen.values():
                counts[name] = counts.get(name, 0) + 1
        return counts

    # ---- internals ---------------------------------------------------------------------------------------
    def _build(self, layer: LoraLayer) -> LayerRows:
        a_params, b_params = layer._a_params, layer._b_params
        present = frozenset(n for n in self._used
                            if n in a_params and n in b_params or layer.require_plain_factors(n))
        specs = self._restricted.get(present)
        if specs is None:
            specs = self._restricted[present] = tuple(
                tuple((n, w) for n, w in spec if n in present) for spec in self.rows)
        return LayerRows(layer, specs, self.strategy, self._batch_size)

    def _batch_size(self) -> int | None:
        return self.batch

    def note_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the model ``per_row`` was given: the leading dimension of its input (``input_ids``,
        ``inputs_embeds`` or the first tensor argument), so that an embedding lookup done once for every row
        (GPT-2's ``(1, T)`` position ids) is broadcast to the model's real batch -- k entries per row under beam
        search -- and a real batch of one row for several specs is refused rather than broadcast."""
        first = next((v for v in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args)
                      if isinstance(v, torch.Tensor)), None)
        self.batch = (first.shape[0] if first.dim() > 1 else 1) if first is not None else None

    def _head_for(self, wrapper: ModulesToSave) -> str | None:
        """The copy each row would use alone, as ``using`` picks it (``ModulesToSave.selected``): the first adapter
        of its spec that has one, else the first merged adapter that has one, else the original."""
        copies = wrapper.modules_to_save
        merged = next((n for n, _ in self._state.merged if n in copies), None)
        heads = [next((n for n, _ in spec if n in copies), merged) for spec in self.requested]
        distinct = sorted(set(heads), key=lambda h: (h is None, h or ""))
        if len(distinct) > 1:
            path = next((p for p, w in self._state.saved_modules.items() if w is wrapper), "?")
            shown = ", ".join("the original" if h is None else repr(h) for h in distinct)
            raise MixedHeadsError(
                f"rows need different copies of the saved module {path!r} ({shown}); a batch can run only one "
                "copy of a modules_to_save module. Split the batch by head, or give these rows adapters that "
                "share it")
        return distinct[0] if distinct else None


@contextmanager
def per_row(model: nn.Module, rows: Sequence[RowSpec], *, strategy: str = "auto") -> Iterator[RowPlan]:
    """Run each row of the next batches with its own adapter spec.

    ``rows``: one entry per batch row: an adapter name, None (the base model), a list of names (weight 1 each)
    or a mapping {name: weight} (a weighted stack). Adapters may have different ranks and targets. Unknown names
    and conflicting modules_to_save heads raise here, before any compute. ``strategy`` forces one kernel
    ("reference", "native", "dense", "grouped", "rowwise", "uniform"; "auto" picks per layer and batch shape).

    Inside, every forward must have the rows as its leading dimension (or k consecutive entries per row, as
    beam search and ``num_return_sequences`` lay them out, or ids an embedding looks up once for every row, as
    GPT-2's position ids); a layer that sees a routed subset of the tokens (mixture-of-experts) cannot tell
    rows apart: give every row the same spec there (with mixed specs it raises when the routed count does not
    fit the rows and is silently wrong when it does). Adapter state is frozen while the context is open: attach, load, delete,
    merge and unmerge raise ``RowsOpenError``; factors written in place or swapped through ``.data`` are
    re-packed on the next forward (packs kept between contexts key on storage + version counter: after a write
    in place through ``.data``, which changes neither, call ``clear_cache()``, which open contexts see too).
    While open, a forward pre-hook on ``model`` notes its batch size (see ``RowPlan.note_batch``). The previous
    plan (if nested) comes back after.
    The plan lives on the model's shared state: one ``per_row`` batch per model at a time (serialise threads)."""
    st = api.state(model)
    plan = RowPlan(st, rows, strategy)
    before = st.rows
    hook = model.register_forward_pre_hook(plan.note_batch, with_kwargs=True)
    st.rows = plan
    try:
        yield plan
    finally:
        st.rows = before
        hook.remove()
