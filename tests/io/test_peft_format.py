"""PEFT on-disk format: deltaw round trip, and interop with PEFT itself in both directions (PEFT is a test
dependency only)."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open

import deltaw
from toy_models import CASE_IDS, CASES, randomize

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
