//! The ckptmap core: everything that grows with the number of state-dict keys.
//!
//! The modules below are plain Rust without any Python object, so `cargo test` and
//! `cargo bench` run without an interpreter. The PyO3 layer lives in [`py`] behind the
//! `python` feature, which maturin turns on.

pub mod charset;
pub mod dialect;
pub mod error;
pub mod exact;
pub mod header;
pub mod index;
pub mod pattern;
pub mod pickle;
pub mod pth;
pub mod rules;
pub mod suggest;
pub mod template;
pub mod zipfile;

#[cfg(feature = "python")]
mod py;
