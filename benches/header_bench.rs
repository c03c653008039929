//! Criterion bench of the safetensors header parser: a 100k-tensor header, fully validated.

use std::fmt::Write as _;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// A complete file: header of `count` 4x4 F32 tensors, then their zeroed data.
fn file(count: usize) -> Vec<u8> {
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    for i in 0..count {
        let (begin, end) = (i * 64, (i + 1) * 64);
        let _ = write!(
            json,
            ",\"model.layers.{}.experts.{}.w{}.weight\":{{\"dtype\":\"F32\",\"shape\":[4,4],\"data_offsets\":[{begin},{end}]}}",
            i / 768,
            (i / 3) % 256,
            i % 3 + 1
        );
    }
    json.push('}');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.resize(bytes.len() + count * 64, 0);
    bytes
}

fn bench_header(c: &mut Criterion) {
    let bytes = file(100_000);
    let mut group = c.benchmark_group("header");
    group.sample_size(10);
    group.throughput(Throughput::Elements(100_000));
    group.bench_function("parse + validate 100k tensors", |b| {
        b.iter(|| ckptmap::header::parse(black_box(&bytes)).map(|h| h.tensors.len()))
    });
    group.finish();
}

criterion_group!(benches, bench_header);
criterion_main!(benches);
