//! The PyO3 binding layer: extract Python inputs, run the pure core with the GIL released,
//! build Python results. This file only registers.

mod errors;
mod header;
mod index;
mod pth;
mod rules;
mod suggest;

use pyo3::prelude::*;

/// The compiled core of ckptmap. Import from `ckptmap`, not from here.
#[pymodule]
mod _core {
    use pyo3::prelude::*;

    #[pymodule_export]
    use super::header::{SafetensorsHeader, SafetensorsHeaderError};
    #[pymodule_export]
    use super::index::{diff_keys, filter_prefix_keys, find_collisions, group_by_owner};
    #[pymodule_export]
    use super::pth::{PthFallback, PthFormatError, PthReader, PthUnfetched};
    #[pymodule_export]
    use super::rules::KeyRules;
    #[pymodule_export]
    use super::suggest::suggest_rules;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        // The header checks' names and the header size cap, so Python needs no copy of them.
        let kinds = crate::header::HeaderErrorKind::ALL.map(|k| k.name());
        m.add(
            "SAFETENSORS_HEADER_ERROR_KINDS",
            pyo3::types::PyTuple::new(m.py(), kinds)?,
        )?;
        m.add("MAX_SAFETENSORS_HEADER_LEN", crate::header::MAX_HEADER_LEN)
    }
}
