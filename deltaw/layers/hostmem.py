"""Host memory for merged weights, backed by 2 MiB pages where Linux allows it.

Why: merging writes a fresh full-size weight for every adapted layer (W0 is kept untouched, so unmerge is an
exact pointer swap). On a Linux CPU, allocations that large come from fresh ``mmap`` calls, and the first write
to each 4 KiB page is a page fault: for the SmolLM2-135M shape (425 MB of adapted fp32 weights) about 104,000
faults, two thirds of the merge time. One private anonymous mapping advised with ``MADV_HUGEPAGE`` takes the
same bytes in ~200 faults of 2 MiB (transparent huge pages in ``madvise`` or ``always`` mode).

Every tensor carved from the mapping gets its *own* storage (``torch.frombuffer`` at an offset), so savers that
look for shared storage (safetensors, ``transformers.save_pretrained``) see separate tensors. The mapping is
released when the last tensor carved from it is freed. Anywhere else (other OS, CUDA, THP off, small totals)
:func:`empty_many` returns ``None`` and callers allocate as usual.
"""

from __future__ import annotations

import mmap
import sys
import warnings
from collections.abc import Sequence

import torch

_HUGE = 2 << 20  # the x86-64 / arm64 PMD size: one transparent huge page
_ALIGN = 64  # cache-line alignment for each carved tensor
MIN_BYTES = 8 << 20  # below this the fault cost is noise; ordinary allocation is simpler


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


_USABLE = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") and _thp_mode() in ("always", "madvise")


def empty_many(shapes: Sequence[torch.Size | tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor] | None:
    """Uninitialised contiguous CPU tensors of ``shapes`` from one huge-page-advised mapping, or ``None`` when
    that would not help (see the module docstring)."""
    if not _USABLE or not shapes or any(torch.Size(s).numel() == 0 for s in shapes):
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    offsets, total = [], 0
    for shape in shapes:
        offsets.append(total)
        total += -(-torch.Size(shape).numel() * itemsize // _ALIGN) * _ALIGN
    if total < MIN_BYTES:
        return None
    size = -(-total // _HUGE) * _HUGE  # a PMD-multiple length lets the kernel align the mapping to 2 MiB
    try:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return None
    with warnings.catch_warnings():  # frombuffer warns only for read-only buffers; this one is writable
        warnings.simplefilter("ignore")
        return [
            torch.frombuffer(buf, dtype=dtype, count=torch.Size(shape).numel(), offset=off).view(shape)
            for shape, off in zip(shapes, offsets)
        ]
