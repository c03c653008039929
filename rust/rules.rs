//! Compiled key rules: `(pattern, replacement)` pairs applied in order, each exactly as
//! Python's `re.sub(pattern, replacement, key)` would.

use std::borrow::Cow;

use regex_automata::meta::{self, Regex};
use regex_automata::util::captures::Captures;
use regex_automata::Input;

use crate::dialect::Dialect;
use crate::error::{CoreError, CoreResult};
use crate::pattern::{self, Translation};
use crate::template::Template;

/// One rule compiled for the `regex` crate.
#[derive(Debug, Clone)]
pub struct NativeRule {
    regex: Regex,
    template: Template,
    translation: Translation,
}

/// Size limit for one compiled rule; a larger one runs on Python's `re` instead.
const REGEX_SIZE_LIMIT: usize = 16 << 20;

/// Per-thread search state for one rule, reused across keys (no allocation per key).
#[derive(Debug, Clone)]
pub struct Scratch {
    cache: meta::Cache,
    caps: Captures,
}

impl NativeRule {
    /// Compiles a Python pattern (with `re` flag bits) and replacement template for
    /// CPython 3.11 and later. [`CoreError::Unsupported`] means the rule must run on
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
        let regex = Regex::builder()
            .configure(Regex::config().nfa_size_limit(Some(REGEX_SIZE_LIMIT)))
            .build(&translation.regex)
            .map_err(|e| CoreError::Unsupported(format!("regex crate: {e}")))?;
        Ok(Self {
            regex,
            template,
            translation,
        })
    }

    /// The `regex` crate pattern this rule runs.
    pub fn regex(&self) -> &str {
        &self.translation.regex
    }

    /// Search state for [`NativeRule::sub_with`]; make one per thread.
    pub fn scratch(&self) -> Scratch {
        Scratch {
            cache: self.regex.create_cache(),
            caps: self.regex.create_captures(),
        }
    }

    /// Whether this key must go through Python's `re` for this rule: a non-ASCII key for a
    /// rule using Unicode-dependent constructs, a key ending in `\n` for a rule using `$`, or
    /// the empty key for a rule using `\B`.
    pub fn needs_python(&self, key: &str) -> bool {
        (self.translation.unicode_sensitive && !key.is_ascii())
            || (self.translation.dollar_sensitive && key.ends_with('\n'))
            || (self.translation.empty_sensitive && key.is_empty())
    }

    /// `re.sub(pattern, repl, key)`. Borrows the key when nothing matched.
    ///
    /// Python's loop (3.7+): after a non-empty match the next search starts at its end and
    /// may find an empty match there; after an empty match it must find a non-empty match at
    /// the same place or move one character on. [`pattern::translate`] only admits patterns
    /// for which no such non-empty match can exist, so moving on is exact.
    pub fn sub<'k>(&self, key: &'k str) -> Cow<'k, str> {
        self.sub_with(&mut self.scratch(), key)
    }

    /// [`NativeRule::sub`] with reusable search state.
    pub fn sub_with<'k>(&self, scratch: &mut Scratch, key: &'k str) -> Cow<'k, str> {
        let literal = self.template.as_literal();
        let mut out: Option<String> = None;
        let (mut last, mut pos) = (0, 0);
        while pos <= key.len() {
            let input = Input::new(key).range(pos..);
            let (start, end) = if literal.is_some() {
                match self.regex.search_with(&mut scratch.cache, &input) {
                    Some(m) => (m.start(), m.end()),
                    None => break,
                }
            } else {
                self.regex
                    .search_captures_with(&mut scratch.cache, &input, &mut scratch.caps);
                match scratch.caps.get_match() {
                    Some(m) => (m.start(), m.end()),
                    None => break,
                }
            };
            let buf = out.get_or_insert_with(|| String::with_capacity(key.len() + 16));
            buf.push_str(&key[last..start]);
            match literal {
                Some(s) => buf.push_str(s),
                None => self.template.expand(key, &scratch.caps, buf),
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

/// Where a key's native run stopped: the key so far and the rule that needs Python.
pub struct Pending<'k> {
    pub value: Cow<'k, str>,
    pub rule: usize,
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
            match (engine, scratch) {
                (Engine::Native(rule), Some(scratch)) if !rule.needs_python(&value) => {
                    value = match value {
                        Cow::Borrowed(k) => rule.sub_with(scratch, k),
                        Cow::Owned(k) => match rule.sub_with(scratch, &k) {
                            Cow::Borrowed(_) => Cow::Owned(k),
                            Cow::Owned(changed) => Cow::Owned(changed),
                        },
                    };
                }
                _ => return Err(Pending { value, rule: i }),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(p: &str, r: &str, key: &str) -> String {
        match NativeRule::compile(p, 0, r) {
            Ok(rule) => rule.sub(key).into_owned(),
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
    fn dollar_before_trailing_newline_needs_python() {
        let rule = NativeRule::compile("a$", 0, "b").unwrap();
        assert!(rule.needs_python("a\n"));
        assert!(!rule.needs_python("a"));
        assert_eq!(rule.sub("a"), "b");
    }

    #[test]
    fn non_ascii_keys_need_python_for_word_classes() {
        let rule = NativeRule::compile(r"\w+", 0, "w").unwrap();
        assert!(rule.needs_python("é"));
        assert_eq!(rule.sub("ab.cd"), "w.w");
        let plain = NativeRule::compile(r"\.", 0, "/").unwrap();
        assert!(!plain.needs_python("é.x"));
    }

    #[test]
    fn unchanged_keys_are_borrowed() {
        let rule = NativeRule::compile("zzz", 0, "y").unwrap();
        assert!(matches!(rule.sub("abc"), Cow::Borrowed(_)));
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
        assert_eq!(rule.sub(&key), key.as_str());
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
            prop_assert_eq!(rule.sub(&key).into_owned(), key.replace(&needle, &repl));
        }

        /// `^prefix` strips the prefix exactly when the key starts with it.
        #[test]
        fn anchored_prefix_is_strip_prefix(prefix in "[a-z]{1,6}\\.", key in "[a-z.]{0,20}") {
            let rule = NativeRule::compile(&format!("^{}", escape(&prefix)), 0, "").unwrap();
            let expected = key.strip_prefix(prefix.as_str()).unwrap_or(&key);
            prop_assert_eq!(rule.sub(&key).into_owned(), expected);
        }

        /// Neither the parser, the template parser nor the engine panics on any input.
        #[test]
        fn never_panics(pattern in "\\PC{0,16}", repl in "\\PC{0,8}", key in "\\PC{0,16}") {
            if let Ok(rule) = NativeRule::compile(&pattern, 0, &repl) {
                let _ = rule.sub(&key);
            }
        }

        /// Regex-flavoured noise, where the parser's corner cases live.
        #[test]
        fn never_panics_on_regex_noise(pattern in "[()\\[\\]{}|*+?.^$\\\\a-c0-9,:<>=!#PgimsxL-]{0,20}", key in "[a-c\\n]{0,12}") {
            if let Ok(rule) = NativeRule::compile(&pattern, 0, "\\g<0>") {
                prop_assert_eq!(rule.sub(&key).into_owned(), key.clone());
            }
        }
    }
}
