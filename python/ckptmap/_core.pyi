"""Type stubs for the compiled core `ckptmap._core`. Import these names from `ckptmap`."""

import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, final

from typing_extensions import Self

__all__ = [
    "MAX_SAFETENSORS_HEADER_LEN",
    "SAFETENSORS_HEADER_ERROR_KINDS",
    "KeyRules",
    "PthFallback",
    "PthFormatError",
    "PthReader",
    "PthUnfetched",
    "SafetensorsHeader",
    "SafetensorsHeaderError",
    "__version__",
    "diff_keys",
    "filter_prefix_keys",
    "find_collisions",
    "group_by_owner",
    "suggest_rules",
]
__version__: str
#: Every `SafetensorsHeaderError.kind`, in the core's order.
SAFETENSORS_HEADER_ERROR_KINDS: tuple[str, ...]
#: The largest safetensors header length accepted (bytes).
MAX_SAFETENSORS_HEADER_LEN: int

_Pattern = str | re.Pattern[str]
_Repl = str | Callable[[re.Match[str]], str]

@final
class KeyRules:
    """An ordered list of `(pattern, replacement)` key rules, compiled once.

    Each rule is applied as Python's `re.sub(pattern, replacement, key)`. A rule reported
    native runs every key on the linear Rust engine; a rule that runs on `re` and could
    backtrack exponentially raises `ckptmap.errors.BacktrackingRuleError` here.
    """

    def __new__(cls, rules: Iterable[tuple[_Pattern, _Repl]]) -> Self: ...
    def apply(self, keys: Iterable[str]) -> list[str]:
        """Applies every rule in order to each key. A key holding a lone surrogate raises
        `ckptmap.errors.KeyNotUnicodeError` when it reaches a native rule."""
    def sub(self, key: str) -> str:
        """Applies every rule in order to one key."""
    @property
    def rules(self) -> list[tuple[_Pattern, _Repl]]: ...
    @property
    def native(self) -> list[bool]:
        """For each rule, whether it runs on the Rust engine (for every key)."""
    @property
    def fallback_reasons(self) -> list[str | None]:
        """For each rule, why it runs on Python's `re` (None: it runs natively)."""
    @property
    def native_patterns(self) -> list[str | None]:
        """For each native rule, its translation for the Rust `regex` crate."""
    def __len__(self) -> int: ...
    def __reduce__(self) -> tuple[type[KeyRules], tuple[list[tuple[_Pattern, _Repl]]]]: ...

# --- key index ---

def filter_prefix_keys(
    keys: Sequence[str], prefix: str, strip: bool = True
) -> tuple[list[int], list[str]]:
    """Keeps the keys under `prefix`, optionally stripping it.

    A non-empty prefix not ending in "." gets one appended ("backbone" keeps "backbone.x",
    not "backbone2.x" nor "backbone"); the empty prefix keeps every key. Returns the positions
    of the kept keys in input order and their (stripped) names.
    """

def group_by_owner(keys: Sequence[str], module_paths: Sequence[str]) -> list[list[int]]:
    """Groups key positions by owning module, in linear time.

    `module_paths` as `named_modules()` yields them ("" for the root). A module owns a key when
    `key == path + "." + rest`, the root owns every key, the deepest owner wins. Returns one
    ascending list per module path, then one list of the keys that no module owns.
    """

def diff_keys(source: Sequence[str], expected: Sequence[str]) -> tuple[list[str], list[str]]:
    """Returns `(missing, unexpected)`.

    `missing`: expected keys absent from `source`, in `expected` order; `unexpected`: source
    keys absent from `expected`, in `source` order; each key once, at its first position.
    """

def find_collisions(keys: Sequence[str]) -> list[list[int]]:
    """Positions of repeated keys: one ascending list per repeated key, by first occurrence."""

# --- rule inference ---

_Statuses = tuple[bytes, list[int], dict[int, list[int]]]

def suggest_rules(
    source: Iterable[tuple[str, Sequence[int] | None, str | None]],
    target: Iterable[tuple[str, Sequence[int] | None, str | None]],
) -> tuple[list[tuple[str, str, int, list[int]]], _Statuses, _Statuses]:
    """Infers `(pattern, replacement)` rules, applied in order as `re.sub`, that rename the
    `source` keys (a checkpoint's) onto the `target` keys (a model's).

    Each side is an iterable of `(name, shape, dtype)`; `shape` and `dtype` may be None for
    entries that are not tensors. Returns `(rules, source, target)`: `rules` a list of
    `(pattern, replacement, keys, examples)`, `source` and `target` the statuses of each
    side's keys as `(codes, others, candidates)`: one byte per key (`m` mapped, `s` shape
    differs, `a` ambiguous, `n` no candidate, `c` conflict), the counterpart's position (-1 if
    none) and, for ambiguous keys, the candidates' positions.
    """

# --- safetensors header ---

class SafetensorsHeaderError(ValueError):
    """A safetensors header that fails validation.

    Attributes: `path` (the file), `kind` (which check failed, e.g. "header_too_large"),
    `detail` (the specifics).
    """

    path: str
    kind: str
    detail: str

@final
class SafetensorsHeader:
    """A validated safetensors header: every tensor's name, dtype, shape and byte range.

    Lists are in file (JSON) order. Validation failures raise `SafetensorsHeaderError`; I/O
    failures raise the matching `OSError` subclass.
    """

    @staticmethod
    def open(path: str | os.PathLike[str]) -> SafetensorsHeader:
        """Maps the file at `path` read-only and validates its header."""
    if sys.platform != "win32":
        @staticmethod
        def from_fd(fd: int, path: str | os.PathLike[str]) -> SafetensorsHeader:
            """Maps the open descriptor `fd` (duplicated, never closed) and validates its header."""
    @staticmethod
    def parse(data: bytes, path: str = "<bytes>") -> SafetensorsHeader:
        """Validates the header of a whole safetensors file held in `data`."""
    @staticmethod
    def header_length(prefix: bytes, file_size: int, path: str = "<bytes>") -> int:
        """The header length that a file's first 8 bytes (`prefix`) give, checked against
        the whole file's size: not 0, not over the cap, not past the end."""
    @staticmethod
    def from_header(header: bytes, file_size: int, path: str = "<bytes>") -> SafetensorsHeader:
        """Validates a header from its JSON bytes alone, for a file of `file_size` bytes."""
    @property
    def path(self) -> str: ...
    @property
    def names(self) -> list[str]: ...
    @property
    def dtypes(self) -> list[str]:
        """Torch-style dtype names ("bfloat16", "float8_e4m3fn"), one per tensor."""
    @property
    def safetensors_dtypes(self) -> list[str]:
        """Dtypes as the header spells them ("BF16"), one per tensor."""
    @property
    def shapes(self) -> list[tuple[int, ...]]: ...
    @property
    def byte_ranges(self) -> list[tuple[int, int]]:
        """`(start, end)` absolute file offsets of each tensor's bytes."""
    @property
    def metadata(self) -> dict[str, str] | None: ...
    @property
    def data_offset(self) -> int: ...
    @property
    def header_len(self) -> int: ...
    @property
    def file_size(self) -> int: ...
    def __len__(self) -> int: ...

# --- torch zip checkpoints ---

class PthFormatError(ValueError):
    """A torch zip checkpoint that fails validation.

    Attributes: `path` (the file), `kind` (which check failed, e.g. "storage_size_mismatch"),
    `detail` (the specifics).
    """

    path: str
    kind: str
    detail: str

class PthFallback(Exception):
    """Raised by `PthReader.load` when an object must be built by torch's own loader."""

class PthUnfetched(Exception):
    """Raised by `PthReader.open(path, known=...)` when the parse needs bytes of the file that
    are not fetched yet; `need` lists them as ``(start, end)`` ranges."""

    need: list[tuple[int, int]]

_PathPart = str | int

@final
class PthReader:
    """A torch zip checkpoint, validated and parsed, tensor data unread.

    Validation failures raise `PthFormatError`; I/O failures the matching `OSError`. Where the
    pickle needs what the reader does not implement, `fallback_reason` says what.
    """

    @staticmethod
    def open(
        path: str | os.PathLike[str],
        allowed: Sequence[str] = ...,
        known: Sequence[tuple[int, int]] | None = None,
    ) -> PthReader:
        """Maps the file, validates it and runs its pickle; `allowed` names extra globals.
        `known`: the byte ranges fetched so far of a remote file (`PthUnfetched` otherwise)."""
    def fetch_ranges(self, rows: Sequence[int]) -> list[tuple[int, int]]:
        """The byte ranges to fetch before table `rows` can be loaded (file order)."""
    @staticmethod
    def records(path: str | os.PathLike[str]) -> list[str]:
        """The archive's member names below its directory (as torch's reader lists them)."""
    @staticmethod
    def dtype_names() -> list[str]:
        """The torch dtype names the reader knows, in `load`'s `hooks.dtypes` order."""
    @staticmethod
    def callable_names() -> list[tuple[str, str]]:
        """`(module, name)` of `load`'s `hooks.callables`, in order."""
    @property
    def path(self) -> str: ...
    @property
    def file_size(self) -> int: ...
    @property
    def fallback_reason(self) -> str | None:
        """Why only torch can load this checkpoint (None: this reader can)."""
    @property
    def table_error(self) -> str | None:
        """Why the tensor table is unavailable although the checkpoint loads."""
    @property
    def byteorder(self) -> str | None: ...
    @property
    def version(self) -> int: ...
    @property
    def protocol(self) -> int: ...
    @property
    def archive(self) -> str: ...
    @property
    def locations(self) -> list[str]: ...
    @property
    def record_count(self) -> int: ...
    @property
    def names(self) -> list[str]:
        """Dotted names of the tensors reachable through dicts, lists and tuples."""
    @property
    def dtypes(self) -> list[str]: ...
    @property
    def shapes(self) -> list[tuple[int, ...]]: ...
    @property
    def strides(self) -> list[tuple[int, ...]]: ...
    @property
    def storage_offsets(self) -> list[int]: ...
    @property
    def storage_keys(self) -> list[str]: ...
    @property
    def byte_ranges(self) -> list[tuple[int, int]]: ...
    @property
    def nbytes(self) -> list[int]: ...
    @property
    def requires_grad(self) -> list[bool]: ...
    @property
    def parameters(self) -> list[bool]: ...
    def value_type(self, path: Sequence[_PathPart]) -> str | None:
        """The Python type name of the value at `path` (None: only loading would tell)."""
    def mapping_items(
        self, path: Sequence[_PathPart]
    ) -> list[tuple[str | int, tuple[int, ...] | None, str | None, str | None]] | None:
        """`(key, shape, dtype, type name)` of the dict at `path`; None if not a dict."""
    def load(
        self,
        hooks: object,
        mmap: bool = True,
        rows: Sequence[int] | None = None,
        path: Sequence[_PathPart] | None = None,
        meta: bool = False,
        attrs: bool = False,
    ) -> Any:
        """Builds the checkpoint, the value at `path`, or the tensors of table rows `rows`
        (`meta`: empty meta tensors, the file's data untouched; `attrs`: the attributes BUILD
        sets on the OrderedDict at `path`, as a dict)."""
    def __len__(self) -> int: ...
