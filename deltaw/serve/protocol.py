"""OpenAI request parsing and response shapes, kept apart from the HTTP routes so they are easy to test.

Why hand-written checks instead of pydantic models: every violation must come back in OpenAI's error format
naming the offending ``param``, and parameters this server cannot honour (logprobs, penalties, best_of ...) are
refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import APIError, bad_request

# Parameters OpenAI defines that this server does not implement: refused unless they hold the neutral value.
_NEUTRAL = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
            "suffix": (None, ""), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
            "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
            "response_format": (None, {"type": "text"}), "function_call": (None, "none"), "audio": (None,),
            "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
            # Sampling extensions that OpenAI-compatible servers (vLLM, TGI) accept and SDKs pass via extra_body.
            "repetition_penalty": (None, 1, 1.0), "top_k": (None, 0, -1), "min_p": (None, 0, 0.0),
            "min_tokens": (None, 0)}


@dataclass
class GenParams:
    """What a completions or chat request asks the decoder for (prompts are tokenised separately)."""

    model: str
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stream: bool
    include_usage: bool
    stop: list[str]
    seed: int | None
    explicit_max_tokens: bool = True  # False: the server's default, clamped to what the context leaves


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def require_object(body: Any) -> dict[str, Any]:
    """The parsed body of any route: a JSON object whose strings are all valid Unicode (``check_text``)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    check_text(body)
    return body


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _path(node: tuple | None) -> str:
    """'messages[0].content' from the (parent, key) chain ``check_text`` builds."""
    keys: list[str | int] = []
    while node is not None:
        node, key = node
        keys.append(key)
    parts = [f"[{k}]" if isinstance(k, int) else (k if i == 0 else f".{k}") for i, k in enumerate(reversed(keys))]
    text = "".join(parts[:8]) + ("..." if len(parts) > 8 else "")
    return text if len(text) <= 120 else text[:117] + "..."


def check_text(body: dict[str, Any]) -> None:
    """A 400 naming the parameter when a string anywhere in the body (a key or a value, at any depth) cannot be
    encoded as UTF-8, i.e. holds a lone UTF-16 surrogate: JSON allows "\\ud800", Python's json module decodes it
    to an unpaired surrogate, and tokenizers (and the UTF-8 response encoder) raise on it. Checked once here, for
    every route, rather than wherever a string is used. Iterative: the parser already bounds the depth, but a
    walk must not hit the recursion limit either."""
    from collections import deque

    pending: deque[tuple[Any, tuple | None]] = deque()
    for key, value in body.items():
        if _unencodable(key):
            raise bad_request("the request body has a key that is not valid Unicode (a lone UTF-16 surrogate such "
                              "as \\ud800): it cannot be encoded as UTF-8")
        pending.append((value, (None, key)))
    while pending:
        value, node = pending.popleft()
        if isinstance(value, str):
            if _unencodable(value):
                where = _path(node)
                raise bad_request(f"'{where}' holds a string that is not valid Unicode (a lone UTF-16 surrogate such "
                                  "as \\ud800): it cannot be encoded as UTF-8", param=where)
        elif isinstance(value, list):
            pending.extend((v, (node, i)) for i, v in enumerate(value) if isinstance(v, (str, list, dict)))
        elif isinstance(value, dict):
            for key, v in value.items():
                if _unencodable(key):
                    where = _path(node)
                    raise bad_request(f"'{where}' has a key that is not valid Unicode (a lone UTF-16 surrogate "
                                      "such as \\ud800): it cannot be encoded as UTF-8", param=where)
                pending.append((v, (node, key)))


def get_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: the base model's name or an adapter name", param="model")
    if len(model) > 256:
        raise bad_request("'model' is too long", param="model")
    return model


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise bad_request(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", param=key)
    if not lo <= value <= hi:
        raise bad_request(f"'{key}' must be between {lo} and {hi}, got {value}", param=key,
                          code="max_tokens_exceeded" if key in ("max_tokens", "max_completion_tokens") else None)
    return value


# /v1/embeddings only: OpenAI's output-size reduction, which mean pooling cannot honour.
_EMBEDDINGS_NEUTRAL = {**_NEUTRAL, "dimensions": (None,)}


def refuse_unsupported(body: dict[str, Any], *, embeddings: bool = False) -> None:
    """A 400 naming *every* unsupported parameter the request sets to a non-neutral value.

    Why all of them at once: a client told only about the first would fix it, resend, and be refused again for
    the next. ``param`` (one name in OpenAI's error shape) is the first of them; the message lists them all.
    """
    neutral = _EMBEDDINGS_NEUTRAL if embeddings else _NEUTRAL
    refused = [key for key, ok in neutral.items() if key in body and body[key] not in ok]
    if not refused:
        return
    names = ", ".join(f"'{key}'" for key in refused)
    verb = "is" if len(refused) == 1 else "are"
    raise bad_request(f"{names} {verb} not supported by this server; drop {'it' if len(refused) == 1 else 'them'}",
                      param=refused[0], code="unsupported_parameter")


# The smallest positive temperature accepted: float32's smallest normal number (torch.finfo(torch.float32).tiny).
# Below it a temperature is not even representable in the precision models compute logits in, so it is refused
# ("use 0 for greedy") rather than guessed at. Every accepted temperature samples safely (engine.sample_token
# divides max-subtracted logits in float64); tiny ones pick the argmax, as greedy does.
MIN_TEMPERATURE = 1.1754943508222875e-38

# Matching a stop string costs O(len²) per generated token (StopMatcher.safe_end), run on the event loop.
MAX_STOP_CHARS = 1000


def gen_params(body: dict[str, Any], *, default_max_tokens: int | None, max_tokens_limit: int, max_n: int,
               chat: bool) -> GenParams:
    refuse_unsupported(body)
    model = get_model(body)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, default_max_tokens if default_max_tokens is not None else max_tokens_limit,
                         1, max_tokens_limit, integer=True)
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    if 0.0 < temperature < MIN_TEMPERATURE:
        raise bad_request(f"'temperature' must be 0 (greedy) or at least {MIN_TEMPERATURE:.3g} (the smallest normal "
                          f"float32), got {temperature!r}", param="temperature")
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p <= 0.0:
        raise bad_request("'top_p' must be greater than 0", param="top_p")
    n = _number(body, "n", 1, 1, max_n, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options")
    if options is not None and not stream:  # as OpenAI: it would be silently meaningless
        raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", param="stream_options")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise bad_request("'stop' must be a string or a list of at most 4 strings", param="stop")
    if any(not s for s in stops):
        raise bad_request("'stop' strings must not be empty", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"'stop' strings must be at most {MAX_STOP_CHARS} characters", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request("'seed' must be an integer", param="seed")
    if seed is not None and not -(1 << 63) <= seed < (1 << 63):  # OpenAI's seed is an int64
        raise bad_request(f"'seed' must be a 64-bit signed integer, got {seed}", param="seed")
    return GenParams(model, max_tokens, temperature, top_p, n, stream, include_usage, stops, seed,
                     explicit_max_tokens=body.get(key) is not None)


def completion_prompts(body: dict[str, Any], max_prompts: int) -> list[str | list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompt):
        prompts = list(prompt)
    else:
        raise bad_request("'prompt' must be a string, a list of strings, a list of token ids or a list of token-id "
                          "lists (non-empty)", param="prompt")
    if len(prompts) > max_prompts:
        raise bad_request(f"at most {max_prompts} prompts per request, got {len(prompts)}", param="prompt")
    return prompts


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """``messages`` as [{"role", "content"}] with content flattened to text (text parts only)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", param="messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
        role, content = m["role"], m.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"messages[{i}].role {role!r} is not supported (system, developer, user, assistant)",
                              param=f"messages[{i}].role")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}].content: only text parts are supported",
                                      param=f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts",
                              param=f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def embedding_inputs(body: dict[str, Any], max_inputs: int) -> list[str | list[int]]:
    value = body.get("input")
    if isinstance(value, str):
        inputs: list[Any] = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        inputs = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) or (
            isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v))
            for v in value):
        inputs = list(value)
    else:
        raise bad_request("'input' must be a string, a list of strings, or token ids", param="input")
    if any(isinstance(v, str) and not v for v in inputs):
        raise bad_request("'input' strings must not be empty", param="input")
    if len(inputs) > max_inputs:
        raise bad_request(f"at most {max_inputs} inputs per request, got {len(inputs)}", param="input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    return inputs


class IncrementalText:
    """Text deltas from a growing list of token ids, stable across multi-token characters and word pieces.

    Decodes a short window (the tokens since the last emitted boundary) rather than everything, and holds back
    text that ends in an incomplete UTF-8 sequence (U+FFFD) until the next token completes it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        delta = after[len(before):] if len(after) > len(before) else ""
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta


class StopMatcher:
    """Finds the first stop string in the generated text; tells how much text is safe to stream meanwhile."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1

    def find(self, text: str, start: int = 0) -> int | None:
        hits = [i for s in self.stops if (i := text.find(s, max(0, start - self.hold))) >= 0]
        return min(hits) if hits else None

    def safe_end(self, text: str) -> int:
        """End of the text that can be streamed: all but a tail that could still grow into a stop string."""
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return len(text) - hold


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_for_exception(exc: BaseException) -> APIError:
    return exc if isinstance(exc, APIError) else APIError(500, f"internal error: {exc}", type="server_error",
                                                          code="internal_error")
