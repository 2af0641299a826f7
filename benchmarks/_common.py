"""Shared pieces of the performance suite: the random-init models, identical adapters for deltaw and PEFT, and
an interleaved timer.

Why interleaved: the benchmark machines are shared and noisy (other jobs come and go), so each repeat times
base, deltaw and PEFT back to back and the medians are taken per contender; a noise burst then hits all three
instead of biasing one. Models are random-init with real shapes (SmolLM2-135M, BERT-base): decode speed
depends on shapes and bytes, not on trained values.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import deltaw

log = logging.getLogger("benchmarks")

THREADS = 2
DEVICE = torch.device("cpu")  # --device: the targets are for the 2-core CPU; on CUDA the suite times with syncs
STAT = "median"  # or "min": on a shared machine the fastest repeat is the least disturbed one
RANK = 16
SMOL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
CONTEXT = 64  # tokens in the KV cache while decoding


def setup() -> None:
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {DEVICE}: CUDA is not available on this machine")
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def use_device(name: str) -> None:
    """Set the device every model, input and timer of this run uses (``--device cpu|cuda|cuda:N``)."""
    global DEVICE
    DEVICE = torch.device(name)


def sync() -> None:
    """Wait for queued device work, so a wall-clock reading covers it (CUDA runs asynchronously)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed_ms(fn: Callable[[], object]) -> float:
    """Wall time of ``fn()`` in ms, device work included."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


# ---- models ------------------------------------------------------------------------------------------------
def smollm2_shape(seed: int = 0) -> nn.Module:
    """A random-init Llama with SmolLM2-135M's shape (30 layers, hidden 576, 9/3 heads, tied 49152 vocab)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval().to(DEVICE)


def bert_base_shape(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel
    cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     vocab_size=30522, max_position_embeddings=512)
    torch.manual_seed(seed)
    return BertModel(cfg, add_pooling_layer=False).eval().to(DEVICE)


def sharing_copy(model: nn.Module) -> nn.Module:
    """A structural copy that shares every parameter tensor with ``model`` (buffers are copied)."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def cloned_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# ---- adapters ----------------------------------------------------------------------------------------------
def randomize_adapter(model: nn.Module, name: str, seed: int, std: float = 0.02) -> None:
    """Non-zero factors for both A and B so every delta is real work (fresh B = 0 would still cost the same)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in deltaw.adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


@dataclass
class Contenders:
    """base: the plain model; dw: deltaw on a model sharing base's weights; peft: PEFT on its own weight copy."""

    base: nn.Module
    dw: nn.Module
    peft: nn.Module | None
    names: list[str]
    dirs: dict[str, Path] = field(default_factory=dict)
    tmp: tempfile.TemporaryDirectory | None = None

    def close(self) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
        self.base = self.dw = self.peft = None  # type: ignore[assignment]
        gc.collect()


def build_contenders(builder: Callable[[], nn.Module], n_adapters: int, targets: list[str], *,
                     with_peft: bool = True, ranks: list[int] | None = None) -> Contenders:
    """n identical r=16 adapters on deltaw and PEFT (PEFT loads deltaw's saved PEFT-format files)."""
    base = builder()
    dw = sharing_copy(base)
    names = [f"ad{i}" for i in range(n_adapters)]
    tmp = tempfile.TemporaryDirectory(prefix="deltaw-bench-")
    dirs: dict[str, Path] = {}
    for i, name in enumerate(names):
        r = ranks[i] if ranks else RANK
        deltaw.attach(dw, deltaw.LoraConfig(r=r, alpha=2 * r, target_modules=targets), name, trainable=False)
        randomize_adapter(dw, name, seed=100 + i)
        dirs[name] = deltaw.save(dw, Path(tmp.name) / name, name)
    peft_model = None
    if with_peft:
        from peft import PeftModel
        peft_base = cloned_copy(base)
        peft_model = PeftModel.from_pretrained(peft_base, str(dirs[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(dirs[name]), adapter_name=name)
        peft_model.eval()
    deltaw.activate(dw, names[0])
    return Contenders(base, dw, peft_model, names, dirs, tmp)


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without adapter tensors (deltaw's and PEFT's both carry "lora" in their key names)."""
    return {k: v for k, v in model.state_dict().items() if "lora" not in k}


def adapter_bytes_deltaw(model: nn.Module, name: str) -> int:
    return sum(p.numel() * p.element_size() for p in deltaw.adapter_parameters(model, name))


def adapter_bytes_peft(model: nn.Module, name: str) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n)


# ---- decode ------------------------------------------------------------------------------------------------
class DecodeStep:
    """One decode step: (B, 1) new tokens against a CONTEXT-token KV cache, cropped back after each step so the
    cache length (and so the attention cost) is the same for every repeat. ``kwargs`` go to every forward."""

    def __init__(self, model: nn.Module, batch: int, seed: int = 0, **kwargs) -> None:
        import inspect
        g = torch.Generator().manual_seed(seed)
        self.model, self.kwargs = model, kwargs
        prompt = torch.randint(0, 49152, (batch, CONTEXT), generator=g).to(DEVICE)
        self.token = torch.randint(0, 49152, (batch, 1), generator=g).to(DEVICE)
        # transformers renamed past_key_values to cache (the GPU image may hold a version from either side)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: forward(*a, **kw)
        params = inspect.signature(inner.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        with torch.inference_mode():
            self.cache = getattr(model(input_ids=prompt, use_cache=True, **kwargs), self.cache_kw)

    def __call__(self) -> torch.Tensor:
        out = self.model(input_ids=self.token, **{self.cache_kw: self.cache}, use_cache=True, **self.kwargs)
        self.cache.crop(-1)
        return out.logits


# ---- timing ------------------------------------------------------------------------------------------------
def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                     inference: bool = True) -> dict[str, float]:
    """Median wall time in ms per contender, timing the contenders round-robin within each repeat."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    ctx = torch.inference_mode if inference else torch.no_grad
    with ctx():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for key, fn in fns.items():
                times[key].append(timed_ms(fn))
    return {k: summarize(v) for k, v in times.items()}


def summarize(values: list[float]) -> float:
    return min(values) if STAT == "min" else statistics.median(values)


@dataclass
class Result:
    """One row of the table. ``targets``: (name, ratio key, bound) checked by run_all."""

    measure: str
    deltaw_ms: float
    peft_ms: float | None
    base_ms: float | None
    mem_mb: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def ratio(self) -> float | None:
        return self.deltaw_ms / self.base_ms if self.base_ms else None

    def peft_ratio(self) -> float | None:
        return self.peft_ms / self.base_ms if (self.base_ms and self.peft_ms) else None

    def vs_peft(self) -> float | None:
        return self.deltaw_ms / self.peft_ms if self.peft_ms else None


def repeats(quick: bool, full: int, fast: int) -> int:
    return fast if quick else full


@dataclass(frozen=True)
class Target:
    """A bound on deltaw's ratio to the base model (``ratio``) or on its absolute time (``ms``)."""

    bound: float
    kind: str = "ratio"  # "ratio" | "ms"
    label: str = ""

    def check(self, r: Result) -> bool:
        """The bound, and the result's own checks: ``exact`` (a merge restored W0 bit for bit) and ``agrees``
        (deltaw computed what PEFT did, and not what the base model does: a fast run of inactive adapters fails)."""
        value = r.ratio() if self.kind == "ratio" else r.deltaw_ms
        ok = value is not None and value <= self.bound
        return ok and r.extra.get("exact", True) and r.extra.get("agrees", True)

    def describe(self) -> str:
        return self.label or (f"≤ {self.bound:.2f}× base" if self.kind == "ratio" else f"≤ {self.bound:g} ms")


class Env:
    """Models shared by the measures of one run, built on first use (``run_all`` builds each once).

    smol: SmolLM2-135M shape, 16 resident r=16 adapters on all 7 projections (deltaw and PEFT, same factors).
    bert: BERT-base shape, 4 resident r=16 adapters on every encoder Linear."""

    def __init__(self, quick: bool, strategy: str = "auto") -> None:
        self.quick = quick
        self.strategy = strategy
        self._smol: Contenders | None = None
        self._bert: Contenders | None = None

    def smol(self) -> Contenders:
        if self._smol is None:
            t0 = time.perf_counter()
            self._smol = build_contenders(smollm2_shape, 16, SMOL_TARGETS)
            log.info("built SmolLM2-shape contenders in %.1f s", time.perf_counter() - t0)
        return self._smol

    def smol_resident(self, n: int) -> Contenders:
        """The SmolLM2 contenders with only the first ``n`` adapters left resident (measures that specify it)."""
        c = self.smol()
        for name in c.names[n:]:
            deltaw.delete(c.dw, name)
            c.peft.delete_adapter(name)
        del c.names[n:]
        deltaw.activate(c.dw, c.names[0])
        c.peft.set_adapter(c.names[0])
        return c

    def bert(self) -> Contenders:
        if self._bert is None:
            t0 = time.perf_counter()
            self._bert = build_contenders(bert_base_shape, 4, BERT_TARGETS)
            log.info("built BERT-base-shape contenders in %.1f s", time.perf_counter() - t0)
        return self._bert

    def close(self) -> None:
        for c in (self._smol, self._bert):
            if c is not None:
                c.close()
        self._smol = self._bert = None


def standalone(module) -> None:
    """``python benchmarks/<measure>.py [--quick] [--strategy S]``: run one measure and print its row."""
    import argparse
    parser = argparse.ArgumentParser(description=module.__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    global THREADS, STAT
    THREADS, STAT = args.threads, args.stat
    use_device(args.device)
    setup()
    env = Env(args.quick, args.strategy)
    try:
        result = module.run(env)
    finally:
        env.close()
    print(_run_all().render([(result, module.TARGET)]))


def _run_all():
    """The sibling ``run_all`` script as a module (it has no .py suffix, so ``import`` cannot find it)."""
    import importlib.machinery
    import importlib.util
    from pathlib import Path

    loader = importlib.machinery.SourceFileLoader("run_all", str(Path(__file__).with_name("run_all")))
    spec = importlib.util.spec_from_loader("run_all", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def agreement(dw_out: torch.Tensor, peft_out: torch.Tensor, base_out: torch.Tensor | None) -> tuple[bool, str]:
    """(ok, note): deltaw's output equals PEFT's (fp32 tolerance) and, where a base output is given, differs from
    it -- so a run whose adapters were silently inactive (as fast as the base) cannot pass."""
    diff = (dw_out.float() - peft_out.float()).abs().max().item()
    ok = diff <= 1e-4 * max(1.0, peft_out.float().abs().max().item())
    note = f"max |deltaw - PEFT| {diff:.1e}"
    if base_out is not None:
        moved = (dw_out.float() - base_out.float()).abs().max().item()
        ok = ok and moved > 1e-3
        note += f", vs base {moved:.2f}"
    return ok, note


def merged_as_expected(model: nn.Module, name: str, before: dict[str, torch.Tensor]) -> tuple[bool, str]:
    """(ok, note): every adapted weight of ``model`` (merged with ``name`` alone) equals W0 + scaling · ΔW from
    its own factors (fp32 tolerance) and differs from W0 -- a merge that did nothing would pass an exactness
    check of the unmerge alone."""
    worst, moved = 0.0, 0.0
    with torch.no_grad():
        for path, layer in deltaw.state(model).layers.items():
            w0 = before[f"{path}.base_layer.weight"]
            delta = layer.delta_weight(layer.lora_A[name], layer.lora_B[name]) * layer.scaling[name]
            w = layer.base_layer.weight
            worst = max(worst, (w - (w0 + delta)).abs().max().item())
            moved = max(moved, (w - w0).abs().max().item())
    return worst <= 1e-5 and moved > 0.0, f"merged W = W0 + s·ΔW within {worst:.1e} (max change {moved:.3f})"


def decode_result(env: Env, measure: str, batch: int, rows: list[str] | None, note: str = "") -> Result:
    """Time one decode step for base, deltaw and PEFT. ``rows``: per-row adapters (deltaw ``per_row``, PEFT
    ``adapter_names=``); None: the single active adapter ad0, unmerged, on every row. The outputs of one step
    are compared after the timing (``agreement``)."""
    from deltaw.batching import cache_nbytes, clear_cache, per_row
    c = env.smol()
    deltaw.activate(c.dw, c.names[0])
    c.peft.set_adapter(c.names[0])
    base = DecodeStep(c.base, batch)
    peft_kwargs = {"adapter_names": rows} if rows is not None else {}
    peft_step = DecodeStep(c.peft, batch, **peft_kwargs)
    clear_cache()
    prompt_ms = None
    if rows is None:
        dw_step = DecodeStep(c.dw, batch)
        fns = {"base": base, "deltaw": dw_step, "peft": peft_step}
        with torch.inference_mode():
            times = time_interleaved(fns, repeats(env.quick, 30, 6), warmup=2)
            agrees, check = agreement(dw_step(), peft_step(), base())
        packed = 0
    else:
        with per_row(c.dw, rows, strategy=env.strategy):
            # The prompt's forward (CONTEXT tokens per row) is the first in the context: it packs the factors
            # a strategy needs (once per generate); decode steps then reuse them.
            t0 = time.perf_counter()
            dw_step = DecodeStep(c.dw, batch)
            prompt_ms = (time.perf_counter() - t0) * 1e3
            fns = {"base": base, "deltaw": dw_step, "peft": peft_step}
            times = time_interleaved(fns, repeats(env.quick, 30, 6), warmup=2)
            with torch.inference_mode():
                agrees, check = agreement(dw_step(), peft_step(), base())
        packed = cache_nbytes()
        clear_cache()
    extra = {"prompt_ms": prompt_ms, "packed_mb": packed / 2**20, "agrees": agrees}
    mem = adapter_bytes_deltaw(c.dw, c.names[0]) / 2**20
    parts = [note] if note else []
    if prompt_ms is not None:
        parts.append(f"prompt forward ({CONTEXT} tokens per row, packing included) {prompt_ms:.0f} ms, packed "
                     f"{packed / 2**20:.0f} MB")
    parts.append(check)
    return Result(measure, times["deltaw"], times["peft"], times["base"], mem, "; ".join(parts), extra)
