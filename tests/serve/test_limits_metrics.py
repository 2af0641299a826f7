"""Auth, request limits (4xx in OpenAI's error format), /health, Prometheus /metrics, embeddings, the CLI."""

from __future__ import annotations

import json
import re

import httpx
import pytest
import torch

import deltaw
from serve_helpers import make_bert, save_adapters, start_server


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


def test_bearer_token(adapters_dir, tokenizer):
    server, thread, url = start_server(adapters_dir, tokenizer, api_key="s3cret-key")
    try:
        body = {"model": "a0", "prompt": "w1", "max_tokens": 2}
        assert_openai_error(httpx.post(f"{url}/v1/completions", json=body), 401, "invalid_api_key")
        assert_openai_error(httpx.post(f"{url}/v1/completions", json=body,
                                       headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
        assert_openai_error(httpx.post(f"{url}/v1/completions", json=body,
                                       headers={"Authorization": "Basic s3cret-key"}), 401)
        assert_openai_error(httpx.get(f"{url}/v1/models"), 401)
        assert_openai_error(httpx.get(f"{url}/metrics"), 401)
        assert_openai_error(httpx.delete(f"{url}/v1/adapters/a0"), 401)
        ok = {"Authorization": "Bearer s3cret-key"}
        assert httpx.post(f"{url}/v1/completions", json=body, headers=ok, timeout=30).status_code == 200
        assert httpx.get(f"{url}/metrics", headers=ok).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # liveness probes need no key
    finally:
        thread.stop()


LIMITS = [
    ({"model": "a0", "prompt": "w1", "max_tokens": 65}, 400, "max_tokens_exceeded", "max_tokens"),
    ({"model": "a0", "prompt": "w1", "max_tokens": 0}, 400, "max_tokens_exceeded", "max_tokens"),
    ({"model": "a0", "prompt": "w1", "max_tokens": "8"}, 400, None, "max_tokens"),
    ({"model": "a0", "prompt": " ".join(["w1"] * 40)}, 400, "context_length_exceeded", "prompt"),
    ({"model": "a0", "prompt": [1, 2, 999]}, 400, None, "prompt"),
    ({"model": "a0", "prompt": "w1", "temperature": 3}, 400, None, "temperature"),
    ({"model": "a0", "prompt": "w1", "n": 9}, 400, None, "n"),
    ({"model": "a0", "prompt": "w1", "logprobs": 3}, 400, "unsupported_parameter", "logprobs"),
    ({"model": "a0", "prompt": "w1", "stop": ["a", "b", "c", "d", "e"]}, 400, None, "stop"),
    ({"model": "a0", "prompt": []}, 400, None, "prompt"),
    ({"model": "a0"}, 400, None, "prompt"),
    ({"prompt": "w1"}, 400, None, "model"),
    ({"model": "nope", "prompt": "w1"}, 404, "model_not_found", "model"),
    ({"model": "tiny", "prompt": "w1", "max_tokens": 60, "n": 1}, 200, None, None),
    # torch seeds are 64-bit: out-of-range seeds are a 400, not a 500 from the prefill (seed + choice index wraps)
    ({"model": "tiny", "prompt": "w1", "max_tokens": 2, "seed": 2**64}, 400, None, "seed"),
    ({"model": "tiny", "prompt": "w1", "max_tokens": 2, "seed": -(2**63) - 1}, 400, None, "seed"),
    ({"model": "tiny", "prompt": "w1", "max_tokens": 2, "seed": 2**63 - 1, "n": 3}, 200, None, None),
    ({"model": "tiny", "prompt": "w1", "max_tokens": 2, "seed": -1, "n": 3}, 200, None, None),
    # logits / 4e-39 overflowed float32 (1e-45 always): NaN softmax, a 500 -- and at a decode step, for every row.
    # Temperatures below float32's smallest normal are refused; every accepted one samples safely.
    ({"model": "tiny", "prompt": "w1", "max_tokens": 2, "temperature": 4e-39}, 400, None, "temperature"),
    ({"model": "tiny", "prompt": "w1", "max_tokens": 2, "temperature": 1e-45}, 400, None, "temperature"),
    ({"model": "a0", "prompt": "w1 w2", "max_tokens": 8, "temperature": 1.2e-38, "seed": 3}, 200, None, None),
]


@pytest.mark.parametrize("body,status,code,param", LIMITS)
def test_limits_answered_in_openai_format(limited, body, status, code, param):
    _, url = limited
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    if status == 200:
        assert r.status_code == 200, r.text
        return
    assert_openai_error(r, status, code, param)


@pytest.fixture(scope="module")
def limited(adapters_dir, tokenizer):
    server, thread, url = start_server(adapters_dir, tokenizer, max_tokens_limit=64, max_prompt_tokens=32,
                                       max_body_bytes=2048, max_n=8)
    yield server, url
    thread.stop()


def test_body_size_and_malformed_bodies(limited):
    _, url = limited
    big = {"model": "a0", "prompt": "w1 " * 2000}
    assert_openai_error(httpx.post(f"{url}/v1/completions", json=big), 413, "request_too_large")

    def chunked():
        for _ in range(10):
            yield b"x" * 1024

    assert_openai_error(httpx.post(f"{url}/v1/completions", content=chunked()), 413, "request_too_large")
    assert_openai_error(httpx.post(f"{url}/v1/completions", content=b"{not json"), 400)
    assert_openai_error(httpx.post(f"{url}/v1/completions", json=[1, 2]), 400)
    assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json={"model": "a0", "messages": []}), 400,
                        param="messages")
    assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json={
        "model": "a0", "messages": [{"role": "tool", "content": "x"}]}), 400)
    assert_openai_error(httpx.post(f"{url}/v1/embeddings", json={"model": "a0", "input": "w1"}), 400,
                        "unsupported_endpoint")
    assert_openai_error(httpx.get(f"{url}/v1/nothing-here"), 404)
    assert_openai_error(httpx.get(f"{url}/v1/completions"), 405)


def test_health_and_metrics(limited):
    server, url = limited
    for model in ("a0", "a1", "a0", "tiny"):
        assert httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "w3 w4", "max_tokens": 5,
                                                         "temperature": 0}, timeout=30).status_code == 200
    httpx.post(f"{url}/v1/completions", json={"model": "a0"})  # a 400
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["kind"] == "causal"
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    label = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
    sample = re.compile(rf'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{{{label}(,{label})*\}})?'
                        r' [-+]?(\d+(\.\d*)?([eE][-+]?\d+)?|Inf|NaN)$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line

    def value(name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, name
        return float(m.group(1))

    assert value('deltaw_requests_total{endpoint="/v1/completions",status="200"}') >= 4
    assert value('deltaw_requests_total{endpoint="/v1/completions",status="400"}') >= 1
    assert value('deltaw_adapter_requests_total{adapter="a0"}') >= 2
    assert value('deltaw_adapter_requests_total{adapter="tiny"}') >= 1
    assert value('deltaw_adapter_generated_tokens_total{adapter="a1"}') >= 1
    assert value("deltaw_generated_tokens_total") >= 4
    assert value("deltaw_tokens_per_second") > 0
    assert 0 < value("deltaw_batch_occupancy_ratio") <= 1
    assert value("deltaw_adapter_cache_hits_total") >= 1
    assert value("deltaw_adapter_cache_misses_total") >= 2
    assert value("deltaw_adapter_cache_evictions_total") == 0
    assert value("deltaw_adapter_memory_bytes") > 0
    assert value("deltaw_decode_steps_total") > 0
    assert "deltaw_batch_rows_bucket" in text and "deltaw_time_to_first_token_seconds_count" in text


def test_embeddings_per_adapter(tmp_path, tokenizer):
    root = tmp_path / "enc"
    root.mkdir()
    save_adapters(make_bert(), root, ["e0", "e1"], ["query", "value", "intermediate.dense"])
    reference = make_bert()
    for name in ("e0", "e1"):
        deltaw.load(reference, root / name, name, activate=False)
    server, thread, url = start_server(root, tokenizer, model=make_bert())
    try:
        assert server.kind == "encoder"
        texts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9"]
        got = {}
        for model in ("tiny", "e0", "e1"):
            r = httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": texts}, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "list" and body["usage"]["prompt_tokens"] > 0
            vectors = torch.tensor([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
            enc = tokenizer(texts, padding=True, return_tensors="pt")
            with deltaw.using(reference, None if model == "tiny" else model), torch.no_grad():
                hidden = reference(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            torch.testing.assert_close(vectors, want, atol=1e-5, rtol=1e-4)
            got[model] = vectors
        assert not torch.allclose(got["e0"], got["e1"])
        r = httpx.post(f"{url}/v1/embeddings", json={"model": "e0", "input": "w1", "encoding_format": "base64"})
        assert isinstance(r.json()["data"][0]["embedding"], str)
        assert_openai_error(httpx.post(f"{url}/v1/completions", json={"model": "e0", "prompt": "w1"}), 400,
                            "unsupported_endpoint")
        # A lone surrogate made the fast tokenizer raise TypeError: a 500 instead of a 400 naming the input.
        r = httpx.post(f"{url}/v1/embeddings", content=json.dumps({"model": "e0", "input": ["w1", "\ud800"]}),
                       headers={"content-type": "application/json"}, timeout=30)
        assert_openai_error(r, 400, param="input[1]")
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        emb = client.embeddings.create(model="e1", input=texts)  # the SDK asks for base64 and decodes it
        torch.testing.assert_close(torch.tensor([d.embedding for d in emb.data]), got["e1"], atol=1e-6, rtol=1e-5)
    finally:
        thread.stop()


def test_cli_serves_a_saved_model(tmp_path, adapters_dir, tokenizer, monkeypatch):
    """``deltaw serve`` wiring end to end, in process (a subprocess would pay ~20 s of imports on a busy box):
    a saved base folder, the adapters dir, --pin, the key from DELTAW_API_KEY; run_server is swapped for a
    ServerThread so the test can talk to the real app the command built."""
    from typer.testing import CliRunner

    import deltaw.serve
    from serve_helpers import make_llama
    from deltaw.cli.main import app
    from deltaw.serve import ServerThread

    base = tmp_path / "tiny-base"
    make_llama().save_pretrained(base)
    tokenizer.save_pretrained(base)
    seen: dict = {}

    def fake_run(server, host, port, log_level):
        seen["host"], seen["port"] = host, port
        with ServerThread(server) as url:
            auth = {"Authorization": "Bearer k"}
            assert httpx.get(f"{url}/v1/models").status_code == 401
            models = httpx.get(f"{url}/v1/models", headers=auth).json()["data"]
            seen["models"] = models
            r = httpx.post(f"{url}/v1/completions", headers=auth, timeout=30,
                           json={"model": "a1", "prompt": "w1 w2", "max_tokens": 5, "temperature": 0})
            seen["completion"] = (r.status_code, r.json())

    monkeypatch.setattr(deltaw.serve, "run_server", fake_run)
    monkeypatch.setenv("DELTAW_API_KEY", "k")
    result = CliRunner().invoke(app, ["serve", "--base", str(base), "--adapters", str(adapters_dir), "--port", "9",
                                      "--pin", "a1", "--max-adapter-memory", "1MiB", "--max-batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 9
    assert seen["models"][0]["id"] == "tiny-base"
    assert {m["id"] for m in seen["models"] if m["pinned"]} == {"tiny-base", "a1"}
    status, body = seen["completion"]
    assert status == 200 and body["choices"][0]["text"]
    bad = CliRunner().invoke(app, ["serve", "--base", str(base), "--pin", "../a1"])
    assert bad.exit_code != 0


def test_client_gone_while_sending_its_body_is_not_counted_as_a_server_error():
    """The middleware left its default status (500) when the client disconnected mid-body, so /metrics showed
    a server error for every client that gave up while uploading."""
    import asyncio
    from types import SimpleNamespace

    from deltaw.serve.app import GuardMiddleware
    from deltaw.serve.metrics import Metrics
    from deltaw.serve.settings import ServeSettings

    server = SimpleNamespace(settings=ServeSettings(), metrics=Metrics(8))
    messages = [{"type": "http.request", "body": b'{"model": ', "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> dict:
        return messages.pop(0)

    async def never(*_):
        raise AssertionError("the app must not run")

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    asyncio.run(GuardMiddleware(never, server)(scope, receive, never))
    assert server.metrics.requests.value(endpoint="/v1/completions", status="500") == 0
    assert server.metrics.requests.value(endpoint="/v1/completions", status="499") == 1


def test_malformed_bodies_are_a_400_not_a_500(served):
    """JSON nested past the parser's recursion limit (RecursionError), an integer literal over Python's 4300-digit
    limit (ValueError) and strings holding a lone surrogate ("\\ud800" is valid JSON; the fast tokenizer raises
    TypeError on it) were answered 500 "internal error" -- which OpenAI SDKs retry -- instead of a 400."""
    _, url = served

    def post(path: str, raw: bytes) -> httpx.Response:
        return httpx.post(f"{url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=60)

    assert_openai_error(post("/v1/completions", b"[" * 100_000), 400)
    nested = b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert_openai_error(post("/v1/completions", nested), 400)
    huge = b'{"model": "tiny", "prompt": "w1", "max_tokens": 1' + b"0" * 5000 + b"}"
    assert_openai_error(post("/v1/completions", huge), 400)
    cases = [
        ("/v1/completions", {"model": "tiny", "prompt": "\ud800 w1"}, "prompt"),
        ("/v1/completions", {"model": "tiny", "prompt": ["w1", "w2 \udfff"]}, "prompt[1]"),
        ("/v1/completions", {"model": "tiny", "prompt": "w1", "stop": ["x", "\ud800"]}, "stop[1]"),
        ("/v1/completions", {"model": "\ud800", "prompt": "w1"}, "model"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "\udfff"}]},
         "messages[0].content"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "w1"}, {"type": "text", "text": "\ud800"}]}]},
         "messages[0].content[1].text"),
        ("/v1/adapters", {"name": "\ud800"}, "name"),
    ]
    for path, body, param in cases:
        r = post(path, json.dumps(body).encode())
        assert_openai_error(r, 400, param=param)
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = post("/v1/completions", json.dumps({"model": "tiny", "prompt": "w1 \ud83d\ude00", "max_tokens": 2}).encode())
    assert r.status_code == 200, r.text  # a surrogate *pair* is an ordinary (escaped) character


def test_a_request_larger_than_the_queue_is_a_400_not_a_429(tokenizer):
    """prompts x n above --max-queue can never be queued, but was answered 429 "retry later" (SDKs retry 429 with
    backoff: forever, here)."""
    server, thread, url = start_server(None, tokenizer, max_tokens_limit=8, max_queue=4)

    def post(body: dict) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", json=body, timeout=60)

    try:
        r = post({"model": "tiny", "prompt": "w1", "n": 5, "max_tokens": 2})
        assert_openai_error(r, 400, param="n")
        assert "5" in r.json()["error"]["message"] and "at most 4" in r.json()["error"]["message"]
        assert_openai_error(post({"model": "tiny", "prompt": ["w1"] * 5, "max_tokens": 2}), 400, param="prompt")
        assert_openai_error(post({"model": "tiny", "prompt": ["w1"] * 2, "n": 3, "max_tokens": 2}), 400, param="n")
        assert post({"model": "tiny", "prompt": ["w1"] * 2, "n": 2, "max_tokens": 2}).status_code == 200
        assert server.scheduler.queue_depth() == 0
    finally:
        thread.stop()
