//! Fuzzes the torch zip reader (archive, pickle machine, record and tensor checks). Invariants
//! (RELIABILITY.md): no panic; every accepted record lies inside the file, before the central
//! directory; every accepted tensor's elements lie inside its record.

#![no_main]

use ckptmap::pth::{parse, Contents};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let allowed = vec!["numpy.dtype".to_owned()];
    let Ok(Contents::Ready(p)) = parse(data, &allowed) else { return };
    for r in &p.records {
        assert!(r.start.checked_add(r.size).is_some_and(|end| end <= data.len() as u64));
    }
    for (i, t) in p.tensors.iter().enumerate() {
        let r = &p.records[t.record as usize];
        assert_eq!(t.end - t.start, t.span, "tensor {i}");
        if t.span > 0 {
            assert!(r.start <= t.start && t.end <= r.start + r.size, "tensor {i}");
        }
        assert_eq!(p.shape(i).len(), p.stride(i).len());
    }
    if let Ok(table) = p.table(data) {
        for e in &table.entries {
            assert!((e.tensor as usize) < p.tensors.len());
            let _ = table.name(e);
        }
    }
});
