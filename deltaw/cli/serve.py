"""``deltaw serve``: an OpenAI-compatible HTTP server for one base model and a directory of adapters."""

from __future__ import annotations

import ipaddress
import logging
import math
import os
from pathlib import Path

import typer

from .errors import cli_errors

log = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")


def _parse_bytes(text: str) -> int:
    """'512MiB', '2G', '1048576' -> bytes (binary multiples for K/M/G, with or without 'iB')."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    if scale != 1:
        s = s[:-1]
    try:
        value = float(s) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # inf, nan, 1e400: int() would raise OverflowError / ValueError
        raise typer.BadParameter(f"not a byte size: {text!r} (a finite number, e.g. 268435456, 256MiB, 1G)")
    if value < 0:
        raise typer.BadParameter("a byte size cannot be negative")
    return int(value)


def _byte_option(option: str, text: str) -> int:
    """``_parse_bytes`` for a named option; a bad value is a ValueError naming it (one ``error:`` line, exit 2)."""
    try:
        return _parse_bytes(text)
    except typer.BadParameter as exc:
        raise ValueError(f"{option}: {exc.message}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_cmd(
    base: str | None = typer.Option(None, help="Base model: a transformers folder, a .gguf file, 'smollm2' "
                                               "(embedded default) or 'minilm' (embedded encoder)."),
    adapters: Path | None = typer.Option(None, help="Directory of PEFT adapter folders; a request's 'model' names "
                                                    "one of them (loaded on demand)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, help="Port to bind."),
    name: str | None = typer.Option(None, "--name", help="Model id of the base (default: its folder name)."),
    kind: str = typer.Option("auto", help="auto | causal (completions, chat) | encoder (embeddings)."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
    dtype: str = typer.Option("float32", help=f"Base weights dtype: {', '.join(_DTYPES)}."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    max_batch_size: int = typer.Option(32, help="Sequences decoded together per step."),
    max_wait_ms: float = typer.Option(5.0, help="How long an idle server waits to fill its first batch."),
    max_prefill_tokens: int = typer.Option(4096, help="Prompt tokens admitted into one prefill."),
    max_queue: int = typer.Option(1024, help="Queued sequences before 429."),
    batch_policy: str = typer.Option("mixed", help="mixed (any adapters per batch) | same-adapter (baseline)."),
    row_strategy: str = typer.Option("auto", help="deltaw.batching kernel: auto, reference, uniform, native, dense, "
                                                  "grouped or rowwise."),
    max_adapter_memory: str = typer.Option("1GiB", help="Budget for resident adapter tensors (LRU beyond it)."),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Largest max_tokens a request may ask for."),
    max_prompt_tokens: int = typer.Option(2048, help="Longest prompt, in tokens."),
    max_body_bytes: str = typer.Option("1MiB", help="Largest request body."),
    api_key: str | None = typer.Option(None, help="Require 'Authorization: Bearer KEY' (default: env "
                                                  "DELTAW_API_KEY; none = open)."),
    pin: list[str] = typer.Option([], help="Adapters to load and pin at start (repeatable)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve a base model and many adapters over HTTP (OpenAI API: /v1/completions, /v1/chat/completions,
    /v1/embeddings, /v1/models), batching requests for different adapters into the same forward steps."""
    import torch

    from deltaw.serve import APIError, DeltawServer, ServeSettings, load_base, run_server

    if dtype not in _DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {_DTYPES}")
    if adapters is not None and not adapters.is_dir():
        raise typer.BadParameter(f"--adapters {adapters} is not a directory")
    key = api_key if api_key is not None else os.environ.get("DELTAW_API_KEY") or None
    if not _is_loopback(host) and key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use and load adapters", host)
    if threads:
        torch.set_num_threads(threads)
    # A bad setting (an unknown --row-strategy or --batch-policy, a limit < 1, a byte size that is not one) is
    # refused here, before the model is loaded: one ``error:`` line, exit 2 (deltaw.cli.errors).
    with cli_errors():
        settings = ServeSettings(
            max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_prefill_tokens=max_prefill_tokens,
            max_queue=max_queue, batch_policy=batch_policy, row_strategy=row_strategy,
            max_adapter_memory=_byte_option("--max-adapter-memory", max_adapter_memory), max_tokens_limit=max_tokens,
            max_prompt_tokens=max_prompt_tokens, max_body_bytes=_byte_option("--max-body-bytes", max_body_bytes),
            api_key=key)
    # Loading is where a wrong --base, --kind or --device shows up (a missing folder, an unreadable .gguf, a
    # model of an unsupported kind); the server loop below stays outside, so a bug while serving keeps its trace.
    with cli_errors():
        model, tokenizer, resolved_kind, default_name = load_base(base, kind, device, getattr(torch, dtype))
        settings.base_name = name or default_name
        server = DeltawServer(model, tokenizer, adapters, settings, kind=resolved_kind)
    for adapter in pin:
        try:
            server.store.locate(adapter)
            server.store.load(adapter, pin=True)  # before the scheduler starts: safe on this thread
        except APIError as exc:
            raise typer.BadParameter(f"--pin {adapter}: {exc.message}") from None
    log.info("serving %s model %r with adapters from %s on http://%s:%d", resolved_kind, settings.base_name,
             adapters, host, port)
    run_server(server, host, port, log_level)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
