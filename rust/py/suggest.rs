//! The Python face of [`crate::suggest`]: infer key rules from two tensor tables.
//!
//! The tables are extracted into owned Rust data, the inference runs with the GIL released,
//! and the result comes back as plain lists (statuses as one byte per key) so that a
//! million keys cost a few list allocations, not a million Python objects.

use std::collections::BTreeMap;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};

use crate::suggest::{self, Entry, Status};

/// One side's entries, owned.
struct Table {
    names: Vec<String>,
    shapes: Vec<Option<Vec<u64>>>,
    dtypes: Vec<Option<String>>,
}

impl Table {
    /// Takes an iterable of `(name, shape or None, dtype or None)`.
    fn extract(arg: &Bound<'_, PyAny>, what: &str) -> PyResult<Self> {
        if arg.is_instance_of::<PyString>() || arg.is_instance_of::<PyBytes>() {
            return Err(PyTypeError::new_err(format!(
                "{what} must be an iterable of (name, shape, dtype) tuples"
            )));
        }
        let mut table = Table {
            names: Vec::new(),
            shapes: Vec::new(),
            dtypes: Vec::new(),
        };
        for (i, item) in arg.try_iter()?.enumerate() {
            let item = item?;
            let (name, shape, dtype): (String, Option<Vec<u64>>, Option<String>) =
                item.extract().map_err(|_| {
                    PyTypeError::new_err(format!(
                        "{what}[{i}] must be a (name: str, shape: tuple of int >= 0 or None, \
                         dtype: str or None) tuple"
                    ))
                })?;
            table.names.push(name);
            table.shapes.push(shape);
            table.dtypes.push(dtype);
        }
        Ok(table)
    }

    fn entries(&self) -> Vec<Entry<'_>> {
        (0..self.names.len())
            .map(|i| Entry {
                name: &self.names[i],
                shape: self.shapes[i].as_deref(),
                dtype: self.dtypes[i].as_deref(),
            })
            .collect()
    }
}

/// Statuses as `(codes, others, candidates)`: one byte per key (`m` mapped, `s` shape
/// differs, `a` ambiguous, `n` no candidate, `c` conflict), the counterpart's position (-1 if
/// none) and, for ambiguous keys, the positions of the candidates.
type Statuses<'py> = (Bound<'py, PyBytes>, Vec<i64>, BTreeMap<usize, Vec<u32>>);

fn statuses<'py>(py: Python<'py>, all: &[Status]) -> Statuses<'py> {
    let mut codes = Vec::with_capacity(all.len());
    let mut others = Vec::with_capacity(all.len());
    let mut ambiguous = BTreeMap::new();
    for (i, status) in all.iter().enumerate() {
        let (code, other) = match status {
            Status::Mapped(o) => (b'm', i64::from(*o)),
            Status::ShapeDiffers(o) => (b's', i64::from(*o)),
            Status::Conflict(o) => (b'c', i64::from(*o)),
            Status::Ambiguous(cands) => {
                ambiguous.insert(i, cands.clone());
                (b'a', -1)
            }
            Status::NoCandidate => (b'n', -1),
        };
        codes.push(code);
        others.push(other);
    }
    (PyBytes::new(py, &codes), others, ambiguous)
}

/// Infers `(pattern, replacement)` rules, applied in order as `re.sub`, that rename the
/// `source` keys (a checkpoint's) onto the `target` keys (a model's).
///
/// Each side is an iterable of `(name, shape, dtype)`; `shape` and `dtype` may be None for
/// entries that are not tensors. Returns `(rules, source, target)`: `rules` a list of
/// `(pattern, replacement, keys, examples)` (how many checkpoint keys the rule changes on
/// their way to their model key, and the positions of the first few), `source` and
/// `target` the statuses of each side's keys as `(codes, others, candidates)`: one byte per
/// key (`m` mapped, `s` shape differs, `a` ambiguous, `n` no candidate, `c` conflict), the
/// counterpart's position (-1 if none) and, for ambiguous keys, the candidates' positions.
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn suggest_rules<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    target: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyList>, Statuses<'py>, Statuses<'py>)> {
    let source = Table::extract(source, "source")?;
    let target = Table::extract(target, "target")?;
    let found = py.detach(|| suggest::suggest(&source.entries(), &target.entries()));
    let rules = PyList::new(
        py,
        found
            .rules
            .into_iter()
            .map(|r| (r.pattern, r.replacement, r.keys, r.examples)),
    )?;
    Ok((
        rules,
        statuses(py, &found.source),
        statuses(py, &found.target),
    ))
}
