//! What a node says before it runs: its start-up phase (forming the cluster, joining, running)
//! for `/readyz`, systemd's status line and `cluster status`, and the stand-in request handler
//! that answers `cluster status` while the node still waits for the other voters.
//!
//! A voter of a cluster that has never formed waits for every configured voter as long as it
//! takes. Meanwhile an operator asking any of them gets an answer that names whom it waits for,
//! instead of a timeout.

use std::collections::BTreeMap;
use std::sync::Arc;

use tidepool_runtime::codec::{
    ArchivedBody, Body, Dest, Envelope, ErrorCode, MemberInfo, StatusInfo, WireMemberState,
};
use tidepool_runtime::transport::{BoxFuture, Inbound, Link};
use tokio::sync::watch;
use tracing::debug;

/// Where a starting node is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Phase {
    /// Loading certificates, keys and storage.
    #[default]
    Starting,
    /// Dialling the seeds for the configured voters. `found`: voter name -> address, this node
    /// included if it is a voter.
    Forming {
        waiting_for: Vec<String>,
        found: BTreeMap<String, String>,
    },
    /// The voters are known; starting the control plane and joining.
    Joining,
    /// Started: readiness is the member state and the lease from now on.
    Running,
}

impl Phase {
    /// One line for people: the `/readyz` body, systemd's STATUS=.
    pub fn describe(&self) -> String {
        match self {
            Phase::Starting => "starting".into(),
            Phase::Forming { waiting_for, .. } if waiting_for.is_empty() => {
                "forming the cluster: every voter answered".into()
            }
            Phase::Forming { waiting_for, .. } => format!(
                "forming the cluster: waiting for voter(s) {} to answer at the seed addresses",
                waiting_for.join(", ")
            ),
            Phase::Joining => "joining the cluster".into(),
            Phase::Running => "running".into(),
        }
    }
}

/// Publishes the phase; cloned into whoever shows it.
pub type PhaseTx = Arc<watch::Sender<Phase>>;

/// A fresh phase channel, at [`Phase::Starting`].
pub fn phase_channel() -> PhaseTx {
    Arc::new(watch::channel(Phase::Starting).0)
}

/// Answers requests that arrive before the router exists: `cluster status` with the voters
/// this node waits for, `cluster shards` (none assigned yet), `Ping`; anything else gets a retryable error naming the phase.
#[derive(Debug)]
pub struct FormingStatus {
    me: String,
    voters: Vec<String>,
    phase: watch::Receiver<Phase>,
}

impl FormingStatus {
    pub fn new(me: &str, voters: &[String], phase: &PhaseTx) -> Self {
        FormingStatus {
            me: me.to_string(),
            voters: voters.to_vec(),
            phase: phase.subscribe(),
        }
    }

    /// The status reply for the phase now: no leader, the configured voters, whom we wait for.
    pub fn status(&self) -> StatusInfo {
        let phase = self.phase.borrow().clone();
        let (waiting_for, found) = match phase {
            Phase::Forming { waiting_for, found } => (waiting_for, found),
            _ => (Vec::new(), BTreeMap::new()),
        };
        let members = self
            .voters
            .iter()
            .map(|v| MemberInfo {
                name: v.clone(),
                addr: found.get(v).cloned().unwrap_or_default(),
                state: WireMemberState::Forming,
                reachable: v == &self.me || found.contains_key(v),
                shards: 0,
                voter: true,
            })
            .collect();
        StatusInfo {
            leader: String::new(),
            term: 0,
            members,
            autoscale: None,
            waiting_for,
        }
    }

    fn answer(&self, body: &ArchivedBody) -> Body {
        match body {
            ArchivedBody::StatusRequest => Body::StatusReply(self.status()),
            // No shard has an owner before the cluster forms (clients load this on connect).
            ArchivedBody::ShardsRequest => Body::ShardsReply(Vec::new()),
            ArchivedBody::Ping(n) => Body::Pong(n.to_native()),
            _ => Body::Error {
                // Retryable: the sender asks again, and once the node runs the router answers.
                code: ErrorCode::NotLeader,
                message: format!(
                    "node {} is not running yet ({})",
                    self.me,
                    self.phase.borrow().describe()
                ),
            },
        }
    }
}

impl Inbound for FormingStatus {
    fn on_request(&self, link: Link, frame: tidepool_runtime::codec::Frame) -> BoxFuture {
        let env = frame.envelope();
        let corr = env.correlation.to_native();
        let body = self.answer(&env.body);
        let me = self.me.clone();
        Box::pin(async move {
            if let Err(e) = link.reply(Envelope::new(me, Dest::Peer, corr, body)).await {
                debug!(peer = %link.peer().name, error = %e, "reply not sent");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_voters_still_awaited() {
        let tx = phase_channel();
        let voters = vec!["n1".to_string(), "n2".to_string(), "n3".to_string()];
        let fs = FormingStatus::new("n1", &voters, &tx);
        tx.send_replace(Phase::Forming {
            waiting_for: vec!["n2".into(), "n3".into()],
            found: BTreeMap::from([("n1".to_string(), "10.0.0.1:7400".to_string())]),
        });
        let s = fs.status();
        assert_eq!(s.leader, "");
        assert_eq!(s.waiting_for, vec!["n2", "n3"]);
        assert_eq!(s.members.len(), 3);
        assert!(s.members[0].reachable && !s.members[1].reachable);
        assert_eq!(s.members[0].addr, "10.0.0.1:7400");
        assert!(tx
            .borrow()
            .describe()
            .contains("waiting for voter(s) n2, n3"));
        tx.send_replace(Phase::Joining);
        assert!(fs.status().waiting_for.is_empty());
    }
}
