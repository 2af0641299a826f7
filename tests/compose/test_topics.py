"""The default path's adapter cache: cached topic adapters are reused, missing ones trained via deltaw.train."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltaw.compose import topics
from deltaw.compose.topics import TopicBudget, topic_adapters


def _fake_adapter(d: Path) -> None:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"x")


def test_cached_adapters_are_reused_without_training(tmp_path, monkeypatch):
    budget = TopicBudget.quick()
    for t in ("business", "tech"):
        _fake_adapter(tmp_path / topics._key(t, budget, None, 0))
    monkeypatch.setattr(topics, "_train_missing", lambda *a, **k: pytest.fail("trained although cached"))
    got = topic_adapters(None, ["business", "tech"], budget, cache_dir=tmp_path)
    assert [t for t, _ in got] == ["business", "tech"]
    assert all(d.parent == tmp_path for _, d in got)


def test_missing_adapters_are_trained_and_keys_depend_on_the_budget(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(topics, "_train_missing", lambda model_path, missing, *a, **k: calls.append(
        [t for t, _ in missing]))
    topic_adapters(None, None, TopicBudget.quick(), cache_dir=tmp_path, quick=True)
    assert calls == [["business", "entertainment", "politics"]]  # --quick: the first three topics
    assert topics._key("tech", TopicBudget(), None, 0) != topics._key("tech", TopicBudget().with_steps(5), None, 0)
    with pytest.raises(ValueError, match="unknown BBC topic"):
        topic_adapters(None, ["weather"], TopicBudget(), cache_dir=tmp_path)
