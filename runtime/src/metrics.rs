//! Metric names. (being written)
