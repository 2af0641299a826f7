"""``DeltawServer`` ties one base model, its tokenizer and an adapters directory to a scheduler and the HTTP app;
``ServerThread`` runs it under uvicorn on a background thread; ``load_base`` resolves ``--base``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import AdapterStore
from .app import create_app
from .errors import bad_request, server_error
from .metrics import Metrics
from .scheduler import Scheduler
from .settings import ServeSettings

log = logging.getLogger(__name__)

# A plain transcript format for tokenizers that ship no chat template (documented: clients see it as is).
FALLBACK_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")


def detect_kind(model: nn.Module) -> str:
    """'causal' for models that can ``generate`` (decoder LMs), else 'encoder'."""
    can = getattr(model, "can_generate", None)
    return "causal" if callable(can) and can() else "encoder"


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


class DeltawServer:
    """One base model serving many adapters. ``app`` is the ASGI app; ``start``/``stop`` run the scheduler
    (the app's lifespan calls them, so running ``app`` under any ASGI server is enough).

    The model must not be used by anyone else while the server runs: the scheduler thread owns it."""

    def __init__(self, model: nn.Module, tokenizer: Any, adapters_dir: str | os.PathLike | None = None,
                 settings: ServeSettings | None = None, *, kind: str | None = None) -> None:
        self.settings = settings or ServeSettings()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.kind = kind or detect_kind(model)
        self.base_name = self.settings.base_name
        self.created = int(time.time())
        self.metrics = Metrics(self.settings.max_batch_size)
        root = Path(adapters_dir) if adapters_dir is not None else None
        self.store = AdapterStore(model, root, self.settings.max_adapter_memory, self.metrics,
                                  reserved=(self.base_name,))
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size = int(getattr(embeddings, "num_embeddings", 0) or len(tokenizer))
        config = getattr(model, "config", None)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = _eos_ids(model, tokenizer)
        pad_id = pad if pad is not None else (eos[0] if eos else 0)
        self.scheduler = Scheduler(model, self.store, self.settings, self.metrics, kind=self.kind,
                                   eos_ids=eos if self.kind == "causal" else (), pad_id=pad_id)
        self.app = create_app(self)

    def start(self) -> None:
        if not self.scheduler.alive:
            self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation with the assistant's turn opened (the tokenizer's chat template, or a
        plain 'role: content' transcript when it has none). A template that refuses the conversation (its
        ``raise_exception(...)``, e.g. "System role not supported") is a 400 on ``messages`` with its message."""
        from jinja2 import TemplateError, TemplateSyntaxError

        template = None if getattr(self.tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     chat_template=template)
        except TemplateSyntaxError as exc:  # the server's template is broken: every request would fail
            raise server_error(f"the model's chat template is invalid: {exc}", code="invalid_chat_template") from None
        except TemplateError as exc:  # raise_exception(...) in the template: it refuses this conversation
            raise bad_request(f"the model's chat template refused these messages: {exc}", param="messages") from None
        if hasattr(ids, "keys") and "input_ids" in ids:  # transformers 5 may answer with a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]


class ServerThread:
    """Run a ``DeltawServer`` under uvicorn on a background thread, on an already-bound socket (no port race).

        with ServerThread(server) as url:          # http://127.0.0.1:<free port>
            httpx.get(url + "/health")
    """

    def __init__(self, server: DeltawServer, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        self.server, self.host, self.port, self.log_level = server, host, port, log_level
        self._uv: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._sock = sock
        config = uvicorn.Config(self.server.app, log_level=self.log_level, lifespan="on", access_log=False,
                                timeout_graceful_shutdown=5)
        self._uv = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [sock]}, name="deltaw-uvicorn",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        return self.url

    def stop(self, timeout: float = 15.0) -> None:
        if self._uv is not None:
            self._uv.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        self.server.stop()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _architectures(folder: Path) -> list[str]:
    try:
        return list(json.loads((folder / "config.json").read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return []


def load_base(base: str | None, kind: str = "auto", device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, str, str]:
    """Resolve ``--base``: None / 'smollm2' (embedded SmolLM2-135M-Instruct), 'minilm' (embedded MiniLM encoder),
    a .gguf file, or a local transformers folder. Returns (model, tokenizer, kind, default served name)."""
    from deltaw.models import CAUSAL_LM_NAMES, ENCODER_NAMES, load_causal_lm, load_encoder

    if kind not in ("auto", "causal", "encoder"):
        raise ValueError(f"kind must be auto, causal or encoder, got {kind!r}")
    if base is None or base.strip().lower() in CAUSAL_LM_NAMES:
        if kind == "encoder":
            raise ValueError("the embedded default base is a causal LM; pass --base minilm for an encoder")
        model, tok = load_causal_lm(None, device, dtype)
        return model, tok, "causal", "SmolLM2-135M-Instruct"
    if base.strip().lower() in ENCODER_NAMES:
        model, tok = load_encoder(None, device)
        return model, tok, "encoder", "all-MiniLM-L6-v2"
    path = Path(base).expanduser()
    if kind == "auto":
        archs = _architectures(path) if path.is_dir() else []
        causal = path.suffix.lower() == ".gguf" or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
        kind = "causal" if causal or not archs else "encoder"
    name = path.stem if path.is_file() else path.resolve().name
    if kind == "causal":
        model, tok = load_causal_lm(path, device, dtype)
    else:
        model, tok = load_encoder(path, device)
    return model, tok, kind, name


def run_server(server: DeltawServer, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM), on the calling thread."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level=log_level, lifespan="on",
                                  timeout_graceful_shutdown=10)).run()
