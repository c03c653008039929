//! The one place where core errors become Python exceptions.

use pyo3::exceptions::PyValueError;
use pyo3::PyErr;

use crate::error::CoreError;

impl From<CoreError> for PyErr {
    fn from(err: CoreError) -> PyErr {
        match err {
            CoreError::Unsupported(_) | CoreError::Invalid(_) => {
                PyValueError::new_err(err.to_string())
            }
        }
    }
}
