"""Resumable checkpoints without pickle: safetensors for tensors, JSON for everything else.

    checkpoints/step-000050/
        adapter_config.json, adapter_model.safetensors   the adapter (PEFT format, base fingerprint inside)
        optimizer.safetensors                            AdamW moments and step counters, keyed by parameter name
        rng-rank<k>.safetensors                          torch CPU/CUDA generator states, numpy's MT state
        trainer_state.json                               step, config identity, data fingerprint, LR schedule
                                                         position, optimizer hyper-parameters, python RNG,
                                                         early-stopping state

Why parameter names as keys: a resumed model re-attaches the adapter, and its parameter order may differ
from the original; names do not. A checkpoint is written to a temporary folder and renamed into place, so a
crash mid-write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import DeltawError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
FORMAT = 1


class CheckpointError(DeltawError, ValueError):
    """A checkpoint is missing, incomplete, or belongs to another configuration or base model."""


@dataclass
class TrainerState:
    """What the loop needs besides tensors to continue exactly where it stopped."""

    step: int = 0  # optimizer steps completed
    best_val_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# ---- RNG -----------------------------------------------------------------------------------------------
def rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ---- optimizer -----------------------------------------------------------------------------------------
def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW state as ``{"<param name>::<key>": tensor}`` plus the param groups' hyper-parameters."""
    sd = optimizer.state_dict()
    order = [p for group in optimizer.param_groups for p in group["params"]]
    tensors: dict[str, torch.Tensor] = {}
    for idx, state in sd["state"].items():
        pname = names[id(order[idx])]
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{pname}::{key}"] = t.detach().to("cpu").contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor],
                   groups: list[dict]) -> None:
    order = [p for group in optimizer.param_groups for p in group["params"]]
    index = {names[id(p)]: i for i, p in enumerate(order)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        pname, _, field_name = key.rpartition("::")
        if pname not in index:
            raise CheckpointError(f"optimizer state names parameter {pname!r}, which this model's adapter lacks")
        # as read (CPU): the optimizer's own load_state_dict puts each value where a fresh run keeps it (moments
        # on the parameter's device; Adam's step count on the CPU unless capturable/fused, as a GPU step count
        # costs one device sync per parameter per step)
        state.setdefault(index[pname], {})[field_name] = t
    missing = set(index) - {k.rpartition("::")[0] for k in tensors}
    if missing and tensors:
        raise CheckpointError(f"optimizer state lacks parameters {sorted(missing)[:3]}")
    sd = optimizer.state_dict()
    if len(groups) != len(sd["param_groups"]):
        raise CheckpointError("optimizer param groups differ from the checkpoint's")
    new_groups = [{**saved, "params": current["params"]} for saved, current in zip(groups, sd["param_groups"])]
    optimizer.load_state_dict({"state": state, "param_groups": new_groups})


# ---- write / read --------------------------------------------------------------------------------------
def write(path: Path, *, rank: int, is_main: bool, save_adapter, optimizer: torch.optim.Optimizer,
          names: dict[int, str], state: TrainerState, identity: dict, world_size: int, data: dict) -> None:
    """Write one checkpoint. Rank 0 writes the shared files into a temp folder; every rank adds its RNG file.

    ``data`` is the fingerprint of the training (and validation) data that ``check_data`` compares on resume.

    The caller puts barriers around this so that the rename happens after every rank has written.
    """
    tmp = path.with_name(f".tmp-{path.name}")
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_adapter(tmp)
        opt_tensors, groups = optimizer_tensors(optimizer, names)
        save_file(opt_tensors, str(tmp / OPTIMIZER_NAME), metadata={"format": "pt"})
        (tmp / STATE_NAME).write_text(json.dumps({
            "format": FORMAT, "identity": identity, "data": data, "world_size": world_size, "state": state.to_dict(),
            "scheduler": {"kind": identity.get("schedule"), "step": state.step},
            "optimizer_param_groups": groups}, indent=2) + "\n")


def write_rng(path: Path, rank: int) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tensors, meta = rng_tensors()
    save_file(tensors, str(tmp / f"rng-rank{rank}.safetensors"), metadata={"rng": json.dumps(meta)})


def commit(path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def prune(output_dir: Path, keep: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / STATE_NAME}: unreadable ({exc})") from None


def check_compatible(saved: dict, identity: dict, world_size: int, path: Path) -> None:
    """Refuse a checkpoint written by another configuration (the continuation would be another run)."""
    if saved.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {saved.get('format')!r}, this deltaw writes {FORMAT}")
    theirs = saved.get("identity", {})
    diff = {k: (theirs.get(k), v) for k, v in identity.items() if _norm(theirs.get(k)) != _norm(v)}
    if diff:
        detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"cannot resume from {path}: it was written with another configuration ({detail}). "
                              "Resume with the same settings, or start a new run in another output dir")
    if saved.get("world_size") != world_size:
        raise CheckpointError(f"cannot resume from {path}: it was written by {saved.get('world_size')} process(es), "
                              f"this run has {world_size}; the data split and RNG streams per process would differ")


def check_data(saved: dict, data: dict[str, dict], path: Path) -> None:
    """Refuse a checkpoint whose data differs from what this run would train on (same spec, other contents).

    ``data`` maps "data" / "val_data" to ``data.data_identity`` of that spec. A checkpoint without a fingerprint
    is refused like one without any other identity field: resuming it could not tell the data is the same.
    """
    theirs = saved.get("data")
    if not isinstance(theirs, dict):
        raise CheckpointError(f"cannot resume from {path}: it records no fingerprint of its training data (written "
                              "by an older deltaw), so a resume cannot verify the data is unchanged; start a new run "
                              "in another output dir")
    for key, what in (("data", "training data"), ("val_data", "validation data")):
        mine, before = data.get(key), theirs.get(key)
        if _content(mine) == _content(before):  # where the file lies may change; what it holds may not
            continue
        name = (mine or before or {}).get("path") or (mine or before or {}).get("spec")
        raise CheckpointError(f"cannot resume from {path}: {what} {name} changed since the checkpoint was written "
                              f"({_describe(before)} then, {_describe(mine)} now); resume with the data the run "
                              "started with, or start a new run in another output dir")


def _content(identity: dict | None) -> dict | None:
    return None if identity is None else {k: v for k, v in identity.items() if k != "path"}


def _describe(identity: dict | None) -> str:
    if not identity:
        return "none"
    if "sha256" in identity:
        return f"sha256 {identity['sha256'][:12]}"
    return repr(identity.get("spec"))


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def read_optimizer(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / OPTIMIZER_NAME), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_rng(path: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    file = path / f"rng-rank{rank}.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{path}: no RNG state for rank {rank}")
    with safe_open(str(file), framework="pt", device="cpu") as f:
        meta = json.loads((f.metadata() or {})["rng"])
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def named_trainables(model: nn.Module) -> tuple[list[nn.Parameter], dict[int, str]]:
    """Trainable parameters in module order, and id -> name (stable across re-attachment)."""
    params, names = [], {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params.append(p)
            names[id(p)] = name
    return params, names
