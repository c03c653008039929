//! From an accepted family mapping to `(pattern, replacement)` rules in `re.sub` syntax.
//!
//! The two skeletons are aligned segment by segment: *equal* segments (same text, slots
//! carried over unchanged) and *renamed* segments that carry the same slots
//! (`encoder_layer_#` <-> `#`, `norm#` <-> `bn#`) anchor the alignment; what lies between
//! anchors is a *change*. Each change becomes one rule that rewrites just those segments, so
//! the families that share a rename (`bn` -> `norm` in every block) share one rule. Changes
//! that say too little alone (a bare index, a pure insertion) are merged with a neighbour.
//! Three levels, tried in order when a rule misroutes some key: [`Level::Local`] (the
//! changes), [`Level::Context`] (each change with its neighbouring segments) and
//! [`Level::Whole`] (one rule per family, anchored at both ends).

use super::keys::{Family, Piece, Side};
use super::matching::{Mapping, ValueMap};

/// How much context a mapping's rules carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Local,
    Context,
    Whole,
}

impl Level {
    /// The next, more specific level; `None` after [`Level::Whole`].
    pub fn next(self) -> Option<Level> {
        match self {
            Level::Local => Some(Level::Context),
            Level::Context => Some(Level::Whole),
            Level::Whole => None,
        }
    }
}

/// Where a rule's pattern is anchored; rules are ordered by this, then longest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Anchor {
    Whole,
    Start,
    Middle,
    End,
    /// `^` alone: a prefix inserted before the key; last, so that no start rule misses.
    Insert,
}

/// One rule of one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    pub pattern: String,
    pub replacement: String,
    pub anchor: Anchor,
}

/// How digits and the end of a key are spelled in patterns. `\d` and `$` read best, but
/// Python's `\d` also matches non-ASCII digits and its `$` also matches before a final
/// newline; where some checkpoint key has either, `[0-9]` and `\Z` keep the rules exact.
#[derive(Debug, Clone, Copy)]
pub struct Spelling {
    pub digits: &'static str,
    pub end: &'static str,
}

impl Spelling {
    /// The spelling that is exact on `keys`.
    pub fn for_keys<S: AsRef<str>>(keys: &[S]) -> Self {
        let odd_digit = keys
            .iter()
            .any(|k| k.as_ref().chars().any(|c| !c.is_ascii() && c.is_numeric()));
        let newline = keys.iter().any(|k| k.as_ref().contains('\n'));
        Self {
            digits: if odd_digit { "([0-9]+)" } else { "(\\d+)" },
            end: if newline { "\\Z" } else { "$" },
        }
    }
}

/// At most this many rules for one change (one per value of its re-numbered slots).
const MAX_EXPANSION: usize = 4096;

#[derive(Debug, Clone)]
enum Role {
    /// Linked to the other side's slot with this value map.
    Linked(u8, ValueMap),
    Const(u64),
}

/// A half-open range of source segments and one of target segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Change {
    a0: usize,
    a1: usize,
    b0: usize,
    b1: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Equal(usize, usize),
    Change(Change),
}

struct Ctx<'a> {
    src: &'a Family,
    tgt: &'a Family,
    src_roles: Vec<Role>,
    tgt_roles: Vec<Role>,
}

impl<'a> Ctx<'a> {
    fn new(m: &Mapping, src: &'a Side, tgt: &'a Side) -> Self {
        let (sf, tg) = (
            &src.families[m.src_family as usize],
            &tgt.families[m.tgt_family as usize],
        );
        let mut src_roles = vec![Role::Const(0); sf.skel.nslots];
        let mut tgt_roles = vec![Role::Const(0); tg.skel.nslots];
        for &(i, v) in &m.src_const {
            src_roles[usize::from(i)] = Role::Const(v);
        }
        for &(j, v) in &m.tgt_const {
            tgt_roles[usize::from(j)] = Role::Const(v);
        }
        for (j, link) in m.links.iter().enumerate() {
            if let Some((i, map)) = link {
                src_roles[usize::from(*i)] = Role::Linked(j as u8, map.clone());
                tgt_roles[j] = Role::Linked(*i, map.clone());
            }
        }
        Self {
            src: sf,
            tgt: tg,
            src_roles,
            tgt_roles,
        }
    }

    fn equal(&self, a: usize, b: usize) -> bool {
        let (x, y) = (&self.src.skel.segments[a], &self.tgt.skel.segments[b]);
        x.len() == y.len()
            && x.iter().zip(y).all(|pair| match pair {
                (Piece::Lit(p), Piece::Lit(q)) => p == q,
                (Piece::Slot(i), Piece::Slot(j)) => {
                    match (
                        &self.src_roles[usize::from(*i)],
                        &self.tgt_roles[usize::from(*j)],
                    ) {
                        (Role::Linked(to, ValueMap::Identity), _) => to == j,
                        (Role::Const(v), Role::Const(w)) => v == w,
                        _ => false,
                    }
                }
                _ => false,
            })
    }

    /// Linked slots of source segment `a` (as target slots) and of target segment `b`.
    fn carries_same_slots(&self, a: usize, b: usize) -> bool {
        let mut from: Vec<u8> = self.src.skel.segments[a]
            .iter()
            .filter_map(|p| match p {
                Piece::Slot(i) => match &self.src_roles[usize::from(*i)] {
                    Role::Linked(j, _) => Some(*j),
                    Role::Const(_) => None,
                },
                Piece::Lit(_) => None,
            })
            .collect();
        let mut to: Vec<u8> = self.tgt.skel.segments[b]
            .iter()
            .filter_map(|p| match p {
                Piece::Slot(j) => match &self.tgt_roles[usize::from(*j)] {
                    Role::Linked(..) => Some(*j),
                    Role::Const(_) => None,
                },
                Piece::Lit(_) => None,
            })
            .collect();
        from.sort_unstable();
        to.sort_unstable();
        !from.is_empty() && from == to
    }

    /// The alignment: equal segments weigh 2, renamed segments carrying the same slots 1.
    fn align(&self) -> Vec<Item> {
        let (n, m) = (self.src.skel.segments.len(), self.tgt.skel.segments.len());
        let weight = |a: usize, b: usize| {
            if self.equal(a, b) {
                2
            } else if self.carries_same_slots(a, b) {
                1
            } else {
                0
            }
        };
        let mut dp = vec![vec![0u32; m + 1]; n + 1];
        for a in (0..n).rev() {
            for b in (0..m).rev() {
                let w = weight(a, b);
                let take = if w > 0 { w + dp[a + 1][b + 1] } else { 0 };
                dp[a][b] = take.max(dp[a + 1][b]).max(dp[a][b + 1]);
            }
        }
        let (mut a, mut b) = (0, 0);
        let (mut pa, mut pb) = (0, 0);
        let mut items = Vec::new();
        let gap = |items: &mut Vec<Item>, pa: usize, a: usize, pb: usize, b: usize| {
            if pa < a || pb < b {
                items.push(Item::Change(Change {
                    a0: pa,
                    a1: a,
                    b0: pb,
                    b1: b,
                }));
            }
        };
        while a < n && b < m {
            let w = weight(a, b);
            if w > 0 && dp[a][b] == w + dp[a + 1][b + 1] {
                gap(&mut items, pa, a, pb, b);
                items.push(if w == 2 {
                    Item::Equal(a, b)
                } else {
                    Item::Change(Change {
                        a0: a,
                        a1: a + 1,
                        b0: b,
                        b1: b + 1,
                    })
                });
                (a, b) = (a + 1, b + 1);
                (pa, pb) = (a, b);
            } else if dp[a][b] == dp[a + 1][b] {
                a += 1;
            } else {
                b += 1;
            }
        }
        gap(&mut items, pa, n, pb, m);
        items
    }

    fn has_word(&self, c: &Change) -> bool {
        self.src.skel.segments[c.a0..c.a1]
            .iter()
            .flatten()
            .any(|p| matches!(p, Piece::Lit(s) if s.chars().any(char::is_alphabetic)))
    }

    /// A change that can stand as a rule of its own.
    fn strong(&self, c: &Change) -> bool {
        c.a0 < c.a1 && c.b0 < c.b1 && self.has_word(c)
    }

    fn standalone(&self, c: &Change) -> bool {
        self.strong(c)
            || (c.b0 == c.b1 && self.has_word(c))
            || (c.a0 == c.a1 && c.a0 == 0 && !self.src.skel.segments.is_empty())
    }

    /// The changes at `level`.
    fn changes(&self, level: Level) -> Vec<Change> {
        let (n, m) = (self.src.skel.segments.len(), self.tgt.skel.segments.len());
        if level == Level::Whole {
            return vec![Change {
                a0: 0,
                a1: n,
                b0: 0,
                b1: m,
            }];
        }
        let mut items = self.align();
        let merge = |x: Item, y: Item| -> Item {
            let span = |i: Item| match i {
                Item::Equal(a, b) => (a, a + 1, b, b + 1),
                Item::Change(c) => (c.a0, c.a1, c.b0, c.b1),
            };
            let (p, q) = (span(x), span(y));
            Item::Change(Change {
                a0: p.0.min(q.0),
                a1: p.1.max(q.1),
                b0: p.2.min(q.2),
                b1: p.3.max(q.3),
            })
        };
        let is_change = |i: &Item| matches!(i, Item::Change(_));
        // Weak changes join an adjacent change, the left one first.
        'again: loop {
            for i in 0..items.len() {
                let Item::Change(c) = items[i] else { continue };
                if self.strong(&c) {
                    continue;
                }
                let j = if i > 0 && is_change(&items[i - 1]) {
                    i - 1
                } else if i + 1 < items.len() && is_change(&items[i + 1]) {
                    i + 1
                } else {
                    continue;
                };
                let (lo, hi) = (i.min(j), i.max(j));
                items[lo] = merge(items[lo], items[hi]);
                items.remove(hi);
                continue 'again;
            }
            break;
        }
        // Those still too weak take a neighbouring equal segment as context.
        'extend: loop {
            for i in 0..items.len() {
                let Item::Change(c) = items[i] else { continue };
                if self.standalone(&c) {
                    continue;
                }
                let j = if i > 0 {
                    i - 1
                } else if i + 1 < items.len() {
                    i + 1
                } else {
                    break 'extend;
                };
                let (lo, hi) = (i.min(j), i.max(j));
                items[lo] = merge(items[lo], items[hi]);
                items.remove(hi);
                continue 'extend;
            }
            break;
        }
        if level == Level::Context {
            let mut out: Vec<Item> = Vec::new();
            for i in 0..items.len() {
                if let Item::Change(_) = items[i] {
                    let mut c = items[i];
                    if i > 0 {
                        c = merge(items[i - 1], c);
                    }
                    if i + 1 < items.len() {
                        c = merge(c, items[i + 1]);
                    }
                    match out.last() {
                        Some(Item::Change(p)) if overlaps(p, &c) => {
                            let last = out.len() - 1;
                            out[last] = merge(out[last], c);
                        }
                        _ => out.push(c),
                    }
                }
            }
            items = out;
        }
        items
            .into_iter()
            .filter_map(|i| match i {
                Item::Change(c) => Some(c),
                Item::Equal(..) => None,
            })
            .collect()
    }
}

fn overlaps(p: &Change, c: &Item) -> bool {
    match c {
        Item::Change(c) => c.a0 < p.a1 || c.b0 < p.b1,
        Item::Equal(..) => false,
    }
}

/// Escapes `text` for a Python pattern.
fn escape_pattern(text: &str, out: &mut String) {
    for c in text.chars() {
        if ".^$*+?{}[]\\|()".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
}

/// A replacement template being built; group references become `\g<N>` before a digit.
#[derive(Default)]
struct Template {
    text: String,
    pending_group: Option<usize>,
}

impl Template {
    fn flush(&mut self, next_is_digit: bool) {
        if let Some(g) = self.pending_group.take() {
            if next_is_digit {
                self.text.push_str(&format!("\\g<{g}>"));
            } else {
                self.text.push_str(&format!("\\{g}"));
            }
        }
    }

    fn group(&mut self, g: usize) {
        self.flush(false);
        self.pending_group = Some(g);
    }

    fn literal(&mut self, text: &str) {
        self.flush(text.starts_with(|c: char| c.is_ascii_digit()));
        for c in text.chars() {
            if c == '\\' {
                self.text.push('\\');
            }
            self.text.push(c);
        }
    }

    fn finish(mut self) -> String {
        self.flush(false);
        self.text
    }
}

/// The rules of mapping `m` at `level`; `None` when they can not be written (a slot that
/// moves between changes, or too many re-numbered values).
pub fn emit(
    m: &Mapping,
    src: &Side,
    tgt: &Side,
    level: Level,
    spelling: Spelling,
) -> Option<Vec<Emitted>> {
    let ctx = Ctx::new(m, src, tgt);
    let changes = ctx.changes(level);
    let (src_seg, tgt_seg) = (ctx.src.skel.slot_segments(), ctx.tgt.skel.slot_segments());
    // Every link must stay inside one change (or be an equal segment).
    for (j, link) in m.links.iter().enumerate() {
        if let Some((i, _)) = link {
            let (a, b) = (src_seg[usize::from(*i)], tgt_seg[j]);
            let inside = changes
                .iter()
                .any(|c| (c.a0..c.a1).contains(&a) && (c.b0..c.b1).contains(&b));
            let outside = changes
                .iter()
                .all(|c| !(c.a0..c.a1).contains(&a) && !(c.b0..c.b1).contains(&b));
            if !(inside || (outside && ctx.equal(a, b))) {
                return None;
            }
        }
    }
    let mut out = Vec::new();
    for c in &changes {
        out.extend(render(&ctx, m, src, c, spelling)?);
    }
    Some(out)
}

/// The rules of one change: one, or one per value combination of its re-numbered slots.
fn render(
    ctx: &Ctx<'_>,
    m: &Mapping,
    src: &Side,
    c: &Change,
    spelling: Spelling,
) -> Option<Vec<Emitted>> {
    let n = ctx.src.skel.segments.len();
    if c.a0 == c.a1 && c.b0 == c.b1 {
        return Some(Vec::new());
    }
    if c.a0 == 0 && c.a1 == n && c.b0 == c.b1 {
        return None;
    }
    // Source slots in the change whose values are re-numbered: spelled out per value.
    let renumbered: Vec<u8> = ctx.src.skel.segments[c.a0..c.a1]
        .iter()
        .flatten()
        .filter_map(|p| match p {
            Piece::Slot(i) => match &ctx.src_roles[usize::from(*i)] {
                Role::Linked(_, map) if *map != ValueMap::Identity => Some(*i),
                _ => None,
            },
            Piece::Lit(_) => None,
        })
        .collect();
    let mut combos: Vec<Vec<u64>> = if renumbered.is_empty() {
        vec![Vec::new()]
    } else {
        m.pairs
            .iter()
            .map(|&(s, _, _)| {
                let t = &src.tuples[s as usize];
                renumbered.iter().map(|&i| t[usize::from(i)]).collect()
            })
            .collect()
    };
    combos.sort_unstable();
    combos.dedup();
    if combos.len() > MAX_EXPANSION {
        return None;
    }
    combos
        .iter()
        .map(|combo| render_one(ctx, c, &renumbered, combo, spelling))
        .collect()
}

fn render_one(
    ctx: &Ctx<'_>,
    c: &Change,
    renumbered: &[u8],
    combo: &[u64],
    spelling: Spelling,
) -> Option<Emitted> {
    let n = ctx.src.skel.segments.len();
    let value_of = |i: u8| renumbered.iter().position(|&r| r == i).map(|p| combo[p]);
    let mut pattern = String::new();
    let mut tpl = Template::default();
    let mut group = 0;
    let mut groups = vec![0usize; ctx.src.skel.nslots];
    // A start insertion: `^` -> `prefix.`.
    if c.a0 == c.a1 {
        for b in c.b0..c.b1 {
            render_target(ctx, b, &groups, &value_of, &mut tpl)?;
            tpl.literal(".");
        }
        return Some(Emitted {
            pattern: "^".into(),
            replacement: tpl.finish(),
            anchor: Anchor::Insert,
        });
    }
    let deletion = c.b0 == c.b1;
    let anchor = match (c.a0 == 0, c.a1 == n) {
        (true, true) => Anchor::Whole,
        (true, false) => Anchor::Start,
        (false, false) => Anchor::Middle,
        (false, true) => Anchor::End,
    };
    if c.a0 == 0 {
        pattern.push('^');
    } else if deletion && c.a1 == n {
        pattern.push_str("\\.");
    } else {
        pattern.push_str("(^|\\.)");
        group += 1;
        tpl.group(group);
    }
    for a in c.a0..c.a1 {
        if a > c.a0 {
            pattern.push_str("\\.");
        }
        for p in &ctx.src.skel.segments[a] {
            match p {
                Piece::Lit(s) => escape_pattern(s, &mut pattern),
                Piece::Slot(i) => match &ctx.src_roles[usize::from(*i)] {
                    Role::Linked(_, ValueMap::Identity) => {
                        group += 1;
                        groups[usize::from(*i)] = group;
                        pattern.push_str(spelling.digits);
                    }
                    Role::Linked(..) => pattern.push_str(&value_of(*i)?.to_string()),
                    Role::Const(v) => pattern.push_str(&v.to_string()),
                },
            }
        }
    }
    pattern.push_str(if c.a1 == n { spelling.end } else { "\\." });
    for b in c.b0..c.b1 {
        if b > c.b0 {
            tpl.literal(".");
        }
        render_target(ctx, b, &groups, &value_of, &mut tpl)?;
    }
    if c.a1 < n && !deletion {
        tpl.literal(".");
    }
    Some(Emitted {
        pattern,
        replacement: tpl.finish(),
        anchor,
    })
}

fn render_target(
    ctx: &Ctx<'_>,
    b: usize,
    groups: &[usize],
    value_of: &dyn Fn(u8) -> Option<u64>,
    tpl: &mut Template,
) -> Option<()> {
    for p in &ctx.tgt.skel.segments[b] {
        match p {
            Piece::Lit(s) => tpl.literal(s),
            Piece::Slot(j) => match &ctx.tgt_roles[usize::from(*j)] {
                Role::Linked(i, ValueMap::Identity) => {
                    let g = groups[usize::from(*i)];
                    if g == 0 {
                        return None;
                    }
                    tpl.group(g);
                }
                Role::Linked(i, map) => tpl.literal(&map.apply(value_of(*i)?)?.to_string()),
                Role::Const(v) => tpl.literal(&v.to_string()),
            },
        }
    }
    Some(())
}
