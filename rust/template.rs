//! Python `re.sub` replacement templates (`\1`, `\g<1>`, `\g<name>`, `\g<0>`, escapes),
//! parsed as `re._parser.parse_template` does and expanded against `regex` captures.
//!
//! Like the pattern parser, this only accepts what it can reproduce exactly; Python has
//! already validated the template, so anything unusual is [`CoreError::Unsupported`].

use std::collections::HashMap;

use regex_automata::util::captures::Captures;

use crate::error::{CoreError, CoreResult};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Group(usize),
}

/// A parsed replacement template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

fn unsupported<T>(what: impl Into<String>) -> CoreResult<T> {
    Err(CoreError::Unsupported(what.into()))
}

impl Template {
    /// Parses `repl` for a pattern with `groups` capture groups and the given group names.
    pub fn parse(repl: &str, groups: usize, names: &HashMap<String, usize>) -> CoreResult<Self> {
        let chars: Vec<char> = repl.chars().collect();
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let group = |pieces: &mut Vec<Piece>, literal: &mut String, index: usize| {
            if index > groups {
                return unsupported(format!("invalid group reference {index}"));
            }
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(literal)));
            }
            pieces.push(Piece::Group(index));
            Ok(())
        };
        let is_oct = |c: Option<&char>| c.is_some_and(|c| ('0'..='7').contains(c));
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            if c != '\\' {
                literal.push(c);
                continue;
            }
            let Some(&e) = chars.get(i) else {
                return unsupported("bad escape (end of pattern)");
            };
            i += 1;
            match e {
                'g' => {
                    if chars.get(i) != Some(&'<') {
                        return unsupported("missing <");
                    }
                    let Some(len) = chars[i + 1..].iter().position(|c| *c == '>') else {
                        return unsupported("missing >, unterminated name");
                    };
                    let name: String = chars[i + 1..i + 1 + len].iter().collect();
                    i += len + 2;
                    let index = if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
                        name.parse::<usize>()
                            .map_or_else(|_| unsupported("group index"), Ok)?
                    } else if let Some(&index) = names.get(&name) {
                        index
                    } else {
                        return unsupported(format!("group name {name:?}"));
                    };
                    group(&mut pieces, &mut literal, index)?;
                }
                '0' => {
                    let mut value = 0u32;
                    for _ in 0..2 {
                        if !is_oct(chars.get(i)) {
                            break;
                        }
                        value = value * 8 + chars[i].to_digit(8).unwrap_or(0);
                        i += 1;
                    }
                    literal.push(char::from_u32(value & 0xff).unwrap_or('\0'));
                }
                '1'..='9' => {
                    let mut digits = String::from(e);
                    if chars.get(i).is_some_and(char::is_ascii_digit) {
                        digits.push(chars[i]);
                        i += 1;
                        if is_oct(Some(&e))
                            && is_oct(digits.chars().nth(1).as_ref())
                            && is_oct(chars.get(i))
                        {
                            digits.push(chars[i]);
                            i += 1;
                            let value = u32::from_str_radix(&digits, 8).unwrap_or(u32::MAX);
                            if value > 0o377 {
                                return unsupported("octal escape out of range");
                            }
                            literal.push(char::from_u32(value).unwrap_or('\0'));
                            continue;
                        }
                    }
                    let index = digits.parse::<usize>().unwrap_or(usize::MAX);
                    group(&mut pieces, &mut literal, index)?;
                }
                'a' => literal.push('\x07'),
                'b' => literal.push('\x08'),
                'f' => literal.push('\x0c'),
                'n' => literal.push('\n'),
                'r' => literal.push('\r'),
                't' => literal.push('\t'),
                'v' => literal.push('\x0b'),
                '\\' => literal.push('\\'),
                e if e.is_ascii_alphabetic() => return unsupported(format!("bad escape \\{e}")),
                // Python keeps unknown escapes of non-letters as they are, backslash included.
                e => {
                    literal.push('\\');
                    literal.push(e);
                }
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(Self { pieces })
    }

    /// Whether the replacement refers to a capture group (`\g<0>`, the whole match, aside).
    pub fn uses_groups(&self) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Group(index) if *index > 0))
    }

    /// The replacement when it refers to no group.
    pub fn as_literal(&self) -> Option<&str> {
        match self.pieces.as_slice() {
            [] => Some(""),
            [Piece::Literal(s)] => Some(s),
            _ => None,
        }
    }

    /// Appends the expansion for one match; unmatched groups expand to "" as in Python.
    pub fn expand(&self, haystack: &str, caps: &Captures, out: &mut String) {
        for piece in &self.pieces {
            match piece {
                Piece::Literal(s) => out.push_str(s),
                Piece::Group(i) => {
                    if let Some(span) = caps.get_group(*i) {
                        out.push_str(&haystack[span.range()]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(repl: &str, groups: usize) -> CoreResult<Template> {
        let names = HashMap::from([("name".to_string(), 1)]);
        Template::parse(repl, groups, &names)
    }

    fn lit(s: &str) -> Piece {
        Piece::Literal(s.into())
    }

    #[test]
    fn groups_and_literals() {
        let t = parse(r"a\1b\g<2>\g<name>\g<0>", 2).unwrap();
        assert_eq!(
            t.pieces,
            vec![
                lit("a"),
                Piece::Group(1),
                lit("b"),
                Piece::Group(2),
                Piece::Group(1),
                Piece::Group(0)
            ]
        );
    }

    #[test]
    fn escapes_follow_python() {
        assert_eq!(parse(r"\n\t\\", 0).unwrap().as_literal(), Some("\n\t\\"));
        assert_eq!(parse(r"\.", 0).unwrap().as_literal(), Some("\\."));
        assert_eq!(parse(r"\0", 0).unwrap().as_literal(), Some("\0"));
        assert_eq!(parse(r"\101", 0).unwrap().as_literal(), Some("A"));
        assert_eq!(parse("$1", 0).unwrap().as_literal(), Some("$1"));
        assert_eq!(parse(r"\b", 0).unwrap().as_literal(), Some("\x08"));
    }

    #[test]
    fn two_digit_group_reference() {
        let t = parse(r"\10", 10).unwrap();
        assert_eq!(t.pieces, vec![Piece::Group(10)]);
        let t = parse(r"\1a", 1).unwrap();
        assert_eq!(t.pieces, vec![Piece::Group(1), lit("a")]);
    }

    #[test]
    fn invalid_references_are_unsupported() {
        for repl in [r"\2", r"\g<3>", r"\g<nope>", r"\g<>", r"\g<1", r"\q", "\\"] {
            assert!(parse(repl, 1).is_err(), "{repl:?}");
        }
    }
}
