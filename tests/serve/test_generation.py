"""Completions, chat and streaming over real HTTP, each equal to offline greedy generation; mixed-adapter
concurrency with zero wrong-adapter answers."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from serve_helpers import ADAPTERS, concurrently, start_server


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_completion_equals_offline_for_base_and_adapters(served, offline):
    _, url = served
    prompt = "w1 w2 w3 w4"
    outputs = {}
    for model in ("tiny", *ADAPTERS):
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 12,
                                                      "temperature": 0}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == model
        choice = body["choices"][0]
        want = offline.text(prompt, None if model == "tiny" else model, 12)
        assert choice["text"] == want
        assert body["usage"]["prompt_tokens"] == 5
        assert body["usage"]["completion_tokens"] == len(offline.ids([1, 8, 9, 10, 11], None if model == "tiny"
                                                                     else model, 12))
        assert choice["finish_reason"] in ("stop", "length")
        outputs[model] = choice["text"]
    assert len(set(outputs.values())) == len(outputs), "adapters must change the output (test is meaningless)"


def test_token_id_prompts_and_several_prompts(served, offline):
    _, url = served
    r = httpx.post(f"{url}/v1/completions", json={"model": "a1", "prompt": [[1, 9, 9], [1, 20, 21, 22]],
                                                  "max_tokens": 6, "temperature": 0}, timeout=30)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    tok = offline.tokenizer
    assert texts == [tok.decode(offline.ids([1, 9, 9], "a1", 6)), tok.decode(offline.ids([1, 20, 21, 22], "a1", 6))]


def test_chat_and_streaming_equal_non_streaming(served, offline):
    _, url = served
    messages = [{"role": "system", "content": "w3 w4"}, {"role": "user", "content": "w10 w11 w12"}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "a2", "messages": messages, "max_tokens": 10,
                                                       "temperature": 0}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] == offline.chat(messages, "a2", 10)

    with httpx.stream("POST", f"{url}/v1/chat/completions", json={
            "model": "a2", "messages": messages, "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}, timeout=30) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        events = sse_events(s)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-2]["usage"]["completion_tokens"] == body["usage"]["completion_tokens"]

    prompt = "w5 w6 w7"
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "a0", "prompt": prompt, "max_tokens": 15,
                                                            "temperature": 0, "stream": True}, timeout=30) as s:
        events = sse_events(s)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == offline.text(prompt, "a0", 15)
    assert len(events) > 3  # really streamed token by token


def test_stop_strings_truncate(served, offline):
    _, url = served
    prompt = "w1 w2 w3 w4"
    full = offline.text(prompt, "a3", 12)
    words = full.split()
    assert len(words) >= 4
    stop = words[2]
    expected = full[:full.index(stop)]
    r = httpx.post(f"{url}/v1/completions", json={"model": "a3", "prompt": prompt, "max_tokens": 12,
                                                  "temperature": 0, "stop": [stop]}, timeout=30)
    assert r.json()["choices"][0] == {"index": 0, "text": expected, "logprobs": None, "finish_reason": "stop"}
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "a3", "prompt": prompt, "max_tokens": 12,
                                                            "temperature": 0, "stop": stop, "stream": True},
                      timeout=30) as s:
        events = sse_events(s)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected


def test_seeded_sampling_is_reproducible(served):
    _, url = served
    req = {"model": "a1", "prompt": "w8 w9", "max_tokens": 10, "temperature": 1.0, "seed": 7}
    first = httpx.post(f"{url}/v1/completions", json=req, timeout=30).json()["choices"][0]["text"]
    second = httpx.post(f"{url}/v1/completions", json=req, timeout=30).json()["choices"][0]["text"]
    assert first == second


def test_mixed_adapters_concurrently_equal_offline(served, offline):
    """40 concurrent requests over 4 adapters + the base: every answer equals its own offline generation, and
    the server really mixed adapters inside decode steps."""
    server, url = served
    rng = random.Random(3)
    requests = []
    for i in range(40):
        model = rng.choice(("tiny", *ADAPTERS))
        prompt = " ".join(f"w{rng.randrange(57)}" for _ in range(rng.randint(1, 9)))
        requests.append((model, prompt, rng.randint(4, 24), i % 3 == 0))
    before = server.metrics.batch_adapters.render()
    bodies = [{"model": m, "prompt": p, "max_tokens": n, "temperature": 0, "stream": stream}
              for m, p, n, stream in requests]
    got = []
    for status, body in concurrently(url, bodies):
        assert status == 200, body
        got.append(body["choices"][0]["text"] if isinstance(body, dict)
                   else "".join(e["choices"][0]["text"] for e in body[:-1]))
    wrong = [(req, g) for req, g in zip(requests, got)
             if g != offline.text(req[1], None if req[0] == "tiny" else req[0], req[2])]
    assert wrong == []
    hist = server.metrics.batch_adapters.render()
    assert hist != before
    # Some decode steps ran with more than one distinct adapter in the batch.
    count_le1 = int(next(line.split()[-1] for line in hist if 'le="1"' in line))
    total = int(next(line.split()[-1] for line in hist if line.startswith("deltaw_batch_distinct_adapters_count")))
    assert total > count_le1


def test_same_adapter_policy_is_also_exact(adapters_dir, tokenizer, offline):
    server, thread, url = start_server(adapters_dir, tokenizer, max_batch_size=4, batch_policy="same-adapter")
    try:
        reqs = [(m, f"w{i} w{i + 1}", 8) for i, m in enumerate(["a0", "a1", "a0", "tiny", "a1", "a2"])]

        got = [b["choices"][0]["text"] for _, b in concurrently(url, [
            {"model": m, "prompt": p, "max_tokens": n, "temperature": 0} for m, p, n in reqs])]
        assert got == [offline.text(p, None if m == "tiny" else m, n) for m, p, n in reqs]
        hist = server.metrics.batch_adapters.render()
        total = int(next(line.split()[-1] for line in hist if line.startswith("deltaw_batch_distinct_adapters_count")))
        le1 = int(next(line.split()[-1] for line in hist if 'le="1"' in line))
        assert total == le1  # never more than one adapter per step
    finally:
        thread.stop()


def test_openai_client(served, offline):
    openai = pytest.importorskip("openai")
    _, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    models = {m.id for m in client.models.list()}
    assert {"tiny", *ADAPTERS} <= models
    c = client.completions.create(model="a1", prompt="w2 w3", max_tokens=8, temperature=0)
    assert c.choices[0].text == offline.text("w2 w3", "a1", 8)
    messages = [{"role": "user", "content": "w9 w8"}]
    chat = client.chat.completions.create(model="a0", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == offline.chat(messages, "a0", 8)
    stream = client.chat.completions.create(model="a0", messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="w1", max_tokens=2)
