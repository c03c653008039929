//! Rule inference over one million keys: a mixture-of-experts checkpoint saved under
//! DataParallel (`module.backbone.layers.N.experts.M.wK.weight`) against the bare model, and a
//! structural renaming (`blocks.N` -> `layers.N`, `w1` -> `fc1`, a `model.` wrapper) of it.

use std::hint::black_box;

use ckptmap::suggest::{suggest, Entry};
use criterion::{criterion_group, criterion_main, Criterion};

const LAYERS: usize = 64;
const EXPERTS: usize = 5_209;
const KEYS: usize = 1_000_000;

/// `(checkpoint key, model key, shape)` for one million tensors.
fn tables(renamed: bool) -> Vec<(String, String, Vec<u64>)> {
    let mut out = Vec::with_capacity(KEYS);
    'all: for n in 0..LAYERS {
        for m in 0..EXPERTS {
            for k in 1..=3 {
                let model = format!("backbone.layers.{n}.experts.{m}.w{k}.weight");
                let ckpt = if renamed {
                    format!("model.backbone.blocks.{n}.experts.{m}.fc{k}.weight")
                } else {
                    format!("module.{model}")
                };
                let shape = if k == 2 {
                    vec![512, 1024]
                } else {
                    vec![1024, 512]
                };
                out.push((ckpt, model, shape));
                if out.len() == KEYS {
                    break 'all;
                }
            }
        }
    }
    out
}

fn bench_suggest(c: &mut Criterion) {
    let mut group = c.benchmark_group("suggest_1m_keys");
    group.sample_size(10);
    for (name, renamed) in [("ddp_prefix", false), ("renamed", true)] {
        let rows = tables(renamed);
        let entries = |pick: fn(&(String, String, Vec<u64>)) -> &str| -> Vec<Entry<'_>> {
            rows.iter()
                .map(|row| Entry {
                    name: pick(row),
                    shape: Some(&row.2),
                    dtype: Some("bfloat16"),
                })
                .collect()
        };
        let (source, target) = (entries(|r| &r.0), entries(|r| &r.1));
        group.bench_function(name, |b| {
            b.iter(|| black_box(suggest(black_box(&source), black_box(&target))))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_suggest);
criterion_main!(benches);
