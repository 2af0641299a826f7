"""The public verbs: attach, delete, activate, deactivate, disabled, merge, unmerge, merge_and_unload.

State lives in one ``AdapterState`` per model (``deltaw.registry``); these functions are the only way to change
it. Every verb checks everything it can before touching the model, so a refused call changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .errors import AdapterNameError, MergeError, NonFiniteError, RowsOpenError, TargetError
from .layers import LoraLayer, ModulesToSave, layer_class_for
from .layers.base import FinitenessChecks, full_precision_products
from .layers.linear import LoraConv1D, LoraLinear
from .registry import AdapterInfo, AdapterState, Weighted, check_name

_STATE_ATTR = "_deltaw_state"
AdapterSpec = str | Sequence[str] | Mapping[str, float] | None


def state(model: nn.Module) -> AdapterState:
    """The model's adapter registry; raises if no adapter was ever attached."""
    st = model.__dict__.get(_STATE_ATTR)
    if st is None:
        raise AdapterNameError("this model has no deltaw adapters: call deltaw.attach(model, config) first")
    return st


def adapters(model: nn.Module) -> list[str]:
    """Names of the resident adapters, in the order they were added."""
    st = model.__dict__.get(_STATE_ATTR)
    return list(st.adapters) if st is not None else []


# ---- target resolution ---------------------------------------------------------------------------------
def _unwrap(module: nn.Module) -> nn.Module:
    """The module that stood where deltaw put a wrapper (what a plain-model reader such as PEFT sees)."""
    while isinstance(module, (LoraLayer, ModulesToSave)):
        module = module._modules["base_layer"] if isinstance(module, LoraLayer) else module.original_module
    return module


def _walk(model: nn.Module, plain: bool = False) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` (same pre-order, shared modules once) without descending into wrappers: what a
    LoraLayer or ModulesToSave holds is never a target, and on an adapted model their insides are most of the
    tree (loading an adapter walks it once). ``plain``: walk the tree as it was before deltaw wrapped anything
    (a wrapper's path reports the wrapper; below it come its original module's children, at their old paths)."""
    wrappers = (LoraLayer, ModulesToSave)
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append((path, module))
        if plain:
            module = _unwrap(module)
        elif isinstance(module, wrappers):  # its insides count as seen (named_modules meets them here first)
            deep = isinstance(module, ModulesToSave) or module._modules["base_layer"]._modules
            seen.update(map(id, module.modules() if deep else module._modules.values()))
            continue
        prefix = path + "." if path else ""
        stack.extend((prefix + k, m) for k, m in reversed(module._modules.items()) if m is not None)
    return out


def _candidates(named: Sequence[tuple[str, nn.Module]],
                where: Callable[[str], bool] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(path, base module) for every module of ``named`` (a ``_walk``, which never enters a wrapper) that
    could be adapted; wrappers report their base layer. ``where``: a path filter, applied before the (slower)
    type check."""
    for path, module in named:
        if isinstance(module, (LoraLayer, ModulesToSave)):
            if isinstance(module, LoraLayer) and (where is None or where(path)):
                yield path, module.base_layer
            continue
        if path and (where is None or where(path)) and layer_class_for(module) is not None:
            yield path, module


_KEY_SETS: dict[int, tuple[tuple[str, ...], frozenset[str]]] = {}  # id(spec) -> (spec, its keys as a set)


def _key_set(spec: tuple[str, ...]) -> frozenset[str]:
    """The keys of ``spec`` as a set, remembered per spec object (hashing a 200-name tuple per call is slow)."""
    hit = _KEY_SETS.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    if len(_KEY_SETS) > 256:
        _KEY_SETS.clear()
    keys = frozenset(spec)
    _KEY_SETS[id(spec)] = (spec, keys)  # holding spec keeps its id from being reused while cached
    return keys


def _matches(spec: tuple[str, ...] | str, path: str) -> bool:
    """path == key or path ends with "." + key, for any key: a set lookup per dotted suffix of the path, so
    a loaded adapter that lists all of its ~200 module paths resolves in linear time."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    if not spec:
        return False
    keys = _key_set(spec if isinstance(spec, tuple) else tuple(spec))
    if path in keys:
        return True
    dot = path.find(".")
    while dot >= 0:
        if path[dot + 1:] in keys:
            return True
        dot = path.find(".", dot + 1)
    return False


def _within(spec: tuple[str, ...] | str, path: str) -> bool:
    """``path`` or one of its ancestors matches ``spec``."""
    if not spec:
        return False
    while path:
        if _matches(spec, path):
            return True
        path = path.rpartition(".")[0]
    return False


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


#: torch modules whose forward reads these children's weights itself (fused fast paths), bypassing their forward.
_READS_CHILD_WEIGHTS: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.MultiheadAttention, ("out_proj",)),
    (nn.TransformerEncoderLayer, ("linear1", "linear2")),
    (nn.TransformerDecoderLayer, ("linear1", "linear2")),
)


def fused_children(named: Sequence[tuple[str, nn.Module]]) -> dict[int, str]:
    """id(layer) -> name of the torch module type whose forward reads that layer's weight itself (fused paths),
    for every such layer in ``named`` (a ``_walk``)."""
    return {id(getattr(m, child)): type(m).__name__ for _, m in named for kind, children in _READS_CHILD_WEIGHTS
            if isinstance(m, kind) for child in children}


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (path, base module) pairs ``config`` selects, or a TargetError listing what could be targeted."""
    named = _walk(model)  # one walk of the tree serves both passes below
    candidates = list(_candidates(named))
    if config.target_modules == ALL_LINEAR:
        head = _output_head(model)
        chosen = [(p, m) for p, m in candidates if layer_class_for(m) in (LoraLinear, LoraConv1D)
                  and m is not head and not p.endswith("lm_head")]
    else:
        chosen = [(p, m) for p, m in candidates if _matches(config.target_modules, p)]
    if config.exclude_modules:
        chosen = [(p, m) for p, m in chosen if not _matches(config.exclude_modules, p)]
    # A module trained in full (modules_to_save) gets no LoRA inside it, as in PEFT (its copies would carry
    # the wrappers, and the saved file keys no one can load).
    chosen = [(p, m) for p, m in chosen if not _within(config.modules_to_save, p)]
    # Layers whose parent reads their weight itself: a wrapper there would break the parent or be bypassed.
    fused = fused_children(named)
    blocked = [(p, fused[id(m)]) for p, m in chosen if id(m) in fused]
    if blocked and config.target_modules != ALL_LINEAR:
        raise TargetError(f"module {blocked[0][0]!r} belongs to torch's nn.{blocked[0][1]}, whose forward reads "
                          "its weight directly (fused kernels), so it cannot be wrapped; leave it out "
                          "(exclude_modules) or target other layers")
    chosen = [(p, m) for p, m in chosen if id(m) not in fused]
    # A module another adapter trains in full (modules_to_save) cannot carry LoRA too (PEFT refuses it as well);
    # skipping it silently would leave the adapter without a module it names.
    if config.target_modules != ALL_LINEAR:
        saved = [(p, m) for p, m in named if isinstance(m, ModulesToSave) and _matches(config.target_modules, p)]
        if saved:
            path, wrapper = saved[0]
            owners = ", ".join(repr(n) for n in wrapper.modules_to_save) or "none left"
            raise TargetError(f"module {path!r} is wrapped to be trained in full (modules_to_save of adapters: "
                              f"{owners}), so it cannot also carry LoRA factors; leave it out of target_modules")
    # Any module named by target_modules that exists but has an unsupported type is an error, not a skip.
    if not isinstance(config.target_modules, str):
        for path, module in named:
            if _matches(config.target_modules, path) and layer_class_for(module) is None and not isinstance(
                    module, (LoraLayer, ModulesToSave)) and not any(path.startswith(p + ".") for p, _ in chosen):
                raise TargetError(f"module {path!r} ({type(module).__name__}) matches target_modules but deltaw "
                                  "supports only Linear, transformers Conv1D, Embedding and Conv1d/2d/3d")
    if not chosen:
        kinds = sorted({f"{p.rsplit('.', 1)[-1]} ({type(m).__name__})" for p, m in candidates if id(m) not in fused})
        raise TargetError(
            f"target_modules={config.target_modules!r} matched no supported module. Modules that can be "
            f"targeted (by name suffix): {', '.join(kinds) or 'none'}"
        )
    return chosen


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    by_id: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(pname)
    return {k: v for k, v in by_id.items() if len(v) > 1}


def _no_open_rows(st: AdapterState, verb: str) -> None:
    """Adapter state may not change under an open ``per_row`` batch: its plan (which adapters are merged, the
    packed factors) was fixed on entry, and rows would silently get the old -- or a doubled -- adapter."""
    if st.rows is not None:
        raise RowsOpenError(f"cannot {verb} while a per_row batch is open on this model; close the per_row "
                          "context first")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


# ---- attach / delete -----------------------------------------------------------------------------------
def attach(model: nn.Module, config: LoraConfig | None = None, name: str = "default", *,
           trainable: bool = True, activate: bool = True,
           factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> AdapterInfo:
    """Wrap the modules ``config`` targets (in place) and add a fresh adapter called ``name``.

    Every base parameter is frozen; the new adapter's parameters are trainable unless ``trainable=False``.
    Works on models built on the ``meta`` device (nothing is allocated but the adapter, on meta too).
    ``factors``: {module path: (A, B)} initial values (what ``load`` read), used without a copy when possible.
    """
    config = config if config is not None else LoraConfig()
    check_name(name)
    return _attach_to(model, config, name, None, trainable, activate, factors)


def _attach_to(model: nn.Module, config: LoraConfig, name: str, targets: list[tuple[str, nn.Module]] | None,
               trainable: bool, activate: bool,
               factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None) -> AdapterInfo:
    """``attach`` onto ``targets`` (path, base module) when the caller already resolved and checked them
    (``io.load`` does, against the file); else onto ``resolve_targets(model, config)``."""
    st = model.__dict__.get(_STATE_ATTR) or AdapterState()
    _no_open_rows(st, f"add adapter {name!r}")
    if name in st.adapters:
        raise AdapterNameError(f"an adapter named {name!r} already exists; delete it first or pick another name")
    if targets is None:
        targets = resolve_targets(model, config)
    # Tied weights matter only for layers wrapped now (loading onto existing wrappers skips the walk).
    tied = _tied_names(model) if any(p not in st.layers for p, _ in targets) else {}

    # Phase 1: build wrappers and check every rank, touching nothing.
    plan: list[tuple[str, LoraLayer, bool]] = []
    for path, base in targets:
        layer = st.layers.get(path)
        is_new = layer is None
        if is_new:
            others = [n for n in tied.get(id(getattr(base, "weight", None)), []) if not n.startswith(path + ".")]
            layer = layer_class_for(base)(base, st, tied_with=others)
            layer.train(base.training)  # a new nn.Module starts in train mode: dropout on in an eval model
        r = config.rank_for(path)
        if r > layer.max_rank():
            raise TargetError(f"adapter {name!r}: rank {r} for {path!r} exceeds min(in, out) = {layer.max_rank()} "
                              f"of its weight {tuple(base.weight.shape)}; use a smaller r or rank_pattern")
        plan.append((path, layer, is_new))
    saved_paths = [p for p, _ in _walk(model) if _matches(config.modules_to_save, p)
                   and not any(p.startswith(q + ".") for q in st.saved_modules)] if config.modules_to_save else []
    missing = [key for key in config.modules_to_save if not any(_matches((key,), p) for p in saved_paths)]
    if missing:
        raise TargetError(f"modules_to_save {missing} matched no module of the model")
    for q in saved_paths:
        inside = [p for p in [*st.layers, *(p for p, _ in targets)] if p == q or p.startswith(q + ".")]
        if inside:
            raise TargetError(f"modules_to_save module {q!r} holds LoRA layer {inside[0]!r}: a module trained in "
                              "full cannot also carry LoRA factors (its copies would hold the wrappers); leave one "
                              "of the two out")

    # Phase 2: apply; undo everything on failure.
    first_attach = model.__dict__.get(_STATE_ATTR) is None
    if first_attach:
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        model.__dict__[_STATE_ATTR] = st
    wrapped: list[tuple[str, LoraLayer | ModulesToSave]] = []  # installed now: unwrapped on failure
    added: list[LoraLayer | ModulesToSave] = []  # carry the adapter now: it is deleted on failure
    try:
        for path, layer, is_new in plan:
            if is_new:
                _set_submodule(model, path, layer)
                st.layers[path] = layer
                wrapped.append((path, layer))
            layer.add_adapter(name, config.rank_for(path), config.scaling_for(path), config.dropout, config.init,
                              factors.get(path) if factors is not None else None, trainable)
            added.append(layer)
        for path in saved_paths:
            wrapper = st.saved_modules.get(path)
            if wrapper is None:
                wrapper = ModulesToSave(model.get_submodule(path), st)
                wrapper.train(wrapper.original_module.training)
                _set_submodule(model, path, wrapper)
                st.saved_modules[path] = wrapper
                wrapped.append((path, wrapper))
            wrapper.add_adapter(name)
            added.append(wrapper)
    except BaseException:
        for module in reversed(added):
            module.delete_adapter(name)
        for path, module in reversed(wrapped):
            if isinstance(module, LoraLayer):
                _set_submodule(model, path, module.base_layer)
                del st.layers[path]
            else:
                _set_submodule(model, path, module.original_module)
                del st.saved_modules[path]
        if first_attach:
            del model.__dict__[_STATE_ATTR]
            for p, flag in frozen:
                p.requires_grad_(flag)
        raise
    info = AdapterInfo(name=name, config=config, modules=tuple(p for p, _, _ in plan), metadata={})
    st.adapters[name] = info
    for module in added:  # the LoRA factors were created with requires_grad=trainable
        if isinstance(module, ModulesToSave):
            for p in module.modules_to_save[name].parameters():
                p.requires_grad_(trainable)
    if activate and not st.active:
        st.set_active(((name, 1.0),))
    return info


def delete(model: nn.Module, name: str) -> None:
    """Remove an adapter and its parameters. A merged adapter must be unmerged first (nothing is implicit)."""
    st = state(model)
    info = st.require(name)
    _no_open_rows(st, f"delete adapter {name!r}")
    if any(n == name for n, _ in st.merged):
        raise MergeError(f"adapter {name!r} is merged into the base weights; call deltaw.unmerge(model, {name!r}) first")
    for path in info.modules:  # (before anything changes: a parametrized factor cannot be deleted like the rest)
        st.layers[path].require_plain_factors(name)
    st.set_active(tuple((n, w) for n, w in st.active if n != name))
    from .batching.kernels import forget_adapter  # (here: the batching package imports this module)
    for path in info.modules:
        layer = st.layers[path]
        if name in layer.serial:
            forget_adapter(layer, name, layer.serial[name])
        layer.delete_adapter(name)
    for layer in st.layers.values():
        layer.forget_plan()
    for wrapper in st.saved_modules.values():
        if name in wrapper.modules_to_save:
            wrapper.delete_adapter(name)
    del st.adapters[name]


def adapter_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The parameters that belong to adapters (all, or one adapter's), found through the registry."""
    st = state(model)
    names = [name] if name is not None else list(st.adapters)
    out: list[nn.Parameter] = []
    for n in names:
        for path in st.require(n).modules:
            out.extend(st.layers[path].adapter_parameters(n))
        for wrapper in st.saved_modules.values():
            if n in wrapper.modules_to_save:
                out.extend(wrapper.modules_to_save[n].parameters())
    return out


def set_trainable(model: nn.Module, names: Sequence[str] | str | None) -> None:
    """Make exactly these adapters trainable (others frozen). ``None``: freeze every adapter."""
    st = state(model)
    keep = {names} if isinstance(names, str) else set(names or ())
    for n in keep:
        st.require(n)
    for n in st.adapters:  # (before anything changes)
        for path in st.adapters[n].modules:
            st.layers[path].require_plain_factors(n)
    for n in st.adapters:
        for p in adapter_parameters(model, n):
            p.requires_grad_(n in keep)


def count_parameters(model: nn.Module, name: str | None = None) -> int:
    """Number of adapter parameters (works on meta-device models)."""
    return sum(p.numel() for p in adapter_parameters(model, name))


# ---- activation ----------------------------------------------------------------------------------------
def normalize(spec: AdapterSpec) -> Weighted:
    """"a" | ["a", "b"] | {"a": 1.0, "b": -0.5} | None -> (("a", 1.0), ...)."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        return ((spec, 1.0),)
    if isinstance(spec, Mapping):
        items = tuple((_spec_name(k), _spec_weight(k, v)) for k, v in spec.items())
    elif isinstance(spec, Iterable) and not isinstance(spec, (bytes, torch.Tensor)):
        items = tuple((_spec_name(k), 1.0) for k in spec)
    else:
        raise TypeError(f"an adapter spec is an adapter name, a list of names, a {{name: weight}} mapping or None; "
                        f"got {type(spec).__name__} {spec!r}")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise AdapterNameError(f"adapter listed twice in {names}")
    return items


def _spec_name(name: object) -> str:
    if not isinstance(name, str):
        raise AdapterNameError(f"adapter names are strings, got {type(name).__name__} {name!r}")
    return name


_MAX_WEIGHT = torch.finfo(torch.float32).max  # weights scale fp32 factors; beyond this they are inf there


def _spec_weight(name: str, weight: object) -> float:
    """A stacking weight as a float, refused unless finite (a NaN weight would be silently ignored by some
    BLAS paths and poison others) and representable in fp32."""
    value: float | None = None
    # float() would read True (Python's, numpy's or a bool tensor) as 1, "0.5" as 0.5, and a one-element array
    # or tensor as its element: none of them is a weight.
    dtype = getattr(weight, "dtype", None)
    if not (isinstance(weight, (bool, str, bytes)) or getattr(weight, "ndim", 0) != 0
            or dtype is torch.bool or str(dtype) == "bool"):
        try:
            value = float(weight)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
    if value is None:
        raise TypeError(f"the weight of adapter {name!r} must be a real number, got "
                        f"{type(weight).__name__} {weight!r}")
    if not abs(value) <= _MAX_WEIGHT:
        raise NonFiniteError(f"the weight of adapter {name!r} is {value!r}: weights must be finite (and within "
                             "fp32 range)")
    return value


def activate(model: nn.Module, spec: AdapterSpec) -> None:
    """Make these adapters live, with weights: output = W0·x + Σ wᵢ·sᵢ·Bᵢ·Aᵢ·x. O(#adapters), no tree walk."""
    state(model).set_active(normalize(spec))


def deactivate(model: nn.Module) -> None:
    """No live adapters (merged ones stay in the weights: see ``disabled`` for the exact base output)."""
    state(model).set_active(())


def active(model: nn.Module) -> Weighted:
    return state(model).active


@contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Exactly the base model's output inside the block, merged adapters included (read-only: no weight moves)."""
    st = state(model)
    st.push_disabled(+1)
    try:
        yield
    finally:
        st.push_disabled(-1)


@contextmanager
def using(model: nn.Module, spec: AdapterSpec) -> Iterator[None]:
    """Temporarily activate ``spec``; the previous activation comes back afterwards."""
    st = state(model)
    before = st.active
    st.set_active(normalize(spec))
    try:
        yield
    finally:
        st.set_active(before)


# ---- merge ---------------------------------------------------------------------------------------------
def _apply_merged(st: AdapterState, target: Weighted, keep_memory: bool = True) -> None:
    """Make the base weights equal W0 + Σ_target wᵢ·sᵢ·ΔWᵢ, all-or-nothing.

    A layer that holds merged weights and stays merged is recomputed from W0 into the weight it already has
    (no allocation: re-weighting, adding an adapter or switching with ``replace`` moves no memory), provided
    nothing was written into its merged adapters since their merge; the others get their result in the memory
    an earlier unmerge kept (``keep_memory``, CPU) or in new tensors, installed only once every layer
    succeeded. If a layer fails, the ones rewritten in place are recomputed for the previous target from the
    same factors, bit for bit, so a refused merge still changes nothing."""
    touched = sorted({p for n, _ in set(st.merged) | set(target) for p in st.adapters[n].modules})
    carried = {n for n, _ in target}
    rewritten: list[str] = []
    new_weights: dict[str, torch.Tensor | None] = {}
    checks = FinitenessChecks()  # one device-to-host read for all layers' verdicts (a GPU waits on each .item())
    try:
        with full_precision_products():  # pinned once for all layers (each layer's merge nests in it cheaply)
            for path in touched:
                layer = st.layers[path]
                # In place only where the weight there can be recomputed exactly if this merge is refused.
                if carried & layer._a_params.keys() and layer.rewritable(st.merged):
                    rewritten.append(path)
                    layer.merged_weight(target, out=layer.base_layer.weight.data, checks=checks)
                else:
                    new_weights[path] = layer.merged_weight(target, out=layer.spare(), checks=checks)
            checks.settle()
    except BaseException:
        # The refused results go first (the rollback's fp32 working copies need the room, and a kept exception
        # must not keep them alive); then every rewritten layer is restored, even if one of them fails. The error
        # raised is the first one met: a layer refused outright (tied weights, meta, ...) may be reported instead
        # of another layer's non-finite result, whose verdict was still to be read -- nothing changes either way.
        new_weights.clear()
        checks.clear()
        failed: BaseException | None = None
        for path in rewritten:
            try:
                st.layers[path].merged_weight(st.merged, out=st.layers[path].base_layer.weight.data)
            except BaseException as exc:  # (raised after the others were restored; the refusal is its context)
                failed = failed or exc
        if failed is not None:
            raise failed
        raise
    for path, weight in new_weights.items():
        st.layers[path].set_merged(weight, keep_memory)
    for path in touched:
        st.layers[path].mark_installed(target)
    st.set_merged(target)


def merge(model: nn.Module, spec: AdapterSpec = None, *, replace: bool = False) -> None:
    """Fold adapters into the base weights (zero extra latency). ``None`` merges the active adapters.

    Adds to what is already merged; re-merging an adapter with another weight replaces its weight;
    ``replace=True`` makes ``spec`` the whole merged set (switching the merged adapter in one pass, reusing
    the merged weights' memory, instead of unmerge + merge). Refuses NaN/inf (and tied weights) leaving every
    weight untouched.
    """
    st = state(model)
    _no_open_rows(st, "merge")
    new = normalize(spec) if spec is not None else st.active
    if not new:
        raise MergeError("nothing to merge: no adapter given and none active")
    for n, _ in new:
        st.require(n)
    merged = {} if replace else dict(st.merged)
    merged.update(dict(new))
    with torch.no_grad():
        _apply_merged(st, tuple(merged.items()))


def unmerge(model: nn.Module, names: str | Sequence[str] | None = None, *, keep_memory: bool = True) -> None:
    """Take adapters back out of the weights (all merged ones by default). Restores W0 bit for bit.

    W0 comes back by a pointer swap; the merged weights' memory is kept (CPU only) for the next merge, which
    then writes into it instead of faulting in fresh pages (135M model, 2 threads: 370-900 ms -> 120-135 ms),
    unless something else still uses that memory then (a ``state_dict()`` taken while merged keeps its values).
    That holds one weight-sized buffer per layer that was merged (what merging held anyway);
    ``keep_memory=False`` or ``release_merge_memory(model)`` gives it back. On CUDA the caching allocator
    already reuses freed memory, so nothing is kept there."""
    st = state(model)
    _no_open_rows(st, "unmerge")
    drop = set(dict(normalize(names))) if names is not None else {n for n, _ in st.merged}
    not_merged = drop - {n for n, _ in st.merged}
    if not_merged:
        raise MergeError(f"adapter(s) {sorted(not_merged)} are not merged; merged: {[n for n, _ in st.merged]}")
    with torch.no_grad():
        _apply_merged(st, tuple((n, w) for n, w in st.merged if n not in drop), keep_memory)


def release_merge_memory(model: nn.Module) -> int:
    """Free the merge memory ``unmerge`` kept; returns the bytes released."""
    freed = 0
    for layer in state(model).layers.values():
        spare = layer.spare()
        if spare is not None:
            freed += spare.numel() * spare.element_size()
        layer.drop_spare()
    return freed


def merged(model: nn.Module) -> Weighted:
    return state(model).merged


def merge_and_unload(model: nn.Module, spec: AdapterSpec = None) -> nn.Module:
    """Merge and return the plain model: every wrapper replaced by its base layer, no adapter state left.

    ``spec`` is merged as ``merge`` does it: it adds to what is already merged (an adapter listed again takes
    its new weight); without ``spec``, what is merged stays, or the active adapters are merged when nothing is.
    Live adapters that end up unmerged are dropped, and with them their saved modules: a ``modules_to_save``
    module becomes the copy of the first merged adapter that has one, else the original -- what the merged model
    computes once its unmerged live adapters are removed. A refused merge changes nothing."""
    st = state(model)
    _no_open_rows(st, "merge_and_unload")
    if spec is not None:
        if normalize(spec):  # an empty spec adds nothing (``merge`` would refuse it: nothing to merge)
            merge(model, spec)
    elif not st.merged and st.active:
        merge(model)
    for path, layer in st.layers.items():
        _set_submodule(model, path, layer.base_layer)
    for path, wrapper in st.saved_modules.items():
        copies = wrapper.modules_to_save
        kept = next((copies[n] for n, _ in st.merged if n in copies), wrapper.original_module)
        _set_submodule(model, path, kept)
    del model.__dict__[_STATE_ATTR]
    return model


def undo_attach(model: nn.Module) -> Callable[[str], None]:
    """A function that takes an adapter attached after this call back out, leaving ``model`` as it is now: the
    previous activation comes back, and a model that carried no deltaw state gets its plain modules and its
    requires_grad flags back (the first attach wraps layers and freezes every base parameter).

    Internal (shared by ``deltaw.train`` and ``deltaw.audit``, not part of the public verbs): call it before
    ``attach``, and call what it returns with the adapter's name to roll a failed run back."""
    if model.__dict__.get(_STATE_ATTR) is not None:
        previous = active(model)

        def undo(name: str) -> None:
            delete(model, name)
            activate(model, dict(previous))
    else:
        flags = [(p, p.requires_grad) for p in model.parameters()]

        def undo(name: str) -> None:
            delete(model, name)
            merge_and_unload(model)  # nothing merged or active is left: this only unwraps
            for p, flag in flags:
                p.requires_grad_(flag)
    return undo
