//! Placeholder: this crate is built by its own issue; it exports nothing yet.
