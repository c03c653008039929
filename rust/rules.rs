//! Compiled key rules: `(pattern, replacement)` pairs applied in order, each exactly as
//! Python's `re.sub(pattern, replacement, key)` would.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use regex_automata::meta::{self, Regex};
use regex_automata::util::captures::Captures;
use regex_automata::Input;

use crate::dialect::Dialect;
use crate::error::{CoreError, CoreResult};
use crate::exact::{self, Exact, Oracle};
use crate::pattern::{self, Translation};
use crate::template::Template;

/// One rule compiled for the `regex` crate.
///
/// Two forms: the fast translation, exact on ASCII keys that do not end in `\n`, and the
/// exact form ([`Exact`]) for every other key, built on first need (it may ask Python's `re`
/// for its character tables). A native rule never sends a key to Python's `re`.
#[derive(Debug, Clone)]
pub struct NativeRule {
    regex: Regex,
    template: Template,
    translation: Translation,
    exact: OnceLock<Arc<Exact>>,
    /// The result for the empty key where it differs from the fast form's (`\B`).
    empty_result: Option<String>,
}

/// Size limit for one compiled rule; a larger one runs on Python's `re` instead.
const REGEX_SIZE_LIMIT: usize = 16 << 20;

/// Per-thread search state for one rule, reused across keys (no allocation per key).
#[derive(Debug, Clone)]
pub struct Scratch {
    cache: meta::Cache,
    caps: Captures,
    /// For the exact form, made on its first use.
    exact: Option<(meta::Cache, Captures)>,
}

/// A key needs the rule's exact form, which is not built yet ([`NativeRule::prepare_exact`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedsExact;

impl NativeRule {
    /// Compiles a Python pattern (with `re` flag bits) and replacement template for
    /// CPython 3.11 to 3.13. [`CoreError::Unsupported`] means the rule must run on
    /// Python's `re`.
    pub fn compile(pattern: &str, flags: u32, repl: &str) -> CoreResult<Self> {
        Self::compile_for(pattern, flags, repl, Dialect::default())
    }

    /// [`NativeRule::compile`] for the `re` of a given CPython.
    pub fn compile_for(
        pattern: &str,
        flags: u32,
        repl: &str,
        dialect: Dialect,
    ) -> CoreResult<Self> {
        let translation = pattern::translate(pattern, flags)?;
        let template = Template::parse(repl, translation.groups, &translation.names)?;
        if !dialect.restores_captures_in_repeats
            && translation.captures_in_repeat
            && template.uses_groups()
        {
            return Err(CoreError::Unsupported(
                "a group inside a repeat used in the replacement: CPython 3.10's re can \
                 report other captures there (bpo-35859)"
                    .into(),
            ));
        }
        exact::check(&translation)?;
        let regex = build_regex(&translation.regex)?;
        let empty_result = if translation.empty_sensitive && dialect.non_boundary_fails_on_empty {
            let empty = build_regex(&pattern::translate_for_empty_key(&translation)?)?;
            let (mut cache, mut caps) = (empty.create_cache(), empty.create_captures());
            let out = sub_loop(&empty, &mut cache, &mut caps, &template, "", b"");
            Some(out.into_owned())
        } else {
            None
        };
        Ok(Self {
            regex,
            template,
            translation,
            exact: OnceLock::new(),
            empty_result,
        })
    }

    /// The `regex` crate pattern this rule runs on ASCII keys.
    pub fn regex(&self) -> &str {
        &self.translation.regex
    }

    /// Search state for [`NativeRule::sub_with`]; make one per thread.
    pub fn scratch(&self) -> Scratch {
        Scratch {
            cache: self.regex.create_cache(),
            caps: self.regex.create_captures(),
            exact: None,
        }
    }

    /// Whether this key needs the exact form: a non-ASCII key for a rule using
    /// Unicode-dependent constructs, or a key ending in `\n` for a rule using `$`.
    pub fn needs_exact(&self, key: &str) -> bool {
        (self.translation.unicode_sensitive && !key.is_ascii())
            || (self.translation.dollar_sensitive && key.ends_with('\n'))
    }

    /// Whether building the exact form needs Python's tables ([`Oracle`]).
    pub fn exact_needs_oracle(&self) -> bool {
        self.translation.unicode_sensitive
    }

    /// Whether the exact form must be built before the rule can be called native: a Unicode
    /// `\b`/`\B` rule, whose exact form may not exist ([`crate::exact::WordMap`]).
    pub fn exact_decides_nativeness(&self) -> bool {
        self.translation.unicode_boundary
    }

    /// Whether the exact form is built.
    pub fn exact_ready(&self) -> bool {
        self.exact.get().is_some()
    }

    /// Builds the exact form if it is not built yet.
    pub fn prepare_exact(&self, oracle: Option<&dyn Oracle>) -> CoreResult<()> {
        if self.exact.get().is_none() {
            let exact = Exact::build(&self.translation, oracle)?;
            let _ = self.exact.set(Arc::new(exact));
        }
        Ok(())
    }

    /// `re.sub(pattern, repl, key)`. Borrows the key when nothing matched. Builds the exact
    /// form without Python's tables where the key needs it (an error for a rule that needs
    /// them).
    pub fn sub<'k>(&self, key: &'k str) -> CoreResult<Cow<'k, str>> {
        if self.needs_exact(key) {
            self.prepare_exact(None)?;
        }
        self.sub_with(&mut self.scratch(), key)
            .map_err(|_| CoreError::Unsupported("the exact form is not built".into()))
    }

    /// [`NativeRule::sub`] with reusable search state; [`NeedsExact`] when the key needs
    /// the exact form and it is not built.
    ///
    /// Python's loop (3.7+): after a non-empty match the next search starts at its end and
    /// may find an empty match there; after an empty match it must find a non-empty match at
    /// the same place or move one character on. [`pattern::translate`] only admits patterns
    /// for which no such non-empty match can exist, so moving on is exact.
    pub fn sub_with<'k>(
        &self,
        scratch: &mut Scratch,
        key: &'k str,
    ) -> Result<Cow<'k, str>, NeedsExact> {
        if let Some(out) = self.empty_result.as_ref().filter(|_| key.is_empty()) {
            return Ok(if out.is_empty() {
                Cow::Borrowed(key)
            } else {
                Cow::Owned(out.clone())
            });
        }
        if !self.needs_exact(key) {
            return Ok(self.sub_fast(scratch, key));
        }
        let exact = self.exact.get().ok_or(NeedsExact)?;
        let regex = exact.regex();
        let (cache, caps) = scratch
            .exact
            .get_or_insert_with(|| (regex.create_cache(), regex.create_captures()));
        let hay = exact.haystack(key);
        Ok(sub_loop(regex, cache, caps, &self.template, key, &hay))
    }
}

impl NativeRule {
    /// The fast form on any key, whatever [`NativeRule::needs_exact`] says: for callers whose
    /// rules are known to mean the same to both engines on every key (the suggester's `\d`
    /// and literal rules, see `suggest/verify.rs`).
    pub fn sub_fast<'k>(&self, scratch: &mut Scratch, key: &'k str) -> Cow<'k, str> {
        sub_loop(
            &self.regex,
            &mut scratch.cache,
            &mut scratch.caps,
            &self.template,
            key,
            key.as_bytes(),
        )
    }
}

fn build_regex(pattern: &str) -> CoreResult<Regex> {
    Regex::builder()
        .configure(Regex::config().nfa_size_limit(Some(REGEX_SIZE_LIMIT)))
        .build(pattern)
        .map_err(|e| CoreError::Unsupported(format!("regex crate: {e}")))
}

/// Python's `re.sub` loop over `hay`, which has the same length and char boundaries as `key`
/// (the exact form may search stand-in bytes); the result is built from `key`. Inlined: it is
/// the hot loop of the fast form.
#[inline(always)]
fn sub_loop<'k>(
    regex: &Regex,
    cache: &mut meta::Cache,
    caps: &mut Captures,
    template: &Template,
    key: &'k str,
    hay: &[u8],
) -> Cow<'k, str> {
    let literal = template.as_literal();
    let mut out: Option<String> = None;
    let (mut last, mut pos) = (0, 0);
    while pos <= key.len() {
        let input = Input::new(hay).range(pos..);
        let (start, end) = if literal.is_some() {
            match regex.search_with(cache, &input) {
                Some(m) => (m.start(), m.end()),
                None => break,
            }
        } else {
            regex.search_captures_with(cache, &input, caps);
            match caps.get_match() {
                Some(m) => (m.start(), m.end()),
                None => break,
            }
        };
        let buf = out.get_or_insert_with(|| String::with_capacity(key.len() + 16));
        buf.push_str(&key[last..start]);
        match literal {
            Some(s) => buf.push_str(s),
            None => template.expand(key, caps, buf),
        }
        last = end;
        pos = if end > start {
            end
        } else {
            match key[end..].chars().next() {
                Some(c) => end + c.len_utf8(),
                None => break,
            }
        };
    }
    match out {
        None => Cow::Borrowed(key),
        Some(mut buf) => {
            buf.push_str(&key[last..]);
            Cow::Owned(buf)
        }
    }
}

/// How one rule runs.
#[derive(Debug, Clone)]
pub enum Engine {
    Native(Box<NativeRule>),
    /// Python's `re`, with the reason the `regex` crate could not be trusted.
    Python(String),
}

impl Engine {
    /// Native where [`NativeRule::compile`] succeeds, else Python's `re` with the reason.
    pub fn compile(pattern: &str, flags: u32, repl: &str) -> Self {
        Self::compile_for(pattern, flags, repl, Dialect::default())
    }

    /// [`Engine::compile`] for the `re` of a given CPython.
    pub fn compile_for(pattern: &str, flags: u32, repl: &str, dialect: Dialect) -> Self {
        match NativeRule::compile_for(pattern, flags, repl, dialect) {
            Ok(rule) => Engine::Native(Box::new(rule)),
            Err(e) => Engine::Python(match e {
                CoreError::Unsupported(why) | CoreError::Invalid(why) => why,
            }),
        }
    }
}

/// Where a key's native run stopped: the key so far, and the rule that runs on Python
/// (`exact == false`) or whose exact form must be built first (`exact == true`).
pub struct Pending<'k> {
    pub value: Cow<'k, str>,
    pub rule: usize,
    pub exact: bool,
}

/// An ordered list of rules.
#[derive(Debug, Clone, Default)]
pub struct KeyRules {
    engines: Vec<Engine>,
}

impl KeyRules {
    pub fn new(engines: Vec<Engine>) -> Self {
        Self { engines }
    }

    /// Compiles `(pattern, replacement)` pairs with no flags.
    pub fn compile<'a>(rules: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self::new(
            rules
                .into_iter()
                .map(|(p, r)| Engine::compile(p, 0, r))
                .collect(),
        )
    }

    pub fn engines(&self) -> &[Engine] {
        &self.engines
    }

    pub fn len(&self) -> usize {
        self.engines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.engines.is_empty()
    }

    /// Search state for [`KeyRules::run_native`]; make one per thread.
    pub fn scratch(&self) -> Vec<Option<Scratch>> {
        self.engines
            .iter()
            .map(|e| match e {
                Engine::Native(rule) => Some(rule.scratch()),
                Engine::Python(_) => None,
            })
            .collect()
    }

    /// Runs rules `from..` on `value` while they can run natively. `Ok` is the final key;
    /// `Err` says which rule must run on Python next. `scratch` comes from
    /// [`KeyRules::scratch`].
    pub fn run_native<'k>(
        &self,
        scratch: &mut [Option<Scratch>],
        mut value: Cow<'k, str>,
        from: usize,
    ) -> Result<Cow<'k, str>, Pending<'k>> {
        for (i, (engine, scratch)) in self
            .engines
            .iter()
            .zip(scratch.iter_mut())
            .enumerate()
            .skip(from)
        {
            let (Engine::Native(rule), Some(scratch)) = (engine, scratch) else {
                return Err(Pending {
                    value,
                    rule: i,
                    exact: false,
                });
            };
            let changed = match rule.sub_with(scratch, &value) {
                Err(NeedsExact) => None,
                // Unchanged: keep the value (and, when borrowed, the caller's key).
                Ok(Cow::Borrowed(_)) => Some(None),
                Ok(Cow::Owned(changed)) => Some(Some(changed)),
            };
            match changed {
                None => {
                    return Err(Pending {
                        value,
                        rule: i,
                        exact: true,
                    })
                }
                Some(None) => {}
                Some(Some(changed)) => value = Cow::Owned(changed),
            }
        }
        Ok(value)
    }

    /// Applies every rule to `key`; an error if some rule needs Python for it.
    pub fn apply_one<'k>(&self, key: &'k str) -> CoreResult<Cow<'k, str>> {
        self.run_native(&mut self.scratch(), Cow::Borrowed(key), 0)
            .map_err(|p| {
                CoreError::Unsupported(format!("rule {} needs Python's re for {:?}", p.rule, key))
            })
    }

    /// Whether native rule `rule` has keys that need its exact form and it is not built.
    pub fn may_need_exact(&self, rule: usize) -> bool {
        match self.engines.get(rule) {
            Some(Engine::Native(r)) => {
                (r.translation.unicode_sensitive || r.translation.dollar_sensitive)
                    && !r.exact_ready()
            }
            _ => false,
        }
    }

    /// Builds the exact form of native rule `rule` ([`NativeRule::prepare_exact`]).
    pub fn prepare_exact(&self, rule: usize, oracle: Option<&dyn Oracle>) -> CoreResult<()> {
        match self.engines.get(rule) {
            Some(Engine::Native(r)) => r.prepare_exact(oracle),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(p: &str, r: &str, key: &str) -> String {
        match NativeRule::compile(p, 0, r) {
            Ok(rule) => rule.sub(key).unwrap().into_owned(),
            Err(e) => panic!("{p:?} should run natively: {e}"),
        }
    }

    #[test]
    fn strips_a_prefix() {
        assert_eq!(
            sub(r"^module\.", "", "module.backbone.conv.weight"),
            "backbone.conv.weight"
        );
        assert_eq!(
            sub(r"^module\.", "", "backbone.module.x"),
            "backbone.module.x"
        );
    }

    #[test]
    fn replaces_every_match() {
        assert_eq!(sub(r"\.", "/", "a.b.c"), "a/b/c");
        assert_eq!(
            sub(r"layers\.(\d+)", r"blocks.\1", "layers.3.x.layers.12"),
            "blocks.3.x.blocks.12"
        );
    }

    #[test]
    fn empty_matches_follow_python() {
        // Values from CPython 3.11's re.sub.
        assert_eq!(sub("x*", "-", "abxd"), "-a-b--d-");
        assert_eq!(sub(r"\b", "|", "ab cd"), "|ab| |cd|");
        assert_eq!(sub("^", "p.", "key"), "p.key");
        assert_eq!(sub("$", "X", "a"), "aX");
        assert_eq!(sub("(?m)^", "X", "a\n"), "Xa\nX");
        assert_eq!(sub("", "-", "ab"), "-a-b-");
        assert_eq!(sub("", "-", "é"), "-é-");
    }

    #[test]
    fn unmatched_groups_expand_to_nothing() {
        assert_eq!(sub(r"(a)|(b)", r"[\1\2]", "ab"), "[a][b]");
    }

    #[test]
    fn named_groups_in_templates() {
        assert_eq!(sub(r"(?P<n>\d+)", r"<\g<n>>", "x1y22"), "x<1>y<22>");
    }

    #[test]
    fn groups_inside_repeats_run_on_python_for_cpython_3_10() {
        let old = Dialect::cpython(3, 10);
        for (pattern, repl) in [(r"(ab|a)*?b", r"[\1]"), (r"(?:(a)|b)+", r"\g<1>")] {
            assert!(
                NativeRule::compile_for(pattern, 0, repl, old).is_err(),
                "{pattern}"
            );
            assert!(NativeRule::compile(pattern, 0, repl).is_ok(), "{pattern}");
        }
        // The overall match is the same on every version; so are groups outside repeats.
        for (pattern, repl) in [
            (r"(ab|a)*?b", "x"),
            (r"(ab|a)*?b", r"\g<0>"),
            (r"(a|b)c*", r"\1"),
        ] {
            assert!(
                NativeRule::compile_for(pattern, 0, repl, old).is_ok(),
                "{pattern}"
            );
        }
        assert_eq!(sub(r"(ab|a)*?b", r"[\1]", "ab"), "[a]");
    }

    #[test]
    fn dollar_before_trailing_newline_runs_the_exact_form() {
        let rule = NativeRule::compile("a$", 0, "b").unwrap();
        assert!(rule.needs_exact("a\n"));
        assert!(!rule.needs_exact("a"));
        assert_eq!(rule.sub("a").unwrap(), "b");
        // Values from CPython 3.11's re.sub.
        assert_eq!(sub("a$", "b", "a\n"), "b\n");
        assert_eq!(sub("a$", "b", "a\n\n"), "a\n\n");
        assert_eq!(sub("$", "X", "a\n"), "aX\nX");
        assert_eq!(sub(r"\n$", "X", "a\n"), "aX");
        assert_eq!(sub("(?s).$", "X", "ab\n"), "aXX");
        assert_eq!(sub("(a|\n)$", "[\\1]", "a\na\n"), "a\n[a][\n]");
    }

    #[test]
    fn non_ascii_keys_need_the_exact_form_for_word_classes() {
        let rule = NativeRule::compile(r"\w+", 0, "w").unwrap();
        assert!(rule.needs_exact("é"));
        let mut scratch = rule.scratch();
        assert_eq!(rule.sub_with(&mut scratch, "é").err(), Some(NeedsExact));
        assert!(
            rule.sub("é").is_err(),
            "the exact form of \\w needs Python's tables"
        );
        rule.prepare_exact(Some(&crate::exact::tests::RustOracle))
            .unwrap();
        assert_eq!(rule.sub_with(&mut scratch, "ab.é").unwrap(), "w.w");
        assert_eq!(rule.sub("ab.cd").unwrap(), "w.w");
        let plain = NativeRule::compile(r"\.", 0, "/").unwrap();
        assert!(!plain.needs_exact("é.x"));
    }

    #[test]
    fn non_word_boundary_never_matches_the_empty_key() {
        // CPython up to 3.13; the regex crate's \B matches there.
        assert_eq!(sub(r"\B", "-", ""), "");
        assert_eq!(sub(r"x?\B", "-", ""), "");
        assert_eq!(sub(r"(y|\B)x*", "-", ""), "");
        assert_eq!(sub(r"(y|\B)x*", "-", "ab"), "a-b");
        assert_eq!(sub(r"\B", "-", "ab"), "a-b");
        let newer = NativeRule::compile_for(r"\B", 0, "-", Dialect::cpython(3, 14)).unwrap();
        assert_eq!(newer.sub("").unwrap(), "-");
    }

    #[test]
    fn unchanged_keys_are_borrowed() {
        let rule = NativeRule::compile("zzz", 0, "y").unwrap();
        assert!(matches!(rule.sub("abc").unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn chain_reports_where_python_is_needed() {
        let rules = KeyRules::new(vec![
            Engine::compile(r"^module\.", 0, ""),
            Engine::compile(r"(a)\1", 0, "b"),
            Engine::compile(r"x", 0, "y"),
        ]);
        assert!(matches!(rules.engines()[1], Engine::Python(_)));
        let mut scratch = rules.scratch();
        match rules.run_native(&mut scratch, Cow::Borrowed("module.aa.x"), 0) {
            Err(p) => {
                assert_eq!(p.rule, 1);
                assert_eq!(p.value, "aa.x");
                assert!(!p.exact);
            }
            Ok(v) => panic!("should stop at rule 1, got {v}"),
        }
        assert_eq!(
            rules
                .run_native(&mut scratch, Cow::Borrowed("bb.x"), 2)
                .ok()
                .unwrap(),
            "bb.y"
        );
    }

    #[test]
    fn catastrophic_pattern_is_linear() {
        let rule = NativeRule::compile(r"^(a+)+$", 0, "x").unwrap();
        let key = format!("{}b", "a".repeat(10_000));
        assert_eq!(rule.sub(&key).unwrap(), key.as_str());
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn escape(s: &str) -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_string()
                } else {
                    format!("\\{c}")
                }
            })
            .collect()
    }

    proptest! {
        /// A literal pattern with a literal replacement is `str::replace`.
        #[test]
        fn literal_rule_is_str_replace(needle in "[a-c.]{1,3}", repl in "[x-z.]{0,3}", key in "[a-c.]{0,24}") {
            let rule = NativeRule::compile(&escape(&needle), 0, &repl).unwrap();
            prop_assert_eq!(rule.sub(&key).unwrap().into_owned(), key.replace(&needle, &repl));
        }

        /// `^prefix` strips the prefix exactly when the key starts with it.
        #[test]
        fn anchored_prefix_is_strip_prefix(prefix in "[a-z]{1,6}\\.", key in "[a-z.]{0,20}") {
            let rule = NativeRule::compile(&format!("^{}", escape(&prefix)), 0, "").unwrap();
            let expected = key.strip_prefix(prefix.as_str()).unwrap_or(&key);
            prop_assert_eq!(rule.sub(&key).unwrap().into_owned(), expected);
        }

        /// Neither the parser, the template parser nor the engine panics on any input.
        #[test]
        fn never_panics(pattern in "\\PC{0,16}", repl in "\\PC{0,8}", key in "\\PC{0,16}") {
            if let Ok(rule) = NativeRule::compile(&pattern, 0, &repl) {
                let _ = rule.prepare_exact(Some(&crate::exact::tests::RustOracle));
                let _ = rule.sub(&key);
            }
        }

        /// Regex-flavoured noise, where the parser's corner cases live.
        #[test]
        fn never_panics_on_regex_noise(pattern in "[()\\[\\]{}|*+?.^$\\\\a-c0-9,:<>=!#PgimsxL-]{0,20}", key in "[a-c\\n]{0,12}") {
            if let Ok(rule) = NativeRule::compile(&pattern, 0, "\\g<0>") {
                let _ = rule.prepare_exact(Some(&crate::exact::tests::RustOracle));
                prop_assert_eq!(rule.sub(&key).unwrap().into_owned(), key.clone());
            }
        }
    }
}
