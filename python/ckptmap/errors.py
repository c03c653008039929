"""Every exception and warning ckptmap raises, in one place.

Each error is a `CkptmapError` and also an instance of the builtin exception that the
OpenMMLab functions (or `torch.load`) raise in the same situation, so existing
``except FileNotFoundError:`` or ``except RuntimeError:`` clauses keep working. Each message
says what is wrong and what to do.

Errors pickle with their message and attributes (one mechanism, `CkptmapError.__reduce__`), so
an error raised on rank 0 or in a worker process can be re-raised elsewhere intact.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ckptmap.redact import redact_text, redact_url

if TYPE_CHECKING:
    from ckptmap.report import LoadResult, Mismatch


__all__ = [
    "AmbiguousIndexError",
    "BackendArgsError",
    "BacktrackingRuleError",
    "CheckpointIsADirectoryError",
    "CheckpointNotFoundError",
    "CheckpointPermissionError",
    "CheckpointPointerWarning",
    "CheckpointSaveError",
    "ChecksumMismatchError",
    "CkptmapError",
    "ConvertError",
    "CorruptCheckpointError",
    "DanglingSymlinkError",
    "DownloadError",
    "IncompleteCheckpointError",
    "IncompleteDownloadError",
    "InvalidDcpCheckpointError",
    "InvalidKeyRuleError",
    "InvalidResponseError",
    "InvalidSafetensorsError",
    "InvalidShardIndexError",
    "InvalidStateDictError",
    "InvalidTorchZipError",
    "InvalidURIError",
    "KeyNotUnicodeError",
    "LoadHookError",
    "ManifestMismatchError",
    "MapLocationError",
    "MissingDependencyError",
    "MissingManifestError",
    "ModelSpecError",
    "ModelWrapperError",
    "NoStateDictError",
    "NotARegularFileError",
    "NotSerializableError",
    "NothingLoadedWarning",
    "PrefixNotFoundError",
    "RefusedPickleError",
    "RemoteAccessDenied",
    "RemoteChangedError",
    "RemoteNotFoundError",
    "RemoteUnavailableError",
    "SaveArgumentError",
    "SaveArgumentTypeError",
    "SavePermissionError",
    "SaveTargetIsADirectoryError",
    "SaveUnavailableError",
    "SchemeAlreadyRegisteredError",
    "SchemeRegistrationError",
    "ShardNotFoundError",
    "ShardTensorMissingError",
    "StateDictHookError",
    "StateDictMismatchError",
    "SuggestionCheckError",
    "TensorNotFoundError",
    "TorchScriptArchiveError",
    "UnexpectedContentError",
    "UnknownModelNameError",
    "UnknownSchemeError",
    "UnsafeAllowlistError",
    "UnsafeCheckpointError",
    "UnsafeDcpPathError",
    "UnsafeDcpPickleError",
    "UnsafeLoadWarning",
    "UnsafePathError",
    "UnsafeRedirectError",
    "UnsafeShardPathError",
    "UnsupportedBackendError",
    "UnsupportedDcpFeatureError",
    "UnsupportedDtypeError",
    "UnsupportedModelError",
    "UnsupportedSaveTargetError",
    "WrongSchemeError",
    "ZipDirectoryError",
    "ZooTableError",
]


def _restore(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    err = cls.__new__(cls)
    err.args = args
    for key, value in state.items():
        setattr(err, key, value)
    return err


class CkptmapError(Exception):
    """Base class of every error raised by ckptmap."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt without calling __init__ (whose signature differs per class): the message,
        # the instance attributes and, for OSErrors, errno / strerror / filename.
        state = dict(self.__dict__)
        if isinstance(self, OSError):
            state.update(errno=self.errno, strerror=self.strerror, filename=self.filename)
        return (_restore, (type(self), self.args, state))

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class _Detailed(CkptmapError):
    """A message plus keyword attributes (the remote-store errors are built this way).

    Passwords and presigned-URL signatures in the message and in the `url` / `filename`
    attributes are masked (`ckptmap.redact`): these errors quote URLs.
    """

    def __init__(self, message: str, **attrs: Any) -> None:
        super().__init__(redact_text(message))
        for key, value in attrs.items():
            if key in ("url", "filename") and isinstance(value, str):
                value = redact_url(value)
            setattr(self, key, value)


# --- local files and loading ------------------------------------------------------------------


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


class CheckpointNotFoundError(_FileError, FileNotFoundError):
    """The checkpoint path does not exist (or is a symlink whose target does not).

    Attributes:
        path: the path as given (after `~` expansion).
    """

    _errno = errno.ENOENT

    def __init__(self, path: str, detail: str | None = None) -> None:
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
        super().__init__(
            path,
            f"checkpoint path {path!r} is a directory, not a checkpoint file: pass the path of "
            "the file inside it",
        )


class CheckpointPermissionError(_FileError, PermissionError):
    """The checkpoint file exists but cannot be read by this process."""

    _errno = errno.EACCES

    def __init__(self, path: str) -> None:
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
        self.prefix = prefix
        self.examples = list(examples)
        shown = ", ".join(repr(e) for e in self.examples) or "none: the state dict is empty"
        super().__init__(
            f"{prefix} is not in the pretrained model {source}: no key starts with "
            f"{prefix!r}. Its top-level names are {shown}; pass one of them as the prefix"
        )


class SuggestionCheckError(CkptmapError, RuntimeError):
    """Suggested key rules that do not do what the inference meant (a bug: please report it)."""


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
        super().__init__(message)
        self.result = result
        self.missing: list[str] = list(result.reported_missing_keys)
        self.unexpected: list[str] = list(result.unexpected_keys)
        self.mismatched: list[Mismatch] = list(result.mismatched)


class ModelWrapperError(CkptmapError, AttributeError):
    """A registered model wrapper whose instance has no ``.module`` to load into or save from.

    An `AttributeError`, as mmengine raises when it reaches for ``.module``.

    Attributes:
        wrapper: the wrapper class's name.
    """

    def __init__(self, wrapper: type) -> None:
        self.wrapper = f"{wrapper.__module__}.{wrapper.__qualname__}"
        super().__init__(
            f"{self.wrapper} is registered as a model wrapper (ckptmap.register_model_wrapper, "
            "or mmengine's MODEL_WRAPPERS) but this instance has no .module attribute: set "
            "self.module to the wrapped model in its __init__, or do not register the class"
        )


class UnsupportedModelError(CkptmapError, TypeError):
    """A model ckptmap can not load into or save from this way (e.g. a sharded FSDP model).

    Attributes:
        model: the model's class name.
        hint: what to do instead.
    """

    def __init__(self, model: str, what: str, hint: str) -> None:
        self.model = model
        self.hint = hint
        super().__init__(f"{what} a {model}: {hint}")


class LoadHookError(CkptmapError, AssertionError):
    """A `register_load_state_dict_post_hook` hook returned a value (torch asserts it won't)."""


class NothingLoadedWarning(UserWarning):
    """No key of a non-empty state dict reached the model (check `revise_keys` or the prefix)."""


def _torch_version() -> str:
    # The error is raised by code that has imported torch; this module itself does not need it.
    return str(getattr(sys.modules.get("torch"), "__version__", "(unknown version)"))


class _TypeName(str):
    """A type's name standing in for the object (pickled instead of a possibly huge value)."""


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


# --- checkpoint formats -----------------------------------------------------------------------


#: Starts the reason of every refusal by ckptmap's checked stand-ins for numpy, mmengine and
#: getattr (`ckptmap.formats.allowlist`): a pickle that no real writer produces.
REFUSAL_MARK = "ckptmap's safe unpickler refused"


class DanglingSymlinkError(CheckpointNotFoundError):
    """The checkpoint path is a symlink whose target does not exist.

    Attributes:
        path: the path as given.
        target: what the link points to.
    """

    def __init__(self, path: str, target: str) -> None:
        super().__init__(
            path,
            f"checkpoint path {path!r} is a symlink to {target!r}, which does not exist: fix "
            "or remove the link, or fetch the file it points to",
        )
        self.target = target


class CorruptCheckpointError(CkptmapError, RuntimeError):
    """The file is empty, truncated, damaged or not a checkpoint at all.

    A `RuntimeError`, as `torch.load` raises for a damaged zip archive.

    Attributes:
        path: the file.
        size: its size in bytes.
        looks_like: what the content looks like (e.g. "an HTML page", "empty").
    """

    def __init__(self, path: str, size: int, looks_like: str, hint: str | None = None) -> None:
        self.path = path
        self.size = size
        self.looks_like = looks_like
        hint = hint or (
            "re-download or re-copy it (if it came from a download cache, delete that cache "
            "entry so the next run fetches it again)"
        )
        super().__init__(
            f"checkpoint file {path!r} ({size:,} bytes) is corrupt or truncated: it looks like "
            f"{looks_like}. {hint[0].upper()}{hint[1:]}"
        )


class NotARegularFileError(_FileError, CorruptCheckpointError):
    """The path is a FIFO, a socket or a device (or a symlink to one), not a regular file.

    Raised from a ``stat`` before anything is opened, so such a path can never block a load
    or feed it bytes forever. An `OSError` (as for other path problems) and, as before, a
    `CorruptCheckpointError` (a `RuntimeError`).

    Attributes:
        path: the path as given.
        kind: what it is ("a FIFO (named pipe)", "a socket", "a character device", ...).
    """

    _errno = errno.EINVAL

    def __init__(
        self, path: str, kind: str, what: str = "checkpoint path", named_by: str | None = None
    ) -> None:
        where = f" (named by {named_by!r})" if named_by else ""
        message = (
            f"{what} {path!r}{where} is {kind}, not a regular file: reading it could block or "
            "never end, so it was not opened. Pass the path of a checkpoint file (copy the "
            "data into a regular file first)"
        )
        # Not super(): CorruptCheckpointError.__init__ takes other arguments.
        OSError.__init__(self, message)
        self.path = path
        self.filename = path
        self.errno = self._errno
        self.strerror = message
        self.size = 0
        self.kind = kind
        self.looks_like = f"{kind}, not a regular file"


class TorchScriptArchiveError(CkptmapError, RuntimeError):
    """The file is a TorchScript archive (`torch.jit.save`), not a `torch.save` checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"{path!r} is a TorchScript archive, not a checkpoint: load it with "
            "torch.jit.load (it holds a compiled module, not a state dict); to use its weights "
            "here, save `torch.jit.load(path).state_dict()` with torch.save"
        )


#: Where a load was asked from, which decides how advice names the opt-in.
Interface = str  # "api", "cli" or "mmengine"


def _python_names(globals_: Sequence[str]) -> str:
    return ", ".join(globals_)


def _opt_in(globals_: Sequence[str], interface: Interface) -> str:
    names = _python_names(globals_)
    if interface == "cli":
        flags = " ".join(f"--allow {g}" for g in globals_)
        return f"If you trust the file, allow exactly these with `{flags}`"
    if interface == "mmengine":
        return (
            "If you trust the file, allow exactly these objects (the classes or functions "
            "themselves, never their names) with "
            f"`ckptmap.integrations.mmengine.patch(allowed_globals=[{names}])`"
        )
    return (
        "If you trust the file, pass exactly these objects (the classes or functions "
        f"themselves, never their names) as `allowed_globals=[{names}]`"
    )


def _last_resort(interface: Interface) -> str:
    if interface == "cli":
        return (
            "the command line never unpickles without restrictions: if you trust the file, load "
            "it in Python with `ckptmap.load_file(path, weights_only=False)` and save it again "
            "with `ckptmap.save_checkpoint`"
        )
    return (
        "if you trust the file, `ckptmap.load_file(path, weights_only=False)` unpickles it "
        "without restrictions; save it again with `ckptmap.save_checkpoint` to load it safely "
        "from then on"
    )


class UnsafeCheckpointError(CkptmapError, pickle.UnpicklingError):
    """A pickle checkpoint needs globals that the safe (``weights_only=True``) loader refuses.

    An `pickle.UnpicklingError`, as `torch.load(weights_only=True)` raises. Nothing in the file
    was executed beyond the allowlisted, data-only constructors; the file is never retried with
    ``weights_only=False``. The advice names the opt-in where the load was asked from: the
    ``allowed_globals=`` argument in Python, ``--allow`` on the command line, ``patch(
    allowed_globals=...)`` under the mmengine integration (see `with_advice_for`).

    Attributes:
        path: the file.
        globals: every ``module.name`` the pickle references that is not allowed, sorted.
        dangerous: the subset that can run arbitrary code (``os.system``, ``builtins.eval``, ...).
        reason: why the safe unpickler stopped, when no global explains it.
        interface: ``"api"``, ``"cli"`` or ``"mmengine"``: whose opt-in the advice names.
    """

    def __init__(
        self,
        path: str,
        globals: Sequence[str],
        dangerous: Sequence[str] = (),
        reason: str | None = None,
        interface: Interface = "api",
    ) -> None:
        self.path = path
        self.globals = sorted(globals)
        self.dangerous = sorted(dangerous)
        self.reason = reason
        self.interface = interface
        if self.dangerous:
            message = (
                f"refusing to load {path!r}: its pickle calls {', '.join(self.dangerous)}, which "
                "can run arbitrary code. This is what a malicious checkpoint looks like; nothing "
                "from it was executed. Do not load it unless you wrote it yourself"
            )
            if benign := [g for g in self.globals if g not in self.dangerous]:
                message += f" (it also needs {', '.join(benign)})"
        elif self.globals:
            message = (
                f"{path!r} is a pickle that needs globals the safe loader does not allow: "
                f"{', '.join(self.globals)}. {_opt_in(self.globals, interface)}; "
                f"{_last_resort(interface)}"
            )
        elif reason and REFUSAL_MARK in reason:
            message = (
                f"refusing to load {path!r}: {reason}. No torch, numpy or mmengine writer "
                "produces this, and nothing from the file was executed: do not load it unless "
                "you wrote it yourself"
            )
        else:
            message = (
                f"{path!r} can not be loaded safely: {reason}. "
                f"{_last_resort(interface)[0].upper()}{_last_resort(interface)[1:]}"
            )
        super().__init__(message)

    def with_advice_for(self, interface: Interface) -> UnsafeCheckpointError:
        """The same error, its advice naming the opt-in of `interface` (``"api"``, ``"cli"``,
        ``"mmengine"``)."""
        if interface == self.interface:
            return self
        return UnsafeCheckpointError(
            self.path, self.globals, self.dangerous, self.reason, interface=interface
        )


class RefusedPickleError(CkptmapError, pickle.UnpicklingError):
    """Raised inside the safe unpickler by ckptmap's checked stand-ins for numpy, mmengine and
    getattr when a pickle uses them in a way no real writer does.

    Loads report it as `UnsafeCheckpointError` (naming the file); this class is what the
    stand-ins raise mid-load, before the file name is known.
    """

    def __init__(self, what: str) -> None:
        super().__init__(f"{REFUSAL_MARK} {what}")


class UnsafeAllowlistError(CkptmapError, ValueError):
    """An ``allowed_globals`` entry that would let a pickle run code, or that is not an object.

    Raised before any file is read, even for entries passed explicitly: ``eval``, ``exec``,
    ``compile``, ``getattr``, ``os.*``, ``subprocess.*``, ``importlib.*``, ``functools.*``,
    ``operator.*``, bound methods and the like can never be allowed (a file that needs them can
    only be loaded with ``weights_only=False``). Names (strings) are refused too: the allowlist
    holds the objects themselves, so a pickle can never make ckptmap import anything.

    Attributes:
        entry: the entry as given.
        name: its ``module.name``.
        why: what is wrong with it.
    """

    def __init__(self, entry: Any, name: str, why: str) -> None:
        self.entry = _TypeName(repr(entry)[:200])
        self.name = name
        self.why = why
        super().__init__(f"allowed_globals can not include {name}: {why}")


class UnsafeDcpPickleError(UnsafeCheckpointError):
    """A DCP ``.metadata`` or object entry whose pickle needs globals outside the allowlist.

    DCP pickles are only ever read by a restricted unpickler (``weights_only=False`` does not
    change that), so the only opt-in is ``allowed_globals``.

    Attributes:
        path: the checkpoint directory.
        entry: ``".metadata"``, or the name of the object entry.
        globals, dangerous, reason: as for `UnsafeCheckpointError`.
    """

    def __init__(
        self,
        path: str,
        entry: str,
        globals: Sequence[str],
        dangerous: Sequence[str] = (),
        reason: str | None = None,
    ) -> None:
        super().__init__(path, globals, dangerous, reason)
        self.entry = entry
        what = (
            "its .metadata" if entry == ".metadata" else f"its object entry {entry!r}"
        ) + f" of torch.distributed.checkpoint directory {path!r}"
        if self.dangerous:
            message = (
                f"refusing to load {what}: its pickle calls {', '.join(self.dangerous)}, which "
                "can run arbitrary code. This is what a malicious checkpoint looks like; nothing "
                "from it was executed"
            )
        elif self.globals:
            message = (
                f"refusing to load {what}: its pickle needs {', '.join(self.globals)}, which the "
                "safe unpickler does not allow. If you trust the file, pass exactly these "
                "objects (the classes or functions themselves) as allowed_globals=[...]"
            )
        else:
            message = f"refusing to load {what}: {reason}"
        self.args = (message + "; DCP pickles are never unpickled without restrictions",)


class UnsafeLoadWarning(UserWarning):
    """A checkpoint is being unpickled without restrictions (``weights_only=False``)."""


_GENERIC_HINT = (
    "re-download or re-copy it (if it came from a download cache, delete that cache entry so "
    "the next run fetches it again); if your own code wrote it, save it again with "
    "safetensors.torch.save_file"
)
# What to do, for the header faults where the generic advice is not the best one.
_SAFETENSORS_HINTS = {
    "duplicate_name": (
        "the program that wrote it is broken: save the weights again with "
        "safetensors.torch.save_file (ckptmap does not guess which of the repeated tensors "
        "is meant)"
    ),
    "unknown_dtype": (
        "it was written by a newer or non-standard safetensors writer: convert it to a "
        "dtype listed above, or save it again with safetensors.torch.save_file"
    ),
}


class ZipDirectoryError(CkptmapError, ValueError):
    """A zip archive's end records or central directory are missing or inconsistent.

    Raised by `ckptmap.zipdir.read_zip_directory`; the loaders turn it into a
    `CorruptCheckpointError` naming the file.
    """


class InvalidSafetensorsError(CorruptCheckpointError, ValueError):
    """A safetensors file whose header fails validation.

    Also a `ValueError` (what a bad header is to a parser) besides the `RuntimeError` of
    `CorruptCheckpointError`.

    Attributes:
        path: the file.
        size: its size in bytes.
        kind: which check failed (``"header_too_large"``, ``"duplicate_name"``, ``"overlap"``,
            ... as `ckptmap._core.SafetensorsHeaderError.kind`).
        detail: the specifics (names, offsets, sizes).
    """

    def __init__(self, path: str, size: int, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(
            path,
            size,
            f"a damaged safetensors file ({kind.replace('_', ' ')}: {detail})",
            _SAFETENSORS_HINTS.get(kind, _GENERIC_HINT),
        )


_TORCH_ZIP_HINT = (
    "re-download or re-copy it (if it came from a download cache, delete that cache entry so "
    "the next run fetches it again); if your own code wrote it, save it again with torch.save"
)
# What to do, for the torch zip faults where the generic advice is not the best one.
_TORCH_ZIP_HINTS = {
    "compressed_member": (
        "it was re-packed by a zip tool after torch.save wrote it; extract it and load the "
        "original, or re-save it with torch.save (which stores members uncompressed)"
    ),
    "encrypted_member": "decrypt it first: torch checkpoints are never encrypted",
    "file_changed": (
        "something rewrote the file while it was being loaded: make sure writers replace "
        "checkpoints atomically (write a temporary file, then rename it), then retry"
    ),
}


class InvalidTorchZipError(CorruptCheckpointError, ValueError):
    """A torch zip checkpoint that fails the Rust reader's validation (the archive, a storage
    record or a tensor).

    Also a `ValueError` besides the `RuntimeError` of `CorruptCheckpointError`.

    Attributes:
        path: the file.
        size: its size in bytes.
        kind: which check failed (``"storage_size_mismatch"``, ``"tensor_out_of_bounds"``,
            ``"duplicate_member"``, ``"no_end_record"``, ... as
            `ckptmap._core.PthFormatError.kind`).
        detail: the specifics (names, offsets, sizes).
    """

    def __init__(self, path: str, size: int, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(
            path,
            size,
            f"a damaged torch zip checkpoint ({kind.replace('_', ' ')}: {detail})",
            _TORCH_ZIP_HINTS.get(kind, _TORCH_ZIP_HINT),
        )


class UnsupportedDtypeError(CkptmapError, TypeError):
    """A tensor whose safetensors dtype has no torch equivalent in this torch version.

    Attributes:
        path: the file.
        name: the tensor.
        dtype: its dtype as the header spells it (``"F4"``).
    """

    def __init__(self, path: str, name: str, dtype: str) -> None:
        self.path = path
        self.name = name
        self.dtype = dtype
        super().__init__(
            f"tensor {name!r} in {path!r} has dtype {dtype}, which torch {_torch_version()} "
            "can not hold: leave it out of the load (e.g. with a prefix or a key filter), "
            "convert the file with a tool that unpacks it, or upgrade torch"
        )


class TensorNotFoundError(CkptmapError, KeyError):
    """A tensor name that the checkpoint does not have.

    A `KeyError`, so `Mapping.get` and ``except KeyError`` work as for a dict.

    Attributes:
        path: the file.
        name: the name that was asked for.
    """

    def __init__(self, path: str, name: str, detail: str | None = None) -> None:
        self.path = path
        self.name = name
        super().__init__(
            detail
            or f"{path!r} has no tensor named {name!r}: check the name (its `keys()` lists them)"
        )


class InvalidShardIndexError(CkptmapError, ValueError):
    """An ``*.index.json`` that is not a valid shard index.

    Attributes:
        path: the index file.
        reason: what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"shard index {path!r} is not usable: {reason}. A shard index is a JSON object "
            'whose "weight_map" maps each tensor name to the file holding it; re-download the '
            "index together with its shards"
        )


class UnsafeShardPathError(InvalidShardIndexError):
    """A shard name in the index that could point outside the index's directory.

    Raised before any shard is opened.

    Attributes:
        shard: the rejected name, as the index gives it.
    """

    def __init__(self, path: str, shard: object, reason: str) -> None:
        self.shard = shard
        super().__init__(
            path,
            f"it names the shard {shard!r}, which {reason}; shard names must be plain file "
            "names (or relative paths) inside the index's directory. Do not load a "
            "checkpoint whose index was tampered with",
        )


class AmbiguousIndexError(CkptmapError, ValueError):
    """A directory with several ``*.index.json`` files and no way to choose.

    Attributes:
        path: the directory.
        indexes: the index file names found.
    """

    def __init__(self, path: str, indexes: list[str]) -> None:
        self.path = path
        self.indexes = indexes
        super().__init__(
            f"directory {path!r} holds several shard indexes ({', '.join(indexes)}): pass the "
            "path of the one to load"
        )


class ShardNotFoundError(CheckpointNotFoundError):
    """Shards that the index names but that do not exist.

    Attributes:
        path: the first missing shard's path.
        index: the index file.
        missing: every missing shard, as the index names them.
    """

    def __init__(self, index: str, directory: str, missing: list[str]) -> None:
        self.index = index
        self.missing = missing
        shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        super().__init__(
            os.path.join(directory, missing[0]),
            f"shard index {index!r} names {len(missing)} shard file(s) missing from "
            f"{directory!r}: {shown}. Download or copy every shard next to the index",
        )


class ShardTensorMissingError(TensorNotFoundError):
    """A tensor the index places in a shard that does not have it.

    Attributes:
        path: the shard.
        name: the tensor.
        index: the index file.
    """

    def __init__(self, index: str, shard: str, name: str) -> None:
        self.index = index
        super().__init__(
            shard,
            name,
            f"shard index {index!r} places tensor {name!r} in {shard!r}, but that shard has no "
            "such tensor: the index and its shards do not belong together. Re-download the "
            "index and all its shards from the same revision",
        )


class InvalidDcpCheckpointError(CorruptCheckpointError, ValueError):
    """A torch.distributed.checkpoint directory whose metadata or data fail validation.

    A `CorruptCheckpointError` (so a `RuntimeError`) and a `ValueError`.

    Attributes:
        path: the checkpoint directory.
        reason: what is wrong (names the entry, data file and byte range where it applies).
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.size = 0
        self.looks_like = f"a damaged torch.distributed.checkpoint directory ({reason})"
        self.reason = reason
        # Not CorruptCheckpointError's wording ("checkpoint file ... bytes"): a directory.
        CkptmapError.__init__(
            self,
            f"torch.distributed.checkpoint directory {path!r} is not usable: {reason}. Copy "
            "the whole directory again (its .metadata and every __*.distcp file, from one "
            "save), or save the checkpoint again",
        )


class UnsafeDcpPathError(InvalidDcpCheckpointError):
    """A data file name in a DCP ``.metadata`` that could point outside its directory.

    Raised before any data file is opened.

    Attributes:
        name: the rejected file name, as the metadata gives it.
    """

    def __init__(self, path: str, name: object, reason: str) -> None:
        self.name = name
        super().__init__(
            path,
            f"its metadata names the data file {name!r}, which {reason.removeprefix('it ')}; "
            "DCP data files are plain names inside the checkpoint directory. Do not load a "
            "checkpoint whose metadata was tampered with",
        )


class UnsupportedDcpFeatureError(CkptmapError, ValueError):
    """A DCP checkpoint that uses something ckptmap does not read (e.g. compressed entries).

    Attributes:
        path: the checkpoint directory.
        feature: what it uses.
    """

    def __init__(self, path: str, feature: str) -> None:
        self.path = path
        self.feature = feature
        super().__init__(
            f"torch.distributed.checkpoint directory {path!r} can not be read by ckptmap: "
            f"{feature}. Load it with torch.distributed.checkpoint.load, or save it again "
            "with DCP's default FileSystemWriter"
        )


# --- remote stores, the download cache and model zoos -----------------------------------------


class DownloadError(_Detailed, OSError):
    """A remote checkpoint could not be fetched; nothing was added to the cache.

    Attributes:
        url: the URL or URI that was asked for (also in `filename`, as for other OSErrors).
        status: the HTTP status when the server sent one, else None.
    """

    def __init__(self, message: str, *, url: str = "", status: int | None = None, **attrs: Any):
        super().__init__(message, url=url, status=status, **attrs)
        # Set so that `atomic_write` keeps this error as it is instead of re-wrapping it.
        self.filename = self.url or None


class RemoteNotFoundError(DownloadError, FileNotFoundError):
    """The server has no such file (HTTP 404/410, S3 NoSuchKey or NoSuchBucket)."""


class RemoteAccessDenied(DownloadError, PermissionError):
    """The server refused access (HTTP 401/403, S3 AccessDenied, missing credentials)."""


class RemoteUnavailableError(DownloadError, ConnectionError):
    """The server kept failing (5xx, 429, refused or timed-out connections) or can't be reached."""


class IncompleteDownloadError(DownloadError):
    """The body ended before the length the server announced (or the connection dropped).

    Attributes:
        received: bytes received.
        expected: bytes announced (Content-Length), or None when unknown.
    """


class RemoteChangedError(DownloadError):
    """The remote file changed between the requests that read it by byte range (another ETag,
    Last-Modified or size than the first answer, or a failed If-Match); nothing read from it
    is used.

    Attributes:
        what: what differed (``"ETag"``, ``"Last-Modified"``, ``"size"``, ``"If-Match"``).
    """


class ChecksumMismatchError(DownloadError, RuntimeError):
    """The SHA-256 of the downloaded bytes does not match the expected one.

    Attributes:
        expected: the expected hex digest (or prefix of one).
        actual: the full hex digest of what arrived.
    """


class InvalidResponseError(DownloadError, ValueError):
    """The server's answer can not be trusted as it is (e.g. a malformed or contradictory
    Content-Length); nothing was cached."""


class UnsafeRedirectError(DownloadError, PermissionError):
    """A redirect was refused: from https to plain http, or to a scheme other than http(s).

    Attributes:
        location: where the server redirected to (secrets masked).
    """


class UnexpectedContentError(DownloadError, ValueError):
    """The body is not a checkpoint (an HTML page, a JSON error, ...).

    Attributes:
        head: the first bytes that arrived.
    """


class ManifestMismatchError(CorruptCheckpointError):
    """A file does not match the SHA-256 recorded in its ``<file>.sha256`` manifest.

    Attributes:
        path: the file.
        manifest: the manifest.
        expected: the digest the manifest records.
        actual: the file's digest now.
    """

    def __init__(self, path: str, size: int, manifest: str, expected: str, actual: str) -> None:
        self.manifest = manifest
        self.expected = expected
        self.actual = actual
        super().__init__(
            path,
            size,
            f"a file whose SHA-256 is {actual}, not the {expected} that {manifest!r} records",
            "it was changed or damaged after it was written: copy or download it again (or, "
            "if you changed it on purpose, write a new manifest with "
            "ckptmap.checksum.write_manifest)",
        )


class MissingManifestError(CheckpointNotFoundError):
    """A checksum was required (``CKPTMAP_CHECKSUM=require``) but the file has no manifest.

    Attributes:
        path: the checkpoint.
        manifest: the manifest path that was looked for.
    """

    def __init__(self, path: str, manifest: str) -> None:
        self.manifest = manifest
        super().__init__(
            manifest,
            f"checkpoint {path!r} has no SHA-256 manifest {manifest!r}, and "
            "CKPTMAP_CHECKSUM=require asks for one: save it with save_checkpoint(..., "
            "checksum=True), write one with ckptmap.checksum.write_manifest, or unset "
            "CKPTMAP_CHECKSUM",
        )


class MapLocationError(CkptmapError, TypeError):
    """A `map_location` callable raised, or returned something that is not a storage.

    Attributes:
        path: the checkpoint being loaded.
    """

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        super().__init__(
            f"map_location {detail} while loading {path!r}: a map_location callable is called "
            "as fn(storage, location) and must return a storage (e.g. storage.cuda(0)) or None "
            "to keep it where it is, as for torch.load"
        )


class UnsafePathError(_Detailed, ValueError):
    """An untrusted name would leave the directory it is joined onto.

    Attributes:
        name: the rejected name.
        root: the directory it was to be joined onto.
        reason: why it was rejected (e.g. "it has a '..' path component").
    """


class SchemeAlreadyRegisteredError(_Detailed, KeyError):
    """`CheckpointLoader.register_scheme` for a prefix that has a loader (without ``force``).

    Attributes:
        prefix: the prefix.
    """


class SchemeRegistrationError(_Detailed, TypeError, AssertionError):
    """`CheckpointLoader.register_scheme` with prefixes or a loader of the wrong type.

    A `TypeError`, and the `AssertionError` the OpenMMLab registry raises (with `assert`).
    """


class UnknownSchemeError(_Detailed, ValueError):
    """No registered loader handles the URI's scheme.

    Attributes:
        filename: the URI.
        schemes: the registered prefixes.
    """


class UnknownModelNameError(_Detailed, KeyError):
    """A model-zoo name is not in any of the name tables.

    Attributes:
        name: the name that was asked for.
        suggestions: close matches, best first.
        sources: the tables that were consulted.
    """

    def __init__(
        self,
        message: str,
        *,
        name: str = "",
        suggestions: Sequence[str] = (),
        sources: Sequence[str] = (),
    ) -> None:
        super().__init__(message, name=name, suggestions=list(suggestions), sources=list(sources))


class ZooTableError(_Detailed, ValueError):
    """A model-zoo JSON table is not an object mapping names to strings.

    Attributes:
        path: the file.
    """


class MissingDependencyError(_Detailed, ImportError):
    """An optional package needed for this URI (torchvision, boto3, petrel, pavi) is missing."""


class NotSerializableError(CkptmapError, TypeError):
    """A value of the checkpoint can not be stored in the requested format.

    Attributes:
        key: where the value sits in the checkpoint (e.g. ``state_dict['fc.weight']``).
        format: the target format (``"safetensors"``, ``"JSON metadata"``, ...).
    """

    def __init__(self, key: str, fmt: str, reason: str, hint: str) -> None:
        self.key = key
        self.format = fmt
        super().__init__(f"{key} can not be stored as {fmt}: {reason}; {hint}")


class UnsupportedSaveTargetError(CkptmapError, ValueError):
    """The target names a scheme that ckptmap can not write to (``pavi://``, ``http://``...)."""


class CheckpointSaveError(CkptmapError, OSError):
    """Writing the checkpoint failed for a reason other than a local I/O error (e.g. S3)."""


class SaveUnavailableError(CheckpointSaveError, ConnectionError):
    """The object store to save to can not be reached or keeps failing (names the endpoint)."""


class SavePermissionError(CkptmapError, PermissionError):
    """The target exists but this process may not write to it (e.g. S3 AccessDenied)."""


class SaveTargetIsADirectoryError(_FileError, IsADirectoryError):
    """The save target names a directory (``work_dir/`` or an existing directory).

    Raised before anything is serialised.
    """

    _errno = errno.EISDIR

    def __init__(self, path: str) -> None:
        super().__init__(
            path,
            f"can not save to {path!r}: it names a directory; add the checkpoint's file name "
            "(e.g. epoch_1.pth)",
        )


class SaveArgumentError(CkptmapError, ValueError):
    """An argument of `save_checkpoint` (or `rotate_checkpoints`) that can not work (a bad
    size, clashing options, ``keep_last=0``...).

    A `ValueError`, as the OpenMMLab functions raise for these.
    """


class SaveArgumentTypeError(CkptmapError, TypeError):
    """An argument of `save_checkpoint` of the wrong type or form (``meta`` not a dict...).

    A `TypeError`, as the OpenMMLab functions (and Python's own argument binding) raise.
    """


class StateDictHookError(CkptmapError, RuntimeError):
    """A public state-dict post-hook returned a value (torch raises a RuntimeError for this)."""


class UnsupportedBackendError(_Detailed, ValueError):
    """A storage backend that ckptmap can not use for this path or URI.

    ``{'backend': 'local'}`` for an ``s3://`` URI, ``'petrel'`` for a local path, a backend
    name ckptmap does not know (``'memcached'``, ``'lmdb'``...), or a bad
    ``$CKPTMAP_S3_BACKEND``. Never silently replaced by another backend.

    Attributes:
        backend: the backend asked for.
        target: the path or URI.
        supported: the backends that work for this target.
    """


class BackendArgsError(_Detailed, TypeError):
    """``backend_args`` / ``file_client_args`` entries that the chosen backend does not take.

    A `TypeError`, as constructing the backend with them would raise in mmengine.

    Attributes:
        backend: the chosen backend.
        unknown: the entries it does not take.
        accepted: the entries it does take.
    """


class InvalidURIError(_Detailed, ValueError):
    """A URI of a known scheme that does not name an object (``s3://bucket`` without a key).

    Attributes:
        uri: the URI.
    """


class WrongSchemeError(_Detailed, ValueError, AssertionError):
    """A scheme's loader called with a path of another scheme (``load_from_pavi('x.pth')``).

    Also an `AssertionError`, which is what the OpenMMLab loaders raise here (with `assert`).

    Attributes:
        filename: the path given.
        scheme: the scheme the loader takes (``"pavi://"``).
    """


class CheckpointPointerWarning(UserWarning):
    """`last_checkpoint` names a missing, unreadable or incomplete file; another was chosen."""


class IncompleteCheckpointError(CkptmapError, ValueError):
    """A checkpoint file exists but is cut short or is not a checkpoint (e.g. a killed write)."""


# --- key rules --------------------------------------------------------------------------------


class BacktrackingRuleError(CkptmapError, ValueError):
    """A key rule that has to run on Python's `re` (a callable replacement, a backreference,
    a lookaround, ...) has a shape on which `re` can backtrack exponentially, and so hang on
    one unlucky key: a repeat of something that ends in a repeat of what it starts with
    (`(\\w+)+`, `(x\\w*)*`), or a repeat of overlapping alternatives (`(a|ab)*`).

    Attributes:
        rule: the rule's position in the list.
        pattern: the pattern as given.
        part: the part of the pattern at fault.
    """

    def __init__(self, rule: int, pattern: str, part: str, why: str) -> None:
        super().__init__(
            f"key rule {rule} ({pattern!r}) would run on Python's re, where {part!r} can "
            f"backtrack exponentially and hang on a long key ({why}). Rewrite it so each "
            "character can be matched one way only: drop the outer repeat (`(\\w+)+` -> "
            "`\\w+`), make the alternatives exclusive, or make the outer repeat possessive "
            "(`(?:...)*+`, Python 3.11+); or let the rule run natively (a str replacement "
            "and no backreference or lookaround; see KeyRules.fallback_reasons)."
        )
        self.rule = rule
        self.pattern = pattern
        self.part = part


class InvalidKeyRuleError(CkptmapError, re.error):
    """A key rule whose pattern or replacement Python's `re` rejects, raised when the rules are
    built. It is exactly the `re.error` that `re.sub(pattern, repl, key)` raises (same class
    by inheritance, same message, `msg`, `pattern`, `pos`, `lineno`, `colno`), so code that
    catches `re.error` keeps working, and a `CkptmapError`.

    Attributes:
        rule: the rule's position in the list.
    """

    def __init__(self, rule: int, error: re.error) -> None:
        re.error.__init__(self, error.msg, error.pattern, error.pos)
        self.rule = rule

    @classmethod
    def from_re(cls, rule: int, error: BaseException) -> BaseException:
        """The error to raise for rule `rule` when `re` raised `error` (others unchanged)."""
        if isinstance(error, re.error) and not isinstance(error, cls):
            made = cls(rule, error)
            made.__cause__ = error.__cause__
            return made
        return error


class KeyNotUnicodeError(CkptmapError, UnicodeError):
    """A key holds a lone surrogate (it is not valid Unicode text, so it has no UTF-8 form)
    and reached a rule that runs on the native engine, which reads UTF-8 only. Rules that run
    on Python's `re` take such keys as `re.sub` does.

    Attributes:
        index: the key's position in the input.
        key: the key.
        rule: the native rule it reached.
    """

    def __init__(self, index: int, key: str, rule: int) -> None:
        bad = next((c for c in key if 0xD800 <= ord(c) <= 0xDFFF), "")
        super().__init__(
            f"key {index} ({key!r}) holds the lone surrogate U+{ord(bad or chr(0)):04X}, so it "
            f"is not valid Unicode text and key rule {rule} (native) cannot read it. Fix the "
            "name where it was made (e.g. decode bytes with errors='replace' instead of "
            "'surrogateescape'), or rename the key before applying the rules."
        )
        self.index = index
        self.key = key
        self.rule = rule


# --- command line -----------------------------------------------------------------------------


class ModelSpecError(CkptmapError, ValueError):
    """A ``--model pkg.module:factory`` that can not be imported or does not build a module."""


class ConvertError(CkptmapError, ValueError):
    """Arguments of a convert that can not work (unknown dtype, entry to drop not there...)."""
