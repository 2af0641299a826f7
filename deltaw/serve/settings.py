"""Server settings: every limit in one validated dataclass, shared by the CLI, the app and the scheduler."""

from __future__ import annotations

from dataclasses import dataclass

from deltaw.batching import STRATEGIES

POLICIES = ("mixed", "same-adapter")


@dataclass
class ServeSettings:
    """Knobs of ``deltaw serve``. Defaults suit a CPU box; every limit is answered with a 4xx when exceeded.

    ``batch_policy``: "mixed" batches any adapters together (per-row adapters, the point of this server);
    "same-adapter" only batches requests for one adapter at a time (the classic approach, kept as a baseline).
    ``max_batch_size=1`` serves strictly one sequence at a time."""

    max_batch_size: int = 32  # sequences decoded together in one step
    max_wait_ms: float = 5.0  # an idle server waits this long for more requests to fill its first batch
    max_prefill_tokens: int = 4096  # prompt tokens admitted into one prefill forward (at least one sequence)
    max_queue: int = 1024  # queued sequences before new requests get 429 (a request holding more: 400)
    batch_policy: str = "mixed"
    row_strategy: str = "auto"  # deltaw.batching kernel choice, one of deltaw.batching.STRATEGIES
    max_adapter_memory: int = 1 << 30  # bytes of adapter tensors kept resident (LRU beyond that)
    max_tokens_limit: int = 1024  # largest max_tokens a request may ask for
    default_max_tokens: int = 16  # OpenAI's legacy completions default
    max_prompt_tokens: int = 2048
    max_body_bytes: int = 1 << 20
    max_n: int = 8  # choices per prompt
    max_prompts: int = 64  # prompts in one /v1/completions or inputs in one /v1/embeddings request
    api_key: str | None = None
    base_name: str = "base"
    normalize_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.batch_policy not in POLICIES:
            raise ValueError(f"batch_policy must be one of {POLICIES}, got {self.batch_policy!r}")
        if self.row_strategy not in STRATEGIES:  # else every request touching an adapter would fail with a 500
            raise ValueError(f"row_strategy must be one of {', '.join(STRATEGIES)}, got {self.row_strategy!r}")
        for field in ("max_batch_size", "max_prefill_tokens", "max_queue", "max_tokens_limit", "default_max_tokens",
                      "max_prompt_tokens", "max_body_bytes", "max_n", "max_prompts"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.max_wait_ms < 0 or self.max_adapter_memory < 0:
            raise ValueError("max_wait_ms and max_adapter_memory must be >= 0")
        if self.default_max_tokens > self.max_tokens_limit:
            self.default_max_tokens = self.max_tokens_limit
        if self.api_key is not None and not self.api_key:
            self.api_key = None
