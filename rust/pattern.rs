//! Python `re` pattern syntax, parsed the way `re._parser` parses it, and translated to the
//! `regex` crate's syntax.
//!
//! The parser accepts only what it can translate with exactly Python's semantics; anything
//! else (backreferences, lookaround, conditionals, atomic groups, possessive repeats, verbose
//! mode, `\N{...}`, ...) is [`CoreError::Unsupported`], and the rule runs on Python's `re`.
//! Patterns reach this parser only after Python's `re.compile` accepted them, so error
//! messages for invalid syntax are Python's own; here an oddity is simply "unsupported".
//!
//! Two Python behaviours cannot be expressed in the `regex` crate at all but are cheap to
//! detect per key, so they are reported on the [`Translation`] instead of forcing a fallback:
//! - `$` without MULTILINE also matches before a trailing `\n` ([`Translation::dollar_sensitive`]);
//! - `\w`, `\s`, `\b`, case folding ... differ between the two engines outside ASCII
//!   ([`Translation::unicode_sensitive`]); the translation is exact on ASCII keys.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::error::{CoreError, CoreResult};

/// Python's `re` flag bits, as in `re.RegexFlag`.
pub mod flags {
    pub const IGNORECASE: u32 = 2;
    pub const LOCALE: u32 = 4;
    pub const MULTILINE: u32 = 8;
    pub const DOTALL: u32 = 16;
    pub const UNICODE: u32 = 32;
    pub const VERBOSE: u32 = 64;
    pub const DEBUG: u32 = 128;
    pub const ASCII: u32 = 256;
}

/// `\d`, `\w`, `\s` and their negations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perl {
    Digit,
    Word,
    Space,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassItem {
    Char(char),
    Range(char, char),
    Perl {
        kind: Perl,
        negated: bool,
        ascii: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assertion {
    /// `^`; `multiline` as in effect where it appears.
    LineStart { multiline: bool },
    /// `$`; `multiline` as in effect where it appears.
    LineEnd { multiline: bool },
    /// `\A`
    TextStart,
    /// `\Z`
    TextEnd,
    /// `\b` (`negated`: `\B`); `ascii` under the ASCII flag.
    WordBoundary { negated: bool, ascii: bool },
}

/// The parsed pattern; flags are resolved into the nodes they affect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Empty,
    Literal {
        ch: char,
        icase: bool,
        ascii: bool,
    },
    Any {
        dotall: bool,
    },
    Class {
        items: Vec<ClassItem>,
        negated: bool,
        icase: bool,
        ascii: bool,
        /// The class as written (`[...]`), for asking Python's `re` what it matches.
        source: String,
    },
    Perl {
        kind: Perl,
        negated: bool,
        ascii: bool,
    },
    Assert(Assertion),
    Group {
        capture: bool,
        node: Box<Node>,
    },
    Concat(Vec<Node>),
    Alt(Vec<Node>),
    Repeat {
        node: Box<Node>,
        min: u32,
        max: Option<u32>,
        greedy: bool,
    },
}

/// A pattern translated for the `regex` crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    /// Pattern text for `regex::Regex::new`, with every flag made explicit per node.
    pub regex: String,
    /// Number of capture groups (Python numbering; group 0 not counted).
    pub groups: usize,
    /// Named groups to their numbers.
    pub names: HashMap<String, usize>,
    /// Uses a construct whose meaning differs between the engines on non-ASCII text.
    pub unicode_sensitive: bool,
    /// Uses `$` without MULTILINE: Python also matches it before a final `\n`.
    pub dollar_sensitive: bool,
    /// Uses `\B`, which Python never matches in the empty string (the `regex` crate does).
    pub empty_sensitive: bool,
    /// Can match the empty string.
    pub nullable: bool,
    /// Has a capture group inside a repeat (where CPython 3.10 can report other captures,
    /// see [`crate::dialect::Dialect`]).
    pub captures_in_repeat: bool,
    /// Uses `^` or `$` under MULTILINE.
    pub multiline_anchors: bool,
    /// Uses `\b` or `\B` without the ASCII flag (Python's word characters decide).
    pub unicode_boundary: bool,
    /// Uses `\B` without the ASCII flag.
    pub unicode_non_boundary: bool,
    /// The parsed pattern, for the exact form of the rule ([`crate::exact`]).
    pub node: Node,
}

fn unsupported<T>(what: impl Into<String>) -> CoreResult<T> {
    Err(CoreError::Unsupported(what.into()))
}

/// Parses a Python pattern with the given `re` flags and translates it.
pub fn translate(pattern: &str, initial_flags: u32) -> CoreResult<Translation> {
    let mut parser = Parser::new(pattern, initial_flags)?;
    let node = parser.parse()?;
    check_empty_match_semantics(&node)?;
    let mut out = Translation {
        regex: String::with_capacity(pattern.len() * 2),
        groups: parser.groups,
        names: parser.names,
        unicode_sensitive: false,
        dollar_sensitive: false,
        empty_sensitive: false,
        nullable: nullable(&node),
        captures_in_repeat: captures_in_repeat(&node, false),
        multiline_anchors: false,
        unicode_boundary: false,
        unicode_non_boundary: false,
        node: Node::Empty,
    };
    emit(&node, &mut out)?;
    out.node = node;
    Ok(out)
}

/// The fast translation of a parsed pattern for the empty key only, where CPython (up to 3.13)
/// never matches `\B`: each `\B` becomes a one-character item, which cannot match there.
pub fn translate_for_empty_key(t: &Translation) -> CoreResult<String> {
    fn replace(node: &Node) -> Node {
        match node {
            Node::Assert(Assertion::WordBoundary { negated: true, .. }) => Node::Literal {
                ch: 'x',
                icase: false,
                ascii: true,
            },
            Node::Group { capture, node } => Node::Group {
                capture: *capture,
                node: Box::new(replace(node)),
            },
            Node::Concat(items) => Node::Concat(items.iter().map(replace).collect()),
            Node::Alt(items) => Node::Alt(items.iter().map(replace).collect()),
            Node::Repeat {
                node,
                min,
                max,
                greedy,
            } => Node::Repeat {
                node: Box::new(replace(node)),
                min: *min,
                max: *max,
                greedy: *greedy,
            },
            other => other.clone(),
        }
    }
    let mut out = Translation {
        regex: String::new(),
        node: Node::Empty,
        ..t.clone()
    };
    emit(&replace(&t.node), &mut out)?;
    Ok(out.regex)
}

// ---------------------------------------------------------------------------------------------
// Parsing: a port of the subset of `re._parser` we can translate.

const REPEAT_CHARS: [char; 4] = ['*', '+', '?', '{'];

/// One token as Python's tokenizer sees it: a char, or a backslash with the char after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Char(char),
    Escape(char),
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    flags: u32,
    groups: usize,
    names: HashMap<String, usize>,
    depth: usize,
}

/// Deep nesting is legal in Python but pointless in key rules; it would only risk the stack.
const MAX_DEPTH: usize = 64;

impl Parser {
    fn new(pattern: &str, initial_flags: u32) -> CoreResult<Self> {
        let known = flags::IGNORECASE
            | flags::MULTILINE
            | flags::DOTALL
            | flags::UNICODE
            | flags::VERBOSE
            | flags::ASCII;
        if initial_flags & !known != 0 {
            return unsupported(format!("flags {initial_flags:#x}"));
        }
        Ok(Self {
            chars: pattern.chars().collect(),
            pos: 0,
            flags: initial_flags,
            groups: 0,
            names: HashMap::new(),
            depth: 0,
        })
    }

    fn parse(&mut self) -> CoreResult<Node> {
        self.check_flags()?;
        let node = self.parse_alternation(true)?;
        if self.pos != self.chars.len() {
            return unsupported("unbalanced parenthesis");
        }
        Ok(node)
    }

    fn check_flags(&self) -> CoreResult<()> {
        if self.flags & flags::VERBOSE != 0 {
            return unsupported("verbose mode");
        }
        Ok(())
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next_token(&mut self) -> CoreResult<Option<Token>> {
        let Some(c) = self.peek() else {
            return Ok(None);
        };
        self.pos += 1;
        if c != '\\' {
            return Ok(Some(Token::Char(c)));
        }
        match self.peek() {
            Some(e) => {
                self.pos += 1;
                Ok(Some(Token::Escape(e)))
            }
            None => unsupported("bad escape (end of pattern)"),
        }
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Branches separated by `|`, up to a `)` (not consumed) or the end.
    fn parse_alternation(&mut self, top: bool) -> CoreResult<Node> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return unsupported("nesting deeper than 64 levels");
        }
        let mut branches = vec![self.parse_sequence(top)?];
        while self.eat('|') {
            branches.push(self.parse_sequence(false)?);
        }
        self.depth -= 1;
        Ok(if branches.len() == 1 {
            branches.pop().unwrap_or(Node::Empty)
        } else {
            Node::Alt(branches)
        })
    }

    fn parse_sequence(&mut self, mut first: bool) -> CoreResult<Node> {
        let mut items: Vec<Node> = Vec::new();
        loop {
            let start = self.pos;
            let Some(token) = self.next_token()? else {
                break;
            };
            match token {
                Token::Char('|') | Token::Char(')') => {
                    self.pos = start;
                    break;
                }
                Token::Char('[') => items.push(self.parse_class()?),
                Token::Char('(') => {
                    if let Some(node) = self.parse_group(first && items.is_empty())? {
                        items.push(node);
                    }
                }
                Token::Char('.') => items.push(Node::Any {
                    dotall: self.has(flags::DOTALL),
                }),
                Token::Char('^') => items.push(Node::Assert(Assertion::LineStart {
                    multiline: self.has(flags::MULTILINE),
                })),
                Token::Char('$') => items.push(Node::Assert(Assertion::LineEnd {
                    multiline: self.has(flags::MULTILINE),
                })),
                Token::Char(c) if REPEAT_CHARS.contains(&c) => {
                    match self.parse_quantifier(c)? {
                        Some((min, max)) => {
                            let greedy = !self.eat('?');
                            if self.peek() == Some('+') {
                                return unsupported("possessive repeat");
                            }
                            let Some(last) = items.pop() else {
                                return unsupported("nothing to repeat");
                            };
                            if matches!(last, Node::Assert(_) | Node::Repeat { .. }) {
                                return unsupported("repeat of an assertion or a repeat");
                            }
                            items.push(Node::Repeat {
                                node: Box::new(last),
                                min,
                                max,
                                greedy,
                            });
                        }
                        // `{` that does not start a valid `{m,n}` is a literal.
                        None => items.push(self.literal('{')),
                    }
                }
                Token::Char(c) => items.push(self.literal(c)),
                Token::Escape(e) => items.push(self.parse_escape(e)?),
            }
            // Global flags are only legal before the first item; they were consumed above.
            first = first && items.is_empty();
        }
        Ok(match items.len() {
            0 => Node::Empty,
            1 => items.pop().unwrap_or(Node::Empty),
            _ => Node::Concat(items),
        })
    }

    fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    fn literal(&self, ch: char) -> Node {
        Node::Literal {
            ch,
            icase: self.has(flags::IGNORECASE),
            ascii: self.has(flags::ASCII),
        }
    }

    /// After one of `*+?{`: the bounds, or `None` when `{` is a literal.
    fn parse_quantifier(&mut self, c: char) -> CoreResult<Option<(u32, Option<u32>)>> {
        match c {
            '*' => return Ok(Some((0, None))),
            '+' => return Ok(Some((1, None))),
            '?' => return Ok(Some((0, Some(1)))),
            _ => {}
        }
        let here = self.pos;
        if self.peek() == Some('}') {
            return Ok(None);
        }
        let lo = self.digits();
        let hi = if self.eat(',') {
            self.digits()
        } else {
            lo.clone()
        };
        if !self.eat('}') {
            self.pos = here;
            return Ok(None);
        }
        let parse = |s: &str| -> CoreResult<u32> {
            s.parse::<u32>()
                .ok()
                .filter(|n| *n < u32::MAX)
                .map_or_else(|| unsupported("the repetition number is too large"), Ok)
        };
        let min = if lo.is_empty() { 0 } else { parse(&lo)? };
        let max = if hi.is_empty() {
            None
        } else {
            Some(parse(&hi)?)
        };
        if max.is_some_and(|m| m < min) {
            return unsupported("min repeat greater than max repeat");
        }
        Ok(Some((min, max)))
    }

    fn digits(&mut self) -> String {
        let mut s = String::new();
        while let Some(c) = self.peek().filter(char::is_ascii_digit) {
            s.push(c);
            self.pos += 1;
        }
        s
    }

    /// `(` has been consumed. Returns `None` for constructs that produce no node (comments,
    /// global flags).
    fn parse_group(&mut self, first: bool) -> CoreResult<Option<Node>> {
        let mut capture = true;
        let saved_flags = self.flags;
        if self.eat('?') {
            let Some(c) = self.peek() else {
                return unsupported("unexpected end of pattern");
            };
            self.pos += 1;
            match c {
                ':' => capture = false,
                'P' => {
                    if !self.eat('<') {
                        return unsupported("named backreference or unknown (?P extension");
                    }
                    let name = self.group_name()?;
                    self.groups += 1;
                    self.names.insert(name, self.groups);
                    return self.group_body(true, saved_flags).map(Some);
                }
                '#' => {
                    loop {
                        match self.next_token()? {
                            Some(Token::Char(')')) => break,
                            Some(_) => {}
                            None => return unsupported("unterminated comment"),
                        }
                    }
                    return Ok(None);
                }
                '=' | '!' => return unsupported("lookahead"),
                '<' => return unsupported("lookbehind or (?<name>"),
                '(' => return unsupported("conditional group"),
                '>' => return unsupported("atomic group"),
                c if "aiLmsux-".contains(c) => {
                    self.pos -= 1;
                    let (add, del, global) = self.parse_flag_letters()?;
                    if global {
                        if !first {
                            return unsupported("global flags not at the start");
                        }
                        self.flags |= add;
                        self.check_flags()?;
                        return Ok(None);
                    }
                    // CPython compiles its search prefilter with the pattern's top-level type
                    // flags, so a scoped (?a:...) or (?u:...) that changes them does not behave
                    // as its group says; leave such patterns to Python.
                    let ascii_pattern = self.flags & flags::ASCII != 0;
                    if (add & flags::ASCII != 0 && !ascii_pattern)
                        || (add & flags::UNICODE != 0 && ascii_pattern)
                    {
                        return unsupported(
                            "scoped (?a:...) or (?u:...) changing the pattern's type",
                        );
                    }
                    self.flags = (self.flags | add) & !del;
                    self.check_flags()?;
                    capture = false;
                }
                _ => return unsupported("unknown extension"),
            }
        }
        if capture {
            self.groups += 1;
        }
        self.group_body(capture, saved_flags).map(Some)
    }

    fn group_body(&mut self, capture: bool, saved_flags: u32) -> CoreResult<Node> {
        let node = self.parse_alternation(false)?;
        self.flags = saved_flags;
        if !self.eat(')') {
            return unsupported("missing ), unterminated subpattern");
        }
        Ok(Node::Group {
            capture,
            node: Box::new(node),
        })
    }

    /// Letters of `(?aiLmsux-imsx:` or `(?aiLmsux)`; returns (add, del, is_global).
    fn parse_flag_letters(&mut self) -> CoreResult<(u32, u32, bool)> {
        let bit = |c: char| -> CoreResult<u32> {
            Ok(match c {
                'a' => flags::ASCII,
                'i' => flags::IGNORECASE,
                'm' => flags::MULTILINE,
                's' => flags::DOTALL,
                'u' => flags::UNICODE,
                'x' => flags::VERBOSE,
                'L' => return unsupported("locale flag"),
                _ => return unsupported("unknown flag"),
            })
        };
        let (mut add, mut del) = (0, 0);
        while let Some(c) = self.peek().filter(|c| *c != '-' && *c != ':' && *c != ')') {
            add |= bit(c)?;
            self.pos += 1;
        }
        if self.eat(')') {
            return Ok((add, 0, true));
        }
        if self.eat('-') {
            while let Some(c) = self.peek().filter(|c| *c != ':') {
                del |= bit(c)?;
                self.pos += 1;
            }
        }
        if !self.eat(':') {
            return unsupported("missing :");
        }
        Ok((add, del, false))
    }

    fn group_name(&mut self) -> CoreResult<String> {
        let mut name = String::new();
        loop {
            match self.peek() {
                Some('>') => {
                    self.pos += 1;
                    break;
                }
                Some(c) => {
                    name.push(c);
                    self.pos += 1;
                }
                None => return unsupported("missing >, unterminated name"),
            }
        }
        let mut chars = name.chars();
        let ident_start = chars.next().is_some_and(|c| c == '_' || c.is_alphabetic());
        if !ident_start || !chars.all(|c| c == '_' || c.is_alphanumeric()) {
            return unsupported("group name that Python's isidentifier() judges");
        }
        if self.names.contains_key(&name) {
            return unsupported("redefinition of group name");
        }
        Ok(name)
    }

    /// An escape outside a class (`re._parser._escape`).
    fn parse_escape(&mut self, e: char) -> CoreResult<Node> {
        let ascii = self.has(flags::ASCII);
        let perl = |kind, negated| Node::Perl {
            kind,
            negated,
            ascii,
        };
        Ok(match e {
            'A' => Node::Assert(Assertion::TextStart),
            'Z' => Node::Assert(Assertion::TextEnd),
            'b' => Node::Assert(Assertion::WordBoundary {
                negated: false,
                ascii,
            }),
            'B' => Node::Assert(Assertion::WordBoundary {
                negated: true,
                ascii,
            }),
            'd' => perl(Perl::Digit, false),
            'D' => perl(Perl::Digit, true),
            's' => perl(Perl::Space, false),
            'S' => perl(Perl::Space, true),
            'w' => perl(Perl::Word, false),
            'W' => perl(Perl::Word, true),
            '0' => {
                let value = self.octal_digits(2, 0)?;
                self.literal(value)
            }
            '1'..='9' => {
                // Three octal digits make an octal escape; anything else is a backreference.
                let d1 = e;
                let d2 = self.peek();
                let d3 = self.chars.get(self.pos + 1).copied();
                let is_oct = |c: Option<char>| c.is_some_and(|c| ('0'..='7').contains(&c));
                if is_oct(Some(d1)) && is_oct(d2) && is_oct(d3) {
                    self.pos += 2;
                    let s: String = [d1, d2.unwrap_or('0'), d3.unwrap_or('0')].iter().collect();
                    let value = u32::from_str_radix(&s, 8).unwrap_or(u32::MAX);
                    if value > 0o377 {
                        return unsupported("octal escape out of range");
                    }
                    self.literal(char_from(value)?)
                } else {
                    return unsupported("backreference");
                }
            }
            _ => {
                let ch = self.simple_escape(e)?;
                self.literal(ch)
            }
        })
    }

    /// Escapes that stand for one character, shared by classes and the outside.
    fn simple_escape(&mut self, e: char) -> CoreResult<char> {
        Ok(match e {
            'a' => '\x07',
            'f' => '\x0c',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'v' => '\x0b',
            'x' => self.hex_digits(2)?,
            'u' => self.hex_digits(4)?,
            'U' => self.hex_digits(8)?,
            'N' => return unsupported("\\N{...} named character"),
            c if c.is_ascii_alphanumeric() => return unsupported(format!("bad escape \\{c}")),
            c => c,
        })
    }

    fn hex_digits(&mut self, n: usize) -> CoreResult<char> {
        let end = self.pos + n;
        let Some(digits) = self.chars.get(self.pos..end) else {
            return unsupported("incomplete escape");
        };
        if !digits.iter().all(char::is_ascii_hexdigit) {
            return unsupported("incomplete escape");
        }
        let s: String = digits.iter().collect();
        self.pos = end;
        char_from(u32::from_str_radix(&s, 16).unwrap_or(u32::MAX))
    }

    /// Up to `more` further octal digits after an already-read value.
    fn octal_digits(&mut self, more: usize, mut value: u32) -> CoreResult<char> {
        for _ in 0..more {
            match self.peek().and_then(|c| c.to_digit(8)) {
                Some(d) => {
                    value = value * 8 + d;
                    self.pos += 1;
                }
                None => break,
            }
        }
        if value > 0o377 {
            return unsupported("octal escape out of range");
        }
        char_from(value)
    }

    /// `[` has been consumed (`re._parser`'s set parsing).
    fn parse_class(&mut self) -> CoreResult<Node> {
        let start = self.pos - 1;
        let negated = self.eat('^');
        let mut items: Vec<ClassItem> = Vec::new();
        loop {
            let Some(token) = self.next_token()? else {
                return unsupported("unterminated character set");
            };
            if token == Token::Char(']') && !items.is_empty() {
                break;
            }
            let first = self.class_atom(token)?;
            if self.eat('-') {
                let Some(token2) = self.next_token()? else {
                    return unsupported("unterminated character set");
                };
                if token2 == Token::Char(']') {
                    items.push(first);
                    items.push(ClassItem::Char('-'));
                    break;
                }
                let second = self.class_atom(token2)?;
                match (first, second) {
                    (ClassItem::Char(lo), ClassItem::Char(hi)) if lo <= hi => {
                        items.push(ClassItem::Range(lo, hi));
                    }
                    _ => return unsupported("bad character range"),
                }
            } else {
                items.push(first);
            }
        }
        Ok(Node::Class {
            items,
            negated,
            icase: self.has(flags::IGNORECASE),
            ascii: self.has(flags::ASCII),
            source: self.chars[start..self.pos].iter().collect(),
        })
    }

    fn class_atom(&mut self, token: Token) -> CoreResult<ClassItem> {
        let ascii = self.has(flags::ASCII);
        let perl = |kind, negated| ClassItem::Perl {
            kind,
            negated,
            ascii,
        };
        Ok(match token {
            Token::Char(c) => ClassItem::Char(c),
            Token::Escape(e) => match e {
                'b' => ClassItem::Char('\x08'),
                'd' => perl(Perl::Digit, false),
                'D' => perl(Perl::Digit, true),
                's' => perl(Perl::Space, false),
                'S' => perl(Perl::Space, true),
                'w' => perl(Perl::Word, false),
                'W' => perl(Perl::Word, true),
                '0'..='7' => {
                    let value = e.to_digit(8).unwrap_or(0);
                    ClassItem::Char(self.octal_digits(2, value)?)
                }
                '8' | '9' => return unsupported("bad escape in class"),
                _ => ClassItem::Char(self.simple_escape(e)?),
            },
        })
    }
}

fn char_from(value: u32) -> CoreResult<char> {
    char::from_u32(value).map_or_else(|| unsupported("surrogate or invalid code point"), Ok)
}

// ---------------------------------------------------------------------------------------------
// Analysis

/// Whether the node can match the empty string.
pub fn nullable(node: &Node) -> bool {
    match node {
        Node::Empty | Node::Assert(_) => true,
        Node::Literal { .. } | Node::Any { .. } | Node::Class { .. } | Node::Perl { .. } => false,
        Node::Group { node, .. } => nullable(node),
        Node::Concat(items) => items.iter().all(nullable),
        Node::Alt(branches) => branches.iter().any(nullable),
        Node::Repeat { node, min, .. } => *min == 0 || nullable(node),
    }
}

/// Whether a capture group lies inside a repeat (`in_repeat`: `node` itself does).
fn captures_in_repeat(node: &Node, in_repeat: bool) -> bool {
    match node {
        Node::Group { capture, node } => {
            (*capture && in_repeat) || captures_in_repeat(node, in_repeat)
        }
        Node::Concat(items) | Node::Alt(items) => {
            items.iter().any(|n| captures_in_repeat(n, in_repeat))
        }
        Node::Repeat { node, .. } => captures_in_repeat(node, true),
        _ => false,
    }
}

/// After an empty match, Python's `re.sub` looks for a *non-empty* match at the same position
/// before moving on; the `regex` crate cannot search for that. We only run natively the
/// patterns where that search can never succeed: no repeat of a nullable body (where the two
/// engines also differ on captures), and, for a nullable pattern, no lazy repeat and no
/// alternation with a nullable branch before the last. With only greedy choices, the
/// highest-priority match at a position is empty only if no non-empty match starts there.
fn check_empty_match_semantics(root: &Node) -> CoreResult<()> {
    fn walk(node: &Node, root_nullable: bool) -> CoreResult<()> {
        match node {
            Node::Group { node, .. } => walk(node, root_nullable),
            Node::Concat(items) => items.iter().try_for_each(|n| walk(n, root_nullable)),
            Node::Alt(branches) => {
                if root_nullable
                    && branches[..branches.len().saturating_sub(1)]
                        .iter()
                        .any(nullable)
                {
                    return unsupported("empty-matching alternative before the last");
                }
                branches.iter().try_for_each(|n| walk(n, root_nullable))
            }
            Node::Repeat { node, greedy, .. } => {
                if nullable(node) {
                    return unsupported("repeat of a sub-pattern that can match empty");
                }
                if root_nullable && !greedy {
                    return unsupported("lazy repeat in a pattern that can match empty");
                }
                walk(node, root_nullable)
            }
            _ => Ok(()),
        }
    }
    walk(root, nullable(root))
}

// ---------------------------------------------------------------------------------------------
// Emitting `regex` crate syntax

fn push_char(out: &mut String, c: char) {
    if c.is_ascii_alphanumeric() || c == '_' {
        out.push(c);
    } else {
        let _ = write!(out, "\\x{{{:X}}}", c as u32);
    }
}

/// The ASCII members of Python's class (exact for Python on ASCII text: Unicode `\s` also
/// counts the separators `\x1c`-`\x1f`, which `(?a)` and the `regex` crate do not).
fn perl_set(kind: Perl, ascii: bool) -> &'static str {
    match (kind, ascii) {
        (Perl::Digit, _) => "0-9",
        (Perl::Word, _) => "0-9A-Za-z_",
        (Perl::Space, false) => "\\t\\n\\x0B\\x0C\\r\\x1C-\\x1F\\x20",
        (Perl::Space, true) => "\\t\\n\\x0B\\x0C\\r\\x20",
    }
}

fn emit(node: &Node, t: &mut Translation) -> CoreResult<()> {
    match node {
        Node::Empty => t.regex.push_str("(?:)"),
        Node::Literal { ch, icase, .. } => {
            if *icase && has_case(*ch) {
                if !ch.is_ascii() {
                    return unsupported("case-insensitive non-ASCII literal");
                }
                t.unicode_sensitive = true;
                t.regex.push_str("(?i:");
                push_char(&mut t.regex, *ch);
                t.regex.push(')');
            } else {
                push_char(&mut t.regex, *ch);
            }
        }
        Node::Any { dotall } => t.regex.push_str(if *dotall { "(?s:.)" } else { "[^\\n]" }),
        Node::Perl {
            kind,
            negated,
            ascii,
        } => {
            t.unicode_sensitive |= !ascii;
            t.regex.push_str(if *negated { "[^" } else { "[" });
            t.regex.push_str(perl_set(*kind, *ascii));
            t.regex.push(']');
        }
        Node::Class {
            items,
            negated,
            icase,
            ..
        } => {
            if *icase {
                let non_ascii = items.iter().any(|item| match item {
                    ClassItem::Char(c) => !c.is_ascii(),
                    ClassItem::Range(_, hi) => !hi.is_ascii(),
                    ClassItem::Perl { .. } => false,
                });
                if non_ascii {
                    return unsupported("case-insensitive class with non-ASCII members");
                }
                t.unicode_sensitive = true;
                t.regex.push_str("(?i:");
            }
            t.regex.push_str(if *negated { "[^" } else { "[" });
            for item in items {
                match item {
                    ClassItem::Char(c) => push_char(&mut t.regex, *c),
                    ClassItem::Range(lo, hi) => {
                        push_char(&mut t.regex, *lo);
                        t.regex.push('-');
                        push_char(&mut t.regex, *hi);
                    }
                    ClassItem::Perl {
                        kind,
                        negated,
                        ascii,
                    } => {
                        t.unicode_sensitive |= !ascii;
                        t.regex.push_str(if *negated { "[^" } else { "[" });
                        t.regex.push_str(perl_set(*kind, *ascii));
                        t.regex.push(']');
                    }
                }
            }
            t.regex.push(']');
            if *icase {
                t.regex.push(')');
            }
        }
        Node::Assert(a) => t.regex.push_str(match a {
            Assertion::LineStart { multiline: true } => {
                t.multiline_anchors = true;
                "(?m:^)"
            }
            Assertion::LineStart { multiline: false } | Assertion::TextStart => "\\A",
            Assertion::LineEnd { multiline: true } => {
                t.multiline_anchors = true;
                "(?m:$)"
            }
            Assertion::LineEnd { multiline: false } => {
                t.dollar_sensitive = true;
                "\\z"
            }
            Assertion::TextEnd => "\\z",
            Assertion::WordBoundary { negated, ascii } => {
                t.unicode_sensitive = true;
                t.unicode_boundary |= !ascii;
                t.unicode_non_boundary |= !ascii && *negated;
                t.empty_sensitive |= *negated;
                if *negated {
                    "\\B"
                } else {
                    "\\b"
                }
            }
        }),
        Node::Group { capture, node } => {
            t.regex.push_str(if *capture { "(" } else { "(?:" });
            emit(node, t)?;
            t.regex.push(')');
        }
        Node::Concat(items) => {
            for item in items {
                emit(item, t)?;
            }
        }
        Node::Alt(branches) => {
            t.regex.push_str("(?:");
            for (i, branch) in branches.iter().enumerate() {
                if i > 0 {
                    t.regex.push('|');
                }
                emit(branch, t)?;
            }
            t.regex.push(')');
        }
        Node::Repeat {
            node,
            min,
            max,
            greedy,
        } => {
            t.regex.push_str("(?:");
            emit(node, t)?;
            t.regex.push(')');
            match max {
                Some(max) => write!(t.regex, "{{{min},{max}}}"),
                None => write!(t.regex, "{{{min},}}"),
            }
            .map_err(|e| CoreError::Invalid(e.to_string()))?;
            if !greedy {
                t.regex.push('?');
            }
        }
    }
    Ok(())
}

/// Whether case-insensitive matching can change what the char matches.
fn has_case(c: char) -> bool {
    c.is_alphabetic() || !c.is_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(p: &str) -> Translation {
        translate(p, 0).unwrap_or_else(|e| panic!("{p:?}: {e}"))
    }

    fn is_unsupported(p: &str) -> bool {
        matches!(translate(p, 0), Err(CoreError::Unsupported(_)))
    }

    #[test]
    fn literals_are_escaped() {
        assert_eq!(tr(r"^module\.").regex, r"\Amodule\x{2E}");
        assert_eq!(tr("a b").regex, r"a\x{20}b");
    }

    #[test]
    fn brace_that_is_not_a_quantifier_is_a_literal() {
        assert_eq!(tr("a{").regex, r"a\x{7B}");
        assert_eq!(tr("a{}").regex, r"a\x{7B}\x{7D}");
        assert_eq!(tr("a{x}").regex, r"a\x{7B}x\x{7D}");
        assert_eq!(tr("a{1, 2}").regex, r"a\x{7B}1\x{2C}\x{20}2\x{7D}");
        assert_eq!(tr("a{,2}").regex, "(?:a){0,2}");
        assert_eq!(tr("a{2,}").regex, "(?:a){2,}");
        assert_eq!(tr("a{3}?").regex, "(?:a){3,3}?");
    }

    #[test]
    fn groups_and_names_are_numbered_like_python() {
        let t = tr(r"(?P<first>a)(?:b)(c)(?P<last>d)");
        assert_eq!(t.groups, 3);
        assert_eq!(t.names["first"], 1);
        assert_eq!(t.names["last"], 3);
    }

    #[test]
    fn dollar_and_unicode_sensitivity_are_reported() {
        assert!(tr(r"\.weight$").dollar_sensitive);
        assert!(!tr(r"\.weight\Z").dollar_sensitive);
        assert!(!tr(r"(?m)x$").dollar_sensitive);
        assert!(tr(r"\w+").unicode_sensitive);
        assert!(!translate(r"\w+", flags::ASCII).unwrap().unicode_sensitive);
        assert!(tr(r"(?i)abc").unicode_sensitive);
        assert!(!tr(r"abc\d?").dollar_sensitive);
        assert!(tr(r"x?\B").empty_sensitive);
        assert!(!tr(r"\b").empty_sensitive);
        assert!(translate(r"a(?a:\w)", flags::ASCII).is_ok());
    }

    #[test]
    fn class_syntax_follows_python() {
        // `]` first is a literal; `-` at the end is a literal; POSIX syntax is literal.
        assert_eq!(tr("[]a]").regex, r"[\x{5D}a]");
        assert_eq!(tr("[a-]").regex, r"[a\x{2D}]");
        assert_eq!(tr("[[:alpha:]]").regex, r"[\x{5B}\x{3A}alpha\x{3A}]\x{5D}");
        assert_eq!(tr(r"[\b]").regex, r"[\x{8}]");
        assert_eq!(tr("[a&&b]").regex, r"[a\x{26}\x{26}b]");
    }

    #[test]
    fn python_only_constructs_are_unsupported() {
        for p in [
            r"(a)\1",
            r"(?P<n>a)(?P=n)",
            r"a(?=b)",
            r"a(?!b)",
            r"(?<=a)b",
            r"(?<!a)b",
            r"(?>a)",
            r"a*+",
            r"a++",
            r"(a)?(?(1)b|c)",
            r"\N{DIGIT ONE}",
            r"(?x) a b",
            r"(?i)é",
            r"(a*)*",
            r"(a|)+",
            r"a??",
            r"(|a)",
            r"(?a:\W)",
            r"(?a)a(?u:\w)",
        ] {
            assert!(is_unsupported(p), "{p:?} should fall back");
        }
    }

    #[test]
    fn catastrophic_pattern_runs_natively() {
        let t = tr(r"^(a+)+$");
        assert!(regex_automata::meta::Regex::new(&t.regex).is_ok());
    }

    #[test]
    fn octal_and_escapes() {
        assert_eq!(tr(r"\101").regex, "A");
        assert_eq!(tr(r"\0").regex, r"\x{0}");
        assert_eq!(tr(r"\x41\u0042\U00000043").regex, "ABC");
        assert!(is_unsupported(r"\12"));
    }

    #[test]
    fn comments_and_global_flags() {
        assert_eq!(tr("a(?#x)b").regex, "ab");
        assert_eq!(tr("(?s).").regex, "(?s:.)");
        assert_eq!(tr("(?m)^").regex, "(?m:^)");
        assert_eq!(tr("(?i:a)b").regex, "(?:(?i:a))b");
        assert!(is_unsupported("a(?i)b"));
    }

    #[test]
    fn never_panics_on_odd_input() {
        for p in [
            "(",
            ")",
            "[",
            "\\",
            "a{99999999999}",
            "(?",
            "(?P<",
            "[a-",
            "(?P<1>a)",
            "*",
        ] {
            let _ = translate(p, 0);
        }
    }
}
