"""The exceptions ckptmap raises.

Every error is a `CkptmapError` and also an instance of the builtin exception that the
OpenMMLab functions raise in the same situation, so existing ``except FileNotFoundError:`` or
``except RuntimeError:`` clauses keep working. Each message says what is wrong and what to do.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckptmap.report import LoadResult, Mismatch

__all__ = [
    "CheckpointIsADirectoryError",
    "CheckpointNotFoundError",
    "CheckpointPermissionError",
    "CkptmapError",
    "InvalidStateDictError",
    "LoadHookError",
    "NoStateDictError",
    "NothingLoadedWarning",
    "PrefixNotFoundError",
    "StateDictMismatchError",
]


class CkptmapError(Exception):
    """Base class of every error raised by ckptmap."""

    # The constructor arguments, so that errors survive pickling (multiprocessing, spawn-based
    # launchers) with their message and attributes intact.
    _init_args: tuple[Any, ...] = ()

    def __reduce__(self) -> str | tuple[Any, ...]:
        if not self._init_args:
            return super().__reduce__()
        return (type(self), self._init_args, self.__dict__ or None)


class _FileError(CkptmapError, OSError):
    """An error about one local path, with a clean message and the `errno` of the OS error."""

    _errno = 0

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        # OSError's own attributes, so `err.filename` / `err.errno` work as for open().
        self.filename = path
        self.errno = self._errno
        self.strerror = message

    def __str__(self) -> str:
        return str(self.args[0])


class CheckpointNotFoundError(_FileError, FileNotFoundError):
    """The checkpoint path does not exist (or is a symlink whose target does not).

    Attributes:
        path: the path as given (after `~` expansion).
    """

    _errno = errno.ENOENT

    def __init__(self, path: str, detail: str | None = None) -> None:
        self._init_args = (path, detail)
        super().__init__(
            path,
            detail
            or (
                f"checkpoint file {path!r} can not be found: check the path, or that the file "
                "was downloaded or copied completely"
            ),
        )


class CheckpointIsADirectoryError(_FileError, IsADirectoryError):
    """The checkpoint path is a directory, not a file."""

    _errno = errno.EISDIR

    def __init__(self, path: str) -> None:
        self._init_args = (path,)
        super().__init__(
            path,
            f"checkpoint path {path!r} is a directory, not a checkpoint file: pass the path of "
            "the file inside it",
        )


class CheckpointPermissionError(_FileError, PermissionError):
    """The checkpoint file exists but cannot be read by this process."""

    _errno = errno.EACCES

    def __init__(self, path: str) -> None:
        self._init_args = (path,)
        super().__init__(
            path,
            f"checkpoint file {path!r} exists but can not be read (permission denied): check "
            "its mode and owner, or copy it somewhere readable",
        )


class NoStateDictError(CkptmapError, RuntimeError):
    """The checkpoint holds no mapping of weights (e.g. a list, a tensor or an int).

    Attributes:
        source: the checkpoint file.
        found_type: the name of the type found instead of a mapping.
    """

    def __init__(self, source: str, found: Any, where: str = "top-level object") -> None:
        type_name = found if isinstance(found, _TypeName) else _TypeName(_type_name(found))
        self._init_args = (source, type_name, where)
        self.source = source
        self.found_type = str(type_name)
        super().__init__(
            f"No state_dict found in checkpoint file {source}: its {where} is a "
            f"{type_name}, expected a mapping of parameter names to tensors (a dict, "
            "optionally under a 'state_dict' or 'model' entry); check that this file is a "
            "model checkpoint"
        )


class InvalidStateDictError(CkptmapError, TypeError):
    """A state dict that is not a mapping, or has a key that is not a str."""


class PrefixNotFoundError(CkptmapError, ValueError, AssertionError):
    """No key of the checkpoint starts with the requested prefix.

    Also an `AssertionError`, which is what the OpenMMLab functions raise here (with `assert`).

    Attributes:
        prefix: the prefix that was asked for (with its trailing dot).
        examples: a few top-level names the checkpoint does have.
    """

    def __init__(self, prefix: str, source: str, examples: Sequence[str]) -> None:
        self._init_args = (prefix, source, list(examples))
        self.prefix = prefix
        self.examples = list(examples)
        shown = ", ".join(repr(e) for e in self.examples) or "none: the state dict is empty"
        super().__init__(
            f"{prefix} is not in the pretrained model {source}: no key starts with "
            f"{prefix!r}. Its top-level names are {shown}; pass one of them as the prefix"
        )


class StateDictMismatchError(CkptmapError, RuntimeError):
    """A strict load found keys that do not match, shape mismatches or other load errors.

    Raised on every rank. The model has been loaded as far as it could be (as torch does).

    Attributes:
        missing: keys the model expects but the state dict lacks (`num_batches_tracked`
            excluded, as in the report).
        unexpected: keys in the state dict that no part of the model takes.
        mismatched: `Mismatch(name, checkpoint_shape, model_shape)` records.
        result: the full `LoadResult`.
    """

    def __init__(self, message: str, result: LoadResult) -> None:
        self._init_args = (message, result)
        super().__init__(message)
        self.result = result
        self.missing: list[str] = list(result.reported_missing_keys)
        self.unexpected: list[str] = list(result.unexpected_keys)
        self.mismatched: list[Mismatch] = list(result.mismatched)


class LoadHookError(CkptmapError, AssertionError):
    """A `register_load_state_dict_post_hook` hook returned a value (torch asserts it won't)."""


class NothingLoadedWarning(UserWarning):
    """No key of a non-empty state dict reached the model (check `revise_keys` or the prefix)."""


class _TypeName(str):
    """A type's name standing in for the object (pickled instead of a possibly huge value)."""


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


# The errors of each subsystem live beside the code that raises them; this module names them
# all, so `from ckptmap.errors import DownloadError` works (resolved on first use, which also
# keeps these modules free of import cycles).
_ELSEWHERE = {
    "DanglingSymlinkError": "ckptmap.formats.errors",
    "CorruptCheckpointError": "ckptmap.formats.errors",
    "TorchScriptArchiveError": "ckptmap.formats.errors",
    "UnsafeCheckpointError": "ckptmap.formats.errors",
    "UnsafeLoadWarning": "ckptmap.formats.errors",
    "InvalidSafetensorsError": "ckptmap.formats.safetensors",
    "UnsupportedDtypeError": "ckptmap.formats.safetensors",
    "TensorNotFoundError": "ckptmap.formats.safetensors",
    "InvalidShardIndexError": "ckptmap.formats.sharded",
    "UnsafeShardPathError": "ckptmap.formats.sharded",
    "AmbiguousIndexError": "ckptmap.formats.sharded",
    "ShardNotFoundError": "ckptmap.formats.sharded",
    "ShardTensorMissingError": "ckptmap.formats.sharded",
    "NotSerializableError": "ckptmap.formats.safetensors_write",
    "DownloadError": "ckptmap.schemes.errors",
    "RemoteNotFoundError": "ckptmap.schemes.errors",
    "RemoteAccessDenied": "ckptmap.schemes.errors",
    "RemoteUnavailableError": "ckptmap.schemes.errors",
    "IncompleteDownloadError": "ckptmap.schemes.errors",
    "ChecksumMismatchError": "ckptmap.schemes.errors",
    "UnexpectedContentError": "ckptmap.schemes.errors",
    "UnsafePathError": "ckptmap.schemes.errors",
    "UnknownSchemeError": "ckptmap.schemes.errors",
    "UnknownModelNameError": "ckptmap.schemes.errors",
    "ZooTableError": "ckptmap.schemes.errors",
    "MissingDependencyError": "ckptmap.schemes.errors",
    "UnsupportedSaveTargetError": "ckptmap.save",
    "CheckpointSaveError": "ckptmap.save",
    "SavePermissionError": "ckptmap.save",
    "IncompleteCheckpointError": "ckptmap.latest",
    "CheckpointPointerWarning": "ckptmap.latest",
}
__all__ += sorted(_ELSEWHERE)


def __getattr__(name: str) -> Any:
    module = _ELSEWHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptmap.errors' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
