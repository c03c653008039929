//! Keys as structure: `.`-separated segments whose digit runs are *slots* (indices), grouped
//! into families that share a *skeleton* (the key with every slot blanked out).
//!
//! `layer1.0.bn2.weight` has the skeleton `layer#.#.bn#.weight` and the slot values
//! `(1, 0, 2)`; every key of that skeleton is one family. Families are the unit that the
//! matcher pairs, so the work grows with the number of distinct skeletons, not of keys.

use std::collections::HashMap;

/// At most this many digit runs of a key are slots; later ones stay literal text.
pub const MAX_SLOTS: usize = 5;

/// The slot values of one key, unused positions zero.
pub type Tuple = [u64; MAX_SLOTS];

/// Digit runs longer than this stay literal (they are hashes or dates, not indices).
const MAX_SLOT_DIGITS: usize = 9;

/// Marks a slot in a skeleton's interned text; `ESCAPE` precedes a literal marker byte.
const SLOT: char = '\u{1}';
const ESCAPE: char = '\u{2}';

/// One piece of a skeleton segment: literal text or the slot with this position in the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Piece {
    Lit(String),
    Slot(u8),
}

/// The structure shared by the keys of a family.
#[derive(Debug, Clone)]
pub struct Skeleton {
    /// The `.`-separated segments, each a run of pieces.
    pub segments: Vec<Vec<Piece>>,
    /// How many slots the keys have.
    pub nslots: usize,
    /// Lower-case words of the literal text (split at `_`, digits and punctuation), in order.
    pub words: Vec<String>,
}

impl Skeleton {
    /// Parses the interned text built by [`skeleton_text`].
    fn parse(text: &str) -> Self {
        let mut segments = Vec::new();
        let mut nslots = 0u8;
        for raw in text.split('.') {
            let mut pieces: Vec<Piece> = Vec::new();
            let mut lit = String::new();
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                match c {
                    SLOT => {
                        if !lit.is_empty() {
                            pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                        }
                        pieces.push(Piece::Slot(nslots));
                        nslots += 1;
                    }
                    ESCAPE => lit.extend(chars.next()),
                    c => lit.push(c),
                }
            }
            if !lit.is_empty() || pieces.is_empty() {
                pieces.push(Piece::Lit(lit));
            }
            segments.push(pieces);
        }
        let words = segments
            .iter()
            .flatten()
            .filter_map(|p| match p {
                Piece::Lit(s) => Some(s.as_str()),
                Piece::Slot(_) => None,
            })
            .flat_map(split_words)
            .collect();
        Self {
            segments,
            nslots: usize::from(nslots),
            words,
        }
    }

    /// The segment index that holds each slot.
    pub fn slot_segments(&self) -> Vec<usize> {
        let mut out = vec![0; self.nslots];
        for (i, seg) in self.segments.iter().enumerate() {
            for p in seg {
                if let Piece::Slot(s) = p {
                    out[usize::from(*s)] = i;
                }
            }
        }
        out
    }

    /// The key of this skeleton with these slot values.
    #[cfg(test)]
    pub fn render(&self, values: &Tuple) -> String {
        let mut out = String::new();
        for (i, seg) in self.segments.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            for p in seg {
                match p {
                    Piece::Lit(s) => out.push_str(s),
                    Piece::Slot(s) => out.push_str(&values[usize::from(*s)].to_string()),
                }
            }
        }
        out
    }
}

/// Lower-case alphabetic words of `text`: `encoder_layer_` -> `encoder`, `layer`.
pub fn split_words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

/// Whether a digit run is an index: canonical decimal (`0`, or no leading zero), short.
fn is_slot(run: &str) -> bool {
    run.len() <= MAX_SLOT_DIGITS && (run == "0" || !run.starts_with('0'))
}

/// Writes `key`'s skeleton text into `buf` and its slot values into `values`.
fn skeleton_text(key: &str, buf: &mut String, values: &mut Tuple) {
    buf.clear();
    *values = [0; MAX_SLOTS];
    let mut nslots = 0;
    let bytes = key.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let run = &key[start..i];
            if nslots < MAX_SLOTS && is_slot(run) {
                values[nslots] = run.parse().unwrap_or(0);
                nslots += 1;
                buf.push(SLOT);
            } else {
                buf.push_str(run);
            }
            continue;
        }
        let start = i;
        while i < bytes.len() && !bytes[i].is_ascii_digit() {
            i += 1;
        }
        for c in key[start..i].chars() {
            if c == SLOT || c == ESCAPE {
                buf.push(ESCAPE);
            }
            buf.push(c);
        }
    }
}

/// The keys of one skeleton.
#[derive(Debug, Clone)]
pub struct Family {
    pub skel: Skeleton,
    /// Positions of its keys on their side, ascending.
    pub keys: Vec<u32>,
    /// Per slot, the distinct values its keys take, ascending.
    pub values: Vec<Vec<u64>>,
}

/// One side (checkpoint or model) indexed for matching.
#[derive(Debug, Clone)]
pub struct Side {
    /// Per key: its shape-and-dtype signature (equal ids mean equal shape and dtype).
    pub sig: Vec<u32>,
    /// Per key: its slot values.
    pub tuples: Vec<Tuple>,
    /// Per key: its parent module path (the key up to its last `.`), interned.
    pub parent: Vec<u32>,
    pub families: Vec<Family>,
    /// `(family, tuple)` -> key position.
    index: HashMap<(u32, Tuple), u32>,
}

impl Side {
    /// Indexes `names` with their signatures.
    pub fn new<S: AsRef<str>>(names: &[S], sig: Vec<u32>) -> Self {
        let mut by_text: HashMap<String, u32> = HashMap::new();
        let mut families: Vec<Family> = Vec::new();
        let mut family_of = Vec::with_capacity(names.len());
        let mut tuples = Vec::with_capacity(names.len());
        let mut buf = String::new();
        let mut values = [0; MAX_SLOTS];
        for (pos, name) in names.iter().enumerate() {
            skeleton_text(name.as_ref(), &mut buf, &mut values);
            let fam = match by_text.get(buf.as_str()) {
                Some(&f) => f,
                None => {
                    let f = families.len() as u32;
                    by_text.insert(buf.clone(), f);
                    let skel = Skeleton::parse(&buf);
                    families.push(Family {
                        values: vec![Vec::new(); skel.nslots],
                        skel,
                        keys: Vec::new(),
                    });
                    f
                }
            };
            families[fam as usize].keys.push(pos as u32);
            family_of.push(fam);
            tuples.push(values);
        }
        for fam in &mut families {
            for (slot, vals) in fam.values.iter_mut().enumerate() {
                *vals = fam.keys.iter().map(|&k| tuples[k as usize][slot]).collect();
                vals.sort_unstable();
                vals.dedup();
            }
        }
        let mut parents: HashMap<&str, u32> = HashMap::new();
        let parent = names
            .iter()
            .map(|name| {
                let name = name.as_ref();
                let path = name.rfind('.').map_or("", |i| &name[..i]);
                let next = parents.len() as u32;
                *parents.entry(path).or_insert(next)
            })
            .collect();
        let mut index = HashMap::with_capacity(names.len());
        for (pos, (&fam, tuple)) in family_of.iter().zip(&tuples).enumerate() {
            // A key listed twice resolves to its first position.
            index.entry((fam, *tuple)).or_insert(pos as u32);
        }
        Self {
            sig,
            tuples,
            parent,
            families,
            index,
        }
    }

    /// The key of `family` with slot values `tuple`, if there is one.
    pub fn find(&self, family: u32, tuple: &Tuple) -> Option<u32> {
        self.index.get(&(family, *tuple)).copied()
    }

    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.sig.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(names: &[&str]) -> Side {
        Side::new(names, vec![0; names.len()])
    }

    #[test]
    fn skeletons_blank_digit_runs() {
        let s = side(&["layer1.0.bn2.weight", "layer3.5.bn1.weight", "fc.weight"]);
        assert_eq!(s.families.len(), 2);
        assert_eq!(s.tuples[0][..3], [1, 0, 2]);
        assert_eq!(s.tuples[1][..3], [3, 5, 1]);
        let f = &s.families[0];
        assert_eq!(f.skel.nslots, 3);
        assert_eq!(f.values, vec![vec![1, 3], vec![0, 5], vec![1, 2]]);
        assert_eq!(f.skel.render(&[2, 7, 3, 0, 0]), "layer2.7.bn3.weight");
        assert_eq!(f.skel.words, ["layer", "bn", "weight"]);
        assert_eq!(f.skel.slot_segments(), vec![0, 1, 2]);
    }

    #[test]
    fn leading_zeros_and_long_runs_stay_literal() {
        let s = side(&["a.007.b", "a.1234567890.b", "a.7.b"]);
        assert_eq!(s.families.len(), 3);
        assert_eq!(s.families[0].skel.render(&[0; MAX_SLOTS]), "a.007.b");
        assert_eq!(s.families[1].skel.nslots, 0);
    }

    #[test]
    fn marker_characters_in_keys_round_trip() {
        let key = "a\u{1}b.\u{2}3";
        let s = side(&[key]);
        let f = &s.families[0];
        assert_eq!(f.skel.render(&s.tuples[0]), key);
    }

    #[test]
    fn find_by_family_and_tuple() {
        let s = side(&["x.1.w", "x.2.w", "x.2.w"]);
        assert_eq!(s.find(0, &[2, 0, 0, 0, 0]), Some(1));
        assert_eq!(s.find(0, &[3, 0, 0, 0, 0]), None);
    }

    #[test]
    fn more_digit_runs_than_slots() {
        let key = "a1.b2.c3.d4.e5.f6.g7";
        let s = side(&[key]);
        assert_eq!(s.families[0].skel.nslots, MAX_SLOTS);
        assert_eq!(s.families[0].skel.render(&s.tuples[0]), key);
    }
}
