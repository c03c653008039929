//! Which CPython's `re` the native engine reproduces.
//!
//! The supported CPythons (3.10 to 3.13) differ in a few behaviours that a translated pattern
//! could observe. Syntax they disagree on (atomic groups and possessive repeats from 3.11,
//! global flags only at the start from 3.11, `\g<+1>` rejected from 3.12) needs nothing here:
//! every rule is first compiled by the running interpreter's `re`, which accepts or rejects it,
//! and the translator only runs natively what it can reproduce. Unicode tables (3.10 has
//! Unicode 13, 3.13 has 15.1) need nothing either: the exact form of a rule
//! ([`crate::exact`]) takes its character sets from the interpreter's own `re`. What remains
//! is listed on [`Dialect`].

/// The `re` behaviours of one CPython version that the native engine must follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    /// Whether the captures of groups inside a repeat are restored when the matcher
    /// backtracks (CPython 3.11 and later, bpo-35859). CPython 3.10 can report a group from an
    /// abandoned attempt: `re.sub(r"(ab|a)*?b", r"[\1]", "ab")` is `"[]"` there and `"[a]"`
    /// from 3.11 on, as in the `regex` crate. The overall match is the same in both.
    pub restores_captures_in_repeats: bool,
    /// Whether `\B` never matches in the empty string (up to CPython 3.13; from 3.14 it is
    /// always the opposite of `\b`, gh-124130). The `regex` crate's `\B` matches there.
    pub non_boundary_fails_on_empty: bool,
}

impl Dialect {
    /// The dialect of CPython `major.minor`.
    pub fn cpython(major: u8, minor: u8) -> Self {
        Self {
            restores_captures_in_repeats: (major, minor) >= (3, 11),
            non_boundary_fails_on_empty: (major, minor) <= (3, 13),
        }
    }
}

impl Default for Dialect {
    /// CPython 3.11 to 3.13, which agree on everything listed here.
    fn default() -> Self {
        Self::cpython(3, 11)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(!Dialect::cpython(3, 10).restores_captures_in_repeats);
        for minor in 11..=13 {
            assert_eq!(Dialect::cpython(3, minor), Dialect::default());
        }
        assert!(!Dialect::cpython(3, 14).non_boundary_fails_on_empty);
    }
}
