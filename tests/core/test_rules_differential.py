"""Differential tests: `ckptmap.KeyRules` must give exactly what chained `re.sub` calls give
(DESIGN.md, contract 1), on generated patterns, templates and keys.

A known engine mismatch may be excluded (in tests/core/strategies.py or here) only with the name
of the strict xfail test in tests/core/test_rules.py that pins it; there are none at present.
"""

from __future__ import annotations

import random
import re
import warnings

import pytest
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st
from spy import spied_rules
from strategies import (
    FLAG_SETS,
    SEGMENTS,
    UNICODE_CHARS,
    compile_or_none,
    dotted_keys,
    keys_for,
    patterns,
    probe_keys,
    realistic_rules,
    template_ok,
    templates,
)

from ckptmap import KeyRules
from ckptmap.errors import BacktrackingRuleError, InvalidKeyRuleError, KeyNotUnicodeError

# Pattern parsing warns (FutureWarning) for `[[`, `&&`, `--` ... in classes, and the
# template parser for `\g<+1>` on newer Pythons: generated input, not our concern.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

_LENIENT = [HealthCheck.filter_too_much, HealthCheck.too_slow]
_FILTERING = settings(suppress_health_check=_LENIENT)

Rule = tuple  # (pattern: str | re.Pattern, repl: str | callable)


def expected(rules: list[Rule], keys: list[str]) -> list[str]:
    out = []
    for key in keys:
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out.append(key)
    return out


def _raises(rules: list[Rule], key: str) -> BaseException | None:
    try:
        expected(rules, [key])
    except Exception as e:  # re itself can fail (e.g. SystemError from CPython bugs)
        return e
    return None


def _reaches_native_with_surrogate(kr: KeyRules, rules: list[Rule], key: str) -> bool:
    """Whether `key`, run through the chain, meets a native rule while it is not valid Unicode
    (KeyNotUnicodeError: the native engine reads UTF-8 only)."""
    for native, (pattern, repl) in zip(kr.native, rules, strict=True):
        if native and any(0xD800 <= ord(c) <= 0xDFFF for c in key):
            return True
        key = re.sub(pattern, repl, key)
    return False


def check(rules: list[Rule], keys: list[str]) -> KeyRules | None:
    try:
        kr = KeyRules(rules)
    except BacktrackingRuleError as e:
        # Refused: only a rule that runs on `re` is ever judged, and its pattern is the one
        # named (tests/core/test_rules.py pins which shapes are refused).
        event("rule refused: exponential backtracking")
        pattern = rules[e.rule][0]
        assert e.pattern == (pattern.pattern if isinstance(pattern, re.Pattern) else pattern)
        # The other rules are judged alone (another of them may be refused too).
        rest = [r for i, r in enumerate(rules) if i != e.rule]
        if rest:
            check(rest, keys)
        return None
    # Where re.sub raises, KeyRules raises the same.
    for key, error in [(k, _raises(rules, k)) for k in keys]:
        if error is None:
            continue
        event("re raised")
        keys = [k for k in keys if k != key]
        with pytest.raises(type(error)) as got:
            kr.apply([key])
        assert str(got.value) == str(error)
    # A key with a lone surrogate that reaches a native rule is a typed error.
    for key in [k for k in keys if _reaches_native_with_surrogate(kr, rules, k)]:
        event("surrogate key refused")
        keys = [k for k in keys if k != key]
        with pytest.raises(KeyNotUnicodeError):
            kr.apply([key])
    want = expected(rules, keys)
    got = kr.apply(keys)
    assert got == want, _explain(kr, rules, keys, got, want)
    for native in kr.native:
        event("native rule" if native else "fallback rule")
    if any(w != k for w, k in zip(want, keys, strict=True)):
        event("some key changed")
    return kr


def _explain(kr, rules, keys, got, want) -> str:
    lines = [f"native={kr.native} translations={kr.native_patterns}"]
    for k, g, w in zip(keys, got, want, strict=True):
        if g != w:
            lines.append(f"rules={rules!r} key={k!r}: KeyRules={g!r} re.sub={w!r}")
    return "\n".join(lines)


@st.composite
def rule(draw, full: bool = True) -> tuple[str, str]:
    pattern = draw(patterns(full))
    compiled = compile_or_none(pattern)
    assume(compiled is not None)
    repl = draw(templates(compiled))
    assume(template_ok(compiled, repl))
    return pattern, repl


@st.composite
def rules_and_keys(draw, full: bool = True, max_rules: int = 3):
    rules = draw(st.lists(rule(full), min_size=1, max_size=max_rules))
    keys = draw(st.lists(keys_for([p for p, _ in rules]), min_size=1, max_size=12))
    return rules, keys + probe_keys([p for p, _ in rules])


# --------------------------------------------------------------------------------------------
# The main properties


@_FILTERING
@given(rules_and_keys(full=True))
def test_apply_equals_re_sub_chain(case):
    rules, keys = case
    check(rules, keys)


@_FILTERING
@given(rules_and_keys(full=False))
def test_apply_equals_re_sub_chain_native_grammar(case):
    rules, keys = case
    check(rules, keys)


@_FILTERING
@given(rule(full=True), st.data())
def test_sub_equals_re_sub(r, data):
    key = data.draw(keys_for([r[0]]))
    kr = check([r], [key, *probe_keys([r[0]])])
    if (
        kr is not None
        and _raises([r], key) is None
        and not _reaches_native_with_surrogate(kr, [r], key)
    ):
        assert kr.sub(key) == re.sub(r[0], r[1], key)


@_FILTERING
@given(st.data())
def test_compiled_patterns_honour_flags(data):
    rules = []
    for _ in range(data.draw(st.integers(1, 2))):
        text = data.draw(patterns(full=True))
        flags = data.draw(st.sampled_from(FLAG_SETS))
        compiled = compile_or_none(text, flags)
        assume(compiled is not None)
        repl = data.draw(templates(compiled))
        assume(template_ok(compiled, repl))
        rules.append((compiled, repl))
    keys = data.draw(st.lists(keys_for([c for c, _ in rules]), min_size=1, max_size=10))
    kr = check(rules, keys + probe_keys([c for c, _ in rules]))
    assert kr is None or [p for p, _ in kr.rules] == [p for p, _ in rules]


@given(st.lists(realistic_rules(), min_size=1, max_size=4), st.lists(dotted_keys(), max_size=20))
def test_realistic_rules_run_natively(rules, keys):
    kr = check(rules, keys)
    assert kr is not None and all(kr.native), list(zip(rules, kr.fallback_reasons, strict=True))


def test_generated_patterns_mostly_native():
    """The native grammar must mostly run on the Rust engine: the differential properties
    must not pass only because everything falls back to `re`. Counted over many independent
    generated patterns (deterministic: derandomized, no shrinking), so one unlucky draw of
    fallback-heavy patterns cannot fail it."""
    counts = {True: 0, False: 0}
    reasons: dict[str, int] = {}

    @settings(
        max_examples=300,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=[*_LENIENT, HealthCheck.nested_given],
    )
    @given(patterns(full=False))
    def collect(pattern):
        if compile_or_none(pattern) is None:
            return
        try:
            kr = KeyRules([(pattern, "<\\g<0>>")])
        except BacktrackingRuleError:  # a fallback rule, refused
            counts[False] += 1
            reasons["refused"] = reasons.get("refused", 0) + 1
            return
        counts[kr.native[0]] += 1
        if not kr.native[0]:
            reasons[kr.fallback_reasons[0]] = reasons.get(kr.fallback_reasons[0], 0) + 1

    collect()
    total = counts[True] + counts[False]
    assert total >= 100
    assert counts[True] >= 0.6 * total, (counts, reasons)


# --------------------------------------------------------------------------------------------
# Native means native: the keys the fast translation cannot take (non-ASCII, a final newline,
# the empty key) go to the rule's exact form, never to `re`.

_EXACT_ALPHABET = [*UNICODE_CHARS, "\n", "a", "k", "K", "s", "x", "_", "0", "1", ".", " ", "\x1c"]


@_FILTERING
@given(st.data())
def test_native_rules_never_run_on_re_for_any_key(data):
    rules = []
    for _ in range(data.draw(st.integers(1, 2))):
        text = data.draw(patterns(full=False))
        flags = data.draw(st.sampled_from([f for f in FLAG_SETS if not f & re.VERBOSE]))
        compiled = compile_or_none(text, flags)
        assume(compiled is not None)
        repl = data.draw(templates(compiled))
        assume(template_ok(compiled, repl))
        rules.append((compiled, repl))
    keys = data.draw(
        st.lists(
            st.one_of(
                st.lists(st.sampled_from(_EXACT_ALPHABET), max_size=8).map("".join),
                keys_for([c for c, _ in rules]).filter(
                    lambda k: not any(0xD800 <= ord(c) <= 0xDFFF for c in k)
                ),
            ),
            min_size=1,
            max_size=10,
        )
    )
    keys += ["", "\n", "a\n", "\u0301\n", "é", "x\u0301", "\u00b2x"]
    keys = [k for k in keys if _raises(rules, k) is None]
    try:
        kr, spies = spied_rules(rules)
    except BacktrackingRuleError:
        event("rule refused: exponential backtracking")
        return
    assert kr.apply(keys) == expected(rules, keys), _explain(
        kr, rules, keys, kr.apply(keys), expected(rules, keys)
    )
    for spy, native in zip(spies, kr.native, strict=True):
        event("native rule" if native else "fallback rule")
        assert spy.calls == 0 or not native


# --------------------------------------------------------------------------------------------
# Errors: anything `re` rejects raises the same exception, with the same message


_JUNK = st.sampled_from(
    [
        "(",
        ")",
        "[",
        "*",
        "\\",
        "\\q",
        "\\8",
        "(?P<1>a)",
        "[z-a]",
        "(?<=a+)",
        "a{3,1}",
        "a{99999999999}",
        "(?i",
        "(?z)",
        "a**",
        "(?P=x)",
        "\\x4",
        "\\u12",
        "\\U00110000",
        "[\\d-z]",
        "(?a)(?u)",
        "a(?i)",
        "(?-a:x)",
        "\\N{NOT A NAME}",
        "(?(2)a)",
        "\\400",
    ]
)


@_FILTERING
@given(st.lists(st.one_of(patterns(full=True), _JUNK), min_size=1, max_size=3).map("".join))
def test_invalid_patterns_raise_what_re_raises(pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            re.sub(pattern, "", "key")
        except Exception as e:  # whatever re raises, KeyRules must raise too
            want = e
        else:
            assume(False)
        with pytest.raises(type(want)) as got:
            KeyRules([(pattern, "")])
    expected = InvalidKeyRuleError if type(want) is re.error else type(want)
    assert type(got.value) is expected
    assert str(got.value) == str(want)


@_FILTERING
@given(st.data())
def test_invalid_templates_raise_what_re_raises(data):
    pattern = data.draw(patterns(full=True))
    compiled = compile_or_none(pattern)
    assume(compiled is not None)
    repl = data.draw(templates(compiled, invalid=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            re.sub(pattern, repl, "")
        except Exception as e:
            want = e
        else:
            assume(False)
        with pytest.raises(type(want)) as got:
            KeyRules([("x", "y"), (pattern, repl)])
    expected = InvalidKeyRuleError if type(want) is re.error else type(want)
    assert type(got.value) is expected
    assert str(got.value) == str(want)


# --------------------------------------------------------------------------------------------
# Many keys: the parallel path (>= 16,384 keys) with per-key fallbacks mixed in


def _many_keys(seed: int, n: int = 20_000) -> list[str]:
    rnd = random.Random(seed)
    odd = ["é", "ß", "İ", "\u212a", "😀", "٣", "\x85"]
    keys = []
    for i in range(n):
        parts = ["module"] if rnd.random() < 0.5 else []
        parts += [rnd.choice(SEGMENTS), str(rnd.randrange(64))]
        parts += [rnd.choice(["experts", "layers", "norm"]), str(i % 4096)]
        parts.append(rnd.choice(["w1", "w2", "w3", "weight", "bias"]))
        key = ".".join(parts)
        r = rnd.random()
        if r < 0.05:
            key += "\n"  # `$` rules need Python for this key
        elif r < 0.10:
            key = key.replace("weight", "wéight") + rnd.choice(odd)  # `\w`/`(?i)` need Python
        elif r < 0.11:
            key = ""
        keys.append(key)
    return keys


_LARGE_RULES = [
    (r"^module\.", ""),
    (r"\.weight$", ".w"),
    (r"(\w+)\.(\d+)\.", r"\1[\2]."),
    (r"(?i)EXPERTS", "E"),
    (r"(\d)\1", r"<\1\1>"),  # backreference: the whole rule runs on re
    (r"w(\d)$", r"W\1"),
    (r"\s", "_"),
]


@settings(max_examples=8)
@given(
    st.lists(st.sampled_from(_LARGE_RULES), min_size=1, max_size=4, unique=True),
    st.integers(0, 2**32),
)
def test_many_keys_with_per_key_fallbacks(rules, seed):
    keys = _many_keys(seed)
    assert len(keys) > 16_384
    kr = check(rules, keys)
    assert kr is not None and len(kr.apply(keys)) == len(keys)


def test_many_keys_all_fallback_kinds_at_once():
    rules = [
        (r"^module\.", ""),
        (r"\.weight$", ".w"),
        (r"(?i)experts\.(\d+)", r"E\1"),
        (r"(\d)\1", r"<\1\1>"),
        (r"\w+$", lambda m: m.group(0).upper()),
        (r"\b(w\d)\b", r"[\1]"),
    ]
    keys = _many_keys(7)
    kr = KeyRules(rules)
    assert kr.native == [True, True, True, False, False, True]
    assert kr.apply(keys) == expected(rules, keys)


@settings(max_examples=10)
@given(st.lists(realistic_rules(), min_size=1, max_size=3), st.integers(0, 2**32))
def test_many_keys_realistic(rules, seed):
    rnd = random.Random(seed)
    keys = _many_keys(seed, 17_000)
    rnd.shuffle(keys)
    keys += [c * 3 for c in UNICODE_CHARS] + ["", "\n", "a\n"]
    check(rules, keys)
