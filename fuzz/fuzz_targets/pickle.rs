//! Fuzzes the pickle machine alone. Invariants: no panic; every node a value refers to
//! exists; every tensor's storage reference exists, with as many strides as sizes.

#![no_main]

use ckptmap::pickle::{run, Node, V};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let allowed = vec!["numpy.dtype".to_owned(), "builtins.getattr".to_owned()];
    let Ok(p) = run(data, &allowed) else { return };
    let exists = |v: V| match v {
        V::Node(n) => (n as usize) < p.nodes.len(),
        _ => true,
    };
    assert!(exists(p.root()));
    for node in &p.nodes {
        if let Node::Tuple { start, len } | Node::FrozenSet { start, len } = *node {
            assert!(p.tuple_items(start, len).iter().all(|&v| exists(v)));
        }
    }
    for l in &p.lists {
        assert!(l.items.iter().all(|&v| exists(v)));
    }
    for d in &p.dicts {
        assert!(d.items.iter().all(|&(k, v)| exists(k) && exists(v)));
    }
    for t in &p.tensors {
        assert!((t.storage as usize) < p.storages.len());
        assert_eq!(p.shape(t).len(), p.stride(t).len());
    }
});
