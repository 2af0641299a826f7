"""Merge on the device of ``DELTAW_TEST_DEVICE`` (conftest.py; default cpu): for every layer kind and dtype the
merged weight is W0 + s·ΔW computed in ≥ fp32 and rounded once, merged = live, and unmerge restores W0 bit for bit.

The CPU-specific merge paths (the fused C kernel, reused memory) have their own tests in test_merge.py; these
are the contracts every device must keep (benchmarks/device_check runs them on CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltaw
from toy_models import randomize

pytestmark = pytest.mark.device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["linear", "conv1d_hf", "embedding", "conv2d"]


def _layer(kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(24, 40)
    if kind == "conv1d_hf":
        from transformers.pytorch_utils import Conv1D
        return Conv1D(40, 24)  # weight (in=24, out=40)
    if kind == "embedding":
        return nn.Embedding(30, 16)
    return nn.Conv2d(6, 10, kernel_size=3, padding=1)


def _input(kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if kind == "embedding":
        return torch.randint(0, 30, (3, 7), generator=g).to(device)
    shape = (3, 6, 8, 8) if kind == "conv2d" else (3, 5, 24)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _delta(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """ΔW = B·A in W0's layout, written here and not by the layer code."""
    if a.dim() > 2:  # conv: ΔW[o, i, k...] = Σ_r B[o, r] A[r, i, k...]
        return torch.einsum("or,ri...->oi...", b.reshape(b.shape[0], -1), a)
    delta = b @ a  # (out, in)
    return delta if delta.shape == shape else delta.T  # Conv1D (in, out) and Embedding (num, dim): transposed


def _assert_rounded_once(layer, weight: float) -> None:
    """The merged weight is W0 + w·s·ΔW computed in ≥ fp32 and rounded once to W0's dtype: within half a unit
    in the last place of that dtype plus fp32's own rounding of the products and the sum (a standard bound,
    proportional to |W0| + |w·s|·|B||A|, so a cancellation cannot hide a lower-precision computation)."""
    w0 = layer._pristine
    a, b = layer.lora_A["a"].detach().double(), layer.lora_B["a"].detach().double()
    ws = weight * layer.scaling["a"]
    exact = w0.double() + ws * _delta(a, b, w0.shape)
    size = w0.double().abs() + abs(ws) * _delta(a.abs(), b.abs(), w0.shape)
    eps32 = torch.finfo(torch.float32).eps
    bound = 0.5 * torch.finfo(w0.dtype).eps * exact.abs() + (a.shape[0] + 2) * eps32 * size \
        + torch.finfo(w0.dtype).tiny
    err = (layer.base_layer.weight.detach().double() - exact).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_is_rounded_once_and_unmerge_restores_bits(kind, dtype, device):
    torch.manual_seed(0)
    model = nn.Sequential(_layer(kind)).to(device=device, dtype=dtype).eval()
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=8, target_modules=["0"]), "a", activate=False)
    randomize(model, "a", std=0.3)
    layer = model[0]
    factor_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # half bases: fp32 factors
    assert all(p.device.type == device.type and p.dtype == factor_dtype
               for p in deltaw.adapter_parameters(model, "a"))
    w0 = layer.base_layer.weight.detach().clone()
    x = _input(kind, device, dtype)
    with torch.no_grad():
        base = model(x)
        deltaw.activate(model, {"a": -0.7})
        live = model(x)
        assert not torch.allclose(live, base)
        for _ in range(3):
            deltaw.merge(model)
            _assert_rounded_once(layer, -0.7)
            tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
            torch.testing.assert_close(model(x), live, rtol=tol, atol=tol)
            with deltaw.disabled(model):
                assert torch.equal(model(x), base)
            deltaw.unmerge(model)
            assert torch.equal(layer.base_layer.weight, w0)
        assert torch.equal(model(x), live)


def test_load_puts_factors_on_the_layers_device_and_files_move_between_devices(device, tmp_path):
    """An adapter saved from a model on ``device`` loads into a CPU model with the same bits, and back."""
    from toy_models import tiny_llama
    torch.manual_seed(0)
    model = tiny_llama().eval().to(device)
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=8, target_modules="all-linear",
                                           modules_to_save=["lm_head"]), "a")
    randomize(model, "a")
    deltaw.save(model, tmp_path / "a", "a")
    torch.manual_seed(0)
    on_cpu = tiny_llama().eval()  # the same base weights, on CPU (the file's base fingerprint must match)
    deltaw.load(on_cpu, tmp_path / "a", "a")
    mine = dict(zip(deltaw.state(model).layers, deltaw.state(model).layers.values()))
    for path, layer in deltaw.state(on_cpu).layers.items():
        assert torch.equal(layer.lora_A["a"], mine[path].lora_A["a"].cpu())
        assert torch.equal(layer.lora_B["a"], mine[path].lora_B["a"].cpu())
    deltaw.save(on_cpu, tmp_path / "back", "a")
    torch.manual_seed(0)
    again = tiny_llama().eval().to(device)
    deltaw.load(again, tmp_path / "back", "a")
    assert all(p.device.type == device.type for p in again.parameters())
    ids = torch.tensor([[1, 5, 9, 3, 7]], device=device)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    # Without a head the factors are the whole file: on another device they arrive as views of one copy of it
    # (the head above kept that load factor by factor). Same values as the file, same outputs as the original.
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=8, target_modules="all-linear"), "b")
    randomize(model, "b", seed=5)
    deltaw.save(model, tmp_path / "b", "b")
    deltaw.load(again, tmp_path / "b", "b")
    on_file = deltaw.read_adapter(tmp_path / "b").factors
    for path, layer in deltaw.state(again).layers.items():
        assert torch.equal(layer.lora_A["b"].cpu(), on_file[path]["A"]), path
        assert torch.equal(layer.lora_B["b"].cpu(), on_file[path]["B"]), path
    with torch.no_grad(), deltaw.using(model, "b"), deltaw.using(again, "b"):
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["high", "medium"])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_keeps_full_precision_whatever_the_forward_may_use(kind, precision, device):
    """``set_float32_matmul_precision("high")`` lets CUDA compute fp32 products in TF32 (10-bit mantissa),
    "medium" lets CPUs with bf16 units use bf16: a merge then no longer gave W0 + ΔW rounded once. The merge
    computes in full precision and leaves the user's setting as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(_layer(kind)).to(device).eval()
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=8, target_modules=["0"]), "a")
    randomize(model, "a", std=0.3)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        deltaw.merge(model, {"a": 1.3})
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(before)
    _assert_rounded_once(model[0], 1.3)


@pytest.mark.parametrize("backend", ["cuda", "mkldnn"])
def test_merge_works_and_restores_under_the_per_backend_precision_api(backend, device):
    """torch >= 2.9: once a per-backend fp32_precision is set (transformers' enable_tf32 does), the legacy
    getter raises ("mix of the legacy and new APIs"), and every merge raised with it."""
    matmul = getattr(torch.backends, backend).matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no per-backend precision API")
    torch.manual_seed(0)
    model = nn.Sequential(_layer("linear")).to(device).eval()
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=8, target_modules=["0"]), "a")
    randomize(model, "a", std=0.3)
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        deltaw.merge(model, {"a": 0.9})
        assert matmul.fp32_precision == "tf32"
        deltaw.unmerge(model)
        deltaw.merge_and_unload(model, {"a": 0.9})
    finally:
        matmul.fp32_precision = before
