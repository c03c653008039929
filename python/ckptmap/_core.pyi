"""Type stubs for the compiled core `ckptmap._core`. Import these names from `ckptmap`."""

import re
from collections.abc import Callable, Iterable, Sequence

__version__: str

_Pattern = str | re.Pattern[str]
_Repl = str | Callable[[re.Match[str]], str]

class KeyRules:
    """An ordered list of `(pattern, replacement)` key rules, compiled once.

    Each rule is applied as Python's `re.sub(pattern, replacement, key)`.
    """

    def __init__(self, rules: Iterable[tuple[_Pattern, _Repl]]) -> None: ...
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
