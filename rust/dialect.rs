//! Which CPython's `re` the native engine reproduces.
//!
//! The supported CPythons (3.10 to 3.13) differ in a few behaviours that a translated pattern
//! could observe. Syntax they disagree on (atomic groups and possessive repeats from 3.11,
//! global flags only at the start from 3.11, `\g<+1>` rejected from 3.12) needs nothing here:
//! every rule is first compiled by the running interpreter's `re`, which accepts or rejects it,
//! and the translator only runs natively what it can reproduce. Unicode tables (3.10 has
//! Unicode 13, 3.13 has 15.1) need nothing either: keys whose result could depend on them go
//! to the interpreter's `re` one by one. What remains is listed on [`Dialect`].

/// The `re` behaviours of one CPython version that the native engine must follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    /// Whether the captures of groups inside a repeat are restored when the matcher
    /// backtracks (CPython 3.11 and later, bpo-35859). CPython 3.10 can report a group from an
    /// abandoned attempt: `re.sub(r"(ab|a)*?b", r"[\1]", "ab")` is `"[]"` there and `"[a]"`
    /// from 3.11 on, as in the `regex` crate. The overall match is the same in both.
    pub restores_captures_in_repeats: bool,
}

impl Dialect {
    /// The dialect of CPython `major.minor`.
    pub fn cpython(major: u8, minor: u8) -> Self {
        Self {
            restores_captures_in_repeats: (major, minor) >= (3, 11),
        }
    }
}

impl Default for Dialect {
    /// CPython 3.11 and later, which agree on everything listed here.
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
        for minor in 11..=14 {
            assert_eq!(Dialect::cpython(3, minor), Dialect::default());
        }
    }
}
