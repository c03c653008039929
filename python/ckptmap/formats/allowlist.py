"""What the safe unpickler may use: the default allowlist, and the checks on what callers add.

Every pickle load in ckptmap (torch zip, legacy torch, plain pickle, ``.bin`` shards) runs on
torch's ``weights_only`` unpickler with `DEFAULT` plus the caller's ``allowed_globals``.

`DEFAULT` (always on) holds data-only types beyond torch's own list, enough for everything
mmengine's Runner writes: numpy arrays, scalars and dtypes (through checked stand-ins, see
`ckptmap.formats.safe_numpy`), mmengine's `HistoryBuffer` (checked, see
`ckptmap.formats.safe_mmengine`) and a ``getattr`` that answers only the
``(HistoryBuffer, "min" | "max" | "current" | "mean")`` pairs its pickles use. It is a plain
tuple of objects and ``(object, "module.name")`` pairs, as `torch.serialization.add_safe_globals`
takes them; nothing in it imports numpy or mmengine until a pickle needs it. `NUMPY` and
`MMENGINE_RUNNER` name its parts (passing them is harmless and no longer needed).

What callers add goes through `check_entry` first: an object (never a name), and never one that
can run code or reach arbitrary attributes (``eval``, ``exec``, ``compile``, ``getattr``,
``os.*``, ``subprocess.*``, ``importlib.*``, ``functools.*``, ``operator.*``, ``pickle.*``,
``torch.load``, bound methods, ...): those raise `UnsafeAllowlistError` even when passed on
purpose. An entry for a name `DEFAULT` covers (say numpy's raw ``_reconstruct``) is replaced
by the checked stand-in: the same files load, without the hole.

    >>> import argparse, ckptmap
    >>> ckpt = ckptmap.load_checkpoint(  # doctest: +SKIP
    ...     model, "old.pth", allowed_globals=[argparse.Namespace])
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import importlib
import inspect
import types
from collections.abc import Iterable, Iterator
from typing import Any

from ckptmap.errors import RefusedPickleError, UnsafeAllowlistError
from ckptmap.formats.safe_mmengine import (
    GETATTR_PAIRS,
    HISTORY_BUFFER,
    HistoryBufferState,
    restricted_getattr,
)
from ckptmap.formats.safe_numpy import ArrayRecipe, DtypeRecipe, NDArrayType, resolve, scalar

__all__ = [
    "BY_NAME",
    "DEFAULT",
    "GETATTR_PAIRS",
    "MMENGINE_RUNNER",
    "NUMPY",
    "HistoryBufferState",
    "check_entry",
    "checked",
    "empty_bytes",
    "entry_name",
    "extended",
    "extended_globals",
    "globals_for",
    "mmengine_runner",
    "numpy_globals",
    "resolve",
    "with_default",
]


def empty_bytes(*args: Any) -> bytes:
    """``bytes()``: how pickle protocol 2 writes ``b""`` (the data of every empty numpy array)."""
    if args:
        raise RefusedPickleError(f"bytes{args!r:.80}: protocol 2 pickles only bytes() itself")
    return b""


#: numpy arrays, scalars and dtypes under the names numpy 1.x (``numpy.core``) and numpy 2
#: (``numpy._core``) pickle them, each through a checked stand-in; and ``b""`` as protocol 2
#: writes it (torch's own list lacks it).
NUMPY: tuple[Any, ...] = (
    (empty_bytes, "builtins.bytes"),
    (NDArrayType, "numpy.ndarray"),
    (DtypeRecipe, "numpy.dtype"),
    (ArrayRecipe, "numpy.core.multiarray._reconstruct"),
    (ArrayRecipe, "numpy._core.multiarray._reconstruct"),
    (scalar, "numpy.core.multiarray.scalar"),
    (scalar, "numpy._core.multiarray.scalar"),
)

#: Everything mmengine's ``Runner.save_checkpoint`` writes beyond torch's own list: `NUMPY`,
#: ``HistoryBuffer`` and the restricted ``getattr`` for its statistics methods.
MMENGINE_RUNNER: tuple[Any, ...] = (
    *NUMPY,
    (HistoryBufferState, HISTORY_BUFFER),
    (restricted_getattr, "builtins.getattr"),
)

#: The allowlist every load uses, whatever the caller adds.
DEFAULT: tuple[Any, ...] = MMENGINE_RUNNER


def numpy_globals() -> tuple[Any, ...]:
    """`NUMPY` (kept for callers of earlier versions)."""
    return NUMPY


def mmengine_runner() -> tuple[Any, ...]:
    """`MMENGINE_RUNNER` (kept for callers of earlier versions)."""
    return MMENGINE_RUNNER


_DEFAULT_NAMES = frozenset(entry[1] for entry in DEFAULT)

# Modules none of whose callables may be allowed: they run code, import, reach attributes by
# name, touch files, processes or the network, or unpickle.
_FORBIDDEN_MODULES = frozenset(
    {
        "_ctypes",
        "_frozen_importlib",
        "_frozen_importlib_external",
        "_functools",
        "_imp",
        "_io",
        "_operator",
        "_pickle",
        "_posixsubprocess",
        "_signal",
        "_socket",
        "_sqlite3",
        "_thread",
        "_winapi",
        "genericpath",
        "ntpath",
        "posixpath",
        "asyncio",
        "cProfile",
        "code",
        "codeop",
        "copyreg",
        "copy_reg",
        "ctypes",
        "dbm",
        "distutils",
        "doctest",
        "ensurepip",
        "ftplib",
        "functools",
        "gc",
        "glob",
        "http",
        "idlelib",
        "importlib",
        "inspect",
        "io",
        "logging.config",
        "marshal",
        "multiprocessing",
        "nt",
        "operator",
        "os",
        "pathlib",
        "pdb",
        "pickle",
        "pip",
        "pkgutil",
        "platform",
        "posix",
        "profile",
        "pty",
        "runpy",
        "setuptools",
        "shelve",
        "shutil",
        "signal",
        "site",
        "smtplib",
        "socket",
        "sqlite3",
        "subprocess",
        "sys",
        "tarfile",
        "telnetlib",
        "tempfile",
        "threading",
        "timeit",
        "trace",
        "types",
        "urllib",
        "venv",
        "webbrowser",
        "zipfile",
        "zipimport",
        # numpy and torch functions that read or write files, load code or call callables.
        "numpy.ctypeslib",
        "numpy.distutils",
        "numpy.f2py",
        "numpy.lib._datasource",
        "numpy.lib.npyio",
        "numpy.lib._npyio_impl",
        "numpy.testing",
        "torch._dynamo",
        "torch._inductor",
        "torch._ops",
        "torch.classes",
        "torch.hub",
        "torch.jit",
        "torch.library",
        "torch.ops",
        "torch.package",
        "torch.serialization",
        "torch.utils.cpp_extension",
    }
)
_FORBIDDEN_NAMES = frozenset(
    {
        "codecs.open",
        "numpy.DataSource",
        "numpy.fromfile",
        "numpy.frompyfunc",
        "numpy.genfromtxt",
        "numpy.load",
        "numpy.loadtxt",
        "numpy.memmap",
        "numpy.save",
        "numpy.savetxt",
        "numpy.savez",
        "numpy.savez_compressed",
        "numpy.vectorize",
        "torch.compile",
        "torch.load",
        "torch.storage._load_from_bytes",
    }
)
# Data-only classes of otherwise forbidden modules: they build values and touch nothing.
_DATA_CLASSES = frozenset(
    {
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.PurePath",
        "pathlib.PurePosixPath",
        "pathlib.PureWindowsPath",
        "pathlib.WindowsPath",
        "pathlib._local.Path",
        "pathlib._local.PosixPath",
        "pathlib._local.WindowsPath",
        "pathlib._abc.PurePath",
        "pathlib._local.PurePath",
        "pathlib._local.PurePosixPath",
        "pathlib._local.PureWindowsPath",
        "types.SimpleNamespace",
    }
)
# Builtins that run code, import, reach attributes by name, build classes or touch files.
_FORBIDDEN_BUILTINS = frozenset(
    {
        "__build_class__",
        "__import__",
        "breakpoint",
        "compile",
        "delattr",
        "dir",
        "eval",
        "exec",
        "exit",
        "getattr",
        "globals",
        "hasattr",
        "help",
        "input",
        "locals",
        "open",
        "quit",
        "setattr",
        "super",
        "type",
        "vars",
    }
)
_FORBIDDEN_OBJECTS = frozenset(
    id(getattr(builtins, name)) for name in _FORBIDDEN_BUILTINS if hasattr(builtins, name)
)
# str.format("{0.__class__.__init__.__globals__}", obj) reaches any attribute.
_ATTRIBUTE_REACHING = frozenset({id(str.format), id(str.format_map)})


def entry_name(entry: Any) -> str:
    """The ``module.name`` an allowlist entry is allowed under."""
    if isinstance(entry, tuple):
        return str(entry[1])
    return _object_name(entry)


def _object_name(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    if module is None:
        owner = getattr(obj, "__objclass__", None) or getattr(obj, "__self__", None)
        module = getattr(owner, "__module__", None) or type(obj).__module__
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    return f"{module}.{qualname or type(obj).__qualname__}"


def check_entry(entry: Any) -> Any:
    """`entry` if it may be allowed; raises `UnsafeAllowlistError` if not.

    An entry is an object (a class or a function) or an ``(object, "module.name")`` pair.
    """
    if isinstance(entry, tuple):
        if len(entry) != 2 or not isinstance(entry[1], str) or "." not in entry[1]:
            raise UnsafeAllowlistError(
                entry,
                repr(entry)[:80],
                'a pair must be (the object, "module.name" as the pickle spells it)',
            )
        obj = entry[0]
    else:
        obj = entry
    name = entry_name(entry)
    if isinstance(obj, (str, bytes)):
        raise UnsafeAllowlistError(
            entry,
            str(obj),
            "entries are the objects themselves, never names (a pickle must not make ckptmap "
            f"import anything): pass the class or function, e.g. `allowed_globals=[{obj!s}]` "
            "after importing it (on the command line, `--allow` takes names)",
        )
    if isinstance(obj, types.ModuleType):
        raise UnsafeAllowlistError(
            entry, obj.__name__, "a module: pass the classes or functions the file needs"
        )
    if not callable(obj):
        raise UnsafeAllowlistError(
            entry, name, f"a {type(obj).__name__} is neither a class nor a function"
        )
    if id(obj) in {id(v) for v in _default_objects()}:
        return entry
    why = _why_forbidden(obj)
    if why is not None:
        raise UnsafeAllowlistError(
            entry,
            _object_name(obj),
            f"{why}, so a pickle allowed it could run arbitrary code. No allowlist can include "
            "it: load a file that needs it only if you wrote it yourself, with "
            "`ckptmap.load_file(path, weights_only=False)`",
        )
    return entry


def _default_objects() -> tuple[Any, ...]:
    return tuple(entry[0] for entry in DEFAULT)


def _why_forbidden(obj: Any) -> str | None:
    if id(obj) in _FORBIDDEN_OBJECTS:
        return "it evaluates, imports, builds classes or reaches attributes by name"
    if id(obj) in _ATTRIBUTE_REACHING:
        return "its format strings reach any attribute of its arguments"
    if inspect.ismethod(obj) or (
        isinstance(obj, types.BuiltinMethodType)
        and not isinstance(getattr(obj, "__self__", None), (types.ModuleType, type, type(None)))
    ):
        return "it is a method bound to an object, which it can change or use"
    name = _object_name(obj)
    module = name.rpartition(".")[0]
    if name in _DATA_CLASSES and isinstance(obj, type):
        return None
    if name in _FORBIDDEN_NAMES or any(
        name == m or name.startswith(m + ".") or module == m for m in _FORBIDDEN_MODULES
    ):
        return f"it belongs to {module or name}, which runs code, imports, or reaches files"
    if any(part.startswith("__") and part.endswith("__") for part in name.split(".")[1:]):
        return "a dunder method reaches the internals of the objects it is given"
    return None


def checked(allowed_globals: Iterable[Any]) -> tuple[Any, ...]:
    """`allowed_globals` as a tuple, each entry checked by `check_entry`.

    Raises:
        UnsafeAllowlistError: an entry that can run code or is not an object, or a str given
            for the whole list.
    """
    if isinstance(allowed_globals, (str, bytes)):
        raise UnsafeAllowlistError(
            allowed_globals,
            str(allowed_globals),
            "allowed_globals is a list of objects, not a name",
        )
    return tuple(check_entry(entry) for entry in allowed_globals)


def with_default(allowed_globals: Iterable[Any] = ()) -> tuple[Any, ...]:
    """`DEFAULT` plus the checked `allowed_globals` whose names `DEFAULT` does not cover.

    Raises:
        UnsafeAllowlistError: an entry that can run code, or that is not an object.
        TypeError: `allowed_globals` is a str or not iterable.
    """
    extra = checked(allowed_globals)
    kept = [e for e in extra if entry_name(e) not in _DEFAULT_NAMES]
    return DEFAULT + tuple(dict.fromkeys(kept)) if kept else DEFAULT


#: The named allowlists the command line's ``--allow`` accepts besides dotted names.
BY_NAME = {"numpy": numpy_globals, "mmengine-runner": mmengine_runner, "default": lambda: DEFAULT}


def globals_for(names: Iterable[str]) -> list[Any]:
    """The objects for ``--allow`` arguments: a named allowlist or a dotted ``module.name``.

    A dotted name is imported (the user named it on their own command line) and checked like
    any entry.

    Raises:
        KeyError: a name that is neither an allowlist nor an importable ``module.name``.
        UnsafeAllowlistError: the object can run code.
    """
    allowed: list[Any] = []
    for name in names:
        if name in BY_NAME:
            allowed.extend(BY_NAME[name]())
            continue
        obj = _import_dotted(name)
        allowed.append(check_entry((obj, name)))
    return allowed


def _import_dotted(name: str) -> Any:
    parts = name.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise KeyError(
            f"{name!r} is neither an allowlist ({', '.join(sorted(BY_NAME))}) nor a dotted "
            "module.name such as argparse.Namespace"
        )
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise KeyError(f"can not import {name!r}: no importable module defines it")


# --- allowlists for every load made inside a block --------------------------------------------

_extended: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "ckptmap_allowed_globals", default=()
)


@contextlib.contextmanager
def extended(allowed_globals: Iterable[Any]) -> Iterator[tuple[Any, ...]]:
    """Adds `allowed_globals` (checked first) for the loads through `CheckpointLoader` in the block.

    This is how ``allowed_globals=`` reaches a file through any URI scheme, and how
    ``ckptmap.integrations.mmengine.patch(allowed_globals=...)`` reaches the Runner's loads,
    without changing the ``loader(filename, map_location)`` signature of scheme loaders.
    Blocks nest: the inner one adds to the outer.

    Raises:
        UnsafeAllowlistError: an entry that can run code, or that is not an object.
    """
    combined = _extended.get() + checked(allowed_globals)
    token = _extended.set(combined)
    try:
        yield combined
    finally:
        _extended.reset(token)


def extended_globals() -> tuple[Any, ...]:
    """What the enclosing `extended` blocks allow (besides `DEFAULT`)."""
    return _extended.get()
