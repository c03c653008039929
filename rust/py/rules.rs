//! `ckptmap.KeyRules`: the Python face of [`crate::rules`].
//!
//! Each rule keeps Python's own compiled pattern beside the native one: it validates the
//! rule at construction (so errors are exactly Python's) and runs the rules or keys the
//! `regex` crate cannot reproduce exactly.

use std::borrow::Cow;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};
use pyo3::{intern, IntoPyObjectExt};
use rayon::prelude::*;

use crate::dialect::Dialect;
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

    /// Finishes a key from rule `rule` on, natively where possible.
    fn finish<'k, 'py>(
        &self,
        py: Python<'py>,
        scratch: &mut [Option<Scratch>],
        mut value: Cow<'k, str>,
        mut rule: usize,
    ) -> PyResult<Value<'k, 'py>> {
        loop {
            let key = PyString::new(py, &value).into_any();
            let out = self.python_sub(py, rule, &key)?;
            rule += 1;
            let Ok(text) = out
                .cast::<PyString>()
                .map_err(PyErr::from)
                .and_then(|s| s.to_cow())
            else {
                // Not representable as UTF-8 (lone surrogates): stay on Python for the rest.
                return self.finish_on_python(py, out, rule);
            };
            match self
                .core
                .run_native(scratch, Cow::Owned(text.into_owned()), rule)
            {
                Ok(done) => return Ok(Value::Text(done)),
                Err(Pending { value: v, rule: r }) => {
                    value = v;
                    rule = r;
                }
            }
        }
    }

    fn finish_on_python<'k, 'py>(
        &self,
        py: Python<'py>,
        mut key: Bound<'py, PyAny>,
        from: usize,
    ) -> PyResult<Value<'k, 'py>> {
        for rule in from..self.core.len() {
            key = self.python_sub(py, rule, &key)?;
        }
        Ok(Value::Object(key))
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
            let regex = re.call_method1(intern!(py, "compile"), (&pattern,))?;
            let source = regex.getattr(intern!(py, "pattern"))?;
            let Ok(source) = source.cast::<PyString>() else {
                return Err(PyTypeError::new_err(format!(
                    "rule {i}: key rules apply to str keys; the pattern is not a str"
                )));
            };
            let flags: u32 = regex.getattr(intern!(py, "flags"))?.extract()?;
            let engine = if let Ok(template) = repl.cast::<PyString>() {
                // Parses the template as re.sub does, raising its errors now.
                regex.call_method1(intern!(py, "sub"), (&repl, ""))?;
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
        for ((key, text), result) in keys.iter().zip(&texts).zip(native) {
            let value = match result {
                Some(Ok(done)) => Value::Text(done),
                Some(Err(Pending { value, rule })) => self.finish(py, &mut scratch, value, rule)?,
                None => self.finish_on_python(py, key.clone().into_any(), 0)?,
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
