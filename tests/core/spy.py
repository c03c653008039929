"""Building `KeyRules` whose rules' own `re` patterns refuse to run: proof that a rule reported
native never hands a key to Python's `re`.

`KeyRules` compiles each rule with `re.compile` (for validation and for the rules that run on
`re`). `spied_rules` builds one while `re.compile` returns a `Spy` around the real pattern,
then arms the spies: from then on, a call to a spy's `sub` on a rule reported native fails the
test. (`ckptmap._re_tables` also compiles patterns, to read this interpreter's tables; those
are not the rules' patterns and stay real.)
"""

from __future__ import annotations

import re
from typing import Any

_REAL_COMPILE = re.compile


class Spy:
    """A compiled pattern that counts `sub` calls once armed, and refuses them if `native`."""

    def __init__(self, real: re.Pattern[str]) -> None:
        self.real = real
        self.armed = False
        self.native = False
        self.calls = 0

    def sub(self, repl: Any, string: str, count: int = 0) -> str:
        if self.armed:
            self.calls += 1
            if self.native:
                raise AssertionError(
                    f"rule {self.real.pattern!r} is reported native but ran on re: {string!r}"
                )
        return self.real.sub(repl, string, count)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def spied_rules(rules: list[tuple[Any, Any]]) -> tuple[Any, list[Spy]]:
    """`KeyRules(rules)` built on spies; returns it and the spies, armed, in rule order."""
    from ckptmap import KeyRules

    spies: list[Spy] = []
    expected = [pattern for pattern, _ in rules]

    def compile_spy(pattern: Any, flags: int = 0) -> Any:
        real = _REAL_COMPILE(pattern, flags)
        if len(spies) < len(expected) and pattern is expected[len(spies)]:
            spies.append(Spy(real))
            return spies[-1]
        return real  # not a rule's own pattern (e.g. ckptmap._re_tables reading the tables)

    re.compile = compile_spy  # type: ignore[assignment]
    try:
        kr = KeyRules(rules)
    finally:
        re.compile = _REAL_COMPILE
    for spy, native in zip(spies, kr.native, strict=True):
        spy.armed, spy.native = True, native
    return kr, spies
