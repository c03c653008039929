//! End-to-end tests of [`suggest`](super::suggest): rules, statuses and their exactness.

use super::*;

fn entries<'a>(keys: &'a [(&'a str, &'a [u64])]) -> Vec<Entry<'a>> {
    keys.iter()
        .map(|(name, shape)| Entry {
            name,
            shape: Some(shape),
            dtype: Some("float32"),
        })
        .collect()
}

fn rules(s: &Suggestion) -> Vec<(&str, &str)> {
    s.rules
        .iter()
        .map(|r| (r.pattern.as_str(), r.replacement.as_str()))
        .collect()
}

#[test]
fn identity_needs_no_rule() {
    let keys: &[(&str, &[u64])] = &[("a.weight", &[2, 3]), ("a.bias", &[2])];
    let s = suggest(&entries(keys), &entries(keys));
    assert!(s.rules.is_empty());
    assert_eq!(s.source, vec![Status::Mapped(0), Status::Mapped(1)]);
}

#[test]
fn module_prefix() {
    let src: &[(&str, &[u64])] = &[("module.a.weight", &[2, 3]), ("module.a.bias", &[2])];
    let tgt: &[(&str, &[u64])] = &[("a.weight", &[2, 3]), ("a.bias", &[2])];
    let s = suggest(&entries(src), &entries(tgt));
    assert_eq!(rules(&s), vec![(r"^module\.", "")]);
    assert_eq!(s.rules[0].keys, 2);
}
