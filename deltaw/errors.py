"""Exceptions deltaw raises. Each message names the adapter, the module and the shapes involved, and what to do."""

from __future__ import annotations


class DeltawError(Exception):
    """Base class: catch this to handle any deltaw failure."""


class AdapterNameError(DeltawError, ValueError):
    """An adapter name is unknown, already taken, or unsafe (not a plain identifier)."""


class TargetError(DeltawError, ValueError):
    """No module matched the targets, a target is of an unsupported type, or a rank does not fit it."""


class AdapterFormatError(DeltawError, ValueError):
    """An adapter file or config is corrupt, truncated, of an unknown format, or holds bad keys/shapes."""


class NonFiniteError(DeltawError, ValueError):
    """Adapter weights or a merged weight contain NaN or inf."""


class BaseModelMismatchError(DeltawError, ValueError):
    """The adapter was trained on another base model (fingerprint mismatch)."""


class MergeError(DeltawError, RuntimeError):
    """A merge/unmerge request is inconsistent with the current merge state."""


class RowsOpenError(DeltawError, RuntimeError):
    """Adapter state was to change (attach, delete, merge, ...) while a ``per_row`` batch is open on the model."""
