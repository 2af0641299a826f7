"""Two CPU processes under torchrun (gloo) train the same adapter as one process on the same global batch.

Why equal: each micro-batch's loss is its *sum* divided by the global batch's target count, and the adapter
gradients are summed over ranks, so both runs follow the gradient of the same global mean. They differ only in
floating-point summation order and in padding widths (one batch of 4 vs two of 2), hence a tolerance:
after 4 AdamW steps every adapter weight agrees within atol 1e-5 (observed max |diff| ~1e-7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import tiny_models
import torch

import deltaw
from deltaw.train import TrainConfig, train

TOLERANCE = 1e-5


def test_two_process_ddp_equals_single_process(tmp_path, text_file):
    model_dir = tiny_models.save_tiny_llama(tmp_path / "tiny")
    common = dict(data=str(text_file), model=str(model_dir), steps=4, lr=5e-3, seq_len=48, seed=0)
    model, tok = tiny_models.tiny_llama(0)
    single = train(TrainConfig(output_dir=str(tmp_path / "single"), batch_size=4, progress=False, **common),
                   model=model, tokenizer=tok)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "deltaw.cli.main", "train", "--output", str(tmp_path / "ddp"), "--batch-size", "2", "--no-progress",
           "--data", common["data"], "--model", common["model"], "--steps", "4", "--lr", "5e-3", "--seq-len", "48",
           "--seed", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The summary comes from rank 0 only (train() destroys the process group before the command prints it).
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("adapter:", "steps:", "log:"))]
    assert [line.split(":")[0] for line in summary] == ["adapter", "steps", "log"], proc.stdout
    assert single.rank == 0

    a = deltaw.read_adapter(single.adapter_dir).factors
    b = deltaw.read_adapter(tmp_path / "ddp").factors
    worst = max(float((a[m][k] - b[m][k]).abs().max()) for m in a for k in ("A", "B"))
    assert worst < TOLERANCE, worst
    assert max(float(b[m]["B"].abs().max()) for m in b) > 1e-3  # it did train
    log_single = [json.loads(x) for x in single.log_path.read_text().splitlines() if '"step"' in x]
    log_ddp = [json.loads(x) for x in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    for x, y in zip([r for r in log_single if r["event"] == "step"], [r for r in log_ddp if r["event"] == "step"]):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and x["tokens"] == y["tokens"]
    print(f"max |single - ddp| over adapter weights: {worst:.2e}")
