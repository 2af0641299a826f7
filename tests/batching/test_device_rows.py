"""Mixed batches on the device of ``DELTAW_TEST_DEVICE`` (conftest.py; default cpu): every row equals that row
run alone with its spec, on every strategy (``native`` is CPU-only and falls back elsewhere), for Linear, Conv1D
and Embedding targets of different ranks, rows without an adapter and weighted stacks; mixed ``generate``
equals per-row generation. test_per_row.py and test_generate.py cover the CPU-specific paths in more depth;
these are the contracts benchmarks/device_check runs on CUDA."""

from __future__ import annotations

import pytest
import torch

import deltaw
from deltaw.batching import STRATEGIES, clear_cache, generate, per_row
from toy_models import EmbeddingNet, randomize, rows_alone, tiny_gpt2, tiny_llama
from toy_models import logits_of as out_of

pytestmark = pytest.mark.device

TOL = dict(rtol=1e-5, atol=1e-5)
ROWS = ["a", None, "b", {"a": 0.5, "c": -1.0}, "c", "a", {"b": 0.7, "a": 0.3}, "b"]
SPECS = {  # per model: (config of a, b, c), vocab
    "llama": (tiny_llama, [dict(r=4, alpha=8, target_modules="all-linear"),
                           dict(r=2, alpha=2, target_modules=["q_proj", "v_proj", "embed_tokens"]),
                           dict(r=8, alpha=4, target_modules=["up_proj", "down_proj", "q_proj"])], 64),
    "gpt2_conv1d": (tiny_gpt2, [dict(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
                                dict(r=2, alpha=4, target_modules=["c_attn", "wte"]),
                                dict(r=6, alpha=6, use_rslora=True, target_modules=["c_fc", "c_attn"])], 64),
    "embedding": (EmbeddingNet, [dict(r=4, alpha=4, target_modules=["emb", "pos", "out"]),
                                 dict(r=2, alpha=4, target_modules=["emb"]),
                                 dict(r=5, alpha=5, target_modules=["emb", "out"])], 10),
}


@pytest.fixture(params=list(SPECS), scope="module")
def built(request, device):
    build, configs, vocab = SPECS[request.param]
    torch.manual_seed(0)
    model = build().eval().to(device)
    for i, (name, cfg) in enumerate(zip("abc", configs)):
        deltaw.attach(model, deltaw.LoraConfig(**cfg), name)
        randomize(model, name, seed=10 + i)
    x = torch.randint(1, vocab, (len(ROWS), 6), generator=torch.Generator().manual_seed(3)).to(device)
    return model, x


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "uniform"])
def test_each_row_equals_that_row_alone(built, strategy):
    model, x = built
    expected = rows_alone(model, x, ROWS)
    assert len({tuple(r.flatten().tolist()) for r in expected[:5]}) == 5, "specs must change the output"
    clear_cache()
    with torch.no_grad(), per_row(model, ROWS, strategy=strategy):
        got = out_of(model, x)
    assert got.device == x.device
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("spec", ["b", {"a": 0.5, "c": -1.0}])
def test_one_spec_on_every_row_equals_using_it(built, spec):
    model, x = built
    with torch.no_grad():
        with deltaw.using(model, spec):
            expected = out_of(model, x)
        for strategy in ("auto", "uniform", "native"):
            with per_row(model, [spec] * len(ROWS), strategy=strategy):
                torch.testing.assert_close(out_of(model, x), expected, **TOL)


def test_generate_mixed_equals_per_row(device):
    torch.manual_seed(0)
    model = tiny_llama().eval().to(device)
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=8, target_modules="all-linear"), "tech")
    deltaw.attach(model, deltaw.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"]),
                  "sport")
    randomize(model, "tech", std=0.3, seed=0)
    randomize(model, "sport", std=0.3, seed=1)
    rows = ["tech", "sport", None, {"tech": 0.5, "sport": 0.5}, "tech"]
    ids = torch.randint(1, 64, (len(rows), 6), generator=torch.Generator().manual_seed(5)).to(device)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    alone = []
    for i, spec in enumerate(rows):
        with deltaw.using(model, spec), torch.inference_mode():
            alone.append(model.generate(input_ids=ids[i:i + 1], **gen))
    expected = torch.cat(alone)
    assert len({tuple(r.tolist()) for r in expected[:4]}) == 4, "adapters must lead to different generations"
    for strategy in ("auto", "grouped", "reference"):
        got = generate(model, ids, adapters=rows, strategy=strategy, **gen)
        assert torch.equal(got, expected), strategy
