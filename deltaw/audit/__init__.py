"""Bias audit (issue 7): what an adapter shifts, what removing it restores, what merging makes permanent.

    from deltaw.audit import load_probe, measure, train_debias, run_audit
    probe = load_probe()                                   # gender x occupation, shipped as JSON
    m = measure(model, tokenizer, probe)                   # exact next-token attribute distribution
    m.row()["tv_to_target"], m.controllability()
    train_debias(model, tokenizer, probe, DebiasConfig())  # balance objective, adapter "debias"
    run_audit("out/", adapter="runs/fix")                  # base / adapter / removed / merged / stacked

See ``measure`` for the definitions, ``debias`` for the objective, ``report`` for the side-by-side.
"""

from .cache import cached_debias_adapter, default_cache_root
from .debias import DebiasConfig, DebiasResult, train_debias
from .measure import AttributeTokens, Measurement, attribute_distribution, attribute_tokens, measure
from .probe import Probe, ProbeError, Prompt, load_probe, parse_probe, shipped_probes
from .report import AuditConfig, run_audit
from .scorers import regex_scorer, resolve_scorer

__all__ = [
    "AttributeTokens", "AuditConfig", "DebiasConfig", "DebiasResult", "Measurement", "Probe", "ProbeError", "Prompt",
    "attribute_distribution", "attribute_tokens", "cached_debias_adapter", "default_cache_root", "load_probe",
    "measure", "parse_probe", "regex_scorer", "resolve_scorer", "run_audit", "shipped_probes", "train_debias",
]
