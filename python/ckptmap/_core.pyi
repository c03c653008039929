"""Type stubs for the compiled core `ckptmap._core`. Import these names from `ckptmap`."""

import re
from collections.abc import Callable, Iterable, Sequence
from typing import final

from typing_extensions import Self

__all__ = [
    "KeyRules",
    "__version__",
    "diff_keys",
    "filter_prefix_keys",
    "find_collisions",
    "group_by_owner",
]
__version__: str

_Pattern = str | re.Pattern[str]
_Repl = str | Callable[[re.Match[str]], str]

@final
class KeyRules:
    """An ordered list of `(pattern, replacement)` key rules, compiled once.

    Each rule is applied as Python's `re.sub(pattern, replacement, key)`.
    """

    def __new__(cls, rules: Iterable[tuple[_Pattern, _Repl]]) -> Self: ...
    def apply(self, keys: Iterable[str]) -> list[str]:
        """Applies every rule in order to each key."""
    def sub(self, key: str) -> str:
        """Applies every rule in order to one key."""
    @property
    def rules(self) -> list[tuple[_Pattern, _Repl]]: ...
    @property
    def native(self) -> list[bool]:
        """For each rule, whether it runs on the Rust engine."""
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
