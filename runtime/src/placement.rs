//! Placement. (being written)
