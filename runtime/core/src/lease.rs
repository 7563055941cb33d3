//! Sans-IO lease arithmetic: when a node may serve its shards, and when the control-plane leader
//! may take them away (ARCHITECTURE.md, invariant 1, "one owner").
//!
//! Two pure state machines, driven by the caller with a monotonic `now` (an [`Instant`] on the
//! caller's clock) and never reading a clock themselves:
//!
//! - [`LeaseHolder`], on every node: it serves only while [`LeaseHolder::is_valid`]. Validity is
//!   counted on the holder's own clock from the instant it *sent* the renewal that was granted, for
//!   `ttl - drift_margin`.
//! - [`LeaseTable`], on the control-plane leader: a node's lease
//!   [must have expired](LeaseTable::must_have_expired) only `ttl + drift_margin` after the leader
//!   *granted* it, and never earlier than `ttl + drift_margin` after the leader was elected.
//!
//! # Why the two sides cannot overlap
//!
//! A renewal is sent at `s` (holder clock), granted at `g >= s` (leader clock; the request takes
//! time to arrive) and received at `r >= g`. The holder stops serving at `s + ttl - margin`, the
//! leader declares expiry at `g + ttl + margin`. With clocks that advance at the same rate, an
//! arbitrary offset between them cancels out (only durations are compared), and
//! `s + ttl - margin <= g + ttl - margin < g + ttl + margin`: the holder has stopped `2 * margin`
//! before the leader may reassign. The margins absorb a relative clock-*rate* error of up to
//! `2 * margin / (ttl + margin)` (10% at the defaults, far beyond real oscillators).
//! `lease_tests.rs` checks this over random interleavings, delays, losses, reorderings and leader
//! changes.
//!
//! # What the caller must guarantee
//!
//! - A leader grants only while it is sure it still leads (e.g. a Raft leader lease or a
//!   quorum read), so no grant of term `k` is issued after the leader of term `k + 1` started
//!   counting in [`LeaseTable::new_leader`]. The holder ignores grants of a term older than one it
//!   has seen, but that alone cannot stop a deposed leader that does not know it was deposed.
//! - Grants echo the holder's token; a grant for a token the holder does not remember is ignored,
//!   because its send instant (the only safe start of validity) is unknown.
//! - A grant carries the leader's applied map index, and a grant that finds the lease lapsed
//!   makes the holder's node serve only once its own copy of the map has been applied *and acted
//!   on* up to that index ([`LeaseHolder::is_valid_at`]). A node the leader declared expired may have lost shards in
//!   the same breath; without this, its next grant could arrive before the map that moved them,
//!   and it would serve them at its old epoch next to their new owner (found by the
//!   deterministic simulation, then by the chaos harness under packet loss).

use crate::node_id::NodeId;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The most serving edges a [`LeaseHolder`] keeps until [`LeaseHolder::take_edges`] collects them
/// (bounded memory; the node collects them every few tens of milliseconds, and a lease changes
/// state at most once per grant).
pub const MAX_EDGES: usize = 1024;

/// An instant at which this node's right to serve ([`LeaseHolder::may_serve`]) began or ended,
/// exact however late it was noticed: an end is the lease's own expiry instant, a beginning the
/// arrival of the grant (or of the map) that made the node valid again. The node's ownership log
/// closes and reopens its intervals at these instants (invariant 1's evidence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEdge {
    Began(Instant),
    Ended(Instant),
}

/// The most renewals a [`LeaseHolder`] remembers while waiting for their grants. Older ones are
/// forgotten first; a grant for a forgotten token is ignored, which only costs liveness
/// (invariant 7: bounded memory, even if the leader never answers).
pub const MAX_PENDING_RENEWALS: usize = 64;

/// Why a [`LeaseConfig`] was refused. Nothing is partially applied: the caller keeps its previous
/// configuration (or refuses to start).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// `ttl` was zero: no lease could ever be valid.
    #[error("lease ttl must be greater than zero")]
    ZeroTtl,
    /// `drift_margin >= ttl`: a holder would never count itself valid (validity lasts
    /// `ttl - drift_margin`), so no node could serve.
    #[error("lease drift_margin ({margin:?}) must be less than ttl ({ttl:?})")]
    MarginTooLarge {
        /// The configured drift margin.
        margin: Duration,
        /// The configured ttl.
        ttl: Duration,
    },
    /// `renew_every` was zero (a renewal storm) or not shorter than the holder's validity window
    /// `ttl - drift_margin` (the lease would lapse between renewals even with instant grants).
    #[error("lease renew_every ({renew_every:?}) must be in (0, ttl - drift_margin = {window:?})")]
    RenewInterval {
        /// The configured renewal interval.
        renew_every: Duration,
        /// `ttl - drift_margin`, the longest a grant keeps the holder valid.
        window: Duration,
    },
}

/// Lease timing, shared by holders and the grantor (invariant 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a grant lasts, counted by the holder from its send instant. Default 2 s.
    /// Longer means fewer renewals but slower failover: a crashed node's shards wait
    /// `ttl + drift_margin` before they are reassigned.
    pub ttl: Duration,
    /// How often a holder sends a renewal. Default 500 ms (`ttl / 4`), so three renewals in a
    /// row may be lost before the lease lapses.
    pub renew_every: Duration,
    /// Safety margin for clock-rate error between holder and leader, subtracted by the holder and
    /// added by the grantor. Default 200 ms.
    pub drift_margin: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self::with_ttl(Duration::from_secs(2))
    }
}

impl LeaseConfig {
    /// A preset for `ttl`: renew every `ttl / 4`, drift margin `ttl / 10`. `with_ttl(2 s)` is the
    /// default. Still call [`validate`](Self::validate) for a zero ttl.
    pub fn with_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            renew_every: ttl / 4,
            drift_margin: ttl / 10,
        }
    }

    /// Checks that holders can ever be valid and that renewals come often enough to keep them so.
    pub fn validate(&self) -> Result<(), LeaseError> {
        if self.ttl.is_zero() {
            return Err(LeaseError::ZeroTtl);
        }
        let Some(window) = self
            .ttl
            .checked_sub(self.drift_margin)
            .filter(|w| !w.is_zero())
        else {
            return Err(LeaseError::MarginTooLarge {
                margin: self.drift_margin,
                ttl: self.ttl,
            });
        };
        if self.renew_every.is_zero() || self.renew_every >= window {
            return Err(LeaseError::RenewInterval {
                renew_every: self.renew_every,
                window,
            });
        }
        Ok(())
    }

    /// `ttl + drift_margin`: how long after a grant (or after a leader's election) the grantor
    /// must wait before it may consider a lease expired.
    pub fn expiry_wait(&self) -> Duration {
        self.ttl.saturating_add(self.drift_margin)
    }
}

/// The holder side of a lease, one per node: whether this node may serve its shards now
/// (invariant 1).
///
/// Usage: when [`renew_due`](Self::renew_due), call [`on_send`](Self::on_send) and put the token
/// in the renewal; feed each grant to [`on_grant`](Self::on_grant); serve only while
/// [`is_valid`](Self::is_valid); count [`poll_expired`](Self::poll_expired) in
/// `tidepool_lease_expirations_total`.
#[derive(Debug, Clone)]
pub struct LeaseHolder {
    cfg: LeaseConfig,
    next_token: u64,
    /// token -> send instant, for renewals not yet granted (at most [`MAX_PENDING_RENEWALS`]).
    pending: BTreeMap<u64, Instant>,
    last_send: Option<Instant>,
    valid_until: Option<Instant>,
    /// Highest leader term a grant came from; grants of older terms are ignored.
    term: Option<u64>,
    /// Highest map index carried by a grant that found the lease lapsed
    /// (see [`is_valid_at`](Self::is_valid_at)).
    map_index: u64,
    /// A grant made the lease valid and its lapse has not been noted yet.
    armed: bool,
    /// Lapses noted (by [`on_grant`]) but not yet returned by [`poll_expired`].
    unpolled_expiries: u32,
    /// The map index this node's ownership driver has acted on ([`set_acted`](Self::set_acted)).
    acted: u64,
    /// Since when the node may serve, while it may (as last observed).
    serving_since: Option<Instant>,
    /// Edges not yet collected by [`take_edges`](Self::take_edges), oldest first.
    edges: std::collections::VecDeque<ServeEdge>,
}

impl LeaseHolder {
    /// A holder that has never been granted anything: not valid, renewal due at once.
    pub fn new(cfg: LeaseConfig) -> Self {
        Self {
            cfg,
            next_token: 1,
            pending: BTreeMap::new(),
            last_send: None,
            valid_until: None,
            term: None,
            map_index: 0,
            armed: false,
            unpolled_expiries: 0,
            acted: 0,
            serving_since: None,
            edges: std::collections::VecDeque::new(),
        }
    }

    /// The configuration this holder counts with.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// Records that a renewal is being sent at `now` and returns the token the leader must echo
    /// in its grant. The send instant is what validity will be counted from (invariant 1): the
    /// leader grants no earlier than this, so counting from here never outlasts the leader's view.
    pub fn on_send(&mut self, now: Instant) -> u64 {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        if self.pending.len() >= MAX_PENDING_RENEWALS {
            self.pending.pop_first();
        }
        self.pending.insert(token, now);
        self.last_send = Some(now);
        token
    }

    /// A grant of `ttl` for renewal `token` from the leader of `term`, made when the leader's map
    /// had applied log index `map_index`, arrived at `now`.
    ///
    /// Validity becomes `send(token) + ttl - drift_margin` if that is later than the current
    /// validity; a grant never shortens it, and a late grant for an old token cannot extend past
    /// its own send instant plus ttl. Ignored: unknown or forgotten tokens (their send instant is
    /// unknown, and the receive instant would be unsafe), grants from a term older than one seen,
    /// and ttls not longer than the drift margin. All of this keeps invariant 1.
    pub fn on_grant(&mut self, now: Instant, token: u64, ttl: Duration, term: u64, map_index: u64) {
        if self.term.is_some_and(|seen| term < seen) {
            return;
        }
        let Some(sent) = self.pending.remove(&token) else {
            return;
        };
        self.term = Some(term);
        // A lapse before this grant ends the serving period at the old expiry instant (the new
        // grant is about to move `valid_until`).
        self.observe(now);
        // Only a grant that finds the lease lapsed (or never granted) can follow a reassignment
        // of this node's shards: while the lease is still valid here, the leader cannot have
        // declared it expired (it waits `2 * drift_margin` longer than the holder serves). So
        // only such a grant makes the node wait for its map; a renewal of a valid lease does not
        // interrupt service while the map is a few entries behind.
        if !self.is_valid(now) {
            self.map_index = self.map_index.max(map_index);
        }
        self.note_lapse(now);
        let Some(until) = ttl
            .checked_sub(self.cfg.drift_margin)
            .filter(|window| !window.is_zero())
            .and_then(|window| sent.checked_add(window))
        else {
            return;
        };
        if self.valid_until.is_none_or(|v| until > v) {
            self.valid_until = Some(until);
        }
        if self.is_valid(now) {
            self.armed = true;
        }
        self.observe(now);
    }

    /// The ownership driver has acted on the map up to `index` at `now` (stopped serving what
    /// the map moved away). Serving may begin again once this reaches [`map_index`](Self::map_index).
    pub fn set_acted(&mut self, now: Instant, index: u64) {
        self.observe(now);
        self.acted = self.acted.max(index);
        self.observe(now);
    }

    /// Whether this node may serve at `now`: [`is_valid_at`](Self::is_valid_at) with the map
    /// index acted on. Notes the edge if that changed (see [`take_edges`](Self::take_edges)).
    pub fn may_serve(&mut self, now: Instant) -> bool {
        self.observe(now);
        self.serving_since.is_some()
    }

    /// The serving edges since the last call, oldest first, each at the instant it happened.
    pub fn take_edges(&mut self, now: Instant) -> Vec<ServeEdge> {
        self.observe(now);
        self.edges.drain(..).collect()
    }

    /// Brings `serving_since` up to date at `now`, noting edges. An end is dated at the lease's
    /// expiry, not at `now`: admission stopped there, however late this runs. A beginning happens
    /// only in [`on_grant`](Self::on_grant) or [`set_acted`](Self::set_acted), at their `now`.
    fn observe(&mut self, now: Instant) {
        let valid = self.is_valid_at(now, self.acted);
        match (self.serving_since, valid) {
            (Some(since), false) => {
                let end = self
                    .valid_until
                    .filter(|until| *until <= now)
                    .unwrap_or(now)
                    .max(since);
                self.serving_since = None;
                self.push_edge(ServeEdge::Ended(end));
            }
            (None, true) => {
                self.serving_since = Some(now);
                self.push_edge(ServeEdge::Began(now));
            }
            _ => {}
        }
    }

    fn push_edge(&mut self, e: ServeEdge) {
        if self.edges.len() >= MAX_EDGES {
            self.edges.pop_front();
        }
        self.edges.push_back(e);
    }

    /// Whether a granted lease covers `now`. Serving needs [`is_valid_at`](Self::is_valid_at).
    pub fn is_valid(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|until| now < until)
    }

    /// Whether this node may serve at `now` (invariant 1): a granted lease covers `now`, and the
    /// node has acted on its copy of the map up to `applied` >= the highest map index carried by
    /// a grant that found the lease lapsed. Map indices of committed entries only grow and reach
    /// every member, so the wait ends once the map catches up.
    pub fn is_valid_at(&self, now: Instant, applied: u64) -> bool {
        self.is_valid(now) && applied >= self.map_index
    }

    /// The map index this node must have acted on to serve (see [`is_valid_at`](Self::is_valid_at)).
    pub fn map_index(&self) -> u64 {
        self.map_index
    }

    /// The first instant at which the lease is no longer valid, if one was ever granted.
    pub fn valid_until(&self) -> Option<Instant> {
        self.valid_until
    }

    /// The highest leader term a grant was accepted from.
    pub fn term(&self) -> Option<u64> {
        self.term
    }

    /// Whether to send a renewal now: at once if none was ever sent, then every `renew_every`
    /// after the last send (a lost renewal or grant is retried on the same cadence, so a node
    /// that is partitioned away does not flood the leader when it comes back).
    pub fn renew_due(&self, now: Instant) -> bool {
        match self.last_send {
            None => true,
            Some(sent) => sent
                .checked_add(self.cfg.renew_every)
                .is_none_or(|due| now >= due),
        }
    }

    /// Returns true exactly once per lapse of a valid lease (valid -> expired), for
    /// `tidepool_lease_expirations_total`. A lapse that a later grant already covered over
    /// (the node was unable to serve for a while) is still reported, on a later poll.
    pub fn poll_expired(&mut self, now: Instant) -> bool {
        self.note_lapse(now);
        if self.unpolled_expiries > 0 {
            self.unpolled_expiries -= 1;
            return true;
        }
        false
    }

    fn note_lapse(&mut self, now: Instant) {
        if self.armed && !self.is_valid(now) {
            self.armed = false;
            self.unpolled_expiries = self.unpolled_expiries.saturating_add(1);
        }
    }
}

/// The grantor side, held by the control-plane leader: each node's last grant by this leader,
/// and whether a node's lease must have expired so its shards may be reassigned (invariant 1).
#[derive(Debug, Clone)]
pub struct LeaseTable {
    cfg: LeaseConfig,
    leadership_start: Instant,
    last_grant: BTreeMap<NodeId, Instant>,
}

impl LeaseTable {
    /// The table of a leader elected at `now`. It knows nothing of what earlier leaders granted,
    /// so it declares nobody expired before `now + ttl + drift_margin` (invariant 1).
    pub fn new_leader(cfg: LeaseConfig, now: Instant) -> Self {
        Self {
            cfg,
            leadership_start: now,
            last_grant: BTreeMap::new(),
        }
    }

    /// The configuration this table counts with.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// When this leader was elected.
    pub fn leadership_start(&self) -> Instant {
        self.leadership_start
    }

    /// Grants `node` a lease at `now` and returns the ttl to put in the grant. The grant instant
    /// only moves forward, so a reordered call cannot make a lease look older than it is.
    pub fn grant(&mut self, node: &str, now: Instant) -> Duration {
        match self.last_grant.get_mut(node) {
            Some(last) => *last = (*last).max(now),
            None => {
                self.last_grant.insert(NodeId::from(node), now);
            }
        }
        self.cfg.ttl
    }

    /// The last instant this leader granted `node` a lease.
    pub fn last_grant(&self, node: &str) -> Option<Instant> {
        self.last_grant.get(node).copied()
    }

    /// Whether `node`'s lease must have expired at `now`, so its shards may be assigned to
    /// someone else (invariant 1): `now >= last_grant + ttl + drift_margin` and
    /// `now >= leadership_start + ttl + drift_margin`. A node this leader never granted counts
    /// from the election alone. If the arithmetic overflows the answer is `false`: never reassign
    /// on a guess.
    pub fn must_have_expired(&self, node: &str, now: Instant) -> bool {
        let wait = self.cfg.expiry_wait();
        let after = |t: Instant| t.checked_add(wait).is_some_and(|deadline| now >= deadline);
        after(self.leadership_start) && self.last_grant.get(node).is_none_or(|&g| after(g))
    }

    /// The nodes among `known` whose lease must have expired at `now`, sorted and deduplicated.
    pub fn expired_nodes<'a>(
        &self,
        known: impl IntoIterator<Item = &'a str>,
        now: Instant,
    ) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = known
            .into_iter()
            .filter(|n| self.must_have_expired(n, now))
            .map(NodeId::from)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Forgets `node` (it left or finished draining). Only call this once the node owns no
    /// shards: a forgotten node counts as never granted, i.e. expired soon after the election,
    /// which is only true of a node that has released everything.
    pub fn remove(&mut self, node: &str) {
        self.last_grant.remove(node);
    }
}

#[cfg(test)]
#[path = "lease_tests.rs"]
mod tests;
