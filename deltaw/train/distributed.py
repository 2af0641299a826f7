"""Data parallelism for ``torchrun --nproc_per_node N deltaw train ...``.

Why not ``DistributedDataParallel``: LoRA trains a few MB of parameters, so the only traffic worth having is
one all-reduce of the adapter gradients per optimizer step (flattened into one buffer). Doing it by hand also
keeps the loss normalisation explicit (see ``objectives``), which is what makes N processes equal one.
Backend: NCCL when the processes use CUDA, gloo on CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # whether we created the process group (and so destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """The device for this process; a device that does not exist here is a ``ValueError`` naming it.

    Why check: torch fails late and obscurely (an AssertionError deep in CUDA init, a RuntimeError parsing
    the string) where the user only needs to hear which devices this machine has.
    """
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(pref)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {pref!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {pref!r} requested but CUDA is not available on this machine; use --device cpu "
                             "or auto")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {pref!r} requested but MPS is not available on this machine")
    return device


def setup(device_pref: str = "auto") -> DistContext:
    """Join the torchrun process group if WORLD_SIZE > 1; otherwise a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world <= 1:
        return DistContext(device=device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        owns = True
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)
    log.info("distributed training: rank %d of %d on %s (%s)", ctx.rank, ctx.world_size, device, dist.get_backend())
    return ctx


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_grads(params: list[nn.Parameter], ctx: DistContext) -> None:
    """Sum the adapter gradients over ranks in one flat buffer (each rank's loss is already globally scaled)."""
    if not ctx.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = flat[offset:offset + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a few scalars over ranks (float64, for logging and evaluation totals)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's decision, for everyone (e.g. early stopping)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item())
