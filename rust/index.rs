//! The key index: prefix filters, grouping of keys by owning module, diffs and collisions.
//!
//! Every function here is linear in the number of keys (hash lookups, no sorting and no scan
//! of all keys per module), borrows its input and reports positions into it, so callers keep
//! their own key objects: the binding hands back the very Python strings it was given.
//!
//! Each key is hashed once, in parallel on large inputs, with std's randomly keyed SipHash (the
//! keys come from checkpoint files, which may be hostile: a fixed-key hash would let one file
//! make every lookup collide); the hash tables then reuse that hash, as Python's `str` caches
//! its own.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use rayon::prelude::*;

/// Below this many keys the work is too small to be worth rayon's fork and join.
const PARALLEL_MIN_KEYS: usize = 1 << 15;

/// A key with its hash, computed once.
#[derive(Debug, Clone, Copy)]
struct Hashed<'k> {
    hash: u64,
    key: &'k str,
}

impl PartialEq for Hashed<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.key == other.key
    }
}

impl Eq for Hashed<'_> {}

impl Hash for Hashed<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Hands a [`Hashed`] key's precomputed hash to the table unchanged.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, _: &[u8]) {
        unreachable!("only Hashed keys go into these tables")
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

type KeyMap<'k, V> = HashMap<Hashed<'k>, V, BuildHasherDefault<PassThrough>>;
type KeySet<'k> = HashSet<Hashed<'k>, BuildHasherDefault<PassThrough>>;

/// `f` over every key, on all cores when there are many.
fn map_keys<'k, K: Sync, T: Send>(keys: &'k [K], f: impl Fn(&'k K) -> T + Sync + Send) -> Vec<T> {
    if keys.len() >= PARALLEL_MIN_KEYS {
        keys.par_iter().map(f).collect()
    } else {
        keys.iter().map(f).collect()
    }
}

fn hash_all<'k, K: AsRef<str> + Sync>(keys: &'k [K], state: &RandomState) -> Vec<Hashed<'k>> {
    map_keys(keys, |k| {
        let key = k.as_ref();
        Hashed {
            hash: state.hash_one(key),
            key,
        }
    })
}

/// Keys kept by [`filter_prefix`], in input order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filtered<'k> {
    /// Position of each kept key in the input.
    pub indices: Vec<usize>,
    /// The kept keys, with the prefix stripped when asked; slices of the input keys.
    pub names: Vec<&'k str>,
}

/// The prefix that [`filter_prefix`] actually matches: `prefix` with a `.` appended unless it
/// is empty or already ends in one.
pub fn normalize_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('.') {
        prefix.to_owned()
    } else {
        format!("{prefix}.")
    }
}

/// Keeps the keys under `prefix`, optionally stripping it.
///
/// As mmengine's `_load_checkpoint_with_prefix` does, a non-empty `prefix` that does not end in
/// `.` gets one appended (see [`normalize_prefix`]): `"backbone"` keeps `"backbone.x"` but
/// neither `"backbone2.x"` nor `"backbone"` itself. `"backbone."` means the same. The empty
/// prefix keeps every key. The comparison is on the exact characters (no case folding, no
/// Unicode normalisation).
///
/// Returns the positions of the kept keys in input order, each with its name: the key minus
/// the normalised prefix when `strip` is true, the whole key otherwise. Since all kept keys
/// share the one prefix, stripping never makes two distinct keys equal.
pub fn filter_prefix<'k, K: AsRef<str> + Sync>(
    keys: &'k [K],
    prefix: &str,
    strip: bool,
) -> Filtered<'k> {
    let prefix = normalize_prefix(prefix);
    let cut = if strip { prefix.len() } else { 0 };
    let keep = |(i, key): (usize, &'k K)| {
        let key = key.as_ref();
        key.starts_with(prefix.as_str()).then(|| (i, &key[cut..]))
    };
    let kept: Vec<(usize, &'k str)> = if keys.len() >= PARALLEL_MIN_KEYS {
        keys.par_iter().enumerate().filter_map(keep).collect()
    } else {
        keys.iter().enumerate().filter_map(keep).collect()
    };
    let (indices, names) = kept.into_iter().unzip();
    Filtered { indices, names }
}

/// Finds the module that owns a key, among module paths as `torch.nn.Module.named_modules()`
/// yields them: `""` for the root, then `"layer1"`, `"layer1.0"`, ...
///
/// Module `path` owns `key` when `key == path + "." + rest` (any `rest`, even empty); the root
/// `""` owns every key. A key's owner is the deepest (longest) such module. Built once, each
/// lookup walks the key's `.`-separated prefixes longest first through a hash map, trying only
/// prefix lengths that some module path has: O(depth of the key) whatever the number of
/// modules, and bounded by the longest module path however long a (possibly hostile) key is.
#[derive(Debug, Clone)]
pub struct ModuleTable<'m> {
    paths: KeyMap<'m, usize>,
    state: RandomState,
    /// `has_len[n]`: whether some module path is `n` bytes long.
    has_len: Vec<bool>,
    root: Option<usize>,
}

impl<'m> ModuleTable<'m> {
    /// Indexes module paths by position. A path listed twice resolves to its first position.
    pub fn new<M: AsRef<str> + Sync>(module_paths: &'m [M]) -> Self {
        let state = RandomState::new();
        let hashed = hash_all(module_paths, &state);
        let longest = hashed.iter().map(|h| h.key.len()).max().unwrap_or(0);
        let mut has_len = vec![false; longest + 1];
        let mut paths = KeyMap::with_capacity_and_hasher(hashed.len(), Default::default());
        for (i, path) in hashed.into_iter().enumerate() {
            has_len[path.key.len()] = true;
            paths.entry(path).or_insert(i);
        }
        let root = paths
            .get(&Hashed {
                hash: state.hash_one(""),
                key: "",
            })
            .copied();
        Self {
            paths,
            state,
            has_len,
            root,
        }
    }

    /// The position of the module owning `key`, or `None` when no module does (only possible
    /// when the root `""` is not in the table).
    pub fn owner(&self, key: &str) -> Option<usize> {
        let bytes = key.as_bytes();
        // A prefix longer than every module path cannot be one: never look past it.
        let mut end = bytes.len().min(self.has_len.len());
        // `.` is ASCII, so every position found here is a char boundary.
        while let Some(dot) = bytes[..end].iter().rposition(|&b| b == b'.') {
            if self.has_len[dot] {
                let path = &key[..dot];
                let probe = Hashed {
                    hash: self.state.hash_one(path),
                    key: path,
                };
                if let Some(&i) = self.paths.get(&probe) {
                    return Some(i);
                }
            }
            end = dot;
        }
        self.root
    }
}

/// The owner of each key among `module_paths` (see [`ModuleTable`]), in key order: the
/// module's position in `module_paths`, or `None` for a key that no module owns.
pub fn owners<K: AsRef<str> + Sync, M: AsRef<str> + Sync>(
    keys: &[K],
    module_paths: &[M],
) -> Vec<Option<usize>> {
    let table = ModuleTable::new(module_paths);
    map_keys(keys, |k| table.owner(k.as_ref()))
}

/// Keys grouped by owning module, as [`group_by_owner`] returns them: one slice of key
/// positions, ascending, per module path, then one for the keys that no module owns. Stored as
/// one flat array, so a million keys cost two allocations, not one per module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grouping {
    /// `members[starts[g]..starts[g + 1]]` is group `g`; the last group is the unowned keys.
    starts: Vec<usize>,
    members: Vec<usize>,
}

impl Grouping {
    /// The number of module paths (the unowned keys not counted).
    pub fn modules(&self) -> usize {
        self.starts.len() - 2
    }

    /// Positions of the keys that module `m` owns, ascending.
    ///
    /// # Panics
    /// When `m` is not below [`Self::modules`].
    pub fn group(&self, m: usize) -> &[usize] {
        assert!(m < self.modules(), "module {m} out of range");
        &self.members[self.starts[m]..self.starts[m + 1]]
    }

    /// Positions of the keys that no module owns, ascending.
    pub fn unowned(&self) -> &[usize] {
        let n = self.starts.len();
        &self.members[self.starts[n - 2]..self.starts[n - 1]]
    }

    /// Every group in module order, the unowned keys last.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[usize]> + '_ {
        self.starts.windows(2).map(|w| &self.members[w[0]..w[1]])
    }
}

/// Groups key positions by owning module (see [`ModuleTable`]): what lets a module recursion
/// hand each module exactly its own keys in one linear pass, instead of every module scanning
/// every key.
pub fn group_by_owner<K: AsRef<str> + Sync, M: AsRef<str> + Sync>(
    keys: &[K],
    module_paths: &[M],
) -> Grouping {
    let owner = owners(keys, module_paths);
    let unowned_slot = module_paths.len();
    let slot = |o: Option<usize>| o.unwrap_or(unowned_slot);
    // A counting sort: stable, so each group stays in ascending key order.
    let mut starts = vec![0usize; unowned_slot + 2];
    for &o in &owner {
        starts[slot(o) + 1] += 1;
    }
    for g in 1..starts.len() {
        starts[g] += starts[g - 1];
    }
    let mut next = starts.clone();
    let mut members = vec![0usize; owner.len()];
    for (i, &o) in owner.iter().enumerate() {
        let at = &mut next[slot(o)];
        members[*at] = i;
        *at += 1;
    }
    Grouping { starts, members }
}

/// The difference between source keys (e.g. a checkpoint's) and expected keys (a model's).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyDiff {
    /// Positions in `expected` of the keys absent from `source`, in `expected` order.
    pub missing: Vec<usize>,
    /// Positions in `source` of the keys absent from `expected`, in `source` order.
    pub unexpected: Vec<usize>,
}

/// Missing keys (expected, absent from source) and unexpected keys (in source, not expected).
///
/// Order: `missing` follows `expected`, `unexpected` follows `source`. Both are sets: a key
/// listed several times is reported once, at its first position.
pub fn diff<S: AsRef<str> + Sync, E: AsRef<str> + Sync>(source: &[S], expected: &[E]) -> KeyDiff {
    let state = RandomState::new();
    let (source, expected) =
        rayon::join(|| hash_all(source, &state), || hash_all(expected, &state));
    // Per expected position: 0 a repeat, FIRST its key's first occurrence, FOUND also in source.
    const FIRST: u8 = 1;
    const FOUND: u8 = 2;
    let mut marks = vec![0u8; expected.len()];
    let mut first: KeyMap<usize> =
        KeyMap::with_capacity_and_hasher(expected.len(), Default::default());
    for (i, key) in expected.iter().enumerate() {
        if let Entry::Vacant(slot) = first.entry(*key) {
            slot.insert(i);
            marks[i] = FIRST;
        }
    }
    let hits = map_keys(&source, |key| first.get(key).copied());
    let mut reported = KeySet::default();
    let mut unexpected = Vec::new();
    for (i, hit) in hits.into_iter().enumerate() {
        match hit {
            Some(f) => marks[f] |= FOUND,
            None if reported.insert(source[i]) => unexpected.push(i),
            None => {}
        }
    }
    let missing = (0..marks.len()).filter(|&i| marks[i] == FIRST).collect();
    KeyDiff {
        missing,
        unexpected,
    }
}

/// Positions of keys that occur more than once, e.g. several checkpoint keys that regex rules
/// revised to one name: one group per repeated key, positions ascending, groups ordered by the
/// key's first occurrence. Keys that occur once appear in no group.
pub fn collisions<K: AsRef<str> + Sync>(keys: &[K]) -> Vec<Vec<usize>> {
    let hashed = hash_all(keys, &RandomState::new());
    let mut first: KeyMap<usize> =
        KeyMap::with_capacity_and_hasher(hashed.len(), Default::default());
    // (first occurrence, later occurrence) for every repeat.
    let mut repeats: Vec<(usize, usize)> = Vec::new();
    for (i, key) in hashed.into_iter().enumerate() {
        let f = *first.entry(key).or_insert(i);
        if f != i {
            repeats.push((f, i));
        }
    }
    // Groups take the order of their first occurrence, not of their first repeat.
    let mut heads: Vec<usize> = repeats.iter().map(|&(f, _)| f).collect();
    heads.sort_unstable();
    heads.dedup();
    let mut groups: Vec<Vec<usize>> = heads.iter().map(|&f| vec![f]).collect();
    for (f, i) in repeats {
        // `heads` is sorted, so the search always finds `f`.
        if let Ok(g) = heads.binary_search(&f) {
            groups[g].push(i);
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_gets_a_dot() {
        let keys = [
            "backbone.x",
            "backbone2.x",
            "backbone",
            "backbone.",
            "neck.backbone.y",
        ];
        let f = filter_prefix(&keys, "backbone", true);
        assert_eq!(f.indices, vec![0, 3]);
        assert_eq!(f.names, vec!["x", ""]);
        assert_eq!(filter_prefix(&keys, "backbone.", true), f);
        let kept = filter_prefix(&keys, "backbone", false);
        assert_eq!(kept.names, vec!["backbone.x", "backbone."]);
    }

    #[test]
    fn empty_prefix_keeps_everything() {
        let keys = ["a", "", ".b"];
        let f = filter_prefix(&keys, "", true);
        assert_eq!(f.indices, vec![0, 1, 2]);
        assert_eq!(f.names, vec!["a", "", ".b"]);
    }

    #[test]
    fn prefix_on_non_ascii_keys() {
        let keys = ["é.ü", "éa.ü", "é"];
        let f = filter_prefix(&keys, "é", true);
        assert_eq!((f.indices, f.names), (vec![0], vec!["ü"]));
    }

    #[test]
    fn deepest_module_owns_a_key() {
        let modules = ["", "layer", "layer1", "layer1.0", "layer1.0.conv"];
        let keys = [
            "layer1.0.conv.weight",
            "layer1.0.bn.weight",
            "layer1.1.weight",
            "layer.weight",
            "fc.weight",
            "layer1",
            "layer1.",
        ];
        let got = owners(&keys, &modules);
        assert_eq!(
            got,
            vec![
                Some(4),
                Some(3),
                Some(2),
                Some(1),
                Some(0),
                Some(0),
                Some(2)
            ]
        );
    }

    #[test]
    fn keys_without_root_may_be_unowned() {
        let modules = ["backbone", "backbone.stem"];
        let keys = ["backbone.stem.w", "head.w", "backbone", "backbone.x"];
        let g = group_by_owner(&keys, &modules);
        assert_eq!(g.modules(), 2);
        assert_eq!((g.group(0), g.group(1)), (&[3][..], &[0][..]));
        assert_eq!(g.unowned(), &[1, 2]);
        assert_eq!(g.iter().collect::<Vec<_>>(), vec![&[3][..], &[0], &[1, 2]]);
    }

    #[test]
    fn long_keys_are_searched_only_as_deep_as_the_modules() {
        let modules = ["", "a", "a.b"];
        let hostile = format!("a.b.{}", ".".repeat(1 << 20));
        assert_eq!(
            owners(&[hostile.as_str(), "a.bb.c", "a", "x.y"], &modules),
            vec![Some(2), Some(1), Some(0), Some(0)]
        );
        assert_eq!(ModuleTable::new::<&str>(&[]).owner("a.b"), None);
    }

    #[test]
    fn duplicate_module_paths_resolve_to_the_first() {
        let table = ModuleTable::new(&["a", "", "a"]);
        assert_eq!(table.owner("a.x"), Some(0));
        assert_eq!(table.owner("b"), Some(1));
    }

    #[test]
    fn diff_orders_and_dedups() {
        let source = ["u2", "a", "u1", "u2", "b"];
        let expected = ["m1", "b", "m2", "m1", "a"];
        let d = diff(&source, &expected);
        assert_eq!(d.missing, vec![0, 2]);
        assert_eq!(d.unexpected, vec![0, 2]);
        assert_eq!(diff::<&str, &str>(&[], &[]), KeyDiff::default());
    }

    #[test]
    fn collisions_grouped_by_first_occurrence() {
        let keys = ["a", "b", "c", "b", "a", "b", "d"];
        assert_eq!(collisions(&keys), vec![vec![0, 4], vec![1, 3, 5]]);
        assert!(collisions(&["x", "y"]).is_empty());
        // The second group's first repeat comes before the first group's.
        assert_eq!(
            collisions(&["p", "q", "q", "p"]),
            vec![vec![0, 3], vec![1, 2]]
        );
    }

    #[test]
    fn parallel_path_matches_sequential_order() {
        let keys: Vec<String> = (0..PARALLEL_MIN_KEYS * 2)
            .map(|i| format!("m.l{}.w{}", i % 7, i))
            .collect();
        let f = filter_prefix(&keys, "m.l3", true);
        let expect: Vec<usize> = (0..keys.len()).filter(|i| i % 7 == 3).collect();
        assert_eq!(f.indices, expect);
        assert!(f
            .names
            .iter()
            .zip(&f.indices)
            .all(|(n, &i)| *n == format!("w{i}")));
        let modules = ["", "m", "m.l3"];
        let g = group_by_owner(&keys, &modules);
        assert!(g.group(0).is_empty());
        assert_eq!(g.group(2), expect);
        assert_eq!(g.group(1).len() + g.group(2).len(), keys.len());
    }

    // Small alphabets, so that prefixes, shared paths and repeats are frequent.
    fn key() -> impl Strategy<Value = String> {
        "[ab1.]{0,7}"
    }

    fn naive_owner(key: &str, modules: &[String]) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, m) in modules.iter().enumerate() {
            let owns = m.is_empty() || key.starts_with(&format!("{m}."));
            let deeper = match best {
                None => true,
                Some(b) => m.len() > modules[b].len(),
            };
            if owns && deeper {
                best = Some(i);
            }
        }
        best
    }

    proptest! {
        #[test]
        fn filter_equals_naive(keys in prop::collection::vec(key(), 0..40),
                               prefix in "[ab1.]{0,4}", strip: bool) {
            let f = filter_prefix(&keys, &prefix, strip);
            let p = if prefix.is_empty() || prefix.ends_with('.') {
                prefix.clone()
            } else {
                format!("{prefix}.")
            };
            let (mut indices, mut names) = (Vec::new(), Vec::new());
            for (i, k) in keys.iter().enumerate() {
                if let Some(rest) = k.strip_prefix(p.as_str()) {
                    indices.push(i);
                    names.push(if strip { rest } else { k.as_str() });
                }
            }
            prop_assert_eq!(f.indices, indices);
            prop_assert_eq!(f.names, names);
        }

        #[test]
        fn owners_equal_quadratic_reference(keys in prop::collection::vec(key(), 0..40),
                                            modules in prop::collection::vec("[ab1.]{0,5}", 0..12)) {
            let got = owners(&keys, &modules);
            let want: Vec<Option<usize>> = keys.iter().map(|k| naive_owner(k, &modules)).collect();
            prop_assert_eq!(&got, &want);
            let g = group_by_owner(&keys, &modules);
            prop_assert_eq!(g.modules(), modules.len());
            let mut want_groups = vec![Vec::new(); modules.len() + 1];
            for (i, o) in want.iter().enumerate() {
                want_groups[o.unwrap_or(modules.len())].push(i);
            }
            prop_assert_eq!(g.iter().map(<[usize]>::to_vec).collect::<Vec<_>>(), want_groups);
        }

        #[test]
        fn diff_equals_set_operations(source in prop::collection::vec(key(), 0..30),
                                      expected in prop::collection::vec(key(), 0..30)) {
            let d = diff(&source, &expected);
            let src: HashSet<&String> = source.iter().collect();
            let exp: HashSet<&String> = expected.iter().collect();
            let first_positions = |keys: &[String], other: &HashSet<&String>| -> Vec<usize> {
                let mut seen = HashSet::new();
                (0..keys.len())
                    .filter(|&i| !other.contains(&keys[i]) && seen.insert(&keys[i]))
                    .collect()
            };
            prop_assert_eq!(&d.missing, &first_positions(&expected, &src));
            prop_assert_eq!(&d.unexpected, &first_positions(&source, &exp));
            let missing: HashSet<&String> = d.missing.iter().map(|&i| &expected[i]).collect();
            prop_assert_eq!(missing, exp.difference(&src).copied().collect::<HashSet<_>>());
            let unexpected: HashSet<&String> = d.unexpected.iter().map(|&i| &source[i]).collect();
            prop_assert_eq!(unexpected, src.difference(&exp).copied().collect::<HashSet<_>>());
        }

        #[test]
        fn collisions_found_exactly(keys in prop::collection::vec("[ab]{0,2}", 0..30)) {
            let got = collisions(&keys);
            let mut want: Vec<Vec<usize>> = Vec::new();
            for i in 0..keys.len() {
                if keys[..i].contains(&keys[i]) {
                    continue;
                }
                let group: Vec<usize> = (i..keys.len()).filter(|&j| keys[j] == keys[i]).collect();
                if group.len() > 1 {
                    want.push(group);
                }
            }
            prop_assert_eq!(got, want);
        }
    }
}
