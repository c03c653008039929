//! Sets of code points as sorted, disjoint, non-adjacent inclusive ranges.
//!
//! The exact (non-ASCII) form of a rule spells every character class out as such a set, taken
//! from the running interpreter's `re` (see [`crate::exact`]), so that the `regex` crate's own
//! Unicode tables never decide a match.

use std::fmt::Write as _;

/// The largest code point.
pub const MAX: u32 = 0x10_FFFF;

/// A set of code points (surrogates allowed in the set; they are dropped when emitted, since a
/// key is always valid UTF-8 by the time it reaches the engine).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Ranges(Vec<(u32, u32)>);

impl Ranges {
    /// The empty set.
    pub fn empty() -> Self {
        Self(Vec::new())
    }

    /// Every code point.
    pub fn all() -> Self {
        Self(vec![(0, MAX)])
    }

    /// Normalises arbitrary inclusive ranges (any order, overlapping, reversed ones dropped).
    pub fn new(mut ranges: Vec<(u32, u32)>) -> Self {
        ranges.retain(|(lo, hi)| lo <= hi && *lo <= MAX);
        for r in &mut ranges {
            r.1 = r.1.min(MAX);
        }
        ranges.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        Self(out)
    }

    /// One code point.
    pub fn single(c: u32) -> Self {
        Self(vec![(c, c)])
    }

    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, c: u32) -> bool {
        self.0
            .binary_search_by(|&(lo, hi)| {
                if hi < c {
                    std::cmp::Ordering::Less
                } else if lo > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
    }

    pub fn union(&self, other: &Ranges) -> Ranges {
        let mut all = self.0.clone();
        all.extend_from_slice(&other.0);
        Ranges::new(all)
    }

    pub fn complement(&self) -> Ranges {
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut next = 0u32;
        for &(lo, hi) in &self.0 {
            if lo > next {
                out.push((next, lo - 1));
            }
            next = hi.saturating_add(1);
        }
        if next <= MAX {
            out.push((next, MAX));
        }
        Ranges(out)
    }

    pub fn intersect(&self, other: &Ranges) -> Ranges {
        self.complement().union(&other.complement()).complement()
    }

    pub fn minus(&self, other: &Ranges) -> Ranges {
        self.intersect(&other.complement())
    }

    /// Appends the set as a `regex` crate class; never-matching when empty (or surrogates
    /// only). `extra_ff`: the class also matches the byte 0xFF, which stands for a key's final
    /// `\n` in the exact form of a rule using `$` (see [`crate::exact`]).
    pub fn write_class(&self, out: &mut String, extra_ff: bool) {
        let mut class = String::from("[");
        let mut any = false;
        for &(lo, hi) in &self.0 {
            // Surrogates are no chars; split a range around them.
            for (lo, hi) in [(lo, hi.min(0xD7FF)), (lo.max(0xE000), hi)] {
                if lo <= hi {
                    any = true;
                    let _ = write!(class, "\\x{{{lo:X}}}");
                    if hi > lo {
                        let _ = write!(class, "-\\x{{{hi:X}}}");
                    }
                }
            }
        }
        class.push(']');
        match (any, extra_ff) {
            (true, false) => out.push_str(&class),
            (true, true) => {
                out.push_str("(?:");
                out.push_str(&class);
                out.push_str("|(?-u:\\xFF))");
            }
            (false, true) => out.push_str("(?-u:\\xFF)"),
            // An empty class: `regex-syntax` accepts it and it never matches.
            (false, false) => out.push_str("[^\\x{0}-\\x{10FFFF}]"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_combines() {
        let a = Ranges::new(vec![(5, 9), (1, 3), (4, 4), (20, 10)]);
        assert_eq!(a.ranges(), &[(1, 9)]);
        let b = Ranges::new(vec![(8, 12)]);
        assert_eq!(a.union(&b).ranges(), &[(1, 12)]);
        assert_eq!(a.intersect(&b).ranges(), &[(8, 9)]);
        assert_eq!(a.minus(&b).ranges(), &[(1, 7)]);
        assert_eq!(a.complement().ranges(), &[(0, 0), (10, MAX)]);
        assert_eq!(Ranges::all().complement(), Ranges::empty());
        assert!(a.contains(1) && a.contains(9) && !a.contains(0) && !a.contains(10));
    }

    #[test]
    fn classes_skip_surrogates_and_can_be_empty() {
        let mut s = String::new();
        Ranges::new(vec![(0xD000, 0xE001)]).write_class(&mut s, false);
        assert_eq!(s, r"[\x{D000}-\x{D7FF}\x{E000}-\x{E001}]");
        s.clear();
        Ranges::new(vec![(0xD800, 0xDFFF)]).write_class(&mut s, false);
        assert!(regex_automata::meta::Regex::new(&s)
            .unwrap()
            .find("\u{D7FF}\u{E000}a")
            .is_none());
        s.clear();
        Ranges::single(10).write_class(&mut s, true);
        assert_eq!(s, r"(?:[\x{A}]|(?-u:\xFF))");
    }
}
