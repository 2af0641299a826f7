"""The fused CPU merge kernel (deltaw/layers/merge_kernel.c via layers/native.py): same result as torch up to
rounding, bit-identical across thread counts and paths, finiteness folded in, and it declines what it cannot do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import deltaw
from thread_checks import assert_same_bits_for_any_thread_count
from toy_models import Single
from deltaw.errors import NonFiniteError
from deltaw.batching import per_row
from deltaw.layers import native

needs_kernel = pytest.mark.skipif(native.kernel() is None, reason="no C compiler / AVX2+FMA here: torch path only")


def _case(rows: int, cols: int, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g), torch.randn(rows, r, generator=g) * 0.1,
            torch.randn(r, cols, generator=g) * 0.1)



def _merge1(out: torch.Tensor, w0: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, alpha: float) -> bool | None:
    """One term: out = w0 + alpha · m1 @ m2 through the kernel."""
    return native.merge_terms_into(out, w0, ((m1, m2, alpha),))


def _torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merges take the torch path for the rest of the test (as with DELTAW_NATIVE=0 in a new process)."""
    monkeypatch.setenv("DELTAW_NATIVE", "0")
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)


@needs_kernel
@pytest.mark.parametrize("rows,cols,r", [(64, 96, 16), (37, 53, 3), (5, 16, 1), (3, 7, 8), (130, 1040, 256),
                                         (576, 576, 16)])
def test_matches_torch_addmm(rows: int, cols: int, r: int) -> None:
    w0, m1, m2 = _case(rows, cols, r)
    out = torch.empty_like(w0)
    assert _merge1(out, w0, m1, m2, 1.5) is True
    torch.testing.assert_close(out, torch.addmm(w0, m1, m2, alpha=1.5), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_strided_left_factor_and_thread_count_give_identical_bits() -> None:
    """Conv1D passes Aᵀ as a strided view; the partition over threads must not change a single bit."""
    w0, m1, m2 = _case(301, 400, 16, seed=1)  # rows not a multiple of 4, cols not of 16: every tail path
    m1_strided = m1.t().contiguous().t()  # same values, strides (1, rows)
    before = torch.get_num_threads()
    results = []
    try:
        for threads, left in ((1, m1), (2, m1_strided), (3, m1)):
            torch.set_num_threads(threads)
            out = torch.empty_like(w0)
            assert _merge1(out, w0, left, m2, 0.75) is True
            results.append(out)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.fixture(params=["default", "own-pool"])
def threading_build(request, tmp_path_factory, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way the kernel runs its jobs: the default build (on torch's OpenMP threads where torch ships GNU
    OpenMP) and the build with the file's own thread pool (elsewhere), compiled here into a private cache."""
    if native.kernel() is None:
        pytest.skip("no C compiler / AVX2+FMA here")
    if request.param == "own-pool":
        monkeypatch.setenv("DELTAW_CACHE", str(tmp_path_factory.mktemp("pool-build")))
        monkeypatch.setattr(native, "_variants", lambda: [("", [])])
        lib = native._compile()
        assert lib is not None and lib.dw_openmp() == 0
        monkeypatch.setattr(native, "_lib", lib)
        monkeypatch.setattr(native, "_tried", True)
    return request.param


def test_kernel_shares_torchs_openmp_runtime() -> None:
    """Where torch ships GNU OpenMP, the kernel's jobs run on torch's own OpenMP threads (one runtime in the
    process): a separate pool competed with torch's still-spinning threads right after every torch op."""
    from pathlib import Path
    if native.kernel() is None:
        pytest.skip("no C compiler / AVX2+FMA here")
    bundled = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if not (sys.platform.startswith("linux") and bundled.is_file()):
        assert native.kernel().dw_openmp() == 0
        return
    assert native.kernel().dw_openmp() == 1
    with open("/proc/self/maps") as maps:
        mapped = {line.split()[-1] for line in maps if "libgomp" in line}
    assert mapped == {str(bundled.resolve())} or mapped == {str(bundled)}


_FIRST_REGION = """
import torch
from deltaw.layers import native
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(16, 576, generator=g), torch.zeros(16, 576)
a, b = torch.randn(16, 576, generator=g) * 1e-3, torch.randn(576, 16, generator=g) * 1e-3
w0, out = torch.randn(512, 256, generator=g), torch.empty(512, 256)
m1, m2 = torch.randn(512, 4, generator=g), torch.randn(4, 256, generator=g)
assert native.kernel() is not None and native.kernel().dw_openmp() == 1
assert torch.set_flush_denormal(True)
if "{call}" == "gemv":
    assert native.lora_gemv_(y, x, a, b, 1.0)
elif "{call}" == "rows":
    assert native.lora_rows_(y, x, native.row_terms([(a, b, 1.0, list(range(16)))], 16))
else:
    assert native.merge_terms_into(out, w0, ((m1, m2, 1.0),)) is True
torch.set_flush_denormal(False)
tiny = torch.full((1 << 20,), 1e-40)
print(int(((tiny * 1.0) == 0).sum()))
"""


@needs_kernel
@pytest.mark.parametrize("call", ["gemv", "rows", "merge"])
def test_threads_a_kernel_call_creates_do_not_keep_the_callers_flush_setting(call: str) -> None:
    """The first parallel region of a process creates torch's OpenMP workers, and a new thread starts with its
    creator's MXCSR: created under the caller's flush-to-zero, a worker restored that after its job and kept it
    (a later parallel torch op flushed 524,288 of 2**20 denormals, from a review; failed before the fix)."""
    if sys.platform != "linux" or not (Path(torch.__file__).parent / "lib" / "libgomp.so.1").is_file():
        pytest.skip("the OpenMP build is for torch's GNU OpenMP (Linux wheels)")
    done = subprocess.run([sys.executable, "-c", _FIRST_REGION.replace("{call}", call)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0"


@needs_kernel
def test_pool_workers_follow_the_callers_flush_to_zero_setting(threading_build: str) -> None:
    """Workers live across calls, and each thread has its own FTZ/DAZ bits: after
    ``torch.set_flush_denormal(True)`` (the calling thread only) the rows a worker merged kept denormals that
    the caller's rows flushed (65,534 of them, from a review), so the result depended on the thread count."""
    before = torch.get_num_threads()
    rows, cols = 512, 256
    g = torch.Generator().manual_seed(0)
    try:
        torch.set_num_threads(2)
        assert _merge1(torch.empty(rows, cols), *_case(rows, cols, 4)[:3], 1.0) is True  # workers exist now
        w0 = torch.randn(rows, cols, generator=g) * 1e-39  # results in the denormal range
        m1, m2 = torch.randn(rows, 4, generator=g) * 1e-20, torch.randn(4, cols, generator=g) * 1e-19
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU cannot flush denormals")
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.empty(rows, cols)
            assert _merge1(out, w0, m1, m2, 1.0) is True
            outs.append(out)
        assert outs[0].numpy().tobytes() == outs[1].numpy().tobytes()  # bitwise (DAZ would equate denormals)
        torch.set_flush_denormal(False)
        # ... and the threads that ran the jobs (torch's own, in the OpenMP build) keep their own setting: a parallel
        # torch op afterwards flushed the half of 2**20 denormals that landed on the worker (from a review)
        tiny = torch.full((1 << 20,), 1e-40)
        assert int(((tiny * 1.0) == 0).sum()) == 0
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


@needs_kernel
def test_large_and_small_weights_give_the_same_bits_per_row() -> None:
    """A weight past 256 KB takes the two-phase loop (products to a scratch, then streamed out), a small one the
    one-phase loop; a row's result must not depend on which, nor on the chunk boundaries (rows not a multiple of
    the 24-row chunk, columns not of 16)."""
    w0, m1, m2 = _case(603, 584, 16, seed=3)  # 1.4 MB: two-phase
    assert w0.numel() * 4 >= 256 << 10
    big = torch.empty_like(w0)
    assert _merge1(big, w0, m1, m2, -0.6) is True
    for lo, hi in ((0, 40), (37, 90), (563, 603)):  # < 256 KB each: one-phase
        small = torch.empty(hi - lo, 584)
        assert _merge1(small, w0[lo:hi].clone(), m1[lo:hi].clone(), m2, -0.6) is True
        assert torch.equal(small, big[lo:hi]), (lo, hi)


@needs_kernel
def test_several_terms_equal_their_sum_and_split_over_threads_identically() -> None:
    w0 = torch.randn(203, 150)
    terms = []
    for r, alpha in ((5, 0.3), (16, -1.7), (1, 2.0)):
        m1 = torch.randn(r, 203).t()  # strided (rows, r)
        terms.append((m1, torch.randn(r, 150), alpha))
    expected = w0 + sum(alpha * (m1 @ m2) for m1, m2, alpha in terms)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 5):
            torch.set_num_threads(threads)
            out = torch.empty_like(w0)
            assert native.merge_terms_into(out, w0, terms) is True
            outs.append(out)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # a term merged alone gives the same bits whichever way it is passed (strided left factor or not)
    single = torch.empty_like(w0)
    assert _merge1(single, w0, terms[1][0].contiguous(), terms[1][1], terms[1][2]) is True
    again = torch.empty_like(w0)
    assert native.merge_terms_into(again, w0, terms[1:2]) is True and torch.equal(single, again)
    big = [(torch.randn(203, 200), torch.randn(200, 150), 1.0), (torch.randn(203, 57), torch.randn(57, 150), 1.0)]
    assert native.merge_terms_into(torch.empty_like(w0), w0, big) is None  # Σr = 257 > MAX_RANK
    assert native.merge_terms_into(torch.empty_like(w0), w0, []) is None


@needs_kernel
def test_worker_pool_serves_concurrent_callers_and_a_forked_child(threading_build: str) -> None:
    """The kernel keeps its worker threads between calls. Callers on several Python threads share them one call
    at a time, and a child forked after they exist gets its own (before the fork hook, the child waited forever
    for workers it did not have)."""
    import multiprocessing
    import threading

    cases = [_case(rows, 300, 8, seed=rows) for rows in (240, 301, 520)]
    assert all(c[0].numel() >= native._MIN_THREADED for c in cases)  # big enough to be split over threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        expected = []
        for w0, m1, m2 in cases:
            out = torch.empty_like(w0)
            assert _merge1(out, w0, m1, m2, 0.5) is True
            expected.append(out)
        wrong: list[int] = []

        def caller(k: int) -> None:
            for _ in range(25):
                w0, m1, m2 = cases[k % 3]
                out = torch.empty_like(w0)
                if _merge1(out, w0, m1, m2, 0.5) is not True or not torch.equal(out, expected[k % 3]):
                    wrong.append(k)

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads) and not wrong

        def child() -> None:  # compared through numpy: torch's OpenMP ops may hang in a forked child
            out = torch.empty_like(cases[2][0])
            ok = _merge1(out, *cases[2][:3], 0.5) is True and out.numpy().tobytes() == expected[2].numpy().tobytes()
            os._exit(0 if ok else 3)

        proc = multiprocessing.get_context("fork").Process(target=child)
        proc.start()
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            pytest.fail("the forked child hung in the merge kernel")
        assert proc.exitcode == 0
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("where", ["w0_nan", "w0_inf", "factor_nan", "overflow", "tail_nan"])
def test_reports_non_finite_results(where: str) -> None:
    w0, m1, m2 = _case(40, 70, 4)
    if where == "w0_nan":
        w0[3, 5] = float("nan")
    elif where == "w0_inf":
        w0[39, 0] = float("-inf")
    elif where == "factor_nan":
        m2[2, 17] = float("nan")
    elif where == "overflow":
        w0[10, 10] = 3.4e38
        m1[10] = 1e19
        m2[:, 10] = 1e19
    else:  # an entry handled by the scalar column tail (cols 64..69)
        w0[1, 68] = float("nan")
    out = torch.empty_like(w0)
    assert _merge1(out, w0, m1, m2, 1.0) is False


@needs_kernel
def test_bumps_the_output_version_counter() -> None:
    w0, m1, m2 = _case(8, 32, 2)
    out = torch.empty_like(w0)
    before = out._version
    assert _merge1(out, w0, m1, m2, 1.0) is True
    assert out._version > before


def test_declines_what_it_cannot_do() -> None:
    w0, m1, m2 = _case(16, 32, 4)
    out = torch.empty_like(w0)
    assert _merge1(out, w0.double(), m1.double(), m2.double(), 1.0) is None  # fp64
    assert _merge1(out, w0.t().contiguous().t(), m1, m2, 1.0) is None  # W0 not contiguous
    assert _merge1(out, w0, m1, m2.t().contiguous().t(), 1.0) is None  # M2 not contiguous
    big = _case(16, 32, native.MAX_RANK + 1)
    assert _merge1(out, big[0], big[1], big[2], 1.0) is None  # rank above the kernel's bound
    assert _merge1(w0, w0, m1, m2, 1.0) is None  # output overlaps an input
    assert _merge1(m2.new_empty(16, 32), w0, m1, m2.new_empty(4, 31), 1.0) is None  # shapes
    w_copy = w0.clone()
    _merge1(w0, w0, m1, m2, 1.0)
    assert torch.equal(w0, w_copy)


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _torch_path(monkeypatch)
    assert native.kernel() is None
    w0, m1, m2 = _case(16, 32, 4)
    assert _merge1(torch.empty_like(w0), w0, m1, m2, 1.0) is None


def test_cache_survives_a_new_process_build(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh cache folder gets one compiled file, found (not rebuilt) by the next load."""
    if native.kernel() is None:
        pytest.skip("no C compiler / AVX2+FMA here")
    monkeypatch.setenv("DELTAW_CACHE", str(tmp_path))
    assert native._compile() is not None
    built = list((tmp_path / "native").glob("merge_kernel-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert native._compile() is not None
    assert built[0].stat().st_mtime_ns == stamp and not list((tmp_path / "native").glob("*.tmp"))


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(48, 80)
        self.proj = nn.Linear(80, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.fc(x)))


def _model_with_adapter() -> nn.Module:
    torch.manual_seed(0)
    model = _Two()
    deltaw.attach(model, deltaw.LoraConfig(r=8, alpha=16, target_modules=["fc", "proj"]), "a")
    with torch.no_grad():
        for p in deltaw.adapter_parameters(model, "a"):
            p.normal_(0, 0.1)
    return model


@needs_kernel
def test_merge_through_the_kernel_equals_torch_path_and_unmerges_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model_with_adapter()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    real = native.merge_terms_into

    def spy(*args):
        result = real(*args)
        calls.append(result)
        return result

    monkeypatch.setattr(native, "merge_terms_into", spy)
    deltaw.merge(model, "a")
    assert calls == [True, True]  # both layers went through the kernel (trainable factors: the default)
    fused = {n: p.detach().clone() for n, p in model.named_parameters()}
    deltaw.unmerge(model)
    assert all(torch.equal(w0[n], p) for n, p in model.named_parameters())
    _torch_path(monkeypatch)
    deltaw.merge(model, "a")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), fused[n], rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("trainable", [True, False])
def test_nan_adapter_refused_through_the_kernel_leaves_weights(trainable: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model_with_adapter()
    deltaw.set_trainable(model, "a" if trainable else None)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        deltaw.adapter_parameters(model, "a")[0][0, 0] = float("nan")
    results = []
    real = native.merge_terms_into

    def spy(*args):
        results.append(real(*args))
        return results[-1]

    monkeypatch.setattr(native, "merge_terms_into", spy)
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        deltaw.merge(model, "a")
    assert False in results  # the kernel saw the NaN
    factors = {id(p) for p in deltaw.adapter_parameters(model, "a")}
    assert all(torch.equal(w0[n], p) for n, p in model.named_parameters() if id(p) not in factors)
    assert deltaw.merged(model) == ()


def test_a_damaged_cached_kernel_is_rebuilt(tmp_path) -> None:
    """Fresh processes (a process that has the library mapped keeps using it whatever happens to the file)."""
    if native.kernel() is None:
        pytest.skip("no C compiler / AVX2+FMA here")
    probe = ("import torch; from deltaw.layers import native; lib = native._compile(); "
             "w0 = torch.randn(8, 16); m1 = torch.randn(8, 2); m2 = torch.randn(2, 16); out = torch.empty_like(w0); "
             "assert native.merge_terms_into(out, w0, ((m1, m2, 1.0),)) is True; "
             "torch.testing.assert_close(out, torch.addmm(w0, m1, m2), rtol=1e-6, atol=1e-6); print('ok')")
    env = {**os.environ, "DELTAW_CACHE": str(tmp_path)}
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip() == "ok"
    (built,) = (tmp_path / "native").glob("merge_kernel-*.so")
    built.write_bytes(b"not a shared library")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
    assert built.stat().st_size > 1000


def test_a_failing_compiler_leaves_the_torch_path(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'no such luck' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("DELTAW_CACHE", str(tmp_path / "cache"))
    assert native._compile() is None
    left = {p.suffix for p in (tmp_path / "cache" / "native").glob("*")}
    assert left == {".failed"}  # no half-written file left behind: only the markers of the failed builds


def test_a_build_that_failed_is_not_retried_by_every_process(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that refuses the source (here: for every variant) is run once per build key, not on every start
    (each failed try of the OpenMP build cost a compile before the fallback); a new compiler tries again."""
    calls = tmp_path / "calls"
    fake = tmp_path / "cc"
    fake.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'no such luck' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("DELTAW_CACHE", str(tmp_path / "cache"))
    assert native._compile() is None
    tries = len(calls.read_text().splitlines())
    assert tries == len(native._variants())
    assert native._compile() is None
    assert len(calls.read_text().splitlines()) == tries  # skipped: the markers say these builds failed here
    fake.write_text(fake.read_text() + "\n")  # another compiler binary: another key
    assert native._compile() is None
    assert len(calls.read_text().splitlines()) == 2 * tries


@pytest.mark.parametrize("native_on", [True, False])
def test_a_nan_adapter_merged_at_weight_zero_is_refused_on_both_paths(native_on: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if not native_on:
        _torch_path(monkeypatch)
    model = _model_with_adapter()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        deltaw.adapter_parameters(model, "a")[1][0, 0] = float("inf")
    for weight in (0.0, 1e-46, -1e-300):  # (the last two are nonzero in Python but 0 as fp32 scalars)
        with pytest.raises(NonFiniteError, match="NaN/inf"):
            deltaw.merge(model, {"a": weight})
    factors = {id(p) for p in deltaw.adapter_parameters(model, "a")}
    assert all(torch.equal(w0[n], p) for n, p in model.named_parameters() if id(p) not in factors)


@needs_kernel
def test_refused_merge_rolls_back_exactly_after_the_factors_trainability_changes() -> None:
    """Which path computes a layer must not depend on requires_grad: a refused in-place re-merge recomputes the
    previous weights, and they must come back bit for bit (they did not when the two paths differed)."""
    torch.manual_seed(0)
    model = _Two()
    for name in ("a", "bad"):  # a scaling that is no power of two: the two paths round differently
        deltaw.attach(model, deltaw.LoraConfig(r=16, alpha=24, target_modules=["fc", "proj"]), name)
    with torch.no_grad():
        for name in ("a", "bad"):
            for p in deltaw.adapter_parameters(model, name):
                p.normal_(0, 0.3)
        deltaw.adapter_parameters(model, "bad")[0][0, 0] = float("nan")
    deltaw.set_trainable(model, "a")
    deltaw.merge(model, "a")
    installed = {n: p.detach().clone() for n, p in model.named_parameters()}
    deltaw.set_trainable(model, None)
    with pytest.raises(NonFiniteError):
        deltaw.merge(model, "bad")
    nan_factors = {id(p) for p in deltaw.adapter_parameters(model, "bad")}
    assert all(torch.equal(installed[n], p) for n, p in model.named_parameters() if id(p) not in nan_factors)


def _stack_model(ranks: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    model = _Two()
    for i, r in enumerate(ranks):
        deltaw.attach(model, deltaw.LoraConfig(r=r, alpha=1.5 * r, target_modules=["fc", "proj"]), f"s{i}")
        with torch.no_grad():
            for p in deltaw.adapter_parameters(model, f"s{i}"):
                p.normal_(0, 0.2)
    return model



@needs_kernel
def test_a_weighted_stack_merges_in_one_kernel_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _stack_model((4, 8, 2))
    stack = {"s0": 0.7, "s1": -1.25, "s2": 2.0}
    x = torch.randn(5, 48)
    deltaw.activate(model, stack)
    live = model(x).detach()
    calls = []
    real = native.merge_terms_into

    def spy(*args):
        calls.append(([m1.shape[1] for m1, _, _ in args[2]], real(*args)))
        return calls[-1][1]

    monkeypatch.setattr(native, "merge_terms_into", spy)
    deltaw.merge(model, stack)
    assert calls == [([4, 8, 2], True), ([4, 8, 2], True)]  # one pass per layer for the whole stack
    fused = {n: p.detach().clone() for n, p in model.named_parameters()}
    deltaw.deactivate(model)  # merged output alone must equal the live stack
    torch.testing.assert_close(model(x).detach(), live, rtol=1e-5, atol=1e-5)
    deltaw.unmerge(model)
    _torch_path(monkeypatch)
    deltaw.merge(model, stack)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), fused[n], rtol=1e-6, atol=1e-6)


@needs_kernel
def test_a_stack_with_a_nan_member_is_refused_and_changes_nothing() -> None:
    model = _stack_model((4, 8))
    deltaw.merge(model, "s0")
    installed = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        deltaw.adapter_parameters(model, "s1")[0][3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="s1"):
        deltaw.merge(model, "s1")  # the in-place re-merge of {s0, s1} is refused and rolled back
    nan_factors = {id(p) for p in deltaw.adapter_parameters(model, "s1")}
    assert all(torch.equal(installed[n], p) for n, p in model.named_parameters() if id(p) not in nan_factors)
    assert deltaw.merged(model) == (("s0", 1.0),)


def test_a_stack_over_the_kernel_rank_takes_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Single(nn.Linear(300, 300))
    for name, r in (("big", 200), ("more", 60)):  # Σr = 260 > native.MAX_RANK
        deltaw.attach(model, deltaw.LoraConfig(r=r, alpha=r, target_modules=["layer"]), name)
        with torch.no_grad():
            for p in deltaw.adapter_parameters(model, name):
                p.normal_(0, 0.05)
    w0 = model.layer.base_layer.weight.detach().clone()
    expected = w0 + sum(w * (b @ a) for w, (a, b) in ((0.5, deltaw.adapter_parameters(model, "big")),
                                                      (2.0, deltaw.adapter_parameters(model, "more"))))
    calls = []
    monkeypatch.setattr(native, "merge_terms_into", lambda *args: calls.append(args) or None)
    deltaw.merge(model, {"big": 0.5, "more": 2.0})
    assert calls == []  # declined before the kernel
    torch.testing.assert_close(model.layer.base_layer.weight.detach(), expected.detach(), rtol=1e-5, atol=1e-5)



@needs_kernel
@pytest.mark.parametrize("nan_in", [None, "s0", "s2"])
def test_a_stack_past_the_fused_rank_takes_the_torch_path_whole(nan_in: str | None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model = _stack_model((32, 24, 16))  # Σr = 72 > FUSED_MAX_RANK
    stack = {"s0": 1.0, "s1": 0.5, "s2": -2.0}
    if nan_in is not None:
        with torch.no_grad():
            deltaw.adapter_parameters(model, nan_in)[1][0, 0] = float("nan")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(3, 48)
    deltaw.activate(model, stack)
    live = model(x).detach()
    deltaw.deactivate(model)
    calls = []
    monkeypatch.setattr(native, "merge_terms_into", lambda *args: calls.append(args) or None)
    if nan_in is not None:
        with pytest.raises(NonFiniteError, match=nan_in):
            deltaw.merge(model, stack)
        assert deltaw.merged(model) == ()
        nan_factors = {id(p) for p in deltaw.adapter_parameters(model, nan_in)}
        assert all(torch.equal(w0[n], p) for n, p in model.named_parameters() if id(p) not in nan_factors)
    else:
        deltaw.merge(model, stack)
        torch.testing.assert_close(model(x).detach(), live, rtol=1e-5, atol=1e-5)
    assert calls == []


@pytest.mark.parametrize("shared", ["folder", "file"])
def test_a_kernel_others_can_write_is_never_loaded(shared: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache folder or cached library writable by other users could hand us their code: the kernel is then
    built into a private temporary folder (folder case) or rebuilt in place (file case), never loaded as found."""
    if native.kernel() is None:
        pytest.skip("no C compiler / AVX2+FMA here")
    monkeypatch.setenv("DELTAW_CACHE", str(tmp_path))
    folder = tmp_path / "native"
    folder.mkdir()
    if shared == "folder":
        folder.chmod(0o777)
    assert native._compile() is not None
    if shared == "folder":
        assert not list(folder.iterdir())  # nothing written where others can write
        return
    (built,) = folder.glob("merge_kernel-*.so")
    built.unlink()
    built.write_bytes(b"planted")  # a fresh inode: what a stranger could leave there
    built.chmod(0o666)
    assert native._compile() is not None
    assert built.stat().st_mode & 0o022 == 0 and built.read_bytes() != b"planted"


# ---- a few tokens' LoRA update (decode) -----------------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("n", [1, 3, 16])
@pytest.mark.parametrize("r, n_in, n_out", [(16, 576, 576), (16, 576, 192), (1, 3, 5), (7, 33, 17), (64, 100, 1),
                                            (256, 16, 9), (12, 40, 23)])
def test_gemv_equals_torch_matmuls(n: int, r: int, n_in: int, n_out: int) -> None:
    """Vector bodies and scalar tails (in % 16, r % 8, out % 8) against torch's two matmuls, up to rounding."""
    g = torch.Generator().manual_seed(r * 1000 + n_in + n)
    a, b = torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)
    x, y = torch.randn(n, 1, n_in, generator=g), torch.randn(n, 1, n_out, generator=g)
    expected = y + 0.7 * (x @ a.T) @ b.T
    assert native.lora_gemv_(y, x, a, b, 0.7)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_gemv_row_results_do_not_depend_on_batch_or_position() -> None:
    """A token's output is bit-identical alone or among 16, and an output feature's value does not depend on where
    it sits among the 8-wide blocks (the tail block is zero-padded, not summed another way): a row of a batch
    gets exactly what it gets alone."""
    g = torch.Generator().manual_seed(7)
    r, n_in, n_out = 12, 50, 21
    a, b = torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)
    x = torch.randn(16, n_in, generator=g)
    together = torch.zeros(16, n_out)
    assert native.lora_gemv_(together, x, a, b, 0.3)
    for t in (0, 5, 15):
        alone = torch.zeros(1, n_out)
        assert native.lora_gemv_(alone, x[t:t + 1].clone(), a, b, 0.3)
        assert torch.equal(alone[0], together[t])
    shifted = torch.zeros(16, n_out - 3)  # rows 3.. of B: every output feature moves to another block position
    assert native.lora_gemv_(shifted, x, a, b[3:].clone(), 0.3)
    assert torch.equal(shifted, together[:, 3:])


@needs_kernel
@pytest.mark.parametrize("n, r, n_in, n_out", [(16, 16, 576, 1536), (8, 12, 577, 1541), (16, 5, 300, 1003),
                                               (9, 64, 100, 70)])
def test_gemv_bits_do_not_depend_on_the_thread_count(n: int, r: int, n_in: int, n_out: int) -> None:
    """From 8 tokens the OpenMP build splits the update over torch's threads (h's rows, then the outputs): every
    value must still be the one-thread bits, tails (r % 4, out % 8) and flush-to-zero included, and torch's
    threads keep their own flush setting afterwards."""
    g = torch.Generator().manual_seed(n * r + n_out)
    a, b = torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)
    x, y0 = torch.randn(n, n_in, generator=g), torch.randn(n, n_out, generator=g)
    assert_same_bits_for_any_thread_count(lambda y, xx, factor: native.lora_gemv_(y, xx, a, b, 0.37 * factor),
                                          x, y0)


def test_gemv_declines_what_it_cannot_do() -> None:
    a, b, x = torch.randn(4, 8), torch.randn(6, 4), torch.randn(8)
    n = native.MAX_TOKENS + 1
    cases = [
        (torch.zeros(6, dtype=torch.float64), x.double(), a.double(), b.double()),  # not fp32
        (torch.zeros(6), x, torch.randn(8, 4).t(), b),  # A not contiguous
        (torch.zeros(6), x, a, torch.randn(4, 6).t()),  # B not contiguous
        (torch.zeros(6), x, torch.randn(native.MAX_RANK + 1, 8), torch.randn(6, native.MAX_RANK + 1)),  # rank
        (torch.zeros(n, 6), torch.randn(n, 8), a, b),  # more tokens than the kernel takes
    ]
    for y, xx, aa, bb in cases:
        before = y.clone()
        assert not native.lora_gemv_(y, xx, aa, bb, 1.0)
        assert torch.equal(y, before)


def _declined(*args) -> bool:
    return False


@needs_kernel
@pytest.mark.parametrize("batch", [1, 4, native.MAX_TOKENS])
def test_decode_through_the_kernel_equals_the_torch_path(monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """A decode-step forward (a few tokens) of an adapted Linear layer takes the kernel and gives the torch
    path's output."""
    torch.manual_seed(0)
    model = Single(nn.Linear(40, 24))
    deltaw.attach(model, deltaw.LoraConfig(r=8, alpha=16, target_modules=["layer"]), "a")
    with torch.no_grad():
        for p in deltaw.adapter_parameters(model, "a"):
            p.normal_()
    x = torch.randn(batch, 1, 40)
    calls = []
    real = native.gemv_function()

    def counting(*args) -> int:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(native, "gemv_function", lambda: counting)  # (the decode plan's kernel)
    with torch.no_grad():
        got = model(x)
    assert calls, "the one-token path did not reach the kernel"
    monkeypatch.setattr(native, "gemv_function", lambda: None)
    monkeypatch.setattr(native, "lora_gemv_", _declined)
    object.__setattr__(model.layer, "_decode", None)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gemv_declines_mismatched_sizes_and_dtypes() -> None:
    """Sizes that do not add up or a factor of another dtype would be misread by the kernel: declined."""
    a, b = torch.randn(4, 8), torch.randn(6, 4)
    cases = [
        (torch.zeros(2, 6), torch.randn(3, 8), a, b),  # x has more tokens than y
        (torch.zeros(2, 6), torch.randn(2, 7), a, b),  # x's width is not A's
        (torch.zeros(2, 6), torch.randn(2, 8), a, torch.randn(6, 5)),  # B's rank is not A's
        (torch.zeros(2, 6), torch.randn(2, 8), a.double(), b),  # A fp64, y fp32
        (torch.zeros(2, 6), torch.randn(2, 8).double(), a, b),  # x fp64
        (torch.zeros(2, 6), torch.randn(8, 2).t(), a, b),  # x strided
    ]
    for y, xx, aa, bb in cases:
        before = y.clone()
        assert not native.lora_gemv_(y, xx, aa, bb, 1.0)
        assert torch.equal(y, before)


def _single_with_adapter() -> nn.Module:
    torch.manual_seed(0)
    model = Single(nn.Linear(40, 24)).eval()
    deltaw.attach(model, deltaw.LoraConfig(r=8, alpha=16, target_modules=["layer"]), "a")
    with torch.no_grad():
        for p in deltaw.adapter_parameters(model, "a"):
            p.normal_()
    return model


@needs_kernel
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:DeprecationWarning",
                            "ignore:There is a performance drop:UserWarning")  # (expected: trace and vmap fallbacks)
def test_traced_exported_and_vmapped_models_keep_the_lora_update() -> None:
    """A write through a raw pointer is invisible to torch.jit.trace (the traced module silently lost the LoRA
    update), and export's fake tensors / vmap's wrappers have no memory (both raised): the kernel declines them
    and the torch path runs."""
    model = _single_with_adapter()
    x = torch.randn(1, 1, 40)
    with torch.no_grad():
        eager = model(x)
        with deltaw.disabled(model):
            assert not torch.allclose(model(x), eager)
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), eager, rtol=1e-5, atol=1e-5)
        batched = torch.func.vmap(model)(torch.randn(3, 1, 1, 40).copy_(x.expand(3, 1, 1, 40)))
        torch.testing.assert_close(batched, eager.expand(3, 1, 1, 24), rtol=1e-5, atol=1e-5)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), eager, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and eager use afterwards is unaffected
        torch.testing.assert_close(model(x), eager, rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [1, 16, 17])
def test_a_weight_zero_adapter_adds_nothing_even_with_nan_factors(tokens: int) -> None:
    """Weight 0 means no term, as torch's addmm_ with alpha=0 (the path above 16 tokens): the kernel computed
    0·NaN = NaN for up to 16 tokens."""
    model = _single_with_adapter()
    with torch.no_grad():
        deltaw.adapter_parameters(model, "a")[1][0, 0] = float("nan")
        x = torch.randn(tokens, 1, 40)
        with deltaw.disabled(model):
            base = model(x)
        with deltaw.using(model, {"a": 0.0}):
            torch.testing.assert_close(model(x), base, rtol=0, atol=0)


@needs_kernel
def test_row_kernel_declines_overlapping_input_and_output_and_gemv_an_empty_b() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    terms = native.row_terms([(a, b, 1.0, [0]), (a, b, 1.0, [0, 1])], entries=2)
    y = torch.randn(2, 8)
    before = y.clone()
    assert not native.lora_rows_(y, y, terms)  # a later term would read rows an earlier one wrote
    assert torch.equal(y, before)
    assert not native.lora_gemv_(torch.zeros(1, 0), torch.randn(1, 8), a, torch.randn(0, 4), 1.0)


def test_a_model_on_another_device_never_builds_the_cpu_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode path asked for the library before checking the tensors' device: the first no-grad forward of
    a CUDA model ran the C compiler (~1.5 s) and cached a kernel it could never use. A meta-device model takes
    the same path on a CPU-only machine."""
    calls = []
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "kernel", lambda: calls.append(1))
    model = Single(nn.Linear(8, 8)).to("meta").eval()
    deltaw.attach(model, deltaw.LoraConfig(r=2, target_modules=["layer"]), "a")
    with torch.no_grad():
        for tokens in (1, 3):
            assert model(torch.empty(tokens, 8, device="meta")).shape == (tokens, 8)
    assert calls == []


@pytest.mark.parametrize("plan", [True, False], ids=["decode plan", "general path"])
def test_forward_ad_under_no_grad_keeps_the_lora_tangent(monkeypatch: pytest.MonkeyPatch, plan: bool) -> None:
    """Forward-mode AD runs with grad mode off: the kernel's raw write added the update to the output but not to
    its tangent (the tangent was the base layer's alone). Inside a dual level the torch path runs."""
    import torch.autograd.forward_ad as fwAD
    model = _single_with_adapter()
    if not plan:
        monkeypatch.setattr(native, "gemv_function", lambda: None)
    layer = model.layer
    a, b = deltaw.adapter_parameters(model, "a")
    x, t = torch.randn(1, 40), torch.randn(1, 40)
    with torch.no_grad(), fwAD.dual_level():
        out = fwAD.unpack_dual(model(fwAD.make_dual(x, t)))
        expected = t @ layer.base_layer.weight.T + layer.scaling["a"] * (t @ a.T) @ b.T
    torch.testing.assert_close(out.tangent, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(out.primal, model(x), rtol=1e-5, atol=1e-5)


class _Same(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w


def test_a_parametrized_base_weight_runs_through_the_base_layer() -> None:
    """Parametrizing the base's weight swaps its class and takes the weight out of ``_parameters``: the layer
    still took the base as plain (a flag fixed when wrapped) and every forward raised KeyError: 'weight'."""
    from torch.nn.utils import parametrize
    model = _single_with_adapter()
    x = torch.randn(2, 1, 40)
    with torch.no_grad():
        expected = model(x)
    parametrize.register_parametrization(model.layer.base_layer, "weight", _Same())
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_a_parametrized_factor_is_refused_not_dropped() -> None:
    """A factor under torch.nn.utils.parametrize leaves ``_parameters``: forward skipped the adapter (the output
    was the base layer's), a merge and a per_row batch left it out. All now say why."""
    from torch.nn.utils import parametrize
    model = _single_with_adapter()
    parametrize.register_parametrization(model.layer.lora_A, "a", _Same())
    x = torch.randn(1, 1, 40)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(deltaw.errors.TargetError, match="parametrized"):
            model(x)
    with pytest.raises(deltaw.errors.TargetError, match="parametrized"):
        deltaw.merge(model, "a")
    assert deltaw.merged(model) == ()
    with torch.no_grad(), pytest.raises(deltaw.errors.TargetError, match="parametrized"):
        with per_row(model, ["a", None]):
            model(torch.randn(2, 1, 40))


def test_a_torch_without_the_dual_level_global_keeps_to_the_torch_paths() -> None:
    """The raw-pointer paths step aside inside a forward-AD dual level, read from a private torch global: a torch
    without it must neither break deltaw nor let those paths run blind."""
    code = (
        "import logging, torch, torch.autograd.forward_ad as f; del f._current_level\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from torch import nn; import deltaw; from deltaw.layers import native\n"
        "m = nn.Sequential(nn.Linear(8, 8)); deltaw.attach(m, deltaw.LoraConfig(r=2, target_modules=['0']), 'a')\n"
        "x = torch.randn(1, 8); y = torch.zeros(1, 8)\n"
        "assert not native.lora_gemv_(y, x, torch.randn(2, 8), torch.randn(8, 2), 1.0)\n"
        "with torch.no_grad(): m(x)\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert "forward_ad._current_level is missing" in done.stderr
