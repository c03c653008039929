//! Which checkpoint keys are which model keys: family mappings, scored, accepted only when
//! no other candidate fits as well.
//!
//! A candidate maps (part of) a source family onto (part of) a target family: each target
//! slot takes the value of one source slot through a value map (identity, an offset such as
//! `layer1..4` -> `stages.0..3`, or an order-preserving table such as `mlp.0, mlp.3` ->
//! `fc1, fc2`), or is constant; source slots that feed no target slot split the family
//! (`downsample.0` -> `shortcut.conv`, `downsample.1` -> `shortcut.norm`). Its score is the
//! number of keys it maps onto a model key of the same shape and dtype, then how alike the
//! names are, then how natural the slot assignment is (order kept, identity values).
//!
//! Acceptance is by rounds: a candidate is accepted when, at every key it maps, it scores
//! strictly above every candidate that maps that key elsewhere (on both sides). Accepted keys
//! are claimed, which can settle candidates that were contested, and the next round runs.
//! Whatever is still contested at the end is reported as ambiguous, never guessed.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::OnceLock;

use rayon::prelude::*;

use super::keys::{Family, Side, Tuple, MAX_SLOTS};
use super::words::similarity;

/// A family part is split at most this many ways (source slots that feed nothing, or target
/// slots that are constant).
const MAX_PARTS: usize = 64;
/// At most this many target families are tried for one source family (the most alike).
const MAX_TARGET_FAMILIES: usize = 256;
/// Keys evaluated before a full evaluation of a large part.
const SAMPLE: usize = 256;

/// How a target slot's value follows from its source slot's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ValueMap {
    Identity,
    Offset(i64),
    /// Sorted `(source, target)` pairs; other values have no image.
    Table(Vec<(u64, u64)>),
}

impl ValueMap {
    pub fn apply(&self, v: u64) -> Option<u64> {
        match self {
            ValueMap::Identity => Some(v),
            ValueMap::Offset(d) => v.checked_add_signed(*d),
            ValueMap::Table(t) => t.binary_search_by_key(&v, |&(s, _)| s).ok().map(|i| t[i].1),
        }
    }

    /// Chooses the map from source values `from` onto target values `to` (both sorted,
    /// distinct): identity when it hits as many as any other; else a constant offset; else,
    /// for equally many values, the order-preserving table.
    fn choose(from: &[u64], to: &[u64]) -> Self {
        let hits = |m: &ValueMap| {
            from.iter()
                .filter_map(|&v| m.apply(v))
                .filter(|v| to.binary_search(v).is_ok())
                .count()
        };
        let mut best = (hits(&ValueMap::Identity), ValueMap::Identity);
        if let (Some(&f), Some(&t)) = (from.first(), to.first()) {
            let offset = ValueMap::Offset(t as i64 - f as i64);
            let h = hits(&offset);
            if h > best.0 {
                best = (h, offset);
            }
        }
        if from.len() == to.len() && best.0 < from.len() {
            let table = ValueMap::Table(from.iter().copied().zip(to.iter().copied()).collect());
            best = (from.len(), table);
        }
        best.1
    }
}

/// A candidate family mapping (and, once accepted, a mapping).
#[derive(Debug, Clone)]
pub struct Mapping {
    pub src_family: u32,
    pub tgt_family: u32,
    /// Per target slot: `(source slot, value map)`, or `None` for a constant slot.
    pub links: Vec<Option<(u8, ValueMap)>>,
    /// Source slots that feed no target slot, with the one value they take in this part.
    pub src_const: Vec<(u8, u64)>,
    /// Constant target slots with their value.
    pub tgt_const: Vec<(u8, u64)>,
    /// `(source key, target key, same shape and dtype)` for every source key of the part
    /// whose image exists on the target side.
    pub pairs: Vec<(u32, u32, bool)>,
    pub sim: u32,
    pub natural: u32,
}

/// A candidate's standing, compared in order: keys sent onto a model key of the same shape
/// and dtype; of those, keys whose module is already known to map to the target's module (a
/// sibling tensor was accepted there); name likeness; naturalness of the slot assignment.
type Score = (u32, u32, u32, u32);

impl Mapping {
    fn score(&self, matched: usize, consistent: usize) -> Score {
        (matched as u32, consistent as u32, self.sim, self.natural)
    }
}

/// Module paths known to map: per source parent, the target parent, or a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parent {
    Unknown,
    Is(u32),
    Conflict,
}

/// Every slot assignment: per target slot, a distinct source slot or none.
fn assignments(
    src: &Family,
    tgt: &Family,
    j: usize,
    used: &mut Vec<bool>,
    cur: &mut Vec<Option<u8>>,
    out: &mut Vec<Vec<Option<u8>>>,
) {
    if j == tgt.skel.nslots {
        // A source slot that feeds nothing splits the family; it must have few values.
        let ok = used
            .iter()
            .enumerate()
            .all(|(i, &u)| u || src.values[i].len() <= MAX_PARTS);
        if ok {
            out.push(cur.clone());
        }
        return;
    }
    if tgt.values[j].len() <= MAX_PARTS {
        cur.push(None);
        assignments(src, tgt, j + 1, used, cur, out);
        cur.pop();
    }
    for i in 0..src.skel.nslots {
        let (vi, wj) = (&src.values[i], &tgt.values[j]);
        let overlap = vi.iter().any(|v| wj.binary_search(v).is_ok());
        if used[i] || !(overlap || vi.len() == wj.len()) {
            continue;
        }
        used[i] = true;
        cur.push(Some(i as u8));
        assignments(src, tgt, j + 1, used, cur, out);
        cur.pop();
        used[i] = false;
    }
}

/// Part of a family: its keys, the values of its split slots, per slot the distinct values,
/// and the distinct signatures.
struct Part {
    fixed: Vec<u64>,
    keys: Vec<u32>,
    values: Vec<Vec<u64>>,
    sigs: Vec<u32>,
}

/// Splits `family`'s keys by their values at `slots` (`None`: too many parts).
fn parts(side: &Side, family: &Family, slots: &[usize]) -> Option<Vec<Part>> {
    let groups = split(side, &family.keys, slots)?;
    Some(
        groups
            .into_iter()
            .map(|(fixed, keys)| {
                let values = (0..family.skel.nslots)
                    .map(|slot| distinct(side, &keys, slot))
                    .collect();
                let mut sigs: Vec<u32> = keys.iter().map(|&k| side.sig[k as usize]).collect();
                sigs.sort_unstable();
                sigs.dedup();
                Part {
                    fixed,
                    keys,
                    values,
                    sigs,
                }
            })
            .collect(),
    )
}

fn share_any(a: &[u32], b: &[u32]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}

/// Groups `keys` by their values at `slots`.
fn split(side: &Side, keys: &[u32], slots: &[usize]) -> Option<Vec<(Vec<u64>, Vec<u32>)>> {
    let mut parts: HashMap<Vec<u64>, usize> = HashMap::new();
    let mut out: Vec<(Vec<u64>, Vec<u32>)> = Vec::new();
    for &k in keys {
        let t = &side.tuples[k as usize];
        let proj: Vec<u64> = slots.iter().map(|&s| t[s]).collect();
        let at = *parts.entry(proj.clone()).or_insert_with(|| {
            out.push((proj, Vec::new()));
            out.len() - 1
        });
        if out.len() > MAX_PARTS {
            return None;
        }
        out[at].1.push(k);
    }
    Some(out)
}

fn distinct(side: &Side, keys: &[u32], slot: usize) -> Vec<u64> {
    let mut v: Vec<u64> = keys
        .iter()
        .map(|&k| side.tuples[k as usize][slot])
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// How natural an assignment is: more links, links in slot order, identity values, slots at
/// the same place on both sides (indices come first in module paths; extra slots on one
/// side are usually names further right, such as `downsample.0`).
fn naturalness(links: &[Option<(u8, ValueMap)>]) -> u32 {
    let linked: Vec<(usize, u8, &ValueMap)> = links
        .iter()
        .enumerate()
        .filter_map(|(j, l)| l.as_ref().map(|(i, m)| (j, *i, m)))
        .collect();
    let mut score = 8 * linked.len() as u32 + 64;
    for (a, &(j, ia, ma)) in linked.iter().enumerate() {
        if *ma == ValueMap::Identity {
            score += 2;
        }
        let i = usize::from(ia);
        score += u32::from(i == j);
        for &(_, ib, _) in &linked[a + 1..] {
            if ib > ia {
                score += 1;
            } else {
                score = score.saturating_sub(4);
            }
        }
    }
    score
}

/// Family parts, computed once per (family, split slots) and shared between threads.
struct PartCache {
    cells: Vec<OnceLock<Option<Vec<Part>>>>,
}

impl PartCache {
    fn new(side: &Side) -> Self {
        Self {
            cells: (0..side.families.len() << MAX_SLOTS)
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    fn get(&self, side: &Side, family: u32, slots: &[usize]) -> Option<&[Part]> {
        let mask: usize = slots.iter().map(|&s| 1 << s).sum();
        self.cells[((family as usize) << MAX_SLOTS) | mask]
            .get_or_init(|| parts(side, &side.families[family as usize], slots))
            .as_deref()
    }
}

/// The candidates that map parts of source family `f` onto target family `g`.
fn candidates_for(
    src: &Side,
    tgt: &Side,
    caches: (&PartCache, &PartCache),
    f: u32,
    g: u32,
    sim: u32,
) -> Vec<Mapping> {
    let (sf, tg) = (&src.families[f as usize], &tgt.families[g as usize]);
    let mut all = Vec::new();
    assignments(
        sf,
        tg,
        0,
        &mut vec![false; sf.skel.nslots],
        &mut Vec::new(),
        &mut all,
    );
    // Most natural first (as if every value map were the identity): once an assignment maps
    // the whole family, less natural ones can only lose, so they are not tried.
    let prior = |assign: &Vec<Option<u8>>| {
        let links: Vec<Option<(u8, ValueMap)>> = assign
            .iter()
            .map(|a| a.map(|i| (i, ValueMap::Identity)))
            .collect();
        naturalness(&links)
    };
    all.sort_by_cached_key(|a| std::cmp::Reverse(prior(a)));
    let mut out = Vec::new();
    let mut done_below = None;
    for assign in all {
        let p = prior(&assign);
        if done_below.is_some_and(|d| p < d) {
            break;
        }
        let unused: Vec<usize> = (0..sf.skel.nslots)
            .filter(|i| !assign.contains(&Some(*i as u8)))
            .collect();
        let consts: Vec<usize> = (0..tg.skel.nslots)
            .filter(|&j| assign[j].is_none())
            .collect();
        let (Some(fparts), Some(gparts)) =
            (caches.0.get(src, f, &unused), caches.1.get(tgt, g, &consts))
        else {
            continue;
        };
        for fpart in fparts {
            for gpart in gparts {
                if !share_any(&fpart.sigs, &gpart.sigs) {
                    continue;
                }
                let (fvals, fkeys, gvals) = (&fpart.fixed, &fpart.keys, &gpart.fixed);
                let links: Vec<Option<(u8, ValueMap)>> = assign
                    .iter()
                    .enumerate()
                    .map(|(j, a)| {
                        a.map(|i| {
                            let (from, to) = (&fpart.values[usize::from(i)], &gpart.values[j]);
                            (i, ValueMap::choose(from, to))
                        })
                    })
                    .collect();
                let image = |k: u32| -> Option<(u32, u32, bool)> {
                    let st = &src.tuples[k as usize];
                    let mut t: Tuple = [0; MAX_SLOTS];
                    let mut c = 0;
                    for (j, l) in links.iter().enumerate() {
                        t[j] = match l {
                            Some((i, m)) => m.apply(st[usize::from(*i)])?,
                            None => {
                                c += 1;
                                gvals[c - 1]
                            }
                        };
                    }
                    let to = tgt.find(g, &t)?;
                    Some((k, to, src.sig[k as usize] == tgt.sig[to as usize]))
                };
                if fkeys.len() > SAMPLE
                    && !fkeys[..SAMPLE]
                        .iter()
                        .any(|&k| image(k).is_some_and(|p| p.2))
                {
                    continue;
                }
                let pairs: Vec<(u32, u32, bool)> = fkeys.iter().filter_map(|&k| image(k)).collect();
                let matched = pairs.iter().filter(|p| p.2).count();
                if matched == 0 || matched <= pairs.len() - matched {
                    continue;
                }
                if matched == sf.keys.len() {
                    done_below = Some(p);
                }
                out.push(Mapping {
                    src_family: f,
                    tgt_family: g,
                    natural: naturalness(&links),
                    links,
                    src_const: unused
                        .iter()
                        .zip(fvals)
                        .map(|(&i, &v)| (i as u8, v))
                        .collect(),
                    tgt_const: consts
                        .iter()
                        .zip(gvals)
                        .map(|(&j, &v)| (j as u8, v))
                        .collect(),
                    pairs,
                    sim,
                });
            }
        }
    }
    out
}

/// All candidates, one per distinct key mapping (the most natural assignment kept).
pub fn candidates(src: &Side, tgt: &Side) -> Vec<Mapping> {
    // Target families by the signatures their keys have.
    let mut by_sig: HashMap<u32, Vec<u32>> = HashMap::new();
    for (g, fam) in tgt.families.iter().enumerate() {
        let sigs: HashSet<u32> = fam.keys.iter().map(|&k| tgt.sig[k as usize]).collect();
        for s in sigs {
            by_sig.entry(s).or_default().push(g as u32);
        }
    }
    let caches = (&PartCache::new(src), &PartCache::new(tgt));
    let found: Vec<Vec<Mapping>> = (0..src.families.len() as u32)
        .into_par_iter()
        .map(|f| {
            let fam = &src.families[f as usize];
            let sigs: HashSet<u32> = fam.keys.iter().map(|&k| src.sig[k as usize]).collect();
            let mut gs: Vec<u32> = sigs
                .iter()
                .filter_map(|s| by_sig.get(s))
                .flatten()
                .copied()
                .collect::<HashSet<u32>>()
                .into_iter()
                .collect();
            let mut scored: Vec<(u32, u32)> = gs
                .drain(..)
                .map(|g| {
                    (
                        similarity(&fam.skel.words, &tgt.families[g as usize].skel.words),
                        g,
                    )
                })
                .collect();
            scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            scored.truncate(MAX_TARGET_FAMILIES);
            scored
                .into_iter()
                .flat_map(|(sim, g)| candidates_for(src, tgt, caches, f, g, sim))
                .collect()
        })
        .collect();
    let mut out: Vec<Mapping> = Vec::new();
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for m in found.into_iter().flatten() {
        let mut h = DefaultHasher::new();
        m.pairs.hash(&mut h);
        match seen.get(&h.finish()) {
            Some(&at) if out[at].pairs == m.pairs => {
                if m.natural > out[at].natural {
                    out[at] = m;
                }
            }
            _ => {
                seen.insert(h.finish(), out.len());
                out.push(m);
            }
        }
    }
    out
}

/// Where a key stands after matching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Mapped by accepted mapping `mapping` onto the other side's key `other`.
    Mapped {
        mapping: u32,
        other: u32,
        same: bool,
    },
    /// Contested: these keys of the other side fit equally well (or are held by a rival).
    Ambiguous(Vec<u32>),
    /// Nothing on the other side fits.
    NoCandidate,
}

/// The best score at a key and the best score of a candidate that maps it elsewhere.
#[derive(Debug, Clone, Copy, Default)]
struct Top {
    best: Score,
    best_to: u32,
    second: Score,
    second_to: u32,
}

const NONE: Score = (0, 0, 0, 0);

impl Top {
    fn add(&mut self, score: Score, to: u32) {
        if self.best == NONE {
            (self.best, self.best_to) = (score, to);
        } else if to == self.best_to {
            self.best = self.best.max(score);
        } else if score > self.best {
            (self.second, self.second_to) = (self.best, self.best_to);
            (self.best, self.best_to) = (score, to);
        } else if score > self.second {
            (self.second, self.second_to) = (score, to);
        }
    }

    fn clear_win(&self, score: Score, to: u32) -> bool {
        self.best == score && self.best_to == to && self.second < score
    }
}

/// The accepted mappings and where every key stands.
pub struct Matching {
    pub accepted: Vec<Mapping>,
    pub source: Vec<Claim>,
    pub target: Vec<Claim>,
}

/// Runs the acceptance rounds over `cands`.
pub fn accept(src: &Side, tgt: &Side, mut cands: Vec<Mapping>) -> Matching {
    let mut src_claim: Vec<Option<(u32, u32, bool)>> = vec![None; src.len()];
    let mut tgt_claim: Vec<Option<(u32, u32, bool)>> = vec![None; tgt.len()];
    let mut accepted: Vec<Mapping> = Vec::new();
    let mut src_top = vec![Top::default(); src.len()];
    let mut tgt_top = vec![Top::default(); tgt.len()];
    let parents = src.parent.iter().max().map_or(0, |&p| p as usize + 1);
    let mut parent_map = vec![Parent::Unknown; parents];
    loop {
        src_top.fill(Top::default());
        tgt_top.fill(Top::default());
        let alive = |p: &(u32, u32, bool)| {
            src_claim[p.0 as usize].is_none() && tgt_claim[p.1 as usize].is_none()
        };
        // Drop pairs that earlier rounds settled, then candidates that no longer fit.
        for c in &mut cands {
            c.pairs.retain(|p| alive(p));
        }
        cands.retain(|c| {
            let matched = c.pairs.iter().filter(|p| p.2).count();
            matched > 0 && matched > c.pairs.len() - matched
        });
        let scores: Vec<Score> = cands
            .iter()
            .map(|c| {
                let matched = c.pairs.iter().filter(|p| p.2).count();
                let consistent = c
                    .pairs
                    .iter()
                    .filter(|p| {
                        p.2 && parent_map[src.parent[p.0 as usize] as usize]
                            == Parent::Is(tgt.parent[p.1 as usize])
                    })
                    .count();
                c.score(matched, consistent)
            })
            .collect();
        for (c, &score) in cands.iter().zip(&scores) {
            for &(s, t, _) in &c.pairs {
                src_top[s as usize].add(score, t);
                tgt_top[t as usize].add(score, s);
            }
        }
        let mut order: Vec<usize> = (0..cands.len())
            .filter(|&i| {
                cands[i].pairs.iter().all(|&(s, t, _)| {
                    src_top[s as usize].clear_win(scores[i], t)
                        && tgt_top[t as usize].clear_win(scores[i], s)
                })
            })
            .collect();
        if order.is_empty() {
            break;
        }
        order.sort_by(|&a, &b| scores[b].cmp(&scores[a]));
        for i in order {
            let id = accepted.len() as u32;
            let mut any = false;
            for &(s, t, same) in &cands[i].pairs {
                if src_claim[s as usize].is_none() && tgt_claim[t as usize].is_none() {
                    src_claim[s as usize] = Some((id, t, same));
                    tgt_claim[t as usize] = Some((id, s, same));
                    any = true;
                    let (ps, pt) = (src.parent[s as usize], tgt.parent[t as usize]);
                    let known = &mut parent_map[ps as usize];
                    *known = match *known {
                        Parent::Unknown => Parent::Is(pt),
                        Parent::Is(p) if p == pt => Parent::Is(pt),
                        _ => Parent::Conflict,
                    };
                }
            }
            if any {
                accepted.push(cands[i].clone());
            }
        }
    }
    let claims = |claim: &[Option<(u32, u32, bool)>], top: &[Top]| -> Vec<Claim> {
        claim
            .iter()
            .zip(top)
            .map(|(c, t)| match c {
                Some((mapping, other, same)) => Claim::Mapped {
                    mapping: *mapping,
                    other: *other,
                    same: *same,
                },
                None if t.best == NONE => Claim::NoCandidate,
                None if t.second != NONE => Claim::Ambiguous(vec![t.best_to, t.second_to]),
                None => Claim::Ambiguous(vec![t.best_to]),
            })
            .collect()
    };
    // The pairs each accepted mapping holds.
    for m in &mut accepted {
        m.pairs.clear();
    }
    for (s, c) in src_claim.iter().enumerate() {
        if let Some((id, t, same)) = c {
            accepted[*id as usize].pairs.push((s as u32, *t, *same));
        }
    }
    Matching {
        source: claims(&src_claim, &src_top),
        target: claims(&tgt_claim, &tgt_top),
        accepted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A side whose signatures are given per key.
    fn side(keys: &[(&str, u32)]) -> Side {
        let names: Vec<&str> = keys.iter().map(|k| k.0).collect();
        Side::new(&names, keys.iter().map(|k| k.1).collect())
    }

    fn mapped(m: &Matching) -> Vec<Option<u32>> {
        m.source
            .iter()
            .map(|c| match c {
                Claim::Mapped {
                    other, same: true, ..
                } => Some(*other),
                _ => None,
            })
            .collect()
    }

    fn run(src: &Side, tgt: &Side) -> Matching {
        accept(src, tgt, candidates(src, tgt))
    }

    #[test]
    fn value_maps() {
        assert_eq!(ValueMap::choose(&[1, 2, 3], &[1, 2, 3]), ValueMap::Identity);
        assert_eq!(
            ValueMap::choose(&[1, 2, 3, 4], &[0, 1, 2, 3]),
            ValueMap::Offset(-1)
        );
        assert_eq!(
            ValueMap::choose(&[0, 3], &[1, 2]),
            ValueMap::Table(vec![(0, 1), (3, 2)])
        );
        assert_eq!(ValueMap::Offset(-1).apply(0), None);
    }

    #[test]
    fn offsets_and_nesting() {
        let src = side(&[
            ("layer1.0.w", 1),
            ("layer1.1.w", 1),
            ("layer2.0.w", 2),
            ("layer2.1.w", 2),
        ]);
        let tgt = side(&[
            ("stages.0.blocks.0.w", 1),
            ("stages.0.blocks.1.w", 1),
            ("stages.1.blocks.0.w", 2),
            ("stages.1.blocks.1.w", 2),
        ]);
        let m = run(&src, &tgt);
        assert_eq!(mapped(&m), vec![Some(0), Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn same_shapes_without_names_are_ambiguous() {
        let src = side(&[("a.weight", 1), ("b.weight", 1)]);
        let tgt = side(&[("x.weight", 1), ("y.weight", 1)]);
        let m = run(&src, &tgt);
        assert_eq!(mapped(&m), vec![None, None]);
        assert!(matches!(m.source[0], Claim::Ambiguous(_)));
    }

    #[test]
    fn names_break_shape_ties() {
        let src = side(&[("blk.norm.weight", 1), ("blk.norm.bias", 1)]);
        let tgt = side(&[("x.bn.bias", 1), ("x.bn.weight", 1)]);
        let m = run(&src, &tgt);
        assert_eq!(mapped(&m), vec![Some(1), Some(0)]);
    }

    #[test]
    fn split_families() {
        let src = side(&[
            ("b.0.down.0.w", 4),
            ("b.0.down.1.w", 1),
            ("b.1.down.0.w", 4),
            ("b.1.down.1.w", 1),
        ]);
        let tgt = side(&[
            ("b.0.sc.conv.w", 4),
            ("b.0.sc.bn.w", 1),
            ("b.1.sc.conv.w", 4),
            ("b.1.sc.bn.w", 1),
        ]);
        let m = run(&src, &tgt);
        assert_eq!(mapped(&m), vec![Some(0), Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn claimed_keys_settle_later_rounds() {
        // The stem's norm fits any block norm by shape; once the blocks are mapped, only one
        // is left.
        let mut src = vec![("stem.norm.w", 1u32)];
        let mut tgt = vec![("bn1.w", 1u32)];
        let names: Vec<(String, String)> = (0..3)
            .map(|i| (format!("blocks.{i}.norm.w"), format!("layer.{i}.bn.w")))
            .collect();
        for (s, t) in &names {
            src.push((s, 1));
            tgt.push((t, 1));
        }
        let (src, tgt) = (side(&src), side(&tgt));
        let m = run(&src, &tgt);
        assert_eq!(mapped(&m), vec![Some(0), Some(1), Some(2), Some(3)]);
    }
}
