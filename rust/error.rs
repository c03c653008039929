//! The one error type of the core; `py/errors.rs` maps it to Python exceptions.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// A pattern or template that the Rust engine cannot run with exactly Python's
    /// semantics. Not a user error: the rule runs on Python's `re` instead.
    #[error("not supported by the native engine: {0}")]
    Unsupported(String),
    /// Input that is invalid whichever engine runs it.
    #[error("{0}")]
    Invalid(String),
}

pub type CoreResult<T> = Result<T, CoreError>;
