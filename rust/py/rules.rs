//! `ckptmap.KeyRules`: the Python face of [`crate::rules`].
//!
//! Each rule keeps Python's own compiled pattern beside the native one: it validates the
//! rule at construction (so errors are exactly Python's) and runs the rules or keys the
//! `regex` crate cannot reproduce exactly.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};
use pyo3::{intern, IntoPyObjectExt};
use rayon::prelude::*;

use crate::charset::Ranges;
use crate::dialect::Dialect;
use crate::error::{CoreError, CoreResult};
use crate::exact::Oracle;
use crate::pattern::Perl;
use crate::rules::{self, Engine, Pending, Scratch};

/// Below this many keys, threads cost more than they save.
const PARALLEL_MIN_KEYS: usize = 16_384;

/// An ordered list of `(pattern, replacement)` key rules, compiled once.
///
/// `apply(keys)` gives, for every key, the result of applying each rule in order as
/// Python's `re.sub(pattern, replacement, key)`: all matches, Python template syntax
/// (`\1`, `\g<name>`, `\g<0>`), Python's empty-match rules. Rules the Rust engine can run
/// with exactly Python's semantics run natively with the GIL released; the others (see
/// `native` and `fallback_reasons`) run on Python's `re`. Patterns may be strings or
/// compiled `re.Pattern` objects (their flags are honoured); replacements are strings or
/// callables (callables run on Python's `re`). Invalid patterns and templates raise what
/// `re.sub` raises, at construction. "Python's `re`" is the running interpreter's: where
/// CPython versions differ, so do the results, exactly as `re.sub`'s do.
///
/// Nothing hangs: a native rule never hands a key to `re` (keys its fast form cannot take
/// run its exact form, [`crate::exact`]), and a rule on `re` whose shape lets `re` backtrack
/// exponentially is refused at construction (`ckptmap._backtracking`). A key holding a lone
/// surrogate raises `KeyNotUnicodeError` when it reaches a native rule.
#[pyclass(frozen, module = "ckptmap._core")]
pub struct KeyRules {
    core: rules::KeyRules,
    /// `re.compile(pattern)` per rule.
    compiled: Vec<Py<PyAny>>,
    /// The replacement per rule, as given.
    repls: Vec<Py<PyAny>>,
    /// The pattern per rule, as given (str or re.Pattern).
    patterns: Vec<Py<PyAny>>,
}

/// A key for the apply loop: borrowed from the input, or produced by Python's `re`.
enum Value<'k, 'py> {
    Text(Cow<'k, str>),
    Object(Bound<'py, PyAny>),
}

/// The running interpreter's `re`, asked through `ckptmap._re_tables` (answers cached for the
/// process: one interpreter per process).
struct PyOracle<'py> {
    py: Python<'py>,
    /// The Python exception behind a failed call, to re-raise as it is.
    err: RefCell<Option<PyErr>>,
}

impl<'py> PyOracle<'py> {
    fn new(py: Python<'py>) -> Self {
        Self {
            py,
            err: RefCell::new(None),
        }
    }

    fn ask(
        &self,
        function: &str,
        args: impl IntoPyObjectExt<'py> + pyo3::call::PyCallArgs<'py>,
    ) -> CoreResult<Ranges> {
        let answer = self
            .py
            .import(intern!(self.py, "ckptmap._re_tables"))
            .and_then(|m| m.call_method1(function, args))
            .and_then(|r| r.extract::<Vec<(u32, u32)>>());
        match answer {
            Ok(ranges) => Ok(Ranges::new(ranges)),
            Err(e) => {
                let why = e.to_string();
                *self.err.borrow_mut() = Some(e);
                Err(CoreError::Invalid(why))
            }
        }
    }

    /// A core error from building an exact form, as a Python exception.
    fn error(&self, err: CoreError) -> PyErr {
        match self.err.borrow_mut().take() {
            Some(e) => e,
            None => PyValueError::new_err(format!("internal error in a native key rule: {err}")),
        }
    }
}

fn cached(
    cell: &OnceLock<Arc<Ranges>>,
    make: impl FnOnce() -> CoreResult<Ranges>,
) -> CoreResult<Arc<Ranges>> {
    if let Some(v) = cell.get() {
        return Ok(v.clone());
    }
    let v = Arc::new(make()?);
    Ok(cell.get_or_init(|| v).clone())
}

impl Oracle for PyOracle<'_> {
    fn category(&self, kind: Perl) -> CoreResult<Arc<Ranges>> {
        static CELLS: [OnceLock<Arc<Ranges>>; 3] =
            [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let (cell, name) = match kind {
            Perl::Digit => (&CELLS[0], "digit"),
            Perl::Word => (&CELLS[1], "word"),
            Perl::Space => (&CELLS[2], "space"),
        };
        cached(cell, || self.ask("category", (name,)))
    }

    fn cased(&self) -> CoreResult<Arc<Ranges>> {
        static CELL: OnceLock<Arc<Ranges>> = OnceLock::new();
        cached(&CELL, || self.ask("cased", ()))
    }

    fn icase(&self, source: &str, ascii: bool) -> CoreResult<Ranges> {
        static CACHE: OnceLock<Mutex<HashMap<(String, bool), Ranges>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let key = (source.to_string(), ascii);
        if let Some(v) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(v);
        }
        let v = self.ask("icase", (source, ascii))?;
        if let Ok(mut c) = cache.lock() {
            c.insert(key, v.clone());
        }
        Ok(v)
    }
}

/// `re`'s error for rule `rule` as `ckptmap.errors.InvalidKeyRuleError` (an `re.error` and a
/// `CkptmapError`); any other error unchanged.
fn invalid_rule(py: Python<'_>, rule: usize, err: PyErr) -> PyErr {
    let made = py
        .import(intern!(py, "ckptmap.errors"))
        .and_then(|m| m.getattr(intern!(py, "InvalidKeyRuleError")))
        .and_then(|cls| cls.call_method1(intern!(py, "from_re"), (rule, err.value(py))));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

fn key_not_unicode(py: Python<'_>, index: usize, key: &Bound<'_, PyString>, rule: usize) -> PyErr {
    let made = py
        .import(intern!(py, "ckptmap.errors"))
        .and_then(|m| m.getattr(intern!(py, "KeyNotUnicodeError")))
        .and_then(|cls| cls.call1((index, key, rule)));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

impl KeyRules {
    /// Runs rule `rule` on Python's `re`.
    fn python_sub<'py>(
        &self,
        py: Python<'py>,
        rule: usize,
        key: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.compiled[rule]
            .bind(py)
            .call_method1(intern!(py, "sub"), (self.repls[rule].bind(py), key))
    }

    fn prepare_exact(&self, oracle: &PyOracle<'_>, rule: usize) -> PyResult<()> {
        self.core
            .prepare_exact(rule, Some(oracle))
            .map_err(|e| oracle.error(e))
    }

    /// Finishes a key where its native run stopped: builds an exact form, or runs a rule
    /// on Python's `re`, and goes on natively wherever possible.
    #[allow(clippy::too_many_arguments)]
    fn finish<'k, 'py>(
        &self,
        py: Python<'py>,
        oracle: &PyOracle<'py>,
        scratch: &mut [Option<Scratch>],
        start: Pending<'k>,
        index: usize,
        key: &Bound<'py, PyString>,
    ) -> PyResult<Value<'k, 'py>> {
        let Pending {
            mut value,
            mut rule,
            mut exact,
        } = start;
        loop {
            if exact {
                self.prepare_exact(oracle, rule)?;
            } else {
                let out = self.python_sub(py, rule, &PyString::new(py, &value).into_any())?;
                rule += 1;
                let text = out
                    .cast::<PyString>()
                    .ok()
                    .and_then(|s| s.to_str().ok().map(str::to_owned));
                match text {
                    Some(text) => value = Cow::Owned(text),
                    // Not valid Unicode (lone surrogates): only Python's `re` can take it.
                    None => return self.finish_object(py, oracle, scratch, out, rule, index, key),
                }
            }
            match self.core.run_native(scratch, value, rule) {
                Ok(done) => return Ok(Value::Text(done)),
                Err(p) => {
                    value = p.value;
                    rule = p.rule;
                    exact = p.exact;
                }
            }
        }
    }

    /// Runs rules `from..` on a key that is not valid Unicode: rules on Python's `re` take
    /// it as `re.sub` does; a native rule cannot, unless the key became valid on the way.
    #[allow(clippy::too_many_arguments)]
    fn finish_object<'k, 'py>(
        &self,
        py: Python<'py>,
        oracle: &PyOracle<'py>,
        scratch: &mut [Option<Scratch>],
        mut obj: Bound<'py, PyAny>,
        from: usize,
        index: usize,
        key: &Bound<'py, PyString>,
    ) -> PyResult<Value<'k, 'py>> {
        for rule in from..self.core.len() {
            if let Engine::Python(_) = self.core.engines()[rule] {
                obj = self.python_sub(py, rule, &obj)?;
                continue;
            }
            let text = obj
                .cast::<PyString>()
                .ok()
                .and_then(|s| s.to_str().ok().map(str::to_owned));
            let Some(text) = text else {
                return Err(key_not_unicode(py, index, key, rule));
            };
            return match self.core.run_native(scratch, Cow::Owned(text), rule) {
                Ok(done) => Ok(Value::Text(done)),
                Err(p) => self.finish(py, oracle, scratch, p, index, key),
            };
        }
        Ok(Value::Object(obj))
    }
}

fn extract_keys<'py>(keys: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyString>>> {
    if keys.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "apply() takes a list of keys, not one str (use sub(key) for a single key)",
        ));
    }
    let mut out = Vec::with_capacity(keys.len().unwrap_or(0));
    for (i, key) in keys.try_iter()?.enumerate() {
        let key = key?;
        match key.cast_into::<PyString>() {
            Ok(s) => out.push(s),
            Err(e) => {
                let type_name = e.into_inner().get_type().name()?;
                return Err(PyTypeError::new_err(format!(
                    "key rules apply to str keys; key {i} is a {type_name}"
                )));
            }
        }
    }
    Ok(out)
}

#[pymethods]
impl KeyRules {
    #[new]
    fn new(py: Python<'_>, rules: &Bound<'_, PyAny>) -> PyResult<Self> {
        let re = py.import(intern!(py, "re"))?;
        // The native engine reproduces the `re` of the interpreter it runs in.
        let version = py.version_info();
        let dialect = Dialect::cpython(version.major, version.minor);
        let mut engines = Vec::new();
        let (mut compiled, mut repls, mut patterns) = (Vec::new(), Vec::new(), Vec::new());
        for (i, rule) in rules.try_iter()?.enumerate() {
            let rule = rule?;
            let pair: (Bound<'_, PyAny>, Bound<'_, PyAny>) = rule.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "rule {i} must be a (pattern, replacement) pair, got {}",
                    rule.repr()
                        .map_or_else(|_| "?".to_string(), |r| r.to_string())
                ))
            })?;
            let (pattern, repl) = pair;
            let regex = re
                .call_method1(intern!(py, "compile"), (&pattern,))
                .map_err(|e| invalid_rule(py, i, e))?;
            let source = regex.getattr(intern!(py, "pattern"))?;
            let Ok(source) = source.cast::<PyString>() else {
                return Err(PyTypeError::new_err(format!(
                    "rule {i}: key rules apply to str keys; the pattern is not a str"
                )));
            };
            let flags: u32 = regex.getattr(intern!(py, "flags"))?.extract()?;
            let engine = if let Ok(template) = repl.cast::<PyString>() {
                // Parses the template as re.sub does, raising its errors now.
                regex
                    .call_method1(intern!(py, "sub"), (&repl, ""))
                    .map_err(|e| invalid_rule(py, i, e))?;
                match (source.to_str(), template.to_str()) {
                    (Ok(p), Ok(t)) => Engine::compile_for(p, flags, t, dialect),
                    _ => Engine::Python("pattern or replacement is not valid UTF-8".into()),
                }
            } else if repl.is_callable() {
                Engine::Python("callable replacement".into())
            } else {
                return Err(PyTypeError::new_err(format!(
                    "rule {i}: the replacement must be a str or a callable, got {}",
                    repl.get_type().name()?
                )));
            };
            let engine = match engine {
                // Whether a Unicode \b rule has an exact form depends on this interpreter's
                // tables: build it now, so that `native` never promises what a key breaks.
                Engine::Native(rule) if rule.exact_decides_nativeness() => {
                    let oracle = PyOracle::new(py);
                    match rule.prepare_exact(Some(&oracle)) {
                        Ok(()) => Engine::Native(rule),
                        Err(e) => match oracle.err.borrow_mut().take() {
                            Some(py_err) => return Err(py_err),
                            None => Engine::Python(match e {
                                CoreError::Unsupported(why) | CoreError::Invalid(why) => why,
                            }),
                        },
                    }
                }
                other => other,
            };
            if let Engine::Python(_) = engine {
                // A rule on Python's `re` must not be able to hang on a key.
                py.import(intern!(py, "ckptmap._backtracking"))?
                    .call_method1(intern!(py, "check"), (i, &regex))?;
            }
            engines.push(engine);
            compiled.push(regex.unbind());
            repls.push(repl.unbind());
            patterns.push(pattern.unbind());
        }
        Ok(Self {
            core: rules::KeyRules::new(engines),
            compiled,
            repls,
            patterns,
        })
    }

    /// Applies every rule in order to each key; returns the new keys as a list.
    /// A key that comes out equal to what went in is returned as the same object.
    fn apply<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let keys = extract_keys(keys)?;
        // Borrow the UTF-8 of each key; `None` for strings with lone surrogates.
        let texts: Vec<Option<&str>> = keys.iter().map(|k| k.to_str().ok()).collect();
        let core = &self.core;
        let oracle = PyOracle::new(py);
        // Keys the fast forms cannot take: build the exact forms (once per rule) before leaving
        // the GIL. Keys that only become such keys on the way are finished below.
        let unbuilt: Vec<usize> = (0..core.len())
            .filter(|&r| core.may_need_exact(r))
            .collect();
        if !unbuilt.is_empty()
            && texts
                .iter()
                .flatten()
                .any(|t| !t.is_ascii() || t.ends_with('\n'))
        {
            for rule in unbuilt {
                self.prepare_exact(&oracle, rule)?;
            }
        }
        fn run<'k>(
            core: &rules::KeyRules,
            scratch: &mut [Option<Scratch>],
            text: &Option<&'k str>,
        ) -> Option<Result<Cow<'k, str>, Pending<'k>>> {
            text.map(|t| core.run_native(scratch, Cow::Borrowed(t), 0))
        }
        let native: Vec<_> = py.detach(|| {
            if texts.len() >= PARALLEL_MIN_KEYS {
                texts
                    .par_iter()
                    .map_init(|| core.scratch(), |s, t| run(core, s, t))
                    .collect()
            } else {
                let mut scratch = core.scratch();
                texts.iter().map(|t| run(core, &mut scratch, t)).collect()
            }
        });
        let mut out = Vec::with_capacity(keys.len());
        let mut scratch = self.core.scratch();
        for (index, ((key, text), result)) in keys.iter().zip(&texts).zip(native).enumerate() {
            let value = match result {
                Some(Ok(done)) => Value::Text(done),
                Some(Err(pending)) => {
                    self.finish(py, &oracle, &mut scratch, pending, index, key)?
                }
                None => self.finish_object(
                    py,
                    &oracle,
                    &mut scratch,
                    key.clone().into_any(),
                    0,
                    index,
                    key,
                )?,
            };
            out.push(match value {
                Value::Text(Cow::Borrowed(s)) if text.is_some_and(|t| std::ptr::eq(t, s)) => {
                    key.clone().into_any()
                }
                // Rewritten (or sent through Python's `re`) yet equal: keep the caller's object.
                Value::Text(s) if text.is_some_and(|t| t == s.as_ref()) => key.clone().into_any(),
                Value::Text(s) => PyString::new(py, &s).into_any(),
                Value::Object(obj) if obj.eq(key)? => key.clone().into_any(),
                Value::Object(obj) => obj,
            });
        }
        PyList::new(py, out)
    }

    /// Applies every rule in order to one key.
    fn sub<'py>(&self, py: Python<'py>, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let list = PyList::new(py, [key])?;
        self.apply(py, list.as_any())?.get_item(0)
    }

    /// The rules as given: a list of `(pattern, replacement)` tuples.
    #[getter]
    fn rules<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        self.patterns
            .iter()
            .zip(&self.repls)
            .map(|(p, r)| PyTuple::new(py, [p.bind(py), r.bind(py)]))
            .collect()
    }

    /// For each rule, whether it runs on the Rust engine (`False`: Python's `re`).
    #[getter]
    fn native(&self) -> Vec<bool> {
        self.core
            .engines()
            .iter()
            .map(|e| matches!(e, Engine::Native(_)))
            .collect()
    }

    /// For each rule, why it runs on Python's `re`, or `None` when it runs natively.
    #[getter]
    fn fallback_reasons(&self) -> Vec<Option<String>> {
        self.core
            .engines()
            .iter()
            .map(|e| match e {
                Engine::Native(_) => None,
                Engine::Python(why) => Some(why.clone()),
            })
            .collect()
    }

    /// For each natively run rule, the `regex` crate pattern it was translated to.
    #[getter]
    fn native_patterns(&self) -> Vec<Option<String>> {
        self.core
            .engines()
            .iter()
            .map(|e| match e {
                Engine::Native(rule) => Some(rule.regex().to_string()),
                Engine::Python(_) => None,
            })
            .collect()
    }

    fn __len__(&self) -> usize {
        self.core.len()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let rules = self.rules(py)?.into_bound_py_any(py)?.repr()?;
        Ok(format!("KeyRules({rules})"))
    }

    /// Pickles as the rules it was built from (recompiled on load).
    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let rules = PyList::new(py, self.rules(py)?)?;
        PyTuple::new(
            py,
            [
                py.get_type::<Self>().into_any(),
                PyTuple::new(py, [rules])?.into_any(),
            ],
        )
    }
}
