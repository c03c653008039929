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

fn owned_entries(v: &[(String, Vec<u64>)]) -> Vec<Entry<'_>> {
    v.iter()
        .map(|(n, s)| Entry {
            name: n,
            shape: Some(s),
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

#[test]
fn renamed_segments_offsets_and_splits() {
    let mut src: Vec<(String, Vec<u64>)> = Vec::new();
    let mut tgt: Vec<(String, Vec<u64>)> = Vec::new();
    for stage in 0..3u64 {
        for block in 0..2 {
            for (i, leaf) in ["weight", "bias"].iter().enumerate() {
                let shape = vec![8 << stage, 1 + i as u64];
                src.push((
                    format!("backbone.stages.{stage}.blocks.{block}.norm1.{leaf}"),
                    shape.clone(),
                ));
                tgt.push((format!("layer{}.{block}.bn1.{leaf}", stage + 1), shape));
            }
            src.push((
                format!("backbone.stages.{stage}.blocks.{block}.shortcut.conv.weight"),
                vec![3, stage],
            ));
            tgt.push((
                format!("layer{}.{block}.downsample.0.weight", stage + 1),
                vec![3, stage],
            ));
            src.push((
                format!("backbone.stages.{stage}.blocks.{block}.shortcut.norm.weight"),
                vec![5, stage],
            ));
            tgt.push((
                format!("layer{}.{block}.downsample.1.weight", stage + 1),
                vec![5, stage],
            ));
        }
    }
    let s = suggest(&owned_entries(&src), &owned_entries(&tgt));
    assert!(
        s.source
            .iter()
            .enumerate()
            .all(|(i, st)| *st == Status::Mapped(i as u32)),
        "{s:?}"
    );
    let rules: Vec<(String, String)> = s
        .rules
        .iter()
        .map(|r| (r.pattern.clone(), r.replacement.clone()))
        .collect();
    assert!(rules.len() <= 6, "{rules:?}");
    assert!(rules.contains(&(r"^backbone\.stages\.0\.blocks\.".into(), "layer1.".into())));
    assert!(rules.contains(&(r"(^|\.)norm(\d+)\.".into(), r"\1bn\2.".into())));
}

#[test]
fn ambiguity_is_reported_on_both_sides() {
    let src: &[(&str, &[u64])] = &[("a.weight", &[4]), ("b.weight", &[4])];
    let tgt: &[(&str, &[u64])] = &[("x.weight", &[4]), ("y.weight", &[4])];
    let s = suggest(&entries(src), &entries(tgt));
    assert!(s.rules.is_empty());
    assert!(matches!(&s.source[0], Status::Ambiguous(c) if c.len() == 2));
    assert!(matches!(&s.target[1], Status::Ambiguous(c) if c.len() == 2));
}

#[test]
fn hostile_keys_do_not_break_the_rules() {
    // Regex metacharacters, markers, a trailing newline and non-ASCII digits.
    let src: &[(&str, &[u64])] = &[
        ("m.a(1)+[x].w", &[2]),
        ("m.\u{1}b.w\n", &[3]),
        ("m.c\u{663}.w", &[5]),
        ("m.d.0.w", &[7]),
    ];
    let tgt: &[(&str, &[u64])] = &[
        ("a(1)+[x].w", &[2]),
        ("\u{1}b.w\n", &[3]),
        ("c\u{663}.w", &[5]),
        ("d.0.w", &[7]),
    ];
    let s = suggest(&entries(src), &entries(tgt));
    assert_eq!(rules(&s), vec![(r"^m\.", "")]);
    let compiled = verify::Compiled::new(&[(r"^m\.".to_string(), String::new())]).unwrap();
    assert_eq!(compiled.apply(&["m.x"]), ["x"]);
}

#[test]
fn empty_sides() {
    let none: &[(&str, &[u64])] = &[];
    let one: &[(&str, &[u64])] = &[("a", &[1])];
    assert_eq!(suggest(&entries(none), &entries(none)).rules, vec![]);
    let s = suggest(&entries(one), &entries(none));
    assert_eq!(s.source, vec![Status::NoCandidate]);
    let s = suggest(&entries(none), &entries(one));
    assert_eq!(s.target, vec![Status::NoCandidate]);
}

mod properties {
    use proptest::prelude::*;

    use super::super::*;

    /// Keys `top.N.word.leaf` with shapes from a small set (many same-shaped candidates).
    fn keys() -> impl Strategy<Value = Vec<(String, Vec<u64>)>> {
        let word = prop::sample::select(vec!["conv", "norm", "attn", "fc", "proj"]);
        let leaf = prop::sample::select(vec!["weight", "bias"]);
        prop::collection::vec((0u64..3, word, leaf, 1u64..4), 1..24).prop_map(|items| {
            let mut seen = std::collections::HashSet::new();
            items
                .into_iter()
                .map(|(n, w, l, d)| (format!("blocks.{n}.{w}.{l}"), vec![d]))
                .filter(|(k, _)| seen.insert(k.clone()))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the suggester maps, it maps right, and the rules do exactly that.
        #[test]
        fn every_mapping_is_correct(
            keys in keys(),
            prefix in prop::sample::select(vec!["", "module.", "model.backbone."]),
            rename in prop::sample::select(vec![None, Some(("norm", "bn")), Some(("blocks", "layers"))]),
            drop in prop::collection::vec(any::<bool>(), 24),
        ) {
            let renamed: Vec<(String, Vec<u64>)> = keys
                .iter()
                .map(|(k, s)| {
                    let mut k = format!("{prefix}{k}");
                    if let Some((a, b)) = rename {
                        k = k.replace(&format!(".{a}."), &format!(".{b}."));
                        if let Some(rest) = k.strip_prefix(&format!("{a}.")) {
                            k = format!("{b}.{rest}");
                        }
                    }
                    (k, s.clone())
                })
                .collect();
            let kept: Vec<usize> = (0..keys.len()).filter(|&i| !drop[i]).collect();
            let src: Vec<Entry<'_>> = kept
                .iter()
                .map(|&i| Entry { name: &renamed[i].0, shape: Some(&renamed[i].1), dtype: None })
                .collect();
            let tgt: Vec<Entry<'_>> = keys
                .iter()
                .map(|(k, s)| Entry { name: k, shape: Some(s), dtype: None })
                .collect();
            let s = suggest(&src, &tgt);
            let owned: Vec<(String, String)> = s
                .rules
                .iter()
                .map(|r| (r.pattern.clone(), r.replacement.clone()))
                .collect();
            let compiled = verify::Compiled::new(&owned).unwrap();
            let names: Vec<&str> = src.iter().map(|e| e.name).collect();
            let revised = compiled.apply(&names);
            for (pos, &i) in kept.iter().enumerate() {
                if let Status::Mapped(t) = s.source[pos] {
                    prop_assert_eq!(t as usize, i);
                }
                // No key lands on a model key of its shape that is not its own.
                if let Some(t) = keys.iter().position(|(k, _)| *k == revised[pos]) {
                    if keys[t].1 == renamed[i].1 {
                        prop_assert_eq!(t, i, "{:?} -> {:?} with {:?}", names[pos], revised[pos], owned);
                    }
                }
            }
        }
    }
}
