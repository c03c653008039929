//! The exact form of a native rule: what runs the keys on which the fast `regex` translation
//! of [`crate::pattern`] could disagree with Python's `re`, so that no key ever has to go to
//! `re` for a rule reported native.
//!
//! The fast translation is exact on ASCII keys that do not end in `\n`. The exact form is
//! exact on every key (valid UTF-8):
//! - every one-character item (literal, `.`, class, `\w`, `\d`, `\s`, ...) is spelled out as
//!   the set of code points the running interpreter's `re` matches with it: `\w`, `\d`, `\s`
//!   from one scan of all code points each ([`Oracle::category`], once per process), `re.IGNORECASE` items by
//!   asking `re` about the characters that have a case mapping ([`Oracle::icase`]);
//! - `$` without MULTILINE, which Python also matches before a final `\n`: the key's final
//!   `\n` is searched as the byte 0xFF (never in UTF-8), which the form matches wherever
//!   Python's item matches `\n`, and which is the engine's line terminator, so `(?m:$)` is
//!   exactly Python's `$` (a rule that also uses MULTILINE anchors or Unicode `\B` cannot have
//!   this form and is not native);
//! - Unicode `\b`/`\B`: the `regex` crate's word characters differ from Python's (combining
//!   marks, `No` numbers, newer Unicode versions). A key character on which the two disagree
//!   is searched as a stand-in of the same UTF-8 length that every item of the rule treats
//!   alike and whose word-ness for the crate is the original's for Python ([`WordMap`]); the
//!   result is built from the original key, so stand-ins never show. A rule for which some
//!   stand-in does not exist is not native.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use regex_automata::meta::Regex;
use regex_automata::util::syntax;

use crate::charset::Ranges;
use crate::error::{CoreError, CoreResult};
use crate::pattern::{Assertion, ClassItem, Node, Perl, Translation};

/// What the exact form asks of the running interpreter's `re` (the Python layer implements
/// it; without one, rules that need it stop before keys that need the exact form).
pub trait Oracle {
    /// Python's Unicode `\w`, `\d` or `\s`, as the running interpreter's `re` defines it.
    fn category(&self, kind: Perl) -> CoreResult<Arc<Ranges>>;
    /// The code points whose case mapping is not themselves: a superset of every character
    /// `re.IGNORECASE` can relate to another (everything else matches an item exactly when it
    /// matches it without the flag).
    fn cased(&self) -> CoreResult<Arc<Ranges>>;
    /// Among [`Oracle::cased`], the code points that `re` matches with the one-character
    /// pattern `source` under `re.IGNORECASE` (and `re.ASCII` when `ascii`).
    fn icase(&self, source: &str, ascii: bool) -> CoreResult<Ranges>;
}

fn unsupported<T>(what: impl Into<String>) -> CoreResult<T> {
    Err(CoreError::Unsupported(what.into()))
}

/// Estimated size above which the exact form is not attempted (the rule is not native):
/// one unit per Unicode class occurrence after expanding counted repeats.
const MAX_EXACT_CLASSES: u64 = 2_000;

/// Size limit for the exact form's compiled automaton.
const EXACT_SIZE_LIMIT: usize = 64 << 20;

/// Checks, without Python, that a rule can have an exact form: why not, if it cannot.
pub fn check(t: &Translation) -> CoreResult<()> {
    if t.dollar_sensitive && t.multiline_anchors {
        return unsupported(
            "$ without MULTILINE together with MULTILINE ^ or $: keys ending in \\n cannot be \
             run exactly",
        );
    }
    if t.dollar_sensitive && t.unicode_non_boundary {
        return unsupported(
            "$ without MULTILINE together with Unicode \\B: keys ending in \\n cannot be run \
             exactly (use (?a) or \\Z)",
        );
    }
    let cost = class_cost(&t.node);
    if cost > MAX_EXACT_CLASSES {
        return unsupported(format!(
            "about {cost} Unicode class copies after expanding counted repeats: too large for \
             the exact form (use (?a) or smaller counts)"
        ));
    }
    Ok(())
}

fn class_cost(node: &Node) -> u64 {
    match node {
        Node::Empty | Node::Assert(_) => 0,
        Node::Literal { .. } | Node::Any { .. } => 0,
        Node::Class { .. } | Node::Perl { .. } => 1,
        Node::Group { node, .. } => class_cost(node),
        Node::Concat(items) | Node::Alt(items) => {
            items.iter().map(class_cost).fold(0, u64::saturating_add)
        }
        Node::Repeat { node, min, max, .. } => {
            let copies = u64::from(max.unwrap_or(min.saturating_add(1)).max(1));
            class_cost(node).saturating_mul(copies)
        }
    }
}

/// The exact form of one rule.
#[derive(Debug, Clone)]
pub struct Exact {
    regex: Regex,
    /// A final `\n` is searched as 0xFF.
    dollar: bool,
    words: Option<WordMap>,
}

impl Exact {
    /// Builds the exact form. `oracle` is needed when the rule is Unicode-sensitive.
    pub fn build(t: &Translation, oracle: Option<&dyn Oracle>) -> CoreResult<Self> {
        check(t)?;
        let mut sets = Sets {
            oracle,
            cased: None,
            seen: Vec::new(),
        };
        let mut regex = String::with_capacity(256);
        emit(&t.node, &mut sets, t.dollar_sensitive, &mut regex)?;
        let words = if t.unicode_boundary {
            let word = sets.oracle()?.category(Perl::Word)?;
            WordMap::build(&word, &sets.seen)?
        } else {
            None
        };
        let config = Regex::config()
            .nfa_size_limit(Some(EXACT_SIZE_LIMIT))
            .line_terminator(if t.dollar_sensitive { 0xFF } else { b'\n' });
        let regex = Regex::builder()
            .syntax(syntax::Config::new().utf8(!t.dollar_sensitive))
            .configure(config)
            .build(&regex)
            .map_err(|e| CoreError::Unsupported(format!("regex crate (exact form): {e}")))?;
        Ok(Self {
            regex,
            dollar: t.dollar_sensitive,
            words: words.filter(|w| !w.is_empty()),
        })
    }

    pub fn regex(&self) -> &Regex {
        &self.regex
    }

    /// The bytes to search for `key`: the key itself, or a copy with stand-ins (same
    /// length, same char boundaries).
    pub fn haystack<'k>(&self, key: &'k str) -> Cow<'k, [u8]> {
        let mut hay = Cow::Borrowed(key.as_bytes());
        if let Some(words) = &self.words {
            if !key.is_ascii() {
                for (i, c) in key.char_indices() {
                    if let Some(rep) = words.stand_in(c) {
                        let mut buf = [0u8; 4];
                        let rep = rep.encode_utf8(&mut buf);
                        hay.to_mut()[i..i + rep.len()].copy_from_slice(rep.as_bytes());
                    }
                }
            }
        }
        if self.dollar && key.ends_with('\n') {
            let hay = hay.to_mut();
            let last = hay.len() - 1;
            hay[last] = 0xFF;
        }
        hay
    }
}

/// Computes the code-point set of each one-character item, asking the oracle once per need.
struct Sets<'a> {
    oracle: Option<&'a dyn Oracle>,
    cased: Option<Arc<Ranges>>,
    /// Every set emitted, for [`WordMap`].
    seen: Vec<Ranges>,
}

fn ascii_perl(kind: Perl) -> Ranges {
    let b = |lo: u8, hi: u8| (u32::from(lo), u32::from(hi));
    Ranges::new(match kind {
        Perl::Digit => vec![b(b'0', b'9')],
        Perl::Word => vec![b(b'0', b'9'), b(b'A', b'Z'), b(b'a', b'z'), b(b'_', b'_')],
        Perl::Space => vec![b(b'\t', b'\r'), b(b' ', b' ')],
    })
}

impl Sets<'_> {
    fn oracle(&self) -> CoreResult<&dyn Oracle> {
        match self.oracle {
            Some(o) => Ok(o),
            None => unsupported("the exact form needs Python's re tables"),
        }
    }

    fn cased(&mut self) -> CoreResult<Arc<Ranges>> {
        if self.cased.is_none() {
            self.cased = Some(self.oracle()?.cased()?);
        }
        match &self.cased {
            Some(t) => Ok(t.clone()),
            None => unsupported("cased"),
        }
    }

    fn perl(&mut self, kind: Perl, negated: bool, ascii: bool) -> CoreResult<Ranges> {
        let set = if ascii {
            ascii_perl(kind)
        } else {
            (*self.oracle()?.category(kind)?).clone()
        };
        Ok(if negated { set.complement() } else { set })
    }

    /// Python's set for an item under IGNORECASE: the plain set outside the cased code
    /// points, and `re`'s own answer on them.
    fn icase(&mut self, plain: Ranges, source: &str, ascii: bool) -> CoreResult<Ranges> {
        let cased = self.cased()?;
        let asked = self.oracle()?.icase(source, ascii)?;
        Ok(plain.minus(&cased).union(&asked.intersect(&cased)))
    }

    fn set_of(&mut self, node: &Node) -> CoreResult<Option<Ranges>> {
        let set = match node {
            Node::Literal { ch, icase, ascii } => {
                let plain = Ranges::single(*ch as u32);
                if *icase && (ch.is_alphabetic() || !ch.is_ascii()) {
                    self.icase(plain, &python_escape(*ch), *ascii)?
                } else {
                    plain
                }
            }
            Node::Any { dotall } => {
                if *dotall {
                    Ranges::all()
                } else {
                    Ranges::single('\n' as u32).complement()
                }
            }
            Node::Perl {
                kind,
                negated,
                ascii,
            } => self.perl(*kind, *negated, *ascii)?,
            Node::Class {
                items,
                negated,
                icase,
                ascii,
                source,
            } => {
                let mut parts = Vec::new();
                let mut set = Ranges::empty();
                for item in items {
                    match item {
                        ClassItem::Char(c) => parts.push((*c as u32, *c as u32)),
                        ClassItem::Range(lo, hi) => parts.push((*lo as u32, *hi as u32)),
                        ClassItem::Perl {
                            kind,
                            negated,
                            ascii,
                        } => set = set.union(&self.perl(*kind, *negated, *ascii)?),
                    }
                }
                let mut set = set.union(&Ranges::new(parts));
                if *negated {
                    set = set.complement();
                }
                if *icase {
                    set = self.icase(set, source, *ascii)?;
                }
                set
            }
            _ => return Ok(None),
        };
        self.seen.push(set.clone());
        Ok(Some(set))
    }
}

/// `re.escape` for one character (what Python's `re` reads back as that literal).
fn python_escape(c: char) -> String {
    if c.is_ascii_alphanumeric() || c == '_' || !c.is_ascii() {
        c.to_string()
    } else {
        format!("\\{c}")
    }
}

fn emit(node: &Node, sets: &mut Sets<'_>, dollar: bool, out: &mut String) -> CoreResult<()> {
    if let Some(set) = sets.set_of(node)? {
        set.write_class(out, dollar && set.contains('\n' as u32));
        return Ok(());
    }
    match node {
        Node::Empty => out.push_str("(?:)"),
        Node::Assert(a) => out.push_str(match a {
            Assertion::LineStart { multiline: true } => "(?m:^)",
            Assertion::LineStart { multiline: false } | Assertion::TextStart => "\\A",
            Assertion::LineEnd { multiline: true } => "(?m:$)",
            // The line terminator is 0xFF, which stands only for a final `\n`.
            Assertion::LineEnd { multiline: false } => "(?m:$)",
            Assertion::TextEnd => "\\z",
            Assertion::WordBoundary {
                negated: false,
                ascii: true,
            } => "(?-u:\\b)",
            Assertion::WordBoundary {
                negated: true,
                ascii: true,
            } => "(?-u:\\B)",
            Assertion::WordBoundary {
                negated: false,
                ascii: false,
            } => "\\b",
            Assertion::WordBoundary {
                negated: true,
                ascii: false,
            } => "\\B",
        }),
        Node::Group { capture, node } => {
            out.push_str(if *capture { "(" } else { "(?:" });
            emit(node, sets, dollar, out)?;
            out.push(')');
        }
        Node::Concat(items) => {
            for item in items {
                emit(item, sets, dollar, out)?;
            }
        }
        Node::Alt(branches) => {
            out.push_str("(?:");
            for (i, branch) in branches.iter().enumerate() {
                if i > 0 {
                    out.push('|');
                }
                emit(branch, sets, dollar, out)?;
            }
            out.push(')');
        }
        Node::Repeat {
            node,
            min,
            max,
            greedy,
        } => {
            out.push_str("(?:");
            emit(node, sets, dollar, out)?;
            out.push(')');
            match max {
                Some(max) => out.push_str(&format!("{{{min},{max}}}")),
                None => out.push_str(&format!("{{{min},}}")),
            }
            if !greedy {
                out.push('?');
            }
        }
        // One-character items were handled above.
        Node::Literal { .. } | Node::Any { .. } | Node::Class { .. } | Node::Perl { .. } => {}
    }
    Ok(())
}

/// The `regex` crate's Unicode word characters (what its `\b` uses).
fn crate_word() -> &'static Ranges {
    static WORD: OnceLock<Ranges> = OnceLock::new();
    WORD.get_or_init(|| {
        use regex_syntax::hir::{Class, HirKind};
        let ranges = regex_syntax::parse(r"\w")
            .ok()
            .and_then(|hir| match hir.kind() {
                HirKind::Class(Class::Unicode(c)) => Some(
                    c.ranges()
                        .iter()
                        .map(|r| (r.start() as u32, r.end() as u32))
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default();
        Ranges::new(ranges)
    })
}

/// Stand-ins for the characters whose word-ness differs between Python and the crate.
#[derive(Debug, Clone)]
pub struct WordMap {
    /// Sorted, disjoint `(lo, hi, stand-in)`.
    map: Vec<(u32, u32, char)>,
}

fn utf8_len(c: u32) -> u8 {
    match c {
        0..=0x7F => 1,
        0x80..=0x7FF => 2,
        0x800..=0xFFFF => 3,
        _ => 4,
    }
}

impl WordMap {
    /// For each character where `python_word` and the crate's word set disagree, a
    /// stand-in of the same UTF-8 length, in exactly the same `sets`, that the crate judges
    /// as Python judges the original. Unsupported when one does not exist.
    fn build(python_word: &Ranges, sets: &[Ranges]) -> CoreResult<Option<Self>> {
        let crate_word = crate_word();
        let differ = python_word
            .minus(crate_word)
            .union(&crate_word.minus(python_word));
        if differ.is_empty() {
            return Ok(None);
        }
        let mut points: Vec<u32> = vec![0, 0x80, 0x800, 0xD800, 0xE000, 0x10000];
        for set in sets.iter().chain([python_word, crate_word]) {
            for &(lo, hi) in set.ranges() {
                points.push(lo);
                points.push(hi + 1);
            }
        }
        points.retain(|p| *p <= crate::charset::MAX);
        points.sort_unstable();
        points.dedup();
        // Per piece: which sets hold it, its UTF-8 length, the crate's and Python's word-ness.
        type Class = (Vec<bool>, u8, bool);
        let mut stand_ins: HashMap<Class, u32> = HashMap::new();
        let mut pieces = Vec::new();
        for (i, &lo) in points.iter().enumerate() {
            let hi = points.get(i + 1).map_or(crate::charset::MAX, |p| p - 1);
            if (0xD800..=0xDFFF).contains(&lo) {
                continue;
            }
            let member: Vec<bool> = sets.iter().map(|s| s.contains(lo)).collect();
            let len = utf8_len(lo);
            let cw = crate_word.contains(lo);
            let pw = python_word.contains(lo);
            stand_ins.entry((member.clone(), len, cw)).or_insert(lo);
            if cw != pw {
                pieces.push((lo, hi, (member, len, pw)));
            }
        }
        let mut map = Vec::with_capacity(pieces.len());
        for (lo, hi, class) in pieces {
            let Some(rep) = stand_ins.get(&class).and_then(|&c| char::from_u32(c)) else {
                return unsupported(format!(
                    "\\b or \\B next to U+{lo:04X}: Python and the regex crate disagree on \
                     whether it is a word character, and no character the rule treats alike \
                     can stand in for it (use (?a))"
                ));
            };
            map.push((lo, hi, rep));
        }
        Ok(Some(Self { map }))
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn stand_in(&self, c: char) -> Option<char> {
        let c = c as u32;
        if c < 0x80 {
            return None;
        }
        let i = self.map.partition_point(|&(_, hi, _)| hi < c);
        self.map
            .get(i)
            .filter(|&&(lo, _, _)| lo <= c)
            .map(|&(_, _, rep)| rep)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pattern::translate;

    /// Tables from Rust's own Unicode properties, standing in for Python's in unit tests
    /// (Python's exact tables are checked by the differential tests in tests/core/).
    pub struct RustOracle;

    fn scan(pred: impl Fn(char) -> bool) -> Ranges {
        let mut out = Vec::new();
        for c in (0..=crate::charset::MAX).filter_map(char::from_u32) {
            if pred(c) {
                out.push((c as u32, c as u32));
            }
        }
        Ranges::new(out)
    }

    impl Oracle for RustOracle {
        fn category(&self, kind: Perl) -> CoreResult<Arc<Ranges>> {
            static T: OnceLock<[Arc<Ranges>; 3]> = OnceLock::new();
            let t = T.get_or_init(|| {
                // In `Perl` order: digit, word, space.
                [
                    Arc::new(scan(|c| {
                        c.is_ascii_digit() || ('\u{660}'..='\u{669}').contains(&c)
                    })),
                    Arc::new(scan(|c| c.is_alphanumeric() || c == '_')),
                    Arc::new(scan(|c| {
                        c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
                    })),
                ]
            });
            Ok(t[kind as usize].clone())
        }
        fn cased(&self) -> CoreResult<Arc<Ranges>> {
            static C: OnceLock<Arc<Ranges>> = OnceLock::new();
            Ok(C.get_or_init(|| {
                Arc::new(scan(|c| {
                    c.to_lowercase().ne(std::iter::once(c))
                        || c.to_uppercase().ne(std::iter::once(c))
                }))
            })
            .clone())
        }
        fn icase(&self, source: &str, _ascii: bool) -> CoreResult<Ranges> {
            // Enough for literal letters: simple case folding both ways.
            let c = source.chars().last().unwrap_or('\0');
            let lower: Vec<char> = c.to_lowercase().collect();
            Ok(scan(|d| d.to_lowercase().eq(lower.iter().copied())))
        }
    }

    fn exact(p: &str) -> Exact {
        let t = translate(p, 0).unwrap();
        Exact::build(&t, Some(&RustOracle)).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    fn find(e: &Exact, key: &str) -> Option<(usize, usize)> {
        let hay = e.haystack(key);
        e.regex().find(&*hay).map(|m| (m.start(), m.end()))
    }

    #[test]
    fn unicode_classes_come_from_the_tables() {
        let e = exact(r"\d+");
        assert_eq!(find(&e, "x\u{661}\u{662}y"), Some((1, 5)));
        let w = exact(r"^(\w+)+$");
        assert_eq!(find(&w, "é\u{4e2d}"), Some((0, 5)));
        assert_eq!(find(&w, &format!("{}!", "é".repeat(5000))), None);
    }

    #[test]
    fn dollar_matches_before_a_final_newline_only() {
        let e = exact("a$");
        assert_eq!(find(&e, "a\n"), Some((0, 1)));
        assert_eq!(find(&e, "a\nb"), None);
        assert_eq!(find(&e, "a\n\n"), None);
        let nl = exact(r"\n$");
        assert_eq!(find(&nl, "a\n"), Some((1, 2)));
        assert_eq!(find(&nl, "a\n\n"), Some((1, 2)));
        let dot = exact(r"(?s).$");
        assert_eq!(find(&dot, "\n"), Some((0, 1)));
        assert_eq!(find(&exact(".$"), "\n"), None);
    }

    #[test]
    fn dollar_with_multiline_anchors_has_no_exact_form() {
        for p in [r"(?m:^a)b$", r"a$|(?m:b$)", r"\B$"] {
            assert!(check(&translate(p, 0).unwrap()).is_err(), "{p}");
        }
        assert!(check(&translate(r"(?a)\B$", 0).unwrap()).is_ok());
    }

    #[test]
    fn word_boundary_uses_python_word_characters() {
        // U+0301 (a combining mark) is a word character for the crate, not for Python
        // (nor for `char::is_alphanumeric`); U+00B2 (superscript two) the other way round.
        let e = exact(r"\bx");
        assert_eq!(find(&e, "\u{301}x"), Some((2, 3)));
        assert_eq!(find(&e, "\u{b2}x"), None);
        let nb = exact(r"\Bx");
        assert_eq!(find(&nb, "\u{301}x"), None);
        assert_eq!(find(&nb, "\u{b2}x"), Some((2, 3)));
    }

    #[test]
    fn a_stand_in_that_cannot_exist_is_unsupported() {
        // The only character the rule treats like U+0301 is itself.
        let t = translate("\\b[\u{301}]", 0).unwrap();
        assert!(Exact::build(&t, Some(&RustOracle)).is_err());
    }

    #[test]
    fn large_exact_forms_are_refused_up_front() {
        assert!(check(&translate(r"\w{5000}", 0).unwrap()).is_err());
        assert!(check(&translate(r"[a-z]{50}\w{10}", 0).unwrap()).is_ok());
    }

    #[test]
    fn without_an_oracle_only_unicode_free_rules_build() {
        assert!(Exact::build(&translate("a$", 0).unwrap(), None).is_ok());
        assert!(Exact::build(&translate(r"\w$", 0).unwrap(), None).is_err());
    }
}
