//! Bindings for the key index.
