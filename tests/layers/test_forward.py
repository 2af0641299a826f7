"""The inference fast paths of a wrapped Linear / GPT-2 Conv1D equal the plain autograd path: the fused
``addmm_`` for many tokens and the two-GEMV path for a single token (B = 1 decode)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltaw
from toy_models import Single



@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("shape", [(1, 1, 24), (1, 24), (24,), (3, 5, 24), (1, 2, 24)])
def test_fast_paths_equal_the_autograd_path(kind: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = Single(nn.Linear(24, 40) if kind == "linear" else Conv1D(40, 24))
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=12, target_modules=["layer"]), "a")
    deltaw.attach(model, deltaw.LoraConfig(r=2, alpha=2, target_modules=["layer"]), "b")
    with torch.no_grad():
        for name in ("a", "b"):
            for p in deltaw.adapter_parameters(model, name):
                p.normal_(0, 0.3)
    deltaw.activate(model, {"a": 0.7, "b": -1.5})
    x = torch.randn(shape)
    reference = model(x)  # grad enabled: y + lora_out · scale, no in-place ops
    with torch.no_grad():
        fast = model(x)
    with torch.inference_mode():
        fast_inference = model(x)
    assert fast.shape == reference.shape == fast_inference.shape
    torch.testing.assert_close(fast, reference.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_inference, reference.detach(), rtol=1e-6, atol=1e-6)


def test_disabled_while_merged_runs_the_base_layers_own_forward_and_hooks() -> None:
    """disabled() while merged computed F.linear(x, W0) itself, bypassing a Linear subclass's own forward and the
    base layer's hooks: the "exact base output" was wrong for such layers. Now they run, seeing W0, and a graph
    built there keeps W0 (not the merged weight that is back in place afterwards)."""

    class Doubled(nn.Linear):  # e.g. a scaled / quantised Linear subclass with its own forward
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2.0

    torch.manual_seed(0)
    model = nn.Sequential(Doubled(8, 8), nn.Linear(8, 4)).eval()
    seen: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda module, args, out: seen.append(module.weight.detach().clone()))
    x = torch.randn(3, 8, requires_grad=True)
    base = model(x)
    (base_grad,) = torch.autograd.grad(base.sum(), x)
    w0 = model[1].weight.detach().clone()
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["0", "1"]), "a")
    with torch.no_grad():
        for p in deltaw.adapter_parameters(model, "a"):
            p.normal_()
    deltaw.merge(model, "a")
    merged_weight = model[1].weight
    seen.clear()
    with deltaw.disabled(model):
        out = model(x)
    assert torch.equal(out, base)
    assert len(seen) == 1 and torch.equal(seen[0], w0)
    assert model[1].base_layer.weight is merged_weight and not torch.equal(merged_weight, w0)
    (grad,) = torch.autograd.grad(out.sum(), x)  # after the merged weight is back in place
    torch.testing.assert_close(grad, base_grad, rtol=0, atol=0)


def test_lora_on_a_sparse_embedding_trains_like_on_a_dense_one() -> None:
    """nn.Embedding(sparse=True): the adapter's lookup on Aᵀ (a transposed view) asked for a sparse gradient,
    and backward failed (permute(sparse_coo)). The factor lookup is dense: A and B get the dense twin's grads."""
    torch.manual_seed(0)
    dense, sparse = Single(nn.Embedding(20, 8)), Single(nn.Embedding(20, 8, sparse=True))
    sparse.load_state_dict(dense.state_dict())
    ids = torch.tensor([[1, 2, 3, 2]])
    grads = []
    for model in (dense, sparse):
        deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["layer"]), "a")
        torch.manual_seed(1)
        with torch.no_grad():
            for p in deltaw.adapter_parameters(model, "a"):
                p.normal_()
        (model(ids) ** 2).sum().backward()
        grads.append([p.grad for p in deltaw.adapter_parameters(model, "a")])
    for want, got in zip(*grads):
        assert got is not None and not got.is_sparse
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_embedding_max_norm_renormalises_without_rewriting_the_adapter(norm_type: float) -> None:
    """nn.Embedding(max_norm=...): F.embedding renormalises the rows of the table it is given in place, so the
    adapter's lookup on Aᵀ rewrote A on every forward, no_grad and eval included. The looked-up rows are
    renormalised out of place: the same output as that lookup (PEFT's) gives on a first call, A unchanged."""
    torch.manual_seed(0)
    model = Single(nn.Embedding(20, 8, max_norm=1.0, norm_type=norm_type)).eval()
    deltaw.attach(model, deltaw.LoraConfig(r=4, alpha=4, target_modules=["layer"]), "a")
    with torch.no_grad():
        for p in deltaw.adapter_parameters(model, "a"):
            p.normal_()
    a, b = deltaw.adapter_parameters(model, "a")
    a0, w0 = a.detach().clone(), model.layer.base_layer.weight.detach().clone()
    ids = torch.tensor([[1, 2, 2, 7]])
    h = torch.nn.functional.embedding(ids, a0.T.clone(), max_norm=1.0, norm_type=norm_type)  # renorms the copy
    expected = torch.nn.functional.embedding(ids, w0, max_norm=1.0, norm_type=norm_type) + h @ b.detach().T
    with torch.no_grad():
        first = model(ids)
    second = model(ids)  # autograd path
    assert torch.equal(a.detach(), a0)
    torch.testing.assert_close(first, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(second.detach(), first, rtol=1e-6, atol=1e-6)
    second.sum().backward()
    assert torch.equal(a.detach(), a0) and a.grad is not None
