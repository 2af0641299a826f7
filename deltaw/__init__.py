"""deltaw: low-rank adapters (LoRA, Hu et al. 2021) for any PyTorch model.

A handful of verbs::

    info = deltaw.attach(model, deltaw.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), name="tech")
    deltaw.activate(model, {"tech": 1.0, "sport": 0.5})   # live stacking, O(1) switch
    with deltaw.disabled(model): ...                       # exactly the base model
    deltaw.merge(model, "tech"); deltaw.unmerge(model)     # bit-exact round trip
    deltaw.save(model, "runs/tech", "tech"); deltaw.load(model, "runs/tech", "tech")   # PEFT format
"""

__version__ = "0.1.0"

from .api import (  # noqa: E402
    activate,
    active,
    adapter_parameters,
    adapters,
    attach,
    count_parameters,
    deactivate,
    delete,
    disabled,
    merge,
    merge_and_unload,
    merged,
    release_merge_memory,
    set_trainable,
    state,
    unmerge,
    using,
)
from .config import LoraConfig  # noqa: E402
from .errors import (  # noqa: E402
    AdapterFormatError,
    AdapterNameError,
    BaseModelMismatchError,
    DeltawError,
    MergeError,
    NonFiniteError,
    RowsOpenError,
    TargetError,
)
from .io import fingerprint, load, read_adapter, save  # noqa: E402

__all__ = [
    "LoraConfig", "attach", "delete", "adapters", "activate", "deactivate", "active", "disabled", "using",
    "merge", "unmerge", "merged", "merge_and_unload", "release_merge_memory", "save", "load", "read_adapter",
    "fingerprint",
    "adapter_parameters", "set_trainable", "count_parameters", "state",
    "DeltawError", "AdapterNameError", "TargetError", "AdapterFormatError", "NonFiniteError",
    "BaseModelMismatchError", "MergeError", "RowsOpenError",
]
