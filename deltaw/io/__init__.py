"""On-disk formats. PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` is the native one."""

from .fingerprints import fingerprint
from .peft import load, read_adapter, save

__all__ = ["fingerprint", "load", "read_adapter", "save"]
