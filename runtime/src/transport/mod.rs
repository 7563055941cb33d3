//! QUIC transport. (being written)
pub mod tls;
