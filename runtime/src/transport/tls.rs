//! TLS. (being written)
