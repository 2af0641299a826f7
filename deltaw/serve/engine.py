"""The running batch of a continuous-batching decoder: one padded KV cache, one row per sequence, one adapter
spec per row.

Layout (why it is correct): the batch keeps a single HF ``DynamicCache`` whose rows are *right-aligned*: row i's
``len_i`` cached tokens occupy columns ``[L - len_i, L)`` and the columns to their left are padding (zeros,
masked out). Every decode step appends one column for every row, so the alignment survives the step, and the
model runs its ordinary batched path: a 2-D attention mask (1 on each row's own columns), explicit per-row
``position_ids`` (= ``len_i``, so RoPE / learned positions see each sequence's true positions) and the cache
object HF ``generate`` would use for a left-padded batch. The layout changes only between steps:

* admission: the new sequences are prefilled together (left-padded, their own adapters, ``logits_to_keep=1``),
  and their cache is concatenated to the running one along the batch axis after left-padding whichever is
  shorter, so both stay right-aligned;
* completion: finished rows are dropped with ``index_select`` and the leading columns no remaining row uses are
  trimmed, so ``L`` follows the longest live sequence rather than growing forever.

Each forward runs inside ``deltaw.batching.per_row(model, specs)`` with one spec per row, so each sequence sees
exactly its own adapter (or the base, ``None``) at every adapted layer. Masked padding and per-row positions
make a row's result independent of its neighbours up to floating-point summation order, which is why greedy
outputs equal offline ``model.generate`` with that adapter active (tested; see tests/serve).

Cost: like HF ``generate``, every step copies the cache once (``torch.cat`` per layer); admissions/completions
add one more copy. A paged/static cache would avoid that, at the price of a custom attention path per model.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltaw.batching import per_row
from deltaw.layers import native

from .errors import APIError

log = logging.getLogger(__name__)

Emit = Callable[[tuple], None]


@dataclass(eq=False)
class Seq:
    """One sequence to generate (a prompt x one choice). ``emit`` receives ("token", id), ("done", reason) or
    ("error", APIError); it is called on the scheduler thread and must not block."""

    prompt: list[int]
    adapter: str | None  # None: the base model
    max_tokens: int
    emit: Emit
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    label: str = "base"  # what metrics call it (the request's model name)
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False  # set from any thread (client gone, stop string seen); reaped between steps
    finished: str | None = None
    t_submit: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    generator: torch.Generator | None = None
    error: APIError | None = None  # set when this row alone failed (e.g. its sampling); reaped between steps

    @property
    def length(self) -> int:
        """Tokens in the cache once the pending (last generated) token has been fed."""
        return len(self.prompt) + len(self.generated)


def _kv_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise APIError(500, "this transformers version's DynamicCache has no .layers; deltaw serve needs "
                            "transformers >= 4.56", type="server_error", code="unsupported_model")
    return layers


class DecodeBatch:
    """The running rows, their right-aligned KV cache and the forward calls on them (scheduler thread only)."""

    # Decode with the "dense" per-row kernel while the batch's distinct adapters add up to at most this rank.
    DENSE_DECODE_MAX_RANK = 512

    def __init__(self, model: nn.Module, row_strategy: str = "auto", pad_id: int = 0) -> None:
        self.model = model
        self.row_strategy = row_strategy
        self._ranks: dict[str, tuple[int, int]] = {}  # adapter -> (id of its AdapterInfo, largest rank)
        self.pad_id = pad_id
        self.rows: list[Seq] = []
        self.cache: Any = None
        self.L = 0  # columns in the cache
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self._rows_ctx: contextlib.ExitStack | None = None
        self._rows_key: tuple | None = None
        self.device = next(model.parameters()).device
        # (the per-row native kernel takes fp32 CPU factors; loaded adapters get the base's dtype, fp32 kept fp32)
        self._native_decode = (self.device.type == "cpu" and next(model.parameters()).dtype == torch.float32
                               and native.kernel() is not None)
        self.max_positions = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 0)

    # ---- per-row adapter context (kept open while the row specs do not change) ---------------------------
    def _strategy(self, specs: Sequence[str | None], decode: bool) -> str:
        """The per-row kernel. ``auto`` lets deltaw.batching choose per layer. On an fp32 CPU model with the native
        kernel library it picks ``native`` for decode, which reads each needed adapter in place and packs nothing,
        so rows joining and leaving cost nothing (benchmarks/serve_load.py, mixed mode, 8 layers, 50 rank-8
        adapters, 100 clients, 3 runs each: 127 tok/s median against 120 with "dense"). Elsewhere (a GPU, half
        precision) decode steps of a batch whose distinct adapters are small in total rank use "dense" (all
        distinct adapters concatenated along r, a per-row mask): its pack is one concatenation, while the per-row
        copies ``auto`` prefers there for many adapters must be rebuilt whenever a row joins or leaves, which in
        continuous batching is most steps (measured ~35% faster decode under churn, rank 8, 50 adapters)."""
        if self.row_strategy != "auto" or not decode or self._native_decode:
            return self.row_strategy
        st = self.model.__dict__["_deltaw_state"]
        total = 0
        for name in {s for s in specs if s is not None}:
            info = st.adapters[name]
            cached = self._ranks.get(name)
            if cached is None or cached[0] != id(info):
                cached = self._ranks[name] = (id(info), max(info.config.rank_for(p) for p in info.modules))
            total += cached[1]
        return "dense" if total <= self.DENSE_DECODE_MAX_RANK else "auto"

    def _use_rows(self, specs: Sequence[str | None], decode: bool) -> None:
        key = (tuple(specs), decode)
        if key == self._rows_key and self._rows_ctx is not None:
            return
        self.close_rows()
        if "_deltaw_state" not in self.model.__dict__:
            return  # no adapter was ever loaded: every row is the base model
        stack = contextlib.ExitStack()
        stack.enter_context(per_row(self.model, list(specs), strategy=self._strategy(specs, decode)))
        self._rows_ctx, self._rows_key = stack, key

    def close_rows(self) -> None:
        """Leave the per-row context (before adapters are loaded or deleted, and when the rows change)."""
        if self._rows_ctx is not None:
            self._rows_ctx.close()
        self._rows_ctx, self._rows_key = None, None

    # ---- forward -------------------------------------------------------------------------------------------
    def _forward(self, specs: Sequence[str | None], cache: Any, decode: bool, **inputs: torch.Tensor) -> torch.Tensor:
        self._use_rows(specs, decode)
        kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = 1
        with torch.inference_mode():
            out = self.model(**inputs, **kwargs)
        return out.logits[:, -1, :]

    def prefill(self, seqs: Sequence[Seq]) -> tuple[torch.Tensor, Any]:
        """Run the new sequences' prompts together (left-padded). Returns last-position logits (n, V) and their
        cache, to be joined to the batch with ``join`` once their first tokens are chosen."""
        from transformers import DynamicCache

        T = max(len(s.prompt) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        pos = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            n = len(s.prompt)
            ids[i, T - n:] = torch.tensor(s.prompt, dtype=torch.long)
            mask[i, T - n:] = 1
            pos[i, T - n:] = torch.arange(n)
        config = getattr(self.model, "config", None)
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
        logits = self._forward([s.adapter for s in seqs], cache, False, input_ids=ids.to(self.device),
                               attention_mask=mask.to(self.device), position_ids=pos.to(self.device))
        for layer in _kv_layers(cache):
            if getattr(layer, "is_sliding", False):
                raise APIError(500, "continuous batching supports full-attention KV caches only (this model uses "
                                    "sliding-window layers)", type="server_error", code="unsupported_model")
        return logits, cache

    def join(self, seqs: Sequence[Seq], cache: Any) -> None:
        """Append prefilled sequences (with their cache of T columns) to the running rows."""
        T = cache.get_seq_length()
        if not self.rows:
            self.rows, self.cache, self.L = list(seqs), cache, T
            return
        if T < self.L:
            self._pad_left(cache, self.L - T)
        elif T > self.L:
            self._pad_left(self.cache, T - self.L)
            self.L = T
        for mine, theirs in zip(_kv_layers(self.cache), _kv_layers(cache)):
            if not getattr(mine, "is_initialized", True) or not getattr(theirs, "is_initialized", True):
                continue  # KV-sharing layers hold nothing
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.rows.extend(seqs)

    def decode(self) -> torch.Tensor:
        """One step for every row: feed each row's last token at its own position. Returns logits (B, V)."""
        B, L = len(self.rows), self.L
        lens = torch.tensor([s.length - 1 for s in self.rows], dtype=torch.long)  # cached tokens per row
        ids = torch.tensor([[s.generated[-1]] for s in self.rows], dtype=torch.long)
        cols = torch.arange(L + 1)
        mask = (cols[None, :] >= (L - lens)[:, None]).long()  # own columns + the new one
        pos = lens[:, None]
        logits = self._forward([s.adapter for s in self.rows], self.cache, True, input_ids=ids.to(self.device),
                               attention_mask=mask.to(self.device), position_ids=pos.to(self.device))
        self.L += 1
        return logits

    def keep(self, keep: Sequence[int]) -> None:
        """Keep only these row indices; trim leading columns no remaining row needs.

        The kept rows are also grouped by adapter (a stable sort, free: the cache is copied here anyway), so the
        per-row kernels' packs, keyed on the adapters in order of first appearance, are found again more often."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.reset()
            return
        keep = sorted(keep, key=lambda i: self.rows[i].adapter or "")
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        longest = max(s.length - 1 for s in self.rows)  # the pending token of each row is not cached yet
        drop = self.L - longest
        for layer in _kv_layers(self.cache):
            if not getattr(layer, "is_initialized", True):
                continue
            k, v = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
            if drop > 0:
                k, v = k[:, :, drop:, :], v[:, :, drop:, :]
            layer.keys, layer.values = k, v
        self.L -= max(drop, 0)

    def reset(self) -> None:
        self.rows, self.cache, self.L = [], None, 0
        self.close_rows()

    @staticmethod
    def _pad_left(cache: Any, n: int) -> None:
        for layer in _kv_layers(cache):
            if not getattr(layer, "is_initialized", True):
                continue
            k, v = layer.keys, layer.values
            layer.keys = torch.cat([k.new_zeros(k.shape[0], k.shape[1], n, k.shape[3]), k], dim=2)
            layer.values = torch.cat([v.new_zeros(v.shape[0], v.shape[1], n, v.shape[3]), v], dim=2)


def choose_tokens(logits: torch.Tensor, seqs: Sequence[Seq]) -> list[int | Exception]:
    """Greedy rows: argmax (what ``generate(do_sample=False)`` does). Sampling rows: temperature + top-p with the
    sequence's own generator, so a seeded request is reproducible whatever it is batched with.

    Rows are independent: a row whose sampling fails (non-finite logits) gets its exception in its place in the
    returned list, and every other row still gets its token."""
    greedy = logits.argmax(dim=-1).tolist()
    sampled = [i for i, s in enumerate(seqs) if s.temperature > 0.0]
    # One device-to-host copy for all sampling rows; float32 first (bf16/fp16 logits), float64 in sample_token.
    host = logits[sampled].float().cpu() if sampled else None
    out: list[int | Exception] = [int(g) for g in greedy]
    for j, i in enumerate(sampled):
        try:
            out[i] = sample_token(host[j], seqs[i])  # type: ignore[index]
        except Exception as exc:  # this row only: its neighbours' tokens are unaffected
            out[i] = exc
    return out


def sample_token(logits: torch.Tensor, s: Seq) -> int:
    """Sample one token from a row of logits at ``s.temperature`` (> 0) and ``s.top_p`` with ``s``'s generator.

    Numerically safe for any positive temperature: the max logit is subtracted before dividing, so every scaled
    logit is <= 0 (the max is exactly 0, exp cannot overflow and the softmax sum is >= 1), and the division runs in
    float64 (no overflow to inf for temperatures down to the smallest double). A temperature far below the gaps
    between the top logits therefore picks the argmax, as greedy does (at random among exact ties). Only
    non-finite logits (NaN, +inf) cannot be sampled: ValueError."""
    x = logits.detach().to(device="cpu", dtype=torch.float64)
    top = x.max()
    if not torch.isfinite(top) or torch.isnan(x).any():
        raise ValueError("the model's logits for this sequence are not finite (NaN or +inf); cannot sample")
    probs = torch.softmax((x - top) / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cumulative = sorted_p.cumsum(0)
        cut = cumulative - sorted_p > s.top_p  # drop tokens once the mass before them exceeds top_p
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    if s.generator is None:
        s.generator = torch.Generator(device="cpu")
        if s.seed is not None:
            s.generator.manual_seed(s.seed)
        else:
            s.generator.seed()
    return int(torch.multinomial(probs, 1, generator=s.generator).item())


def embed(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, specs: Sequence[str | None],
          row_strategy: str = "auto", normalize: bool = True) -> torch.Tensor:
    """Mean-pooled (over the attention mask) last hidden states, one adapter spec per row; L2-normalised by
    default (the sentence-transformers recipe all-MiniLM-L6-v2 was trained for)."""
    ctx = (per_row(model, list(specs), strategy=row_strategy) if "_deltaw_state" in model.__dict__
           else contextlib.nullcontext())
    with ctx, torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.float()

