"""The HTTP surface: OpenAI-compatible routes, adapter admin, health and metrics, on FastAPI.

Routes (all JSON; errors as ``{"error": {"message", "type", "param", "code"}}``):

    POST   /v1/completions          causal base; ``model`` = base name or adapter name; SSE with "stream": true
    POST   /v1/chat/completions     same, prompt built with the tokenizer's chat template
    POST   /v1/embeddings           encoder base (mean-pooled, L2-normalised)
    GET    /v1/models[/{id}]        the base and every adapter under --adapters (with loaded/pinned state)
    GET    /v1/adapters             resident adapters, bytes, pins, in-flight counts, the budget
    POST   /v1/adapters             {"name": ..., "pin": true|false}: load now (and pin / unpin)
    DELETE /v1/adapters/{name}      unload (after in-flight sequences finish)
    GET    /health                  liveness (never needs the key)
    GET    /metrics                 Prometheus text format

The event loop only parses, tokenises and streams; all model work happens on the scheduler thread, which reports
back through ``loop.call_soon_threadsafe`` into one asyncio queue per request.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .engine import Seq
from .errors import APIError, bad_request
from .scheduler import EmbedJob

if TYPE_CHECKING:
    from .server import DeltawServer

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})
# How often a non-streaming request asks whether its client is still there while tokens keep arriving (a row of a
# gone client holds its batch slot and its adapter until max_tokens otherwise).
DISCONNECT_CHECK_S = 0.25
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/adapters", "/health",
              "/metrics")


def _endpoint_label(path: str) -> str:
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


def _error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class GuardMiddleware:
    """Pure ASGI middleware, outermost: counts every answer, checks the bearer token, caps the body size.

    The body is read here (up to the limit) and replayed to the app, so an oversized or endless chunked body is
    refused with 413 before any JSON parsing, and a missing key is refused before the body is even read."""

    def __init__(self, app: Any, server: DeltawServer) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.server.metrics
        label = _endpoint_label(scope["path"])
        status_box = {"status": 500}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        async def answer(error: APIError, headers: dict[str, str] | None = None) -> None:
            await _error_response(error, headers)(scope, receive, counting_send)

        try:
            key = self.server.settings.api_key
            if key is not None and scope["path"] not in OPEN_PATHS:
                auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
                scheme, _, token = auth.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                    await answer(APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                          type="invalid_request_error", code="invalid_api_key"),
                                 {"WWW-Authenticate": "Bearer"})
                    return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                limit = self.server.settings.max_body_bytes
                too_big = APIError(413, f"request body exceeds {limit} bytes", param=None,
                                   code="request_too_large")
                declared = dict(scope.get("headers") or []).get(b"content-length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    await answer(too_big)
                    return
                chunks, size = [], 0
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        status_box["status"] = 499  # the client went away: not a server error
                        return
                    body = message.get("body", b"")
                    size += len(body)
                    if size > limit:
                        await answer(too_big)
                        return
                    chunks.append(body)
                    if not message.get("more_body", False):
                        break
                whole = b"".join(chunks)
                replayed = False

                async def replay() -> dict:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": whole, "more_body": False}
                    return await receive()

                await self.app(scope, replay, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            metrics.requests.inc(endpoint=label, status=str(status_box["status"]))


# ---- per-request plumbing ----------------------------------------------------------------------------------
@dataclass
class Choice:
    """One generated sequence of a request, seen from the event loop."""

    index: int
    seq: Seq
    text: P.IncrementalText
    stop: P.StopMatcher
    emitted: int = 0  # characters of text already streamed
    tokens: int = 0
    finish: str | None = None
    stop_at: int | None = None
    done: bool = False
    error: APIError | None = None
    ids: list[int] = field(default_factory=list)
    incremental: bool = True  # False: a non-streaming request without stop strings decodes once, at the end

    def on_token(self, token: int) -> None:
        if self.finish is not None:
            return  # a stop string already ended it; the scheduler has not reaped it yet
        self.tokens += 1
        self.ids.append(token)
        if not self.incremental:
            return
        before = len(self.text.text)
        self.text.add(token)
        self._check_stop(before)

    def on_done(self, reason: str) -> None:
        if self.finish is None and self.incremental:
            before = len(self.text.text)
            self.text.flush()
            self._check_stop(before)
        if self.finish is None:
            self.finish = reason if reason in ("stop", "length") else "stop"
        self.done = True

    def _check_stop(self, start: int) -> None:
        if not self.stop.stops:
            return
        hit = self.stop.find(self.text.text, start)
        if hit is not None:
            self.stop_at = hit
            self.finish = "stop"
            self.seq.cancelled = True  # the scheduler drops the row before its next step

    def visible(self) -> str:
        """All text the client may see now (stop strings and a possible partial stop string held back)."""
        text = self.text.text
        if self.stop_at is not None:
            return text[:self.stop_at]
        if self.finish is not None:
            return text
        return text[:self.stop.safe_end(text)]

    def take_delta(self) -> str:
        vis = self.visible()
        delta = vis[self.emitted:]
        self.emitted = max(self.emitted, len(vis))
        return delta

    def final_text(self, tokenizer: Any) -> str:
        text = tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop.stops:
            hit = self.stop.find(text)
            if hit is not None:
                return text[:hit]
        return text


class Run:
    """The sequences of one request and the queue their events arrive on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, tuple]] = asyncio.Queue()

    def emitter(self, index: int) -> Callable[[tuple], None]:
        def emit(event: tuple) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        return emit


def create_app(server: DeltawServer) -> FastAPI:
    """The FastAPI app for ``server`` (its scheduler is started and stopped by the app's lifespan)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="deltaw serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    settings = server.settings
    tokenizer = server.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(bad_request(f"invalid request: {exc.errors()}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(P.error_for_exception(exc))

    async def read_json(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON") from None
        except RecursionError:  # well under --max-body-bytes: "[" * 100_000
            raise bad_request("the request body is nested too deeply to parse") from None
        except ValueError:  # an integer literal over Python's 4300-digit conversion limit
            raise bad_request("the request body holds a number too long to parse") from None
        return P.require_object(body)  # also: every string must be valid Unicode (400 naming the parameter)

    # ---- model resolution and tokenisation -------------------------------------------------------------------
    def resolve(model: str) -> str | None:
        """None for the base model, else the adapter name (validated and located; 400/403/404 otherwise)."""
        if model == server.base_name:
            return None
        if model not in server.store.resident_names():  # resident ones were checked when they were loaded
            server.store.locate(model)
        return model

    def require_kind(kind: str, endpoint: str) -> None:
        if server.kind != kind:
            raise APIError(400, f"{endpoint} needs a {'causal LM' if kind == 'causal' else 'text encoder'} base; "
                                f"this server's base is a {server.kind} model", code="unsupported_endpoint")

    def check_ids(ids: list[int], param: str, max_tokens: int = 0) -> list[int]:
        if not ids:
            raise bad_request(f"'{param}' tokenizes to nothing", param=param)
        if any(t < 0 or t >= server.vocab_size for t in ids):
            raise bad_request(f"'{param}' holds token ids outside [0, {server.vocab_size})", param=param)
        if len(ids) > settings.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                                f"{settings.max_prompt_tokens} (--max-prompt-tokens)", param=param,
                           code="context_length_exceeded")
        limit = server.max_positions
        if limit and len(ids) + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                                "completion). Please reduce the prompt or max_tokens.", param=param,
                           code="context_length_exceeded")
        return ids

    def tokenize(prompt: str | list[int], param: str, max_tokens: int = 0) -> list[int]:
        # On the event loop thread on purpose: a fast tokenizer must not be used from two threads at once
        # ("Already borrowed"), and the body limit bounds the cost of one call.
        if isinstance(prompt, str):
            ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            ids = list(prompt)
        return check_ids(ids, param, max_tokens)

    # ---- generation ----------------------------------------------------------------------------------------
    def budget(params: P.GenParams, ids: list[int]) -> int:
        """max_tokens for this prompt: as asked, or (when the request did not say) the default clamped to the
        room the context leaves, as OpenAI does for chat."""
        if params.explicit_max_tokens or not server.max_positions:
            return params.max_tokens
        return max(1, min(params.max_tokens, server.max_positions - len(ids)))

    async def generate(request: Request, params: P.GenParams, adapter: str | None, prompts: list[list[int]],
                       chat: bool) -> Response:
        server.metrics.adapter_requests.inc(adapter=params.model)
        run = Run(asyncio.get_running_loop())
        choices: list[Choice] = []
        for p_index, ids in enumerate(prompts):
            for k in range(params.n):
                index = p_index * params.n + k
                # torch seeds are uint64: wrap (as torch does for negative seeds) so seed + index never overflows
                seed = None if params.seed is None else (params.seed + index) % (1 << 64)
                seq = Seq(prompt=ids, adapter=adapter, max_tokens=budget(params, ids), emit=run.emitter(index),
                          temperature=params.temperature, top_p=params.top_p, seed=seed, label=params.model)
                choices.append(Choice(index, seq, P.IncrementalText(tokenizer), P.StopMatcher(params.stop),
                                      incremental=params.stream or bool(params.stop)))
        # Too many sequences for the queue ever to hold: a 400 naming n (or the prompts, when n is 1).
        server.scheduler.submit([c.seq for c in choices], param="n" if params.n > 1 or len(prompts) == 1 else "prompt")
        prompt_tokens = sum(len(ids) for ids in prompts)
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        created = P.now()

        def cancel_all() -> None:
            for c in choices:
                c.seq.cancelled = True

        async def next_event(timeout: float | None = None) -> tuple[int, tuple] | None:
            try:
                return await asyncio.wait_for(run.queue.get(), timeout)
            except asyncio.TimeoutError:
                return None

        def apply(event: tuple[int, tuple]) -> None:
            index, (kind, *payload) = event
            c = choices[index]
            if kind == "token":
                c.on_token(payload[0])
            elif kind == "done":
                c.on_done(payload[0])
            elif kind == "error":
                c.error, c.done = payload[0], True

        # Wait for the first event before answering, so that an adapter that fails to load (or a full batch
        # that errors) is a proper HTTP error, also for streaming requests.
        try:
            first = None
            while first is None:
                first = await next_event(1.0)
                if first is None and await request.is_disconnected():
                    cancel_all()
                    return Response(status_code=499)
        except asyncio.CancelledError:
            cancel_all()
            raise
        apply(first)
        if choices[first[0]].error is not None:
            cancel_all()
            return _error_response(choices[first[0]].error)

        if not params.stream:
            try:
                loop = asyncio.get_running_loop()
                checked = loop.time()
                while not all(c.done for c in choices):
                    event = await next_event(1.0)
                    # The server does not cancel a non-streaming handler when its client goes away, and tokens
                    # arrive every step: ask at most every DISCONNECT_CHECK_S, not only when nothing came for 1 s.
                    if event is None or loop.time() - checked >= DISCONNECT_CHECK_S:
                        checked = loop.time()
                        if await request.is_disconnected():
                            cancel_all()
                            return Response(status_code=499)
                    if event is not None:
                        apply(event)
            except asyncio.CancelledError:
                cancel_all()
                raise
            errors = [c.error for c in choices if c.error is not None]
            if errors:
                cancel_all()
                return _error_response(errors[0])
            completion_tokens = sum(c.tokens for c in choices)
            if chat:
                out_choices = [{"index": c.index, "message": {"role": "assistant", "content": c.final_text(tokenizer)},
                                "logprobs": None, "finish_reason": c.finish} for c in choices]
                obj = "chat.completion"
            else:
                out_choices = [{"index": c.index, "text": c.final_text(tokenizer), "logprobs": None,
                                "finish_reason": c.finish} for c in choices]
                obj = "text_completion"
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": params.model,
                                 "choices": out_choices, "usage": P.usage(prompt_tokens, completion_tokens),
                                 "system_fingerprint": None})

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(c: Choice, text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                    delta["content"] = ""
                if text:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": c.index, "text": text or "", "logprobs": None, "finish_reason": finish}
            payload: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": params.model,
                                       "choices": [choice]}
            if params.include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        async def events() -> AsyncIterator[str]:
            finished: set[int] = set()
            try:
                if chat:
                    for c in choices:
                        yield chunk(c, None, None, role=True)
                pending: list[tuple[int, tuple]] = [first]
                while True:
                    for index, _ in pending:
                        c = choices[index]
                        if index in finished:
                            continue
                        if c.error is not None:
                            yield f"data: {json.dumps(c.error.body())}\n\n"
                            finished.add(index)
                            continue
                        delta = c.take_delta()
                        if delta:
                            yield chunk(c, delta, None)
                        if c.finish is not None:  # stop string or done
                            rest = c.take_delta()
                            yield chunk(c, rest or None, c.finish)
                            finished.add(index)
                    if len(finished) == len(choices):
                        break
                    event = await run.queue.get()
                    apply(event)
                    pending = [event]
                if params.include_usage:
                    payload = {"id": rid, "object": obj, "created": created, "model": params.model, "choices": [],
                               "usage": P.usage(prompt_tokens, sum(c.tokens for c in choices))}
                    yield f"data: {json.dumps(payload)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancel_all()  # no-op for finished rows; frees the rows of a client that went away

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        require_kind("causal", "/v1/completions")
        body = await read_json(request)
        params = P.gen_params(body, default_max_tokens=settings.default_max_tokens,
                              max_tokens_limit=settings.max_tokens_limit, max_n=settings.max_n, chat=False)
        adapter = resolve(params.model)
        asked = params.max_tokens if params.explicit_max_tokens else 0
        raw = P.completion_prompts(body, settings.max_prompts)
        if len(raw) * params.n > settings.max_prompts:
            raise bad_request(f"prompts x n must be at most {settings.max_prompts}", param="n")
        prompts = [tokenize(p, "prompt", asked) for p in raw]
        return await generate(request, params, adapter, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        require_kind("causal", "/v1/chat/completions")
        body = await read_json(request)
        params = P.gen_params(body, default_max_tokens=None, max_tokens_limit=settings.max_tokens_limit,
                              max_n=settings.max_n, chat=True)
        messages = P.chat_messages(body)
        adapter = resolve(params.model)
        ids = check_ids(server.chat_ids(messages), "messages", params.max_tokens if params.explicit_max_tokens else 0)
        return await generate(request, params, adapter, [ids], chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        require_kind("encoder", "/v1/embeddings")
        body = await read_json(request)
        P.refuse_unsupported(body, embeddings=True)
        model = P.get_model(body)
        inputs = P.embedding_inputs(body, settings.max_prompts)
        adapter = resolve(model)
        server.metrics.adapter_requests.inc(adapter=model)
        ids_list = [tokenize(x, "input") for x in inputs]
        run = Run(asyncio.get_running_loop())
        jobs = [EmbedJob(ids=ids, adapter=adapter, emit=run.emitter(i), label=model) for i, ids in enumerate(ids_list)]
        server.scheduler.submit(jobs, param="input")
        vectors: dict[int, list[float]] = {}
        done: set[int] = set()
        try:
            while len(done) < len(jobs):
                index, (kind, *payload) = await run.queue.get()
                if kind == "error":
                    for j in jobs:
                        j.cancelled = True
                    return _error_response(payload[0])
                if kind == "embedding":
                    vectors[index] = payload[0]
                elif kind == "done":
                    done.add(index)
        except asyncio.CancelledError:
            for j in jobs:
                j.cancelled = True
            raise
        fmt = body.get("encoding_format", "float")
        data = []
        for i in range(len(jobs)):
            vec: Any = vectors[i]
            if fmt == "base64":
                vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": vec})
        n_tokens = sum(len(x) for x in ids_list)
        return JSONResponse({"object": "list", "data": data, "model": model,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    # ---- models and adapters ---------------------------------------------------------------------------------
    def model_card(name: str, resident: dict[str, dict]) -> dict[str, Any]:
        if name == server.base_name:
            return {"id": name, "object": "model", "created": server.created, "owned_by": "deltaw", "parent": None,
                    "kind": server.kind, "loaded": True, "pinned": True}
        info = resident.get(name)
        return {"id": name, "object": "model", "created": info["loaded_at"] if info else server.created,
                "owned_by": "deltaw", "parent": server.base_name, "kind": "lora", "loaded": info is not None,
                "pinned": bool(info and info["pinned"])}

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        resident = server.store.snapshot()
        names = await asyncio.to_thread(server.store.available)
        data = [model_card(server.base_name, resident)] + [model_card(n, resident) for n in names
                                                          if n != server.base_name]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> JSONResponse:
        # A resident adapter is served whatever happened to its folder since (like resolve and /v1/models).
        if model_id != server.base_name and model_id not in server.store.resident_names():
            server.store.locate(model_id)
        return JSONResponse(model_card(model_id, server.store.snapshot()))

    @app.get("/v1/adapters")
    async def list_adapters() -> JSONResponse:
        resident = server.store.snapshot()
        return JSONResponse({"object": "list", "budget_bytes": server.store.budget,
                             "used_bytes": sum(r["bytes"] for r in resident.values()),
                             "data": [{"id": n, "object": "adapter", **r} for n, r in resident.items()]})

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> JSONResponse:
        body = await read_json(request)
        name = body.get("name", body.get("model"))
        if not isinstance(name, str) or not name:
            raise bad_request("'name' (the adapter's directory name under --adapters) is required", param="name")
        pin = body.get("pin")
        if pin is not None and not isinstance(pin, bool):
            raise bad_request("'pin' must be a boolean", param="pin")
        if name == server.base_name:
            raise bad_request(f"{name!r} is the base model, not an adapter", param="name")
        if name not in server.store.resident_names():  # a resident adapter is pinned / unpinned, folder or not
            server.store.locate(name)
        resident = await asyncio.wrap_future(server.scheduler.call(lambda: server.store.load(name, pin)))
        return JSONResponse({"id": name, "object": "adapter", "status": "loaded", "bytes": resident.nbytes,
                             "pinned": resident.pinned})

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> JSONResponse:
        if name == server.base_name:
            raise bad_request(f"{name!r} is the base model and cannot be unloaded", param="name")
        if name not in server.store.resident_names():
            server.store.locate(name)  # 400 for a bad name; else the unload answers 404 (not loaded)
        result = await asyncio.wrap_future(server.scheduler.call(lambda: server.store.unload(name)))
        return JSONResponse({"object": "adapter", **result})

    # ---- operations ------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        alive = server.scheduler.alive
        body = {"status": "ok" if alive else "unavailable", "model": server.base_name, "kind": server.kind,
                "running": len(server.scheduler.batch.rows), "queued": server.scheduler.queue_depth(),
                "adapters_resident": len(server.store.resident_names())}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(GuardMiddleware, server=server)
    return app
