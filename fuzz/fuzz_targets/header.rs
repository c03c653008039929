//! Fuzzes the safetensors header parser. Invariants (RELIABILITY.md): no panic; every accepted
//! tensor's byte range has the size its shape and dtype imply, lies inside the file and
//! overlaps no other.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = ckptmap::header::parse(data) else { return };
    let mut ranges = Vec::with_capacity(header.tensors.len());
    for (i, t) in header.tensors.iter().enumerate() {
        let (start, end) = header.file_range(i).expect("range in bounds");
        let numel = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).expect("numel");
        let bits = numel.checked_mul(t.dtype.bits()).expect("bits");
        assert_eq!(bits % 8, 0);
        assert_eq!(end - start, bits / 8, "{}", t.name);
        assert!(header.data_offset() <= start && start <= end && end <= header.file_size);
        ranges.push((start, end));
    }
    ranges.sort_unstable();
    assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "overlap");
});
