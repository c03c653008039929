//! The one place where core errors become Python exceptions.

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::PyErr;

use super::header::SafetensorsHeaderError;
use super::pth::PthFormatError;
use crate::error::CoreError;
use crate::header::ReadError;
use crate::pth;

impl From<CoreError> for PyErr {
    fn from(err: CoreError) -> PyErr {
        match err {
            CoreError::Unsupported(_) | CoreError::Invalid(_) => {
                PyValueError::new_err(err.to_string())
            }
        }
    }
}

impl From<ReadError> for PyErr {
    fn from(err: ReadError) -> PyErr {
        match err {
            ReadError::Header {
                ref path,
                kind,
                ref detail,
            } => Python::attach(|py| {
                let exc = SafetensorsHeaderError::new_err(err.to_string());
                let value = exc.value(py);
                let attrs = [
                    ("path", path.as_str()),
                    ("kind", kind.name()),
                    ("detail", detail),
                ];
                for (name, v) in attrs {
                    if let Err(e) = value.setattr(name, v) {
                        return e;
                    }
                }
                exc
            }),
            // OSError(errno, strerror, filename) picks the subclass from the errno, as open()
            // does: FileNotFoundError, PermissionError, IsADirectoryError, ...
            ReadError::Io {
                path,
                errno: Some(errno),
                detail,
                ..
            } => {
                let strerror = detail
                    .split(" (os error")
                    .next()
                    .unwrap_or(&detail)
                    .to_owned();
                PyOSError::new_err((errno, strerror, path))
            }
            ReadError::Io { .. } => PyOSError::new_err(err.to_string()),
        }
    }
}

impl From<pth::ReadError> for PyErr {
    fn from(err: pth::ReadError) -> PyErr {
        match err {
            pth::ReadError::Invalid {
                ref path,
                kind,
                ref detail,
            } => Python::attach(|py| {
                let exc = PthFormatError::new_err(err.to_string());
                let value = exc.value(py);
                let attrs = [
                    ("path", path.as_str()),
                    ("kind", kind.name()),
                    ("detail", detail),
                ];
                for (name, v) in attrs {
                    if let Err(e) = value.setattr(name, v) {
                        return e;
                    }
                }
                exc
            }),
            pth::ReadError::Io(e) => e.into(),
            // `PthReader.open` raises its own exception (with the ranges) for this one.
            pth::ReadError::Unfetched { .. } => PyValueError::new_err(err.to_string()),
        }
    }
}
