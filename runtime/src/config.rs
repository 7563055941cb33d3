//! Typed node configuration. (being written)
