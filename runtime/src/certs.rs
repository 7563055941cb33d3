//! Cluster CA and certificates. (being written)
