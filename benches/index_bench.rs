//! The key index over one million realistic keys: a mixture-of-experts state dict wrapped in
//! DataParallel (`module.backbone.layers.N.experts.M.wK.weight`).

use std::hint::black_box;

use ckptmap::index::{collisions, diff, filter_prefix, group_by_owner, owners};
use criterion::{criterion_group, criterion_main, Criterion};

const LAYERS: usize = 64;
const EXPERTS: usize = 5_209;
const KEYS: usize = 1_000_000;

fn keys() -> Vec<String> {
    let mut keys = Vec::with_capacity(LAYERS * EXPERTS * 3);
    for n in 0..LAYERS {
        for m in 0..EXPERTS {
            for k in 1..=3 {
                keys.push(format!(
                    "module.backbone.layers.{n}.experts.{m}.w{k}.weight"
                ));
            }
        }
    }
    keys.truncate(KEYS);
    keys
}

/// The paths `named_modules()` yields for that model, root first.
fn module_paths() -> Vec<String> {
    let mut paths: Vec<String> = ["", "module", "module.backbone", "module.backbone.layers"]
        .map(String::from)
        .to_vec();
    for n in 0..LAYERS {
        let layer = format!("module.backbone.layers.{n}");
        paths.push(layer.clone());
        paths.push(format!("{layer}.experts"));
        for m in 0..EXPERTS {
            let expert = format!("{layer}.experts.{m}");
            paths.push(expert.clone());
            for k in 1..=3 {
                paths.push(format!("{expert}.w{k}"));
            }
        }
    }
    paths
}

fn bench_index(c: &mut Criterion) {
    let keys = keys();
    let paths = module_paths();
    // The model expects 1% of the keys under another name: 10k missing, 10k unexpected.
    let expected: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            if i % 100 == 0 {
                k.replace(".weight", ".bias")
            } else {
                k.clone()
            }
        })
        .collect();
    // Revised keys where every 1000th one landed on its predecessor's name.
    let mut revised = keys.clone();
    for i in (1000..revised.len()).step_by(1000) {
        revised[i] = revised[i - 1].clone();
    }

    let mut g = c.benchmark_group("index_1M");
    g.sample_size(10);
    g.bench_function("filter_prefix_strip_all", |b| {
        b.iter(|| filter_prefix(black_box(&keys), "module", true))
    });
    g.bench_function("filter_prefix_one_layer", |b| {
        b.iter(|| filter_prefix(black_box(&keys), "module.backbone.layers.7", true))
    });
    g.bench_function("owners", |b| {
        b.iter(|| owners(black_box(&keys), black_box(&paths)))
    });
    g.bench_function("group_by_owner", |b| {
        b.iter(|| group_by_owner(black_box(&keys), black_box(&paths)))
    });
    g.bench_function("diff", |b| {
        b.iter(|| diff(black_box(&keys), black_box(&expected)))
    });
    g.bench_function("collisions_none", |b| {
        b.iter(|| collisions(black_box(&keys)))
    });
    g.bench_function("collisions_1000", |b| {
        b.iter(|| collisions(black_box(&revised)))
    });
    g.finish();
}

criterion_group!(benches, bench_index);
criterion_main!(benches);
