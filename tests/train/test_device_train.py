"""Training on the device of ``DELTAW_TEST_DEVICE`` (conftest.py; default cpu), as ``TrainConfig.device`` says:
only the adapter moves, the loss falls, the files load into a CPU model, and an interrupted run resumes to the
same factors bit for bit (the checkpoint carries the device's RNG state). Deterministic kernels are switched on
for the test (CUDA: set CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting; benchmarks/device_check does)."""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch

import deltaw
from deltaw.train import TrainConfig, train

pytestmark = pytest.mark.device


class Interrupt(Exception):
    pass


def _stop_at(step: int):
    def callback(info):
        if info.step == step:
            raise Interrupt(f"stopped after step {step}")
    return callback


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns (named)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_train_on_the_device_and_resume_bit_for_bit(device, deterministic, tmp_path, text_file):
    def go(name, callbacks=(), **overrides):
        cfg = TrainConfig(output_dir=str(tmp_path / name), data=str(text_file), model="tiny", steps=8, lr=1e-2,
                          dropout=0.1, batch_size=2, grad_accum=2, seq_len=48, checkpoint_every=4,
                          device=str(device), progress=False, **overrides)
        model, tok = tiny_models.tiny_llama(0)
        return train(cfg, model=model, tokenizer=tok, callbacks=callbacks), model

    full, model = go("full")
    assert all(p.device.type == device.type for p in deltaw.adapter_parameters(model))
    losses = [r["loss"] for r in map(json.loads, full.log_path.read_text().splitlines()) if r["event"] == "step"]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])
    with pytest.raises(Interrupt):
        go("cut", callbacks=[_stop_at(6)])
    resumed, _ = go("cut", resume=True)
    assert resumed.resumed_from.name == "step-000004"
    a, b = deltaw.read_adapter(full.adapter_dir).factors, deltaw.read_adapter(resumed.adapter_dir).factors
    assert a.keys() == b.keys()
    for module in a:
        assert torch.equal(a[module]["A"], b[module]["A"]) and torch.equal(a[module]["B"], b[module]["B"]), module
    cpu_model, _ = tiny_models.tiny_llama(0)
    deltaw.load(cpu_model, full.adapter_dir, "trained")  # the base fingerprint matches across devices
    cpu_layers = deltaw.state(cpu_model).layers
    for path, layer in deltaw.state(model).layers.items():
        name = next(iter(layer.lora_A))
        assert torch.equal(cpu_layers[path].lora_B["trained"], layer.lora_B[name].detach().cpu()), path
