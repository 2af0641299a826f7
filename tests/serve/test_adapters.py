"""On-demand loading, LRU eviction under the byte budget, pinning, unloading with requests in flight, hostile
names and links, and corrupt adapters failing only their own requests."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import deltaw

from serve_helpers import ADAPTERS, concurrently, start_server

ADAPTER_BYTES = 9728  # r=4 on q/v/up/down of the 2-layer tiny Llama (v_proj out = 16), fp32


def complete(url: str, model: str, prompt: str = "w1 w2", max_tokens: int = 4, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0, **extra}, timeout=60)


def resident(url: str) -> dict:
    return {a["id"]: a for a in httpx.get(f"{url}/v1/adapters", timeout=10).json()["data"]}


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def test_lru_eviction_and_pin(private_root, tokenizer, offline):
    server, thread, url = start_server(private_root, tokenizer, max_adapter_memory=int(2.5 * ADAPTER_BYTES))
    try:
        for name in ("a0", "a1", "a2"):
            assert complete(url, name).status_code == 200
        assert set(resident(url)) == {"a1", "a2"}  # a0 was least recently used
        assert server.metrics.cache_evictions.value() == 1
        assert server.store.used_bytes() == 2 * ADAPTER_BYTES <= server.store.budget

        r = httpx.post(f"{url}/v1/adapters", json={"name": "a1", "pin": True}, timeout=30)
        assert r.status_code == 200 and r.json()["pinned"] is True
        for name in ("a0", "a2", "a3", "a0"):
            r = complete(url, name, max_tokens=6)
            assert r.json()["choices"][0]["text"] == offline.text("w1 w2", name, 6)
        state = resident(url)
        assert "a1" in state and state["a1"]["pinned"] and len(state) == 2
        assert server.metrics.cache_evictions.value() >= 3

        # Pinned adapters hold the whole budget: a third adapter cannot fit, answered 503 in OpenAI format.
        assert httpx.post(f"{url}/v1/adapters", json={"name": "a2", "pin": True}, timeout=30).status_code == 200
        assert_openai_error(complete(url, "a3"), 503, "adapter_memory_exhausted")
        assert complete(url, "a1").status_code == 200  # the rest keeps working
        assert httpx.post(f"{url}/v1/adapters", json={"name": "a2", "pin": False}, timeout=30).json()["pinned"] is False
        assert complete(url, "a3").status_code == 200
        assert set(resident(url)) == {"a1", "a3"}
    finally:
        thread.stop()


def test_unload_with_request_in_flight(private_root, tokenizer, offline):
    server, thread, url = start_server(private_root, tokenizer)
    try:
        assert httpx.post(f"{url}/v1/adapters", json={"name": "a3"}, timeout=30).status_code == 200
        gate = threading.Event()
        blocked = server.scheduler.call(gate.wait)  # hold the scheduler between steps
        with ThreadPoolExecutor(2) as pool:
            stream = pool.submit(complete, url, "a3", "w4 w5 w6", 40)
            deadline = time.monotonic() + 10
            while server.scheduler.queue_depth() < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            unload = pool.submit(httpx.delete, f"{url}/v1/adapters/a3", timeout=30)
            time.sleep(0.3)  # the DELETE is queued behind the gate
            gate.set()
            blocked.result(5)
            answer = unload.result(30).json()
            assert answer["status"] == "draining" and answer["in_flight"] == 1
            r = stream.result(60)
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == offline.text("w4 w5 w6", "a3", 40)
        assert "a3" not in resident(url)  # deleted when its last request finished
        assert "a3" not in server.store.resident_names()
        # Still on disk: a later request loads it again on demand.
        assert complete(url, "a3").status_code == 200
        assert httpx.delete(f"{url}/v1/adapters/a3", timeout=30).json()["status"] == "unloaded"
        assert_openai_error(httpx.delete(f"{url}/v1/adapters/a3", timeout=30), 404, "model_not_found")
    finally:
        thread.stop()


def test_path_traversal_and_symlink_escape_rejected(private_root, tmp_path, tokenizer):
    outside = tmp_path / "outside"
    shutil.copytree(private_root / "a0", outside / "evil")
    os.symlink(outside / "evil", private_root / "escape")  # a directory link out of the root
    (private_root / "linked_files").mkdir()  # files linked out of the root
    os.symlink(outside / "evil" / "adapter_config.json", private_root / "linked_files" / "adapter_config.json")
    os.symlink(outside / "evil" / "adapter_model.safetensors",
               private_root / "linked_files" / "adapter_model.safetensors")
    os.symlink(private_root / "a1", private_root / "alias")  # a link that stays inside is fine
    server, thread, url = start_server(private_root, tokenizer)
    try:
        for name in ("../outside/evil", "/etc/passwd", "a0/../a1", "..", ".", "a0/", "a 0", "%2e%2e", "a0\x00"):
            assert_openai_error(complete(url, name), 400, "invalid_model_name")
        body = assert_openai_error(complete(url, "keys"), 400, "invalid_model_name")  # a torch dict attribute
        assert "ParameterDict" in body["message"]
        for name in ("escape", "linked_files"):
            assert_openai_error(complete(url, name), 403, "adapter_outside_root")
            assert_openai_error(httpx.post(f"{url}/v1/adapters", json={"name": name}, timeout=10), 403)
        assert_openai_error(httpx.post(f"{url}/v1/adapters", json={"name": "../a0"}, timeout=10), 400)
        assert httpx.delete(f"{url}/v1/adapters/..%2Fa0", timeout=10).status_code in (400, 404)
        assert_openai_error(complete(url, "missing"), 404, "model_not_found")
        assert complete(url, "alias").status_code == 200
        listed = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
        assert listed == {"tiny", "alias", *ADAPTERS}
        assert not any("evil" in n or "escape" in n for n in server.store.resident_names())
    finally:
        thread.stop()


def test_corrupt_adapter_fails_only_its_own_requests(private_root, tokenizer, offline):
    (private_root / "truncated").mkdir()
    shutil.copy(private_root / "a0" / "adapter_config.json", private_root / "truncated")
    data = (private_root / "a0" / "adapter_model.safetensors").read_bytes()
    (private_root / "truncated" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copytree(private_root / "a1", private_root / "badconfig")
    (private_root / "badconfig" / "adapter_config.json").write_text("{not json")
    shutil.copytree(private_root / "a2", private_root / "wrongshape")
    cfg = json.loads((private_root / "wrongshape" / "adapter_config.json").read_text())
    cfg["r"] = 8
    (private_root / "wrongshape" / "adapter_config.json").write_text(json.dumps(cfg))
    server, thread, url = start_server(private_root, tokenizer)
    try:
        broken = ["truncated", "badconfig", "wrongshape"] * 3
        good = [("a0", "w3 w4"), ("a1", "w5"), ("tiny", "w6 w7"), ("a2", "w8")] * 3

        items = [(b, "w1") for b in broken] + good
        answers = concurrently(url, [{"model": m, "prompt": p, "max_tokens": 8, "temperature": 0} for m, p in items])
        for (model, prompt), (status, body) in zip(items, answers):
            if model in ("truncated", "badconfig", "wrongshape"):
                assert status == 422 and set(body["error"]) == {"message", "type", "param", "code"}
                assert body["error"]["code"] == "adapter_load_failed"
                assert model in body["error"]["message"] and len(body["error"]["message"]) > 40  # says why
            else:
                assert status == 200, body
                assert body["choices"][0]["text"] == offline.text(prompt, None if model == "tiny" else model, 8)
        with httpx.stream("POST", f"{url}/v1/completions", json={"model": "truncated", "prompt": "w1",
                                                                "stream": True}, timeout=30) as s:
            s.read()
            assert s.status_code == 422  # a proper error even for streaming requests
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        assert server.metrics.adapter_loads.value(result="error") == 3  # failures are remembered, not re-read
        # Fixing the files on disk makes the adapter loadable without a restart.
        shutil.copy(private_root / "a1" / "adapter_config.json", private_root / "badconfig" / "adapter_config.json")
        assert complete(url, "badconfig").status_code == 200
    finally:
        thread.stop()


@pytest.mark.parametrize("body,code", [({"pin": True}, 400), ({"name": "tiny"}, 400), ({"name": "a0", "pin": "yes"},
                                                                                        400)])
def test_admin_validation(served, body, code):
    _, url = served
    assert_openai_error(httpx.post(f"{url}/v1/adapters", json=body, timeout=10), code)


def test_adapters_with_their_own_heads_are_never_mixed(private_root, tokenizer, offline):
    """An adapter with a modules_to_save copy of lm_head cannot share a batch with rows that need another head:
    the scheduler keeps them apart (FIFO), and every answer still equals offline generation."""
    import torch

    import deltaw
    from serve_helpers import TARGETS, make_llama

    builder = make_llama()
    deltaw.attach(builder, deltaw.LoraConfig(r=4, target_modules=TARGETS, modules_to_save=("lm_head",)), "h0")
    with torch.no_grad():
        for p in deltaw.adapter_parameters(builder, "h0"):
            p.normal_(0.0, 0.3)
    deltaw.save(builder, private_root / "h0", "h0")
    reference = make_llama()
    deltaw.load(reference, private_root / "h0", "h0", activate=False)

    server, thread, url = start_server(private_root, tokenizer, max_batch_size=8, max_wait_ms=50)
    try:
        items = [("h0", "w1 w2"), ("a0", "w1 w2"), ("h0", "w3"), ("tiny", "w1 w2"), ("a1", "w4 w5"), ("h0", "w6")]
        answers = concurrently(url, [{"model": m, "prompt": p, "max_tokens": 8, "temperature": 0} for m, p in items])
        for (model, prompt), (status, body) in zip(items, answers):
            assert status == 200, body
            if model == "h0":
                ids = tokenizer(prompt)["input_ids"]
                with deltaw.using(reference, "h0"), torch.no_grad():
                    out = reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
                new = out[0, len(ids):].tolist()
                want = tokenizer.decode(new[:new.index(2)] if 2 in new else new, skip_special_tokens=True)
            else:
                want = offline.text(prompt, None if model == "tiny" else model, 8)
            assert body["choices"][0]["text"] == want
    finally:
        thread.stop()


def test_a_failing_forward_fails_only_its_own_sequence(private_root, tokenizer, offline):
    """A forward error (simulated for rows of one adapter) fails that request with a 500 in OpenAI format; the
    sequences prefilled with it are retried alone and answer correctly."""
    server, thread, url = start_server(private_root, tokenizer, max_batch_size=8, max_wait_ms=100)
    batch = server.scheduler.batch
    real_prefill = batch.prefill

    def flaky_prefill(seqs):
        if any(s.adapter == "a2" for s in seqs):
            raise RuntimeError("simulated kernel failure")
        return real_prefill(seqs)

    batch.prefill = flaky_prefill
    try:
        items = [("a0", "w1 w2"), ("a2", "w1 w2"), ("tiny", "w3"), ("a1", "w4 w5")]
        answers = concurrently(url, [{"model": m, "prompt": p, "max_tokens": 6, "temperature": 0} for m, p in items])
        for (model, prompt), (status, body) in zip(items, answers):
            if model == "a2":
                assert status == 500 and body["error"]["type"] == "server_error"
                assert "simulated kernel failure" in body["error"]["message"]
            else:
                assert status == 200, body
                assert body["choices"][0]["text"] == offline.text(prompt, None if model == "tiny" else model, 6)
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        assert server.store.snapshot()["a2"]["in_flight"] == 0  # its reference was released
    finally:
        thread.stop()


def test_client_that_gives_up_is_dropped_before_any_compute(private_root, tokenizer):
    server, thread, url = start_server(private_root, tokenizer)
    try:
        gate = threading.Event()
        blocked = server.scheduler.call(gate.wait)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/completions", timeout=0.5,
                       json={"model": "tiny", "prompt": "w1", "max_tokens": 30, "temperature": 0})
        deadline = time.monotonic() + 10
        while not all(s.cancelled for s in server.scheduler._queue) and time.monotonic() < deadline:
            time.sleep(0.1)  # the handler notices the disconnect within about a second
        gate.set()
        blocked.result(5)
        while server.scheduler.queue_depth() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.scheduler.queue_depth() == 0
        assert server.metrics.generated_tokens.value() == 0
    finally:
        thread.stop()


def test_waiting_for_the_budget_is_not_counted_as_cache_misses(private_root, tokenizer):
    """An admission that waits for running rows to free the budget is retried every step; only the load that
    finally happens is a miss (it was counted on every retry: ~20 misses for 2 loads)."""
    server, thread, url = start_server(private_root, tokenizer, max_adapter_memory=ADAPTER_BYTES)
    decode = server.scheduler.batch.decode

    def slow_decode():
        time.sleep(0.03)  # keep a0's request running while a1's waits
        return decode()

    server.scheduler.batch.decode = slow_decode
    try:
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(complete, url, "a0", "w4", 40)
            deadline = time.monotonic() + 10
            while not server.scheduler.batch.rows and time.monotonic() < deadline:
                time.sleep(0.01)
            short = complete(url, "a1", "w4", 2)  # waits until a0's request finishes, then evicts a0
            assert long.result(60).status_code == 200 and short.status_code == 200
        m = server.metrics
        assert (m.cache_misses.value(), m.cache_hits.value(), m.cache_evictions.value()) == (2, 0, 1)
    finally:
        thread.stop()


def test_non_streaming_client_that_gives_up_mid_generation_frees_its_row(private_root, tokenizer):
    """The disconnect check ran only when no token arrived for a second, so a request whose tokens kept coming
    held its row (and its adapter reference) until max_tokens after the client had gone."""
    server, thread, url = start_server(private_root, tokenizer, max_tokens_limit=100)
    decode = server.scheduler.batch.decode

    def slow_decode():
        time.sleep(0.05)  # 100 tokens: ~5 s, a token every 50 ms
        return decode()

    server.scheduler.batch.decode = slow_decode
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                f"{url}/v1/completions", timeout=0.5,
                json={"model": "a0", "prompt": "w4", "max_tokens": 100, "temperature": 0})
        deadline = time.monotonic() + 2.5
        while server.scheduler.batch.rows and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.scheduler.batch.rows
        assert server.metrics.generated_tokens.value() < 60
        assert server.store.snapshot()["a0"]["in_flight"] == 0
    finally:
        thread.stop()


def test_an_unload_cancelled_by_a_load_is_not_counted(private_root):
    """deltaw_adapter_unloads_total counted a draining unload at once, even when a later load cancelled it and
    the adapter never left."""
    from deltaw.serve.adapters import AdapterStore
    from deltaw.serve.metrics import Metrics
    from serve_helpers import make_llama

    metrics = Metrics(8)
    store = AdapterStore(make_llama(), private_root, 1 << 20, metrics)
    store.acquire("a0")  # one running sequence
    assert store.unload("a0")["status"] == "draining"
    store.load("a0")  # cancels the pending unload
    store.release("a0")
    assert store.resident_names() == ["a0"] and metrics.adapter_unloads.value() == 0
    store.acquire("a0")
    assert store.unload("a0")["status"] == "draining"
    store.release("a0")  # last reference: now it goes
    assert store.resident_names() == [] and metrics.adapter_unloads.value() == 1
    store.load("a1")
    assert store.unload("a1")["status"] == "unloaded" and metrics.adapter_unloads.value() == 2


def test_adapter_stored_in_half_precision_is_budgeted_at_its_loaded_size(private_root):
    """The budget estimate used the file's dtype: an fp16 file loaded as fp32 factors passed the check, then
    sat resident over the budget (unreferenced, answering 'wait' forever). It is refused up front, and an
    adapter that turns out too large once loaded is unloaded again."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from deltaw.serve.adapters import AdapterStore, Wait
    from deltaw.serve.errors import APIError
    from deltaw.serve.metrics import Metrics
    from serve_helpers import make_llama

    src, dst = private_root / "a0", private_root / "a0half"
    shutil.copytree(src, dst)
    with safe_open(str(src / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).half() for k in f.keys()}
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata=meta)
    half_bytes = sum(t.numel() * 2 for t in tensors.values())
    store = AdapterStore(make_llama(), private_root, half_bytes * 3 // 2, Metrics(8))
    with pytest.raises(APIError) as err:
        store.acquire("a0half")
    assert err.value.status == 422 and store.resident_names() == []
    store._estimate = lambda directory: 0  # an estimate that is too low (e.g. an unreadable header)
    with pytest.raises(Wait):
        store.acquire("a0half")
    assert store.resident_names() == [] and store.used_bytes() == 0
    del store._estimate
    store.budget = half_bytes * 2  # fits once loaded: served normally
    store.acquire("a0half")
    assert store.resident_names() == ["a0half"] and store.used_bytes() == half_bytes * 2


def test_admin_load_is_not_a_cache_miss(private_root):
    """POST /v1/adapters loads on purpose: it was counted in deltaw_adapter_cache_misses_total, so preloading
    made the cache look cold (and skewed the hit ratio). It is a load (deltaw_adapter_loads_total), not a miss."""
    from deltaw.serve.adapters import AdapterStore
    from deltaw.serve.metrics import Metrics
    from serve_helpers import make_llama

    metrics = Metrics(8)
    store = AdapterStore(make_llama(), private_root, 1 << 20, metrics)
    store.load("a0", pin=True)
    store.load("a1")
    assert metrics.cache_misses.value() == 0 and metrics.adapter_loads.value(result="ok") == 2
    store.acquire("a0")  # resident: a hit
    store.acquire("a2")  # loaded for a request: a miss
    assert (metrics.cache_hits.value(), metrics.cache_misses.value()) == (1, 1)
    assert metrics.adapter_loads.value(result="ok") == 3


def _save_big_adapter(root) -> None:
    """An adapter twice the size of a0..a3 (r=8), so that evicting one small idle adapter may not be enough."""
    import deltaw
    from serve_helpers import TARGETS, make_llama

    model = make_llama()
    deltaw.attach(model, deltaw.LoraConfig(r=8, alpha=16, target_modules=TARGETS), "big")
    deltaw.save(model, root / "big", "big")


def test_waiting_for_room_evicts_nothing_until_the_adapter_fits(private_root):
    """Making room evicted idle adapters one by one and only then found that the running ones still left no
    room: the admission waited anyway, and every retry threw away whatever had become idle meanwhile. Now an
    eviction happens only when it lets the adapter fit, and only as many adapters as needed go."""
    from deltaw.serve.adapters import AdapterStore, Wait
    from deltaw.serve.metrics import Metrics
    from serve_helpers import make_llama

    _save_big_adapter(private_root)
    metrics = Metrics(8)
    store = AdapterStore(make_llama(), private_root, 3 * ADAPTER_BYTES, metrics)
    store.acquire("a0")
    store.acquire("a1")  # two running sequences
    store.load("a2")  # idle
    for _ in range(3):  # the scheduler retries every step
        with pytest.raises(Wait):
            store.acquire("big")  # 2 units; a0 + a1 leave 1 even with a2 gone
    assert store.resident_names() == ["a0", "a1", "a2"] and metrics.cache_evictions.value() == 0
    store.release("a1")  # a1's sequence finishes: evicting a1 and a2 makes room
    store.acquire("big")
    assert store.resident_names() == ["a0", "big"] and metrics.cache_evictions.value() == 2
    assert store.used_bytes() == 3 * ADAPTER_BYTES


def test_an_adapter_over_its_estimate_evicts_nothing_when_it_cannot_fit(private_root):
    """The same after loading: an adapter whose estimate was low evicted idle adapters to settle the budget,
    then was unloaded anyway because the running ones left no room -- and was loaded again (and evicted more)
    on every retry. Its loaded size is remembered, so retries wait without loading it again."""
    from deltaw.serve.adapters import AdapterStore, Wait
    from deltaw.serve.metrics import Metrics
    from serve_helpers import make_llama

    _save_big_adapter(private_root)
    metrics = Metrics(8)
    store = AdapterStore(make_llama(), private_root, 3 * ADAPTER_BYTES, metrics)
    store.acquire("a0")
    store.acquire("a1")
    store.load("a2")
    store._estimate = lambda directory: 0  # an estimate that is too low (e.g. an unreadable header)
    for _ in range(3):
        with pytest.raises(Wait):
            store.acquire("big")
    assert store.resident_names() == ["a0", "a1", "a2"] and metrics.cache_evictions.value() == 0
    assert metrics.adapter_loads.value(result="ok") == 4  # a0, a1, a2, and big once
    store.release("a1")
    store.acquire("big")  # its known size: a1 and a2 make room before it is loaded
    assert store.resident_names() == ["a0", "big"] and metrics.cache_evictions.value() == 2
    assert store.used_bytes() == 3 * ADAPTER_BYTES


def test_a_loaded_adapter_whose_folder_was_deleted_is_still_a_model(private_root, tokenizer):
    """GET /v1/models/{id} located the adapter on disk first, so a resident adapter whose folder was removed
    after loading answered 404 while it was still being served (and listed by GET /v1/models)."""
    server, thread, url = start_server(private_root, tokenizer)
    try:
        assert httpx.post(f"{url}/v1/adapters", json={"name": "a0"}, timeout=30).status_code == 200
        shutil.rmtree(private_root / "a0")
        shutil.rmtree(private_root / "a1")  # never loaded: really gone
        r = httpx.get(f"{url}/v1/models/a0", timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "a0" and r.json()["loaded"] is True
        assert "a0" in [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
        assert complete(url, "a0").status_code == 200  # it is being served
        assert_openai_error(httpx.get(f"{url}/v1/models/a1", timeout=10), 404, "model_not_found")
        assert_openai_error(httpx.get(f"{url}/v1/models/bad.name", timeout=10), 400, "invalid_model_name")
        # pinning and unpinning a resident adapter needs no folder either
        r = httpx.post(f"{url}/v1/adapters", json={"name": "a0", "pin": True}, timeout=30)
        assert r.status_code == 200 and r.json()["pinned"] is True, r.text
        r = httpx.post(f"{url}/v1/adapters", json={"name": "a0", "pin": False}, timeout=30)
        assert r.status_code == 200 and r.json()["pinned"] is False, r.text
        assert_openai_error(httpx.post(f"{url}/v1/adapters", json={"name": "a1"}, timeout=30), 404,
                            "model_not_found")
    finally:
        thread.stop()


def test_non_streaming_request_is_reaped_while_its_tokens_keep_coming(private_root, tokenizer):
    """With every forward slowed (a token every ~20 ms, so an event always arrives within the 1 s idle wait),
    the disconnect of a non-streaming client was never asked for: the row ran to max_tokens (found in review;
    the test above slows only the decode step's Python and passed before)."""
    import asyncio

    server, thread, url = start_server(private_root, tokenizer, max_tokens_limit=120)
    forward = server.scheduler.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    server.scheduler.model.forward = slow_forward

    async def give_up() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "a0", "prompt": "w1", "max_tokens": 120, "temperature": 0}
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.post(f"{url}/v1/completions", json=body), 0.5)

    try:
        asyncio.run(give_up())
        deadline = time.monotonic() + 1.0
        while server.scheduler.batch.rows and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server.scheduler.batch.rows, "the row of a gone client kept generating"
        assert server.metrics.generated_tokens.value() < 100
    finally:
        thread.stop()


def _scheduler(root, **settings):
    """A started Scheduler over a tiny Llama whose forward is slowed (~10 ms), with its store."""
    from deltaw.serve.adapters import AdapterStore
    from deltaw.serve.metrics import Metrics
    from deltaw.serve.scheduler import Scheduler
    from deltaw.serve.settings import ServeSettings
    from serve_helpers import make_llama

    st = ServeSettings(max_wait_ms=0.0, **settings)
    metrics = Metrics(st.max_batch_size)
    model = make_llama()
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.01)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    store = AdapterStore(model, root, st.max_adapter_memory, metrics, reserved=("tiny",))
    sched = Scheduler(model, store, st, metrics, eos_ids=[2], pad_id=0)
    sched.start()
    return sched, store


def _seq(prompt, adapter, max_tokens):
    from deltaw.serve.engine import Seq

    done = threading.Event()
    events: list = []

    def emit(event):
        events.append(event)
        if event[0] in ("done", "error"):
            done.set()

    return Seq(prompt=list(prompt), adapter=adapter, max_tokens=max_tokens, emit=emit), done, events


def test_a_draining_adapter_does_not_hold_up_the_requests_behind_it(private_root):
    """A request for an adapter being unloaded (DELETE while its rows run) waited at the head of the queue and,
    FIFO, kept every request behind it out of a batch with free rows until the long row finished (found in
    review)."""
    sched, store = _scheduler(private_root, max_batch_size=8)
    try:
        long, long_done, _ = _seq([1, 10], "a0", 100)  # ~1 s at ~10 ms per step
        sched.submit([long])
        deadline = time.monotonic() + 10
        while not sched.batch.rows and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.call(lambda: store.unload("a0")).result(5)["status"] == "draining"
        waiting, waiting_done, _ = _seq([1, 11], "a0", 3)
        base, base_done, _ = _seq([1, 12], None, 3)
        other, other_done, _ = _seq([1, 13], "a1", 3)
        for item in (waiting, base, other):
            sched.submit([item])
        assert base_done.wait(5) and other_done.wait(5)
        assert not long_done.is_set(), "the base and a1 requests ran while a0 drained"
        assert long_done.wait(30) and waiting_done.wait(30)  # then a0 is loaded again for the waiting one
    finally:
        sched.stop()


def test_cancelled_queued_requests_do_not_fill_the_queue(private_root):
    """While the batch was full, requests whose clients had gone stayed queued and counted against --max-queue:
    a live client got 429 behind dead entries (found in review)."""
    sched, _ = _scheduler(private_root, max_batch_size=1, max_queue=3)
    try:
        long, long_done, _ = _seq([1, 10], "a0", 100)
        sched.submit([long])
        deadline = time.monotonic() + 10
        while not sched.batch.rows and time.monotonic() < deadline:
            time.sleep(0.01)
        dead = [_seq([1, 11 + i], None, 5) for i in range(3)]
        for item, _, _ in dead:
            sched.submit([item])
        for item, _, _ in dead:
            item.cancelled = True
        live, live_done, _ = _seq([1, 20], None, 2)
        sched.submit([live])  # raised APIError 429 before
        for _, done, events in dead:
            assert done.wait(2) and events[-1] == ("done", "cancelled")
        assert not long_done.is_set(), "the dead entries were answered while the batch was still full"
        assert live_done.wait(30)
    finally:
        sched.stop()


def test_cancelled_entries_behind_a_waiting_head_are_dropped(private_root, monkeypatch):
    """Cancelled entries were dropped only when the batch was full or when admission reached them; behind a head
    waiting for adapter memory (with free rows) they stayed, and since they no longer count against --max-queue
    the queue grew without bound (found in review)."""
    from deltaw.serve.adapters import Wait

    sched, store = _scheduler(private_root, max_batch_size=8, max_queue=3)
    real = store.acquire

    def acquire(name):
        if name == "a1":
            raise Wait(name)
        return real(name)

    monkeypatch.setattr(store, "acquire", acquire)
    try:
        head, _, _ = _seq([1, 10], "a1", 3)  # waits for memory that never frees here
        sched.submit([head])
        dead = []
        for i in range(50):
            item, done, events = _seq([1, 11 + i % 40], None, 3)
            sched.submit([item])
            item.cancelled = True
            dead.append((done, events))
        assert all(done.wait(5) for done, _ in dead), "dead entries behind the head were never answered"
        assert all(events[-1] == ("done", "cancelled") for _, events in dead)
        assert sched.queue_depth() == 1
    finally:
        head.cancelled = True
        sched.stop()


def test_decode_of_an_fp32_cpu_model_uses_the_native_rows_kernel(private_root):
    """The engine forced "dense" for decode whenever the distinct adapters' total rank was small; on an fp32 CPU
    model ``auto`` now picks the native per-row kernel there (no packs to rebuild as rows come and go: 127 vs
    120 tok/s in benchmarks/serve_load.py); elsewhere (half precision, a GPU) dense stays."""
    from deltaw.layers import native
    from deltaw.serve.engine import DecodeBatch
    from serve_helpers import make_llama

    model = make_llama()
    deltaw.load(model, private_root / "a0", "a0", activate=False)
    deltaw.load(model, private_root / "a1", "a1", activate=False)
    expected = "auto" if native.kernel() is not None else "dense"
    assert DecodeBatch(model)._strategy(["a0", "a1", None], decode=True) == expected
    assert DecodeBatch(model)._strategy(["a0", "a1", None], decode=False) == "auto"
    half = make_llama().to(torch.bfloat16)
    deltaw.load(half, private_root / "a0", "a0", activate=False)
    assert DecodeBatch(half)._strategy(["a0", None], decode=True) == "dense"
