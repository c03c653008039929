//! The key index: prefix filters, grouping of keys by owning module, and diffs.
