#![allow(clippy::unwrap_used)]

use openraft::raft::AppendEntriesRequest;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

use super::*;
use crate::control::types::{Member, ShardAssignment};

fn view(voters: &[&str], learners: &[&str]) -> RaftView {
    RaftView {
        voters: voters.iter().map(|n| node_id(n)).collect(),
        members: voters.iter().chain(learners).map(|n| node_id(n)).collect(),
        configured_voters: voters.iter().map(|n| node_id(n)).collect(),
    }
}

#[test]
fn raft_senders_must_be_who_they_claim_and_in_the_membership() {
    let v = view(&["n1", "n2", "n3"], &["n4"]);
    let id = |n: &str| Some(node_id(n));
    // (sender, claimed, rpc, expected label or ok)
    let cases: &[(&str, Option<u64>, RaftRpc, Option<&str>)] = &[
        ("n2", id("n2"), RaftRpc::Vote, None),
        ("n2", id("n2"), RaftRpc::Append, None),
        ("n2", id("n2"), RaftRpc::Snapshot, None),
        // A learner may lead after a promotion we have not seen yet, but never ask for votes.
        ("n4", id("n4"), RaftRpc::Append, None),
        ("n4", id("n4"), RaftRpc::Vote, Some("not_voter")),
        // A spare (or stolen) node certificate that is not a member: the finding's vote storm
        // and fake leader.
        ("n9", id("n9"), RaftRpc::Vote, Some("not_voter")),
        ("n9", id("n9"), RaftRpc::Append, Some("not_voter")),
        ("n9", id("n9"), RaftRpc::Snapshot, Some("not_voter")),
        // A member speaking for another member.
        ("n2", id("n1"), RaftRpc::Append, Some("impersonation")),
        ("n9", id("n1"), RaftRpc::Vote, Some("impersonation")),
        ("n2", None, RaftRpc::Append, Some("impersonation")),
    ];
    for (from, claimed, rpc, want) in cases {
        let got = check_raft(&v, from, *claimed, *rpc)
            .err()
            .map(|e| e.label());
        assert_eq!(got, *want, "{from} as {claimed:?} sending {rpc:?}");
    }
}

#[test]
fn an_uninitialised_node_takes_votes_only_from_configured_voters() {
    let v = RaftView {
        configured_voters: [node_id("n1"), node_id("n2")].into(),
        ..RaftView::default()
    };
    assert!(check_raft(&v, "n1", Some(node_id("n1")), RaftRpc::Vote).is_ok());
    assert!(check_raft(&v, "n9", Some(node_id("n9")), RaftRpc::Vote).is_err());
    // A joining learner first hears the leader while it has no membership.
    assert!(check_raft(&v, "n5", Some(node_id("n5")), RaftRpc::Append).is_ok());
    assert!(check_raft(&v, "n5", Some(node_id("n1")), RaftRpc::Append).is_err());
}

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, node_id("n1")), index)
}

fn append(
    term: u64,
    prev: Option<(u64, u64)>,
    entries: &[(u64, u64)],
) -> AppendEntriesRequest<TypeConfig> {
    AppendEntriesRequest {
        vote: Vote::new_committed(term, node_id("n1")),
        prev_log_id: prev.map(|(t, i)| log_id(t, i)),
        entries: entries
            .iter()
            .map(|(t, i)| Entry {
                log_id: log_id(*t, *i),
                payload: EntryPayload::Blank,
            })
            .collect(),
        leader_commit: None,
    }
}

#[test]
fn entries_must_follow_the_previous_log_id() {
    let ok: &[AppendEntriesRequest<TypeConfig>] = &[
        append(3, Some((2, 10)), &[]),
        append(3, Some((2, 10)), &[(2, 11), (3, 12)]),
        append(1, None, &[(0, 0), (1, 1)]),
    ];
    for r in ok {
        assert!(check_entries("n1", r).is_ok(), "{r:?}");
    }
    let bad: &[(AppendEntriesRequest<TypeConfig>, &str)] = &[
        // The finding: one entry leaving a gap stopped the node's Raft core for good.
        (append(3, Some((2, 10)), &[(3, 15)]), "at index 15"),
        (append(3, Some((2, 10)), &[(3, 11), (3, 13)]), "at index 13"),
        (append(3, Some((2, 10)), &[(3, 10)]), "at index 10"),
        (append(3, Some((2, 10)), &[(1, 11)]), "term 1"),
        (append(3, Some((2, 10)), &[(4, 11)]), "term 4"),
        (append(3, Some((5, 10)), &[]), "above the leader's term"),
        (append(3, Some((2, u64::MAX)), &[(3, 0)]), "overflows"),
    ];
    for (r, why) in bad {
        let e = check_entries("n1", r).unwrap_err();
        assert_eq!(e.label(), "malformed_entries");
        assert!(e.to_string().contains(why), "{e} should say {why}");
    }
}

fn map() -> ClusterMap {
    let mut m = ClusterMap::default();
    for (n, state) in [
        ("n1", MemberState::Up),
        ("n2", MemberState::Up),
        ("n3", MemberState::Down),
    ] {
        m.members.insert(
            n.into(),
            Member {
                name: n.into(),
                addr: "127.0.0.1:1".into(),
                state,
                voter: true,
            },
        );
    }
    m.shards = vec![
        ShardAssignment {
            owner: Some("n1".into()),
            epoch: 4,
            handoff_to: Some("n2".into()),
        },
        ShardAssignment {
            owner: Some("n2".into()),
            epoch: 2,
            handoff_to: None,
        },
    ];
    m
}

#[test]
fn nodes_may_propose_only_what_concerns_themselves() {
    let m = map();
    let state = |name: &str, state| Command::SetMemberState {
        name: name.into(),
        state,
    };
    let assign = |shard, owner: &str| Command::Assign {
        shard,
        expect_epoch: 4,
        owner: Some(owner.into()),
        epoch: 5,
        handoff_to: None,
    };
    let cases: Vec<(&str, Command, bool)> = vec![
        ("n1", state("n1", MemberState::Draining), true),
        ("n1", state("n1", MemberState::Down), true),
        // The finding: SetMemberState on another node.
        ("n1", state("n2", MemberState::Draining), false),
        ("n1", state("n2", MemberState::Down), false),
        ("n1", state("n1", MemberState::Up), false),
        // Completing its own handoff to the target the map names.
        ("n1", assign(0, "n2"), true),
        ("n1", assign(0, "n1"), false),
        ("n2", assign(0, "n2"), false),
        ("n1", assign(1, "n1"), false),
        ("n1", assign(9, "n2"), false),
        // Not a member, or down.
        ("n9", state("n9", MemberState::Draining), false),
        ("n3", state("n3", MemberState::Draining), false),
        // The leader's own commands.
        ("n1", Command::Init { shards: 4 }, false),
        (
            "n1",
            Command::Join {
                name: "n1".into(),
                addr: "x".into(),
                voter: true,
            },
            false,
        ),
        ("n1", Command::Batch(vec![]), false),
        (
            "n1",
            Command::SetVoter {
                name: "n1".into(),
                voter: true,
            },
            false,
        ),
        (
            "n1",
            Command::Revoke {
                serial: "ab".into(),
                name: "n2".into(),
                at_ms: 0,
            },
            false,
        ),
    ];
    for (from, cmd, ok) in cases {
        let got = check_propose(&m, from, &cmd);
        assert_eq!(got.is_ok(), ok, "{from} proposing {cmd:?}: {got:?}");
        if let Err(e) = got {
            assert_eq!(e.label(), "forbidden_command");
        }
    }
}

#[test]
fn an_import_split_is_reported_only_by_its_shard_owner() {
    use crate::control::imports::{
        ColumnPlan, Format, ImportRecord, ImportSpec, ImportState, NullPolicy, Split, SplitDone,
        SplitUnit,
    };
    let mut m = map();
    let split = |shard| Split {
        file: "a.parquet".into(),
        unit: SplitUnit::RowGroups { first: 0, count: 1 },
        shard,
        bytes: 10,
    };
    m.imports.insert(
        "g1".into(),
        ImportRecord {
            id: "g1".into(),
            dataset: "d".into(),
            spec: ImportSpec {
                url: "file:///x.parquet".into(),
                format: Format::Parquet,
                label: "y".into(),
                features: vec![],
                nulls: NullPolicy::Refuse,
                max_categories: 4,
                hash_buckets: 4,
                split_bytes: 1,
                zero_based: false,
            },
            columns: vec![ColumnPlan::Numeric { name: "a".into() }],
            shards: 2,
            splits: vec![split(0), split(1)],
            done: vec![None, None],
            state: ImportState::Running,
            error: None,
        },
    );
    let report = |id: &str, split| Command::ImportSplitDone {
        id: id.into(),
        split,
        done: Box::new(SplitDone {
            rows: 1,
            dropped: 0,
            segments: 1,
            checksum: 0,
            sums: vec![],
            counts: vec![],
            columns: 0,
            nnz: 0,
        }),
    };
    // Split 0 is on shard 0 (owned by n1, handing off to n2), split 1 on shard 1 (n2's).
    let cases: Vec<(&str, Command, bool)> = vec![
        ("n1", report("g1", 0), true),
        ("n2", report("g1", 1), true),
        // Another node's split: refused, even from the handoff target or a member that is up.
        ("n2", report("g1", 0), false),
        ("n1", report("g1", 1), false),
        // No such split or import, or not a member.
        ("n1", report("g1", 7), false),
        ("n1", report("nope", 0), false),
        ("n9", report("g1", 0), false),
    ];
    for (from, cmd, ok) in cases {
        let got = check_propose(&m, from, &cmd);
        assert_eq!(got.is_ok(), ok, "{from} proposing {cmd:?}: {got:?}");
    }
}
