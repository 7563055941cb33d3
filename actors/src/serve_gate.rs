//! `ServeGate`: whether this node may serve its shards at this instant (invariant 1), asked by
//! everything that admits, applies or answers a shard op: the router on admission, the shard
//! actor before applying, the shard's log writer before releasing replies. It wraps the sans-IO
//! [`LeaseHolder`] (lease time left, on this node's monotonic clock, and the map acted on) and
//! hands out the exact instants serving began and ended for the ownership log.

use std::time::Instant;

use parking_lot::{Mutex, MutexGuard};
use tidepool_runtime::lease::{LeaseConfig, LeaseHolder, ServeEdge};

/// This node's lease holder, shared. Cheap to ask (one uncontended lock, one clock read).
#[derive(Debug)]
pub struct ServeGate {
    holder: Mutex<LeaseHolder>,
}

impl ServeGate {
    pub fn new(cfg: LeaseConfig) -> Self {
        ServeGate {
            holder: Mutex::new(LeaseHolder::new(cfg)),
        }
    }

    /// Whether this node may serve now: a granted lease covers this instant on this node's own
    /// monotonic clock, and the map has been acted on up to what the grants require.
    pub fn may_serve(&self) -> bool {
        self.holder.lock().may_serve(Instant::now())
    }

    /// The ownership driver has acted on the map up to `index`.
    pub fn set_acted(&self, index: u64) {
        self.holder.lock().set_acted(Instant::now(), index);
    }

    /// Serving edges since the last call (see [`LeaseHolder::take_edges`]).
    pub fn take_edges(&self) -> Vec<ServeEdge> {
        self.holder.lock().take_edges(Instant::now())
    }

    /// The holder itself, for the renewal loop.
    pub fn lock(&self) -> MutexGuard<'_, LeaseHolder> {
        self.holder.lock()
    }
}
