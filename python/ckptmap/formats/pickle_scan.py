"""Which globals a pickle references, read from its opcodes: nothing imported or executed.

The pre-scan every restricted load runs first (`ckptmap.formats.pickled`, the DCP
``.metadata`` reader, the replay that guards torch's zip reader): it names the globals to
refuse before an unpickler sees them, and refuses damage that would make the C unpickler
allocate without bound (a memo slot numbered past the pickle's own bytes).
"""

from __future__ import annotations

import pickletools
from typing import IO, Any

__all__ = ["pickle_globals"]

_STRING_OPS = frozenset(
    {
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
    }
)
_NO_PUSH_OPS = frozenset({"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"})


def pickle_globals(stream: IO[bytes], count: int = 1) -> set[str]:
    """The ``module.name`` of every global the next `count` pickles in `stream` reference.

    Reads opcodes with `pickletools.genops`; nothing is imported or executed. STACK_GLOBAL's
    operands are taken from the strings pushed just before it, which is what Python's pickler
    writes; a hand-crafted pickle can hide a name from this scan, never from torch's
    unpickler, which is what actually decides.

    Raises:
        ValueError: the stream is not a complete pickle (truncated, damaged, or a memo slot
            numbered past its own bytes).
    """
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    def name(module: str, qualname: str) -> str:
        # Python 2 names, mapped as both pickle and torch's unpickler map them.
        if (module, qualname) in NAME_MAPPING:
            module, qualname = NAME_MAPPING[(module, qualname)]
        elif module in IMPORT_MAPPING:
            module = IMPORT_MAPPING[module]
        return f"{module}.{qualname}"

    found: set[str] = set()
    for _ in range(count):
        memo: dict[int, Any] = {}
        pushed: list[Any] = []
        for opcode, arg, pos in pickletools.genops(stream):
            op = opcode.name
            if op in ("GLOBAL", "INST"):
                module, _, qualname = str(arg).partition(" ")
                found.add(name(module, qualname))
                pushed.append(None)
            elif op == "STACK_GLOBAL":
                top: list[Any] = pushed[-2:] if len(pushed) >= 2 else [None, None]
                if isinstance(top[0], str) and isinstance(top[1], str):
                    found.add(name(top[0], top[1]))
                else:
                    found.add("<a global built at load time>")
                pushed.append(None)
            elif op == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
                # Picklers number memo slots from 0, one per object: a slot past the bytes
                # read so far is damage, and the C unpickler would size its memo to it (a
                # 2**31 slot asks for 16 GiB).
                if int(arg) > (pos or 0):  # type: ignore[arg-type]
                    raise ValueError(f"memo slot {arg} at byte {pos} is past what was pickled")
                memo[int(arg)] = pushed[-1] if pushed else None  # type: ignore[arg-type]
            elif op in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(int(arg)))  # type: ignore[arg-type]
            elif op in _STRING_OPS:
                pushed.append(arg if isinstance(arg, str) else None)
            elif op not in _NO_PUSH_OPS:
                pushed.append(None)
            if len(pushed) > 64:
                del pushed[:-8]
    return found
