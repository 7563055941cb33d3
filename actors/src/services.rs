//! The node's services behind the router: what an inbound request that is not a shard op is
//! handed to (control-plane RPCs, lease renewals, drain and membership, status, dataset and job
//! administration, job tasks).

use std::sync::Arc;
use std::time::Instant;

use tidepool_runtime::certs::Identity;
use tidepool_runtime::codec::{
    AdminOp, AutoscaleInfo, ControlKind, DatasetPart, ErrorCode, JobPartial, JobTask, MemberInfo,
    MembershipOp, ParamPull, ParamPush, ParamReply, StatusInfo,
};
use tidepool_runtime::control::{Command, ControlPlane, MemberState, RpcKind};
use tidepool_runtime::metrics as m;
use tidepool_runtime::transport::Transport;
use tracing::warn;

use crate::audit::AuditLog;
use crate::job_admin::JobAdmin;
use crate::job_exec::JobExecutor;
use crate::leader::{ClusterLoad, Grant, Leases};

fn from_wire(k: ControlKind) -> RpcKind {
    match k {
        ControlKind::RaftAppend => RpcKind::Append,
        ControlKind::RaftVote => RpcKind::Vote,
        ControlKind::RaftSnapshot => RpcKind::Snapshot,
        ControlKind::Propose => RpcKind::Propose,
        ControlKind::Join => RpcKind::Join,
    }
}

/// What the router's inbound dispatcher calls for the requests that are not shard ops: the
/// control plane, leases, membership, status, dataset and job administration, job tasks. Concrete
/// handles, one per service; the router holds it from the node's start on.
pub struct Services {
    pub(crate) me: String,
    pub(crate) control: ControlPlane,
    pub(crate) leases: Arc<Leases>,
    pub(crate) transport: Transport,
    pub(crate) admin: Arc<JobAdmin>,
    pub(crate) exec: Arc<JobExecutor>,
    pub(crate) load: Arc<ClusterLoad>,
    pub(crate) audit: AuditLog,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").field("me", &self.me).finish()
    }
}

impl Services {
    /// Admin operations that change membership run on the leader only, which checks the admin
    /// certificate itself; elsewhere the client is told who leads (it retries there).
    fn leader_only(&self) -> Result<(), (ErrorCode, String)> {
        if self.control.is_leader() {
            return Ok(());
        }
        let leader = self.control.leader().map(|l| l.name);
        Err((
            ErrorCode::NotLeader,
            format!(
                "membership changes are made by the leader ({})",
                leader.as_deref().unwrap_or("none known")
            ),
        ))
    }
}

/// A rejected command's reason, as the user reads it.
fn rejected(r: &tidepool_runtime::control::CommandResponse) -> String {
    r.rejection()
        .unwrap_or("rejected by the control plane")
        .to_string()
}

fn control_failed(e: tidepool_runtime::control::ControlError) -> (ErrorCode, String) {
    use tidepool_runtime::control::ControlError as E;
    let code = match &e {
        E::NotLeader { .. } | E::NoLeader { .. } | E::Timeout(_) => ErrorCode::NotLeader,
        E::Invalid(_) | E::Rejected(_) => ErrorCode::BadRequest,
        E::Refused(_) => ErrorCode::Forbidden,
        _ => ErrorCode::Internal,
    };
    (code, e.to_string())
}

impl Services {
    pub async fn control(
        &self,
        from: Identity,
        kind: ControlKind,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, ErrorCode> {
        let (control, audit) = (self.control.clone(), self.audit.clone());
        async move {
            let kind = from_wire(kind);
            match control.handle_rpc(&from.name, kind, &payload).await {
                Ok(reply) => Ok(reply),
                Err(tidepool_runtime::control::ControlError::Refused(r)) => {
                    metrics::counter!(m::CONTROL_REFUSED, "reason" => r.label()).increment(1);
                    warn!(peer = %from.name, serial = %from.serial, rpc = %kind, reason = %r, "control request refused");
                    audit
                        .record(&from, &format!("raft_{kind}"), "", &format!("denied: {r}"))
                        .await;
                    ControlPlane::refusal_reply(kind, &r).ok_or(ErrorCode::Forbidden)
                }
                Err(e) => {
                    tracing::debug!(peer = %from.name, error = %e, "control RPC failed");
                    Err(ErrorCode::Internal)
                }
            }
        }
        .await
    }

    pub fn renew_lease(
        &self,
        from: &str,
        utilization: f64,
        backlog: u64,
    ) -> Result<Grant, ErrorCode> {
        if !self.control.is_leader() {
            return Err(ErrorCode::NotLeader);
        }
        self.load.record(from, utilization, backlog);
        let index = self.control.map().borrow().applied_index;
        self.leases
            .grant(from, Instant::now(), index)
            .ok_or(ErrorCode::NotLeader)
    }

    pub async fn drain(&self, node: String) -> Result<(), (ErrorCode, String)> {
        let control = self.control.clone();
        let leader = self.leader_only();
        async move {
            leader?;
            if !control.map().borrow().members.contains_key(&node) {
                return Err((ErrorCode::NotFound, format!("no member named {node:?}")));
            }
            let cmd = Command::SetMemberState {
                name: node.into(),
                state: MemberState::Draining,
            };
            match control.propose(cmd).await.map_err(control_failed)? {
                r if r.is_ok() => Ok(()),
                r => Err((ErrorCode::BadRequest, rejected(&r))),
            }
        }
        .await
    }

    pub async fn membership(
        &self,
        op: MembershipOp,
        node: String,
        serial: String,
    ) -> Result<String, (ErrorCode, String)> {
        let control = self.control.clone();
        let leader = self.leader_only();
        async move {
            leader?;
            let known = control.map().borrow().members.get(&node).cloned();
            match op {
                MembershipOp::Undrain => {
                    let Some(m) = known else {
                        return Err((ErrorCode::NotFound, format!("no member named {node:?}")));
                    };
                    if m.state != MemberState::Draining {
                        return Err((
                            ErrorCode::BadRequest,
                            format!("{node} is {}, not draining", m.state.as_str()),
                        ));
                    }
                    let cmd = Command::SetMemberState {
                        name: node.clone().into(),
                        state: MemberState::Up,
                    };
                    control.propose(cmd).await.map_err(control_failed)?;
                    Ok(format!("{node} takes shards again"))
                }
                MembershipOp::VoterAdd | MembershipOp::VoterRemove if known.is_none() => {
                    Err((ErrorCode::NotFound, format!("no member named {node:?}")))
                }
                MembershipOp::VoterAdd => {
                    control.add_voter(&node).await.map_err(control_failed)?;
                    Ok(format!("voters: {}", control.voters().join(", ")))
                }
                MembershipOp::VoterRemove => {
                    control.remove_voter(&node).await.map_err(control_failed)?;
                    Ok(format!("voters: {}", control.voters().join(", ")))
                }
                MembershipOp::Revoke => {
                    let serial = serial.to_ascii_lowercase();
                    let at_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    let cmd = Command::Revoke {
                        serial: serial.clone(),
                        name: node.clone(),
                        at_ms,
                    };
                    match control.propose(cmd).await.map_err(control_failed)? {
                        r if r.is_ok() => {}
                        r => return Err((ErrorCode::BadRequest, rejected(&r))),
                    }
                    // A revoked node that is only a learner leaves the Raft group too, so the
                    // leader stops replicating to it; a voter needs `cluster voters remove`.
                    let mut text = format!("revoked certificate {serial} of {node}");
                    if known.is_some() && control.forget_learner(&node).await.unwrap_or(false) {
                        text.push_str(&format!("; {node} left the Raft group"));
                    }
                    Ok(text)
                }
            }
        }
        .await
    }

    pub fn status(&self) -> StatusInfo {
        let map = self.control.map().borrow().clone();
        let live = self.transport.live_peers();
        let counts = map.shards.iter().filter_map(|a| a.owner.clone()).fold(
            std::collections::BTreeMap::new(),
            |mut acc, o| {
                *acc.entry(o).or_insert(0u32) += 1;
                acc
            },
        );
        let members = map
            .members
            .values()
            .map(|mb| MemberInfo {
                name: mb.name.to_string(),
                addr: mb.addr.clone(),
                state: mb.state.into(),
                reachable: mb.name == self.me || live.iter().any(|p| mb.name == *p),
                shards: counts.get(&mb.name).copied().unwrap_or(0),
                voter: mb.voter,
            })
            .collect();
        let autoscale = map.autoscale.as_ref().map(|a| AutoscaleInfo {
            desired: a.desired,
            current: a.current,
            utilization: a.utilization,
            backlog: a.backlog,
            reason: a.reason.clone(),
        });
        StatusInfo {
            leader: self.control.leader().map(|l| l.name).unwrap_or_default(),
            term: self.control.term(),
            members,
            autoscale,
            waiting_for: Vec::new(),
        }
    }

    pub async fn admin(
        &self,
        op: AdminOp,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, (ErrorCode, String)> {
        let admin = self.admin.clone();
        admin.handle(op, &payload).await
    }

    pub async fn dataset_part(&self, part: DatasetPart) -> Result<(), (ErrorCode, String)> {
        let admin = self.admin.clone();
        admin.dataset_part(part).await
    }

    pub async fn job_task(&self, task: JobTask) -> JobPartial {
        let exec = self.exec.clone();
        exec.run(task).await
    }

    pub async fn param_pull(&self, req: ParamPull) -> ParamReply {
        self.exec.param_pull(req).await
    }

    pub async fn param_push(&self, req: ParamPush) -> ParamReply {
        self.exec.param_push(req).await
    }
}
