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
fn profile_resnet_like() {
    let mut src_names = Vec::new();
    let mut tgt_names = Vec::new();
    let mut shapes: Vec<Vec<u64>> = Vec::new();
    for (l, blocks) in [3, 4, 6, 3].iter().enumerate() {
        for b in 0..*blocks {
            for n in 1..=3 {
                for leaf in ["weight", "bias", "running_mean", "running_var"] {
                    src_names.push(format!("backbone.stages.{l}.blocks.{b}.norm{n}.{leaf}"));
                    tgt_names.push(format!("layer{}.{b}.bn{n}.{leaf}", l + 1));
                    shapes.push(vec![64 << l << (n / 3 * 2)]);
                }
                src_names.push(format!("backbone.stages.{l}.blocks.{b}.conv{n}.weight"));
                tgt_names.push(format!("layer{}.{b}.conv{n}.weight", l + 1));
                shapes.push(vec![64 << l, 64 << l, n as u64, 1]);
            }
        }
    }
    let src: Vec<Entry> = src_names.iter().zip(&shapes).map(|(n, s)| Entry { name: n, shape: Some(s), dtype: None }).collect();
    let tgt: Vec<Entry> = tgt_names.iter().zip(&shapes).map(|(n, s)| Entry { name: n, shape: Some(s), dtype: None }).collect();
    let t = std::time::Instant::now();
    for _ in 0..20 {
        suggest(&src, &tgt);
    }
    eprintln!("{:?}", t.elapsed() / 20);
}
