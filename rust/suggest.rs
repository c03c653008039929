//! Key rules that write themselves: given a checkpoint's tensors and a model's (names,
//! shapes, dtypes), infer the ordered `(pattern, replacement)` rules, applied as `re.sub`, that
//! rename the checkpoint's keys onto the model's.
//!
//! 1. [`keys`]: keys become skeletons with index slots (`layer#.#.bn#.weight`), grouped into
//!    families.
//! 2. [`matching`]: family mappings (slot links, value maps, splits) are scored by how many
//!    keys they send onto a model key of the same shape and dtype, then by name likeness; a
//!    mapping is accepted only where nothing else fits as well, so ties stay unmapped.
//! 3. [`emit`]: each accepted mapping is written as compact rules, one per structural change.
//! 4. The rules run over every checkpoint key ([`verify`]); a rule that sends any key
//!    anywhere but where the matching meant it is made more specific, and a mapping whose
//!    rules can not be made right is dropped (its keys reported, never misrouted).

mod emit;
mod keys;
mod matching;
mod verify;
mod words;

use std::collections::{HashMap, HashSet};

use emit::{Emitted, Level, Spelling};
use keys::Side;
use matching::Claim;
use verify::Compiled;

/// One tensor (or non-tensor entry, without shape and dtype) of either side.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub name: &'a str,
    pub shape: Option<&'a [u64]>,
    pub dtype: Option<&'a str>,
}

/// One suggested rule with its evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub pattern: String,
    pub replacement: String,
    /// How many checkpoint keys it changes on their way to their model key.
    pub keys: usize,
    /// The first few of them (checkpoint positions).
    pub examples: Vec<u32>,
}

/// Where one key stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The rules send it onto this key of the other side, same shape and dtype.
    Mapped(u32),
    /// Its structural counterpart is this key, whose shape or dtype differs.
    ShapeDiffers(u32),
    /// These keys of the other side fit it equally well (or are contested); none is chosen.
    Ambiguous(Vec<u32>),
    /// Nothing on the other side fits.
    NoCandidate,
    /// It had a counterpart, but no rule could send it there without misrouting other keys.
    Conflict(u32),
}

/// What [`suggest`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggestion {
    pub rules: Vec<Rule>,
    /// Per checkpoint key.
    pub source: Vec<Status>,
    /// Per model key.
    pub target: Vec<Status>,
}

/// Shape-and-dtype signatures, equal ids for equal pairs across both sides.
fn signatures<'a>(source: &[Entry<'a>], target: &[Entry<'a>]) -> (Vec<u32>, Vec<u32>) {
    let mut ids: HashMap<(Option<&'a [u64]>, Option<&'a str>), u32> = HashMap::new();
    let mut id = |e: &Entry<'a>| {
        let next = ids.len() as u32;
        *ids.entry((e.shape, e.dtype)).or_insert(next)
    };
    (
        source.iter().map(&mut id).collect(),
        target.iter().map(&mut id).collect(),
    )
}

/// Rules in order, and per rule the mappings that need it.
type Built = (Vec<(String, String)>, Vec<Vec<u32>>);

/// The rules of every live mapping at its level, deduplicated and ordered, with the mappings
/// that need each; `Err` lists mappings whose rules can not be written or clash.
fn build(
    accepted: &[matching::Mapping],
    levels: &[Option<Level>],
    src: &Side,
    tgt: &Side,
    spelling: Spelling,
) -> Result<Built, Vec<u32>> {
    let mut rules: Vec<(Emitted, Vec<u32>)> = Vec::new();
    let mut by_pattern: HashMap<String, usize> = HashMap::new();
    let mut bad: Vec<u32> = Vec::new();
    for (id, m) in accepted.iter().enumerate() {
        let Some(level) = levels[id] else { continue };
        let Some(emitted) = emit::emit(m, src, tgt, level, spelling) else {
            bad.push(id as u32);
            continue;
        };
        for e in emitted {
            match by_pattern.get(&e.pattern) {
                Some(&at) if rules[at].0.replacement == e.replacement => {
                    if !rules[at].1.contains(&(id as u32)) {
                        rules[at].1.push(id as u32);
                    }
                }
                Some(&at) => {
                    bad.extend(rules[at].1.iter().copied());
                    bad.push(id as u32);
                }
                None => {
                    by_pattern.insert(e.pattern.clone(), rules.len());
                    rules.push((e, vec![id as u32]));
                }
            }
        }
    }
    if !bad.is_empty() {
        bad.sort_unstable();
        bad.dedup();
        return Err(bad);
    }
    // Whole-key rules first (they need the key untouched), then start, middle and end
    // rewrites, longest first, then prefix insertions.
    let mut order: Vec<usize> = (0..rules.len()).collect();
    order.sort_by_key(|&i| {
        let e = &rules[i].0;
        (e.anchor, std::cmp::Reverse(e.pattern.len()), i)
    });
    let (pairs, owners) = order
        .into_iter()
        .map(|i| {
            let (e, owners) = &rules[i];
            ((e.pattern.clone(), e.replacement.clone()), owners.clone())
        })
        .unzip();
    Ok((pairs, owners))
}

/// The mappings to make more specific, given the keys that the rules send wrong.
///
/// A wrong key's culprits are the rules without which it would land right (tried one at a
/// time). A rule that is a culprit for more keys than it helps is bad: its mappings are
/// blamed (the worst rule's first). A rule that helps more than it harms is kept: the wrong
/// keys' own mappings are blamed instead, so that one misfit does not drag every mapping that
/// shares a good rule into longer rules.
fn blame(
    compiled: &Compiled,
    owners: &[Vec<u32>],
    wrong: &[usize],
    names: &[&str],
    own_mapping: impl Fn(usize) -> Option<u32>,
    lands_right: impl Fn(usize, &str) -> bool,
) -> Vec<u32> {
    let mut harm = vec![0usize; owners.len()];
    let mut own_counts: HashMap<u32, usize> = HashMap::new();
    for &s in wrong {
        let fired = compiled.fired(names[s]);
        let culprits: Vec<u32> = fired
            .iter()
            .filter(|&&r| lands_right(s, &compiled.run_without(names[s], r)))
            .copied()
            .collect();
        for &r in &culprits {
            harm[r as usize] += 1;
        }
        let mut own: Vec<u32> = own_mapping(s).into_iter().collect();
        if own.is_empty() {
            // A key no mapping claims: every rule that moved it is suspect.
            own.extend(
                fired
                    .iter()
                    .flat_map(|&r| owners[r as usize].iter().copied()),
            );
        }
        for m in own {
            *own_counts.entry(m).or_default() += 1;
        }
    }
    let wrong_set: HashSet<usize> = wrong.iter().copied().collect();
    let right: Vec<u32> = (0..names.len())
        .filter(|s| !wrong_set.contains(s))
        .map(|s| s as u32)
        .collect();
    let help = compiled.evidence(names, &right, 0);
    let worst = (0..owners.len())
        .filter(|&r| harm[r] > help[r].0)
        .max_by_key(|&r| (harm[r] - help[r].0, std::cmp::Reverse(r)));
    if let Some(r) = worst {
        return owners[r].clone();
    }
    let most = own_counts.values().copied().max().unwrap_or(0);
    let mut out: Vec<u32> = own_counts
        .into_iter()
        .filter(|&(_, n)| n == most)
        .map(|(m, _)| m)
        .collect();
    out.sort_unstable();
    out
}

/// Infers the rules that rename `source` (a checkpoint) onto `target` (a model).
pub fn suggest(source: &[Entry<'_>], target: &[Entry<'_>]) -> Suggestion {
    let (src_sig, tgt_sig) = signatures(source, target);
    let src_names: Vec<&str> = source.iter().map(|e| e.name).collect();
    let tgt_names: Vec<&str> = target.iter().map(|e| e.name).collect();
    let src = Side::new(&src_names, src_sig);
    let tgt = Side::new(&tgt_names, tgt_sig);
    let cands = matching::candidates(&src, &tgt);
    let found = matching::accept(&src, &tgt, cands);
    let spelling = Spelling::for_keys(&src_names);
    let accepted = &found.accepted;
    let tgt_index: HashMap<&str, usize> = tgt_names
        .iter()
        .enumerate()
        .map(|(i, &n)| (n, i))
        .rev()
        .collect();
    let mut levels: Vec<Option<Level>> = vec![Some(Level::Local); accepted.len()];
    let bump = |levels: &mut [Option<Level>], id: u32| {
        let l = &mut levels[id as usize];
        *l = l.and_then(Level::next);
    };
    // The mapping (if live) that claims each checkpoint key, and where it should land.
    let intended = |levels: &[Option<Level>], s: usize| -> Option<(u32, u32)> {
        match found.source[s] {
            Claim::Mapped { mapping, other, .. } if levels[mapping as usize].is_some() => {
                Some((mapping, other))
            }
            _ => None,
        }
    };
    let compiled = loop {
        let (rules, owners) = match build(accepted, &levels, &src, &tgt, spelling) {
            Ok(built) => built,
            Err(bad) => {
                for id in bad {
                    bump(&mut levels, id);
                }
                continue;
            }
        };
        let compiled = match Compiled::new(&rules) {
            Ok(c) => c,
            Err(rule) => {
                for &id in &owners[rule] {
                    bump(&mut levels, id);
                }
                continue;
            }
        };
        let revised = compiled.apply(&src_names);
        // A key that no mapping claims may stay as it is, or land on no model key, or on a
        // model key of another shape that nothing else claims (the load reports the mismatch;
        // nothing is loaded into it).
        let lands_right = |s: usize, revised: &str| {
            match intended(&levels, s) {
            Some((_, t)) => revised == tgt_names[t as usize],
            None => {
                revised == src_names[s]
                    || tgt_index.get(revised).is_none_or(|&t| {
                        src.sig[s] != tgt.sig[t]
                            && !matches!(found.target[t], Claim::Mapped { mapping, .. } if levels[mapping as usize].is_some())
                    })
            }
        }
        };
        let wrong: Vec<usize> = (0..src_names.len())
            .filter(|&s| !lands_right(s, &revised[s]))
            .collect();
        if wrong.is_empty() {
            break (compiled, rules);
        }
        let own = |s: usize| intended(&levels, s).map(|(m, _)| m);
        for id in blame(&compiled, &owners, &wrong, &src_names, own, lands_right) {
            bump(&mut levels, id);
        }
    };
    let (compiled, rules) = compiled;
    let mapped: Vec<u32> = (0..src_names.len() as u32)
        .filter(|&s| intended(&levels, s as usize).is_some())
        .collect();
    let evidence = compiled.evidence(&src_names, &mapped, 3);
    let rules = rules
        .into_iter()
        .zip(evidence)
        .map(|((pattern, replacement), (keys, examples))| Rule {
            pattern,
            replacement,
            keys,
            examples,
        })
        .collect();
    let status = |claim: &Claim| match claim {
        Claim::Mapped {
            mapping,
            other,
            same,
        } => match (levels[*mapping as usize], same) {
            (Some(_), true) => Status::Mapped(*other),
            (Some(_), false) => Status::ShapeDiffers(*other),
            (None, _) => Status::Conflict(*other),
        },
        Claim::Ambiguous(others) => Status::Ambiguous(others.clone()),
        Claim::NoCandidate => Status::NoCandidate,
    };
    Suggestion {
        rules,
        source: found.source.iter().map(status).collect(),
        target: found.target.iter().map(status).collect(),
    }
}

#[cfg(test)]
mod tests;
