//! The Python face of [`crate::index`]: prefix filter, grouping by owning module, diff and
//! collisions over key lists.
//!
//! Each function takes strong references to the key strings and borrows their UTF-8 buffers
//! (Python strings are immutable, and the references keep them alive even if the caller's
//! list changes meanwhile), runs the core with the GIL released, and builds its result once,
//! handing back the caller's own string objects wherever a key is returned unchanged.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use crate::index;

/// The keys of one argument: the strings themselves, then views of their UTF-8 text.
struct Keys<'py> {
    objects: Vec<Bound<'py, PyString>>,
}

impl<'py> Keys<'py> {
    /// Takes a sequence of `str`; `what` names the argument in error messages.
    fn extract(arg: &Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
        if arg.is_instance_of::<PyString>() || arg.is_instance_of::<PyBytes>() {
            return Err(PyTypeError::new_err(format!(
                "{what} must be a sequence of str, not {}",
                arg.get_type().name()?
            )));
        }
        let mut objects = Vec::with_capacity(arg.len().unwrap_or(0));
        let mut push = |i: usize, item: Bound<'py, PyAny>| -> PyResult<()> {
            match item.cast_into::<PyString>() {
                Ok(s) => {
                    objects.push(s);
                    Ok(())
                }
                Err(e) => Err(PyTypeError::new_err(format!(
                    "{what}[{i}] must be str, not {}",
                    e.into_inner().get_type().name()?
                ))),
            }
        };
        if let Ok(list) = arg.cast::<PyList>() {
            for (i, item) in list.iter().enumerate() {
                push(i, item)?;
            }
        } else if let Ok(tuple) = arg.cast::<PyTuple>() {
            for (i, item) in tuple.iter().enumerate() {
                push(i, item)?;
            }
        } else {
            for (i, item) in arg.try_iter()?.enumerate() {
                push(i, item?)?;
            }
        }
        Ok(Self { objects })
    }

    /// The UTF-8 text of every key, borrowed from the strings.
    fn views(&self, what: &str) -> PyResult<Vec<&str>> {
        self.objects
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.to_str().map_err(|cause| {
                    let err = PyValueError::new_err(format!(
                        "{what}[{i}] is not valid UTF-8 text (a lone surrogate?)"
                    ));
                    err.set_cause(s.py(), Some(cause));
                    err
                })
            })
            .collect()
    }

    /// The caller's string objects at `positions`, as a new list.
    fn pick(&self, py: Python<'py>, positions: &[usize]) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, positions.iter().map(|&i| &self.objects[i]))
    }
}

/// Keeps Python's cyclic garbage collector off while a result is built, then restores it.
///
/// Every new list is a tracked container, and with torch's large heap alive the collections
/// that a million allocations trigger cost ten times the allocations themselves. Lists of
/// ints form no cycles, and no Python code runs while the guard lives (the GIL is held
/// throughout), so nothing can observe the pause.
struct GcPause<'py> {
    _py: Python<'py>,
    was_enabled: bool,
}

impl<'py> GcPause<'py> {
    fn new(py: Python<'py>) -> Self {
        // SAFETY: called with the GIL held (the `Python` token proves it).
        let was_enabled = unsafe { pyo3::ffi::PyGC_Disable() } == 1;
        Self {
            _py: py,
            was_enabled,
        }
    }
}

impl Drop for GcPause<'_> {
    fn drop(&mut self) {
        if self.was_enabled {
            // SAFETY: the guard cannot outlive the GIL it was created under.
            unsafe { pyo3::ffi::PyGC_Enable() };
        }
    }
}

/// Lists of positions, one per group, as a list of lists of int.
fn groups_to_list<'a, 'py>(
    py: Python<'py>,
    groups: impl ExactSizeIterator<Item = &'a [usize]>,
) -> PyResult<Bound<'py, PyList>> {
    let _pause = GcPause::new(py);
    let lists = groups
        .map(|g| PyList::new(py, g))
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, lists)
}

/// Keeps the keys under `prefix`, optionally stripping it.
///
/// As in mmengine's `_load_checkpoint_with_prefix`, a non-empty prefix that does not end in
/// "." gets one appended: "backbone" keeps "backbone.x" but neither "backbone2.x" nor
/// "backbone" itself. The empty prefix keeps every key.
///
/// Returns `(positions, names)`: the positions of the kept keys in input order and their
/// names (the key minus the prefix when `strip` is true, the key itself otherwise). Raises
/// TypeError for a key that is not a str, naming its position.
#[pyfunction]
#[pyo3(signature = (keys, prefix, strip = true))]
pub fn filter_prefix_keys<'py>(
    py: Python<'py>,
    keys: &Bound<'py, PyAny>,
    prefix: &str,
    strip: bool,
) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
    let keys = Keys::extract(keys, "keys")?;
    let views = keys.views("keys")?;
    let kept = py.detach(|| index::filter_prefix(&views, prefix, strip));
    let names = if strip && !prefix.is_empty() {
        PyList::new(py, kept.names.iter().map(|name| PyString::new(py, name)))?
    } else {
        // Unchanged names: hand back the caller's own strings.
        keys.pick(py, &kept.indices)?
    };
    Ok((PyList::new(py, &kept.indices)?, names))
}

/// Groups key positions by the module that owns each key.
///
/// `module_paths` are paths as `torch.nn.Module.named_modules()` yields them ("" for the
/// root, "layer1", "layer1.0", ...). A module owns a key when `key == path + "." + rest`; the
/// root owns every key; each key goes to its deepest owner, found by hashing the key's dotted
/// prefixes, so the cost is linear in the number of keys. A path listed twice counts at its
/// first position.
///
/// Returns one list of key positions (ascending) per module path, in the order of
/// `module_paths`, then one last list with the keys that no module owns (only possible when ""
/// is not among the paths). Raises TypeError for a key or path that is not a str.
#[pyfunction]
pub fn group_by_owner<'py>(
    py: Python<'py>,
    keys: &Bound<'py, PyAny>,
    module_paths: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyList>> {
    let keys = Keys::extract(keys, "keys")?;
    let paths = Keys::extract(module_paths, "module_paths")?;
    let (key_views, path_views) = (keys.views("keys")?, paths.views("module_paths")?);
    let grouping = py.detach(|| index::group_by_owner(&key_views, &path_views));
    groups_to_list(py, grouping.iter())
}

/// Compares source keys (a checkpoint's) with expected keys (a model's).
///
/// Returns `(missing, unexpected)`: the expected keys absent from `source`, in `expected`
/// order, and the source keys absent from `expected`, in `source` order. A key listed several
/// times is reported once, at its first position. Raises TypeError for a key that is not a str.
#[pyfunction]
pub fn diff_keys<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    expected: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
    let source = Keys::extract(source, "source")?;
    let expected = Keys::extract(expected, "expected")?;
    let (source_views, expected_views) = (source.views("source")?, expected.views("expected")?);
    let diff = py.detach(|| index::diff(&source_views, &expected_views));
    Ok((
        expected.pick(py, &diff.missing)?,
        source.pick(py, &diff.unexpected)?,
    ))
}

/// Finds keys that occur more than once, such as several checkpoint keys that rules revised
/// to one name.
///
/// Returns one list of positions (ascending) per repeated key, ordered by the key's first
/// occurrence; keys that occur once appear in no list. Raises TypeError for a key that is not
/// a str.
#[pyfunction]
pub fn find_collisions<'py>(
    py: Python<'py>,
    keys: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyList>> {
    let keys = Keys::extract(keys, "keys")?;
    let views = keys.views("keys")?;
    let groups = py.detach(|| index::collisions(&views));
    groups_to_list(py, groups.iter().map(Vec::as_slice))
}
