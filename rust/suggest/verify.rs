//! Running candidate rules over every checkpoint key, exactly as `re.sub` would, and telling
//! which rules changed which key.

use rayon::prelude::*;

use crate::rules::{Engine, KeyRules, Scratch};

/// Below this many keys the rules run on one thread.
const PARALLEL_MIN_KEYS: usize = 1 << 14;

/// Compiled rules; `None` when some rule can not run on the native engine.
pub struct Compiled {
    rules: KeyRules,
}

impl Compiled {
    pub fn new(rules: &[(String, String)]) -> Result<Self, usize> {
        let rules = KeyRules::compile(rules.iter().map(|(p, r)| (p.as_str(), r.as_str())));
        match rules
            .engines()
            .iter()
            .position(|e| matches!(e, Engine::Python(_)))
        {
            Some(bad) => Err(bad),
            None => Ok(Self { rules }),
        }
    }

    fn scratch(&self) -> Vec<Scratch> {
        self.rules
            .engines()
            .iter()
            .filter_map(|e| match e {
                Engine::Native(rule) => Some(rule.scratch()),
                Engine::Python(_) => None,
            })
            .collect()
    }

    /// The key after every rule, and (when `fired` is given) the rules that changed it.
    ///
    /// Only `\d` makes these rules Unicode-dependent, and it means the same (decimal digits)
    /// to Python's `re` and the `regex` crate, so the native engine is exact on every key.
    fn run(&self, scratch: &mut [Scratch], key: &str, fired: Option<&mut Vec<u32>>) -> String {
        self.run_skipping(scratch, key, fired, None)
    }

    fn run_skipping(
        &self,
        scratch: &mut [Scratch],
        key: &str,
        mut fired: Option<&mut Vec<u32>>,
        skip: Option<u32>,
    ) -> String {
        let mut cur = key.to_owned();
        for (r, (engine, s)) in self.rules.engines().iter().zip(scratch).enumerate() {
            if skip == Some(r as u32) {
                continue;
            }
            let Engine::Native(rule) = engine else {
                unreachable!("Compiled::new admits native rules only")
            };
            let next = rule.sub_fast(s, &cur);
            if next != cur.as_str() {
                let next = next.into_owned();
                if let Some(f) = fired.as_deref_mut() {
                    f.push(r as u32);
                }
                cur = next;
            }
        }
        cur
    }

    /// Every key after the rules.
    pub fn apply<S: AsRef<str> + Sync>(&self, keys: &[S]) -> Vec<String> {
        if keys.len() >= PARALLEL_MIN_KEYS {
            keys.par_iter()
                .map_init(|| self.scratch(), |s, k| self.run(s, k.as_ref(), None))
                .collect()
        } else {
            let mut s = self.scratch();
            keys.iter()
                .map(|k| self.run(&mut s, k.as_ref(), None))
                .collect()
        }
    }

    /// The rules that change `key`, in order.
    pub fn fired(&self, key: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.run(&mut self.scratch(), key, Some(&mut out));
        out
    }

    /// `key` after every rule but rule `skip`.
    pub fn run_without(&self, key: &str, skip: u32) -> String {
        self.run_skipping(&mut self.scratch(), key, None, Some(skip))
    }

    /// For each rule, how many of `keys` it changes and the first `examples` of them.
    pub fn evidence<S: AsRef<str> + Sync>(
        &self,
        keys: &[S],
        positions: &[u32],
        examples: usize,
    ) -> Vec<(usize, Vec<u32>)> {
        let n = self.rules.len();
        let count = |scratch: &mut Vec<Scratch>, acc: &mut Vec<(usize, Vec<u32>)>, pos: u32| {
            let mut fired = Vec::new();
            self.run(scratch, keys[pos as usize].as_ref(), Some(&mut fired));
            for r in fired {
                let e = &mut acc[r as usize];
                e.0 += 1;
                if e.1.len() < examples {
                    e.1.push(pos);
                }
            }
        };
        let empty = || vec![(0usize, Vec::new()); n];
        if positions.len() >= PARALLEL_MIN_KEYS {
            positions
                .par_chunks(PARALLEL_MIN_KEYS)
                .map(|chunk| {
                    let (mut s, mut acc) = (self.scratch(), empty());
                    for &p in chunk {
                        count(&mut s, &mut acc, p);
                    }
                    acc
                })
                .collect::<Vec<_>>()
                .into_iter()
                .fold(empty(), |mut total, part| {
                    for (t, p) in total.iter_mut().zip(part) {
                        t.0 += p.0;
                        for e in p.1 {
                            if t.1.len() < examples {
                                t.1.push(e);
                            }
                        }
                    }
                    total
                })
        } else {
            let (mut s, mut acc) = (self.scratch(), empty());
            for &p in positions {
                count(&mut s, &mut acc, p);
            }
            acc
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(pairs: &[(&str, &str)]) -> Compiled {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(p, r)| (p.to_string(), r.to_string()))
            .collect();
        Compiled::new(&owned).unwrap()
    }

    #[test]
    fn applies_in_order_and_names_the_rules_that_fired() {
        let c = rules(&[(r"^module\.", ""), (r"(^|\.)bn(\d+)\.", r"\1norm\2.")]);
        assert_eq!(
            c.apply(&["module.layer1.bn2.weight", "fc.weight"]),
            ["layer1.norm2.weight", "fc.weight"]
        );
        assert_eq!(c.fired("module.bn1.w"), [0, 1]);
        assert_eq!(c.fired("x.w"), Vec::<u32>::new());
        let ev = c.evidence(&["module.a", "b", "module.c"], &[0, 1, 2], 1);
        assert_eq!(ev[0], (2, vec![0]));
        assert_eq!(ev[1], (0, vec![]));
    }

    #[test]
    fn python_only_rules_are_refused() {
        let owned = vec![(r"(?<=a)b".to_string(), "c".to_string())];
        assert_eq!(Compiled::new(&owned).err(), Some(0));
    }
}
