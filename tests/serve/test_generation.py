"""Completions, chat and streaming over real HTTP, each equal to offline greedy generation; mixed-adapter
concurrency with zero wrong-adapter answers."""

from __future__ import annotations

import json

import httpx
import pytest

from serve_helpers import ADAPTERS, concurrently, mixed_requests, start_server, wrong_answers


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
    before = server.metrics.batch_adapters.render()
    assert wrong_answers(url, mixed_requests(3, 40, (4, 24)), offline) == []
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


# ---- sampling: numerically safe for every accepted temperature, failures isolated per row ----------------------
def _in_order(url: str, bodies: list[dict], gap: float = 0.05) -> list[httpx.Response]:
    """POST the bodies ``gap`` seconds apart (so they are admitted in this order, into one batch when the server's
    max_wait_ms is longer than the gaps) and return the responses in the same order."""
    import asyncio

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = []
            for body in bodies:
                tasks.append(asyncio.create_task(client.post(f"{url}/v1/completions", json=body)))
                await asyncio.sleep(gap)
            return list(await asyncio.gather(*tasks))

    return asyncio.run(main())


def test_sampling_is_safe_at_any_positive_temperature():
    """logits / 4e-39 overflowed float32 to inf (1e-45 always did): softmax gave NaN and torch.multinomial raised,
    a 500 for the request at prefill and, at a decode step, for every row of the batch. Scaled max-subtracted logits
    in float64 cannot overflow: a tiny temperature picks the argmax, as greedy does."""
    import torch

    from deltaw.serve.engine import Seq, choose_tokens

    logits = torch.tensor([[0.3, 1.78, -0.5, 1.7], [-2.0, 0.1, 3.5, 3.4]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for t in (1e-45, 4e-39, 1e-38, 1e-30, 1e-6):
            seqs = [Seq([1], None, 4, lambda e: None, temperature=t, seed=s) for s in (1, 2)]
            assert choose_tokens(logits.to(dtype), seqs) == [1, 2], (dtype, t)
    hot = Seq([1], None, 4, lambda e: None, temperature=0.5, seed=3)  # 3e38 / 0.5 overflowed float32 too
    assert choose_tokens(torch.tensor([[1e30, -1e30, 3e38]]), [hot]) == [2]


def test_a_row_whose_sampling_fails_does_not_fail_its_neighbours():
    import torch

    from deltaw.serve.engine import Seq, choose_tokens

    logits = torch.tensor([[0.0, 2.0, 1.0], [float("nan"), 1.0, 0.0], [5.0, 0.0, 0.0], [float("inf"), 0.0, 0.0]])
    seqs = [Seq([1], None, 4, lambda e: None, temperature=t, seed=0) for t in (0.0, 1.0, 1e-3, 1.0)]
    out = choose_tokens(logits, seqs)
    assert out[0] == 1 and out[2] == 0
    assert isinstance(out[1], ValueError) and "not finite" in str(out[1])
    assert isinstance(out[3], ValueError)


def test_a_row_that_cannot_be_sampled_fails_alone_and_seeded_neighbours_are_unchanged(tokenizer, offline):
    """A row whose sampling fails at a decode step failed every running row (an unrelated greedy request got a
    500); at prefill it sent the batch into the one-by-one retry with the neighbours' generators already advanced,
    so a seeded request answered differently than alone. Non-finite logits are injected for the rows seeded 666."""
    server, thread, url = start_server(None, tokenizer, max_batch_size=8, max_tokens_limit=32, max_wait_ms=300)
    batch = server.scheduler.batch
    real_prefill, real_decode = batch.prefill, batch.decode
    poison = {"prefill": False, "decode": False}
    mixed = []

    def spoil(logits, seqs, where):
        if not poison[where] or not any(s.seed == 666 for s in seqs):
            return logits
        mixed.append((where, len(seqs)))
        logits = logits.clone()
        for i, s in enumerate(seqs):
            if s.seed == 666:
                logits[i] = float("nan")
        return logits

    def prefill(seqs):
        logits, cache = real_prefill(seqs)
        return spoil(logits, seqs, "prefill"), cache

    batch.prefill = prefill
    batch.decode = lambda: spoil(real_decode(), batch.rows, "decode")
    try:
        victim = {"model": "tiny", "prompt": "w1 w2 w3", "max_tokens": 20, "temperature": 0}
        bad = {"model": "tiny", "prompt": "w49", "max_tokens": 8, "temperature": 1.0, "seed": 666}
        poison["decode"] = True
        r_victim, r_bad = _in_order(url, [victim, bad])
        assert r_victim.status_code == 200, r_victim.text
        assert r_victim.json()["choices"][0]["text"] == offline.text("w1 w2 w3", None, 20)
        assert r_bad.status_code == 500 and "not finite" in r_bad.json()["error"]["message"]
        assert ("decode", 2) in mixed, mixed  # the failing row really shared a decode step with the victim

        poison["decode"], poison["prefill"] = False, True
        seeded = {"model": "tiny", "prompt": "w1 w2 w3", "max_tokens": 8, "temperature": 1.0, "seed": 7}
        alone = httpx.post(f"{url}/v1/completions", json=seeded, timeout=60).json()["choices"][0]["text"]
        r_seeded, r_bad = _in_order(url, [seeded, bad])  # the seeded row samples first, then its neighbour fails
        assert ("prefill", 2) in mixed, mixed
        assert r_seeded.status_code == 200 and r_seeded.json()["choices"][0]["text"] == alone
        assert r_bad.status_code == 500
        assert server.scheduler.alive
    finally:
        thread.stop()


def test_a_retried_prefill_restores_each_sequences_generator(tokenizer, monkeypatch):
    """When a batched prefill fails after its rows sampled their first tokens, every sequence is retried alone:
    its generator must be put back first, or a seeded request answers differently than alone."""
    import deltaw.serve.scheduler as scheduler_module

    server, thread, url = start_server(None, tokenizer, max_batch_size=8, max_tokens_limit=32, max_wait_ms=300)
    real = scheduler_module.choose_tokens
    batched = []

    def fails_when_batched(logits, seqs):
        out = real(logits, seqs)  # the generators have drawn by now
        if len(seqs) > 1 and not batched:
            batched.append(len(seqs))
            raise RuntimeError("simulated failure after sampling")
        return out

    try:
        seeded = {"model": "tiny", "prompt": "w1 w2 w3", "max_tokens": 8, "temperature": 1.0, "seed": 11}
        greedy = {"model": "tiny", "prompt": "w4", "max_tokens": 8, "temperature": 0}
        alone = httpx.post(f"{url}/v1/completions", json=seeded, timeout=60).json()["choices"][0]["text"]
        monkeypatch.setattr(scheduler_module, "choose_tokens", fails_when_batched)
        r_seeded, r_greedy = _in_order(url, [seeded, greedy])
        assert batched == [2]
        assert r_seeded.status_code == 200 and r_greedy.status_code == 200, (r_seeded.text, r_greedy.text)
        assert r_seeded.json()["choices"][0]["text"] == alone
    finally:
        thread.stop()


def test_chat_template_refusing_the_conversation_is_a_400():
    """raise_exception(...) in a chat template ("System role not supported", "roles must alternate") escaped as
    jinja2's TemplateError: a 500 internal error instead of a 400 on 'messages' saying why."""
    from serve_helpers import make_tokenizer

    tok = make_tokenizer()
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant{% endif %}")
    server, thread, url = start_server(None, tok, max_batch_size=4, max_tokens_limit=8)
    try:
        body = {"model": "tiny", "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": "w1"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        body["messages"].insert(0, {"role": "system", "content": "w3"})
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "messages"
        assert "System role not supported" in error["message"]
    finally:
        thread.stop()
