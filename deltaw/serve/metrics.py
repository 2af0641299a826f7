"""A small Prometheus text-format (0.0.4) registry: counters, gauges and histograms with labels.

Why not ``prometheus_client``: it is one more dependency for ~100 lines, and the server needs only the text
exposition. Thread-safe: the scheduler thread and the event loop both record.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str] | None) -> LabelValues:
        labels = labels or {}
        if set(labels) != set(self.labels):
            raise ValueError(f"metric {self.name} takes labels {self.labels}, got {sorted(labels)}")
        return tuple(str(labels[k]) for k in self.labels)

    def _labelstr(self, values: LabelValues, extra: tuple[tuple[str, str], ...] = ()) -> str:
        pairs = list(zip(self.labels, values)) + list(extra)
        if not pairs:
            return ""
        return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labels:
            items = [((), 0.0)]
        return self.header() + [f"{self.name}{self._labelstr(k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (),
                 fn: Callable[[], float] | None = None) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {}
        self._fn = fn  # computed at scrape time (unlabelled gauges only)

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def render(self) -> list[str]:
        if self._fn is not None:
            return self.header() + [f"{self.name} {_fmt(self._fn())}"]
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labels:
            items = [((), 0.0)]
        return self.header() + [f"{self.name}{self._labelstr(k)} {_fmt(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help, ())
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
                    break
            self._sum += value
            self._count += 1

    def snapshot(self) -> tuple[int, float]:
        with self._lock:
            return self._count, self._sum

    def render(self) -> list[str]:
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        lines = self.header()
        running = 0
        for bound, c in zip(self.buckets, counts):
            running += c
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {running}')
        lines += [f"{self.name}_sum {_fmt(total)}", f"{self.name}_count {count}"]
        return lines


class RateWindow:
    """Events per second over the last ``window`` seconds (e.g. generated tokens/s), for a gauge."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._events: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, amount: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._events.append((now, amount))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(a for _, a in self._events) / self.window


class Metrics:
    """Every metric the server exports. Names follow Prometheus conventions (``_total`` counters, base units)."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.requests = Counter("deltaw_requests_total", "HTTP API requests answered, by endpoint and status code",
                                ("endpoint", "status"))
        self.adapter_requests = Counter("deltaw_adapter_requests_total",
                                        "Generation/embedding requests by the model (adapter or base) they named",
                                        ("adapter",))
        self.adapter_tokens = Counter("deltaw_adapter_generated_tokens_total", "Generated tokens by adapter",
                                      ("adapter",))
        self.prompt_tokens = Counter("deltaw_prompt_tokens_total", "Prompt tokens prefilled")
        self.generated_tokens = Counter("deltaw_generated_tokens_total", "Tokens generated")
        self.token_rate = RateWindow(10.0)
        self.tokens_per_second = Gauge("deltaw_tokens_per_second", "Generated tokens per second over the last 10 s",
                                       fn=self.token_rate.rate)
        self.decode_steps = Counter("deltaw_decode_steps_total", "Batched decode forward passes")
        self.prefills = Counter("deltaw_prefill_batches_total", "Batched prefill forward passes")
        self.batch_rows = Histogram("deltaw_batch_rows", "Sequences per decode step",
                                    [1, 2, 4, 8, 16, 32, 64, 128, 256])
        self.batch_adapters = Histogram("deltaw_batch_distinct_adapters", "Distinct adapters per decode step",
                                        [1, 2, 4, 8, 16, 32, 64])
        self.occupancy = Gauge("deltaw_batch_occupancy_ratio",
                               "Mean rows per decode step / max batch size, since start", fn=self._occupancy)
        self.running = Gauge("deltaw_running_sequences", "Sequences in the running batch")
        self.queued = Gauge("deltaw_queued_sequences", "Sequences waiting for admission")
        self.cache_hits = Counter("deltaw_adapter_cache_hits_total", "Admissions whose adapter was resident")
        self.cache_misses = Counter("deltaw_adapter_cache_misses_total", "Admissions that had to load their adapter")
        self.cache_evictions = Counter("deltaw_adapter_cache_evictions_total",
                                       "Adapters evicted (LRU) to stay under the memory budget")
        self.adapter_loads = Counter("deltaw_adapter_loads_total", "Adapter loads, by result", ("result",))
        self.adapter_unloads = Counter("deltaw_adapter_unloads_total", "Adapters unloaded on request")
        self.adapter_memory = Gauge("deltaw_adapter_memory_bytes", "Bytes of resident adapter tensors")
        self.adapter_budget = Gauge("deltaw_adapter_memory_budget_bytes", "Adapter memory budget")
        self.adapters_resident = Gauge("deltaw_adapters_resident", "Resident adapters")
        self.pack_bytes = Gauge("deltaw_row_pack_cache_bytes",
                                "Bytes of per-row kernel packs deltaw.batching keeps between batches",
                                fn=self._pack_bytes)
        self.ttft = Histogram("deltaw_time_to_first_token_seconds", "Queueing + prefill time until the first token",
                              [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])
        self.latency = Histogram("deltaw_request_duration_seconds", "Time from admission request to last token",
                                 [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120])
        self.all: list[_Metric] = [
            self.requests, self.adapter_requests, self.adapter_tokens, self.prompt_tokens, self.generated_tokens,
            self.tokens_per_second, self.decode_steps, self.prefills, self.batch_rows, self.batch_adapters,
            self.occupancy, self.running, self.queued, self.cache_hits, self.cache_misses, self.cache_evictions,
            self.adapter_loads, self.adapter_unloads, self.adapter_memory, self.adapter_budget,
            self.adapters_resident, self.pack_bytes, self.ttft, self.latency]
        self._last_pack_bytes = 0.0

    def _occupancy(self) -> float:
        count, total = self.batch_rows.snapshot()
        return (total / count) / self.max_batch_size if count else 0.0

    def _pack_bytes(self) -> float:
        try:
            from deltaw.batching import cache_nbytes
        except ImportError:  # an older deltaw.batching without the helper
            return 0.0
        try:
            self._last_pack_bytes = float(cache_nbytes())
        except RuntimeError:  # the scheduler thread changed the cache while we read it: report the last value
            pass
        return self._last_pack_bytes

    def record_tokens(self, adapter: str, n: int) -> None:
        self.generated_tokens.inc(n)
        self.adapter_tokens.inc(n, adapter=adapter)
        self.token_rate.add(n)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.all:
            lines += metric.render()
        return "\n".join(lines) + "\n"
