//! Wire codec. (being written)
