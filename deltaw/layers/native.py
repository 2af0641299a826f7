"""The fused CPU merge kernel (``merge_kernel.c``): W = W0 + Σ alpha·M1·M2 and the all-finite check in one pass.

Why native: on CPU a merge is bound by bytes moved. ``torch.addmm(W0, B, A, out=W)`` copies W0 into W and then
runs a K = r GEMM over W (two passes), and the NaN/inf scan is a third; the kernel reads W0 once and writes W
once (135M model, 210 weights, 2 threads: ~65 ms against ~95 ms for addmm + sum; see benchmarks/merge_unmerge).
Large weights go in two phases per chunk of rows (products into a per-thread scratch while W0 is prefetched,
then streamed out), on threads kept between calls: torch's own OpenMP threads where torch ships GNU OpenMP
(``_variants``), else the file's own pool (one call at a time uses it; a forked child starts its own). Each job
runs with the caller's flush-to-zero setting.

The C file is compiled on the first merge that can use it, with the system C compiler (~1 s, mostly parsing
``immintrin.h``), into ``<deltaw cache>/native/`` under a name that hashes the source and the compiler binary
(path, size, mtime), so later processes just load it (ctypes; calls release the GIL); only from a folder and
file private to this user. An unwritable or shared cache compiles into a private temporary folder instead.
No compiler, no AVX2/FMA, a non-x86 CPU, or ``DELTAW_NATIVE=0``: merges take the torch path, with the same
result up to rounding.

The same library holds ``dw_lora_gemv_f32``, the LoRA update of a Linear layer for up to ``MAX_TOKENS`` tokens
(``lora_gemv_``, the decode step): the factors were evicted by the base weights streaming past, and ``mv`` +
``addmv_`` (one token) fetch them at ~2.6 GB/s where one sequential pass streams them (paired same-process A/B,
SmolLM2-135M shape, r = 16 on 210 modules, 2 threads: -2 ms per ~110 ms step); for a small batch, two skinny
torch GEMMs per module cost ~15-40 us each in overhead where the kernel reads A and B once for all tokens.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import struct
import sys
import subprocess
import tempfile
import threading
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.autograd.forward_ad

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("merge_kernel.c")
MAX_RANK = 256  # DW_MAX_RANK in the C file: the kernel keeps 4 rows' coefficients on the stack
# What merges send it: a total rank up to 64, where the fused pass still beats torch's pass per adapter (135M
# shape, 2 threads, merge + unmerge, same-process A/B against the torch path: r=16 120 vs 149 ms, r=32 137 vs
# 150, r=64 213 vs 228, a stack of two r=16 161 vs 193, of four 229 vs 250). Higher ranks are compute-bound
# and MKL's GEMM blocking wins.
FUSED_MAX_RANK = 64
_MIN_THREADED = 1 << 16  # elements below which extra threads cost more than they save
# Tokens up to which ``lora_gemv_`` beats torch's two GEMMs: at the 135M shape, 16 tokens take 18-35 µs per module
# in the kernel against 15-40 µs for each of the two skinny GEMMs; with more tokens the GEMMs win (README).
MAX_TOKENS = 16

_lock = threading.Lock()
_F32 = torch.float32
_TENSOR = torch.Tensor
_lib: ctypes.CDLL | None = None
_tried = False


def _variants() -> list[tuple[str, list[str]]]:
    """(file-name tag, extra compiler flags) of the builds to try, best first. Where torch ships GNU OpenMP
    (``torch/lib/libgomp.so.1``, Linux wheels), the kernel's threads are torch's own OpenMP threads: the library
    names ``libgomp.so.1``, which the loader resolves to the copy torch already mapped. Torch's threads spin for
    some ms after each op, and a separate pool competed with them for the cores (merge + unmerge of the 135M shape
    right after a matmul: 110 vs 96 ms, random-order A/B). Then the plain build, with the file's own pool."""
    lib = Path(torch.__file__).parent / "lib"
    if sys.platform.startswith("linux") and (lib / "libgomp.so.1").is_file():
        return [("omp-", ["-fopenmp", "-DDW_OMP", f"-Wl,-rpath,{lib}"]), ("", [])]
    return [("", [])]


def _build(cc: str, target: Path, flags: Sequence[str] = ()) -> bool:
    """Compile into ``target`` atomically (a temporary name in the same folder, then a rename)."""
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, "-O3", "-shared", "-fPIC", "-pthread", *flags, "-o", tmp, str(SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log.info("the merge kernel did not compile%s (%s)", f" with {' '.join(flags)}" if flags else "",
                     done.stderr.strip()[-300:])
            return False
        os.replace(tmp, target)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Term(ctypes.Structure):
    """``dw_term`` in merge_kernel.c: one adapter's M1 (rows, r) at strides (s1r, s1k), M2 (r, cols), alpha."""

    _fields_ = [("m1", ctypes.c_void_p), ("m2", ctypes.c_void_p), ("s1r", ctypes.c_int64), ("s1k", ctypes.c_int64),
                ("r", ctypes.c_int64), ("alpha", ctypes.c_float)]


_TERM = struct.Struct("@PPqqqf4x")  # the same layout, packed from Python without building ctypes objects
assert _TERM.size == ctypes.sizeof(_Term)


class _RowTerm(ctypes.Structure):
    """``dw_rowterm`` in merge_kernel.c: rows[0..n) of x and y get y += s · B (A x); A (r, in), B (out, r)."""

    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("rows", ctypes.c_void_p), ("r", ctypes.c_int64),
                ("n", ctypes.c_int64), ("s", ctypes.c_float)]


def _open(path: Path) -> ctypes.CDLL:
    """Load a built kernel and declare its signatures (OSError / AttributeError when the file is not one)."""
    lib = ctypes.CDLL(str(path))
    lib.dw_supported.restype = ctypes.c_int
    lib.dw_supported.argtypes = []
    lib.dw_openmp.restype = ctypes.c_int
    lib.dw_openmp.argtypes = []
    fn = lib.dw_merge_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_char_p,  # dw_term[]
                   ctypes.c_int, ctypes.c_int]
    gemv = lib.dw_lora_gemv_f32
    gemv.restype = ctypes.c_int
    gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int]
    rows = lib.dw_lora_rows_f32
    rows.restype = ctypes.c_int
    rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(_RowTerm),
                     ctypes.c_int, ctypes.c_int]
    return lib


def _private(path: Path) -> bool:
    """Owned by this user and writable by nobody else (a shared cache could otherwise hand us someone else's
    shared library). Always true where there are no POSIX owners."""
    if not hasattr(os, "getuid"):
        return True
    st = os.stat(path)
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _compile() -> ctypes.CDLL | None:
    if os.environ.get("DELTAW_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.info("no C compiler found: merges use the torch path")
        return None
    try:
        real = os.path.realpath(cc)  # the compiler binary itself: a new compiler gets a new build
        st = os.stat(real)
    except OSError as err:
        log.info("the merge kernel is unavailable (%s): merges use the torch path", err)
        return None
    ident = f"{real}:{st.st_size}:{st.st_mtime_ns}"
    lib = None
    for tag, flags in _variants():
        lib = _load_or_build(cc, ident, tag, flags)
        if lib is not None:
            break
    if lib is None:
        log.info("the merge kernel is unavailable: merges use the torch path")
        return None
    if not lib.dw_supported():
        log.info("this CPU lacks AVX2/FMA: merges use the torch path")
        return None
    return lib


def _mark_failed(marker: Path) -> None:
    """Remember that a build failed for a reason that will not change by itself (the compiler refused it, or the
    library it made does not load here): without this, every new process paid a compile (~1 s) before falling
    back. The marker's name carries the build's key (source, compiler, flags), so a change to any of those tries
    again; deleting the cache folder does too."""
    try:
        marker.touch(mode=0o600)
    except OSError:
        pass


def _load_or_build(cc: str, ident: str, tag: str, flags: list[str]) -> ctypes.CDLL | None:
    """The cached build for these flags, built first if missing or damaged; None if it cannot be had (or it
    failed here before, see ``_mark_failed``)."""
    scratch = None
    try:
        key = hashlib.sha256(SOURCE.read_bytes() + f"{ident}:{' '.join(flags)}".encode()).hexdigest()[:16]
        from ..models.embedded import default_cache_dir
        folder = default_cache_dir() / "native"
        target = folder / f"merge_kernel-{tag}{key}.so"
        failed = folder / f"merge_kernel-{tag}{key}.failed"
        lib = None
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not _private(folder):  # code others can swap must not be loaded
                raise PermissionError(f"{folder} is not private to this user")
            if target.is_file():
                if not _private(target):
                    log.info("not loading %s (not private to this user): rebuilding it", target)
                    target.unlink()
                else:
                    try:
                        lib = _open(target)
                    except (OSError, AttributeError) as err:  # damaged: build it again
                        log.info("rebuilding the cached merge kernel %s (%s)", target, err)
                        target.unlink(missing_ok=True)
            if lib is None:
                if failed.is_file() and _private(failed):
                    log.info("skipping the merge kernel build %s: it failed here before (%s)", target.name, failed)
                    return None
                if not _build(cc, target, flags):
                    _mark_failed(failed)
                else:
                    try:
                        lib = _open(target)
                    except (OSError, AttributeError) as err:  # built but not loadable here (e.g. a runtime mismatch)
                        log.info("the merge kernel built with %s does not load (%s)", flags or "no flags", err)
                        target.unlink(missing_ok=True)
                        _mark_failed(failed)
        except OSError:  # read-only or shared cache: build for this process only
            scratch = tempfile.mkdtemp(prefix="deltaw-native-")
            target = Path(scratch) / target.name
            lib = _open(target) if _build(cc, target, flags) else None
    except (OSError, AttributeError, subprocess.SubprocessError) as err:
        log.info("the merge kernel%s is unavailable (%s)", f" with {' '.join(flags)}" if flags else "", err)
        return None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)  # already mapped
    return lib


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, compiling it on first use; None when it cannot run here."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _compile()
                _tried = True
    return _lib


def _fits(out: torch.Tensor, w0: torch.Tensor, terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> bool:
    """Whether the kernel can compute ``out = w0 + Σ alpha · m1 @ m2``: fp32 CPU tensors, W and W0 contiguous
    (rows, cols), each m1 (rows, r), m2 (r, cols) contiguous, Σr ≤ MAX_RANK, no input overlapping ``out``.
    (Run per layer on every merge: ~3 µs, property reads kept to what is needed.)"""
    if not terms or out.dtype != _F32 or w0.dtype != _F32 or not (out.is_cpu and w0.is_cpu):
        return False
    # No autograd here: with grad mode on, a tensor that requires grad must not be read behind its back. (Under
    # no_grad, merges of trainable factors -- Parameters with requires_grad -- are what the kernel is for.)
    grad = torch.is_grad_enabled()
    if grad and (out.requires_grad or w0.requires_grad):
        return False
    shape = w0.shape
    if len(shape) != 2 or out.shape != shape or not (out.is_contiguous() and w0.is_contiguous()):
        return False
    rows, cols = shape
    o0 = out.data_ptr()
    o1 = o0 + rows * cols * 4
    w = w0.data_ptr()
    if w < o1 and o0 < w + rows * cols * 4:  # the output must not overlap an input: the kernel reads them
        return False
    rank = 0
    for m1, m2, _ in terms:
        if m1.dtype != _F32 or m2.dtype != _F32 or not (m1.is_cpu and m2.is_cpu) or \
                (grad and (m1.requires_grad or m2.requires_grad)):
            return False
        r = m1.shape[1] if m1.dim() == 2 else -1
        if r < 1 or m1.shape != (rows, r) or m2.shape != (r, cols) or not m2.is_contiguous():
            return False
        rank += r
        s0, s1 = m1.stride()
        for lo, hi in ((m1.data_ptr(), m1.data_ptr() + ((rows - 1) * s0 + (r - 1) * s1 + 1) * 4),
                       (m2.data_ptr(), m2.data_ptr() + r * cols * 4)):
            if lo < o1 and o0 < hi:
                return False
    return rank <= MAX_RANK


def merge_terms_into(out: torch.Tensor, w0: torch.Tensor,
                     terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> bool | None:
    """out = w0 + Σ alpha · m1 @ m2 over ``terms`` (m1, m2, alpha), fp32 on the CPU, in one pass.
    w0, out: (rows, cols); each m1: (rows, r), any strides; each m2: (r, cols) contiguous; Σr ≤ MAX_RANK.

    Returns True when every entry of ``out`` is finite, False when one is not (``out`` then holds the rejected
    values), None when the kernel does not apply (dtype, device, layout, rank, overlap, no kernel) and ``out``
    is untouched."""
    if not _fits(out, w0, terms):
        return None
    lib = kernel()
    if lib is None:
        return None
    rows, cols = w0.shape
    packed = b"".join([_TERM.pack(m1.data_ptr(), m2.data_ptr(), *m1.stride(), m1.shape[1], float(alpha))
                       for m1, m2, alpha in terms])  # dw_term[]: struct.pack is ~3 µs cheaper per call than ctypes
    threads = torch.get_num_threads() if rows * cols >= _MIN_THREADED else 1
    rc = lib.dw_merge_f32(out.data_ptr(), w0.data_ptr(), rows, cols, packed, len(terms), threads)
    if rc < 0:
        return None
    try:  # written behind autograd's back: saved-tensor checks must see it (inference tensors keep no counter)
        torch.autograd.graph.increment_version(out)
    except RuntimeError:
        pass
    return rc == 0


_is_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)
# Forward AD's open dual level (-1 outside ``forward_ad.dual_level()``), read as ``_fwad._current_level`` on every
# decode call (a module global read, where a function call costs more). A torch without it: a level is taken as
# open, so the raw-pointer paths never run (the torch paths carry tangents).
_fwad = torch.autograd.forward_ad
if not isinstance(getattr(_fwad, "_current_level", None), int):
    log.warning("torch.autograd.forward_ad._current_level is missing in this torch: deltaw's native decode paths "
                "are off (they could not tell whether forward AD is on)")
    _fwad = types.SimpleNamespace(_current_level=0)


def _plain(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Eager tensors with real memory: not a tensor subclass (export's FakeTensor, FunctionalTensor), not under
    ``torch.jit.trace`` (a write through a raw pointer is invisible to the tracer: the traced module would
    silently lose the LoRA update), not inside ``forward_ad.dual_level()`` (a raw write carries no tangent: the
    output's kept only the base layer's). The torch path handles those."""
    return type(x) is torch.Tensor and type(y) is torch.Tensor and not _is_tracing() and _fwad._current_level < 0


def _pointers(y: torch.Tensor, x: torch.Tensor) -> tuple[int, int] | None:
    """(y, x) data pointers, or None when either has no storage (functorch's vmap wrappers) or y's bytes overlap
    x's (a later term would read what an earlier one wrote)."""
    try:
        py, px = y.data_ptr(), x.data_ptr()
    except RuntimeError:
        return None
    if py < px + x.numel() * x.element_size() and px < py + y.numel() * y.element_size():
        return None
    return py, px


#: DW_GEMV_SPLIT_TOKENS in the C file: below this many tokens the update runs on the calling thread whatever
#: thread count it is given, so a caller may skip asking torch for it.
SPLIT_TOKENS = 8


def gemv_function() -> Callable[..., int] | None:
    """The kernel's ``dw_lora_gemv_f32`` for callers that check their operands themselves (``LoraLinear``'s
    decode plan), or None where it cannot run. Arguments: y, x, A, B pointers, n, r, in, out, scale, threads."""
    lib = _lib if _tried else kernel()
    return None if lib is None else lib.dw_lora_gemv_f32


def _gemv_threads() -> int:
    """Threads ``lora_gemv_`` may split an update over (the OpenMP build only): torch's own count, whose threads
    ran the base GEMV just before and are still awake."""
    return torch.get_num_threads()


def lora_gemv_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    """y += scale · (x Aᵀ) Bᵀ in place for a few tokens (on the calling thread; from 8 tokens, in the OpenMP build,
    split over torch's threads with the same bits): A (r, in), B (out, r),
    x (..., in), y (..., out) with the same n = y.numel() / out ≤ MAX_TOKENS leading rows. The decode step of a
    Linear layer, where two torch GEMMs of these skinny shapes (or ``mv`` + ``addmv_`` for one token) cost more
    than reading the factors takes. Each token's result is the same whatever n (the kernel's per-row arithmetic
    does not depend on it). Returns False, touching nothing, unless all four are contiguous fp32 CPU tensors of
    sizes that add up, x and y plain (``_plain``) and not overlapping, r <= MAX_RANK, n <= MAX_TOKENS and the
    kernel runs here.

    The caller (``LoraLinear.add_lora_``, the no-autograd inference path) passes the layer's fresh output as y,
    which nothing has saved for backward, so the write needs no version-counter bump.
    This runs ~200 times per decoded token: plain attribute checks only, and those before the library is first
    asked for (a model on another device must not compile a CPU kernel it can never use)."""
    # (each tensor attribute read costs ~50 ns and this runs ~200 times per token: every fact is read once)
    if (type(x) is not _TENSOR or type(y) is not _TENSOR or y.dtype is not _F32 or x.dtype is not _F32
            or a.dtype is not _F32 or b.dtype is not _F32 or not (y.is_cpu and x.is_cpu and a.is_cpu and b.is_cpu)
            or not (a.is_contiguous() and b.is_contiguous() and x.is_contiguous() and y.is_contiguous())
            or _is_tracing() or _fwad._current_level >= 0):
        return False
    lib = _lib if _tried else kernel()
    if lib is None:
        return False
    try:
        r, n_in = a.shape
        n_out, r_b = b.shape
    except ValueError:  # A or B not 2-D
        return False
    ny, nx = y.numel(), x.numel()
    # (the kernel indexes x, y, A and B by these sizes: anything that does not add up is declined)
    if n_out < 1 or r_b != r or r > MAX_RANK:
        return False
    n = ny // n_out
    if n > MAX_TOKENS or ny != n * n_out or nx != n * n_in:
        return False
    try:  # (functorch's vmap wrappers are plain Tensors without storage)
        py, px = y.data_ptr(), x.data_ptr()
    except RuntimeError:
        return False
    if py < px + 4 * nx and px < py + 4 * ny:  # overlapping: the kernel would read what it wrote
        return False
    return lib.dw_lora_gemv_f32(py, px, a.data_ptr(), b.data_ptr(), n, r, n_in, n_out, scale, _gemv_threads()) == 0



class RowTerms:
    """The terms of one mixed decode batch for one layer, prepared once for ``lora_rows_``: per (adapter,
    weight), the factors A (r, in), B (out, r), the scale and the entries (rows of the flattened x and y) it
    applies to. Holds references to the factors and indexes, so the pointers it hands the kernel stay valid
    (a factor replaced through ``.data`` keeps its old values here, as packs do)."""

    def __init__(self, terms: Sequence[tuple[torch.Tensor, torch.Tensor, float, list[int]]], entries: int) -> None:
        self.entries = entries
        self.in_f, self.out_f = terms[0][0].shape[1], terms[0][1].shape[0]
        self._keep = []
        packed = []
        for a, b, scale, rows in terms:
            idx = torch.tensor(rows, dtype=torch.int64)  # (n,)
            self._keep.append((a, b, idx))
            packed.append(_RowTerm(a.data_ptr(), b.data_ptr(), idx.data_ptr(), a.shape[0], len(rows), scale))
        self.array = (_RowTerm * len(packed))(*packed)
        self.count = len(packed)


def row_terms(terms: Sequence[tuple[torch.Tensor, torch.Tensor, float, list[int]]],
              entries: int) -> RowTerms | None:
    """``RowTerms`` for these (A, B, scale, entry indexes), or None when the kernel cannot take them: no kernel
    here, a factor not fp32 on the CPU or not contiguous, rank above MAX_RANK, a term with more than MAX_TOKENS
    entries (torch's batched GEMMs win there), factors of different layer shapes, or an index outside
    [0, entries) or repeated."""
    lib = kernel()
    if lib is None or not terms:
        return None
    in_f, out_f = terms[0][0].shape[1], terms[0][1].shape[0]
    for a, b, _, rows in terms:
        if (a.dtype is not torch.float32 or b.dtype is not torch.float32 or not (a.is_cpu and b.is_cpu)
                or not (a.is_contiguous() and b.is_contiguous()) or a.dim() != 2 or b.dim() != 2
                or a.shape[0] > MAX_RANK or b.shape[1] != a.shape[0] or a.shape[1] != in_f or b.shape[0] != out_f
                or not 0 < len(rows) <= MAX_TOKENS or min(rows) < 0 or max(rows) >= entries
                or len(set(rows)) != len(rows)):
            return None
    return RowTerms(terms, entries)


def lora_rows_(y: torch.Tensor, x: torch.Tensor, terms: RowTerms) -> bool:
    """y += s · (x Aᵀ) Bᵀ on each term's rows, in place: x (..., in) and y (..., out) flattened to ``terms.entries``
    rows. Returns False, touching nothing, unless x and y are plain, non-overlapping, contiguous fp32 CPU tensors of
    exactly that many rows (the kernel indexes them without bounds checks)."""
    if (not _plain(x, y) or y.dtype is not torch.float32 or x.dtype is not torch.float32
            or not (y.is_cpu and x.is_cpu) or not (y.is_contiguous() and x.is_contiguous())
            or y.numel() != terms.entries * terms.out_f or x.numel() != terms.entries * terms.in_f):
        return False
    ptrs = _pointers(y, x)
    if ptrs is None:
        return False
    return _lib.dw_lora_rows_f32(*ptrs, terms.in_f, terms.out_f, terms.array, terms.count, _gemv_threads()) == 0
