"""The table of tiny random-init models every shared check runs through.

Each ``Case`` builds a model (deterministically from a seed, so two builds share base weights), an input, a
deltaw config, and the equivalent PEFT config (for interop checks). Covered layer types: Linear (MLP, Llama,
BERT), transformers Conv1D (GPT-2), Embedding (embedding-heavy model), Conv1d/Conv2d (conv net).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import deltaw


class Single(nn.Module):
    """One layer under the name ``layer``: the smallest model a layer-level test can attach to."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):  # x: (N, 3, 8, 8)
        n, c, h, w = x.shape
        y = torch.relu(self.conv1(x.permute(0, 2, 1, 3).reshape(n * h, c, w)))  # (N*H, 8, W)
        y = y.reshape(n, h, 8, w).permute(0, 2, 1, 3)  # (N, 8, H, W)
        y = torch.relu(self.conv2(y))  # (N, 12, H/2, W/2)
        return self.fc(y.mean(dim=(2, 3)))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.pos = nn.Embedding(10, 16)
        self.out = nn.Linear(16, 50)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.out(self.emb(ids) + self.pos(pos))


class _NestedPathsSub(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(x)


class NestedPaths(nn.Module):
    """Module paths where one ("fc", 16 -> 16) is the dotted suffix of another ("sub.fc", 16 -> 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.sub = _NestedPathsSub()

    def forward(self, x):
        return self.sub(self.fc(x))


def tiny_llama(tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=32), add_pooling_layer=False)


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _logits(model(x))


def rows_alone(model: nn.Module, x: torch.Tensor, rows: list) -> torch.Tensor:
    """Each row of ``x`` run alone under ``deltaw.using(model, spec)``: what a mixed batch must equal."""
    with torch.no_grad():
        outs = []
        for i, spec in enumerate(rows):
            with deltaw.using(model, spec):
                outs.append(logits_of(model, x[i:i + 1]))
    return torch.cat(outs)


@dataclass
class Case:
    name: str
    build_fn: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], torch.Tensor]
    config: deltaw.LoraConfig
    peft_kwargs: dict = field(default_factory=dict)

    def build(self, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
        torch.manual_seed(seed)
        return self.build_fn().eval().to(device)  # built on CPU: the same weights on every device

    def input(self, seed: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return self.make_input(g).to(device)

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _logits(model(x))


def _ids(vocab: int, shape=(2, 7)):
    def make(g: torch.Generator) -> torch.Tensor:
        return torch.randint(1, vocab, shape, generator=g)
    return make


def _floats(*shape):
    def make(g: torch.Generator) -> torch.Tensor:
        return torch.randn(*shape, generator=g)
    return make


CASES = [
    Case("mlp", MLP, _floats(5, 12), deltaw.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]),
         {"target_modules": ["fc1", "fc2"]}),
    Case("gpt2_conv1d", tiny_gpt2, _ids(64), deltaw.LoraConfig(r=4, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]),
         {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    Case("llama", tiny_llama, _ids(64), deltaw.LoraConfig(r=4, alpha=8, target_modules="all-linear",
                                                          rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3.0}),
         {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
          "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"o_proj": 3.0}}),
    Case("bert", tiny_bert, _ids(64), deltaw.LoraConfig(r=8, alpha=8, use_rslora=True, target_modules=r".*\.(query|value)"),
         {"target_modules": r".*\.(query|value)", "use_rslora": True}),
    Case("convnet", ConvNet, _floats(2, 3, 8, 8), deltaw.LoraConfig(r=3, alpha=6, target_modules=["conv1", "conv2", "fc"]),
         {"target_modules": ["conv1", "conv2", "fc"]}),
    Case("embedding", EmbeddingNet, _ids(10, (3, 6)), deltaw.LoraConfig(r=4, alpha=4, target_modules=["emb", "pos", "out"]),
         {"target_modules": ["emb", "pos", "out"]}),
]
CASE_IDS = [c.name for c in CASES]


def randomize(model: nn.Module, name: str, std: float = 0.2, seed: int = 123) -> None:
    """Give an adapter non-zero factors so ΔW ≠ 0 (fresh adapters have B = 0 or A = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in deltaw.adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def reference_weights(model: nn.Module, weighted: dict[str, float]) -> dict[str, torch.Tensor]:
    """Hand-written W0 + Σ w·s·ΔW per wrapped module, written independently of the layer code:
    Linear (out,in) += B@A; Conv1D (in,out) += (B@A)ᵀ; Embedding (num,dim) += (B@A)ᵀ; Conv (out,in,k..) += B·A."""
    from transformers.pytorch_utils import Conv1D
    st = deltaw.state(model)
    out = {}
    for path, layer in st.layers.items():
        base = layer.base_layer
        w = (layer._pristine if layer._pristine is not None else base.weight).detach().double().clone()
        for name, weight in weighted.items():
            if name not in layer.lora_A:
                continue
            a, b = layer.lora_A[name].detach().double(), layer.lora_B[name].detach().double()
            s = weight * layer.scaling[name]
            if isinstance(base, nn.Linear):
                w += s * (b @ a)
            elif isinstance(base, Conv1D) or isinstance(base, nn.Embedding):
                w += s * (b @ a).T
            else:  # conv: ΔW[o,i,k] = Σ_r B[o,r] A[r,i,k]
                w += s * torch.einsum("or,ri...->oi...", b.reshape(b.shape[0], b.shape[1]), a)
        out[path] = w
    return out


def plain_copy_with(model: nn.Module, case: Case, weights: dict[str, torch.Tensor], seed: int = 0) -> nn.Module:
    """A fresh plain model (same base, on the weights' device) whose wrapped modules' weights are replaced by
    ``weights``."""
    plain = case.build(seed, next(iter(weights.values())).device)
    with torch.no_grad():
        for path, w in weights.items():
            plain.get_submodule(path).weight.copy_(w.to(plain.get_submodule(path).weight.dtype))
    return plain
