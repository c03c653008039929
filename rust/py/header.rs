//! `ckptmap._core.SafetensorsHeader`: the Python face of [`crate::header`].
//!
//! The file is mapped and its header validated with the GIL released; the Python lists are
//! built from the parsed header on request. Tensor data is never read here: the Python layer
//! (`ckptmap.formats.safetensors`) maps the data and builds tensors from the byte ranges.

use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::header::{self, Header};

pyo3::create_exception!(
    ckptmap._core,
    SafetensorsHeaderError,
    PyValueError,
    "A safetensors header that fails validation.\n\nAttributes: `path` (the file), `kind` (which \
     check failed, e.g. \"header_too_large\"), `detail` (the specifics)."
);

/// A validated safetensors header: every tensor's name, dtype, shape and byte range.
///
/// Made by `open(path)`, `from_fd(fd, path)` or `parse(data)`, which map (or borrow) the file,
/// or by `from_header(header, file_size)` for a header read apart from its file (by byte
/// range); each checks the whole header before trusting any offset: a size cap, UTF-8 JSON, known dtypes,
/// checked sizes, byte ranges that match their shapes and tile the data section exactly, and
/// no name twice. Failures raise `SafetensorsHeaderError` (a `ValueError`) with a `kind`;
/// I/O failures raise the matching `OSError` subclass. Lists are in file (JSON) order.
#[pyclass(frozen, module = "ckptmap._core")]
pub struct SafetensorsHeader {
    header: Header,
    path: String,
}

#[pymethods]
impl SafetensorsHeader {
    /// Maps the file at `path` read-only and validates its header.
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let header = py.detach(|| header::read_path(&path))?;
        Ok(Self {
            header,
            path: path.display().to_string(),
        })
    }

    /// Maps the open file descriptor `fd` (duplicated, never closed) and validates its
    /// header; `path` names the file in messages.
    #[cfg(unix)]
    #[staticmethod]
    fn from_fd(py: Python<'_>, fd: i32, path: PathBuf) -> PyResult<Self> {
        use std::os::fd::BorrowedFd;
        let shown = path.display().to_string();
        if fd < 0 {
            return Err(PyValueError::new_err(format!(
                "{shown}: invalid file descriptor {fd}"
            )));
        }
        // SAFETY: the caller passes an open descriptor and keeps it open for this call; it is
        // duplicated at once and only the duplicate is used.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let owned = borrowed
            .try_clone_to_owned()
            .map_err(|e| header::io_error(&shown, &e))?;
        let file = std::fs::File::from(owned);
        let header = py.detach(|| header::read_file(&file, &shown))?;
        Ok(Self {
            header,
            path: shown,
        })
    }

    /// Validates the header of a whole safetensors file held in `data`.
    #[staticmethod]
    #[pyo3(signature = (data, path = "<bytes>"), text_signature = "(data, path='<bytes>')")]
    fn parse(py: Python<'_>, data: &[u8], path: &str) -> PyResult<Self> {
        let header = py.detach(|| header::parse(data)).map_err(|e| e.at(path))?;
        Ok(Self {
            header,
            path: path.to_owned(),
        })
    }

    /// The header length that a safetensors file's first 8 bytes give (`prefix`, exactly 8
    /// bytes), checked against the size of the whole file (`file_size`): not 0, not over the
    /// cap, not past the end. With `from_header`, the way to read a header by byte range: these
    /// 8 bytes, then the header. `path` names the file in messages.
    #[staticmethod]
    #[pyo3(
        signature = (prefix, file_size, path = "<bytes>"),
        text_signature = "(prefix, file_size, path='<bytes>')"
    )]
    fn header_length(prefix: &[u8], file_size: u64, path: &str) -> PyResult<u64> {
        let prefix: [u8; 8] = prefix.try_into().map_err(|_| {
            PyValueError::new_err(format!(
                "{path}: the header length prefix is 8 bytes, got {}",
                prefix.len()
            ))
        })?;
        Ok(header::header_len_of(prefix, file_size).map_err(|e| e.at(path))?)
    }

    /// Validates a header from its JSON bytes alone (the `header_length` bytes after the
    /// 8-byte prefix) for a file of `file_size` bytes whose data section is not at hand: every
    /// check of `parse`, the byte ranges measured against the data section that `file_size`
    /// implies. `path` names the file (or URI) in messages.
    #[staticmethod]
    #[pyo3(
        signature = (header, file_size, path = "<bytes>"),
        text_signature = "(header, file_size, path='<bytes>')"
    )]
    fn from_header(py: Python<'_>, header: &[u8], file_size: u64, path: &str) -> PyResult<Self> {
        let parsed = py
            .detach(|| header::parse_header(header, file_size))
            .map_err(|e| e.at(path))?;
        Ok(Self {
            header: parsed,
            path: path.to_owned(),
        })
    }

    /// The file this header was read from (as given).
    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// Tensor names, in file order.
    #[getter]
    fn names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.header.tensors.iter().map(|t| t.name.as_str()))
    }

    /// Torch-style dtype names (`"bfloat16"`, `"float8_e4m3fn"`), one per tensor. The
    /// sub-byte floats are named `"float4_e2m1fn"`, `"float6_e2m3fn"`, `"float6_e3m2fn"`.
    #[getter]
    fn dtypes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.header.tensors.iter().map(|t| t.dtype.torch_name()))
    }

    /// Dtypes as the header spells them (`"BF16"`), one per tensor.
    #[getter]
    fn safetensors_dtypes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.header.tensors.iter().map(|t| t.dtype.name()))
    }

    /// Shapes as tuples of ints, one per tensor.
    #[getter]
    fn shapes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for t in &self.header.tensors {
            list.append(PyTuple::new(py, &t.shape)?)?;
        }
        Ok(list)
    }

    /// `(start, end)` absolute file offsets of each tensor's bytes.
    #[getter]
    fn byte_ranges<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let base = self.header.data_offset();
        // Validated: base + end <= file size, so these additions cannot overflow.
        PyList::new(
            py,
            self.header
                .tensors
                .iter()
                .map(|t| (base + t.begin, base + t.end)),
        )
    }

    /// `__metadata__` as a dict of str, or None when the header has none (or `null`).
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(items) = &self.header.metadata else {
            return Ok(None);
        };
        let dict = PyDict::new(py);
        for (k, v) in items {
            dict.set_item(k, v)?;
        }
        Ok(Some(dict))
    }

    /// Where the data section starts in the file (8 + header length).
    #[getter]
    fn data_offset(&self) -> u64 {
        self.header.data_offset()
    }

    /// The header's JSON length in bytes, as the file's first 8 bytes give it.
    #[getter]
    fn header_len(&self) -> u64 {
        self.header.header_len
    }

    /// The size of the file when it was read.
    #[getter]
    fn file_size(&self) -> u64 {
        self.header.file_size
    }

    fn __len__(&self) -> usize {
        self.header.tensors.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "SafetensorsHeader({:?}, tensors={}, file_size={})",
            self.path,
            self.header.tensors.len(),
            self.header.file_size
        )
    }
}
