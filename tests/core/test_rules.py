"""`ckptmap.KeyRules`: explicit traps where Python's `re.sub` is easy to get wrong,
construction errors, and the object's API. The generated differential tests live in
tests/core/test_rules_differential.py.

The regression tests at the end of this file are the mismatches the differential tests
found (each was first pinned as a strict xfail, then fixed in the engine).
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import warnings

import pytest
from spy import spied_rules

from ckptmap import KeyRules
from ckptmap.errors import (
    BacktrackingRuleError,
    CkptmapError,
    InvalidKeyRuleError,
    KeyNotUnicodeError,
)


def re_sub(pattern, repl, key):
    with warnings.catch_warnings():
        # FutureWarning: `[[`, `&&`, `--` in classes; DeprecationWarning: `\g<+1>`.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return re.sub(pattern, repl, key)


def rules_of(pattern, repl):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return KeyRules([(pattern, repl)])


# Syntax that only some of the supported CPythons accept. Where this interpreter's `re`
# rejects it, KeyRules raises exactly what `re` raises; where it accepts it, KeyRules gives
# exactly its result.
SINCE_3_11 = {  # atomic groups and possessive repeats
    "(?>a+)b", "(?>ab|a)c", "a*+a", "a++b", "a?+a", "a{1,2}+a", "a*+", "a++",
}  # fmt: skip
BEFORE_3_11 = {"a(?i)b"}  # global flags after the start (a DeprecationWarning in 3.10)
REPL_BEFORE_3_12 = {"\\g<+1>"}  # a signed group number (a DeprecationWarning in 3.11)


def accepted_here(pattern: str, repl: str = "x") -> bool:
    """Whether this interpreter's `re` accepts a rule written in version-dependent syntax."""
    version = sys.version_info[:2]
    return not (
        (pattern in SINCE_3_11 and version < (3, 11))
        or (pattern in BEFORE_3_11 and version >= (3, 11))
        or (repl in REPL_BEFORE_3_12 and version >= (3, 12))
    )


def same_error(want: BaseException, got: BaseException) -> None:
    """`got` is what re.sub raised (`want`): the same class and message, except that an
    `re.error` comes as `InvalidKeyRuleError`, an `re.error` and a `CkptmapError` that keeps
    `msg`, `pattern` and `pos`."""
    if type(want) is re.error:
        assert type(got) is InvalidKeyRuleError
        assert (got.msg, got.pattern, got.pos) == (want.msg, want.pattern, want.pos)
    else:
        assert type(got) is type(want)
    assert str(got) == str(want)


# (pattern, repl, key). Every case: KeyRules gives exactly re.sub's result.
TRAPS = [
    # Empty matches next to a match (Python 3.7+ rules).
    ("x*", "-", "abxd"),
    ("x*", "-", "xx"),
    ("a*", "-", "baaac"),
    ("", "-", ""),
    ("", "-", "ab"),
    ("", "-", "é😀"),
    ("^", "p.", ""),
    ("$", ".s", ""),
    ("a|", "-", "ba"),
    ("(?:a|b)?", "<\\g<0>>", "abc"),
    ("\\b", "|", "ab cd"),
    ("\\b", "|", ""),
    ("\\B", "|", "ab cd"),
    ("\\B", "|", "a"),
    # Lazy repeats and empty-first alternation (the engine lets these fall back).
    ("a??", "-", "aa"),
    ("a*?", "-", "aab"),
    ("(|a)", "-", "aa"),
    ("(|a)+", "<\\1>", "aab"),
    ("(?:|a)b", "-", "ab"),
    ("a{0,2}?", "-", "aaa"),
    # `$` before a trailing newline, `\Z`, MULTILINE.
    ("$", "X", "a\n"),
    ("$", "X", "\n"),
    ("a$", "b", "a\n"),
    ("a$", "b", "a\n\n"),
    ("a\\Z", "b", "a\n"),
    ("weight$", "w", "x.weight\n"),
    ("weight\\Z", "w", "x.weight\n"),
    ("(?m)a$", "b", "a\nxa\n"),
    ("(?m)^", ">", "a\nb\n"),
    ("(?m)$", "<", "a\nb\n"),
    ("(?m)^$", "E", "a\n\nb\n"),
    (".", "-", "a\nb"),
    ("(?s).", "-", "a\nb"),
    ("(?s:.)$", "-", "ab\n"),
    # `{` as a literal, and `{m,n}` forms.
    ("a{", "x", "a{"),
    ("{", "x", "{}"),
    ("a{}", "x", "a{}"),
    ("a{x}", "x", "a{x}"),
    ("a{1,a}", "x", "a{1,a}"),
    ("a{ 1}", "x", "a{ 1}"),
    ("a{,3}", "-", "aaaaa"),
    ("a{,}", "-", "aaab"),
    ("a{2}", "-", "aaaaa"),
    ("a{2,}", "-", "aaaaa"),
    ("a{1,2}?", "-", "aaaaa"),
    ("a{0}b", "-", "ab"),
    ("}", "-", "a}"),
    ("]", "-", "a]"),
    # Classes: `]` first, `-` first/last, escapes inside, POSIX-looking syntax (literal in
    # Python, with a FutureWarning), set-operation-looking pairs.
    ("[]a]", "-", "a]b"),
    ("[^]a]", "-", "a]b"),
    ("[-a]", "-", "a-b"),
    ("[a-]", "-", "a-b"),
    ("[\\w-]", "-", "a-b."),
    ("[\\d.]+", "N", "layers.12.w"),
    ("[\\b]", "-", "a\bb"),
    ("[\\]]", "-", "a]"),
    ("[[:alpha:]]", "-", "a[:]b"),
    ("[[:digit:]]+", "-", "digit1"),
    ("[a&&b]", "-", "a&b"),
    ("[+--]", "-", "a+,-b"),
    ("[a~~b]", "-", "a~b"),
    ("[a||b]", "-", "a|b"),
    ("[\\x41-\\x43]", "-", "ABCD"),
    ("[\\101]", "-", "A"),
    ("[^\\W\\d]", "-", "a1_é"),
    # Atomic groups and possessive repeats (Python 3.11+; fall back).
    ("(?>a+)b", "-", "aab"),
    ("(?>ab|a)c", "-", "ac abc"),
    ("a*+a", "x", "aaa"),
    ("a++b", "x", "aab"),
    ("a?+a", "x", "a"),
    ("a{1,2}+a", "x", "aaa"),
    # `$` in templates is a literal; `\g<0>`; escapes; unmatched groups expand to "".
    ("(a)", "$1", "abc"),
    ("a", "$0$$", "a"),
    ("(?P<n>a)", "${n}", "a"),
    ("\\d+", "<\\g<0>>", "a12b3"),
    ("(a)|(b)", "[\\1\\2]", "ab"),
    ("(a)?b", "[\\1]", "b"),
    ("(a){0}(b)", "[\\1\\2]", "b"),
    ("(b)(a){0}", "[\\1\\2]", "b"),
    ("(a)", "\\g<1>0", "a"),
    ("(a)", "\\1\\0", "a"),
    ("a", "\\n\\t\\\\", "a"),
    ("a", "\\.", "a"),
    ("a", "\\-\\é\\$", "a"),
    ("a", "\\0", "a"),
    ("a", "\\00x", "a"),
    ("a", "\\101", "a"),
    ("a", "\\a\\b\\f\\v\\r", "a"),
    ("(?P<layer>\\d+)", "<\\g<layer>>", "l.12.x"),
    ("(?P<é>\\d)", "\\g<é>\\g<1>", "1"),
    ("(a)", "\\g<01>", "a"),
    ("(a)", "\\g<+1>", "a"),
    # Case folding: Kelvin sign, long s, dotless i, dotted I, sharp s, sigma.
    ("(?i)k", "-", "kK\u212a"),
    ("(?i)K", "-", "kK\u212a"),
    ("(?i)s", "-", "sS\u017f"),
    ("(?i)i", "-", "iI\u0131İ"),
    ("(?i)ß", "-", "ßẞss"),
    ("(?i)\u03c3", "-", "\u03c3Σς"),
    ("(?ia)k", "-", "kK\u212a"),
    ("(?i)[a-z]+", "-", "aZ\u212a\u017f"),
    ("(?i)[^k]", "-", "kK\u212ax"),
    ("(?i)[Z-a]", "-", "zZaA_`"),
    ("(?i:k)x", "-", "kxKx\u212ax"),
    ("(?i)\u212a", "-", "kK\u212a"),
    ("(?i)[^\\W]", "-", "aK\u212a"),
    # Unicode classes, ASCII mode.
    ("\\w+", "-", "straße"),
    ("\\d", "-", "٣3"),
    ("\\s", "-", "\x1c\x85 \xa0"),
    ("\\S+", "-", "a\x1cb"),
    ("(?a)\\w+", "-", "straße"),
    ("(?a)\\s", "-", "\x1c\x85 "),
    ("(?a)\\S+", "-", "a\x1cb\x85"),
    ("\\b", "|", "é a"),
    ("(?a)\\b", "|", "é a"),
    (".", "-", "😀é"),
    ("[à-ÿ]", "-", "aéÿ"),
    # A Python quirk the engine must keep: the search prefilter uses the pattern's
    # top-level flags, so a leading `(?u:\s)` inside an ASCII pattern never matches \x1c.
    ("(?a)(?u:\\s)", "-", "\x1c"),
    ("(?a)(?u:\\w)", "-", "é"),
    # Escapes in patterns.
    ("\\x41\\u0042\\U00000043", "-", "ABC"),
    ("\\0", "-", "a\x00"),
    ("\\012", "-", "a\n"),
    ("\\101", "-", "A"),
    ("\\.", "-", "a.b"),
    ("\\é", "-", "é"),
    ("\\U0001F600", "-", "😀"),
    # Backreferences, lookaround, conditionals, verbose, \N{} (fall back).
    ("(a)\\1", "-", "aab"),
    ("(?P<n>a)(?P=n)", "-", "aa"),
    ("a(?=b)", "-", "ab ac"),
    ("a(?!b)", "-", "ab ac"),
    ("(?<=a)b", "-", "ab cb"),
    ("(?<!a)b", "-", "ab cb"),
    ("(a)?(?(1)b|c)", "-", "ab c"),
    # Empty lookarounds: CPython 3.13 compiles `(?<!)` to a FAILURE opcode.
    ("a(?<!)", "-", "a"),
    ("a(?!)|b", "-", "ab"),
    ("(?<=)a(?=)", "-", "a"),
    ("(?P<g>1)?(?a:layers{,}?)+(?-m:\\1\\Z)(?<!(?#a\\)b))*", "-", "layerss"),
    ("(?x) a b # c", "-", "ab"),
    ("\\N{DIGIT ONE}", "-", "1"),
    # Inline flags and comments.
    ("(?i:a)b", "-", "Ab AB"),
    ("(?i)a(?-i:b)", "-", "AB Ab"),
    ("(?#c)(?i)a", "-", "A"),
    ("a(?#x)b", "-", "ab"),
    ("a(?#x)*", "-", "aaa"),
    ("(?#a\\)b)x", "-", "x"),
    # Captures in repeats follow Python's (last-iteration) rules.
    ("(?:(a)|b)+", "[\\1]", "ab"),
    ("((x)|y|z)*", "[\\1\\2]", "xyz"),
    ("(ab|a)*?b", "[\\1]", "ab"),
    ("(?:x(a)?)+", "[\\1]", "xaxx"),
    # Realistic renames.
    ("^module\\.", "", "module.backbone.layers.3.experts.12.w1.weight"),
    ("layers\\.(\\d+)", "blocks.\\1", "layers.3.x.layers.12"),
    ("\\.experts\\.(\\d+)\\.w([123])\\.", ".e\\1.p\\2.", "m.experts.12.w1.weight"),
]


@pytest.mark.parametrize(("pattern", "repl", "key"), TRAPS)
def test_trap_equals_re_sub(pattern, repl, key):
    if not accepted_here(pattern, repl):
        same_error(
            _raised(lambda: re_sub(pattern, repl, key)), _raised(lambda: rules_of(pattern, repl))
        )
        return
    kr = rules_of(pattern, repl)
    assert kr.sub(key) == re_sub(pattern, repl, key)
    assert kr.apply([key, key + "\n", "é" + key]) == [
        re_sub(pattern, repl, k) for k in (key, key + "\n", "é" + key)
    ]


def test_empty_matches_next_to_a_match():
    assert KeyRules([("x*", "-")]).sub("abxd") == "-a-b--d-" == re.sub("x*", "-", "abxd")


def test_dollar_in_template_is_literal():
    assert KeyRules([("(a)", "$1")]).sub("a") == "$1"


@pytest.mark.parametrize(
    "pattern",
    [
        "^module\\.",
        "x*",
        "layers\\.(\\d+)",
        "(?P<n>\\d+)\\.w",
        "\\.weight$",
        "\\bbn(\\d)",
        "(?i)lm_head",
        "[[:alpha:]]",
        "a{,3}",
        "{",
        "(?s).*",
        "^(a+)+$",
        "(?m)^ema\\.",
        "\\w+",
        "(?a)\\s",
    ],
)
def test_native(pattern):
    kr = rules_of(pattern, "x")
    assert kr.native == [True], kr.fallback_reasons
    assert kr.fallback_reasons == [None]
    assert isinstance(kr.native_patterns[0], str)


@pytest.mark.parametrize(
    "pattern",
    [
        "(a)\\1",
        "(?P<n>a)(?P=n)",
        "a(?=b)",
        "(?<!a)b",
        "(?>a+)b",
        "a*+",
        "a++",
        "(a)?(?(1)b|c)",
        "(?x) a",
        "\\N{DIGIT ONE}",
        "(?i)é",
        "(a|)+",
        "a??",
        "(|a)",
    ],
)
def test_fallback(pattern):
    if not accepted_here(pattern):
        same_error(
            _raised(lambda: re.compile(pattern)), _raised(lambda: KeyRules([(pattern, "x")]))
        )
        return
    kr = KeyRules([(pattern, "x")])
    assert kr.native == [False]
    assert kr.native_patterns == [None]
    assert isinstance(kr.fallback_reasons[0], str) and kr.fallback_reasons[0]


def test_catastrophic_pattern_runs_on_the_linear_engine():
    kr = KeyRules([("^(a+)+$", "x")])
    assert kr.native == [True]
    key = "a" * 100_000 + "b"  # re.sub would backtrack for ever on this one
    out = kr.apply([key])
    assert out[0] is key
    matching = "a" * 100_000
    assert kr.sub(matching) == "x" == re.sub("^(a+)+$", "x", matching)


# --------------------------------------------------------------------------------------------
# API


def test_rules_native_and_reasons():
    def upper(m):
        return m.group(0).upper()

    compiled = re.compile("W(\\d)", re.IGNORECASE)
    rules = [("^module\\.", ""), ("(a)\\1", "b"), ("x", upper), (compiled, "w\\1")]
    kr = KeyRules(rules)
    assert len(kr) == 4
    assert kr.rules == rules
    assert kr.rules[3][0] is compiled
    assert kr.native == [True, False, False, True]
    reasons = kr.fallback_reasons
    assert reasons[0] is None and reasons[3] is None
    assert "backreference" in reasons[1]
    assert "callable" in reasons[2]
    assert kr.native_patterns[1] is None and kr.native_patterns[2] is None
    assert "KeyRules(" in repr(kr) and "module" in repr(kr)
    keys = ["module.aa.x.W1", "w2"]
    assert kr.apply(keys) == ["b.X.w1", "w2"]


def test_pickle_round_trip():
    rules = [("^module\\.", ""), (re.compile("(?P<n>\\d+)", re.ASCII), "<\\g<n>>"), ("(a)\\1", "b")]
    kr = KeyRules(rules)
    back = pickle.loads(pickle.dumps(kr))
    assert isinstance(back, KeyRules)
    assert back.rules == kr.rules
    assert back.native == kr.native
    assert back.rules[1][0].flags == rules[1][0].flags
    keys = ["module.aa.12", "x٣"]
    assert back.apply(keys) == kr.apply(keys) == ["b.<12>", "x٣"]


def test_empty_rule_list():
    kr = KeyRules([])
    keys = ["a", "b\n"]
    out = kr.apply(keys)
    assert out == keys and all(o is k for o, k in zip(out, keys, strict=True))
    assert kr.native == [] and len(kr) == 0


def test_unchanged_keys_are_the_same_objects():
    # Rules and keys that stay on the native path (see
    # test_unchanged_keys_through_fallback_keep_identity for the others).
    rules = [("^module\\.", ""), ("\\.weight$", ".w"), ("(?i)zz", "y"), ("q+", "")]
    kr = KeyRules(rules)
    assert all(kr.native)
    keys = ["".join(["backbone", ".bias"]), "module.x.weight", "", "x.b\nias"]
    out = kr.apply(keys)
    assert out == ["backbone.bias", "x.w", "", "x.b\nias"]
    for i in (0, 2, 3):
        assert out[i] is keys[i]
    plain = KeyRules([("^module\\.", ""), ("zz", "y")])
    key = "".join(["é", ".bias\n"])
    assert plain.apply([key])[0] is key


def test_apply_takes_any_iterable_of_str():
    kr = KeyRules([("a", "b")])
    assert kr.apply(("a", "ca")) == ["b", "cb"]
    assert kr.apply(k for k in ["a"]) == ["b"]
    assert kr.apply([]) == []


def test_keys_with_lone_surrogates_are_refused_by_native_rules():
    # A lone surrogate has no UTF-8 form, which the native engine reads: a typed error that
    # names the key and the rule, never a silent trip through `re`.
    kr = KeyRules([("a", "b"), ("\\w", "w")])
    with pytest.raises(KeyNotUnicodeError) as got:
        kr.apply(["ok", "a\ud800"])
    assert isinstance(got.value, UnicodeError) and isinstance(got.value, CkptmapError)
    assert (got.value.index, got.value.key, got.value.rule) == (1, "a\ud800", 0)
    assert "U+D800" in str(got.value)
    copy = pickle.loads(pickle.dumps(got.value))
    assert (type(copy), str(copy), copy.rule) == (KeyNotUnicodeError, str(got.value), 0)


def test_keys_with_lone_surrogates_pass_through_rules_on_re():
    # Rules on Python's `re` take them as `re.sub` does; a native rule after them refuses.
    def upper(m):
        return m.group(0).upper()

    python_only = KeyRules([("(a)\\1", "b"), ("x", upper)])
    keys = ["aa\ud800x", "\udfffa"]
    assert python_only.apply(keys) == [re.sub("x", upper, re.sub("(a)\\1", "b", k)) for k in keys]
    mixed = KeyRules([("(a)\\1", "b"), ("^b", "c")])
    with pytest.raises(KeyNotUnicodeError) as got:
        mixed.apply(["aa\ud800"])
    assert got.value.rule == 1
    # A rule on `re` that removes the surrogate hands a valid key on to the native rules.
    healed = KeyRules([("\ud800", lambda m: "?"), ("\\?", "!")])
    assert healed.native == [False, True]
    assert healed.apply(["a\ud800"]) == ["a!"]


def test_callable_replacement():
    kr = KeyRules([("\\d+", lambda m: str(int(m.group(0)) + 1)), ("^", "m.")])
    assert kr.native == [False, True]
    assert kr.apply(["l.9.x", "y"]) == ["m.l.10.x", "m.y"]


@pytest.mark.parametrize("bad", [1, b"key", None, 1.5])
def test_non_str_key_raises_type_error_naming_the_index(bad):
    kr = KeyRules([("a", "b")])
    with pytest.raises(TypeError, match=r"key 2 is a " + type(bad).__name__):
        kr.apply(["a", "b", bad])
    with pytest.raises(TypeError, match=r"key 0"):
        kr.sub(bad)


# --------------------------------------------------------------------------------------------
# Construction errors: what `re.sub` raises, with its message


def _raised(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as e:
            return e
    raise AssertionError("expected an exception")


@pytest.mark.parametrize(
    ("pattern", "repl"),
    [
        ("(", "x"),
        ("a)", "x"),
        ("[a", "x"),
        ("*a", "x"),
        ("a**", "x"),
        ("\\q", "x"),
        ("\\8", "x"),
        ("[z-a]", "x"),
        ("[\\d-z]", "x"),
        ("a{3,1}", "x"),
        ("(?P<1>a)", "x"),
        ("(?P<n>a)(?P<n>b)", "x"),
        ("(?<=a+)b", "x"),
        ("a(?i)b", "x"),
        ("(?a)(?u)x", "x"),
        ("(?-a:x)", "x"),
        ("\\x4", "x"),
        ("\\400", "x"),
        ("\\U00110000", "x"),
        ("\\N{NOT A NAME}", "x"),
        ("a{4294967295}", "x"),  # OverflowError
        # Templates.
        ("a", "\\1"),
        ("(a)", "\\2"),
        ("(a)", "\\g<2>"),
        ("(a)", "\\g<nope>"),  # IndexError in 3.11
        ("(a)", "\\g<1a>"),
        ("(a)", "\\g<"),
        ("(a)", "\\g<>"),
        ("(a)", "\\g<-1>"),
        ("a", "\\q"),
        ("a", "\\x41"),
        ("a", "\\"),
        ("a", "\\400"),
    ],
)
def test_invalid_rule_raises_what_re_sub_raises(pattern, repl):
    if accepted_here(pattern, repl) and pattern in BEFORE_3_11:
        # Valid here (with a DeprecationWarning): the result is re.sub's.
        assert rules_of(pattern, repl).sub("xAbaB") == re_sub(pattern, repl, "xAbaB")
        return
    want = _raised(lambda: re.sub(pattern, repl, "key"))
    got = _raised(lambda: KeyRules([("^ok", ""), (pattern, repl)]))
    same_error(want, got)


def test_invalid_rule_shapes():
    with pytest.raises(TypeError, match="rule 1"):
        KeyRules([("a", "b"), ("a",)])
    with pytest.raises(TypeError, match="rule 0"):
        KeyRules([("a", 3)])
    with pytest.raises(TypeError):
        KeyRules([(b"a", "b")])
    with pytest.raises(TypeError):
        KeyRules(None)


# --------------------------------------------------------------------------------------------
# Regressions: mismatches the differential tests found.


@pytest.mark.parametrize(
    ("rules", "key"),
    [
        ([("\\B", "-")], ""),
        ([("x?\\B", "-")], ""),
        ([("^.*$", ""), ("\\B", "-")], "abc"),  # an earlier rule empties the key
    ],
)
def test_non_word_boundary_never_matches_the_empty_key(rules, key):
    # CPython 3.11's AT_NON_BOUNDARY fails when the whole string is empty; the regex
    # crate's \B matches there.
    want = key
    for p, r in rules:
        want = re.sub(p, r, want)
    assert KeyRules(rules).sub(key) == want


# bpo-35859, fixed in CPython 3.11: 3.10's `re` can report a capture from an abandoned attempt
# for a group inside a repeat (these are cases from CPython's own test_re.py). The match
# itself is the same on every version.
CAPTURES_IN_REPEATS = [
    ("(ab|a)*?b", "[\\1]", "ab"),
    ("(ab|a)+?b", "[\\1]", "ab"),
    ("(ab|a){0,2}?b", "[\\1]", "ab"),
    ("(.b|a)*?b", "[\\1]", "ab"),
    ("(ab?)*?b", "[\\1]", "ab"),
    ("(?:(?:a|bc)*?(xx)??z)*", "[\\1]", "axxzbcz"),
    ("((x|yz)+?(t)??c)*", "[\\1|\\2|\\3]", "xtcxyzxc"),
]


@pytest.mark.parametrize(("pattern", "repl", "key"), CAPTURES_IN_REPEATS)
def test_captures_inside_repeats_follow_this_python(pattern, repl, key):
    try:
        kr = KeyRules([(pattern, repl)])
    except BacktrackingRuleError:
        # 3.10 only: the rule runs on re there (bpo-35859), and its alternatives overlap.
        assert sys.version_info < (3, 11), pattern
        kr = None
    if kr is not None:
        keys = [key, "z" + key]
        assert kr.apply(keys) == [re.sub(pattern, repl, k) for k in keys]
    whole = KeyRules([(pattern, "<\\g<0>>")])
    assert whole.sub(key) == re.sub(pattern, "<\\g<0>>", key)
    if whole.native == [True] and kr is not None:
        # Only the groups can differ, so only rules that use them leave the native engine.
        assert kr.native == [sys.version_info >= (3, 11)]
        if sys.version_info < (3, 11):
            assert "bpo-35859" in kr.fallback_reasons[0]


@pytest.mark.parametrize(
    ("pattern", "key"),
    [
        ("(?a)a(?u:\\w)", "aé"),
        (re.compile("a(?u:\\w)", re.ASCII), "aé"),
        ("(?a)a(?u:\\s)", "a\x1c"),  # an ASCII key: no per-key fallback can catch it
    ],
)
def test_scoped_unicode_flag_inside_ascii_pattern(pattern, key):
    # re._compiler._combine_flags: a scoped (?u:...) makes \w\s\d Unicode again.
    assert KeyRules([(pattern, "-")]).sub(key) == re.sub(pattern, "-", key)


@pytest.mark.parametrize(
    ("pattern", "key"),
    [
        ("(?a:\\W)", "é"),
        ("(?a:\\S)", "\x1c"),  # an ASCII key
        ("(?a:\\D)", "٣"),
        ("((?a:\\W))", "é"),
        ("(?a:[\\Wx])", "é"),
        ("(?a:\\W|x)", "é"),
    ],
)
def test_scoped_ascii_flag_on_leading_category_follows_python_prefilter(pattern, key):
    # CPython's search prefilter (re._compiler._compile_info's charset) compiles a leading
    # class or category with the pattern's top-level type flags, so a leading (?a:\W) in a
    # Unicode pattern never matches what Unicode \W excludes.
    assert KeyRules([(pattern, "-")]).sub(key) == re.sub(pattern, "-", key)


@pytest.mark.parametrize(
    ("rules", "key"),
    [
        ([("(q)\\1", "y")], "x.bias"),
        ([("^module\\.", ""), ("(q)\\1", "y")], "x.bias"),
        ([("zz", lambda m: "y")], "x.bias"),
        ([("\\d", "y")], "é.bias"),  # a non-ASCII key sends a Unicode-sensitive rule to re
        ([("(?i)zz", "y")], "é.bias"),
        ([("\\.weight$", ".w")], "x.bias\n"),  # a trailing newline sends `$` rules to re
    ],
)
def test_unchanged_keys_through_fallback_keep_identity(rules, key):
    # A key that passes through a rule running on Python's re, unchanged, is still the
    # caller's object.
    key = "".join([key, ""])
    out = KeyRules(rules).apply([key])
    assert out[0] == key
    assert out[0] is key


def _boom(m):
    raise ZeroDivisionError("boom")


@pytest.mark.parametrize("repl", [_boom, lambda m: 1])
def test_errors_raised_by_the_replacement_propagate_like_re_sub(repl):
    want = _raised(lambda: re.sub("a", repl, "xa"))
    got = _raised(lambda: KeyRules([("^", ""), ("a", repl)]).apply(["b", "xa"]))
    assert type(got) is type(want)
    assert str(got) == str(want)


# --------------------------------------------------------------------------------------------
# Nothing hangs: native rules never run on `re`; rules on `re` that could backtrack
# exponentially are refused.

# Keys the fast translation cannot take: non-ASCII (case folding traps, characters whose word-ness
# Python and the regex crate disagree on, characters newer than some CPython's Unicode), keys
# ending in a newline, the empty key.
EXACT_KEYS = [
    "",
    "\n",
    "a\n",
    "a\n\n",
    "x.weight\n",
    "é.weight\n",
    "é",
    "straße.w1",
    "k\u212ak",
    "\u017fs",
    "\u0130i\u0131",
    "x\u0301y",
    "\u0301x",
    "x\u00b2y",
    "\u00b2x",
    "a\u2460b\u216b",
    "a\u203fb\u200dc",
    "\u24b6x\u24b6",
    "\U0001fae8x\U00031350",
    "\u0661\u0662.\u0663",
    "a\x1cb\x85c\xa0d",
    "\u0301\n",
    "x\u0301\n",
]

EXACT_RULES = [
    r"\w+",
    r"^(\w+)+$",
    r"\W",
    r"\d+",
    r"\D+",
    r"\s",
    r"\S+$",
    r"\bx",
    r"x\b",
    r"\Bx",
    r"\B",
    r"\b",
    r"\b\w+\b",
    r"(?i)k",
    r"(?i)[a-z]+",
    r"(?i)[^k]",
    r"(?i)S$",
    r"(?ai)k",
    r"(?a)\w+",
    r"(?a)\b",
    r"$",
    r"\.weight$",
    r"(\w)$",
    r"(?s).$",
    r".$",
    r"\n$",
    r"[^a]$",
    r"(?m)^\w",
    r"[\w\u0301]+",
    r"[^\W\d]+",
]


@pytest.mark.parametrize("pattern", EXACT_RULES)
def test_native_rules_never_run_on_re(pattern):
    kr, spies = spied_rules([(pattern, "<\\g<0>>")])
    assert kr.native == [True], kr.fallback_reasons
    got = kr.apply(EXACT_KEYS)
    assert got == [re.sub(pattern, "<\\g<0>>", k) for k in EXACT_KEYS]
    assert [kr.sub(k) for k in EXACT_KEYS] == got
    assert spies[0].calls == 0


def test_rules_on_re_still_run_on_re():
    # The spies are live: a fallback rule does reach them.
    kr, spies = spied_rules([("^module\\.", ""), ("(a)\\1", "b")])
    assert kr.native == [True, False]
    assert kr.apply(["module.aa", "é\n"]) == ["b", "é\n"]
    assert (spies[0].calls, spies[1].calls) == (0, 2)


def test_catastrophic_pattern_on_a_long_non_ascii_key_returns_promptly():
    # Before: a non-ASCII key sent `^(\w+)+$` to re, which never returned. In a child process
    # with a deadline, so that a regression fails instead of hanging the suite.
    code = (
        "from ckptmap import KeyRules\n"
        "kr = KeyRules([(r'^(\\w+)+$', 'x')])\n"
        "assert kr.native == [True]\n"
        "key = 'é' * 20000 + '!'\n"
        "assert kr.apply([key, 'é' * 20000, key + '\\n']) == [key, 'x', key + '\\n']\n"
        "print('done')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("\\b[\u0301]", "stand in"),  # nothing else is in that class: no stand-in for U+0301
        ("a$|(?m:^b)", "MULTILINE"),
        ("(?m:^a)b$", "MULTILINE"),
        ("\\Bx$", "\\B"),
        ("\\w{5000}", "too large"),
    ],
)
def test_rules_without_an_exact_form_are_not_native(pattern, why):
    kr, _ = spied_rules([(pattern, "-")])
    assert kr.native == [False]
    assert why in kr.fallback_reasons[0]
    keys = ["", "a", "x\u0301", "a\n", "b\n", "x" * 5000]
    assert kr.apply(keys) == [re.sub(pattern, "-", k) for k in keys]
    # The ASCII-flag forms of the same rules are native.
    if "\\B" in pattern or "\\b" in pattern:
        assert KeyRules([("(?a)" + pattern, "-")]).native == [True]


REFUSED = [
    "^(\\w+)+$",
    "(x\\w*)*y",
    "(a+b?)+c",
    "(\\w*x)*",
    "(\\d+|\\w+)+$",
    "(a|aa)*b",
    "(a?b?)+c",
    "(.*)*x",
    "(.*?,)*x",
    "(\\.?\\w+)*\\.",
]
ACCEPTED = [
    "(?:\\.\\w+)*",
    "(\\w+\\.)+weight",
    "(\\d+\\.){3}\\d+",
    "^(?:[a-z_]+\\.)*(\\d+)\\.w$",
    "(|a)+",
    "(a?)+b",
    "([^.]+\\.)*w",
    "(a|ab)*c",
    "(?:(?:layers|blocks)\\.\\d+\\.)*",
]


@pytest.mark.parametrize("pattern", REFUSED)
def test_rules_on_re_that_can_backtrack_exponentially_are_refused(pattern):
    with pytest.raises(BacktrackingRuleError) as got:
        KeyRules([("^m\\.", ""), (pattern, lambda m: "x")])
    err = got.value
    assert isinstance(err, ValueError) and isinstance(err, CkptmapError)
    assert (err.rule, err.pattern) == (1, pattern)
    assert err.part and repr(err.part) in str(err) and "Rewrite" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert (type(copy), str(copy), copy.part) == (BacktrackingRuleError, str(err), err.part)
    # With a backreference (re only) too. With a str replacement the rule is native (and
    # linear) where the translator takes it, else refused the same way.
    with pytest.raises(BacktrackingRuleError):
        KeyRules([(f"(?P<q>q)?{pattern}(?P=q)", "x")])
    try:
        native = KeyRules([(pattern, "x")])
    except BacktrackingRuleError:
        assert pattern in {"(x\\w*)*y", "(\\w*x)*", "(a?b?)+c", "(.*)*x", "(.*?,)*x"}
    else:
        assert native.native == [True], native.fallback_reasons


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_rules_on_re_that_backtrack_boundedly_are_accepted(pattern):
    kr = KeyRules([(pattern, lambda m: "<" + m.group(0) + ">")])
    assert kr.native == [False]
    keys = ["layers.1.blocks.2.w", "1.2.3.4", "a.b.c.weight", "aab" * 10 + "!"]
    assert kr.apply(keys) == [re.sub(pattern, lambda m: "<" + m.group(0) + ">", k) for k in keys]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="possessive repeats are Python 3.11+")
def test_a_possessive_outer_repeat_is_accepted():
    kr = KeyRules([("^(\\w+)++$", lambda m: "x")])
    assert kr.native == [False]
    assert kr.apply(["é" * 30 + "!", "ab"]) == ["é" * 30 + "!", "x"]


def test_a_bad_rule_is_an_re_error_and_ours_and_survives_pickling():
    with pytest.raises(re.error) as caught:
        KeyRules([("a", "b"), ("(?P<x", "")])
    err = caught.value
    assert isinstance(err, CkptmapError) and err.rule == 1
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is InvalidKeyRuleError
    assert (str(back), back.msg, back.pos, back.rule) == (str(err), err.msg, err.pos, 1)
