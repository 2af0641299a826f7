"""The scheduler: one thread that owns the model and runs continuous batching over every adapter at once.

Loop (one iteration = one model step):

1. run queued admin commands (load / unload / pin), which mutate the model, between forward passes;
2. admit queued sequences while there is room (``max_batch_size`` rows, ``max_prefill_tokens`` prompt tokens):
   each admission takes a reference on its adapter, loading it on demand (LRU under the memory budget). When
   nothing is running, wait up to ``max_wait_ms`` for more requests so the first batch is not a batch of one;
   when sequences are running, admit whatever is queued without waiting (their decode must not stall);
3. prefill the admitted sequences together (left-padded, one adapter per row), choose their first tokens and
   join them to the running batch (see ``engine.DecodeBatch`` for the cache layout);
4. decode one token for every running row, in one forward with per-row adapters;
5. reap rows that finished (EOS, max_tokens, context full) or were cancelled (client gone, stop string), release
   their adapter references (an adapter being unloaded is deleted when its last reference goes).

A failure inside a forward fails only the sequences of that forward (500), and the loop continues; a failure to
sample one row's token fails only that row; a failing adapter load fails only the sequences that named it (422).
``batch_policy="same-adapter"`` restricts a batch to one adapter (the usual LoRA-server approach), kept as the
baseline the load benchmark compares against.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import AdapterStore, Draining, Wait
from .engine import DecodeBatch, Seq, choose_tokens, embed
from .errors import APIError, adapter_load_failed, bad_request, overloaded, server_error
from .metrics import Metrics
from .settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class EmbedJob:
    """One input of an embeddings request. ``emit`` receives ("embedding", list[float]) or ("error", APIError)."""

    ids: list[int]
    adapter: str | None
    emit: Callable[[tuple], None]
    label: str = "base"
    cancelled: bool = False
    t_submit: float = field(default_factory=time.monotonic)


class Scheduler:
    """Owns ``model`` on its own thread; other threads talk to it through ``submit`` and ``call``."""

    def __init__(self, model: nn.Module, store: AdapterStore, settings: ServeSettings, metrics: Metrics, *,
                 kind: str = "causal", eos_ids: Sequence[int] = (), pad_id: int = 0) -> None:
        if kind not in ("causal", "encoder"):
            raise ValueError(f"kind must be 'causal' or 'encoder', got {kind!r}")
        self.model, self.store, self.settings, self.metrics, self.kind = model, store, settings, metrics, kind
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.batch = DecodeBatch(model, settings.row_strategy, pad_id)
        self.pad_id = pad_id
        self._queue: deque[Any] = deque()
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.last_error: str | None = None

    # ---- any thread ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deltaw-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, items: Sequence[Seq | EmbedJob], param: str = "n") -> None:
        """Queue sequences (all or none: a request never half-enters).

        A request holding more sequences than the queue can ever hold is a 400 naming ``param`` (retrying it, as
        SDKs do on 429, could never succeed); one that does not fit *now* is a 429 (retry later)."""
        limit = self.settings.max_queue
        if len(items) > limit:
            what = "inputs" if param == "input" else "sequences (prompts x n)"
            raise bad_request(f"this request holds {len(items)} {what}; this server queues at most {limit} "
                              "(--max-queue), so it can never be accepted: send fewer", param=param)
        with self._cond:
            if self._stop:
                raise overloaded("the server is shutting down", code="shutting_down")
            # (entries whose clients went away do not count: the scheduler answers and drops them next step)
            queued = sum(not x.cancelled for x in self._queue)
            if queued + len(items) > self.settings.max_queue:
                raise APIError(429, f"too many queued sequences ({queued}; limit {self.settings.max_queue})"
                                    "; retry later", type="rate_limit_error", code="queue_full")
            self._queue.extend(items)
            self.metrics.queued.set(len(self._queue))
            self._cond.notify_all()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the scheduler thread between steps (adapter admin), returning its future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stop:
                fut.set_exception(overloaded("the server is shutting down", code="shutting_down"))
                return fut
            self._commands.append((fn, fut))
            self._cond.notify_all()
        return fut

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    # ---- scheduler thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        log.info("scheduler started (%s model, max batch %d, policy %s)", self.kind, self.settings.max_batch_size,
                 self.settings.batch_policy)
        while True:
            try:
                if not self._iteration():
                    break
            except Exception as exc:  # never let the loop die: fail what was running and carry on
                log.exception("scheduler iteration failed")
                self.last_error = repr(exc)
                self._fail_running(server_error(f"internal error during generation: {exc}"))
        self._shutdown()

    def _iteration(self) -> bool:
        with self._cond:
            if self._stop:
                return False
            if not self._queue and not self._commands and not self.batch.rows:
                self._cond.wait(0.5)
                return True
            if not self.batch.rows and self._queue and not self._commands and self.settings.max_wait_ms > 0:
                deadline = self._queue[0].t_submit + self.settings.max_wait_ms / 1e3
                while (len(self._queue) < self.settings.max_batch_size and not self._stop and not self._commands
                       and (left := deadline - time.monotonic()) > 0):
                    self._cond.wait(left)
            commands = list(self._commands)
            self._commands.clear()
        for fn, fut in commands:
            self._run_command(fn, fut)
        self._drop_cancelled()  # (every step: ``_take`` may stop before reaching them, e.g. behind a Wait)
        if self.kind == "encoder":
            progressed = self._embed_step()
        else:
            progressed = self._admit()
            if self.batch.rows:
                self._decode_step()
                progressed = True
        if not progressed and not commands:
            with self._cond:  # queued work that cannot start yet (e.g. its adapter is draining): do not spin
                if not self._stop and not self._commands:
                    self._cond.wait(0.05)
        self.metrics.running.set(len(self.batch.rows))
        self.metrics.queued.set(self.queue_depth())
        return True

    def _run_command(self, fn: Callable[[], Any], fut: concurrent.futures.Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        self.batch.close_rows()  # the model's adapters may change
        try:
            fut.set_result(fn())
        except BaseException as exc:
            fut.set_exception(exc)

    def _take(self, limit: int, tokens_of: Callable[[Any], int]) -> list[Any]:
        """Pop admissible queued items in FIFO order, acquiring their adapters. Items whose adapter cannot be
        made resident yet stay queued; items whose adapter is broken are failed here."""
        with self._cond:
            candidates = list(self._queue)
        chosen: list[Any] = []
        gone: list[Any] = []
        budget = self.settings.max_prefill_tokens
        only: tuple[str | None] | None = None
        if self.settings.batch_policy == "same-adapter" and self.batch.rows:
            only = (self.batch.rows[0].adapter,)
        for item in candidates:
            if len(chosen) >= limit:
                break
            if item.cancelled:
                gone.append(item)
                item.emit(("done", "cancelled"))
                continue
            if only is not None and item.adapter != only[0]:
                continue
            cost = tokens_of(item)
            if chosen and cost > budget:
                continue
            if item.adapter is not None:
                if item.adapter not in self.store.resident_names():
                    self.batch.close_rows()  # loading mutates the model
                try:
                    self.store.acquire(item.adapter)
                except Draining:
                    continue  # stays queued; no budget is involved, so the requests behind it go on
                except Wait:
                    break  # FIFO: admit nothing behind it, so running rows drain and free the budget
                except APIError as exc:
                    gone.append(item)
                    item.emit(("error", exc))
                    continue
                except Exception as exc:  # anything else a load can raise fails this item, not the loop
                    log.exception("loading adapter %r failed", item.adapter)
                    gone.append(item)
                    item.emit(("error", adapter_load_failed(item.adapter, repr(exc))))
                    continue
            if not self._heads_compatible([*self.batch.rows, *chosen, item]):
                if item.adapter is not None:
                    self.store.release(item.adapter)
                break  # needs another modules_to_save copy than the running rows: wait for them to drain
            if only is None and self.settings.batch_policy == "same-adapter":
                only = (item.adapter,)
            chosen.append(item)
            budget -= cost
        if chosen or gone:
            drop = {id(x) for x in chosen} | {id(x) for x in gone}
            with self._cond:
                self._queue = deque(x for x in self._queue if id(x) not in drop)
        return chosen

    def _drop_cancelled(self) -> None:
        """Answer and drop queued items whose clients went away."""
        with self._cond:
            gone = [x for x in self._queue if x.cancelled]
            if gone:
                self._queue = deque(x for x in self._queue if not x.cancelled)
        for item in gone:
            item.emit(("done", "cancelled"))

    def _heads_compatible(self, items: Sequence[Any]) -> bool:
        """Rows of one batch must share every modules_to_save copy (e.g. a retrained lm_head); adapters without
        saved modules always fit. Checked with the plan ``per_row`` itself would build."""
        st = self.model.__dict__.get("_deltaw_state")
        if st is None or not st.saved_modules:
            return True
        from deltaw.batching import MixedHeadsError, RowPlan

        try:
            RowPlan(st, [x.adapter for x in items])
        except MixedHeadsError:
            return False
        return True

    def _admit(self) -> bool:
        room = self.settings.max_batch_size - len(self.batch.rows)
        if room <= 0:
            return False
        seqs: list[Seq] = self._take(room, lambda s: len(s.prompt))
        if not seqs:
            return False
        self._prefill(seqs)
        return True

    def _prefill(self, seqs: list[Seq]) -> None:
        """Prefill and join ``seqs``. If the batched prefill fails, each sequence is retried alone (a prefill
        works on a fresh cache, so this is safe), so that only the sequence that really fails gets the error; each
        sequence's sampling generator is first put back as it was, so that a seeded sequence draws the same
        tokens as if the failed attempt had never happened. A row whose sampling alone fails is failed alone."""
        generators = [(s, None if s.generator is None else s.generator.get_state()) for s in seqs]
        try:
            logits, cache = self.batch.prefill(seqs)
            tokens = choose_tokens(logits, seqs)
        except Exception as exc:
            for s, state in generators:  # the failed attempt may have drawn from them already
                if state is None:
                    s.generator = None
                else:
                    s.generator.set_state(state)  # type: ignore[union-attr]
            if len(seqs) > 1:
                log.warning("prefill of %d sequences failed (%s); retrying them one by one", len(seqs), exc)
                for s in seqs:
                    self._prefill([s])
                return
            log.exception("prefill failed (model %r)", seqs[0].label)
            self._finish(seqs[0], error=exc if isinstance(exc, APIError) else server_error(f"prefill failed: {exc}"))
            return
        self.metrics.prefills.inc()
        self.metrics.prompt_tokens.inc(sum(len(s.prompt) for s in seqs))
        now = time.monotonic()
        for s, t in zip(seqs, tokens):
            if isinstance(t, Exception):
                self._row_failed(s, t)  # joined with the others, then reaped below: its row leaves the cache
                continue
            s.t_first = now
            self.metrics.ttft.observe(now - s.t_submit)
            self._accept(s, t)
        try:
            self.batch.join(seqs, cache)
        except Exception as exc:  # the running cache may be half-changed: fail the new and the running rows
            log.exception("joining %d sequence(s) to the running batch failed", len(seqs))
            for s in seqs:
                self._finish(s, error=server_error(f"could not join the running batch: {exc}"))
            raise
        self._reap()

    def _decode_step(self) -> None:
        self._reap()  # drop cancelled rows before paying for them
        if not self.batch.rows:
            return
        rows = self.batch.rows
        try:
            logits = self.batch.decode()
            tokens = choose_tokens(logits, rows)
        except Exception as exc:  # the shared forward failed: the cache cannot be trusted, every row fails
            log.exception("decode step over %d rows failed", len(rows))
            self._fail_running(exc if isinstance(exc, APIError) else server_error(f"decode failed: {exc}"))
            return
        self.steps += 1
        self.metrics.decode_steps.inc()
        self.metrics.batch_rows.observe(len(rows))
        self.metrics.batch_adapters.observe(len({s.adapter for s in rows}))
        for s, t in zip(rows, tokens):
            if isinstance(t, Exception):
                self._row_failed(s, t)  # this row only; the others keep their token and their cache rows
            else:
                self._accept(s, t)
        self._reap()

    @staticmethod
    def _row_failed(s: Seq, exc: Exception) -> None:
        """Mark one row failed (its sampling raised); ``_reap`` answers it and drops its row from the cache."""
        log.error("sampling failed for one sequence (model %r): %s", s.label, exc)
        s.error = exc if isinstance(exc, APIError) else server_error(f"sampling failed: {exc}")

    def _accept(self, s: Seq, token: int) -> None:
        """Record a chosen token: EOS finishes without being emitted; max_tokens / context length finish after."""
        if token in self.eos_ids:
            s.generated.append(token)  # fed nowhere: the row is reaped before the next step
            s.finished = "stop"
            return
        s.generated.append(token)
        s.emit(("token", token))
        self.metrics.record_tokens(s.label, 1)
        limit = self.batch.max_positions
        if len(s.generated) >= s.max_tokens or (limit and s.length >= limit):
            s.finished = "length"

    def _reap(self) -> None:
        keep: list[int] = []
        for i, s in enumerate(self.batch.rows):
            if s.error is not None:
                self._finish(s, error=s.error)
            elif s.finished is not None or s.cancelled:
                self._finish(s, reason=s.finished or "cancelled")
            else:
                keep.append(i)
        self.batch.keep(keep)

    def _finish(self, s: Seq | EmbedJob, reason: str | None = None, error: APIError | None = None) -> None:
        if s.adapter is not None:
            if self.store.is_draining(s.adapter):
                self.batch.close_rows()  # the release below deletes the adapter from the model
            self.store.release(s.adapter)
        if error is not None:
            s.emit(("error", error))
        else:
            s.emit(("done", reason))
            self.metrics.latency.observe(time.monotonic() - s.t_submit)

    def _fail_running(self, error: BaseException) -> None:
        api_error = error if isinstance(error, APIError) else server_error(str(error))
        rows = list(self.batch.rows)
        self.batch.reset()
        for s in rows:
            self._finish(s, error=api_error)

    # ---- encoders: one forward per batch of embedding inputs -----------------------------------------------
    def _embed_step(self) -> bool:
        jobs: list[EmbedJob] = self._take(self.settings.max_batch_size, lambda j: len(j.ids))
        if not jobs:
            return False
        try:
            T = max(len(j.ids) for j in jobs)
            ids = torch.full((len(jobs), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(jobs), T), dtype=torch.long)
            for i, j in enumerate(jobs):
                ids[i, :len(j.ids)] = torch.tensor(j.ids, dtype=torch.long)
                mask[i, :len(j.ids)] = 1
            device = next(self.model.parameters()).device
            vectors = embed(self.model, ids.to(device), mask.to(device), [j.adapter for j in jobs],
                            self.settings.row_strategy, self.settings.normalize_embeddings).cpu()
        except Exception as exc:
            log.exception("embedding batch of %d failed", len(jobs))
            error = exc if isinstance(exc, APIError) else server_error(f"embedding failed: {exc}")
            for j in jobs:
                self._finish(j, error=error)
            return True
        self.metrics.prefills.inc()
        self.metrics.prompt_tokens.inc(sum(len(j.ids) for j in jobs))
        self.metrics.batch_rows.observe(len(jobs))
        self.metrics.batch_adapters.observe(len({j.adapter for j in jobs}))
        for j, v in zip(jobs, vectors):
            j.emit(("embedding", v.tolist()))
            self._finish(j, reason="stop")
        return True

    def _shutdown(self) -> None:
        error = overloaded("the server is shutting down", code="shutting_down")
        self._fail_running(error)
        with self._cond:
            queued, self._queue = list(self._queue), deque()
            commands, self._commands = list(self._commands), deque()
        for item in queued:
            item.emit(("error", error))
        for _, fut in commands:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(error)
        log.info("scheduler stopped")
