//! The simulation's tests: many seeds of the real protocol must pass every checker, the same seed
//! must replay the same history, and each deliberately broken variant must be caught.
//!
//! - `SIM_SEEDS=N`: how many seeds [`seeds_keep_every_invariant`] runs (default 200, from 0).
//! - `SIM_SEED=N`: run only seed N (and print its whole trace), to replay a failure.
//! - `SIM_BUG=ignore-lease|eager-reassign|ack-before-durable|no-actor-checkpoint`: run those
//!   seeds with a broken variant (to look at how the checkers report it).
//! - `SIM_FIXES=as-is|NAME,NAME`: which [`Fixes`] the ports apply (default `as-is`, the code
//!   in `actors/` today, with every fix).

use std::time::Instant;

use super::*;

/// Seeds the broken variants get to show a violation in.
const BROKEN_SEEDS: u64 = 200;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn env_fixes() -> Fixes {
    let Ok(name) = std::env::var("SIM_FIXES") else {
        return Fixes::AS_IS;
    };
    Fixes::parse(name.trim()).unwrap_or_else(|| {
        panic!("SIM_FIXES={name:?}: expected as-is or a comma list of fix names")
    })
}

fn env_bug() -> Option<Bug> {
    let name = std::env::var("SIM_BUG").ok()?;
    let bug = Bug::parse(name.trim());
    assert!(
        bug.is_some(),
        "SIM_BUG={name:?}: expected one of {:?}",
        Bug::ALL.map(Bug::name)
    );
    bug
}

#[test]
fn seeds_keep_every_invariant() {
    let (bug, fixes) = (env_bug(), env_fixes());
    let (seeds, verbose): (Vec<u64>, bool) = match env_u64("SIM_SEED") {
        Some(seed) => (vec![seed], true),
        None => ((0..env_u64("SIM_SEEDS").unwrap_or(200)).collect(), false),
    };
    let started = Instant::now();
    let mut failed: Vec<Outcome> = Vec::new();
    let mut total = Stats::default();
    let mut slowest_convergence = 0;
    for &seed in &seeds {
        let o = run_seed(seed, bug, fixes);
        if verbose {
            println!("{}", o.report(usize::MAX));
            println!("{:?}", o.stats);
        }
        total.events += o.stats.events;
        total.ops += o.stats.ops;
        total.acked += o.stats.acked;
        total.faults += o.stats.faults;
        total.elections += o.stats.elections;
        total.reassigns += o.stats.reassigns;
        total.handoffs += o.stats.handoffs;
        total.fenced_writes += o.stats.fenced_writes;
        total.lease_expiries += o.stats.lease_expiries;
        total.storage_calls += o.stats.storage_calls;
        slowest_convergence = slowest_convergence.max(o.stats.converged_after.unwrap_or(0));
        if o.violation.is_some() {
            failed.push(o);
        }
    }
    println!(
        "cluster simulation: {} seeds (fixes {}) in {:.1?}: {} events, {} ops ({} acknowledged), {} faults, {} elections, \
         {} failovers, {} handoffs, {} fenced writes, {} lease expiries, {} storage calls; \
         slowest convergence {} ms after healing (bound {} ms)",
        seeds.len(),
        fixes.name(),
        started.elapsed(),
        total.events,
        total.ops,
        total.acked,
        total.faults,
        total.elections,
        total.reassigns,
        total.handoffs,
        total.fenced_writes,
        total.lease_expiries,
        total.storage_calls,
        slowest_convergence,
        CONVERGE_BOUND_MS,
    );
    for o in failed.iter().take(3) {
        eprintln!("{}", o.report(60));
    }
    for o in &failed {
        if let Some(v) = &o.violation {
            eprintln!("seed {}: {v}", o.seed);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} seeds failed: {}",
        failed.len(),
        seeds.len(),
        failed
            .iter()
            .map(|o| format!(
                "seed {} ({})",
                o.seed,
                o.violation.as_ref().map_or("?", Violation::kind)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

#[test]
fn a_seed_replays_exactly() {
    let fixes = Fixes::AS_IS;
    for (seed, bug) in [(3, None), (11, None), (5, Some(Bug::EagerReassign))] {
        let a = run_seed(seed, bug, fixes);
        let b = run_seed(seed, bug, fixes);
        assert_eq!(a.trace, b.trace, "seed {seed}: traces differ");
        assert_eq!(a.stats, b.stats, "seed {seed}");
        assert_eq!(a.violation, b.violation, "seed {seed}");
        assert_eq!(a.fingerprint(), b.fingerprint(), "seed {seed}");
        if bug.is_none() {
            assert!(a.stats.events > 1000, "seed {seed}: {:?}", a.stats);
            assert_eq!(a.violation, None, "{}", a.report(40));
        }
    }
    // And different seeds give different histories.
    assert_ne!(
        run_seed(3, None, fixes).fingerprint(),
        run_seed(4, None, fixes).fingerprint()
    );
}

/// Runs seeds `0..BROKEN_SEEDS` until one fails with a violation of one of `kinds`.
fn first_caught(bug: Option<Bug>, fixes: Fixes, kinds: &[&str]) -> Outcome {
    for seed in 0..BROKEN_SEEDS {
        let o = run_seed(seed, bug, fixes);
        if o.violation
            .as_ref()
            .is_some_and(|v| kinds.contains(&v.kind()))
        {
            println!("{}", o.report(25));
            return o;
        }
    }
    panic!(
        "bug {:?} with fixes {} went unnoticed for {BROKEN_SEEDS} seeds (wanted a {kinds:?} violation)",
        bug.map(Bug::name),
        fixes.name()
    );
}

#[test]
fn serving_without_a_lease_is_caught() {
    let o = first_caught(Some(Bug::IgnoreLease), Fixes::AS_IS, &["one-owner"]);
    assert!(matches!(o.violation, Some(Violation::TwoOwners { .. })));
}

#[test]
fn reassigning_before_the_lease_must_have_expired_is_caught() {
    let o = first_caught(Some(Bug::EagerReassign), Fixes::AS_IS, &["one-owner"]);
    assert!(matches!(o.violation, Some(Violation::TwoOwners { .. })));
}

#[test]
fn acknowledging_before_durable_is_caught() {
    let o = first_caught(Some(Bug::AckBeforeDurable), Fixes::AS_IS, &["lost-op"]);
    assert!(matches!(
        o.violation,
        Some(Violation::LostOp { .. } | Violation::CountOutOfBounds { .. })
    ));
}

/// Shard 0's log after epoch 1 appended each batch of `(op id, key)` as one segment.
fn logged(batches: &[&[(u64, u32)]]) -> Restore {
    let store = Store::in_memory();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut next = store.fence(0, 1).await.unwrap() + 1;
        for ops in batches {
            let n = ops.len() as u64;
            store
                .append(0, 1, next, n, encode_records(1, next, ops))
                .await
                .unwrap();
            next += n;
        }
        store.restore(0).await.unwrap()
    })
}

/// The payloads are the node's own: a segment decodes as the node's log records, a checkpoint
/// restores the same state, and replay applies an op once.
#[test]
fn payloads_are_the_nodes_own_encodings() {
    let r = logged(&[&[(7, 3), (9, 3), (7, 3)]]);
    let (state, replayed) = rebuild(0, &r).unwrap();
    assert_eq!(replayed, 3);
    assert_eq!(state.counter("k3"), Some(2), "op 7 applies once");
    assert!(state.has_applied(idem(7)) && state.has_applied(idem(9)));
    assert!(!state.has_applied(idem(8)));
    let snap = codec::decode_snapshot(&encode_checkpoint(&state, 4)).unwrap();
    assert_eq!(snap.seq, 4);
    assert_eq!(ShardState::from_snapshot(snap).counter("k3"), Some(2));
}

#[test]
fn the_checker_finds_an_op_logged_twice() {
    let r = logged(&[&[(5, 1), (6, 1)], &[(5, 1)]]);
    assert!(matches!(logged_twice(0, &r), Ok(Some(_))));
}

// ---- Bugs found in `actors/` (see `Fixes`): the port without each fix must still show it ----

// `forget-after-expiry` is pinned by the leader core's own table test
// (`a_down_member_is_forgotten_only_once_its_grant_must_have_expired`): since the leader no
// longer counts itself expired, the simulation does not reach that variant's failure within
// the broken-variant seed budget (its earlier catches, from seed 80 on, needed both).

/// The stuck handoff fixed in f0799c5 (found by the chaos harness) is caught here too.
#[test]
fn the_driver_before_f0799c5_is_caught() {
    let o = first_caught(Some(Bug::NoActorCheckpoint), Fixes::AS_IS, &["convergence"]);
    assert!(o.trace.iter().any(|l| l.contains("no actor")));
}

#[test]
fn actors_bug_a_previous_writer_of_the_same_epoch_fences_the_new_one() {
    let fixes = Fixes::AS_IS.without("reset-when-fenced").unwrap();
    let o = first_caught(None, fixes, &["convergence"]);
    assert!(o.trace.iter().any(|l| l.ends_with("fenced")));
}

/// Rare under these faults (about one seed in 1300): pinned. If a change to the model moves it,
/// find another with `SIM_FIXES=forget-after-expiry,reset-when-fenced SIM_SEEDS=3000`.
#[test]
fn actors_bug_a_grant_can_outrun_the_map_that_took_the_shards_away() {
    // Either fix alone prevents it: the later one (no grant while the shards move) too.
    let fixes = Fixes::AS_IS
        .without("map-with-grant")
        .and_then(|f| f.without("no-grant-while-expiring"))
        .unwrap();
    let o = run_seed(135, None, fixes);
    println!("{}", o.report(20));
    assert!(
        matches!(o.violation, Some(Violation::TwoOwners { .. })),
        "{}",
        o.report(20)
    );
    assert_eq!(run_seed(135, None, Fixes::AS_IS).violation, None);
}

#[test]
fn fixes_names_round_trip() {
    for f in [
        Fixes::AS_IS,
        Fixes::AS_IS.without("map-with-grant").unwrap(),
        Fixes::AS_IS.without("x").unwrap_or(Fixes::AS_IS),
    ] {
        assert_eq!(Fixes::parse(&f.name()), Some(f));
    }
    let one = Fixes::AS_IS.without("reset-when-fenced").unwrap();
    assert_eq!(
        one.name(),
        "forget-after-expiry,map-with-grant,no-grant-while-expiring"
    );
    assert_eq!(Fixes::parse(&one.name()), Some(one));
    assert_eq!(Fixes::parse("nope"), None);
}
