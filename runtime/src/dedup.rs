//! Idempotency: which (sender, seq) keys a shard has applied. Sans-IO.
//!
//! Per sender we keep a floor (every seq <= floor was applied) and the set of applied seqs above
//! it. Senders number ops 1, 2, 3, ... and pipeline a bounded window, so the set stays small and
//! the floor advances as gaps fill.

use std::collections::{BTreeSet, HashMap};

/// Applied seqs above the floor kept per sender before the sender is refused.
pub const MAX_GAP: usize = 1 << 16;
/// Senders remembered per shard; past this the least recently seen is forgotten.
pub const MAX_SENDERS: usize = 1 << 16;

#[derive(Debug, Default, Clone)]
struct Window {
    floor: u64,
    above: BTreeSet<u64>,
    touched: u64,
}

/// Outcome of checking a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Not seen: apply it (and then call [`Dedup::record`]).
    New,
    /// Already applied: do not apply again.
    Duplicate,
    /// The sender has too many unacknowledged gaps; refuse (retryable).
    WindowFull,
}

/// The idempotency table of one shard.
#[derive(Debug, Default, Clone)]
pub struct Dedup {
    senders: HashMap<u64, Window>,
    clock: u64,
}

impl Dedup {
    pub fn check(&self, sender: u64, seq: u64) -> Check {
        match self.senders.get(&sender) {
            None => Check::New,
            Some(w) if seq <= w.floor || w.above.contains(&seq) => Check::Duplicate,
            Some(w) if w.above.len() >= MAX_GAP => Check::WindowFull,
            Some(_) => Check::New,
        }
    }

    /// Records `seq` as applied. Call only after `check` said `New`.
    pub fn record(&mut self, sender: u64, seq: u64) {
        self.clock += 1;
        if !self.senders.contains_key(&sender) && self.senders.len() >= MAX_SENDERS {
            self.evict_oldest();
        }
        let w = self.senders.entry(sender).or_default();
        w.touched = self.clock;
        if seq == w.floor + 1 {
            w.floor = seq;
            while w.above.first() == Some(&(w.floor + 1)) {
                w.above.pop_first();
                w.floor += 1;
            }
        } else if seq > w.floor {
            w.above.insert(seq);
        }
    }

    fn evict_oldest(&mut self) {
        if let Some((&s, _)) = self.senders.iter().min_by_key(|(_, w)| w.touched) {
            self.senders.remove(&s);
        }
    }

    /// Exports every sender's window (for checkpoints), sorted by sender.
    pub fn export(&self) -> Vec<(u64, u64, Vec<u64>)> {
        let mut v: Vec<_> = self
            .senders
            .iter()
            .map(|(s, w)| (*s, w.floor, w.above.iter().copied().collect()))
            .collect();
        v.sort_unstable_by_key(|(s, _, _)| *s);
        v
    }

    /// Rebuilds the table from an export.
    pub fn import(windows: impl IntoIterator<Item = (u64, u64, Vec<u64>)>) -> Self {
        let mut d = Dedup::default();
        for (sender, floor, above) in windows {
            d.clock += 1;
            d.senders.insert(
                sender,
                Window {
                    floor,
                    above: above.into_iter().collect(),
                    touched: d.clock,
                },
            );
        }
        d
    }

    /// Senders tracked now.
    pub fn senders(&self) -> usize {
        self.senders.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_keeps_no_set() {
        let mut d = Dedup::default();
        for s in 1..=1000 {
            assert_eq!(d.check(1, s), Check::New);
            d.record(1, s);
        }
        assert_eq!(d.check(1, 500), Check::Duplicate);
        assert_eq!(d.check(1, 1001), Check::New);
        assert!(d.senders[&1].above.is_empty());
    }

    proptest! {
        /// Any arrival order with retries: each key is New exactly once.
        #[test]
        fn each_key_is_new_exactly_once(order in proptest::collection::vec((0u64..3, 1u64..200), 1..2000)) {
            let mut d = Dedup::default();
            let mut applied = std::collections::HashSet::new();
            for (sender, seq) in order {
                match d.check(sender, seq) {
                    Check::New => { prop_assert!(applied.insert((sender, seq))); d.record(sender, seq); }
                    Check::Duplicate => prop_assert!(applied.contains(&(sender, seq))),
                    Check::WindowFull => prop_assert!(false),
                }
            }
        }
    }
}
