"""PEFT's own rules applied when reading and writing its format: base-rewriting inits, conv settings PEFT's
lora_A ignores, target matching (layers_to_transform, modules_to_save), the several-adapters directory,
fused torch layers, saved embedding copies, and messages that name the option at fault."""

import json
import logging
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import deltaw
from toy_models import MLP, randomize, tiny_llama

peft = pytest.importorskip("peft")
TOL = dict(rtol=1e-5, atol=1e-5)


def _build(fn, seed=0):
    torch.manual_seed(seed)
    return fn().eval()


def _run(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def _ids(seed=1):
    return torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def _peft_save(fn, path, save_kw=None, adapter_name="default", train=True, **config):
    """A PEFT adapter on ``fn()`` with random (non-zero) LoRA and saved-module weights, saved to ``path``;
    returns the PEFT model (eval mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_build(fn), peft.LoraConfig(**config), adapter_name=adapter_name).eval()
        if train:
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_" in n or "modules_to_save" in n:
                        p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)
        pm.save_pretrained(str(path), **(save_kw or {}))
    return pm


def _peft_load(fn, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(_build(fn), str(path)).eval()


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


# ---- 1. inits that rewrite the base -------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_base_rewriting_inits_are_refused(init, tmp_path):
    """PEFT subtracts s·B·A from the base weight when it creates such an adapter (and again when it loads
    one), so its factors only fit that rewritten base: loading them onto the unchanged one gave other outputs."""
    _peft_save(MLP, tmp_path, r=2, lora_alpha=4, target_modules=["fc1", "fc2"])
    _edit_config(tmp_path, init_lora_weights=init)
    model = _build(MLP)
    with pytest.raises(deltaw.AdapterFormatError,
                       match=rf"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"):
        deltaw.load(model, tmp_path, "p")
    assert deltaw.adapters(model) == []


def test_pissa_adapter_written_by_peft_is_refused(tmp_path):
    x = torch.randn(5, 12)
    _peft_save(MLP, tmp_path, r=2, lora_alpha=4, target_modules=["fc1"], init_lora_weights="pissa")
    with pytest.raises(deltaw.AdapterFormatError, match="pissa"):
        deltaw.load(_build(MLP), tmp_path, "p")
    assert _run(_build(MLP), x).shape == (5, 3)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_inits_that_keep_the_base_load(init, tmp_path):
    x = torch.randn(5, 12)
    pm = _peft_save(MLP, tmp_path, r=2, lora_alpha=4, target_modules=["fc1", "fc2"])
    _edit_config(tmp_path, init_lora_weights=init)
    model = _build(MLP)
    deltaw.load(model, tmp_path, "p")
    torch.testing.assert_close(_run(model, x), _run(pm, x), **TOL)


# ---- 2. conv settings PEFT's lora_A does not copy ------------------------------------------------------
class _Conv(nn.Module):
    def __init__(self, kernel=3, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, kernel, **kw)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("kw, setting", [(dict(padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
                                         (dict(padding=1, padding_mode="circular"), "padding_mode='circular'"),
                                         (dict(padding=2, dilation=2), r"dilation=\(2, 2\)")],
                         ids=["reflect", "circular", "dilation"])
def test_peft_conv_with_other_padding_or_dilation_is_refused(kw, setting, tmp_path):
    """PEFT's lora_A conv pads with zeros and never dilates; deltaw's uses the base conv's settings."""
    _peft_save(lambda: _Conv(**kw), tmp_path, r=2, lora_alpha=4, target_modules=["conv"])
    model = _build(lambda: _Conv(**kw))
    with pytest.raises(deltaw.TargetError, match=rf"module 'conv'.*{setting}"):
        deltaw.load(model, tmp_path, "p")
    assert deltaw.adapters(model) == []


@pytest.mark.parametrize("kw", [dict(padding=0, padding_mode="reflect"), dict(kernel=1, dilation=2),
                                dict(kernel=(1, 3), dilation=(2, 1), padding_mode="circular")],
                         ids=["no-padding", "1x1-dilated", "dilated-along-a-size-1-dim"])
def test_peft_conv_settings_that_cannot_change_the_output_still_load(kw, tmp_path):
    """A padding mode without padding, or dilation along a size-1 kernel dimension, changes nothing: such PEFT
    files loaded with matching outputs and the first version of the check refused them."""
    x = torch.randn(2, 4, 9, 9)
    pm = _peft_save(lambda: _Conv(**kw), tmp_path, r=2, lora_alpha=4, target_modules=["conv"])
    model = _build(lambda: _Conv(**kw))
    deltaw.load(model, tmp_path, "p")
    torch.testing.assert_close(_run(model, x), _run(pm, x), **TOL)


def test_deltaw_conv_with_reflect_padding_round_trips_and_warns_on_save(tmp_path, caplog):
    x = torch.randn(2, 4, 9, 9)
    fn = lambda: _Conv(padding=1, padding_mode="reflect")  # noqa: E731
    model = _build(fn)
    deltaw.attach(model, deltaw.LoraConfig(r=2, alpha=4, target_modules=["conv"]), "a")
    randomize(model, "a")
    with caplog.at_level(logging.WARNING, logger="deltaw.io.peft"):
        deltaw.save(model, tmp_path, "a")
    assert any("conv" in r.getMessage() and "padding_mode" in r.getMessage() for r in caplog.records)
    fresh = _build(fn)
    deltaw.load(fresh, tmp_path, "a")  # written by deltaw: the same maths on both ends
    assert torch.equal(_run(fresh, x), _run(model, x))


# ---- 3. factors the config does not target; layers_to_transform ---------------------------------------
def test_factors_for_modules_the_config_does_not_target_are_refused(tmp_path):
    _peft_save(MLP, tmp_path, r=2, lora_alpha=4, target_modules=["fc1", "fc2"])
    _edit_config(tmp_path, target_modules=["fc1"])  # PEFT now adapts fc1 only and skips fc2's factors
    model = _build(MLP)
    with pytest.raises(deltaw.AdapterFormatError, match=r"does not target.*'fc2'"):
        deltaw.load(model, tmp_path, "p")
    assert deltaw.adapters(model) == []


@pytest.mark.parametrize("config", [dict(layers_to_transform=[1]),
                                    dict(layers_to_transform=1, layers_pattern="layers")],
                         ids=["default_pattern", "layers_pattern"])
def test_layers_to_transform_selects_what_peft_does(config, tmp_path):
    x = _ids()
    pm = _peft_save(tiny_llama, tmp_path, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], **config)
    model = _build(tiny_llama)
    info = deltaw.load(model, tmp_path, "p")
    assert sorted(info.modules) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    torch.testing.assert_close(_run(model, x), _run(pm, x), **TOL)

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    extra = {k.replace("layers.1.", "layers.0."): v.clone() for k, v in tensors.items()}  # layer 0: not transformed
    save_file({**tensors, **extra}, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(deltaw.AdapterFormatError, match=r"does not target.*layers\.0\."):
        deltaw.load(_build(tiny_llama), tmp_path, "p")
    save_file({k: v for k, v in tensors.items() if "v_proj" not in k}, str(tmp_path / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(deltaw.AdapterFormatError, match=r"missing keys.*layers\.1\.self_attn\.v_proj"):
        deltaw.load(_build(tiny_llama), tmp_path, "p")


# ---- 4. a directory holding several adapters -----------------------------------------------------------
def test_root_and_named_subfolder_both_holding_adapters_loads_the_root_with_a_warning(tmp_path, caplog):
    """PEFT's load_adapter(dir, adapter_name=name) reads the root; the subfolder is named in a warning (the
    first fix refused, which left no way to load the root adapter under that name)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_build(MLP), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"]))
        pm.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc2"]))
        pm.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()
    model = _build(MLP)
    with caplog.at_level("WARNING", logger="deltaw.io.peft"):
        assert deltaw.load(model, tmp_path, "other").modules == ("fc1",)
    assert "subfolder 'other'" in caplog.text
    assert deltaw.load(model, tmp_path / "other", "other2").modules == ("fc2",)
    assert deltaw.load(model, tmp_path, "default").modules == ("fc1",)  # no <dir>/default/: the root


# ---- 5. layers torch's fused paths read directly; nn.MultiheadAttention --------------------------------
class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.enc(x))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("target, owner", [("linear1", "TransformerEncoderLayer"), ("out_proj", "MultiheadAttention")])
def test_targets_inside_fused_torch_layers_are_refused_as_attach_does(target, owner, tmp_path):
    _peft_save(_Encoder, tmp_path, r=2, lora_alpha=4, target_modules=[target])
    model = _build(_Encoder)
    with pytest.raises(deltaw.TargetError, match=rf"adapter 'p': module 'enc\..*{target}'.*nn\.{owner}"):
        deltaw.load(model, tmp_path, "p")
    assert deltaw.adapters(model) == []


def test_peft_lora_on_multihead_attention_says_it_is_unsupported(tmp_path):
    _peft_save(_Attention, tmp_path, r=2, lora_alpha=4, target_modules=["attn", "fc"])
    with pytest.raises(deltaw.TargetError, match=r"'attn'.*does not support LoRA on nn\.MultiheadAttention") as exc:
        deltaw.load(_build(_Attention), tmp_path, "p")
    assert "does not exist" not in str(exc.value)


# ---- 6. modules_to_save matched by plain string ending, as PEFT does -----------------------------------
def _distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=32, num_labels=3))


def test_peft_seq_cls_distilbert_loads(tmp_path):
    """PEFT's modules_to_save 'classifier' also selects 'pre_classifier' (key.endswith): its weights were
    refused as unexpected keys."""
    x = _ids()
    pm = _peft_save(_distilbert, tmp_path, task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_lin", "v_lin"])
    model = _build(_distilbert)
    deltaw.load(model, tmp_path, "p")
    torch.testing.assert_close(_run(model, x), _run(pm, x), **TOL)


class _Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.x_head = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.x_head(self.fc(x))))


@pytest.mark.parametrize("fn, x, config", [
    (_distilbert, _ids(), deltaw.LoraConfig(r=2, alpha=4, target_modules=["q_lin", "v_lin"],
                                            modules_to_save=["classifier"])),
    (_Heads, torch.randn(4, 8), deltaw.LoraConfig(r=2, alpha=4, target_modules=["fc"], modules_to_save=["head"])),
], ids=["distilbert_classifier", "head_and_x_head"])
def test_deltaw_saved_module_whose_name_peft_also_matches_elsewhere(fn, x, config, tmp_path):
    """PEFT wraps every module whose name ends with a modules_to_save entry and expects its weights in the
    file (KeyError otherwise): deltaw writes those modules' (unchanged) weights too, and reads its own file
    back exactly as it was."""
    model = _build(fn)
    deltaw.attach(model, config, "a")
    randomize(model, "a")
    expected = _run(model, x)
    deltaw.save(model, tmp_path, "a")
    torch.testing.assert_close(_run(_peft_load(fn, tmp_path), x), expected, **TOL)
    fresh = _build(fn)
    info = deltaw.load(fresh, tmp_path, "a")
    assert torch.equal(_run(fresh, x), expected)
    assert list(deltaw.state(fresh).saved_modules) == list(deltaw.state(model).saved_modules)
    assert info.config.modules_to_save == tuple(deltaw.state(model).saved_modules)
    assert set(deltaw.read_adapter(tmp_path).saved) == set(deltaw.state(model).saved_modules)


# ---- 7. a LoRA target inside a saved module -----------------------------------------------------------
def test_peft_target_inside_a_saved_module_is_not_missing(tmp_path):
    """PEFT puts no LoRA inside a modules_to_save module (it saves the whole module): the target there was
    reported as 'config targets modules with no weights'."""
    x = _ids()
    pm = _peft_save(tiny_llama, tmp_path, r=2, lora_alpha=4, target_modules=["up_proj"],
                    modules_to_save=["layers.1.mlp"])
    model = _build(tiny_llama)
    info = deltaw.load(model, tmp_path, "p")
    assert info.modules == ("model.layers.0.mlp.up_proj",)
    torch.testing.assert_close(_run(model, x), _run(pm, x), **TOL)


# ---- 8 + 9. embedding copies saved next to the factors -------------------------------------------------
def test_save_embedding_layers_copies_are_checked_not_loaded(tmp_path):
    x = _ids()
    pm = _peft_save(tiny_llama, tmp_path, save_kw=dict(save_embedding_layers=True), r=2, lora_alpha=4,
                    target_modules=["q_proj"])
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.embed_tokens.weight" in f.keys()
    model = _build(tiny_llama)
    deltaw.load(model, tmp_path, "p")
    torch.testing.assert_close(_run(model, x), _run(pm, x), **TOL)

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"] + 1.0
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = _build(tiny_llama)
    with pytest.raises(deltaw.BaseModelMismatchError, match="'lm_head'"):
        deltaw.load(model, tmp_path, "p")
    assert deltaw.adapters(model) == []
    deltaw.load(model, tmp_path, "p", allow_base_mismatch=True)


def test_plain_weight_of_a_module_that_is_no_embedding_is_still_unexpected(tmp_path):
    _peft_save(tiny_llama, tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"])
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(48, 32)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(deltaw.AdapterFormatError, match=r"unexpected keys.*up_proj\.weight"):
        deltaw.load(_build(tiny_llama), tmp_path, "p")


@pytest.mark.parametrize("file_dtype, model_dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)],
                         ids=["fp16_file_bf16_model", "bf16_file_fp16_model"])
def test_same_base_in_another_half_precision_is_the_same_base(file_dtype, model_dtype, tmp_path):
    """fp32 -> fp16 -> bf16 and fp32 -> bf16 can round one bf16 ulp apart: not a different base."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"])
        pm = peft.get_peft_model(_build(tiny_llama), config)
        pm.to(file_dtype).save_pretrained(str(tmp_path))
    deltaw.load(_build(tiny_llama).to(model_dtype), tmp_path, "p")

    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors[key] = (tensors[key].float() * 1.05).to(file_dtype)  # a real difference: 5 %
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(deltaw.BaseModelMismatchError, match="model.embed_tokens"):
        deltaw.load(_build(tiny_llama).to(model_dtype), tmp_path, "p")


# ---- 10. messages --------------------------------------------------------------------------------------
def test_grouped_conv_message_says_groups_are_unsupported(tmp_path):
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, groups=2)

        def forward(self, x):
            return self.conv(x)

    _peft_save(Grouped, tmp_path, train=False, r=2, lora_alpha=4, target_modules=["conv"])
    with pytest.raises(deltaw.DeltawError, match=r"'conv'.*grouped convolutions \(groups > 1\)") as exc:
        deltaw.load(_build(Grouped), tmp_path, "p")
    assert "config says r=2" not in str(exc.value)


def test_ensure_weight_tying_with_a_saved_embedding_names_the_option(tmp_path):
    fn = lambda: tiny_llama(tie=True)  # noqa: E731
    _peft_save(fn, tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
               ensure_weight_tying=True)
    model = _build(fn)
    with pytest.raises(deltaw.AdapterFormatError, match=r"ensure_weight_tying=True"):
        deltaw.load(model, tmp_path, "p")
    assert deltaw.adapters(model) == []


def test_ensure_weight_tying_with_a_targeted_embedding_loads(tmp_path):
    """PEFT adapts the tied lm_head with the embedding's factors (target_modules_to_tie): the file holds them
    under lm_head although target_modules does not name it; deltaw's separate copy computes the same."""
    fn = lambda: tiny_llama(tie=True)  # noqa: E731
    x = _ids()
    pm = _peft_save(fn, tmp_path, r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"],
                    ensure_weight_tying=True)
    model = _build(fn)
    info = deltaw.load(model, tmp_path, "p")
    assert "lm_head" in info.modules
    torch.testing.assert_close(_run(model, x), _run(pm, x), **TOL)


def test_bias_all_on_a_model_without_biases_loads(tmp_path):
    x = _ids()
    pm = _peft_save(tiny_llama, tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"], bias="all")
    model = _build(tiny_llama)
    deltaw.load(model, tmp_path, "p")
    torch.testing.assert_close(_run(model, x), _run(pm, x), **TOL)


def test_bias_all_with_bias_tensors_is_still_refused(tmp_path):
    _peft_save(MLP, tmp_path, r=2, lora_alpha=4, target_modules=["fc1"], bias="all")
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert any(k.endswith(".bias") for k in f.keys())
    model = _build(MLP)
    with pytest.raises(deltaw.AdapterFormatError, match="bias='all'"):
        deltaw.load(model, tmp_path, "p")
    assert deltaw.adapters(model) == []
