//! Criterion bench of the torch zip reader's pickle machine: state dicts of 100k and 1M
//! tensors as `torch.save` pickles them (protocol 2, memoized, `_metadata` included). Equal
//! time per tensor at both sizes shows the machine is linear.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// The opcodes `torch.save` writes for `OrderedDict(name -> 4x4 float32)` with `_metadata`.
fn state_dict_pickle(count: usize) -> Vec<u8> {
    let mut out = vec![0x80, 2];
    let mut memo = 0u32;
    let mut put = |out: &mut Vec<u8>| {
        out.push(b'r');
        out.extend_from_slice(&memo.to_le_bytes());
        memo += 1;
    };
    let s = |out: &mut Vec<u8>, text: &str| {
        out.push(b'X');
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    };
    let get = |out: &mut Vec<u8>, i: u32| {
        out.push(b'j');
        out.extend_from_slice(&i.to_le_bytes());
    };
    out.extend_from_slice(b"ccollections\nOrderedDict\n");
    put(&mut out); // 0: OrderedDict
    out.extend_from_slice(b")R");
    put(&mut out); // 1: the state dict
    out.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n");
    put(&mut out); // 2
    s(&mut out, "storage");
    put(&mut out); // 3
    out.extend_from_slice(b"ctorch\nFloatStorage\n");
    put(&mut out); // 4
    s(&mut out, "cpu");
    put(&mut out); // 5
    out.push(b'0'); // POP: the values above are in the memo
    out.push(b'0');
    out.push(b'0');
    out.push(b'0');
    let names: Vec<String> = (0..count)
        .map(|i| {
            format!(
                "module.layers.{}.experts.{}.w{}.weight",
                i / 12288,
                (i / 3) % 4096,
                i % 3
            )
        })
        .collect();
    for chunk in names.chunks(1000) {
        out.push(b'(');
        for name in chunk {
            s(&mut out, name);
            put(&mut out);
            get(&mut out, 2);
            out.extend_from_slice(b"((");
            get(&mut out, 3);
            get(&mut out, 4);
            s(&mut out, &name.len().to_string());
            put(&mut out);
            get(&mut out, 5);
            out.extend_from_slice(&[b'K', 16, b't']);
            put(&mut out);
            out.extend_from_slice(&[b'Q', b'K', 0, b'K', 4, b'K', 4, 0x86]);
            put(&mut out);
            out.extend_from_slice(&[b'K', 4, b'K', 1, 0x86]);
            put(&mut out);
            out.push(0x89);
            get(&mut out, 0);
            out.extend_from_slice(b")R");
            put(&mut out);
            out.push(b't');
            put(&mut out);
            out.push(b'R');
            put(&mut out);
        }
        out.push(b'u');
    }
    out.push(b'}');
    s(&mut out, "_metadata");
    out.push(b'}');
    out.push(b'(');
    for name in &names {
        s(&mut out, name.trim_end_matches(".weight"));
        out.push(b'}');
        s(&mut out, "version");
        out.extend_from_slice(&[b'K', 1, b's']);
    }
    out.extend_from_slice(b"usb.");
    out
}

fn bench_pickle(c: &mut Criterion) {
    let mut group = c.benchmark_group("pickle machine");
    group.sample_size(10);
    for count in [100_000usize, 1_000_000] {
        let data = state_dict_pickle(count);
        let allowed: Vec<String> = Vec::new();
        let parsed = ckptmap::pickle::run(&data, &allowed).expect("a valid pickle");
        assert_eq!(parsed.tensors.len(), count);
        group.throughput(Throughput::Elements(count as u64));
        group.bench_function(format!("state dict of {count} tensors"), |b| {
            b.iter(|| ckptmap::pickle::run(black_box(&data), &allowed).map(|p| p.tensors.len()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_pickle);
criterion_main!(benches);
