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

#[test]
#[ignore]
fn profile_million() {
    let mut src_names = Vec::new();
    let mut tgt_names = Vec::new();
    let mut shapes: Vec<Vec<u64>> = Vec::new();
    'outer: for n in 0..64 {
        for m in 0..5209 {
            for k in 1..=3 {
                src_names.push(format!("module.backbone.layers.{n}.experts.{m}.w{k}.weight"));
                tgt_names.push(format!("backbone.layers.{n}.experts.{m}.w{k}.weight"));
                shapes.push(if k == 2 { vec![32, 64] } else { vec![64, 32] });
                if src_names.len() == 1_000_000 {
                    break 'outer;
                }
            }
        }
    }
    let src: Vec<Entry> = src_names.iter().zip(&shapes).map(|(n, s)| Entry { name: n, shape: Some(s), dtype: None }).collect();
    let tgt: Vec<Entry> = tgt_names.iter().zip(&shapes).map(|(n, s)| Entry { name: n, shape: Some(s), dtype: None }).collect();
    let t = std::time::Instant::now();
    let s = suggest(&src, &tgt);
    eprintln!("{:?} {:?}", t.elapsed(), s.rules);
}
