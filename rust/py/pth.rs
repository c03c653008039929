//! `ckptmap._core.PthReader`: the Python face of [`crate::pth`].
//!
//! `open` maps the file, validates the archive and runs the pickle with the GIL released.
//! `load` then builds what `torch.load(weights_only=True)` would return: tensors are made
//! from DLPack capsules pointing into a fresh private mapping of the file (or an in-memory
//! copy), each storage record its own storage, so storage sharing is exactly torch's; one
//! Python call per tensor in the common case (a tensor alone in its record), two or three
//! otherwise. The few non-tensor objects that torch's unpickler makes by calling allowlisted
//! callables are made by calling the same objects, passed in by the Python layer
//! (`ckptmap.formats.pth`), which also owns the policy (map_location, fallback).

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::{PyException, PyKeyError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{
    PyByteArray, PyBytes, PyDict, PyFloat, PyFrozenSet, PyList, PySet, PyString, PyTuple,
};
use pyo3::{intern, IntoPyObjectExt};

use crate::pickle::{self, CallKind, DictKind, Global, Node, PyCallable, V};
use crate::pth::{self, ByteOrder, Contents, Opened, Parsed};
use crate::zipfile::Known;

pyo3::create_exception!(
    ckptmap._core,
    PthFormatError,
    PyValueError,
    "A torch zip checkpoint that fails validation.\n\nAttributes: `path` (the file), `kind` \
     (which check failed, e.g. \"storage_size_mismatch\"), `detail` (the specifics)."
);

pyo3::create_exception!(
    ckptmap._core,
    PthUnfetched,
    PyException,
    "Raised by `PthReader.open(path, known=...)` when the parse needs bytes of the file that \
     are not fetched yet.\n\nAttributes: `need` (the `(start, end)` byte ranges to fetch)."
);

pyo3::create_exception!(
    ckptmap._core,
    PthFallback,
    PyException,
    "Raised by `PthReader.load` when an object must be built by torch's own loader instead."
);

/// Deepest nesting of containers that `load` builds (deeper goes to torch).
const MAX_DEPTH: usize = 512;

/// A torch zip checkpoint (`torch.save` since 1.6), validated and parsed, tensor data unread.
///
/// `open(path, allowed)` checks the archive, the pickle and every storage record and tensor
/// bound (`PthFormatError` on failure, the matching `OSError` on I/O errors). Globals beyond
/// the reader's own table resolve through `allowed` (full names, `"numpy.dtype"`). When the
/// pickle needs something the reader does not implement, `fallback_reason` says what, and
/// only torch can load the file. Otherwise the table columns describe every tensor reachable
/// through dicts, lists and tuples, and `load` builds the checkpoint.
#[pyclass(frozen, module = "ckptmap._core")]
pub struct PthReader {
    path: String,
    opened: Opened,
}

/// The objects `load` calls, from the Python layer (attributes of one object).
#[derive(FromPyObject)]
struct Hooks<'py> {
    /// `torch._C._from_dlpack`.
    from_dlpack: Bound<'py, PyAny>,
    /// `torch.empty`.
    empty: Bound<'py, PyAny>,
    /// `torch.nn.Parameter`.
    parameter: Bound<'py, PyAny>,
    /// `torch._utils._set_obj_state`.
    set_obj_state: Bound<'py, PyAny>,
    /// `collections.OrderedDict`.
    ordered_dict: Bound<'py, PyAny>,
    /// `lambda b: int.from_bytes(b, "little", signed=True)`.
    int_from_bytes: Bound<'py, PyAny>,
    /// `(inst, state) -> None`: torch's BUILD for allowlisted objects.
    build: Bound<'py, PyAny>,
    /// `(cls, args) -> obj`: torch's NEWOBJ for allowlisted classes.
    newobj: Bound<'py, PyAny>,
    /// The objects of [`PyCallable::ALL`], in order.
    callables: Vec<Bound<'py, PyAny>>,
    /// The torch dtype of each row of [`pickle::DTYPES`] (None where torch has none).
    dtypes: Vec<Option<Bound<'py, PyAny>>>,
    /// The allowlisted objects, in the order of the names given to `open`.
    allowed: Vec<Bound<'py, PyAny>>,
    /// `(storage, location) -> storage`, as `torch.load`'s restore_location; None keeps the
    /// storages where they are (on the CPU).
    restore: Option<Bound<'py, PyAny>>,
}

/// A part of a path into the checkpoint: a dict key or a list index.
#[derive(FromPyObject)]
enum PathPart {
    Str(String),
    Int(i64),
}

impl PthReader {
    fn parsed(&self) -> Option<&Parsed> {
        match &self.opened.contents {
            Contents::Ready(p) => Some(p),
            Contents::Fallback(_) => None,
        }
    }

    fn ready(&self) -> PyResult<&Parsed> {
        self.parsed().ok_or_else(|| {
            PthFallback::new_err(format!(
                "{}: only torch can load this checkpoint ({})",
                self.path,
                self.fallback_reason().unwrap_or_default()
            ))
        })
    }

    fn table(&self) -> PyResult<(&Parsed, &pth::Table)> {
        let p = self.ready()?;
        match p.table(&self.opened.bytes) {
            Ok(t) => Ok((p, t)),
            Err(reason) => Err(PthFallback::new_err(format!(
                "{}: no tensor table ({reason})",
                self.path
            ))),
        }
    }

    fn fallback_reason(&self) -> Option<String> {
        match &self.opened.contents {
            Contents::Fallback(r) => Some(r.clone()),
            Contents::Ready(_) => None,
        }
    }

    /// The value at `path` (dict keys and list/tuple indices from the root).
    fn value_at(&self, p: &Parsed, path: &[PathPart]) -> Option<V> {
        let pkl = p.pickle_bytes(&self.opened.bytes);
        let pk = &p.pickle;
        let mut v = pk.root();
        for part in path {
            v = match (pk.node(v)?, part) {
                (&Node::Dict(d), part) => pk.dicts[d as usize]
                    .items
                    .iter()
                    .find(|&&(k, _)| match (k, part) {
                        (V::Int(a), PathPart::Int(b)) => a == *b,
                        (V::Node(_), PathPart::Str(s)) => {
                            matches!(pk.node(k), Some(&Node::Str(span)) if span.of(pkl) == s.as_bytes())
                        }
                        _ => false,
                    })?
                    .1,
                (&Node::List(l), PathPart::Int(i)) => {
                    *pk.lists[l as usize].items.get(usize::try_from(*i).ok()?)?
                }
                (&Node::Tuple { start, len }, PathPart::Int(i)) => {
                    *pk.tuple_items(start, len).get(usize::try_from(*i).ok()?)?
                }
                _ => return None,
            };
        }
        Some(v)
    }
}

/// The Python type name of `v` (as `ckptmap.errors` names types), or None where only
/// building it would tell (deferred calls).
fn type_name(p: &Parsed, v: V) -> Option<&'static str> {
    let pk = &p.pickle;
    Some(match v {
        V::None => "NoneType",
        V::Bool(_) => "bool",
        V::Int(_) => "int",
        V::Float(_) => "float",
        V::Node(_) => match pk.node(v)? {
            Node::Str(_) => "str",
            Node::Bytes(_, false) => "bytes",
            Node::Bytes(_, true) => "bytearray",
            Node::BigInt(_) => "int",
            Node::Tuple { .. } => "tuple",
            Node::FrozenSet { .. } => "frozenset",
            Node::List(_) => "list",
            &Node::Dict(d) => match pk.dicts[d as usize].kind {
                DictKind::Dict => "dict",
                DictKind::OrderedDict => "collections.OrderedDict",
            },
            Node::Set(_) => "set",
            Node::Tensor(_) => "torch.Tensor",
            Node::Param(_) => "torch.nn.parameter.Parameter",
            Node::Global(Global::Dtype(_)) => "torch.dtype",
            Node::Global(_) | Node::Storage(_) | Node::Call(_) => return None,
        },
    })
}

#[pymethods]
impl PthReader {
    /// Maps the file at `path` read-only, validates it and runs its pickle; `allowed` names
    /// the globals (`"module.name"`) that resolve to the objects `load` is given.
    ///
    /// `known`: for a remote checkpoint fetched in part into a sparse file of its size, the
    /// `(start, end)` byte ranges fetched so far (the rest is never read). `PthUnfetched`
    /// then names what to fetch before opening again, and `fetch_ranges` what a load needs.
    #[staticmethod]
    #[pyo3(signature = (path, allowed = Vec::new(), known = None))]
    fn open(
        py: Python<'_>,
        path: PathBuf,
        allowed: Vec<String>,
        known: Option<Vec<(u64, u64)>>,
    ) -> PyResult<Self> {
        let ranges = known.map(merged);
        let known = ranges.as_deref().map_or(Known::All, Known::Ranges);
        let opened = py.detach(|| pth::open_known(&path, known, &allowed));
        let opened = match opened {
            Err(pth::ReadError::Unfetched { need, .. }) => {
                let err = PthUnfetched::new_err(format!(
                    "{}: {} byte range(s) must be fetched first",
                    path.display(),
                    need.len()
                ));
                err.value(py).setattr("need", need)?;
                return Err(err);
            }
            other => other?,
        };
        Ok(Self {
            path: path.display().to_string(),
            opened,
        })
    }

    /// The `(start, end)` byte ranges to fetch before table `rows` can be loaded (file order,
    /// none twice): each record not at hand, with its local header when that is not either.
    fn fetch_ranges(&self, rows: Vec<usize>) -> PyResult<Vec<(u64, u64)>> {
        let (p, table) = self.table()?;
        let mut out = Vec::new();
        for r in rows {
            let Some(e) = table.entries.get(r) else {
                return Err(PyValueError::new_err(format!("no table row {r}")));
            };
            let record = &p.records[p.tensors[e.tensor as usize].record as usize];
            out.extend(record.fetch);
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The member names of the zip archive at `path` below its directory, as torch's
    /// `PyTorchFileReader.get_all_records` lists them (`PthFormatError` when the archive
    /// fails the reader's checks).
    #[staticmethod]
    fn records(py: Python<'_>, path: PathBuf) -> PyResult<Vec<String>> {
        Ok(py.detach(|| pth::records(&path))?)
    }

    /// The torch dtype names the reader knows, in the order `load`'s `hooks.dtypes` follows.
    #[staticmethod]
    fn dtype_names() -> Vec<&'static str> {
        pickle::DTYPES.iter().map(|d| d.name).collect()
    }

    /// `(module, name)` of the callables `load`'s `hooks.callables` holds, in order.
    #[staticmethod]
    fn callable_names() -> Vec<(&'static str, &'static str)> {
        PyCallable::ALL.iter().map(|c| c.path()).collect()
    }

    /// The file as given.
    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// The file's size when it was opened.
    #[getter]
    fn file_size(&self) -> usize {
        self.opened.bytes.len()
    }

    /// Why only torch can load this checkpoint (None: this reader can).
    #[getter(fallback_reason)]
    fn py_fallback_reason(&self) -> Option<String> {
        self.fallback_reason()
    }

    /// Why the tensor table is unavailable although the checkpoint loads (None: it is).
    #[getter]
    fn table_error(&self) -> Option<String> {
        self.parsed()
            .and_then(|p| p.table(&self.opened.bytes).as_ref().err().cloned())
    }

    /// `"little"`, `"big"`, or None when the archive has no `byteorder` record.
    #[getter]
    fn byteorder(&self) -> PyResult<Option<&'static str>> {
        Ok(self.ready()?.byteorder.map(|b| match b {
            ByteOrder::Little => "little",
            ByteOrder::Big => "big",
        }))
    }

    /// The archive format version (the `version` record).
    #[getter]
    fn version(&self) -> PyResult<u64> {
        Ok(self.ready()?.version)
    }

    /// The pickle protocol of `data.pkl`.
    #[getter]
    fn protocol(&self) -> PyResult<u8> {
        Ok(self.ready()?.pickle.protocol)
    }

    /// The archive directory (`"archive"`, or the file name torch saved to).
    #[getter]
    fn archive(&self) -> PyResult<String> {
        Ok(self.ready()?.archive.clone())
    }

    /// The distinct locations the storages were saved from (`["cpu"]`).
    #[getter]
    fn locations(&self) -> PyResult<Vec<String>> {
        Ok(self
            .ready()?
            .locations(&self.opened.bytes)
            .into_iter()
            .map(str::to_owned)
            .collect())
    }

    /// How many storage records the pickle uses.
    #[getter]
    fn record_count(&self) -> PyResult<usize> {
        Ok(self.ready()?.records.len())
    }

    /// Dotted names of the tensors reachable through dicts, lists and tuples.
    #[getter]
    fn names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (_, t) = self.table()?;
        PyList::new(py, t.entries.iter().map(|e| t.name(e)))
    }

    /// Torch dtype names (`"bfloat16"`), one per table row.
    #[getter]
    fn dtypes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (p, t) = self.table()?;
        PyList::new(
            py,
            t.entries
                .iter()
                .map(|e| pickle::dtype(p.tensors[e.tensor as usize].dtype).name),
        )
    }

    /// Shapes, one tuple per table row.
    #[getter]
    fn shapes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (p, t) = self.table()?;
        let list = PyList::empty(py);
        for e in &t.entries {
            list.append(PyTuple::new(py, p.shape(e.tensor as usize))?)?;
        }
        Ok(list)
    }

    /// Strides, one tuple per table row.
    #[getter]
    fn strides<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (p, t) = self.table()?;
        let list = PyList::empty(py);
        for e in &t.entries {
            list.append(PyTuple::new(py, p.stride(e.tensor as usize))?)?;
        }
        Ok(list)
    }

    /// Storage offsets (in elements), one per table row.
    #[getter]
    fn storage_offsets<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (p, t) = self.table()?;
        PyList::new(
            py,
            t.entries
                .iter()
                .map(|e| p.tensors[e.tensor as usize].offset),
        )
    }

    /// Storage record keys (`"0"` for `data/0`), one per table row.
    #[getter]
    fn storage_keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (p, t) = self.table()?;
        let bytes = &self.opened.bytes;
        PyList::new(
            py,
            t.entries.iter().map(|e| {
                let rec = &p.records[p.tensors[e.tensor as usize].record as usize];
                p.text(bytes, rec.key)
            }),
        )
    }

    /// `(start, end)` absolute file offsets of the bytes each row's elements span.
    #[getter]
    fn byte_ranges<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (p, t) = self.table()?;
        PyList::new(
            py,
            t.entries.iter().map(|e| {
                let x = &p.tensors[e.tensor as usize];
                (x.start, x.end)
            }),
        )
    }

    /// numel x itemsize, one per table row.
    #[getter]
    fn nbytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (p, t) = self.table()?;
        PyList::new(
            py,
            t.entries
                .iter()
                .map(|e| p.tensors[e.tensor as usize].nbytes),
        )
    }

    /// `requires_grad`, one per table row.
    #[getter]
    fn requires_grad<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (p, t) = self.table()?;
        PyList::new(
            py,
            t.entries.iter().map(|e| match e.param {
                Some(i) => p.pickle.params[i as usize].requires_grad,
                None => p.tensors[e.tensor as usize].requires_grad,
            }),
        )
    }

    /// Whether each row is an `nn.Parameter`.
    #[getter]
    fn parameters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (_, t) = self.table()?;
        PyList::new(py, t.entries.iter().map(|e| e.param.is_some()))
    }

    /// The Python type name of the value at `path` (`[]`: the root; dict keys and list
    /// indices below it), or None where only loading would tell.
    fn value_type(&self, path: Vec<PathPart>) -> PyResult<Option<&'static str>> {
        let p = self.ready()?;
        Ok(self.value_at(p, &path).and_then(|v| type_name(p, v)))
    }

    /// The items of the dict at `path`: `(key, shape, dtype, type name)`, shape and dtype
    /// None for values that are not tensors; None when the value is not a dict.
    fn mapping_items<'py>(
        &self,
        py: Python<'py>,
        path: Vec<PathPart>,
    ) -> PyResult<Option<Bound<'py, PyList>>> {
        let p = self.ready()?;
        let pkl = p.pickle_bytes(&self.opened.bytes);
        let Some(V::Node(n)) = self.value_at(p, &path) else {
            return Ok(None);
        };
        let Some(&Node::Dict(d)) = p.pickle.nodes.get(n as usize) else {
            return Ok(None);
        };
        let out = PyList::empty(py);
        for &(k, v) in &p.pickle.dicts[d as usize].items {
            let key = match (k, p.pickle.node(k)) {
                (V::Int(i), _) => i.into_bound_py_any(py)?,
                (_, Some(&Node::Str(s))) => {
                    PyString::new(py, std::str::from_utf8(s.of(pkl)).unwrap_or_default()).into_any()
                }
                _ => py.None().into_bound(py),
            };
            let tensor = match p.pickle.node(v) {
                Some(&Node::Tensor(t)) => Some(t),
                Some(&Node::Param(i)) => Some(p.pickle.params[i as usize].tensor),
                _ => None,
            };
            let (shape, dtype) = match tensor {
                Some(t) => {
                    let x = &p.tensors[t as usize];
                    (
                        Some(PyTuple::new(py, p.shape(t as usize))?),
                        Some(pickle::dtype(x.dtype).name),
                    )
                }
                None => (None, None),
            };
            out.append((key, shape, dtype, type_name(p, v)))?;
        }
        Ok(Some(out))
    }

    /// Builds the checkpoint (`rows` and `path` None), the value at `path` (dict keys and
    /// list indices from the root), or the tensors of table rows `rows`, from a fresh
    /// private map of the file (`mmap`) or a copy read into memory. With `meta`, tensors are
    /// empty `meta` tensors of their shapes and dtypes and the file's data is not touched.
    /// With `attrs`, only the attributes that BUILD sets on the OrderedDict at `path` (such
    /// as `_metadata`), as a dict (empty for other values).
    ///
    /// Raises `PthFallback` where only torch can build an object (and whatever an
    /// allowlisted callable raises): the caller then loads the file with torch; `KeyError`
    /// when `path` leads nowhere.
    #[pyo3(signature = (hooks, mmap = true, rows = None, path = None, meta = false, attrs = false))]
    // Python keyword arguments with defaults, not a Rust call site to simplify.
    #[allow(clippy::too_many_arguments)]
    fn load<'py>(
        &self,
        py: Python<'py>,
        hooks: Hooks<'py>,
        mmap: bool,
        rows: Option<Vec<usize>>,
        path: Option<Vec<PathPart>>,
        meta: bool,
        attrs: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let p = self.ready()?;
        let expected = self.opened.bytes.len();
        let file = &self.opened.file;
        let file_path = &self.path;
        let (base, owner) = if meta {
            // Never dereferenced: meta tensors have no data.
            let mut none = memmap2::MmapMut::map_anon(1)?;
            (Base(none.as_mut_ptr()), Arc::new(none))
        } else {
            py.detach(|| load_buffer(file, expected, mmap, p, file_path))?
        };
        let bytes: &[u8] = &self.opened.bytes;
        let mut conv = Convert {
            py,
            hooks: &hooks,
            p,
            pkl: p.pickle_bytes(bytes),
            base,
            owner,
            shared: HashMap::with_capacity(p.pickle.shared.len()),
            tensors: vec![None; p.tensors.len()],
            params: vec![None; p.pickle.params.len()],
            storages: vec![None; p.records.len()],
            depth: 0,
            meta,
        };
        if let Some(path) = path {
            let Some(v) = self.value_at(p, &path) else {
                return Err(PyKeyError::new_err(format!(
                    "{}: nothing at that path in the checkpoint",
                    self.path
                )));
            };
            if attrs {
                return conv.attrs(v);
            }
            return Ok(conv.value(v)?.0);
        }
        match rows {
            None => Ok(conv.value(p.pickle.root())?.0),
            Some(rows) => {
                let (_, table) = self.table()?;
                let out = PyList::empty(py);
                for r in rows {
                    let Some(e) = table.entries.get(r) else {
                        return Err(PyValueError::new_err(format!("no table row {r}")));
                    };
                    let v = match e.param {
                        Some(i) => conv.param(i)?,
                        None => conv.tensor(e.tensor)?,
                    };
                    out.append(v)?;
                }
                Ok(out.into_any())
            }
        }
    }

    fn __len__(&self) -> usize {
        self.parsed()
            .and_then(|p| p.table(&self.opened.bytes).as_ref().ok())
            .map_or(0, |t| t.entries.len())
    }

    fn __repr__(&self) -> String {
        match self.parsed() {
            Some(p) => format!(
                "PthReader({:?}, tensors={}, records={})",
                self.path,
                p.tensors.len(),
                p.records.len()
            ),
            None => format!(
                "PthReader({:?}, fallback={:?})",
                self.path,
                self.fallback_reason().unwrap_or_default()
            ),
        }
    }
}

/// `ranges` sorted, with overlapping and touching ones merged (what [`Known::Ranges`] wants).
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|&(s, e)| s < e);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The memory tensors point into: a private copy-on-write map of the file, or a copy.
type Buffer = memmap2::MmapMut;

/// A base pointer that may cross `py.detach` (it points into the buffer its owner keeps).
struct Base(*mut u8);
// SAFETY: the pointer is only dereferenced by torch through tensors that keep `owner` alive.
unsafe impl Send for Base {}

fn load_buffer(
    file: &std::fs::File,
    expected: usize,
    mmap: bool,
    p: &Parsed,
    path: &str,
) -> Result<(Base, Arc<Buffer>), pth::ReadError> {
    let io = |e: &io::Error| pth::ReadError::Io(crate::header::io_error(path, e));
    let len = file.metadata().map_err(|e| io(&e))?.len();
    if len != expected as u64 {
        return Err(pth::ReadError::Invalid {
            path: path.to_owned(),
            kind: pth::PthErrorKind::FileChanged,
            detail: format!(
                "the file has {len} bytes now but had {expected} when it was opened: something \
                 rewrote it"
            ),
        });
    }
    let mut buffer = if expected == 0 {
        memmap2::MmapMut::map_anon(1).map_err(|e| io(&e))?
    } else if mmap {
        // SAFETY: a private (copy-on-write) map: writes through tensors never reach the file.
        // As with torch.load(mmap=True), the file must not be truncated while it is in use.
        unsafe { memmap2::MmapOptions::new().map_copy(file) }.map_err(|e| io(&e))?
    } else {
        let mut anon = memmap2::MmapMut::map_anon(expected).map_err(|e| io(&e))?;
        read_at(file, &mut anon).map_err(|e| io(&e))?;
        anon
    };
    if buffer.len() < expected {
        return Err(pth::ReadError::Invalid {
            path: path.to_owned(),
            kind: pth::PthErrorKind::FileChanged,
            detail: "the file shrank while it was being loaded".to_owned(),
        });
    }
    let native = if cfg!(target_endian = "big") {
        ByteOrder::Big
    } else {
        ByteOrder::Little
    };
    if p.byteorder.is_some_and(|b| b != native) {
        pth::byteswap_records(&mut buffer, &p.records);
    }
    let base = Base(buffer.as_mut_ptr());
    Ok((base, Arc::new(buffer)))
}

fn read_at(file: &std::fs::File, out: &mut [u8]) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(out, 0)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek};
        let mut f = file.try_clone()?;
        f.seek(io::SeekFrom::Start(0))?;
        f.read_exact(out)
    }
}

// --- DLPack ----------------------------------------------------------------------------------

#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// A DLPack tensor with its dimensions and the buffer it keeps alive. `managed` comes
/// first, so a pointer to it is a pointer to the whole.
#[repr(C)]
struct Managed {
    managed: DLManagedTensor,
    dims: Box<[i64]>,
    _owner: Arc<Buffer>,
}

const DLTENSOR: &CStr = c"dltensor";
const KDL_CPU: i32 = 1;

/// Frees a [`Managed`]; torch calls it when the storage dies, from any thread, with or
/// without the GIL: it only drops Rust values.
unsafe extern "C" fn dl_deleter(p: *mut DLManagedTensor) {
    if !p.is_null() {
        // SAFETY: `p` came from Box::into_raw of a Managed (see `dlpack`), freed only once:
        // torch calls the deleter once, or the capsule destructor does when torch never took it.
        drop(unsafe { Box::from_raw(p.cast::<Managed>()) });
    }
}

/// Frees the tensor of a capsule that torch never consumed (torch renames consumed ones).
unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // SAFETY: called by Python with the capsule being destroyed.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, DLTENSOR.as_ptr()) == 1 {
            let p = ffi::PyCapsule_GetPointer(capsule, DLTENSOR.as_ptr()).cast::<DLManagedTensor>();
            dl_deleter(p);
        }
    }
}

/// A CPU tensor of `shape`/`stride` over `data`, owning a reference to `owner`.
fn dlpack<'py>(
    py: Python<'py>,
    from_dlpack: &Bound<'py, PyAny>,
    data: *mut u8,
    owner: &Arc<Buffer>,
    (code, bits): (u8, u8),
    shape: &[u64],
    stride: &[u64],
) -> PyResult<Bound<'py, PyAny>> {
    let n = shape.len();
    // Sizes and strides were checked to fit in i64.
    let mut dims: Box<[i64]> = shape.iter().chain(stride).map(|&d| d as i64).collect();
    let dims_ptr = dims.as_mut_ptr();
    let managed = Box::new(Managed {
        managed: DLManagedTensor {
            dl_tensor: DLTensor {
                data: data.cast(),
                device: DLDevice {
                    device_type: KDL_CPU,
                    device_id: 0,
                },
                ndim: n as i32,
                dtype: DLDataType {
                    code,
                    bits,
                    lanes: 1,
                },
                shape: dims_ptr,
                // SAFETY: dims has 2n elements.
                strides: unsafe { dims_ptr.add(n) },
                byte_offset: 0,
            },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(dl_deleter),
        },
        dims,
        _owner: Arc::clone(owner),
    });
    let raw = Box::into_raw(managed);
    // SAFETY: `raw` is a valid Managed; the capsule owns it until torch consumes it.
    let capsule = unsafe {
        let c = ffi::PyCapsule_New(raw.cast(), DLTENSOR.as_ptr(), Some(capsule_destructor));
        if c.is_null() {
            dl_deleter(raw.cast());
        }
        Bound::from_owned_ptr_or_err(py, c)?
    };
    from_dlpack.call1((capsule,))
}

// --- building the objects ------------------------------------------------------------------

struct Convert<'a, 'py> {
    py: Python<'py>,
    hooks: &'a Hooks<'py>,
    p: &'a Parsed,
    pkl: &'a [u8],
    base: Base,
    owner: Arc<Buffer>,
    /// Built shared nodes (None while being built) and their stamp: the last opcode offset
    /// at which they, or anything they contain, changed (a deferred call must not see
    /// changes made after it). Nodes that are not shared are built once, when met.
    shared: HashMap<u32, Option<(Bound<'py, PyAny>, u32)>>,
    tensors: Vec<Option<Bound<'py, PyAny>>>,
    params: Vec<Option<Bound<'py, PyAny>>>,
    storages: Vec<Option<Bound<'py, PyAny>>>,
    depth: usize,
    /// Build `meta` tensors (shapes and dtypes only).
    meta: bool,
}

fn fallback<T>(reason: impl Into<String>) -> PyResult<T> {
    Err(PthFallback::new_err(reason.into()))
}

impl<'py> Convert<'_, 'py> {
    fn value(&mut self, v: V) -> PyResult<(Bound<'py, PyAny>, u32)> {
        let py = self.py;
        Ok(match v {
            V::None => (py.None().into_bound(py), 0),
            V::Bool(b) => (b.into_bound_py_any(py)?, 0),
            V::Int(i) => (i.into_bound_py_any(py)?, 0),
            V::Float(f) => (PyFloat::new(py, f).into_any(), 0),
            V::Node(n) => {
                let shared = self.p.pickle.is_shared(n);
                if shared {
                    match self.shared.get(&n) {
                        Some(Some(done)) => return Ok(done.clone()),
                        Some(None) => return fallback("a recursive structure"),
                        None => {}
                    }
                    self.shared.insert(n, None);
                }
                if self.depth >= MAX_DEPTH {
                    return fallback(format!("containers nested over {MAX_DEPTH} deep"));
                }
                self.depth += 1;
                let built = self.node(self.p.pickle.nodes[n as usize]);
                self.depth -= 1;
                let built = built?;
                if shared {
                    self.shared.insert(n, Some(built.clone()));
                }
                built
            }
        })
    }

    fn items(&mut self, items: &[V]) -> PyResult<(Vec<Bound<'py, PyAny>>, u32)> {
        let mut out = Vec::with_capacity(items.len());
        let mut stamp = 0;
        for &v in items {
            let (o, s) = self.value(v)?;
            out.push(o);
            stamp = stamp.max(s);
        }
        Ok((out, stamp))
    }

    /// A str from the pickle's UTF-8 bytes (decoded by Python, which checks them again:
    /// the file could have changed since it was parsed).
    fn str(&self, span: pickle::Span) -> PyResult<Bound<'py, PyAny>> {
        let bytes = span.of(self.pkl);
        // SAFETY: a valid pointer and length; PyUnicode_DecodeUTF8 returns a new reference
        // or NULL with an exception set, which from_owned_ptr_or_err turns into PyErr.
        unsafe {
            let obj = ffi::PyUnicode_DecodeUTF8(
                bytes.as_ptr().cast(),
                bytes.len() as ffi::Py_ssize_t,
                c"strict".as_ptr(),
            );
            Bound::from_owned_ptr_or_err(self.py, obj)
        }
    }

    fn node(&mut self, node: Node) -> PyResult<(Bound<'py, PyAny>, u32)> {
        let py = self.py;
        let pk = &self.p.pickle;
        Ok(match node {
            Node::Str(s) => (self.str(s)?, 0),
            Node::Bytes(s, false) => (PyBytes::new(py, s.of(self.pkl)).into_any(), 0),
            Node::Bytes(s, true) => (PyByteArray::new(py, s.of(self.pkl)).into_any(), 0),
            Node::BigInt(s) => {
                let b = PyBytes::new(py, s.of(self.pkl));
                (self.hooks.int_from_bytes.call1((b,))?, 0)
            }
            Node::Tuple { start, len } => {
                let (items, stamp) = self.items(pk.tuple_items(start, len))?;
                (PyTuple::new(py, items)?.into_any(), stamp)
            }
            Node::FrozenSet { start, len } => {
                let (items, stamp) = self.items(pk.tuple_items(start, len))?;
                (PyFrozenSet::new(py, items)?.into_any(), stamp)
            }
            Node::List(l) => {
                let list = &pk.lists[l as usize];
                let (items, stamp) = self.items(&list.items)?;
                (PyList::new(py, items)?.into_any(), stamp.max(list.changed))
            }
            Node::Set(s) => {
                let set = &pk.sets[s as usize];
                let (items, stamp) = self.items(&set.items)?;
                (PySet::new(py, items)?.into_any(), stamp.max(set.changed))
            }
            Node::Dict(d) => self.dict(d)?,
            Node::Global(g) => (self.global(g)?, 0),
            Node::Storage(_) => return fallback("a storage outside a tensor"),
            Node::Tensor(t) => (self.tensor(t)?, 0),
            Node::Param(i) => (self.param(i)?, pk.params[i as usize].at),
            Node::Call(c) => self.call(c)?,
        })
    }

    fn dict(&mut self, d: u32) -> PyResult<(Bound<'py, PyAny>, u32)> {
        let py = self.py;
        let dict = &self.p.pickle.dicts[d as usize];
        let mut stamp = dict.changed;
        let obj = match dict.kind {
            DictKind::Dict => {
                let out = PyDict::new(py);
                for &(k, v) in &dict.items {
                    let (k, ks) = self.value(k)?;
                    let (v, vs) = self.value(v)?;
                    stamp = stamp.max(ks).max(vs);
                    out.set_item(k, v)?;
                }
                out.into_any()
            }
            DictKind::OrderedDict => {
                let out = self.hooks.ordered_dict.call0()?;
                for &(k, v) in &dict.items {
                    let (k, ks) = self.value(k)?;
                    let (v, vs) = self.value(v)?;
                    stamp = stamp.max(ks).max(vs);
                    out.set_item(k, v)?;
                }
                for &(state, at) in &dict.attrs {
                    let (state, s) = self.value(state)?;
                    if s > at {
                        return fallback("an OrderedDict state changed after its BUILD");
                    }
                    stamp = stamp.max(s);
                    out.getattr(intern!(py, "__dict__"))?
                        .call_method1(intern!(py, "update"), (state,))?;
                }
                out
            }
        };
        Ok((obj, stamp))
    }

    /// The attributes BUILD sets on `v` when it is an OrderedDict, merged into one dict.
    fn attrs(&mut self, v: V) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let out = PyDict::new(py);
        if let Some(&Node::Dict(d)) = self.p.pickle.node(v) {
            let dict = &self.p.pickle.dicts[d as usize];
            if dict.kind == DictKind::OrderedDict {
                for &(state, at) in &dict.attrs {
                    let (state, s) = self.value(state)?;
                    if s > at {
                        return fallback("an OrderedDict state changed after its BUILD");
                    }
                    out.call_method1(intern!(py, "update"), (state,))?;
                }
            }
        }
        Ok(out.into_any())
    }

    fn global(&self, g: Global) -> PyResult<Bound<'py, PyAny>> {
        let h = self.hooks;
        match g {
            Global::OrderedDict => Ok(h.ordered_dict.clone()),
            Global::Dtype(d) => match h.dtypes.get(usize::from(d)) {
                Some(Some(obj)) => Ok(obj.clone()),
                _ => fallback(format!(
                    "torch.{} is not a dtype of this torch",
                    pickle::dtype(d).name
                )),
            },
            Global::Py(c) => {
                let i = PyCallable::ALL.iter().position(|&x| x == c).unwrap_or(0);
                Ok(h.callables[i].clone())
            }
            Global::User(i) => match h.allowed.get(i as usize) {
                Some(obj) => Ok(obj.clone()),
                None => fallback("an allowlist entry that was not passed to load"),
            },
            _ => fallback("a storage type or rebuild function used as a value"),
        }
    }

    fn call(&mut self, c: u32) -> PyResult<(Bound<'py, PyAny>, u32)> {
        let call = &self.p.pickle.calls[c as usize];
        let func = self.global(call.func)?;
        let (args, stamp) = self.value(V::Node(call.args))?;
        if stamp > call.at {
            return fallback("the arguments of a call changed after the call");
        }
        let obj = match call.kind {
            CallKind::Reduce => func.call1(args.cast_into::<PyTuple>()?)?,
            CallKind::NewObj => self.hooks.newobj.call1((func, args))?,
        };
        let mut stamp = call.at;
        for &(state, at) in &call.builds {
            let (state, s) = self.value(state)?;
            if s > at {
                return fallback("a BUILD state changed after the BUILD");
            }
            self.hooks.build.call1((&obj, state))?;
            stamp = stamp.max(at);
        }
        Ok((obj, stamp))
    }

    fn param(&mut self, i: u32) -> PyResult<Bound<'py, PyAny>> {
        if let Some(x) = &self.params[i as usize] {
            return Ok(x.clone());
        }
        let built = self.new_param(i)?;
        self.params[i as usize] = Some(built.clone());
        Ok(built)
    }

    fn new_param(&mut self, i: u32) -> PyResult<Bound<'py, PyAny>> {
        let def = self.p.pickle.params[i as usize];
        let data = self.tensor(def.tensor)?;
        let param = self.hooks.parameter.call1((data, def.requires_grad))?;
        if let Some(state) = def.state {
            let (state, s) = self.value(state)?;
            if s > def.at {
                return fallback("a Parameter state changed after the Parameter");
            }
            return self.hooks.set_obj_state.call1((param, state));
        }
        Ok(param)
    }

    fn storage(&mut self, r: u32) -> PyResult<Bound<'py, PyAny>> {
        if let Some(s) = &self.storages[r as usize] {
            return Ok(s.clone());
        }
        let rec = &self.p.records[r as usize];
        if let Some((start, end)) = rec.fetch {
            return Err(PyValueError::new_err(format!(
                "storage record {:?} is not fetched yet (bytes {start}..{end}): fetch \
                 `fetch_ranges(rows)` and open the file again",
                String::from_utf8_lossy(rec.key.of(self.pkl))
            )));
        }
        // SAFETY: the record lies inside the buffer (checked at parse, size checked at load).
        let data = unsafe { self.base.0.add(rec.start as usize) };
        let bytes = dlpack(
            self.py,
            &self.hooks.from_dlpack,
            data,
            &self.owner,
            (1, 8),
            &[rec.size],
            &[1],
        )?;
        let mut storage = bytes.call_method0(intern!(self.py, "untyped_storage"))?;
        if let Some(restore) = &self.hooks.restore {
            let location = std::str::from_utf8(rec.location.of(self.pkl)).unwrap_or("cpu");
            storage = restore.call1((storage, location))?;
        }
        self.storages[r as usize] = Some(storage.clone());
        Ok(storage)
    }

    /// An empty `meta` tensor of tensor `t`'s shape and dtype (its `requires_grad` kept).
    fn meta_tensor(&self, t: u32) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let def = &self.p.tensors[t as usize];
        let Some(Some(dtype)) = self.hooks.dtypes.get(usize::from(def.dtype)) else {
            let name = pickle::dtype(def.dtype).name;
            return fallback(format!("torch.{name} is not a dtype of this torch"));
        };
        let kwargs = PyDict::new(py);
        kwargs.set_item(intern!(py, "dtype"), dtype)?;
        kwargs.set_item(intern!(py, "device"), intern!(py, "meta"))?;
        let shape = PyTuple::new(py, self.p.shape(t as usize))?;
        let obj = self.hooks.empty.call((shape,), Some(&kwargs))?;
        if def.requires_grad {
            obj.call_method1(intern!(py, "requires_grad_"), (true,))?;
        }
        Ok(obj)
    }

    fn tensor(&mut self, t: u32) -> PyResult<Bound<'py, PyAny>> {
        if let Some(x) = &self.tensors[t as usize] {
            return Ok(x.clone());
        }
        let py = self.py;
        let def = &self.p.tensors[t as usize];
        let rec = &self.p.records[def.record as usize];
        let info = pickle::dtype(def.dtype);
        if self.meta {
            let obj = self.meta_tensor(t)?;
            self.tensors[t as usize] = Some(obj.clone());
            return Ok(obj);
        }
        let alone = rec.tensors == 1 && def.offset == 0 && def.span == rec.size;
        let obj = match info.dlpack {
            Some(code) if alone && self.hooks.restore.is_none() => {
                // SAFETY: as in `storage`.
                let data = unsafe { self.base.0.add(rec.start as usize) };
                dlpack(
                    py,
                    &self.hooks.from_dlpack,
                    data,
                    &self.owner,
                    code,
                    self.p.shape(t as usize),
                    self.p.stride(t as usize),
                )?
            }
            _ => {
                let storage = self.storage(def.record)?;
                let Some(Some(dtype)) = self.hooks.dtypes.get(usize::from(def.dtype)) else {
                    return fallback(format!("torch.{} is not a dtype of this torch", info.name));
                };
                let kwargs = PyDict::new(py);
                kwargs.set_item(intern!(py, "dtype"), dtype)?;
                kwargs.set_item(
                    intern!(py, "device"),
                    storage.getattr(intern!(py, "device"))?,
                )?;
                let empty = self.hooks.empty.call(((0,),), Some(&kwargs))?;
                empty.call_method1(
                    intern!(py, "set_"),
                    (
                        storage,
                        def.offset,
                        PyTuple::new(py, self.p.shape(t as usize))?,
                        PyTuple::new(py, self.p.stride(t as usize))?,
                    ),
                )?
            }
        };
        if def.requires_grad {
            obj.call_method1(intern!(py, "requires_grad_"), (true,))?;
        }
        self.tensors[t as usize] = Some(obj.clone());
        Ok(obj)
    }
}
