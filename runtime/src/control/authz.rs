//! Who may send which control-plane request (pure: no I/O).
//!
//! The sender's name comes from its verified certificate (the transport hands it over); the
//! payload is only believed where it agrees with that name. Rules:
//!
//! - **Raft RPCs.** The leader or candidate id inside the message must be the sender's own id
//!   ([`node_id`] of its certificate name). RequestVote is accepted only from a voter of this
//!   node's current membership; AppendEntries and InstallSnapshot from a member of it (voter or
//!   learner: a learner promoted to voter may lead before this node has seen the promotion). A
//!   node whose Raft group is not initialised yet has no membership: it accepts RequestVote only
//!   from the voters its config lists, and AppendEntries/InstallSnapshot from any node (it holds
//!   nothing yet that could be damaged; this is how a joining learner first hears the leader).
//! - **Entries.** AppendEntries must carry entries whose indexes follow the previous log id
//!   without a gap and whose terms never go back or exceed the leader's term; anything else is
//!   refused before it reaches the log.
//! - **Join.** A node joins only under its own certificate name.
//! - **Forwarded proposals** (a node asks the leader to commit a command): a node may change
//!   only its own state (drain itself, leave), complete the handoff of a shard it owns to the
//!   target the map already names, report job progress and relay the dataset and job records of
//!   admin requests it audited (import, delete, submit, cancel): a member node is trusted to run
//!   jobs, and those requests were checked against the admin's certificate where they arrived. Every other command (membership of others, shard moves, voters,
//!   revocations, the shard count, autoscaling) is the leader's own or an admin operation.

use std::collections::BTreeSet;

use openraft::raft::AppendEntriesRequest;

use super::types::{node_id, ClusterMap, Command, MemberState};
use super::TypeConfig;

/// Why a control request was refused. Each is counted (`tidepool_control_refused_total`) and
/// audited by the node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The sender is not a voter (RequestVote) or not a member (replication) here.
    #[error("{from} is not a {needed} of this node's Raft membership")]
    NotVoter { from: String, needed: &'static str },
    /// The message names another node (or none) as its leader or candidate.
    #[error("{from} sent a Raft message as node id {claimed:?}, which is not its own")]
    Impersonation { from: String, claimed: Option<u64> },
    /// AppendEntries entries do not follow the previous log id.
    #[error("malformed entries from {from}: {reason}")]
    MalformedEntries { from: String, reason: String },
    /// A forwarded command the sender may not propose.
    #[error("{from} may not propose {what}")]
    ForbiddenCommand { from: String, what: String },
    /// A join under a name that is not the sender's.
    #[error("{from} may join only under its own name, not {claimed:?}")]
    WrongName { from: String, claimed: String },
}

impl Refused {
    /// The `reason` label of `tidepool_control_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refused::NotVoter { .. } => "not_voter",
            Refused::Impersonation { .. } => "impersonation",
            Refused::MalformedEntries { .. } => "malformed_entries",
            Refused::ForbiddenCommand { .. } => "forbidden_command",
            Refused::WrongName { .. } => "wrong_name",
        }
    }
}

/// What this node knows of the Raft membership when a Raft RPC arrives.
#[derive(Debug, Clone, Default)]
pub struct RaftView {
    /// Voter ids of the current membership config (both halves of a joint config).
    pub voters: BTreeSet<u64>,
    /// Every member id (voters and learners).
    pub members: BTreeSet<u64>,
    /// Voter ids from this node's own config, used while it has no membership yet.
    pub configured_voters: BTreeSet<u64>,
}

/// The kinds of Raft RPC, for [`check_raft`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaftRpc {
    Vote,
    Append,
    Snapshot,
}

/// Checks that `from` (certificate name) may send a Raft RPC claiming to come from node id
/// `claimed` (the candidate or leader id in the message).
pub fn check_raft(
    view: &RaftView,
    from: &str,
    claimed: Option<u64>,
    rpc: RaftRpc,
) -> Result<(), Refused> {
    let id = node_id(from);
    if claimed != Some(id) {
        return Err(Refused::Impersonation {
            from: from.to_string(),
            claimed,
        });
    }
    let initialised = !view.members.is_empty();
    let allowed = match (rpc, initialised) {
        (RaftRpc::Vote, true) => view.voters.contains(&id),
        (RaftRpc::Vote, false) => view.configured_voters.contains(&id),
        (RaftRpc::Append | RaftRpc::Snapshot, true) => view.members.contains(&id),
        (RaftRpc::Append | RaftRpc::Snapshot, false) => true,
    };
    if allowed {
        Ok(())
    } else {
        Err(Refused::NotVoter {
            from: from.to_string(),
            needed: if rpc == RaftRpc::Vote {
                "voter"
            } else {
                "member"
            },
        })
    }
}

/// Checks that an AppendEntries request's entries follow its previous log id without a gap,
/// with terms that never go back and never exceed the sender's term.
pub fn check_entries(from: &str, req: &AppendEntriesRequest<TypeConfig>) -> Result<(), Refused> {
    let bad = |reason: String| {
        Err(Refused::MalformedEntries {
            from: from.to_string(),
            reason,
        })
    };
    let term = req.vote.leader_id.term;
    let (mut next, mut last_term) = match &req.prev_log_id {
        Some(p) => (p.index.checked_add(1), p.leader_id.term),
        None => (Some(0), 0),
    };
    if last_term > term {
        return bad(format!(
            "previous log id has term {last_term} above the leader's term {term}"
        ));
    }
    for e in &req.entries {
        let Some(want) = next else {
            return bad("log index overflows".into());
        };
        if e.log_id.index != want {
            return bad(format!(
                "entry at index {} where {want} was expected",
                e.log_id.index
            ));
        }
        let t = e.log_id.leader_id.term;
        if t < last_term || t > term {
            return bad(format!(
                "entry {} has term {t} (previous {last_term}, leader {term})",
                e.log_id.index
            ));
        }
        last_term = t;
        next = want.checked_add(1);
    }
    Ok(())
}

/// Checks that `from` (certificate name) may have the leader commit `cmd` on its behalf.
pub fn check_propose(map: &ClusterMap, from: &str, cmd: &Command) -> Result<(), Refused> {
    let forbidden = |what: String| {
        Err(Refused::ForbiddenCommand {
            from: from.to_string(),
            what,
        })
    };
    let Some(me) = map.members.get(from) else {
        return forbidden("anything: it is not a member".into());
    };
    if me.state == MemberState::Down {
        return forbidden("anything: it is down".into());
    }
    match cmd {
        Command::SetMemberState { name, state } => {
            if name != from {
                return forbidden(format!("the state of {name}"));
            }
            match state {
                MemberState::Draining | MemberState::Down => Ok(()),
                other => forbidden(format!("its own state {}", other.as_str())),
            }
        }
        Command::Assign {
            shard,
            owner,
            handoff_to,
            ..
        } => {
            let current = map.shards.get(*shard as usize);
            let completes_own_handoff = current.is_some_and(|a| {
                a.owner.as_deref() == Some(from)
                    && a.handoff_to.is_some()
                    && a.handoff_to == *owner
                    && handoff_to.is_none()
            });
            if completes_own_handoff {
                Ok(())
            } else {
                forbidden(format!("an assignment of shard {shard}"))
            }
        }
        // A split's rows are reported by the owner of the shard they become part of, only.
        Command::ImportSplitDone { id, split, .. } => {
            let shard = map
                .imports
                .get(id)
                .and_then(|i| i.splits.get(*split as usize))
                .map(|s| s.shard);
            let owns = shard
                .and_then(|s| map.shards.get(s as usize))
                .is_some_and(|a| a.owner.as_deref() == Some(from));
            if owns {
                Ok(())
            } else {
                forbidden(format!(
                    "a report of import {id} split {split}, whose shard it does not own"
                ))
            }
        }
        Command::UpdateJob { .. }
        | Command::PutDataset(_)
        | Command::SubmitJob(_)
        | Command::DeleteDataset { .. }
        | Command::StartImport(_)
        | Command::FailImport { .. } => Ok(()),
        other => forbidden(command_name(other).into()),
    }
}

/// A command's name, for refusals and the audit log.
pub fn command_name(cmd: &Command) -> &'static str {
    match cmd {
        Command::Init { .. } => "init",
        Command::Join { .. } => "join",
        Command::SetMemberState { .. } => "set_member_state",
        Command::Assign { .. } => "assign",
        Command::Batch(_) => "batch",
        Command::PutDataset(_) => "put_dataset",
        Command::SubmitJob(_) => "submit_job",
        Command::UpdateJob { .. } => "update_job",
        Command::SetAutoscale(_) => "set_autoscale",
        Command::SetVoter { .. } => "set_voter",
        Command::Revoke { .. } => "revoke",
        Command::DeleteDataset { .. } => "delete_dataset",
        Command::StartImport(_) => "start_import",
        Command::ImportSplitDone { .. } => "import_split_done",
        Command::FailImport { .. } => "fail_import",
    }
}

#[cfg(test)]
#[path = "authz_tests.rs"]
mod tests;
