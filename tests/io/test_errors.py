"""Bad input: every failure names the problem, and a failed load leaves the model exactly as it was."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltaw
from toy_models import CASES, MLP, randomize, tiny_llama

LLAMA = next(c for c in CASES if c.name == "llama")


def snapshot(model):
    return ([type(m).__name__ for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()},
            deltaw.adapters(model), deltaw.active(model) if deltaw.adapters(model) else ())


def assert_unchanged(model, snap):
    types, sd, names, act = snap
    assert [type(m).__name__ for m in model.modules()] == types
    now = model.state_dict()
    assert set(now) == set(sd) and all(torch.equal(now[k], v) for k, v in sd.items())
    assert deltaw.adapters(model) == names


@pytest.fixture
def saved(tmp_path):
    model = LLAMA.build()
    deltaw.attach(model, LLAMA.config, "a")
    randomize(model, "a")
    deltaw.save(model, tmp_path / "a", "a")
    return tmp_path / "a"


@pytest.fixture
def target():
    """A model that already holds another adapter, so 'unchanged' covers existing state too."""
    model = LLAMA.build()
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["q_proj"]), "other")
    return model


def _rewrite(path, fn):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


def test_wrong_base_model_is_refused_then_overridable(saved, target):
    other = LLAMA.build(seed=99)  # same shapes, other weights
    snap = snapshot(other)
    with pytest.raises(deltaw.BaseModelMismatchError, match="another base model"):
        deltaw.load(other, saved, "a")
    assert_unchanged(other, snap)
    deltaw.load(other, saved, "a", allow_base_mismatch=True)
    assert deltaw.adapters(other) == ["a"]


@pytest.mark.parametrize("how", ["in_place", "new_data", "through_data", "merged"])
def test_base_changed_after_a_load_is_still_caught(saved, how):
    """The fingerprint digest is remembered per base; changing the base's weights must invalidate it."""
    model = LLAMA.build()
    deltaw.load(model, saved, "a")  # same base: accepted, digest remembered
    deltaw.delete(model, "a")
    deltaw.load(model, saved, "again")
    other = dict(LLAMA.build(seed=99).named_parameters())
    pairs = [(p, other[n.replace(".base_layer", "")]) for n, p in model.named_parameters()
             if n.replace(".base_layer", "") in other]
    with torch.no_grad():
        if how == "in_place":
            for p, o in pairs:
                p.copy_(o)
        elif how == "new_data":
            for p, o in pairs:
                p.data = o.data.clone()
        elif how == "through_data":  # regression: .data writes do not bump the version a cache keyed on
            for p, o in pairs:
                p.data.copy_(o)
        else:  # merged weights are not the base: the pristine W0 is what counts, so this one still loads
            deltaw.merge(model, "again")
    if how == "merged":
        deltaw.load(model, saved, "third")
        assert deltaw.adapters(model) == ["again", "third"]
        return
    with pytest.raises(deltaw.BaseModelMismatchError, match="another base model"):
        deltaw.load(model, saved, "third")


def test_same_base_in_bf16_is_accepted(saved):
    model = LLAMA.build().to(torch.bfloat16)
    deltaw.load(model, saved, "a")


def test_shape_mismatch_names_module_and_shapes(saved):
    from transformers import LlamaConfig, LlamaForCausalLM
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    snap = snapshot(wider)
    with pytest.raises(deltaw.AdapterFormatError, match=r"shape mismatch at 'model.layers.0.*\(48"):
        deltaw.load(wider, saved, "a")
    assert_unchanged(wider, snap)


def test_rank_mismatch(saved, target):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["r"], cfg["rank_pattern"] = 8, {}
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    snap = snapshot(target)
    with pytest.raises(deltaw.AdapterFormatError, match=r"has rank \d .* config says r=8"):
        deltaw.load(target, saved, "a")
    assert_unchanged(target, snap)


def test_missing_key(saved, target):
    _rewrite(saved, lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"))
    snap = snapshot(target)
    with pytest.raises(deltaw.AdapterFormatError, match="missing lora_A or lora_B.*up_proj"):
        deltaw.load(target, saved, "a")
    assert_unchanged(target, snap)


def test_missing_module_named_by_config(saved, target):
    def drop(t):
        t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_A.weight")
        t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")
    _rewrite(saved, drop)
    with pytest.raises(deltaw.AdapterFormatError, match="missing keys.*up_proj"):
        deltaw.load(target, saved, "a")


def test_unexpected_key(saved, target):
    _rewrite(saved, lambda t: t.__setitem__("base_model.model.model.layers.0.mystery.weight", torch.zeros(2)))
    with pytest.raises(deltaw.AdapterFormatError, match="unexpected keys.*mystery"):
        deltaw.load(target, saved, "a")


def test_module_missing_from_model(saved):
    snap_model = MLP()
    with pytest.raises(deltaw.TargetError, match="does not exist in this model"):
        deltaw.load(snap_model, saved, "a")


@pytest.mark.parametrize("how", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_file(saved, target, how):
    f = saved / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 100, "empty": b""}[how])
    snap = snapshot(target)
    with pytest.raises(deltaw.AdapterFormatError, match="corrupt or truncated"):
        deltaw.load(target, saved, "a")
    assert_unchanged(target, snap)


@pytest.mark.parametrize("shape", [[[4], 2], ["4", 2], [4, -2], 8, None])
def test_malformed_header_shape(saved, target, shape):
    """A header whose first tensor has a nonsense shape (nested, string, negative, not a list) is refused as
    corrupt, never a TypeError from the fast reader."""
    f = saved / "adapter_model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["shape"] = shape
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    snap = snapshot(target)
    with pytest.raises(deltaw.AdapterFormatError, match="corrupt or truncated"):
        deltaw.load(target, saved, "a")
    assert_unchanged(target, snap)


def test_invalid_config_json(saved, target):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(deltaw.AdapterFormatError, match="invalid JSON"):
        deltaw.load(target, saved, "a")


@pytest.mark.parametrize("option, value", [
    ("use_dora", True), ("bias", "lora_only"), ("lora_bias", True), ("use_qalora", True),
    ("layer_replication", [[0, 2], [1, 2]]), ("alora_invocation_tokens", [5]), ("trainable_token_indices", [1, 2]),
    ("target_parameters", ["experts.gate_up_proj"]), ("use_bdlora", {"target_modules": ["q_proj"]}),
    ("velora_config", {"num_groups": 4}), ("monteclora_config", {"n": 2}), ("kasa_config", {"k": 1}),
    ("arrow_config", {"top_k": 2})])
def test_unsupported_peft_options(saved, target, option, value):
    """Options that change the maths are refused (regression: layer_replication, aLoRA, QA-LoRA, lora_bias,
    trainable tokens... loaded silently and gave other outputs than PEFT); their defaults load."""
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg[option] = value
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    snap = snapshot(target)
    with pytest.raises(deltaw.AdapterFormatError, match=option):
        deltaw.load(target, saved, "a")
    assert_unchanged(target, snap)


def test_unsupported_peft_options_at_their_defaults_load(saved, target):
    """What PEFT 0.21 writes when the options are unused."""
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg.update(use_dora=False, bias="none", lora_bias=False, use_qalora=False, qalora_group_size=16,
               layer_replication=None, alora_invocation_tokens=None, trainable_token_indices=None,
               target_parameters=None, use_bdlora=None, arrow_config=None, velora_config=None,
               monteclora_config=None, kasa_config=None, ensure_weight_tying=False, loftq_config={})
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    deltaw.load(target, saved, "a")


def test_pickle_file_is_never_loaded(tmp_path, target):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(deltaw.AdapterFormatError, match="never loaded"):
        deltaw.load(target, tmp_path, "a")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(saved, target, value):
    def poison(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = value
    _rewrite(saved, poison)
    snap = snapshot(target)
    with pytest.raises(deltaw.NonFiniteError, match="q_proj"):
        deltaw.load(target, saved, "a")
    assert_unchanged(target, snap)


def test_not_a_directory_or_missing(tmp_path, target):
    with pytest.raises(deltaw.AdapterFormatError, match="does not exist"):
        deltaw.load(target, tmp_path / "nope", "a")
    with pytest.raises(deltaw.AdapterFormatError, match="not a PEFT adapter"):
        deltaw.load(target, tmp_path, "a")


@pytest.mark.parametrize("name", ["../evil", "a/b", "", "a.b", " x", "x" * 65, 3, "/abs",
                                  "keys", "training", "update", "_keys", "eval",
                                  "__dict__", "__class__", "__init__", "__doc__", "__anything"])
def test_unsafe_names(name, saved):
    model = LLAMA.build()
    with pytest.raises(deltaw.AdapterNameError, match="unsafe adapter name"):
        deltaw.attach(model, LLAMA.config, name)
    with pytest.raises(deltaw.AdapterNameError, match="unsafe adapter name"):
        deltaw.load(model, saved, name)
    assert deltaw.adapters(model) == []


def test_unknown_and_duplicate_names(saved, target):
    with pytest.raises(deltaw.AdapterNameError, match="unknown adapter 'nope'; resident adapters: other"):
        deltaw.activate(target, "nope")
    with pytest.raises(deltaw.AdapterNameError, match="unknown adapter"):
        deltaw.delete(target, "nope")
    with pytest.raises(deltaw.AdapterNameError, match="already exists"):
        deltaw.load(target, saved, "other")
    with pytest.raises(deltaw.AdapterNameError, match="unknown adapter"):
        deltaw.save(target, saved, "nope")
    with pytest.raises(deltaw.AdapterNameError, match="no deltaw adapters"):
        deltaw.activate(MLP(), "a")


def test_unknown_targets_list_what_exists():
    with pytest.raises(deltaw.TargetError, match=r"q_proj \(Linear\)"):
        deltaw.attach(tiny_llama(), deltaw.LoraConfig(target_modules=["qkv"]))


def test_rank_too_large():
    model = MLP()
    with pytest.raises(deltaw.TargetError, match=r"rank 13 for 'fc1' exceeds min\(in, out\) = 12"):
        deltaw.attach(model, deltaw.LoraConfig(r=13, target_modules=["fc1"]))
    assert deltaw.adapters(model) == [] and type(model.fc1).__name__ == "Linear"


def test_unsupported_target_type():
    with pytest.raises(deltaw.TargetError, match="supports only"):
        deltaw.attach(tiny_llama(), deltaw.LoraConfig(target_modules=["input_layernorm"]))


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(r=2.5), dict(alpha=-1), dict(dropout=1.0), dict(init="xavier"),
                                    dict(target_modules=()), dict(rank_pattern={"q": 0}), dict(target_modules="("),
                                    # regressions: TypeError, or accepted
                                    dict(dropout="0.1"), dict(rank_pattern={1: 2}), dict(alpha_pattern={1: 2.0}),
                                    dict(alpha=True), dict(dropout=True), dict(r=True), dict(alpha_pattern={"q": True}),
                                    dict(target_modules=[1]), dict(modules_to_save=[5]), dict(rank_pattern=[("q", 2)])])
def test_config_validation(kwargs):
    with pytest.raises(ValueError, match="LoraConfig"):
        deltaw.LoraConfig(**kwargs)


def test_config_modules_to_save_string_is_one_name():
    """Regression: modules_to_save="lm_head" was split into characters (TargetError listing 'l', 'm', ...)."""
    config = deltaw.LoraConfig(target_modules=["q_proj"], modules_to_save="lm_head")
    assert config.modules_to_save == ("lm_head",)
    model = LLAMA.build()
    deltaw.attach(model, config, "a")
    assert list(deltaw.state(model).saved_modules) == ["lm_head"]


def test_fingerprint_of_weight_over_2_pow_24_elements():
    """Regression: sample positions computed in float32 ran past the end of large weights (embeddings, heads)."""
    from deltaw.io.fingerprints import fingerprint
    w = torch.zeros(2**24 + 3)
    w[-1] = 7.0
    fp = fingerprint({"emb": w})
    assert fp["samples"]["emb"][-1] == 7.0


def _edit_header(saved, fn):
    """Rewrite the safetensors header JSON of ``saved`` in place (the data bytes are kept)."""
    f = saved / "adapter_model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    fn(header)
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


Q0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q1 = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


def test_overlapping_tensor_ranges_are_refused(saved, target):
    """Regression: the fast reader accepted two tensors over the same bytes (safetensors refuses them), and
    the two loaded parameters shared memory: training one changed the other."""
    _edit_header(saved, lambda h: h[Q1].__setitem__("data_offsets", h[Q0]["data_offsets"]))
    snap = snapshot(target)
    with pytest.raises(deltaw.AdapterFormatError, match="corrupt or truncated"):
        deltaw.load(target, saved, "a")
    assert_unchanged(target, snap)


def _tensors_and_meta(saved):
    from safetensors import safe_open
    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_values_that_overflow_the_model_dtype_are_refused(saved, target):
    """Regression: finiteness was checked in the file's dtype only; an F64 factor of 1e300 passed and became
    inf in the fp32 parameter."""
    tensors, meta = _tensors_and_meta(saved)
    tensors[Q0] = tensors[Q0].double()
    tensors[Q0][0, 0] = 1e300
    save_file(tensors, str(saved / "adapter_model.safetensors"), metadata=meta)
    snap = snapshot(target)
    with pytest.raises(deltaw.NonFiniteError, match=r"lora_A of module 'model.layers.0.self_attn.q_proj'.*range"):
        deltaw.load(target, saved, "a")
    assert_unchanged(target, snap)
    tensors[Q0][0, 0] = 0.5  # in range: an F64 file loads into an fp32 model
    save_file(tensors, str(saved / "adapter_model.safetensors"), metadata=meta)
    deltaw.load(target, saved, "a")


def test_saved_module_values_that_overflow_the_model_dtype_are_refused(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"]), "a")
    deltaw.save(model, tmp_path, "a")
    tensors, meta = _tensors_and_meta(tmp_path)
    tensors["base_model.model.head.weight"] = tensors["base_model.model.head.weight"].double()
    tensors["base_model.model.head.weight"][0, 0] = -1e300
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata=meta)
    torch.manual_seed(0)
    fresh = MLP()
    with pytest.raises(deltaw.NonFiniteError, match="saved module 'head' parameter 'weight'.*range"):
        deltaw.load(fresh, tmp_path, "a")
    assert deltaw.adapters(fresh) == []


def test_failed_save_keeps_the_previous_pair(saved):
    """Regression: the weights file was replaced before the config was serialised, so a config that failed
    to serialise left new weights next to the old config (a directory that no longer loads)."""
    from pathlib import Path
    before = {f: (saved / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
    model = LLAMA.build()
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["q_proj"]), "b")
    with pytest.raises(TypeError, match="JSON serializable"):
        deltaw.save(model, saved, "b", base_model_name_or_path=Path("/models/llama"))  # not JSON
    assert {f: (saved / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in saved.iterdir()) == sorted(before), "no temporary file left behind"
    deltaw.load(LLAMA.build(), saved, "a")


@pytest.mark.parametrize("edit, field", [
    (dict(r=float("inf")), "invalid LoRA settings"),  # regression: OverflowError
    (dict(target_modules="q_proj("), "target_modules.*not a valid regex"),  # regression: re.error
    (dict(target_modules=5), "target_modules must be"),  # regression: TypeError
    (dict(target_modules=["q_proj", 3]), "target_modules must be"),
    (dict(exclude_modules="(x"), "exclude_modules.*not a valid regex"),
    (dict(exclude_modules=7), "exclude_modules must be"),
    (dict(modules_to_save=5), "modules_to_save must be"),  # regression: TypeError
    (dict(modules_to_save="lm_head"), "modules_to_save must be"),
    (dict(rank_pattern=[1, 2]), "rank_pattern must be"),
])
def test_invalid_config_fields_name_the_field(saved, target, edit, field):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg.update(edit)
    (saved / "adapter_config.json").write_text(json.dumps(cfg))  # json writes inf as Infinity, as PEFT's json
    snap = snapshot(target)
    with pytest.raises(deltaw.AdapterFormatError, match=field):
        deltaw.load(target, saved, "a")
    assert_unchanged(target, snap)


@pytest.mark.parametrize("a_shape, b_shape", [((), (32, 4)), ((4, 32), (32,)), ((4,), (32, 4))])
def test_factors_of_the_wrong_dimension(saved, target, a_shape, b_shape):
    """Regression: a 0-d lora_A or a 1-d lora_B raised IndexError while reading the rank."""
    def squash(t):
        t[Q0] = torch.zeros(a_shape)
        t[Q0.replace("lora_A", "lora_B")] = torch.zeros(b_shape)
    _rewrite(saved, squash)
    with pytest.raises(deltaw.AdapterFormatError, match=r"q_proj' has lora_A of shape .*\(r, in\)"):
        deltaw.load(target, saved, "a")


def _set_deltaw_meta(saved, text):
    tensors, meta = _tensors_and_meta(saved)
    save_file(tensors, str(saved / "adapter_model.safetensors"), metadata={**meta, "deltaw": text})


@pytest.mark.parametrize("meta", [[], "x", 3, {"fingerprint": "x"}, {"fingerprint": []},
                                  {"fingerprint": {"shapes": [1]}}, {"fingerprint": {"shapes": {"m": "12"}}},
                                  {"fingerprint": {"sha256": 5}}, {"fingerprint": {"samples": {"m": "abc"}}},
                                  {"fingerprint": {"samples": {"m": [1, "2"]}}}, {"metadata": "x"},
                                  {"adapter_name": ["a"]}])
def test_malformed_deltaw_metadata(saved, target, meta):
    """Regression: valid JSON of the wrong shape raised AttributeError/TypeError while checking the base."""
    _set_deltaw_meta(saved, json.dumps(meta))
    with pytest.raises(deltaw.AdapterFormatError, match="deltaw metadata in the file's header is malformed"):
        deltaw.load(target, saved, "a")


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("where", ["config", "header", "deltaw_metadata"])
def test_deeply_nested_json(saved, target, where):
    """Regression: json.loads raised RecursionError, not AdapterFormatError."""
    if where == "config":
        (saved / "adapter_config.json").write_text(DEEP)
    elif where == "header":
        raw = DEEP.encode()
        (saved / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    else:
        _set_deltaw_meta(saved, DEEP)
    snap = snapshot(target)
    with pytest.raises(deltaw.AdapterFormatError):
        deltaw.load(target, saved, "a")
    assert_unchanged(target, snap)
