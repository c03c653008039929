"""Pickle checkpoints: torch zip, legacy torch and plain pickles, loaded safely.

torch zip checkpoints are read by ckptmap's Rust reader first (`ckptmap.formats.pth`), with the
same allowlist; what it can not build (and any ``weights_only=False`` load) goes to torch, and
one INFO line says why. Every other load goes through torch's ``weights_only`` unpickler, with
``weights_only=True`` passed
explicitly: `torch.load` lets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` switch the safe loader off
only for callers that leave the argument out. Besides torch's own list, the unpickler always
gets `ckptmap.formats.allowlist.DEFAULT` (numpy values and mmengine's HistoryBuffer through
checked stand-ins: everything mmengine's Runner writes). Anything beyond that is an explicit
opt-in: ``allowed_globals`` (the objects themselves, checked by
`ckptmap.formats.allowlist.check_entry`) or ``weights_only=False``, which warns with
`UnsafeLoadWarning`. The numpy stand-ins are replaced by real numpy objects after the load
(`ckptmap.formats.safe_numpy.resolve`). A file that fails the safe load is never retried
unsafely. To say which globals it needs, the pickle's GLOBAL / STACK_GLOBAL opcodes are read
with `pickletools.genops`, which executes nothing.

Memory: torch zip checkpoints are memory-mapped (``torch.load(mmap=True)``): tensors are views
of the file's pages, read lazily, and the file must not change while they are in use. Legacy
(non-zip) checkpoints can not be mapped and are read into memory; that fallback logs one line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import mmap as _mmap
import os
import pickle
import pickletools
import re
import struct
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import torch

from ckptmap.errors import (
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CorruptCheckpointError,
    MapLocationError,
    UnsafeCheckpointError,
    UnsafeLoadWarning,
)
from ckptmap.formats import allowlist
from ckptmap.formats.map_location import checked_map_location
from ckptmap.formats.pickle_scan import pickle_globals
from ckptmap.formats.safe_mmengine import HISTORY_BUFFER, explicitly_allowed
from ckptmap.formats.safe_numpy import recipes_made, resolve
from ckptmap.formats.sniff import Format, Sniffed
from ckptmap.formats.torch_zip_check import check_torch_zip

__all__ = [
    "AllowedGlobal",
    "allowing",
    "built_safely",
    "dangerous_globals",
    "load_pickle",
    "pickle_globals",
]

logger = logging.getLogger("ckptmap")

#: An allowlist entry, as `torch.serialization.add_safe_globals` takes it: the object itself,
#: or ``(object, "module.name")`` to allow it under the name a pickle uses for it.
AllowedGlobal = Callable[..., Any] | type | tuple[Any, str]

# torch's weights-only unpickler refuses these modules outright, whatever the allowlist says.
_BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt"})
# Globals whose presence in a checkpoint means "this pickle wants to run code".
_DANGEROUS_MODULES = frozenset(
    {
        "os",
        "posix",
        "nt",
        "sys",
        "subprocess",
        "shutil",
        "socket",
        "runpy",
        "importlib",
        "pty",
        "ctypes",
        "code",
        "codeop",
        "pickle",
        "_pickle",
        "marshal",
        "multiprocessing",
        "asyncio",
        "webbrowser",
        "pdb",
        "commands",
        "popen2",
        "platform",
        "signal",
        "tempfile",
    }
)
_DANGEROUS_NAMES = frozenset(
    {
        "builtins.eval",
        "builtins.exec",
        "builtins.compile",
        "builtins.__import__",
        "builtins.getattr",
        "builtins.setattr",
        "builtins.delattr",
        "builtins.open",
        "builtins.globals",
        "builtins.locals",
        "builtins.vars",
        "builtins.input",
        "builtins.breakpoint",
        "builtins.execfile",
        "builtins.apply",
        "functools.partial",
        "operator.attrgetter",
        "operator.itemgetter",
        "operator.methodcaller",
        "torch.load",
        "torch.storage._load_from_bytes",
        "torch.hub.load",
        "numpy.load",
        "numpy.testing._private.utils.runstring",
    }
)
# Substrings of torch's messages for damaged files (zip reader, legacy reader).
_CORRUPT_MARKERS = (
    "PytorchStreamReader",
    "unexpected EOF",
    "corrupt",
    "Invalid magic number",
    "Invalid protocol version",
    "truncated",
    # A storage record smaller than its tensors need (read into memory / mapped).
    "does not match expected size",
    "Trying to resize storage that is not resizable",
    "out of bounds for storage",
)

# Exceptions torch's unpickler lets through on damaged pickles.
_GARBAGE_ERRORS: tuple[type[Exception], ...] = (
    IndexError,
    KeyError,
    TypeError,
    ValueError,
    AttributeError,
    UnicodeDecodeError,
    OverflowError,
    struct.error,
)
_DAMAGED_PICKLE_ERRORS: tuple[type[Exception], ...] = (EOFError, *_GARBAGE_ERRORS)

# torch keeps the user allowlist in one process-wide set; one lock keeps concurrent loads from
# seeing each other's opt-ins.
_ALLOWLIST_LOCK = threading.RLock()


@contextlib.contextmanager
def allowing(allowed_globals: Iterable[AllowedGlobal]) -> Iterator[None]:
    """Allows `allowed_globals` for ``weights_only`` loads made inside the block.

    Unlike `torch.serialization.safe_globals`, entries that were already allowed (by
    `torch.serialization.add_safe_globals`) stay allowed afterwards; and the block holds a
    lock, so no other ckptmap load in this process sees these entries meanwhile. Entries are
    checked first (`ckptmap.formats.allowlist.check_entry`).
    """
    allowed_globals = allowlist.checked(allowed_globals)
    with _ALLOWLIST_LOCK:
        present = set(torch.serialization.get_safe_globals())
        new = [g for g in dict.fromkeys(allowed_globals) if g not in present]
        if not new:
            yield
            return
        with torch.serialization.safe_globals(new):
            yield


def load_pickle(
    sniffed: Sniffed,
    map_location: Any = None,
    *,
    weights_only: bool = True,
    allowed_globals: Iterable[AllowedGlobal] = (),
    mmap: bool | None = None,
    zip_reader: Callable[..., Any] | None = None,
) -> Any:
    """Loads a pickle checkpoint as `torch.load` would, safely.

    Args:
        sniffed: `sniff`'s answer for the file; its format is `Format.TORCH_ZIP`,
            `Format.TORCH_LEGACY` or `Format.PICKLE`.
        map_location: as for `torch.load`.
        weights_only: False unpickles without restrictions (warns `UnsafeLoadWarning`).
            ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` turns it back to True, as for `torch.load`.
        allowed_globals: objects the safe unpickler may use besides torch's list and
            `ckptmap.formats.allowlist.DEFAULT` (classes or functions, or ``(object,
            "module.name")`` pairs); each is checked by `allowlist.check_entry`.
        mmap: map zip checkpoints instead of reading them (None: yes). Legacy and plain
            pickles can not be mapped; they are read, with one log line.
        zip_reader: tried first for a torch zip loaded with ``weights_only``:
            ``zip_reader(sniffed, map_location, allowed, mmap=...)`` returns the checkpoint, or
            `ckptmap.formats.pth.FALLBACK` to let torch load it (`ckptmap.formats.pth.load_fast`
            is ckptmap's Rust reader; passed in, so that this module does not import it).

    Raises:
        UnsafeCheckpointError: the pickle needs globals outside the allowlist, or uses the
            allowed ones in a way no real writer does.
        UnsafeAllowlistError: an `allowed_globals` entry that can run code (before any read).
        CorruptCheckpointError: the file is truncated or damaged.
    """
    # Checked before anything is read; DEFAULT is always part of what the unpickler gets.
    given = allowed_globals if isinstance(allowed_globals, (str, bytes)) else tuple(allowed_globals)
    allowed = allowlist.with_default(given)
    if not weights_only and _env_forces_weights_only():
        weights_only = True
    return built_safely(
        sniffed.path,
        given,
        lambda: _load_any(sniffed, map_location, weights_only, allowed, mmap, zip_reader),
    )


def built_safely(path: str, given: Iterable[AllowedGlobal], build: Callable[[], Any]) -> Any:
    """What `build` (a load with the default allowlist) returns, its stand-ins resolved.

    The numpy and HistoryBuffer stand-ins of `allowlist.DEFAULT` are told which objects the
    caller allowed explicitly (`given`); numpy recipes become real numpy objects afterwards.

    Raises:
        UnsafeCheckpointError: a recipe that does not check out.
    """
    explicit = [entry[0] if isinstance(entry, tuple) else entry for entry in given]
    with recipes_made() as made, explicitly_allowed(explicit):
        loaded = build()
    if not made:
        return loaded
    try:
        return resolve(loaded)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(path, [], reason=str(err)) from None


def _load_any(
    sniffed: Sniffed,
    map_location: Any,
    weights_only: bool,
    allowed: tuple[AllowedGlobal, ...],
    mmap: bool | None,
    zip_reader: Callable[..., Any] | None,
) -> Any:
    path = sniffed.path
    if not weights_only:
        warnings.warn(
            f"ckptmap: unpickling {path!r} with weights_only=False: a malicious file can run "
            "any code now. Prefer allowed_globals=[...] with the classes it needs.",
            UnsafeLoadWarning,
            stacklevel=4,
        )
    if sniffed.format is Format.PICKLE:
        if mmap:
            logger.warning("%s is a plain pickle, which can not be memory-mapped", path)
        return _load_plain(sniffed, weights_only=weights_only, allowed=allowed)
    if sniffed.format is Format.TORCH_LEGACY:
        if mmap:
            logger.warning(
                "%s is a legacy (non-zip) torch checkpoint, which can not be memory-mapped: "
                "reading it into memory instead (re-save it with torch.save to map it)",
                path,
            )
        else:
            logger.info("%s is a legacy (non-zip) torch checkpoint: reading it into memory", path)
        return _torch_load(sniffed, map_location, weights_only, allowed, mmap=False)
    if sniffed.format is not Format.TORCH_ZIP:
        raise ValueError(f"load_pickle can not load {sniffed.format.value} files")
    use_mmap = True if mmap is None else bool(mmap)
    if weights_only and zip_reader is not None:
        # ckptmap's Rust reader first; it hands back what it can not build (see formats.pth).
        loaded = zip_reader(sniffed, map_location, allowed, mmap=use_mmap)
        if loaded is not _ZIP_FALLBACK:
            return loaded
    return _load_torch_zip(sniffed, map_location, weights_only, allowed, mmap=use_mmap)


def _load_torch_zip(
    sniffed: Sniffed,
    map_location: Any,
    weights_only: bool,
    allowed: tuple[AllowedGlobal, ...],
    *,
    mmap: bool,
) -> Any:
    """A torch zip checkpoint through `torch.load` (read into memory if it can not be mapped)."""
    # Inflation cap, and record sizes where torch would map the records unchecked. (Files
    # the Rust reader builds never get here: it checks all of this itself.)
    if mmap and not check_torch_zip(sniffed.path, sniffed.size, mmap=True):
        logger.info("%s has compressed storage records: reading it into memory", sniffed.path)
        mmap = False
    elif not mmap:
        check_torch_zip(sniffed.path, sniffed.size, mmap=False)
    try:
        return _torch_load(sniffed, map_location, weights_only, allowed, mmap=mmap)
    except _MmapFailed as err:
        logger.warning(
            "%s can not be memory-mapped (%s): reading it into memory", sniffed.path, err
        )
        return _torch_load(sniffed, map_location, weights_only, allowed, mmap=False)


#: What a `zip_reader` returns to let torch load the file (`ckptmap.formats.pth.FALLBACK`).
_ZIP_FALLBACK: Any = object()


class _MmapFailed(Exception):
    pass


def _torch_load(
    sniffed: Sniffed,
    map_location: Any,
    weights_only: bool,
    allowed: tuple[AllowedGlobal, ...],
    *,
    mmap: bool,
) -> Any:
    path = sniffed.path
    try:
        with (
            _loadable(path, mmap) as (source, mmap),
            allowing(allowed if weights_only else ()),
            _quiet_protocol_warning(),
        ):
            try:
                # weights_only is always passed explicitly; see the module docstring.
                return torch.load(
                    source,
                    map_location=checked_map_location(map_location, path),
                    weights_only=weights_only,
                    mmap=mmap,
                )
            except RuntimeError as err:
                if mmap and "mmap" in str(err).lower():
                    raise _MmapFailed(str(err)) from err
                raise
    except MapLocationError:
        raise
    except pickle.UnpicklingError as err:
        raise _explain_failure(sniffed, allowed, str(err)) from None
    except EOFError as err:
        raise _corrupt(sniffed, "a truncated pickle (it ends before its STOP opcode)") from err
    except RuntimeError as err:
        if any(marker in str(err) for marker in _CORRUPT_MARKERS):
            raise _corrupt(sniffed, f"a damaged {_kind(sniffed)} ({_first_line(err)})") from err
        raise
    except _GARBAGE_ERRORS as err:
        # What torch's unpickler raises on some damaged pickles; also what a bad
        # map_location can raise. Only a pickle that does not disassemble is "corrupt".
        if damage := _damage(sniffed):
            raise _corrupt(sniffed, f"a damaged {_kind(sniffed)} ({damage})") from err
        raise
    except PermissionError as err:
        raise CheckpointPermissionError(path) from err
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(path) from err


@contextlib.contextmanager
def _quiet_protocol_warning() -> Iterator[None]:
    # torch warns about any pickle protocol but 2 before it knows whether it can read the
    # file; when it can not, the error says so.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
        yield


@contextlib.contextmanager
def _loadable(path: str, mmap: bool) -> Iterator[tuple[str | IO[bytes], bool]]:
    """What to hand torch.load for `path`, and whether it can still be mapped."""
    # torch.load hands any path ending in ".safetensors" to safetensors, whatever its content.
    # The content decides here: pass an fd path (mmap keeps working) or else an open file.
    if not path.endswith(".safetensors"):
        yield path, mmap
    elif os.path.isdir("/proc/self/fd"):
        fd = os.open(path, os.O_RDONLY)
        try:
            yield f"/proc/self/fd/{fd}", mmap
        finally:
            os.close(fd)
    else:  # pragma: no cover - systems without /proc
        if mmap:
            logger.info("%s: a torch checkpoint named .safetensors, read without mmap", path)
        with open(path, "rb") as f:
            yield f, False


def _load_plain(sniffed: Sniffed, *, weights_only: bool, allowed: tuple[AllowedGlobal, ...]) -> Any:
    path = sniffed.path
    try:
        with open(path, "rb") as f:
            data = f.read()
    except PermissionError as err:
        raise CheckpointPermissionError(path) from err
    if not weights_only:
        return pickle.loads(data)  # the caller opted in, and was warned
    # Check first: unlike torch.load, nothing rejects a bad global before torch's unpickler
    # would meet it, and the scan costs nothing next to a failed load.
    try:
        found = pickle_globals(io.BytesIO(data))
    except ValueError as err:
        raise _corrupt(sniffed, f"a truncated or damaged pickle ({err})") from None
    if needed := _not_allowed(found, allowed):
        raise UnsafeCheckpointError(path, needed, dangerous_globals(needed))
    from torch import _weights_only_unpickler

    try:
        with allowing(allowed), _quiet_protocol_warning():
            return _weights_only_unpickler.load(io.BytesIO(data), encoding="utf-8")
    except pickle.UnpicklingError as err:
        reason = str(err)
        if reason.startswith("Unsupported operand"):
            reason = (
                f"it is a plain protocol-{sniffed.pickle_protocol} pickle, not a torch.save "
                f"checkpoint, and torch's safe unpickler reads only what torch.save writes "
                f"({reason})"
            )
        raise UnsafeCheckpointError(path, [], reason=reason) from None
    except _DAMAGED_PICKLE_ERRORS as err:
        raise _corrupt(sniffed, f"a truncated or damaged pickle ({err!r})") from None


def _explain_failure(
    sniffed: Sniffed, allowed: tuple[AllowedGlobal, ...], message: str
) -> Exception:
    """The error for a failed safe load: the globals it needs, or "corrupt"."""
    try:
        found = _scan_checkpoint(sniffed)
    except ValueError as err:
        return _corrupt(sniffed, f"a damaged {_kind(sniffed)} ({err})")
    needed = _not_allowed(found, allowed)
    if needed:
        return UnsafeCheckpointError(sniffed.path, needed, dangerous_globals(needed), message)
    return UnsafeCheckpointError(sniffed.path, [], reason=_torch_reason(message))


def _scan_checkpoint(sniffed: Sniffed) -> set[str]:
    with _pickle_stream(sniffed) as (stream, count):
        return pickle_globals(stream, count) if count else set()


def _damage(sniffed: Sniffed) -> str | None:
    """Why the checkpoint's pickles do not disassemble (None: they do)."""
    try:
        with _pickle_stream(sniffed) as (stream, count):
            for _ in range(count):
                # dis also checks the stack and memo, which genops does not.
                pickletools.dis(stream, out=io.StringIO())
    except ValueError as err:
        return str(err)
    return None


@contextlib.contextmanager
def _pickle_stream(sniffed: Sniffed) -> Iterator[tuple[IO[bytes], int]]:
    """The stream of a checkpoint's pickles, and how many of them hold its objects."""
    if sniffed.format is Format.TORCH_ZIP:
        reader = torch._C.PyTorchFileReader(sniffed.path)
        yield io.BytesIO(reader.get_record("data.pkl")), 1
        return
    with open(sniffed.path, "rb") as f:
        if sniffed.size == 0:
            yield f, 0
            return
        with _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ) as mapped:
            # A map bounds every read by the file size, whatever length a damaged opcode asks.
            stream: Any = mapped
            if sniffed.format is Format.TORCH_LEGACY:
                # magic number, protocol version, sys_info, then the checkpoint itself; the
                # pre-0.4 tar format has no pickle up front.
                yield stream, 4 if mapped[:1] == b"\x80" else 0
            else:
                yield stream, 1


def dangerous_globals(names: Iterable[str]) -> list[str]:
    """The names among `names` that can run arbitrary code or reach the file system."""
    out = []
    for full in names:
        module = full.split(".", 1)[0]
        if full in _DANGEROUS_NAMES or module in _DANGEROUS_MODULES or full.startswith("<"):
            out.append(full)
    return sorted(out)


def _not_allowed(found: Iterable[str], allowed: tuple[AllowedGlobal, ...]) -> list[str]:
    found = set(found)
    ok = _allowed_names(allowed)
    needed = {g for g in found if g not in ok or g.split(".", 1)[0] in _BLOCKED_MODULES}
    # The default allowlist's getattr answers HistoryBuffer's methods only: a getattr in a
    # pickle without a HistoryBuffer reaches for something else.
    if "builtins.getattr" in found and HISTORY_BUFFER not in found:
        needed.add("builtins.getattr")
    return sorted(needed)


def _allowed_names(allowed: tuple[AllowedGlobal, ...]) -> set[str]:
    names: set[str] = set()
    try:
        from torch import _weights_only_unpickler

        names.update(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):  # a torch without them: report every global
        pass
    for entry in (*torch.serialization.get_safe_globals(), *allowed):
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return names


def _env_forces_weights_only() -> bool:
    return os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true")


def _corrupt(sniffed: Sniffed, looks_like: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(sniffed.path, sniffed.size, looks_like)


def _kind(sniffed: Sniffed) -> str:
    return {
        Format.TORCH_ZIP: "torch zip checkpoint",
        Format.TORCH_LEGACY: "legacy torch checkpoint",
    }.get(sniffed.format, "pickle")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _torch_reason(message: str) -> str:
    # torch wraps the unpickler's reason in advice to use weights_only=False; keep the reason.
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1]
    message = message.split("Check the documentation of torch.load", 1)[0]
    return " ".join(message.split()) or "torch's safe unpickler refused it"
