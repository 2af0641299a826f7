"""Read and write adapters in PEFT's on-disk format, strictly.

    <dir>/adapter_config.json         peft_type "LORA", r, lora_alpha, target_modules, rank/alpha patterns, ...
    <dir>/adapter_model.safetensors   base_model.model.<path>.lora_A.weight (r, in) / .lora_B.weight (out, r)
                                      base_model.model.<path>.lora_embedding_A (r, num) / _B (dim, r)
                                      base_model.model.<path>.<param>  for modules_to_save (PEFT: every module
                                          whose path ends with a listed name), and unchanged base copies
                                          (save_embedding_layers): checked to equal the model's, never loaded

deltaw's own metadata (version, base fingerprint) rides in the safetensors header, which PEFT ignores.
Loading validates everything -- config, keys, shapes, ranks, finiteness, fingerprint -- before the model is
touched, so a failed load leaves it exactly as it was. Only safetensors is read: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import api
from ..config import ALL_LINEAR, LoraConfig
from ..errors import AdapterFormatError, AdapterNameError, BaseModelMismatchError, NonFiniteError, TargetError
from ..layers import LoraConv, LoraEmbedding, LoraLayer, ModulesToSave, layer_class_for
from ..layers.base import factor_dtype
from ..layers.linear import LoraConv1D, LoraLinear
from ..registry import AdapterInfo, check_name
from . import fingerprints as fp

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# What follows the last ".lora_" of a factor key: (which factor, layer kind).
_FACTOR_TAILS = {"A.weight": ("A", "dense"), "B.weight": ("B", "dense"),
                 "embedding_A": ("A", "embedding"), "embedding_B": ("B", "embedding")}
# PEFT options that change the adapter's maths (or the model's structure) in ways deltaw does not implement, with
# their defaults: any other value is refused, never silently ignored (the outputs would differ from PEFT's).
# Init-only options (eva/corda/lora_ga configs) and runtime ones need no refusal; init_lora_weights does only for
# the inits that rewrite the base (below).
UNSUPPORTED: dict[str, object] = {
    "use_dora": False,  # DoRA: a learned magnitude per output column
    "bias": "none", "lora_bias": False,  # trained biases on the base layer or on lora_B
    "use_qalora": False,  # QA-LoRA pools the input in groups before lora_A
    "layer_replication": None,  # stacks copies of base layers: the adapted model is deeper than the base
    "alora_invocation_tokens": None,  # aLoRA adds the update only after an invocation token
    "trainable_token_indices": None,  # trains single embedding rows: deltas deltaw does not hold
    "target_parameters": None,  # LoRA on bare nn.Parameters (MoE experts), not on modules
    "use_bdlora": None, "arrow_config": None, "velora_config": None,  # variants with their own forward
    "monteclora_config": None, "kasa_config": None,
}


# init_lora_weights values for which PEFT rewrites the base weights when it creates the adapter -- at training
# and again at every load (``LoraLayer.update_layer``: W <- W - s*B*A, or LoftQ's quantised residual) -- so the
# factors fit only that rewritten base, never the unchanged one deltaw loads them onto. PEFT matches "pissa" and
# "corda" as prefixes ("pissa_niter_<n>"), "olora" case-insensitively, the others exactly.
_BASE_REWRITING_PREFIXES = ("pissa", "corda")
_BASE_REWRITING_INITS = ("olora", "loftq", "lora_ga")


def _rewrites_base(init: object) -> bool:
    return isinstance(init, str) and (init.startswith(_BASE_REWRITING_PREFIXES) or init.lower() == "olora"
                                      or init in _BASE_REWRITING_INITS)


def _is_default(value: object, default: object) -> bool:
    """PEFT writes an unused option as its default, null, false or an empty list/object."""
    return value is None or value is False or value == default or (isinstance(value, (list, dict)) and not value)


def _version() -> str:
    from .. import __version__
    return __version__


# ---- save ----------------------------------------------------------------------------------------------
def _pristine_weight(layer) -> torch.Tensor:
    return layer._pristine if layer._pristine is not None else layer.base_weight()


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's key names."""
    st = api.state(model)
    info = st.require(name)
    out: dict[str, torch.Tensor] = {}
    for path in info.modules:
        layer = st.layers[path]
        a, b = layer.adapter_parameters(name)
        if isinstance(layer, LoraEmbedding):
            out[f"{PREFIX}{path}.lora_embedding_A"], out[f"{PREFIX}{path}.lora_embedding_B"] = a, b
        else:
            out[f"{PREFIX}{path}.lora_A.weight"], out[f"{PREFIX}{path}.lora_B.weight"] = a, b
    for path, wrapper in st.saved_modules.items():
        if name in wrapper.modules_to_save:
            for pname, t in wrapper.modules_to_save[name].state_dict().items():
                out[f"{PREFIX}{path}.{pname}"] = t
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def peft_config(model: nn.Module, info: AdapterInfo, base_model_name_or_path: str | None = None) -> dict:
    """A PEFT LoraConfig dict with every module listed explicitly, so any PEFT version resolves the same set.

    PEFT matches a listed name by dotted suffix too (and pattern keys as ``(.*\\.)?(key)$``), so a path that
    ends another module's path ("fc" and "sub.fc") would pull that module in: the list becomes an exact regex
    (``re.fullmatch``) when that happens on this model, and pattern keys are anchored with ``^``."""
    st = api.state(model)
    cfg = info.config
    paths = sorted(info.modules)
    listed = tuple(paths)
    exact = set(paths)
    if any(p not in exact for p, _ in api._walk(model) if p and api._matches(listed, p)):
        targets: list[str] | str = "(?:" + "|".join(re.escape(p) for p in paths) + ")"
    else:
        targets = paths
    rank_pattern = {"^" + re.escape(p): cfg.rank_for(p) for p in paths if cfg.rank_for(p) != cfg.r}
    alpha_pattern = {"^" + re.escape(p): cfg.alpha_for(p) for p in paths if cfg.alpha_for(p) != cfg.alpha}
    saved = [p for p, w in st.saved_modules.items() if info.name in w.modules_to_save]
    return {
        "peft_type": "LORA",
        "task_type": info.metadata.get("task_type"),
        "base_model_name_or_path": base_model_name_or_path or info.metadata.get("base_model_name_or_path"),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "target_modules": targets,
        "exclude_modules": None,
        "lora_dropout": cfg.dropout,
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "use_dora": False,
        "fan_in_fan_out": any(isinstance(st.layers[p], LoraConv1D) for p in info.modules),
        "modules_to_save": saved or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True if cfg.init == "kaiming" else "gaussian",
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def base_fingerprint(model: nn.Module, modules: tuple[str, ...]) -> dict:
    st = api.state(model)
    return fp.fingerprint({p: _pristine_weight(st.layers[p]) for p in modules})


def _peft_conv_differs(base: nn.Module) -> str | None:
    """The settings of a conv base layer that PEFT's LoRA ignores, or None: PEFT builds lora_A with the base's
    kernel, stride and padding only, so it pads with zeros and never dilates; deltaw's lora_A runs the base's
    own convolution (``LoraConv.project_in``)."""
    why = []
    padding = base.padding if isinstance(base.padding, tuple) else (base.padding,)
    if base.padding_mode != "zeros" and (padding == ("same",) or any(p != 0 for p in padding if isinstance(p, int))):
        why.append(f"padding_mode={base.padding_mode!r}")  # (without padding the mode never comes into play)
    if any(d != 1 and k != 1 for d, k in zip(base.dilation, base.kernel_size)):
        why.append(f"dilation={tuple(base.dilation)}")  # (a size-1 kernel dimension is never dilated)
    return ", ".join(why) or None


def _unadapted_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` as it was before deltaw wrapped anything in it, merged weights at their
    pre-merge values: what PEFT, which reads the plain model, holds for that module."""
    if isinstance(module, ModulesToSave):
        return _unadapted_state(module.original_module)
    if isinstance(module, LoraLayer):
        out = _unadapted_state(module._modules["base_layer"])
        if "weight" in out:
            out["weight"] = _pristine_weight(module)
        return out
    if not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in module.modules()):
        return module.state_dict()
    out = {k: v for k, v in module._parameters.items() if v is not None}
    skip = module._non_persistent_buffers_set
    out.update({k: v for k, v in module._buffers.items() if v is not None and k not in skip})
    for cname, child in module._modules.items():
        if child is not None:
            out.update({f"{cname}.{k}": v for k, v in _unadapted_state(child).items()})
    return out


def _peft_also_saved(model: nn.Module, name: str) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Modules PEFT's modules_to_save rule selects besides the ones this adapter saves, with their weights.

    PEFT saves every module whose path *ends with* a listed name as a plain string (``_set_trainable``:
    ``key.endswith(target_key)``), so the path "head" also selects "x_head", "classifier" DistilBERT's
    "pre_classifier"; on load it expects their weights in the file (KeyError otherwise). This adapter leaves
    them unchanged, so their current (unadapted) weights are what PEFT's copies must hold. Also returns the
    selected modules PEFT cannot wrap: LoRA targets of this adapter, or modules holding or inside one."""
    st = api.state(model)
    saved = tuple(p for p, w in st.saved_modules.items() if name in w.modules_to_save)
    if not saved:
        return {}, []
    targets = st.require(name).modules
    extra: dict[str, dict[str, torch.Tensor]] = {}
    clashes: list[str] = []
    for path, module in api._walk(model, plain=True):
        if not path or path in saved or not path.endswith(saved):
            continue
        if any(path.startswith(q + ".") for q in (*saved, *extra)):  # inside a copied module: its copy holds it
            continue
        if any(t == path or t.startswith(path + ".") or path.startswith(t + ".") for t in targets):
            clashes.append(path)
            continue
        extra[path] = _unadapted_state(module)
    return extra, clashes


def save(model: nn.Module, path: str | os.PathLike, name: str | None = None, *,
         base_model_name_or_path: str | None = None) -> Path:
    """Write one adapter (default: the only or first active one) as a PEFT directory. Files are replaced
    atomically: a crash mid-save never leaves a half-written adapter under the final names."""
    st = api.state(model)
    if name is None:
        name = st.active[0][0] if st.active else (next(iter(st.adapters)) if len(st.adapters) == 1 else None)
        if name is None:
            raise AdapterNameError(f"several adapters are resident ({', '.join(st.adapters)}): name the one to save")
    info = st.require(name)
    tensors = adapter_tensors(model, name)
    differs = [f"{p} ({why})" for p in info.modules if isinstance(st.layers[p], LoraConv)
               and (why := _peft_conv_differs(st.layers[p]._modules["base_layer"])) is not None]
    if differs:
        log.warning("adapter %r: PEFT computes LoRA on %s differently from deltaw (its lora_A convolution pads with "
                    "zeros and does not dilate): this file gives other outputs in PEFT", name, ", ".join(differs))
    extra, clashes = _peft_also_saved(model, name)
    if clashes:
        log.warning("adapter %r: PEFT cannot load this file: its modules_to_save rule (a module is saved when its path "
                    "ends with a listed name) also selects %s, which this adapter adapts with LoRA", name,
                    ", ".join(clashes))
    # Copies (not views) of the extra modules' weights: a tied weight would otherwise share memory with another
    # key, which safetensors refuses.
    tensors.update({f"{PREFIX}{p}.{k}": v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                    for p, sd in extra.items() for k, v in sd.items()})
    header = {"version": _version(), "adapter_name": name,
              "fingerprint": base_fingerprint(model, info.modules), "metadata": info.metadata}
    if extra:  # written for PEFT only: deltaw reads them back as unchanged copies, not as saved modules
        header["peft_copies"] = sorted(extra)
    meta = {"format": "pt", "deltaw": json.dumps(header)}
    config_text = json.dumps(peft_config(model, info, base_model_name_or_path), indent=2) + "\n"
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # Both files are written under temporary names before either final name is replaced: anything that can
    # fail (serialising, a full disk) fails while the previous pair is intact, never between the two files.
    temps: dict[str, str] = {}
    try:
        for fname, writer in ((WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata=meta)),
                              (CONFIG_NAME, lambda f: Path(f).write_text(config_text))):
            fd, temps[fname] = tempfile.mkstemp(dir=out, prefix=f".{fname}.")
            os.close(fd)
            writer(temps[fname])
        for fname, tmp in temps.items():
            os.replace(tmp, out / fname)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


# ---- read ----------------------------------------------------------------------------------------------
_ST_DTYPES = {"F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
              "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
              "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1)}


def _read_safetensors_fast(path: Path) -> tuple[dict, dict[str, torch.Tensor], list[torch.Tensor]] | None:
    """The whole file in one read into one private buffer, tensors as views of it (no per-tensor copy: a 20 MB
    adapter loads in a few ms). Returns None on anything unusual -- the strict ``safe_open`` path then reads
    the file and reports what is wrong. Layout: u64 header size, JSON {name: {dtype, shape, data_offsets}}.

    Also returns the blocks every tensor is a part of (the buffer seen as each dtype it holds, plus copied
    misaligned tensors), so finiteness can be checked in one pass per dtype."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) != 8:
                return None
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                return None
            header = json.loads(f.read(n))
            buf = torch.empty(size - 8 - n, dtype=torch.uint8)  # (bytes,)
            if f.readinto(memoryview(buf.numpy())) != buf.numel():
                return None
    except (OSError, ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return None
    if not isinstance(header, dict):
        return None
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return None
    tensors: dict[str, torch.Tensor] = {}
    views: dict[torch.dtype, torch.Tensor] = {}
    copies: list[torch.Tensor] = []
    layouts: dict[tuple, tuple[int, list[int]] | None] = {}  # shape -> (numel, strides); ~7 shapes per adapter
    spans: list[tuple[int, int]] = []
    total = buf.numel()
    for key, info in header.items():
        try:
            dtype, item = _ST_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            layout = layouts.get(shape, False)  # TypeError for an unhashable (nested) shape
        except (KeyError, TypeError, ValueError):
            return None
        if layout is False:
            layout = layouts[shape] = _layout(shape)
        if layout is None:
            return None
        numel, strides = layout
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end <= total \
                or end - begin != numel * item:
            return None
        spans.append((begin, end))
        if begin % item:  # misaligned for a view: copy this one
            tensors[key] = buf[begin:end].clone().view(dtype).view(shape)
            copies.append(tensors[key])
            continue
        typed = views.get(dtype)
        if typed is None:
            typed = views[dtype] = buf[:total - total % item].view(dtype)  # the whole buffer as this dtype
        tensors[key] = typed.as_strided(shape, strides, begin // item)  # one op per tensor
    # The tensors must tile the data exactly, as safetensors requires: overlapping ranges would make two
    # parameters share memory (editing one changes the other), and gaps hide bytes no check looks at.
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            return None
        pos = end
    if pos != total:
        return None
    return meta, tensors, [*views.values(), *copies]


def _layout(shape: tuple) -> tuple[int, list[int]] | None:
    """(element count, row-major strides) of a header shape; None unless every dimension is an int ≥ 0."""
    numel = 1
    for d in shape:
        if type(d) is not int or d < 0:
            return None
        numel *= d
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return numel, strides


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One sum per tensor and one check for all: a sum is finite only if every entry is (or it overflowed, in
    which case the caller's exact per-tensor check decides)."""
    floats = [t for t in tensors if t.is_floating_point()]
    if not floats:
        return True
    # Summed in fp32: an fp16 block of ordinary values would overflow its own dtype's range.
    return bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in floats])).all())

@dataclass
class AdapterFile:
    """A parsed, validated-as-far-as-possible-without-a-model adapter directory."""

    directory: Path
    peft: dict
    config: LoraConfig
    factors: dict[str, dict[str, torch.Tensor]]  # module path -> {"A": ..., "B": ..., "kind": "embedding"|"dense"}
    saved: dict[str, dict[str, torch.Tensor]]  # modules_to_save path -> its state dict
    deltaw_meta: dict
    # targeted module path -> {param: tensor}: base-layer copies PEFT writes next to a targeted embedding
    # (save_embedding_layers); never loaded, only checked to equal the model's own weights.
    base_weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # untargeted module path -> {param: tensor}: plain copies of a module's weights -- the embeddings PEFT's
    # save_embedding_layers=True writes, or (files deltaw wrote, listed in its metadata) modules PEFT's
    # modules_to_save rule selects besides the saved ones. Never loaded: checked to equal the model's weights.
    copies: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        tensors = [t for f in self.factors.values() for t in (f["A"], f["B"])]
        tensors += [t for s in self.saved.values() for t in s.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def _resolve_dir(path: Path, name: str | None) -> Path:
    """The folder holding the adapter: ``path`` itself, or ``path/name`` where PEFT writes a non-default adapter
    (its save_pretrained puts "default" at the root and every other adapter in <dir>/<name>/). When both hold
    one, the root wins, as in PEFT's own ``load_adapter(path, adapter_name=name)``, with a warning naming the
    other (pass ``path/name`` for that one)."""
    root = (path / CONFIG_NAME).is_file()
    sub = bool(name) and (path / name / CONFIG_NAME).is_file()
    if root and sub:
        log.warning("%s holds an adapter and so does its subfolder %r: loading the one at the root (as PEFT does); "
                    "pass %s to load the subfolder's", path, name, path / name)
    if root:
        return path
    if sub:
        return path / name
    if not path.exists():
        raise AdapterFormatError(f"adapter directory {str(path)!r} does not exist")
    raise AdapterFormatError(f"{str(path)!r} holds no {CONFIG_NAME}: not a PEFT adapter directory")


def _read_config(directory: Path) -> dict:
    try:
        cfg = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{directory / CONFIG_NAME}: unreadable or invalid JSON ({exc})") from None
    except RecursionError:
        raise AdapterFormatError(f"{directory / CONFIG_NAME}: invalid JSON (nested too deeply)") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{directory / CONFIG_NAME}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{directory}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, default in UNSUPPORTED.items():
        if key == "bias" and cfg.get(key) == "all":
            continue  # trains every bias of the model: refused in read_adapter only if the file holds one
        if not _is_default(cfg.get(key), default):
            raise AdapterFormatError(f"{directory}: {key}={cfg[key]!r} changes the adapter's maths in a way deltaw "
                                     f"does not implement; only {default!r} is supported")
    if _rewrites_base(cfg.get("init_lora_weights")):
        raise AdapterFormatError(
            f"{directory}: init_lora_weights={cfg['init_lora_weights']!r} makes PEFT rewrite the base weights when it "
            "creates the adapter (and again when it loads it), so these factors fit only that rewritten base, not "
            "the unchanged model deltaw loads them onto. Convert the adapter to a plain LoRA first: in PEFT, save it "
            "with save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter as initialised, before "
            "training>)")
    _check_layer_selection(cfg, directory / CONFIG_NAME)
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise AdapterFormatError(f"{directory / CONFIG_NAME}: missing required key {key!r}")
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        _check_names(cfg, key, directory / CONFIG_NAME, regex_ok=key != "modules_to_save")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise AdapterFormatError(f"{directory / CONFIG_NAME}: {key} must be an object mapping module names "
                                     f"to values, got {cfg[key]!r:.80}")
    return cfg


def _check_layer_selection(cfg: dict, where: Path) -> None:
    """layers_to_transform is null, an int or a list of ints; layers_pattern null, a regex or a list of them
    (PEFT puts it unescaped into a regex): anything else would fail deep inside target matching."""
    layers = cfg.get("layers_to_transform")
    is_int = isinstance(layers, int) and not isinstance(layers, bool)
    if not (layers is None or is_int or isinstance(layers, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        raise AdapterFormatError(f"{where}: layers_to_transform must be a layer index or a list of them, got "
                                 f"{layers!r:.80}")
    pattern = cfg.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not (patterns is None or isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
        raise AdapterFormatError(f"{where}: layers_pattern must be a name or a list of names, got {pattern!r:.80}")
    for p in patterns or ():
        try:
            re.compile(p)
        except (re.error, RecursionError, OverflowError) as exc:
            raise AdapterFormatError(f"{where}: layers_pattern {p!r:.80} is not a valid regex ({exc})") from None


def _check_names(cfg: dict, key: str, where: Path, regex_ok: bool) -> None:
    """``key`` is null, a list of module names, or (where PEFT allows one) a regex string: anything else would
    fail later as a TypeError or re.error deep inside target matching."""
    value = cfg.get(key)
    if value is None or isinstance(value, list) and all(isinstance(v, str) for v in value):
        return
    if isinstance(value, str) and regex_ok:
        try:
            re.compile(value)
        except (re.error, RecursionError, OverflowError) as exc:
            raise AdapterFormatError(f"{where}: {key} {value!r:.80} is not a valid regex ({exc})") from None
        return
    what = "a list of module names or a regex string" if regex_ok else "a list of module names"
    raise AdapterFormatError(f"{where}: {key} must be {what}, got {value!r:.80}")


def _to_lora_config(cfg: dict, modules: list[str], directory: Path) -> LoraConfig:
    try:
        return LoraConfig(
            r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), target_modules=tuple(modules),
            dropout=float(cfg.get("lora_dropout") or 0.0),
            rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {},
            use_rslora=bool(cfg.get("use_rslora", False)),
            init="gaussian" if cfg.get("init_lora_weights") == "gaussian" else "kaiming",
            modules_to_save=tuple(cfg.get("modules_to_save") or ()),
        )
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(inf) for "r": Infinity
        raise AdapterFormatError(f"{directory / CONFIG_NAME}: invalid LoRA settings ({exc})") from None


def read_adapter(path: str | os.PathLike, name: str | None = None) -> AdapterFile:
    """Parse a PEFT adapter directory into CPU tensors, checking everything that needs no model."""
    directory = _resolve_dir(Path(path), name)
    cfg = _read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        hint = " (a pickled adapter_model.bin is never loaded: convert it to safetensors)" if (
            directory / "adapter_model.bin").exists() else ""
        raise AdapterFormatError(f"{directory}: no {WEIGHTS_NAME}{hint}")
    fast = _read_safetensors_fast(weights)
    if fast is not None:
        header, tensors, blocks = fast
    else:
        try:
            with safe_open(str(weights), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            blocks = list(tensors.values())
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers and data
            raise AdapterFormatError(f"{weights}: corrupt or truncated safetensors file ({exc})") from None
    deltaw_meta = _read_deltaw_meta(header, weights)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    others: list[tuple[str, torch.Tensor]] = []
    for key, tensor in tensors.items():
        head, sep, tail = key.rpartition(".lora_")  # one split per key: 420 keys per 135M-model adapter
        factor = _FACTOR_TAILS.get(tail) if sep else None
        if factor is not None and head.startswith(PREFIX):
            entry = factors.setdefault(head[len(PREFIX):], {})
            entry[factor[0]] = tensor
            entry["kind"] = factor[1]
            continue
        others.append((key, tensor))
    saved: dict[str, dict[str, torch.Tensor]] = {}
    base_weights: dict[str, dict[str, torch.Tensor]] = {}
    copies: dict[str, dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    biases: list[str] = []  # keys of bias tensors that are not part of a saved module
    keep = tuple(n for n in cfg.get("modules_to_save") or () if n)
    written = frozenset(deltaw_meta.get("peft_copies") or ())
    for key, tensor in others:
        sub = key[len(PREFIX):] if key.startswith(PREFIX) else None
        module, sep, pname = sub.rpartition(".base_layer.") if sub is not None else ("", "", "")
        if sep and module in factors and "." not in pname:
            base_weights.setdefault(module, {})[pname] = tensor
        elif written and sub is not None and (owner := _prefix_in(sub, written)) is not None:
            copies.setdefault(owner, {})[sub[len(owner) + 1:]] = tensor  # before the saved rule: it selects them
        elif keep and sub is not None and (owner := _saved_owner(sub, keep)) is not None:
            saved.setdefault(owner, {})[sub[len(owner) + 1:]] = tensor
            continue  # a saved module's bias is part of the module, loaded with it
        elif sub is not None and sub.find(".") > 0 and ".lora_" not in sub and ".base_layer." not in sub:
            # A plain <module>.<param>: PEFT's save_embedding_layers copy of an embedding. Whether the module is
            # one of the model's embeddings is checked against the model (unexpected keys if not).
            module, _, pname = sub.rpartition(".")
            copies.setdefault(module, {})[pname] = tensor
        else:
            unexpected.append(key)
        if key.endswith(".bias"):
            biases.append(key)
    if cfg.get("bias") == "all" and biases:
        raise AdapterFormatError(
            f"{directory}: bias='all' trains every bias of the model and the file holds {len(biases)} trained bias "
            f"tensor(s), e.g. {biases[:3]}; deltaw does not load trained biases: only bias='none' is supported")
    if unexpected:
        raise AdapterFormatError(f"{weights}: unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
                                 f"{_tying_hint(cfg)}")
    incomplete = [m for m, e in factors.items() if "A" not in e or "B" not in e]
    if incomplete:
        raise AdapterFormatError(f"{weights}: missing lora_A or lora_B for modules {incomplete[:5]}")
    if not factors:
        raise AdapterFormatError(f"{weights}: holds no LoRA factors")
    # Every tensor lies inside one of ``blocks``: all finite there means all finite here (bytes between
    # tensors that happen to read as NaN only send us to the exact per-tensor check).
    if not (_all_finite(blocks) or _all_finite([entry[w] for entry in factors.values() for w in ("A", "B")])):
        for module, entry in factors.items():
            for which in ("A", "B"):
                if not torch.isfinite(entry[which]).all():
                    raise NonFiniteError(f"{weights}: lora_{which} of module {module!r} holds NaN/inf; refusing to load")
    for module, sd in saved.items():
        for pname, t in sd.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteError(f"{weights}: saved module {module!r} parameter {pname!r} holds NaN/inf")
    config = _to_lora_config(cfg, sorted(factors), directory)
    for module, entry in factors.items():
        want_r = config.rank_for(module)
        a, b = entry["A"], entry["B"]
        # Linear/Conv1D/Embedding factors are 2-d; conv ones carry the kernel: A (r, in, *k), B (out, r, 1, ...).
        if not (a.ndim == b.ndim == 2 if entry["kind"] == "embedding" else 2 <= a.ndim <= 5 and b.ndim == a.ndim):
            raise AdapterFormatError(
                f"{weights}: module {module!r} has lora_A of shape {tuple(a.shape)} and lora_B of shape "
                f"{tuple(b.shape)}: LoRA factors are (r, in) and (out, r) matrices (conv: (r, in, *kernel) and "
                "(out, r, 1, ...))")
        if entry["kind"] != "embedding" and a.ndim > 2 and a.shape[0] == want_r and 0 < b.shape[1] < want_r \
                and want_r % b.shape[1] == 0:
            # PEFT's lora_B on a grouped conv is grouped too: (out, r / groups, 1, ...).
            raise TargetError(
                f"{weights}: module {module!r} is a grouped convolution (groups={want_r // b.shape[1]}: lora_B "
                f"{tuple(b.shape)} has r/groups input channels for r={want_r}); deltaw does not support LoRA on "
                "grouped convolutions (groups > 1)")
        if a.shape[0] != want_r or b.shape[1] != want_r:
            raise AdapterFormatError(
                f"{weights}: module {module!r} has rank {a.shape[0]} (lora_A {tuple(a.shape)}, lora_B "
                f"{tuple(b.shape)}) but the config says r={want_r}")
    return AdapterFile(directory, cfg, config, factors, saved, deltaw_meta, base_weights, copies)


def _saved_owner(key: str, names: tuple[str, ...]) -> str | None:
    """The module a modules_to_save key belongs to: its shortest dotted prefix that ends with one of ``names``
    as a plain string -- PEFT's rule (``_set_trainable``: ``key.endswith(target_key)``), so ``embed_tokens`` owns
    ``model.embed_tokens.weight``, ``0`` owns ``block.0.bias`` and ``classifier`` owns DistilBERT's
    ``pre_classifier.weight`` (PEFT saves that module too). None when no name owns the key."""
    dot = key.find(".")
    while dot > 0:
        if key[:dot].endswith(names):
            return key[:dot]
        dot = key.find(".", dot + 1)
    return None


def _prefix_in(key: str, paths: frozenset[str]) -> str | None:
    """The dotted prefix of ``key`` that is one of ``paths`` (a module path), or None."""
    dot = key.find(".")
    while dot > 0:
        if key[:dot] in paths:
            return key[:dot]
        dot = key.find(".", dot + 1)
    return None


def _tying_hint(cfg: dict) -> str:
    """What to add to an unexpected-keys message when the config ties weights: PEFT then saves (and adapts)
    modules the config does not name."""
    if not cfg.get("ensure_weight_tying"):
        return ""
    return ("; the config sets ensure_weight_tying=True: PEFT then also saves or adapts the modules tied to the "
            "embedding, which deltaw supports only for a targeted embedding, not a saved one")


#: What the ``deltaw`` header entry holds, by key: a file's metadata comes from anyone, and callers index into it.
_META_TYPES = {"version": str, "adapter_name": str, "fingerprint": dict, "metadata": dict, "peft_copies": list}


def _read_deltaw_meta(header: dict, weights: Path) -> dict:
    """deltaw's own metadata from the safetensors header ({} when the file was written by PEFT)."""
    if "deltaw" not in header:
        return {}
    bad = f"{weights}: the deltaw metadata in the file's header is malformed"
    try:
        meta = json.loads(header["deltaw"])
    except json.JSONDecodeError:
        raise AdapterFormatError(f"{bad}: not valid JSON") from None
    except RecursionError:
        raise AdapterFormatError(f"{bad}: JSON nested too deeply") from None
    if not isinstance(meta, dict):
        raise AdapterFormatError(f"{bad}: a {type(meta).__name__}, not an object")
    for key, kind in _META_TYPES.items():
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise AdapterFormatError(f"{bad}: {key!r} is a {type(meta[key]).__name__}, not a {kind.__name__}")
    if not all(isinstance(p, str) for p in meta.get("peft_copies") or ()):
        raise AdapterFormatError(f"{bad}: 'peft_copies' must be a list of module paths")
    why = fp.malformed(meta["fingerprint"]) if meta.get("fingerprint") is not None else None
    if why is not None:
        raise AdapterFormatError(f"{bad}: {why}")
    return meta


# ---- load ----------------------------------------------------------------------------------------------
def _check_against_model(model: nn.Module, adapter: AdapterFile,
                         name: str) -> tuple[list[tuple[str, nn.Module]], LoraConfig]:
    """Every module the file names exists, has a supported type, fits the factor shapes, and is one PEFT itself
    would adapt with this config (and every module PEFT would adapt has its factors); every value survives the
    cast to the dtype it is loaded in. Returns the (path, base module) targets and the config to attach with
    (modules_to_save: exactly the modules whose weights the file holds)."""
    named = api._walk(model)  # one walk, shared with the candidate scan below
    modules = dict(named)
    st = model.__dict__.get(api._STATE_ATTR)
    targets: list[tuple[str, nn.Module]] = []
    layers = st.layers if st is not None else {}
    fused = api.fused_children(named)
    for path, entry in adapter.factors.items():
        layer = layers.get(path)
        base = layer._modules["base_layer"] if layer is not None else modules.get(path)
        targets.append((path, base))
        # PEFT adapts an nn.MultiheadAttention whole: factors at its path and inside its base_layer (no module here).
        attention = _multihead_owner(modules, path) if base is None or isinstance(base, nn.MultiheadAttention) else None
        if attention is not None:
            raise TargetError(f"adapter {name!r}: module {attention!r} is a torch nn.MultiheadAttention, which PEFT "
                              "adapts as a whole; deltaw does not support LoRA on nn.MultiheadAttention (load this "
                              "adapter with PEFT, or train one on other modules)")
        if base is None:
            raise TargetError(f"adapter {name!r}: module {path!r} does not exist in this model (wrong base model?)")
        cls = type(layer) if layer is not None else layer_class_for(base)
        if cls is None:
            raise TargetError(f"adapter {name!r}: module {path!r} is a {type(base).__name__}, which LoRA cannot adapt")
        if id(base) in fused:  # attach refuses these too (api.resolve_targets)
            raise TargetError(f"adapter {name!r}: module {path!r} belongs to torch's nn.{fused[id(base)]}, whose "
                              "forward reads its weight directly (fused kernels), so it cannot be wrapped: every "
                              "forward would fail or skip the adapter")
        if cls is LoraConv:
            if base.groups != 1:
                raise TargetError(f"adapter {name!r}: module {path!r} is a {type(base).__name__} with groups="
                                  f"{base.groups}; deltaw does not support LoRA on grouped convolutions (groups > 1)")
            why = _peft_conv_differs(base)
            if why is not None and not adapter.deltaw_meta:  # a file deltaw wrote has deltaw's maths on both ends
                raise TargetError(
                    f"adapter {name!r}: module {path!r} is a {type(base).__name__} with {why}: PEFT's lora_A "
                    "convolution pads with zeros and does not dilate, deltaw's uses the base layer's settings, so "
                    "this adapter (not written by deltaw) would give other outputs than in PEFT; refusing to load")
        if (entry["kind"] == "embedding") != (cls is LoraEmbedding):
            raise AdapterFormatError(f"adapter {name!r}: module {path!r} is a {type(base).__name__} but the file "
                                     f"stores {'embedding' if entry['kind'] == 'embedding' else 'dense'} factors")
        probe = layer if layer is not None else cls(base, api.AdapterState())
        a_shape, b_shape = probe.factor_shapes(entry["A"].shape[0])
        if tuple(entry["A"].shape) != a_shape or tuple(entry["B"].shape) != b_shape:
            raise AdapterFormatError(
                f"adapter {name!r}: shape mismatch at {path!r} (base weight {tuple(base.weight.shape)}): file has "
                f"lora_A {tuple(entry['A'].shape)}, lora_B {tuple(entry['B'].shape)}; expected {a_shape}, {b_shape}")
        # The dtype add_adapter gives the factors (fp32 for a half-precision base).
        dtype = base.weight.dtype
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        for which in ("A", "B"):
            if _overflows(entry[which], dtype):
                raise NonFiniteError(f"adapter {name!r}: lora_{which} of module {path!r} holds values beyond the "
                                     f"range of {dtype} (the file stores {entry[which].dtype}): they would load as "
                                     "inf; refusing to load")
    if adapter.peft.get("bias") == "all":
        with_bias = [p for p, base in targets if getattr(base, "bias", None) is not None]
        if with_bias:
            raise AdapterFormatError(
                f"adapter {name!r}: bias='all' makes PEFT train and save every bias of the model, but the file holds "
                f"none while the targeted modules {with_bias[:3]} have one: it was saved from a model without them "
                "(wrong base model?)")
    _check_coverage(model, adapter, name, named)
    for path, sd in adapter.saved.items():
        module = modules.get(path)
        if module is None:
            raise TargetError(f"adapter {name!r}: saved module {path!r} (modules_to_save) does not exist in this "
                              "model (wrong base model?)")
        current = module.state_dict() if not hasattr(module, "original_module") else module.original_module.state_dict()
        if set(current) != set(sd):
            raise AdapterFormatError(f"adapter {name!r}: saved module {path!r} has keys {sorted(sd)}, model has "
                                     f"{sorted(current)}")
        for k, t in sd.items():
            if tuple(current[k].shape) != tuple(t.shape):
                raise AdapterFormatError(f"adapter {name!r}: saved module {path!r}.{k} has shape {tuple(t.shape)}, "
                                         f"model has {tuple(current[k].shape)}")
            if _overflows(t, current[k].dtype):
                raise NonFiniteError(f"adapter {name!r}: saved module {path!r} parameter {k!r} holds values beyond "
                                     f"the range of {current[k].dtype} (the file stores {t.dtype}): they would load "
                                     "as inf; refusing to load")
    _check_copies(model, adapter, name, modules)
    order = {path: i for i, (path, _) in enumerate(named)}
    config = adapter.config
    # The modules PEFT saved are the ones attach must copy: the config's names select them by PEFT's rule (plain
    # string ending), which is not attach's (dotted suffix), and PEFT lists names a model may lack (task_type
    # SEQ_CLS adds both 'classifier' and 'score') and skips those.
    present = tuple(sorted(adapter.saved, key=order.__getitem__))
    if present != config.modules_to_save:
        config = replace(config, modules_to_save=present)
    return sorted(targets, key=lambda t: order[t[0]]), config  # model order, as resolve_targets gives


def _multihead_owner(modules: dict[str, nn.Module], path: str) -> str | None:
    """The nn.MultiheadAttention at ``path`` or above it, or None. PEFT adapts that module whole (factors at
    ``attn`` for the packed in-projection, ``attn.base_layer.out_proj`` for the output one)."""
    dot = path.find(".")
    while True:
        prefix = path if dot < 0 else path[:dot]
        if isinstance(modules.get(prefix), nn.MultiheadAttention):
            return prefix
        if dot < 0:
            return None
        dot = path.find(".", dot + 1)


def _check_coverage(model: nn.Module, adapter: AdapterFile, name: str, named: list[tuple[str, nn.Module]]) -> None:
    """The file's factors are exactly for the modules PEFT adapts with its config: PEFT skips factors of other
    modules (so loading them would add an update PEFT never applies) and leaves a targeted module it finds no
    factors for at its random init."""
    targeted = _peft_targeted(adapter.peft, model, named)
    if targeted is None:
        return
    stray = sorted(p for p in adapter.factors if not targeted(p))
    if stray:
        raise AdapterFormatError(
            f"adapter {name!r}: the file holds LoRA factors for {len(stray)} module(s) its adapter_config.json does "
            f"not target (unexpected keys: PEFT skips them), e.g. {stray[:3]}{_tying_hint(adapter.peft)}")
    wanted = {p for p, _ in api._candidates(named, where=targeted)}
    missing = sorted(wanted - set(adapter.factors))
    if missing:
        raise AdapterFormatError(f"adapter {name!r}: the config targets {len(missing)} module(s) with no weights "
                                 f"in the file (missing keys), e.g. {missing[:3]}")


def _peft_targeted(cfg: dict, model: nn.Module, named: list[tuple[str, nn.Module]]) -> Callable[[str], bool] | None:
    """Whether PEFT adapts the module at a path with this config: ``check_target_module_exists``
    (peft/tuners/tuners_utils.py), in its order. None when target_modules is null (PEFT then picks per
    architecture).

    - exclude_modules: a regex (``re.fullmatch``) or names (the path, or a "."-suffix of it) left out;
    - a module inside (or equal to) a modules_to_save module is never adapted: PEFT saves it whole;
    - target_modules: a regex (``re.fullmatch``), or names: the full path selects it outright, a "."-suffix
      selects it only within layers_to_transform, the layer index being the first number after a
      layers_pattern component (any component when there is none).
    With ensure_weight_tying, modules tied to a targeted input embedding are adapted too (PEFT's
    target_modules_to_tie: same factors, saved under the tied module's name)."""
    spec = cfg.get("target_modules")
    if not spec:
        return None
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        spec = _peft_all_linear(model, named, cfg.get("task_type"))
    targets: str | tuple[str, ...] = spec if isinstance(spec, str) else tuple(spec)
    listed = frozenset(targets) if not isinstance(targets, str) else frozenset()
    exclude = cfg.get("exclude_modules") or ()
    exclude = exclude if isinstance(exclude, str) else tuple(exclude)
    saved = [re.compile(rf"(^|.*\.){_regex_or_literal(m)}($|\..*)") for m in cfg.get("modules_to_save") or ()]
    layers = cfg.get("layers_to_transform")
    by_layer = layers is not None and (len(layers) != 0 if isinstance(layers, list) else True)
    indexes = {layers} if isinstance(layers, int) else set(layers or ())
    pattern = cfg.get("layers_pattern")
    index_res = [re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")] if not pattern else [
        re.compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in ([pattern] if isinstance(pattern, str) else pattern)]

    def by_config(path: str) -> bool:
        if exclude and api._matches(exclude, path):
            return False
        if any(r.match(path) for r in saved):
            return False
        if isinstance(targets, str):
            return re.fullmatch(targets, path) is not None
        if path in listed:
            return True
        if not api._matches(targets, path):
            return False
        if not by_layer:
            return True
        for r in index_res:
            found = r.match(path)
            if found is not None:
                return int(found["idx"]) in indexes
        return False

    tied = _tied_to_input_embedding(model, named, by_config) if cfg.get("ensure_weight_tying") else set()
    return (lambda path: by_config(path) or path in tied) if tied else by_config


def _regex_or_literal(name: str) -> str:
    """PEFT puts modules_to_save names into a regex unescaped; a name that is no valid regex is taken literally
    (PEFT itself would fail on it)."""
    try:
        re.compile(name)
    except (re.error, RecursionError, OverflowError):
        return re.escape(name)
    return name


def _peft_all_linear(model: nn.Module, named: list[tuple[str, nn.Module]], task_type: object) -> tuple[str, ...]:
    """PEFT's expansion of target_modules="all-linear" (``_maybe_include_all_linear_layers``): every Linear and
    transformers Conv1D, but a transformers model's output layer, or without one its SEQ_CLS head."""
    paths = [p for p, m in named if p and layer_class_for(api._unwrap(m)) in (LoraLinear, LoraConv1D)]
    head = api._output_head(model)
    if head is None and task_type == "SEQ_CLS":
        head = next((h for h in (getattr(model, n, None) for n in ("score", "classifier")) if h is not None), None)
    if head is not None:
        modules = dict(named)
        paths = [p for p in paths if modules[p] is not head]
    return tuple(paths)


def _tied_to_input_embedding(model: nn.Module, named: list[tuple[str, nn.Module]],
                             targeted: Callable[[str], bool]) -> set[str]:
    """Paths of the modules sharing the input embedding's weight, when PEFT adapts that embedding."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return set()
    path = next((p for p, m in named if m is embedding), None)
    if embedding is None or path is None or not targeted(path):
        return set()
    weight = getattr(api._unwrap(embedding), "weight", None)
    return {p for p, m in named
            if p != path and weight is not None and getattr(api._unwrap(m), "weight", None) is weight}


def _check_copies(model: nn.Module, adapter: AdapterFile, name: str, modules: dict[str, nn.Module]) -> None:
    """Plain weight copies in the file belong to modules that may carry them: the model's input or output
    embedding (PEFT's save_embedding_layers), or the modules deltaw listed as written for PEFT. Their values
    are compared in ``_check_base_weights``."""
    if not adapter.copies:
        return
    written = set(adapter.deltaw_meta.get("peft_copies") or ())
    embeddings: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)() if callable(getattr(model, getter, None)) else None
        except (NotImplementedError, AttributeError):
            module = None
        if module is not None:
            embeddings.add(id(module))
    saved_weights = {id(w): p for p in adapter.saved
                     if (w := getattr(api._unwrap(modules[p]), "weight", None)) is not None}
    stray: list[str] = []
    for path, params in adapter.copies.items():
        module = modules.get(path)
        tied = saved_weights.get(id(getattr(api._unwrap(module), "weight", None))) if module is not None else None
        if tied is not None and adapter.peft.get("ensure_weight_tying"):
            raise AdapterFormatError(
                f"adapter {name!r}: the config sets ensure_weight_tying=True, so PEFT ties {path!r} to the trained "
                f"copy of the saved module {tied!r} (its modules_to_tie) and saves it; deltaw does not support tied "
                f"saved modules (it would keep {path!r} on the original weight). Save the adapter without "
                "ensure_weight_tying, or load it with PEFT")
        state = _unadapted_state(module) if module is not None and (
            path in written or id(module) in embeddings) else {}
        stray += [f"{PREFIX}{path}.{p}" for p in params if p not in state]
    if stray:
        raise AdapterFormatError(f"{adapter.directory / WEIGHTS_NAME}: unexpected keys {sorted(stray)[:5]}"
                                 f"{' ...' if len(stray) > 5 else ''}{_tying_hint(adapter.peft)}")


def _overflows(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether casting ``t`` to ``dtype`` turns a finite value into inf (an F64 1e300 in an fp32 model). Only a
    cast to a floating dtype of smaller range can, so the usual same-dtype load costs nothing here."""
    if t.dtype == dtype or not dtype.is_floating_point or t.dtype == torch.bool or t.numel() == 0:
        return False
    info = torch.finfo(t.dtype) if t.is_floating_point() else torch.iinfo(t.dtype)
    if info.max <= torch.finfo(dtype).max:
        return False
    lo, hi = torch.aminmax(t)  # rounding is monotonic: the extremes overflow first
    return not bool(torch.isfinite(torch.stack([lo, hi]).to(dtype)).all())


def _same_values(saved: torch.Tensor, current: object) -> bool:
    """Whether a weight copy from the file is this model's weight, possibly in another precision. Rounding one
    base to fp16 and to bf16 can land one unit in the last place (ulp) of the coarser dtype apart (fp32 -> fp16
    -> bf16 vs fp32 -> bf16 round twice), so between two different dtypes values may differ by that much."""
    if not isinstance(current, torch.Tensor) or current.shape != saved.shape:
        return False
    if current.device.type == "meta":
        return True  # nothing to compare against (and no values to get wrong)
    current, here = current.detach(), saved.to(current.device)
    if here.dtype == current.dtype:
        return torch.equal(here, current)
    if torch.equal(here.to(current.dtype), current) or torch.equal(here, current.to(here.dtype)):
        return True
    if not (here.is_floating_point() and current.is_floating_point()):
        return False
    a, b = here.double(), current.double()
    magnitude = torch.maximum(a.abs(), b.abs())
    tolerance = torch.zeros_like(magnitude)
    for dtype in (here.dtype, current.dtype):
        info = torch.finfo(dtype)
        # ulp(x) = eps * 2^floor(log2 |x|), never below the subnormal spacing eps * tiny.
        _, exponent = torch.frexp(magnitude.clamp_min(info.tiny))
        tolerance = torch.maximum(tolerance, torch.ldexp(torch.full_like(magnitude, info.eps), exponent - 1))
    tolerance = torch.where(torch.isfinite(magnitude), tolerance, torch.zeros_like(tolerance))  # inf vs finite
    return bool(((a == b) | ((a - b).abs() <= tolerance)).all())


def _check_base_weights(model: nn.Module, adapter: AdapterFile, name: str, targets: list[tuple[str, nn.Module]],
                        allow_base_mismatch: bool) -> None:
    """The base-weight copies in the file must be this model's own weights: the base-layer copies PEFT saves
    with a targeted embedding, PEFT's save_embedding_layers copies, deltaw's copies written for PEFT. deltaw
    loads LoRA factors onto the model's base, never a base weight from the file, so an adapter that changed (or
    resized) its embedding would otherwise load silently onto the unchanged one."""
    def check(path: str, key: str, saved: torch.Tensor, current: object) -> None:
        if _same_values(saved, current):
            return
        why = (f"adapter {name!r} from {adapter.directory} carries a modified base weight for {path!r} "
               f"({key}, {tuple(saved.shape)}), which deltaw does not load: it differs from this model's weight")
        if not allow_base_mismatch:
            raise BaseModelMismatchError(f"{why}. Load it onto the base model it was trained with, or pass "
                                         "allow_base_mismatch=True to keep this model's weight")
        log.warning("%s; keeping this model's weight", why)

    bases = dict(targets)
    for path, params in adapter.base_weights.items():
        for pname, saved in params.items():
            current = _current_weights(model, [path])[path] if pname == "weight" else getattr(bases[path], pname, None)
            check(path, f"{path}.base_layer.{pname}", saved, current)
    for path, params in adapter.copies.items():
        state = _unadapted_state(model.get_submodule(path))
        for pname, saved in params.items():
            check(path, f"{path}.{pname}", saved, state.get(pname))


def _moved_in_one_copy(factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The factors as views of one copy, on the target weights' device, of the CPU buffer they are views of (the
    file as read) -- when every target weight sits on one other device, every factor already has the dtype its
    layer keeps (``factor_dtype``) and the factors are (nearly) all of that buffer. Else unchanged: then
    ``add_adapter`` moves and casts each factor itself.

    Why: on a GPU each ``.to(device)`` of a small tensor is a blocking copy from pageable memory, ~420 of them
    for an adapter of a 135M model, against one 20 MB copy. (Views keep the whole buffer alive, hence the bound
    on bytes that are not factors: a large ``modules_to_save`` weight is loaded on its own.)"""
    devices = {w.device for w in weights.values()}
    tensors = [t for pair in factors.values() for t in pair]
    if len(devices) != 1 or not tensors or next(iter(devices)).type == "cpu":
        return factors
    if any(a.dtype != factor_dtype(weights[p].dtype) or b.dtype != a.dtype for p, (a, b) in factors.items()):
        return factors
    storage = tensors[0].untyped_storage()
    if any(not t.is_cpu or t.untyped_storage().data_ptr() != storage.data_ptr() for t in tensors) \
            or sum(t.numel() * t.element_size() for t in tensors) < 0.9 * storage.nbytes():
        return factors
    on_device = torch.empty(0, dtype=torch.uint8).set_(storage).to(next(iter(devices)))  # (bytes,): one copy
    typed: dict[torch.dtype, torch.Tensor] = {}

    def there(t: torch.Tensor) -> torch.Tensor:
        view = typed.get(t.dtype)
        if view is None:
            n = on_device.numel() - on_device.numel() % t.element_size()
            view = typed[t.dtype] = on_device[:n].view(t.dtype)
        return view.as_strided(t.shape, t.stride(), t.storage_offset())  # offsets count t.dtype's elements

    return {p: (there(a), there(b)) for p, (a, b) in factors.items()}


def _current_weights(model: nn.Module, modules: list[str]) -> dict[str, torch.Tensor]:
    st = model.__dict__.get(api._STATE_ATTR)
    weights = {}
    for path in modules:
        layer = st.layers.get(path) if st is not None else None
        weights[path] = _pristine_weight(layer) if layer is not None else model.get_submodule(path).weight
    return weights


def load(model: nn.Module, path: str | os.PathLike, name: str = "default", *, trainable: bool = False,
         activate: bool = True, allow_base_mismatch: bool = False) -> AdapterInfo:
    """Load a PEFT-format adapter as ``name``. All checks run before the model is touched; on any error the
    model is left exactly as it was. ``allow_base_mismatch`` turns the base-model checks (the fingerprint, and
    a base embedding PEFT saved alongside its factors) into warnings."""
    check_name(name)
    if name in api.adapters(model):
        raise AdapterNameError(f"an adapter named {name!r} already exists; delete it first or pick another name")
    adapter = read_adapter(path, name)
    targets, config = _check_against_model(model, adapter, name)
    saved_fp = adapter.deltaw_meta.get("fingerprint")
    weights = _current_weights(model, sorted(adapter.factors))
    if saved_fp:
        why = None if fp.same_base_quick(saved_fp, weights) else fp.compare(saved_fp, fp.fingerprint(weights))
        if why is not None:
            if not allow_base_mismatch:
                raise BaseModelMismatchError(
                    f"adapter {name!r} from {adapter.directory} was trained on another base model: {why}. "
                    "Pass allow_base_mismatch=True (CLI: --allow-base-mismatch) to load it anyway")
            log.warning("loading adapter %r onto a different base model: %s", name, why)
    _check_base_weights(model, adapter, name, targets, allow_base_mismatch)
    # The factors become the parameters directly (no random init, no second copy).
    factors = _moved_in_one_copy({m: (e["A"], e["B"]) for m, e in adapter.factors.items()}, weights)
    info = api._attach_to(model, config, name, targets, trainable, False, factors)
    try:
        st = api.state(model)
        with torch.no_grad():
            for module, sd in adapter.saved.items():
                st.saved_modules[module].modules_to_save[name].load_state_dict(sd)
    except BaseException:
        api.delete(model, name)
        raise
    info.metadata.update({k: adapter.peft.get(k) for k in ("task_type", "base_model_name_or_path")})
    info.metadata["source"] = str(adapter.directory)
    if activate:
        api.activate(model, name)
    return info
