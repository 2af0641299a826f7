"""PEFT on-disk format: deltaw round trip, and interop with PEFT itself in both directions (PEFT is a test
dependency only)."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open

import deltaw
from toy_models import CASE_IDS, CASES, NestedPaths, randomize

peft = pytest.importorskip("peft")
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    return request.param


def test_save_load_round_trip(case, tmp_path):
    model, x = case.build(), case.input()
    deltaw.attach(model, case.config, "a")
    randomize(model, "a")
    expected = case.run(model, x)
    deltaw.save(model, tmp_path, "a")
    fresh = case.build()
    deltaw.load(fresh, tmp_path, "tech")
    assert torch.equal(case.run(fresh, x), expected)
    assert deltaw.active(fresh) == (("tech", 1.0),)
    assert not any(p.requires_grad for p in fresh.parameters()), "loaded adapters are frozen by default"


def test_file_layout_matches_peft(case, tmp_path):
    model = case.build()
    deltaw.attach(model, case.config, "a")
    deltaw.save(model, tmp_path, "a")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == case.config.r and cfg["lora_alpha"] == case.config.alpha
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["deltaw"])["fingerprint"]["sha256"]
    assert all(k.startswith("base_model.model.") for k in keys)
    assert not any(".a." in k or k.endswith(".a") for k in keys), "adapter name must not appear in keys"
    suffixes = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] if k.endswith(".weight") else k.rsplit(".", 1)[-1]
                for k in keys}
    assert suffixes <= {"lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B"}


def _peft_config(case):
    kw = dict(case.peft_kwargs)
    return peft.LoraConfig(r=case.config.r, lora_alpha=case.config.alpha, init_lora_weights=True, **kw)


def test_deltaw_adapter_loads_in_peft(case, tmp_path):
    model, x = case.build(), case.input()
    deltaw.attach(model, case.config, "a")
    randomize(model, "a")
    expected = case.run(model, x)
    deltaw.save(model, tmp_path, "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(case.build(), str(tmp_path)).eval()
    torch.testing.assert_close(case.run(peft_model, x), expected, **TOL)


def test_peft_adapter_loads_in_deltaw(case, tmp_path):
    x = case.input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(case.build(), _peft_config(case)).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    expected = case.run(peft_model, x)
    assert not torch.allclose(expected, case.run(case.build(), x), **TOL)
    peft_model.save_pretrained(str(tmp_path))
    model = case.build()
    deltaw.load(model, tmp_path, "from_peft")
    torch.testing.assert_close(case.run(model, x), expected, **TOL)


def test_peft_named_adapter_subdirectory(tmp_path):
    case = CASES[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(case.build(), _peft_config(case), adapter_name="tech")
    pm.save_pretrained(str(tmp_path))
    model = case.build()
    deltaw.load(model, tmp_path, "tech")  # PEFT wrote <dir>/tech/
    assert deltaw.adapters(model) == ["tech"]


def test_modules_to_save_head_round_trips_with_peft(tmp_path):
    case = CASES[0]  # MLP: adapt fc1/fc2, train the head in full
    model, x = case.build(), case.input()
    cfg = deltaw.LoraConfig(r=4, target_modules=["fc1", "fc2"], modules_to_save=("head",))
    deltaw.attach(model, cfg, "cls")
    randomize(model, "cls")
    assert torch.any(deltaw.state(model).saved_modules["head"].modules_to_save["cls"].weight
                     != model.head.original_module.weight)
    expected = case.run(model, x)
    with deltaw.disabled(model):
        assert torch.equal(case.run(model, x), case.run(case.build(), x))
    deltaw.save(model, tmp_path, "cls")
    fresh = case.build()
    deltaw.load(fresh, tmp_path, "cls")
    assert torch.equal(case.run(fresh, x), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(case.build(), str(tmp_path)).eval()
    torch.testing.assert_close(case.run(pm, x), expected, **TOL)
    plain = deltaw.merge_and_unload(fresh)
    torch.testing.assert_close(case.run(plain, x), expected, **TOL)


class _Nested(torch.nn.Module):
    """A saved module PEFT names by its last path component: modules_to_save=["0"] means block.0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 8)
        self.block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block(self.fc(x)))


def _peft_round_trip(build, x, tmp_path, **kwargs):
    """A PEFT adapter with random (non-zero) adapter weights saved to tmp_path; returns PEFT's output."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build(), peft.LoraConfig(r=2, lora_alpha=4, **kwargs)).eval()
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            expected = pm(x)
        pm.save_pretrained(str(tmp_path))
    return getattr(expected, "logits", expected)


def _run(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("build, x, kwargs", [
    (CASES[2].build_fn, CASES[2].input(), dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    (CASES[1].build_fn, CASES[1].input(), dict(target_modules=["c_attn"], modules_to_save=["wte"])),
    (_Nested, torch.randn(4, 6), dict(target_modules=["fc"], modules_to_save=["0"])),
], ids=["llama_embed_tokens", "gpt2_wte", "nested_block_0"])
def test_peft_modules_to_save_named_by_suffix(build, x, kwargs, tmp_path):
    """Regression: PEFT names modules_to_save by suffix (embed_tokens for model.embed_tokens); the saved
    weights were refused as 'unexpected keys' because deltaw read the names as full paths."""
    expected = _peft_round_trip(build, x, tmp_path, **kwargs)
    torch.manual_seed(0)
    model = build().eval()
    deltaw.load(model, tmp_path, "p")
    torch.testing.assert_close(_run(model, x), expected, **TOL)
    assert len(deltaw.state(model).saved_modules) == 1


def _seq_cls_llama():
    from transformers import LlamaConfig, LlamaForSequenceClassification
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0))


def test_peft_seq_cls_adapter_skips_the_head_name_the_model_lacks(tmp_path):
    """Regression: task_type="SEQ_CLS" makes PEFT save modules_to_save=['classifier', 'score']; a Llama has only
    'score' and PEFT skips 'classifier', but deltaw refused the whole adapter (TargetError)."""
    x = CASES[2].input()
    expected = _peft_round_trip(_seq_cls_llama, x, tmp_path, task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"])
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    torch.manual_seed(0)
    model = _seq_cls_llama().eval()
    info = deltaw.load(model, tmp_path, "cls")
    torch.testing.assert_close(_run(model, x), expected, **TOL)
    assert info.config.modules_to_save == ("score",) and list(deltaw.state(model).saved_modules) == ["score"]


def test_saved_weights_for_a_module_the_model_lacks_are_still_refused(tmp_path):
    """Dropping unmatched modules_to_save names must not drop weights: 'score' is in the file, the causal LM
    has no 'score'."""
    _peft_round_trip(_seq_cls_llama, CASES[2].input(), tmp_path, task_type="SEQ_CLS", target_modules=["q_proj"])
    torch.manual_seed(0)
    model = CASES[2].build_fn()
    with pytest.raises(deltaw.TargetError, match="saved module 'score'.*does not exist"):
        deltaw.load(model, tmp_path, "cls")
    assert deltaw.adapters(model) == []


def test_peft_targeted_embedding_with_its_base_layer_saved(tmp_path):
    """Regression: with an embedding targeted PEFT also saves <path>.base_layer.weight (save_embedding_layers);
    deltaw refused it as an unexpected key. Equal to the model's weight: ignored; different: refused."""
    case = CASES[2]
    x = case.input()
    expected = _peft_round_trip(case.build_fn, x, tmp_path, target_modules=["embed_tokens", "q_proj"])
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert key in f.keys()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = case.build()
    deltaw.load(model, tmp_path, "emb")
    torch.testing.assert_close(_run(model, x), expected, **TOL)
    bf16 = case.build().to(torch.bfloat16)  # the same base in another precision is the same base
    deltaw.load(bf16, tmp_path, "emb")

    from safetensors.torch import save_file
    tensors[key] = tensors[key] + 1.0  # an adapter trained with a changed embedding
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = case.build()
    with pytest.raises(deltaw.BaseModelMismatchError, match="modified base weight for 'model.embed_tokens'"):
        deltaw.load(model, tmp_path, "emb")
    assert deltaw.adapters(model) == []
    deltaw.load(model, tmp_path, "emb", allow_base_mismatch=True)  # a warning: this model's weight is kept


@pytest.mark.parametrize("config", [
    deltaw.LoraConfig(r=8, target_modules="fc"),  # the top-level fc only (a regex)
    deltaw.LoraConfig(r=2, target_modules=["fc"], rank_pattern={"^fc": 8}),  # both; fc at rank 8, sub.fc at 2
], ids=["one_of_two", "per_module_ranks"])
def test_saved_config_selects_exactly_the_adapted_modules(config, tmp_path):
    """Saved as a list of paths, "fc" also selected "sub.fc" (PEFT's suffix rule): deltaw refused its own file
    (missing keys) and PEFT adapted the extra module; a rank_pattern key "fc" gave "sub.fc" fc's rank."""
    torch.manual_seed(0)
    model, x = NestedPaths().eval(), torch.randn(3, 16)
    info = deltaw.attach(model, config, "a")
    randomize(model, "a")
    with torch.no_grad():
        expected = model(x)
    deltaw.save(model, tmp_path, "a")
    torch.manual_seed(0)
    twin = NestedPaths().eval()
    assert deltaw.load(twin, tmp_path, "a").modules == info.modules
    with torch.no_grad():
        torch.testing.assert_close(twin(x), expected, **TOL)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(NestedPaths(), str(tmp_path)).eval()
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A"))
    assert adapted == sorted(info.modules)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), expected, **TOL)


def test_loading_onto_another_device_copies_the_file_once(tmp_path):
    """Loading onto a GPU moved each factor with its own blocking copy from pageable memory (~420 for a 135M
    model); the factors now arrive as views of one copy of the file's buffer. A meta-device model takes that
    path on a CPU-only machine. A modules_to_save weight that dominates the file is not pulled along."""
    from toy_models import randomize, tiny_llama
    torch.manual_seed(0)
    model = tiny_llama().eval()
    deltaw.attach(model, deltaw.LoraConfig(r=4, target_modules="all-linear"), "a")
    deltaw.attach(model, deltaw.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "h")
    randomize(model, "a")
    deltaw.save(model, tmp_path / "a", "a")
    deltaw.save(model, tmp_path / "h", "h")
    torch.manual_seed(0)
    meta = tiny_llama().eval().to("meta")
    deltaw.load(meta, tmp_path / "a", "a")
    factors = list(deltaw.adapter_parameters(meta, "a"))
    assert {p.device.type for p in factors} == {"meta"}
    total = sum(p.numel() * p.element_size() for p in factors)
    assert {p.untyped_storage().nbytes() for p in factors} == {total}  # one buffer on the device, views of it
    assert len({p.storage_offset() for p in factors}) == len(factors)
    with warnings.catch_warnings():  # (torch: loading lm_head's copy into a meta module copies nothing)
        warnings.simplefilter("ignore", UserWarning)
        deltaw.load(meta, tmp_path / "h", "h")  # lm_head's copy is most of this file: moved factor by factor
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() and p.device.type == "meta"
               for p in deltaw.adapter_parameters(meta, "h"))
