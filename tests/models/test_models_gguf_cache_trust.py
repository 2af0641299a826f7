"""The GGUF model cache must not trust a folder written by another transformers, or damaged weights.

A tiny random llama stands in for SmolLM2 and a stubbed conversion for the GGUF parse, so this runs in seconds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import deltaw.models.embedded as emb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import tiny_models  # noqa: E402


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(1000))
    calls: list[Path] = []

    def convert(path: Path):
        calls.append(path)
        return tiny_models.tiny_llama(0)

    monkeypatch.setattr(emb, "_convert_gguf", convert)
    root = tmp_path / "cache"
    return {"gguf": gguf, "root": root, "calls": calls, "target": root / "models" / f"fake-{emb._fingerprint(gguf)}"}


def _write(fake: dict, **manifest_overrides) -> Path:
    model, tok = tiny_models.tiny_llama(0)
    tensors, tied = emb._untied_state_dict(model)
    manifest = {"format": emb._CACHE_FORMAT, "source": fake["gguf"].name, "source_size": fake["gguf"].stat().st_size,
                "tensors": sorted(tensors), "tied": tied, "transformers": emb._transformers_version(),
                **manifest_overrides}
    emb._write_cache_atomically(fake["target"], model, tok, tensors, emb._clean_config_dict(model), manifest)
    return fake["target"]


def test_valid_cache_loads_without_converting(fake: dict) -> None:
    _write(fake)
    model, _ = emb.load_gguf(fake["gguf"], cache_dir=fake["root"])
    assert fake["calls"] == []
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cache_from_another_transformers_is_rebuilt(fake: dict) -> None:
    _write(fake, transformers="4.30.0")
    with pytest.warns(RuntimeWarning, match=r"transformers '4\.30\.0'.*rebuilding"):
        emb.load_gguf(fake["gguf"], cache_dir=fake["root"])
    assert len(fake["calls"]) == 1
    emb.load_gguf(fake["gguf"], cache_dir=fake["root"])  # the rebuilt cache is trusted again
    assert len(fake["calls"]) == 1


def test_damaged_weights_are_detected_and_rebuilt(fake: dict) -> None:
    weights = _write(fake) / emb._WEIGHTS
    raw = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header:] = b"\xff" * (len(raw) - header)  # same size and keys, every float NaN
    weights.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="damaged"):
        model, _ = emb.load_gguf(fake["gguf"], cache_dir=fake["root"])
    assert len(fake["calls"]) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cache_without_checksum_is_rebuilt(fake: dict) -> None:
    target = _write(fake)
    import json

    manifest = json.loads((target / emb._MANIFEST).read_text())
    del manifest["weights_sha256"]
    (target / emb._MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(emb._InvalidCache, match="checksum"):
        emb._load_cache(target, torch.float32)
