"""The audit on the device of ``DELTAW_TEST_DEVICE`` (conftest.py; default cpu): ``measure`` in exact and sampled
mode, ``train_debias`` with its before/after evaluation and ``run_audit``'s merge-save-reload, on the tiny random
Llama moved there, against the same computation on a CPU copy of it.

On the CPU the two runs are the same arithmetic and must agree bit for bit; on CUDA the forwards are fp32 on
other kernels (TF32 off: the device fixture), so they agree to ``ATOL``. The probability tables are CPU float64
on every device. These used to crash on CUDA: the tables stayed on the GPU and met the probe's CPU target in
``total_variation``, and the merged model was reloaded onto the CPU next to CUDA rows. On the CPU they pass
either way; ``benchmarks/device_check`` runs them with ``DELTAW_TEST_DEVICE=cuda``."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch
from audit_helpers import tiny_pair

import deltaw
from deltaw.audit import AuditConfig, DebiasConfig, load_probe, measure, resolve_scorer, run_audit, train_debias
from deltaw.audit.debias import _tv_by_cell
from deltaw.audit.measure import attribute_tokens
from deltaw.audit.report import MERGED_ATOL, _expected_weights, _match_buffer_dtypes, _weights_report

pytestmark = pytest.mark.device

ATOL = 1e-5  # |Δ| of probabilities / TV / KL from fp32 forwards on two devices
FAST = DebiasConfig(steps=3, lr=2e-2, batch_size=8, control_batch=4, neutral_batch=2, targets="top:1", r=4)
SKIP = {"seconds", "cpu_seconds", "model_dir"}  # timings and paths, not results


def _tol(device: torch.device) -> float:
    return 0.0 if device.type == "cpu" else ATOL


def _pair(device: torch.device, dtype: torch.dtype = torch.float32):
    """(model on ``device``, its CPU float32 twin, tokenizer): same seed, so the same weights. Both frozen, as
    ``attach`` and ``run_audit`` leave a model: on the CPU, ``F.linear`` takes another path (1-ulp apart) for a
    weight that requires grad (report._freeze), and the twin must be the same arithmetic."""
    model, tok = tiny_pair()
    twin, _ = tiny_pair()
    for p in (*model.parameters(), *twin.parameters()):
        p.requires_grad_(False)
    return model.to(device=device, dtype=dtype), twin, tok


def _assert_tables_on_cpu(m) -> None:
    for t in (m.p_attr, m.control_p) + ((m.mass,) if m.mass is not None else ()):
        assert t.device.type == "cpu" and t.dtype == torch.float64


def _assert_close(a: Any, b: Any, tol: float, where: str = "") -> None:
    """Walk two report rows: numbers to ``tol``, absolute or relative (perplexities are in the hundreds; NaN
    equal to NaN), everything else equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a.keys() - SKIP:
            _assert_close(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tol, abs_tol=tol), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_measure_exact_on_the_device_matches_cpu(device):
    model, twin, tok = _pair(device)
    probe = load_probe().subset(3, 1, 2)
    ref = measure(twin, tok, probe, keep_logits=True)
    # The CPU measurement as reference: neutral_kl compares the device's log-probs with CPU ones (same weights).
    m = measure(model, tok, probe, keep_logits=True, reference=ref)
    _assert_tables_on_cpu(m)
    tol = _tol(device)
    torch.testing.assert_close(m.logits.cpu(), ref.logits, atol=tol, rtol=0)
    for got, want in ((m.p_attr, ref.p_attr), (m.mass, ref.mass), (m.control_p, ref.control_p)):
        torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert m.neutral_kl is not None and abs(m.neutral_kl) <= tol
    _assert_close(m.row() | {"neutral_kl": None}, ref.row(), tol)  # ref: a plain model, measured alone


def test_measure_sampled_on_the_device(device):
    model, twin, tok = _pair(device)
    probe = load_probe().subset(1, 1, 1)
    score = resolve_scorer(None, probe.regex, probe.value_names)
    kw = dict(mode="sampled", score=score, n_samples=4, max_new_tokens=3, ppl_ids=None)
    a = measure(model, tok, probe, **kw)
    b = measure(model, tok, probe, **kw)
    _assert_tables_on_cpu(a)
    assert a.samples == b.samples  # seeded on the device's generator too
    for i, texts in enumerate(a.samples):
        scored = [v for v in map(score, texts) if v is not None]
        want = torch.tensor([scored.count(v) / len(scored) if scored else math.nan for v in probe.value_names],
                            dtype=torch.float64)
        torch.testing.assert_close(a.p_attr[i], want, atol=0, rtol=0, equal_nan=True)
    row = a.row()
    assert row["mode"] == "sampled"
    if device.type == "cpu":  # CUDA samples from its own generator: other continuations than the CPU's
        ref = measure(twin, tok, probe, **kw)
        assert a.samples == ref.samples
        _assert_close(row, ref.row(), 0.0)


def test_train_debias_evaluates_on_the_device(device, tmp_path):
    model, twin, tok = _pair(device)
    probe = load_probe().subset(3, 1, 2)
    result = train_debias(model, tok, probe, FAST)
    assert set(result.before) == set(result.after) == {"train", "heldout"}
    assert all(p.device.type == device.type for p in deltaw.adapter_parameters(model, "debias"))
    # The same evaluation on the CPU twin: the base, then with the very factors trained on the device.
    tokens = attribute_tokens(tok, probe)
    cells = (list(probe.fillers["train"]), list(probe.templates["train"]))
    tol = _tol(device)
    _assert_close(result.before, _tv_by_cell(twin, tok, probe, tokens, *cells), tol)
    deltaw.save(model, tmp_path / "fix", "debias")
    deltaw.load(twin, tmp_path / "fix", "debias")
    _assert_close(result.after, _tv_by_cell(twin, tok, probe, tokens, *cells), tol)


def _cpu_loader(path):
    from deltaw.models import load_causal_lm
    return load_causal_lm(path)  # CPU float32, whatever the audited model's placement


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A debiasing adapter for the tiny model (trained on the CPU: what is audited is its use on the device)."""
    model, tok = tiny_pair()
    train_debias(model, tok, load_probe().subset(3, 1, 2), replace(FAST, steps=2), evaluate=False)
    return deltaw.save(model, tmp_path_factory.mktemp("audit") / "fix", "debias")


AUDIT = replace(AuditConfig.quick(), n_fillers=3, n_templates=1, n_neutral=2, ppl_seq_len=16)


def _audit(out, model, tok, adapter, loader=None):
    return run_audit(out, config=AUDIT, model=model, tokenizer=tok, adapter=adapter, train_stack=False,
                     loader=loader, plot=False)


@pytest.mark.parametrize("loader", [None, _cpu_loader], ids=["default_loader", "cpu_loader"])
def test_run_audit_reloads_the_merged_model_onto_the_device(device, tmp_path, adapter_dir, loader):
    model, twin, tok = _pair(device)
    report = _audit(tmp_path / "dev", model, tok, adapter_dir, loader)
    ref = _audit(tmp_path / "cpu", twin, tok, adapter_dir)
    assert report["merged_check"]["reloaded"] == {"device": str(next(model.parameters()).device), "dtype": "float32"}
    assert report["removed_equals_base"] is True and report["merged_matches_adapter"] is True
    tol = _tol(device)
    _assert_close(report["rows"], ref["rows"], tol)
    assert report["merged_check"]["max_abs_p_attr_diff"] == pytest.approx(ref["merged_check"]["max_abs_p_attr_diff"],
                                                                          abs=tol)


@pytest.mark.parametrize("strength", [1.0, 0.05])
def test_run_audit_reloads_the_merged_model_in_the_models_dtype(device, tmp_path, adapter_dir, strength):
    """Used to reload float32 whatever the audited model's dtype: the merged row then measured the precision gap
    to the live bf16 rows, not the merge. In bf16 the merge is decided on the weights: rounding them moves the
    logits by as much as a gentle adapter does (0.05 of this one: its merge was reported as wrong)."""
    if strength != 1.0:  # a gentle adapter: B scaled down
        gentle, _ = tiny_pair()
        deltaw.load(gentle, adapter_dir, "debias")
        with torch.no_grad():
            for layer in deltaw.state(gentle).layers.values():
                layer.lora_B["debias"].mul_(strength)
        adapter_dir = deltaw.save(gentle, tmp_path / "gentle", "debias")
    model, _, tok = _pair(device, torch.bfloat16)
    report = _audit(tmp_path / "bf16", model, tok, adapter_dir)
    assert report["merged_check"]["reloaded"] == {"device": str(next(model.parameters()).device), "dtype": "bfloat16"}
    assert report["removed_equals_base"] is True
    check = report["merged_check"]
    assert report["merged_matches_adapter"] is True and check["weights_within_one_ulp"] is True, check
    assert check["layers"] > 0 and check["max_abs_logit_diff"] > MERGED_ATOL  # fp32's logit bound cannot hold


def test_the_half_precision_weight_check_fails_a_merge_that_lost_or_halved_the_adapter(device, adapter_dir):
    model, _, _ = _pair(device, torch.bfloat16)
    deltaw.load(model, adapter_dir, "debias")
    expected = _expected_weights(model, "debias")
    assert _weights_report(model, expected)["weights_within_one_ulp"] is False  # W0: the adapter lost
    deltaw.merge(model, {"debias": 0.5})
    assert _weights_report(model, expected)["weights_within_one_ulp"] is False  # half of it
    deltaw.merge(model, "debias", replace=True)
    assert _weights_report(model, expected)["weights_within_one_ulp"] is True


def test_the_reloaded_model_gets_the_audited_models_buffer_dtypes(device):
    """Llama's rotary inv_freq is not in a checkpoint: a reload recomputes it in fp32, while the audited model,
    cast with .to(torch.bfloat16), holds it rounded. The merged row measured that rounding (0.0625 against 0.039
    for the merge alone in this test's bf16 audit)."""
    cast, _, _ = _pair(device, torch.bfloat16)
    fresh, _, _ = _pair(device)
    fresh = fresh.to(torch.bfloat16)
    for module in fresh.modules():  # as from_pretrained(dtype=bf16) leaves it: the buffer recomputed in fp32
        if "inv_freq" in module._buffers:
            module._buffers["inv_freq"] = module._buffers["inv_freq"].float()
    _match_buffer_dtypes(fresh, {n: b.dtype for n, b in cast.named_buffers()})
    theirs = dict(cast.named_buffers())
    assert any("inv_freq" in n for n in theirs)
    for name, buf in fresh.named_buffers():
        assert buf.dtype == theirs[name].dtype and torch.equal(buf, theirs[name]), name
