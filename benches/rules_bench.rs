//! Criterion benches of the key-rule engine over 1M realistic keys (single thread).

use std::hint::black_box;

use ckptmap::rules::KeyRules;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn keys(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let (layer, expert, w) = (i / 768, (i / 3) % 256, i % 3 + 1);
            format!("module.backbone.layers.{layer}.experts.{expert}.w{w}.weight")
        })
        .collect()
}

const RULES: [(&str, &str); 3] = [
    (r"^module\.", ""),
    (r"^backbone\.", "encoder."),
    (r"\.w(\d)\.", r".proj\1."),
];

fn bench_rules(c: &mut Criterion) {
    let keys = keys(1_000_000);
    let mut group = c.benchmark_group("rules");
    group.sample_size(10);
    group.throughput(Throughput::Elements(keys.len() as u64));

    group.bench_function("compile 3 rules", |b| {
        b.iter(|| KeyRules::compile(black_box(RULES)))
    });

    let rules = KeyRules::compile(RULES);
    group.bench_function("apply 3 rules to 1M keys", |b| {
        b.iter(|| {
            let mut scratch = rules.scratch();
            keys.iter()
                .map(|k| {
                    rules
                        .run_native(&mut scratch, k.as_str().into(), 0)
                        .ok()
                        .map(|v| v.len())
                })
                .fold(0, |acc, n| acc + n.unwrap_or(0))
        })
    });

    let strip = KeyRules::compile([(r"^module\.", "")]);
    group.bench_function("strip prefix from 1M keys", |b| {
        b.iter(|| {
            let mut scratch = strip.scratch();
            keys.iter()
                .filter(|k| strip.run_native(&mut scratch, k.as_str().into(), 0).is_ok())
                .count()
        })
    });

    let catastrophic = KeyRules::compile([(r"^(a+)+$", "x")]);
    let long_key = format!("{}b", "a".repeat(100_000));
    group.throughput(Throughput::Bytes(long_key.len() as u64));
    group.bench_function("^(a+)+$ on a 100k-char key", |b| {
        b.iter(|| {
            catastrophic
                .apply_one(black_box(&long_key))
                .map(|v| v.len())
        })
    });
    group.finish();
}

criterion_group!(benches, bench_rules);
criterion_main!(benches);
