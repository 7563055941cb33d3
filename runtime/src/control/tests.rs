//! Cluster tests over the simulated network (`sim.rs`): 3 voters and learners in one process.
//! Each test names the section of the Raft paper (Ongaro & Ousterhout, "In Search of an
//! Understandable Consensus Algorithm", extended version) whose property it checks. Waits are
//! polls with deadlines; nothing sleeps to synchronise.

use std::time::Duration;

use super::sim::{addr_of, eventually, maps_satisfy, stable_leader, Cluster};
use super::{
    ClusterMap, Command, CommandResponse, ControlConfig, ControlError, ControlPlane, MemberState,
    NodeInfo, RpcKind,
};

const WAIT: Duration = Duration::from_secs(15);

fn assign(shard: u32, expect_epoch: u64, owner: &str, epoch: u64) -> Command {
    Command::Assign {
        shard,
        expect_epoch,
        owner: Some(owner.into()),
        epoch,
        handoff_to: None,
    }
}

fn followers(nodes: &[ControlPlane], leader: &ControlPlane) -> Vec<ControlPlane> {
    nodes
        .iter()
        .filter(|n| n.me().name != leader.me().name)
        .cloned()
        .collect()
}

/// §5.2 (leader election) and §5.3 (log replication): one leader is elected, and committed
/// entries reach every member, including a learner, which does not vote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_elected_and_map_replicated_to_learner() {
    let mut c = Cluster::new(3);
    let voters = c.start_voters().await;
    let leader = stable_leader(&voters).await;
    let learner = c.start("l1").await;
    // The learner knows no leader yet: its join goes to the configured voters, which redirect.
    learner.join(learner.me().clone(), false).await.unwrap();
    assert_eq!(
        leader.propose(Command::Init { shards: 8 }).await.unwrap(),
        CommandResponse::Ok
    );

    let mut all = voters.clone();
    all.push(learner.clone());
    maps_satisfy(&all, "4 members and 8 shards everywhere", |m| {
        m.members.len() == 4 && m.shards.len() == 8
    })
    .await;
    let map = learner.map().borrow().clone();
    assert!(!map.members["l1"].voter);
    assert!(["v1", "v2", "v3"]
        .iter()
        .all(|v| map.members[*v].voter && map.members[*v].state == MemberState::Joining));
    let metrics = leader.raft_metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    assert_eq!(membership.voter_ids().count(), 3);
    assert_eq!(
        membership.learner_ids().collect::<Vec<_>>(),
        vec![learner.id()]
    );
    // Everyone, the learner included, reports the same leader and term on the leadership watch.
    let term = leader.term();
    eventually("leadership watches agree", WAIT, || {
        all.iter()
            .all(|n| *n.leadership().borrow() == Some((term, n.me().name == leader.me().name)))
            .then_some(())
    })
    .await;
    assert_eq!(
        learner.leader().map(|l| l.name),
        Some(leader.me().name.clone())
    );

    // A restarted learner rejoins under the same name from a new address: the membership and
    // the map follow the address, and no second member appears.
    c.kill("l1").await;
    let cfg = c.config("l1", "sim://l1-moved");
    let learner = c.start_with(cfg).await;
    learner.join(learner.me().clone(), false).await.unwrap();
    let mut all = voters.clone();
    all.push(learner.clone());
    maps_satisfy(&all, "l1 at its new address", |m| {
        m.members.len() == 4 && m.members["l1"].addr == "sim://l1-moved"
    })
    .await;
    let metrics = leader.raft_metrics().borrow().clone();
    let node = metrics
        .membership_config
        .membership()
        .get_node(&learner.id())
        .cloned();
    assert_eq!(node.map(|n| n.addr), Some("sim://l1-moved".to_string()));
    c.stop_all().await;
}

/// §5.1 / §8 (client interaction): a follower does not serve writes itself but redirects them to
/// the leader; the proposal commits and the reply reaches the follower's caller. Applying a
/// stale compare-and-set is rejected by every replica alike (§5.4.3: state machine safety makes
/// the rejection deterministic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposal_via_follower_is_forwarded_and_cas_rejects_stale_epoch() {
    let mut c = Cluster::new(3);
    let voters = c.start_voters().await;
    let leader = stable_leader(&voters).await;
    let follower = followers(&voters, &leader).remove(0);
    assert!(!follower.is_leader());

    let (f, l) = (follower.me().name.clone(), leader.me().name.clone());
    assert_eq!(
        leader.propose(Command::Init { shards: 4 }).await.unwrap(),
        CommandResponse::Ok
    );
    let handoff = Command::Assign {
        shard: 2,
        expect_epoch: 0,
        owner: Some((&f).into()),
        epoch: 1,
        handoff_to: Some((&l).into()),
    };
    assert_eq!(leader.propose(handoff).await.unwrap(), CommandResponse::Ok);
    // Forwarded: the follower completes the handoff of a shard it owns (what a node may ask).
    let complete = Command::Assign {
        shard: 2,
        expect_epoch: 1,
        owner: Some((&l).into()),
        epoch: 2,
        handoff_to: None,
    };
    assert_eq!(
        follower.propose(complete.clone()).await.unwrap(),
        CommandResponse::Ok
    );
    // Returned after commit + apply on the leader: the leader's map already has it.
    assert_eq!(leader.map().borrow().shards[2].epoch, 2);
    // The same decision again (a retry, or a deposed leader's) must not apply twice.
    let stale = leader.propose(complete).await.unwrap();
    assert!(
        matches!(&stale, CommandResponse::Rejected(r) if r.contains("expected 1")),
        "{stale:?}"
    );
    // A command the follower may not propose (it no longer owns shard 2) is refused by the
    // leader, with the reason, at once.
    let err = follower.propose(assign(2, 2, &f, 3)).await.unwrap_err();
    assert!(err.to_string().contains("may not propose"), "{err}");
    maps_satisfy(&voters, "shard 2 owned by the leader at epoch 2", |m| {
        m.shards.len() == 4
            && m.shards[2].owner.as_deref() == Some(l.as_str())
            && m.shards[2].epoch == 2
    })
    .await;
    c.stop_all().await;
}

/// A map without its applied index (a new leader's blank entry moves the index, not the map).
fn content(m: &ClusterMap) -> ClusterMap {
    ClusterMap {
        applied_index: 0,
        ..m.clone()
    }
}

/// §5.2 (a follower that hears no heartbeat starts an election) and §5.4.3 (leader completeness:
/// the new leader holds every committed entry): killing the leader yields a new leader in a
/// higher term with the map intact, and the cluster keeps committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_a_new_one_with_the_map_intact() {
    let mut c = Cluster::new(3);
    let voters = c.start_voters().await;
    let learner = c.start("l1").await;
    learner.join(learner.me().clone(), false).await.unwrap();
    let old = stable_leader(&voters).await;
    old.propose(Command::Init { shards: 4 }).await.unwrap();
    old.propose(assign(0, 0, "l1", 1)).await.unwrap();
    let before = old.map().borrow().clone();
    let old_term = old.term();

    let old_name = old.me().name.clone();
    c.kill(&old_name).await;
    let survivors = followers(&voters, &old);
    let new = stable_leader(&survivors).await;
    assert_ne!(new.me().name, old_name);
    assert!(new.term() > old_term);
    assert_eq!(
        content(&new.map().borrow()),
        content(&before),
        "committed entries survive the leader"
    );

    // Still a quorum (2 of 3): proposals commit, on the new leader and to the learner.
    assert_eq!(
        new.propose(assign(0, 1, "v2", 2)).await.unwrap(),
        CommandResponse::Ok
    );
    let mut live = survivors.clone();
    live.push(learner.clone());
    maps_satisfy(&live, "shard 0 at epoch 2", |m| {
        m.shards.first().is_some_and(|s| s.epoch == 2)
    })
    .await;
    eventually("learner follows the new leader", WAIT, || {
        (learner.leader().map(|l| l.name) == Some(new.me().name.clone())).then_some(())
    })
    .await;
    c.stop_all().await;
}

/// A partition isolating the leader. §5.2: the majority side elects a new leader and commits
/// (§5.3: commitment needs a majority). The minority leader cannot commit, so its proposals time
/// out. §5.1: after healing, the old leader sees the higher term and steps down; §5.3: its
/// uncommitted entries are overwritten and it converges to the majority's log and map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_steps_down_and_converges_after_healing() {
    let mut c = Cluster::new(3);
    let voters = c.start_voters().await;
    let learner = c.start("l1").await;
    learner.join(learner.me().clone(), false).await.unwrap();
    let old = stable_leader(&voters).await;
    old.propose(Command::Init { shards: 4 }).await.unwrap();
    maps_satisfy(
        std::slice::from_ref(&learner),
        "learner has the shards",
        |m| m.shards.len() == 4,
    )
    .await;
    let old_term = old.term();

    let majority = followers(&voters, &old);
    let majority_names: Vec<&str> = majority
        .iter()
        .map(|n| n.me().name.as_str())
        .chain(["l1"])
        .collect();
    c.net.partition(&[old.me().name.as_str()], &majority_names);

    let new = stable_leader(&majority).await;
    assert!(new.term() > old_term);
    assert_eq!(
        new.propose(assign(1, 0, "v1", 1)).await.unwrap(),
        CommandResponse::Ok
    );

    // The old leader still believes it leads (no check-quorum in openraft 0.9), but cannot commit.
    let ghost = Command::Join {
        name: "ghost".into(),
        addr: "nowhere".into(),
        voter: false,
    };
    let res = old.propose(ghost).await;
    assert!(
        matches!(
            res,
            Err(ControlError::Timeout(_) | ControlError::NoLeader { .. })
        ),
        "minority proposal must not succeed: {res:?}"
    );
    assert!(!old.map().borrow().members.contains_key("ghost"));

    c.net.heal();
    let mut all = voters.clone();
    all.push(learner.clone());
    eventually("old leader steps down", WAIT, || {
        (!old.is_leader() && old.leader().is_some_and(|l| l.name == new.me().name)).then_some(())
    })
    .await;
    assert!(old.term() >= new.term());
    let want = new.map().borrow().clone();
    maps_satisfy(&all, "everyone has the majority's map", |m| {
        content(m) == content(&want)
    })
    .await;
    assert!(!want.members.contains_key("ghost"));
    assert_eq!(want.shards[1].epoch, 1);
    c.stop_all().await;
}

/// Figure 2 ("persistent state on all servers", updated on stable storage before responding) and
/// §7 (log compaction): a voter restarted from its data dir comes back with its map before it
/// hears from anyone (snapshot file + committed log), then catches up; a learner that joins
/// after the log was compacted receives the leader's snapshot (InstallSnapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_voter_keeps_its_map_and_late_learner_gets_a_snapshot() {
    let mut c = Cluster::new(3);
    c.snapshot_every = 10;
    let voters = c.start_voters().await;
    let leader = stable_leader(&voters).await;
    leader.propose(Command::Init { shards: 2 }).await.unwrap();
    for epoch in 1..=15u64 {
        leader
            .propose(assign(0, epoch - 1, "v1", epoch))
            .await
            .unwrap();
    }
    let victim = followers(&voters, &leader).remove(0);
    let name = victim.me().name.clone();
    maps_satisfy(
        std::slice::from_ref(&victim),
        "victim applied epoch 15",
        |m| m.shards[0].epoch == 15,
    )
    .await;
    let before = victim.map().borrow().clone();
    c.kill(&name).await;
    // More history while it is down: it must catch up afterwards.
    for epoch in 16..=30u64 {
        leader
            .propose(assign(0, epoch - 1, "v1", epoch))
            .await
            .unwrap();
    }

    // Restart it cut off from everyone: whatever it has now came from its own disk.
    let others: Vec<String> = c.names();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    c.net.partition(&[name.as_str()], &others);
    let restarted = c.start(&name).await;
    {
        let map = restarted.map().borrow().clone();
        assert_eq!(map.members, before.members);
        assert!(
            map.shards[0].epoch >= 15 && map.shards[0].epoch <= 30,
            "epoch {}",
            map.shards[0].epoch
        );
    }
    c.net.heal();
    let live: Vec<ControlPlane> = c.names().iter().map(|n| c.node(n)).collect();
    maps_satisfy(&live, "restarted voter caught up", |m| {
        m.shards[0].epoch == 30
    })
    .await;

    // The leader has compacted its log; a brand-new learner can only be served by a snapshot.
    eventually("leader purged its log", WAIT, || {
        leader
            .raft_metrics()
            .borrow()
            .purged
            .is_some()
            .then_some(())
    })
    .await;
    let learner = c.start("l9").await;
    learner.join(learner.me().clone(), false).await.unwrap();
    maps_satisfy(
        std::slice::from_ref(&learner),
        "late learner has the map",
        |m| m.shards.len() == 2 && m.shards[0].epoch == 30,
    )
    .await;
    assert!(
        learner.raft_metrics().borrow().snapshot.is_some(),
        "learner installed a snapshot"
    );
    c.stop_all().await;
}

/// A single voter forms a cluster by itself (dev mode); hostile or broken RPC payloads are
/// errors, never panics; `bootstrap` and `join` are idempotent; misconfigurations are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_voter_bad_payloads_and_config_checks() {
    let mut c = Cluster::new(1);
    let nodes = c.start_voters().await;
    let n = stable_leader(&nodes).await;
    n.bootstrap().await.unwrap();
    n.join(n.me().clone(), true).await.unwrap();
    assert_eq!(
        n.propose(Command::Init { shards: 3 }).await.unwrap(),
        CommandResponse::Ok
    );
    assert_eq!(n.map().borrow().members.len(), 1);
    assert!(n.linearizable_map().await.unwrap().shards.len() == 3);

    for kind in RpcKind::ALL {
        for payload in [
            &b""[..],
            b"garbage",
            b"{\"x\":1}",
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        ] {
            let err = n.handle_rpc("n2", kind, payload).await.unwrap_err();
            assert!(
                matches!(err, ControlError::BadPayload { .. }),
                "{kind}: {err}"
            );
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let voters = vec![
        NodeInfo::new("a", addr_of("a")),
        NodeInfo::new("a", addr_of("a")),
    ];
    let bad = ControlConfig::new("a", addr_of("a"), dir.path(), voters);
    let err = ControlPlane::start(bad, nowhere()).await.unwrap_err();
    assert!(matches!(err, ControlError::Config(_)), "{err}");
    let mut bad = ControlConfig::new(
        "a",
        addr_of("a"),
        dir.path(),
        vec![NodeInfo::new("a", addr_of("a"))],
    );
    bad.election_timeout = (Duration::from_millis(50), Duration::from_millis(40));
    assert!(matches!(
        ControlPlane::start(bad, nowhere()).await,
        Err(ControlError::Config(_))
    ));

    n.shutdown().await;
    assert!(matches!(
        n.propose(Command::Init { shards: 3 }).await,
        Err(ControlError::ShutDown)
    ));
    assert_eq!(*n.leadership().borrow(), None);
    c.stop_all().await;
}

/// A transport that reaches nobody.
fn nowhere() -> std::sync::Arc<dyn super::RaftTransport> {
    struct Nowhere;
    #[async_trait::async_trait]
    impl super::RaftTransport for Nowhere {
        async fn call(&self, _: &NodeInfo, _: RpcKind, _: Vec<u8>) -> Result<Vec<u8>, String> {
            Err("nowhere".into())
        }
    }
    std::sync::Arc::new(Nowhere)
}
