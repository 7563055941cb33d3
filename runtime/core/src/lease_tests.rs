use super::*;

use std::collections::BTreeMap;

use proptest::prelude::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// ttl 2 s, renew 500 ms, margin 200 ms (the defaults, spelled out so the tables read alone).
fn cfg() -> LeaseConfig {
    LeaseConfig {
        ttl: ms(2000),
        renew_every: ms(500),
        drift_margin: ms(200),
    }
}

// ---- Config ----

#[test]
fn default_config_is_valid_and_documented() {
    let c = LeaseConfig::default();
    assert_eq!(c, cfg());
    assert_eq!(c.validate(), Ok(()));
    assert_eq!(c.expiry_wait(), ms(2200));
}

#[test]
fn config_validation_table() {
    let table: [(u64, u64, u64, Option<&str>); 7] = [
        // ttl, renew_every, drift_margin, error (None = valid)
        (2000, 500, 200, None),
        (2000, 1799, 200, None),
        (0, 1, 0, Some("ttl must be greater than zero")),
        (2000, 500, 2000, Some("drift_margin")),
        (2000, 500, 3000, Some("drift_margin")),
        (2000, 0, 200, Some("renew_every")),
        (2000, 1800, 200, Some("renew_every")),
    ];
    for (ttl, renew, margin, want) in table {
        let c = LeaseConfig {
            ttl: ms(ttl),
            renew_every: ms(renew),
            drift_margin: ms(margin),
        };
        match (c.validate(), want) {
            (Ok(()), None) => {}
            (Err(e), Some(text)) => assert!(e.to_string().contains(text), "{c:?}: {e}"),
            (got, want) => panic!("{c:?}: got {got:?}, want {want:?}"),
        }
    }
}

// ---- Holder ----

#[test]
fn holder_starts_invalid_and_due() {
    let base = Instant::now();
    let h = LeaseHolder::new(cfg());
    assert!(!h.is_valid(base));
    assert_eq!(h.valid_until(), None);
    assert!(h.renew_due(base));
}

/// Table: (send at, grant received at, granted ttl, expected valid_until), all in ms from base.
/// Validity counts from the SEND, minus the margin, whenever the grant arrives.
#[test]
fn holder_validity_counts_from_send_minus_margin() {
    let table: [(u64, u64, u64, Option<u64>); 6] = [
        (0, 0, 2000, Some(1800)),
        (0, 10, 2000, Some(1800)),
        // A slow grant: received 1.5 s after the send, still ends at send + ttl - margin.
        (100, 1600, 2000, Some(1900)),
        // Received after it would already have ended: never valid.
        (0, 1900, 2000, Some(1800)),
        // A leader granting a shorter ttl.
        (0, 5, 1000, Some(800)),
        // A ttl not longer than the margin gives nothing.
        (0, 5, 200, None),
    ];
    let base = Instant::now();
    for (send, recv, ttl, want) in table {
        let mut h = LeaseHolder::new(cfg());
        let t = h.on_send(base + ms(send));
        h.on_grant(base + ms(recv), t, ms(ttl), 1, 0);
        assert_eq!(
            h.valid_until(),
            want.map(|w| base + ms(w)),
            "send {send} recv {recv} ttl {ttl}"
        );
        if let Some(w) = want {
            assert!(h.is_valid(base + ms(w - 1)));
            assert!(!h.is_valid(base + ms(w)));
            assert_eq!(h.is_valid(base + ms(recv)), recv < w);
        }
    }
}

#[test]
fn drift_margin_shortens_validity() {
    let base = Instant::now();
    for margin in [0, 1, 200, 999] {
        let c = LeaseConfig {
            drift_margin: ms(margin),
            ..cfg()
        };
        let mut h = LeaseHolder::new(c);
        let t = h.on_send(base);
        h.on_grant(base, t, c.ttl, 1, 0);
        assert_eq!(
            h.valid_until(),
            Some(base + ms(2000 - margin)),
            "margin {margin}"
        );
    }
}

#[test]
fn late_grant_for_old_token_does_not_extend_past_its_send() {
    let base = Instant::now();
    let mut h = LeaseHolder::new(cfg());
    let old = h.on_send(base);
    let new = h.on_send(base + ms(500));
    h.on_grant(base + ms(510), new, ms(2000), 1, 0);
    assert_eq!(h.valid_until(), Some(base + ms(2300)));
    // The grant of the first renewal arrives last: it would end at 1800 < 2300, so no change.
    h.on_grant(base + ms(600), old, ms(2000), 1, 0);
    assert_eq!(h.valid_until(), Some(base + ms(2300)));

    // Alone, the old token's late grant ends at its own send + ttl - margin, not receive + ...
    let mut h = LeaseHolder::new(cfg());
    let old = h.on_send(base);
    let _lost = h.on_send(base + ms(500));
    h.on_grant(base + ms(1500), old, ms(2000), 1, 0);
    assert_eq!(h.valid_until(), Some(base + ms(1800)));
}

#[test]
fn a_grant_counts_only_once_the_map_caught_up_with_it() {
    let base = Instant::now();
    let mut h = LeaseHolder::new(cfg());
    // An ignored grant (unknown token) raises nothing.
    h.on_grant(base, 42, ms(2000), 1, 99);
    assert_eq!(h.map_index(), 0);
    // The first grant finds no valid lease: the node must catch up with the leader's map.
    let t1 = h.on_send(base);
    h.on_grant(base + ms(1), t1, ms(2000), 1, 17);
    assert!(h.is_valid(base + ms(2)));
    assert!(!h.is_valid_at(base + ms(2), 16), "map behind the grant");
    assert!(h.is_valid_at(base + ms(2), 17));
    assert!(h.is_valid_at(base + ms(2), 40));
    // A renewal of a still-valid lease does not make the node wait for a newer map (the leader
    // cannot have declared it expired meanwhile), and never lowers the requirement.
    let t2 = h.on_send(base + ms(500));
    h.on_grant(base + ms(501), t2, ms(2000), 1, 30);
    assert_eq!(h.map_index(), 17);
    assert!(h.is_valid_at(base + ms(502), 17));
    // The lease lapses (valid until 500 + 1800 = 2300); the next grant finds it lapsed and
    // carries the map that may have moved this node's shards away.
    assert!(!h.is_valid(base + ms(2300)));
    let t3 = h.on_send(base + ms(2400));
    h.on_grant(base + ms(2401), t3, ms(2000), 1, 25);
    assert_eq!(h.map_index(), 25);
    assert!(h.is_valid(base + ms(2402)));
    assert!(!h.is_valid_at(base + ms(2402), 24));
    assert!(h.is_valid_at(base + ms(2402), 25));
    // Time still rules: a caught-up map does not extend an expired lease.
    assert!(!h.is_valid_at(base + ms(9000), 1000));
}

#[test]
fn unknown_duplicate_and_older_term_grants_are_ignored() {
    let base = Instant::now();
    let mut h = LeaseHolder::new(cfg());
    // Never sent.
    h.on_grant(base, 42, ms(2000), 1, 0);
    assert_eq!(h.valid_until(), None);

    let t1 = h.on_send(base);
    h.on_grant(base + ms(1), t1, ms(2000), 3, 0);
    let until = h.valid_until();
    assert_eq!(h.term(), Some(3));
    // Duplicate delivery of the same grant: the token is consumed.
    let t2 = h.on_send(base + ms(500));
    h.on_grant(base + ms(501), t1, ms(2000), 3, 0);
    assert_eq!(h.valid_until(), until);
    // A grant from a deposed leader (term 2 < 3) is ignored even for a live token ...
    h.on_grant(base + ms(502), t2, ms(2000), 2, 0);
    assert_eq!(h.valid_until(), until);
    // ... and the token is still usable by the current leader.
    h.on_grant(base + ms(503), t2, ms(2000), 3, 0);
    assert_eq!(h.valid_until(), Some(base + ms(2300)));
    // A newer term is accepted.
    let t3 = h.on_send(base + ms(1000));
    h.on_grant(base + ms(1001), t3, ms(2000), 4, 0);
    assert_eq!(
        (h.valid_until(), h.term()),
        (Some(base + ms(2800)), Some(4))
    );
}

#[test]
fn pending_renewals_are_bounded() {
    let base = Instant::now();
    let mut h = LeaseHolder::new(cfg());
    let first = h.on_send(base);
    let mut last = first;
    for i in 1..=MAX_PENDING_RENEWALS as u64 {
        last = h.on_send(base + ms(i));
    }
    assert!(h.pending.len() <= MAX_PENDING_RENEWALS);
    // The oldest was forgotten: its grant is now unknown.
    h.on_grant(base + ms(100), first, ms(2000), 1, 0);
    assert_eq!(h.valid_until(), None);
    h.on_grant(base + ms(100), last, ms(2000), 1, 0);
    assert!(h.valid_until().is_some());
}

#[test]
fn renew_due_cadence() {
    let base = Instant::now();
    let mut h = LeaseHolder::new(cfg());
    assert!(h.renew_due(base));
    let t = h.on_send(base);
    assert!(!h.renew_due(base + ms(499)));
    assert!(h.renew_due(base + ms(500)));
    // Granted or not, the cadence follows the sends.
    h.on_grant(base + ms(10), t, ms(2000), 1, 0);
    assert!(!h.renew_due(base + ms(499)));
    h.on_send(base + ms(500));
    assert!(!h.renew_due(base + ms(999)));
    assert!(h.renew_due(base + ms(1000)));
}

/// A node cut off from the leader stops serving on its own, `ttl - margin` after the last send
/// that was granted, however often it keeps trying.
#[test]
fn partitioned_holder_stops_serving_by_itself() {
    let base = Instant::now();
    let mut h = LeaseHolder::new(cfg());
    let mut now = base;
    let mut last_granted_send = base;
    // Healthy for 3 s: every renewal is granted 20 ms later.
    while now < base + ms(3000) {
        if h.renew_due(now) {
            let t = h.on_send(now);
            h.on_grant(now + ms(20), t, ms(2000), 1, 0);
            last_granted_send = now;
        }
        assert!(h.is_valid(now + ms(20)));
        now += ms(10);
    }
    // Partition: renewals go out, nothing comes back.
    let deadline = last_granted_send + ms(1800);
    while now < base + ms(10_000) {
        if h.renew_due(now) {
            h.on_send(now);
        }
        assert_eq!(h.is_valid(now), now < deadline, "at {:?}", now - base);
        now += ms(10);
    }
}

#[test]
fn poll_expired_once_per_lapse() {
    let base = Instant::now();
    let mut h = LeaseHolder::new(cfg());
    assert!(
        !h.poll_expired(base + ms(5000)),
        "never valid, never expired"
    );
    let t = h.on_send(base);
    h.on_grant(base, t, ms(2000), 1, 0);
    assert!(!h.poll_expired(base + ms(1799)));
    assert!(h.poll_expired(base + ms(1800)));
    assert!(!h.poll_expired(base + ms(1801)));
    assert!(!h.poll_expired(base + ms(9000)));

    // A lapse covered by a later grant before anyone polled is still counted, once.
    let t = h.on_send(base + ms(9000));
    h.on_grant(base + ms(9000), t, ms(2000), 1, 0);
    let t = h.on_send(base + ms(12_000));
    h.on_grant(base + ms(12_000), t, ms(2000), 1, 0);
    assert!(h.is_valid(base + ms(12_001)));
    assert!(h.poll_expired(base + ms(12_001)));
    assert!(!h.poll_expired(base + ms(12_002)));

    // A grant that arrives already expired does not arm a lapse.
    let mut h = LeaseHolder::new(cfg());
    let t = h.on_send(base);
    h.on_grant(base + ms(1900), t, ms(2000), 1, 0);
    assert!(!h.poll_expired(base + ms(5000)));
}

// ---- Grantor ----

/// Table: (leader elected at, grants at, check at, must have expired?), ms from base.
#[test]
fn grantor_never_declares_before_ttl_plus_margin() {
    let table: [(u64, &[u64], u64, bool); 9] = [
        (0, &[0], 2199, false),
        (0, &[0], 2200, true),
        (0, &[0, 1000], 3199, false),
        (0, &[0, 1000], 3200, true),
        // Reordered grant calls: the latest still counts.
        (0, &[1000, 0], 3199, false),
        // Unknown node: expired only after the election + ttl + margin.
        (5000, &[], 7199, false),
        (5000, &[], 7200, true),
        // A grant at the election instant.
        (5000, &[5000], 7200, true),
        (5000, &[6000], 8199, false),
    ];
    let base = Instant::now();
    for (elected, grants, check, want) in table {
        let mut t = LeaseTable::new_leader(cfg(), base + ms(elected));
        for &g in grants {
            assert_eq!(t.grant("n1", base + ms(g)), ms(2000));
        }
        assert_eq!(
            t.must_have_expired("n1", base + ms(check)),
            want,
            "elected {elected} grants {grants:?} check {check}"
        );
    }
}

#[test]
fn new_leader_waits_ttl_plus_margin_even_for_stale_grants() {
    let base = Instant::now();
    let mut t = LeaseTable::new_leader(cfg(), base + ms(10_000));
    // A grant instant before the election (a caller's reordering) cannot shorten the wait.
    t.grant("n1", base);
    assert!(!t.must_have_expired("n1", base + ms(12_199)));
    assert!(!t.must_have_expired("never-seen", base + ms(12_199)));
    assert!(t.must_have_expired("n1", base + ms(12_200)));
    assert!(t.must_have_expired("never-seen", base + ms(12_200)));
}

#[test]
fn expired_nodes_sorted_and_remove_forgets() {
    let base = Instant::now();
    let mut t = LeaseTable::new_leader(cfg(), base);
    t.grant("b", base + ms(100));
    t.grant("a", base + ms(5000));
    let known = ["c", "b", "a", "b"];
    assert!(t.expired_nodes(known, base + ms(2199)).is_empty());
    assert_eq!(t.expired_nodes(known, base + ms(2300)), vec!["b", "c"]);
    assert_eq!(t.expired_nodes(known, base + ms(7200)), vec!["a", "b", "c"]);
    assert_eq!(t.last_grant("a"), Some(base + ms(5000)));
    t.remove("a");
    assert_eq!(t.last_grant("a"), None);
    assert_eq!(t.expired_nodes(["a"], base + ms(2200)), vec!["a"]);
}

// ---- The safety property: the holder has stopped before the grantor declares expiry. ----

/// One step of the lease simulation.
#[derive(Debug, Clone)]
enum Op {
    /// Let `us` microseconds of true time pass, delivering what arrives meanwhile.
    Advance(u64),
    /// The holder sends a renewal (whether due or not). The request reaches the leader after
    /// `up` us (or is lost); the grant reaches the holder `down` us after that (or is lost, or
    /// arrives twice).
    Send {
        up: u64,
        down: u64,
        lose_up: bool,
        lose_down: bool,
        dup_down: bool,
    },
    /// The holder sends a renewal if `renew_due`, with the same network fate as `Send`.
    SendIfDue { up: u64, down: u64 },
    /// A new leader is elected; the old one grants nothing more.
    Elect,
}

fn op() -> impl Strategy<Value = Op> {
    // Delays up to 3 s: longer than the ttl, so grants arrive uselessly late too.
    let delay = prop_oneof![0u64..2_000, 0u64..3_000_000];
    prop_oneof![
        4 => (0u64..1_500_000).prop_map(Op::Advance),
        4 => (delay.clone(), delay.clone(), prop::bool::weighted(0.1), prop::bool::weighted(0.1),
              prop::bool::weighted(0.05))
            .prop_map(|(up, down, lose_up, lose_down, dup_down)| Op::Send {
                up, down, lose_up, lose_down, dup_down,
            }),
        3 => (delay.clone(), delay).prop_map(|(up, down)| Op::SendIfDue { up, down }),
        1 => Just(Op::Elect),
    ]
}

/// What travels, keyed by arrival time (true us) and a sequence number.
#[derive(Debug, Clone)]
enum Msg {
    Request {
        token: u64,
        down: u64,
        lose_down: bool,
        dup_down: bool,
    },
    Grant {
        token: u64,
        ttl: Duration,
        term: u64,
    },
}

/// Two clocks: the leader's advances with true time from `leader_base`; the holder's from
/// `holder_base` at `rate` times true time (1.0 = same rate, the model the design assumes; the
/// property also holds within the drift the margins are sized for).
struct Sim {
    cfg: LeaseConfig,
    holder_base: Instant,
    leader_base: Instant,
    rate: f64,
    now: u64,
    holder: LeaseHolder,
    term: u64,
    table: LeaseTable,
    queue: BTreeMap<(u64, u64), Msg>,
    seq: u64,
    /// token -> holder-clock send instant, for every renewal sent.
    sends: BTreeMap<u64, Instant>,
    /// The latest end of validity any issued grant can give, on the holder's clock.
    potential: Option<Instant>,
    /// True time the grantor first declared the node expired; it grants nothing after that
    /// (the shards are reassigned).
    declared_at: Option<u64>,
}

impl Sim {
    fn h(&self, t: u64) -> Instant {
        if self.rate == 1.0 {
            return self.holder_base + Duration::from_micros(t);
        }
        self.holder_base + Duration::from_nanos((t as f64 * 1000.0 * self.rate) as u64)
    }

    fn l(&self, t: u64) -> Instant {
        self.leader_base + Duration::from_micros(t)
    }

    fn send(&mut self, up: u64, down: u64, lose_up: bool, lose_down: bool, dup_down: bool) {
        let token = self.holder.on_send(self.h(self.now));
        self.sends.insert(token, self.h(self.now));
        if !lose_up {
            let msg = Msg::Request {
                token,
                down,
                lose_down,
                dup_down,
            };
            self.push(self.now + up, msg);
        }
    }

    fn push(&mut self, at: u64, msg: Msg) {
        self.seq += 1;
        self.queue.insert((at, self.seq), msg);
    }

    fn deliver(&mut self, msg: Msg) {
        match msg {
            Msg::Request {
                token,
                down,
                lose_down,
                dup_down,
            } => {
                // Requests that reach a deposed leader are dropped: only the current leader
                // grants. Once declared expired, the node gets nothing more.
                if self.declared_at.is_some() {
                    return;
                }
                let ttl = self.table.grant("n", self.l(self.now));
                let end = self.sends[&token] + ttl - self.cfg.drift_margin;
                self.potential = Some(self.potential.map_or(end, |p| p.max(end)));
                let grant = Msg::Grant {
                    token,
                    ttl,
                    term: self.term,
                };
                if !lose_down {
                    self.push(self.now + down, grant.clone());
                }
                if dup_down {
                    self.push(self.now + down + 1, grant);
                }
            }
            Msg::Grant { token, ttl, term } => {
                self.holder.on_grant(self.h(self.now), token, ttl, term, 0);
            }
        }
    }

    /// The invariant, checked at every instant something happens.
    fn check(&mut self) -> Result<(), TestCaseError> {
        if self.declared_at.is_none() && self.table.must_have_expired("n", self.l(self.now)) {
            self.declared_at = Some(self.now);
            // Closed form: no grant ever issued (delivered yet or not) reaches past this instant.
            if let Some(p) = self.potential {
                prop_assert!(
                    p <= self.h(self.now),
                    "declared at {} us, but an issued grant is valid until {:?} past it",
                    self.now,
                    p - self.h(self.now)
                );
            }
        }
        if let Some(d) = self.declared_at {
            prop_assert!(
                !self.holder.is_valid(self.h(self.now)),
                "declared expired at {} us, holder still valid at {} us (until {:?})",
                d,
                self.now,
                self.holder.valid_until()
            );
        }
        Ok(())
    }

    fn advance(&mut self, by: u64) -> Result<(), TestCaseError> {
        let target = self.now + by;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > target {
                break;
            }
            let ((at, _), msg) = entry.remove_entry();
            self.now = at;
            self.check()?;
            self.deliver(msg);
            self.check()?;
        }
        self.now = target;
        self.check()
    }
}

fn run_sim(
    cfg: LeaseConfig,
    holder_offset: u64,
    leader_offset: u64,
    rate: f64,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let base = Instant::now();
    let leader_base = base + Duration::from_micros(leader_offset);
    let mut sim = Sim {
        cfg,
        holder_base: base + Duration::from_micros(holder_offset),
        leader_base,
        rate,
        now: 0,
        holder: LeaseHolder::new(cfg),
        term: 1,
        table: LeaseTable::new_leader(cfg, leader_base),
        queue: BTreeMap::new(),
        seq: 0,
        sends: BTreeMap::new(),
        potential: None,
        declared_at: None,
    };
    for op in ops {
        match op {
            Op::Advance(us) => sim.advance(us)?,
            Op::Send {
                up,
                down,
                lose_up,
                lose_down,
                dup_down,
            } => sim.send(up, down, lose_up, lose_down, dup_down),
            Op::SendIfDue { up, down } => {
                if sim.holder.renew_due(sim.h(sim.now)) {
                    sim.send(up, down, false, false, false);
                }
            }
            Op::Elect => {
                sim.term += 1;
                sim.table = LeaseTable::new_leader(cfg, sim.l(sim.now));
            }
        }
        sim.check()?;
    }
    // Deliver everything still in flight and look again.
    sim.advance(10_000_000)?;
    Ok(())
}

fn lease_cfg() -> impl Strategy<Value = LeaseConfig> {
    (100u64..=3000).prop_flat_map(|ttl| {
        (Just(ttl), 0u64..ttl / 2).prop_map(|(ttl, margin)| LeaseConfig {
            ttl: ms(ttl),
            renew_every: ms((ttl - margin) / 4).max(ms(1)),
            drift_margin: ms(margin),
        })
    })
}

use crate::test_support::cases;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(512)))]

    /// Invariant 1: for any interleaving of sends, grants, delays (grants issued no earlier than
    /// the request was sent), losses, duplicates and leader changes, once the grantor says the
    /// node's lease must have expired at leader time t, the holder is not valid at any holder
    /// time from t on. Clocks advance at the same rate with an arbitrary offset between them.
    #[test]
    fn holder_stopped_before_grantor_declares_expiry(
        cfg in lease_cfg(),
        holder_offset in 0u64..10_000_000,
        leader_offset in 0u64..10_000_000,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        run_sim(cfg, holder_offset, leader_offset, 1.0, ops)?;
    }

    /// The same with the holder's clock running fast or slow relative to the leader's, within
    /// half of what the margins absorb (2 * margin / (ttl + margin)).
    #[test]
    fn holder_stopped_before_grantor_declares_expiry_with_drift(
        cfg in lease_cfg().prop_filter("needs a margin", |c| c.drift_margin >= ms(10)),
        holder_offset in 0u64..10_000_000,
        leader_offset in 0u64..10_000_000,
        drift in -1.0f64..=1.0,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let m = cfg.drift_margin.as_secs_f64();
        let max = m / (cfg.ttl.as_secs_f64() + m);
        run_sim(cfg, holder_offset, leader_offset, 1.0 + drift * max, ops)?;
    }
}

// ---- Serving edges (the ownership log's instants) ----

#[test]
fn a_lapse_is_dated_at_the_expiry_however_late_it_is_noticed() {
    let base = Instant::now();
    let mut h = LeaseHolder::new(cfg());
    let t1 = h.on_send(base);
    h.on_grant(base + ms(5), t1, ms(2000), 1, 0);
    assert!(h.may_serve(base + ms(6)));
    assert_eq!(
        h.take_edges(base + ms(6)),
        vec![ServeEdge::Began(base + ms(5))]
    );
    // Valid until 0 + 2000 - 200 = 1800. The process is starved and looks again only at 3 s,
    // when the next grant arrives: the serving period still ends at 1800, and the new one
    // begins when that grant arrived (it found the lease lapsed: the map must catch up first).
    let t2 = h.on_send(base + ms(2900));
    h.on_grant(base + ms(3000), t2, ms(2000), 1, 40);
    assert_eq!(
        h.take_edges(base + ms(3000)),
        vec![ServeEdge::Ended(base + ms(1800))]
    );
    assert!(
        !h.may_serve(base + ms(3001)),
        "map not acted on up to 40 yet"
    );
    h.set_acted(base + ms(3050), 39);
    assert!(!h.may_serve(base + ms(3051)));
    h.set_acted(base + ms(3100), 40);
    assert!(h.may_serve(base + ms(3101)));
    assert_eq!(
        h.take_edges(base + ms(3200)),
        vec![ServeEdge::Began(base + ms(3100))]
    );
    // A lapse noticed only by a later look is still dated at the expiry (2900 + 1800).
    assert!(!h.may_serve(base + ms(9000)));
    assert_eq!(
        h.take_edges(base + ms(9000)),
        vec![ServeEdge::Ended(base + ms(4700))]
    );
    assert!(h.take_edges(base + ms(9001)).is_empty());
}

#[test]
fn renewals_of_a_valid_lease_make_no_edges() {
    let base = Instant::now();
    let mut h = LeaseHolder::new(cfg());
    let mut edges = Vec::new();
    for i in 0..20u64 {
        let t = h.on_send(base + ms(500 * i));
        h.on_grant(base + ms(500 * i + 3), t, ms(2000), 1, i);
        edges.extend(h.take_edges(base + ms(500 * i + 4)));
    }
    assert_eq!(edges, vec![ServeEdge::Began(base + ms(3))]);
}

proptest! {
    /// Over random grant delays and losses, the edges alternate Began/Ended, are in time order,
    /// and the node may serve at an instant exactly when the edges say it began and not yet
    /// ended: the log's intervals are the admission intervals.
    #[test]
    fn edges_match_admission(steps in proptest::collection::vec((0u64..900, 0u64..1500, any::<bool>()), 1..40)) {
        let base = Instant::now();
        let mut h = LeaseHolder::new(cfg());
        let mut t = 0u64;
        let mut edges = Vec::new();
        let mut probes = Vec::new();
        for (gap, delay, lost) in steps {
            t += gap;
            let token = h.on_send(base + ms(t));
            if !lost {
                h.on_grant(base + ms(t + delay), token, ms(2000), 1, 0);
                t += delay;
            }
            probes.push((t, h.may_serve(base + ms(t))));
            edges.extend(h.take_edges(base + ms(t)));
        }
        let mut last: Option<(bool, Instant)> = None;
        for e in &edges {
            let (began, at) = match *e { ServeEdge::Began(a) => (true, a), ServeEdge::Ended(a) => (false, a) };
            if let Some((was, prev)) = last {
                prop_assert!(was != began, "edges alternate: {edges:?}");
                prop_assert!(at >= prev, "edges in order: {edges:?}");
            }
            last = Some((began, at));
        }
        for (t, serving) in probes {
            let at = base + ms(t);
            let mut on = false;
            for e in &edges {
                match *e {
                    ServeEdge::Began(a) if a <= at => on = true,
                    ServeEdge::Ended(a) if a <= at => on = false,
                    _ => {}
                }
            }
            prop_assert_eq!(on, serving, "at {} ms: {:?}", t, edges);
        }
    }
}
