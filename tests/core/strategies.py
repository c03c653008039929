"""Hypothesis strategies for the differential tests of `ckptmap.KeyRules` against `re.sub`.

Patterns are generated *as text* over a grammar of Python's regex syntax, so the generator
reaches the parser corners (escapes, `{` as a literal, class edge cases, inline flags) that
a structured generator would smooth over. Many generated strings are not valid patterns;
`compile_or_none` tells which are, and the tests either filter on it or check that invalid
ones raise exactly what `re` raises.

Two grammars:
- `patterns(full=False)`: only constructs the Rust engine is meant to run natively; most
  generated patterns must come out `native == True` (see test_generated_patterns_mostly_native).
- `patterns(full=True)`: adds what falls back to Python's `re` (backreferences, lookaround,
  conditionals, atomic groups, possessive repeats, verbose mode, `\\N{...}`, ...).

A known engine mismatch may be kept out of a generator only with the name of the strict
xfail test in tests/core/test_rules.py that pins it (none at present).
"""

from __future__ import annotations

import re
import warnings

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

# --------------------------------------------------------------------------------------------
# Pattern compilation helpers


def compile_or_none(pattern: str | re.Pattern[str], flags: int = 0) -> re.Pattern[str] | None:
    """`re.compile(pattern, flags)`, or None when `re` rejects it. Warnings are silenced:
    Python emits FutureWarning for `[[`, `&&`, `--`, ... in classes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return re.compile(pattern, flags)
        except (re.error, OverflowError, RecursionError, ValueError, IndexError, TypeError):
            return None


def template_ok(compiled: re.Pattern[str], repl: str) -> bool:
    """Whether `re.sub` accepts the template for this pattern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compiled.sub(repl, "")
        except (re.error, IndexError, ValueError):
            return False
    return True


# --------------------------------------------------------------------------------------------
# Pattern grammar (text)

# Characters that matter for case folding and Unicode classes: Kelvin sign, long s, dotless
# i, dotted I, sharp s (and its capital), final sigma, micro sign, an Arabic-Indic digit, NEL
# (a Unicode space), a non-breaking space, an emoji outside the BMP; then word-boundary traps.
UNICODE_CHARS = [
    "é",
    "É",
    "ß",
    "ẞ",
    "İ",
    "\u0131",
    "\u017f",
    "\u212a",
    "µ",
    "Σ",
    "\u03c3",
    "ς",
    "٣",
    "\x85",
    "\xa0",
    "😀",
    # Where Python's word characters and the regex crate's differ (its \b uses its own): a
    # combining mark, a spacing mark, superscript two and a circled digit (No), a roman
    # numeral (Nl), a connector punctuation, ZERO WIDTH JOINER, a circled letter, and
    # characters newer than CPython 3.10's Unicode 13.
    "\u0301",
    "\u0903",
    "\u00b2",
    "\u2460",
    "\u216b",
    "\u203f",
    "\u200d",
    "\u24b6",
    "\U0001fae8",
    "\U00031350",
]

_PLAIN = list("abkmsxyzAKSI019_-,/:=@'<>!&~%;")
# Metacharacters (and others) escaped: all literals in Python.
_ESCAPED_LITERALS = [*("\\" + c for c in ".*+?()[]{}|^$\\-#&~/ '\"<>=!:,"), "\\é", "\\😀"]
_ESCAPES = [
    r"\n",
    r"\t",
    r"\r",
    r"\f",
    r"\v",
    r"\a",
    r"\x41",
    r"\x2e",
    r"\x7b",
    r"\x0A",
    r"\u00e9",
    r"\u212a",
    r"\u017F",
    r"\U0001F600",
    r"\U0000004b",
    r"\0",
    r"\00",
    r"\012",
    r"\101",
    r"\056",
    r"\177",
    r"\377",
]
_CATEGORIES = [r"\d", r"\w", r"\s", r"\D", r"\W", r"\S"]
_ANCHORS = ["^", "$", r"\A", r"\Z", r"\b", r"\B"]
# `{` that does not start a valid `{m,n}` is a literal; lone `}` and `]` are literals.
_BRACE_LITERALS = ["{", "{}", "{x}", "{1,a}", "{ 1}", "}", "]", "{,", "{1"]

_CLASS_CHARS = [*"abkszAKSZ09_.*+()|$^{}:,/@ ", "é", "ß", "\u212a", "\u017f", "\u0131", "İ"]
_CLASS_RANGES = [
    "a-z",
    "A-Z",
    "0-9",
    "a-f",
    "Z-a",
    r"\x00-\x7f",
    r"\x20-\x2f",
    "à-ÿ",
    r"\u0100-\u017f",
    "j-l",
    "r-t",
]
_CLASS_ESCAPES = [
    r"\d",
    r"\w",
    r"\s",
    r"\D",
    r"\W",
    r"\S",
    r"\b",
    r"\n",
    r"\t",
    r"\x41",
    r"\-",
    r"\]",
    r"\[",
    r"\\",
    r"\^",
    r"\.",
    r"\101",
    r"\0",
    r"\7",
    r"\u00e9",
]
# Python keeps these literal (with a FutureWarning): POSIX-looking classes, set operations.
_CLASS_ODDITIES = ["[:alpha:]", "[:digit:]", "&&", "--", "~~", "||", "["]

_QUANTIFIERS = [
    "*",
    "+",
    "?",
    "{0}",
    "{1}",
    "{2}",
    "{1,}",
    "{,2}",
    "{0,1}",
    "{1,3}",
    "{2,3}",
    "{,}",
]


def _class(full: bool) -> st.SearchStrategy[str]:
    item = st.one_of(
        st.sampled_from(_CLASS_CHARS),
        st.sampled_from(_CLASS_RANGES),
        st.sampled_from(_CLASS_ESCAPES),
        st.sampled_from(_CLASS_ODDITIES),
    )
    return st.builds(
        lambda neg, close_first, dash_first, items, dash_last: (
            "["
            + ("^" if neg else "")
            + ("]" if close_first else "")
            + ("-" if dash_first else "")
            + "".join(items)
            + ("-" if dash_last else "")
            + "]"
        ),
        st.booleans(),
        st.integers(0, 5).map(lambda n: n == 0),
        st.integers(0, 5).map(lambda n: n == 0),
        st.lists(item, min_size=0, max_size=4),
        st.integers(0, 5).map(lambda n: n == 0),
    )


def _atoms(full: bool) -> st.SearchStrategy[str]:
    atoms = [
        st.sampled_from(_PLAIN),
        st.sampled_from(_PLAIN),
        st.sampled_from(_ESCAPED_LITERALS),
        st.sampled_from(_ESCAPES),
        st.sampled_from(UNICODE_CHARS),
        st.sampled_from(_BRACE_LITERALS),
        st.sampled_from(_CATEGORIES),
        st.sampled_from(_ANCHORS),
        st.just("."),
        st.just(""),
        st.sampled_from(["(?#c)", "(?#a\\)b)", "(?#)"]),
        _class(full),
        # Literal runs so keys built from the pattern's alphabet match often.
        st.sampled_from(["module", "layers", "weight", "experts", "w1", "norm"]),
    ]
    if full:
        atoms += [
            # Backreferences (valid only when the group exists; compile filters the rest).
            st.sampled_from([r"\1", r"\2", "(?P=n)", "(?P=m)"]),
            st.sampled_from([r"\N{LATIN SMALL LETTER E WITH ACUTE}", r"\N{DIGIT ONE}"]),
        ]
    return st.one_of(atoms)


# Scoped flags. `(?a:...)`/`(?u:...)` change `\w\s\d\b` and meet CPython's prefilter quirk
# (see test_scoped_ascii_flag_on_leading_category_follows_python_prefilter).
_SCOPED_NATIVE = [
    *["(?i:", "(?-i:", "(?s:", "(?-s:", "(?m:", "(?-m:", "(?im:", "(?i-s:", "(?s-i:"],
    *["(?a:", "(?u:", "(?ai:", "(?u-i:"],
]
_SCOPED_FULL = ["(?x:", "(?-x:", "(?ix:"]
_GROUP_NATIVE = ["(", "(?:", "(?P<n>", "(?P<m>", "(?P<é>", "(?P<_x1>"]
_GROUP_FULL = ["(?=", "(?!", "(?<=", "(?<!", "(?>", "(?(1)", "(?(n)"]

_GLOBAL_NATIVE = [
    "(?i)",
    "(?m)",
    "(?s)",
    "(?a)",
    "(?u)",
    "(?im)",
    "(?is)",
    "(?ms)",
    "(?ai)",
    "(?#c)",
]
_GLOBAL_FULL = ["(?x)", "(?ix)", "(?x)(?#c)"]


def patterns(full: bool = True, max_leaves: int = 8) -> st.SearchStrategy[str]:
    """Python regex patterns as text; not all are valid (see `compile_or_none`)."""
    groups = _GROUP_NATIVE + _SCOPED_NATIVE + ((_GROUP_FULL + _SCOPED_FULL) if full else [])
    quantifier = st.tuples(
        st.sampled_from(_QUANTIFIERS),
        st.sampled_from(["", "", "?", "+"] if full else ["", "", "?"]),
    ).map("".join)

    def extend(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.lists(children, min_size=2, max_size=4).map("".join),
            st.lists(children, min_size=2, max_size=3).map("|".join),
            st.tuples(st.sampled_from(groups), children).map(lambda t: t[0] + t[1] + ")"),
            st.tuples(children, quantifier).map("".join),
            st.tuples(st.sampled_from(groups), children, quantifier).map(
                lambda t: t[0] + t[1] + ")" + t[2]
            ),
        )

    body = st.recursive(_atoms(full), extend, max_leaves=max_leaves)
    prefix = st.lists(
        st.sampled_from(_GLOBAL_NATIVE + (_GLOBAL_FULL if full else [])), max_size=2
    ).map("".join)
    return st.tuples(st.integers(0, 3).map(lambda n: n == 0), prefix, body).map(
        lambda t: (t[1] if t[0] else "") + t[2]
    )


def valid_patterns(full: bool = True) -> st.SearchStrategy[str]:
    return patterns(full).filter(lambda p: compile_or_none(p) is not None)


# Flags for `re.compile(pattern, flags)`; `re.UNICODE` is implicit for str patterns.
FLAG_SETS = [
    0,
    re.IGNORECASE,
    re.MULTILINE,
    re.DOTALL,
    re.ASCII,
    re.IGNORECASE | re.ASCII,
    re.MULTILINE | re.DOTALL,
    re.IGNORECASE | re.MULTILINE,
    re.UNICODE,
    re.VERBOSE,
]

# --------------------------------------------------------------------------------------------
# Replacement templates


def templates(compiled: re.Pattern[str], *, invalid: bool = False) -> st.SearchStrategy[str]:
    """Replacement templates for `compiled`; with `invalid`, each contains one piece that
    `re` may reject (unknown group numbers or names, bad escapes, odd `\\g<...>` forms)."""
    pieces = [
        "x",
        "X",
        ".",
        "_",
        "blocks.",
        "é",
        "😀",
        "$1",
        "$",
        "&",
        "%",
        "{}",
        r"\\",
        r"\n",
        r"\t",
        r"\a",
        r"\.",
        r"\-",
        r"\$",
        r"\é",
        r"\0",
        r"\00",
        r"\101",
        r"\g<0>",
    ]
    for i in range(1, min(compiled.groups, 3) + 1):
        pieces += [f"\\{i}", f"\\g<{i}>"]
    if compiled.groups >= 1:
        pieces += [r"\g<01>"]
    for name in compiled.groupindex:
        pieces.append(f"\\g<{name}>")
    valid = st.lists(st.sampled_from(pieces), max_size=5).map("".join)
    if not invalid:
        return valid
    odd = [r"\9", r"\g<9>", r"\g<nope>", r"\q", r"\g<", r"\g<1a>", r"\x41", "\\", r"\g<>"]
    odd += [r"\g<-1>", r"\g<+1>", r"\g< 1>", r"\g<1_0>", r"\400", "\\g<\u0661>", r"\g<99999999999>"]
    return st.tuples(valid, st.sampled_from(odd), valid).map("".join)


# --------------------------------------------------------------------------------------------
# Keys

SEGMENTS = [
    "module",
    "model",
    "backbone",
    "encoder",
    "layers",
    "layer1",
    "blocks",
    "experts",
    "attn",
    "mlp",
    "w1",
    "w2",
    "w3",
    "weight",
    "bias",
    "running_mean",
    "num_batches_tracked",
    "norm",
    "conv1",
    "bn1",
    "downsample",
    "q_proj",
    "lm_head",
    "_orig_mod",
    "ema",
    "_extra_state",
]
_ODD_SEGMENTS = ["é", "straße", "İ", "\u212aelvin", "\u017f", "😀", "٣", "a b", "\x1c", "\x85", ""]


def dotted_keys(odd: bool = True) -> st.SearchStrategy[str]:
    """Realistic state-dict keys, e.g. `module.backbone.layers.3.experts.12.w1.weight`."""
    segment = st.one_of(
        st.sampled_from(SEGMENTS),
        st.integers(0, 4100).map(str),
        *([st.sampled_from(_ODD_SEGMENTS)] if odd else []),
    )
    key = st.lists(segment, min_size=1, max_size=7).map(".".join)
    if not odd:
        return key
    return st.tuples(key, st.sampled_from(["", "", "", "\n", "\n\n", " "])).map("".join)


_PROBE_CHARS = [*UNICODE_CHARS, "\x1c", "\u0130", "\n", " ", "a", "A", "k", "K", "s", "_", "0", "."]


def probe_keys(patterns_: list[str | re.Pattern[str]]) -> list[str]:
    """A fixed set of short keys added to every generated case: each character of the
    patterns' alphabet and of the Unicode traps, alone, paired and after a word character,
    plus the empty key and newline forms. Cheap, and it finds per-character divergences
    (Unicode classes, case folding, prefilters) far sooner than random keys do."""
    sources = [p.pattern if isinstance(p, re.Pattern) else p for p in patterns_]
    chars = sorted(set("".join(sources)) - {"\\"}) + _PROBE_CHARS
    keys = ["", "\n", "\n\n", "a\n", "ab", "a b", "a.b", "a\nb"]
    for c in dict.fromkeys(chars):
        keys += [c, c + c, "a" + c, c + "a", "." + c + "\n"]
    return keys


@st.composite
def _matching(draw: st.DrawFn, compiled: re.Pattern[str]) -> str:
    """A string `compiled` matches somewhere; "" for patterns hypothesis cannot satisfy
    (e.g. `[^\\d\\D]`, an empty class), whose compiled form it cannot read (CPython 3.13
    compiles an empty negative lookbehind `(?<!)` to a FAILURE opcode, which hypothesis
    raises NotImplementedError for) or that crash `re` itself (hypothesis checks its
    strings with `.search`; CPython 3.11's `re.search(r'((a)|(b)|c|)*+', 'ab')` raises
    SystemError: "The span of capturing group is wrong")."""
    try:
        return draw(st.from_regex(compiled))
    except (InvalidArgument, NotImplementedError, SystemError):
        return ""


def keys_for(patterns_: list[str | re.Pattern[str]]) -> st.SearchStrategy[str]:
    """Keys likely to interact with the given patterns: strings the patterns match (by
    hypothesis's `from_regex`), strings built from their own characters and literal runs,
    plus realistic keys, Unicode, newlines, lone surrogates and the empty key."""
    compiled = [c for c in map(compile_or_none, patterns_) if c is not None]
    patterns_ = [c.pattern for c in compiled]
    chars = sorted(set("".join(patterns_)) - {"\\"})
    runs = sorted({run for p in patterns_ for run in re.findall(r"[A-Za-z0-9_]{2,}", p)})
    pieces = chars + runs + ["a", "k", "s", "K", "S", ".", "0", "1", "12", "_", "\n"]
    pieces += [*UNICODE_CHARS, "\x1c", "\u212a", "\u0130"]
    built = st.lists(st.sampled_from(pieces), max_size=10).map("".join)
    matching = [_matching(c) for c in compiled]
    return st.one_of(
        built,
        built,
        *matching,
        *matching,
        dotted_keys(),
        st.sampled_from(["", "\n", "a\n", "é", "ab\n\n", "\n\na", "a\ud800b", "\udfff"]),
        st.text(st.characters(max_codepoint=0x2FF, exclude_categories=("Cs",)), max_size=6),
    )


# --------------------------------------------------------------------------------------------
# Realistic rules: what users write in `revise_keys`. All of these must run natively.

_REALISTIC_FIXED = [
    (r"^module\.", ""),
    (r"^_orig_mod\.", ""),
    (r"^(backbone|encoder)\.", r"model.\1."),
    (r"layers\.(\d+)", r"blocks.\1"),
    (r"\.experts\.(\d+)\.w([123])\.", r".experts.\1.proj\2."),
    (r"(?P<layer>\d+)\.attn", r"\g<layer>.self_attn"),
    (r"\.weight$", ".w"),
    (r"\.bias\Z", ".b"),
    (r"^(?:model\.)?", "model."),
    (r"norm(\d*)", r"ln\1"),
    (r"\bbn(\d)", r"norm\1"),
    (r"(?i)LM_HEAD", "head"),
    (r"[._]", "/"),
    (r"^(.*)\.(weight|bias)$", r"\2:\1"),
    (r"\.(\d+)\.", r"[\1]."),
    (r"^", "prefix."),
    (r"$", ".suffix"),
    (r"\.?downsample\.", ".shortcut."),
    (r"(?s).*", r"<\g<0>>"),
    (r"running_(mean|var)", r"stats.\1"),
    (r"w[1-3]", "w"),
    (r"\.{2,}", "."),
    (r"[^a-z0-9.]+", "_"),
    (r"(?m)^ema\.", ""),
    (r"^(?P<head>[a-z]+)\.", r"\g<head>/"),
]


def realistic_rules() -> st.SearchStrategy[tuple[str, str]]:
    seg = st.sampled_from(SEGMENTS)
    return st.one_of(
        st.sampled_from(_REALISTIC_FIXED),
        st.tuples(seg).map(lambda t: (f"^{re.escape(t[0])}\\.", "")),
        st.tuples(seg, seg).map(lambda t: (rf"{re.escape(t[0])}\.(\d+)", rf"{t[1]}.\1")),
        st.tuples(seg, seg).map(lambda t: (rf"\.{re.escape(t[0])}$", f".{t[1]}")),
        st.tuples(seg, seg).map(lambda t: (rf"(^|\.){re.escape(t[0])}(\.|$)", rf"\1{t[1]}\2")),
    )
