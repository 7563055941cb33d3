//! The router's inbound side: every request arriving from the transport. Who may send what
//! is one table ([`allowed`]: message kind -> the roles that may send it; invariant 8); then a
//! handler per kind. Shard requests are checked per op (a reader may only read), against the
//! map's epoch, the handoff buffer and admission (`serving::admit`).

use std::sync::atomic::Ordering;

use tidepool_runtime::certs::Role;
use tidepool_runtime::codec::{
    AdminOp, ArchivedBody, ArchivedDest, Body, ControlKind, Dest, Envelope, ErrorCode, Frame, Kind,
    MembershipOp,
};
use tidepool_runtime::metrics as m;
use tidepool_runtime::transport::{BoxFuture, Inbound, Link};
use tracing::debug;

use super::{call, error_body, owned_body, owned_request, result_body, Buffered, Router};
use crate::shard::ShardInput;
use tidepool_runtime::codec::OpRef;

/// Who may send a request of some kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Every authenticated peer (shard requests are then checked per op).
    Anyone,
    /// Other nodes only (control plane, leases, job tasks).
    Nodes,
    /// Admin clients only.
    Admins,
    /// Admin clients, and readers for read-only admin operations.
    AdminsOrReadingReaders,
    /// Not a request (a reply or an error): refused as a bad request.
    NotARequest,
}

/// The table: message kind -> who may send it.
pub fn allowed(kind: Kind) -> Allowed {
    match kind {
        Kind::ShardRequest | Kind::StatusRequest | Kind::ShardsRequest | Kind::Ping => {
            Allowed::Anyone
        }
        Kind::LeaseRenew | Kind::Control | Kind::JobTask | Kind::ParamPull | Kind::ParamPush => {
            Allowed::Nodes
        }
        Kind::Drain | Kind::Membership | Kind::DatasetPart => Allowed::Admins,
        Kind::Admin => Allowed::AdminsOrReadingReaders,
        Kind::ShardReply
        | Kind::StatusReply
        | Kind::ShardsReply
        | Kind::Pong
        | Kind::Error
        | Kind::ControlReply
        | Kind::LeaseGrant
        | Kind::JobPartial
        | Kind::ParamReply => Allowed::NotARequest,
    }
}

/// Whether `role` may send a request that [`allowed`] says `who` may send (`read_only`: an
/// admin request that only reads).
pub fn permits(who: Allowed, role: Role, read_only: bool) -> bool {
    match who {
        Allowed::Anyone => true,
        Allowed::Nodes => role == Role::Node,
        Allowed::Admins => role == Role::Admin,
        Allowed::AdminsOrReadingReaders => {
            role == Role::Admin || (role == Role::Reader && read_only)
        }
        Allowed::NotARequest => false,
    }
}

impl Router {
    // ---- inbound ------------------------------------------------------------------------------

    async fn handle(self, link: Link, frame: Frame) {
        let env = frame.envelope();
        let corr = env.correlation.to_native();
        let kind = env.body.kind();
        let peer = link.peer().clone();
        if peer.role != Role::Node {
            metrics::counter!(m::ADMIN_REQUESTS, "role" => peer.role.as_str(), "kind" => kind.as_str()).increment(1);
        }
        let Some(services) = self.inner.services.get().cloned() else {
            return reply(
                &link,
                self.name(),
                corr,
                error_body(ErrorCode::ShuttingDown, "starting"),
            )
            .await;
        };
        let read_only =
            matches!(&env.body, ArchivedBody::Admin { op, .. } if admin_op(op).read_only());
        match allowed(kind) {
            Allowed::NotARequest => {
                let body = error_body(ErrorCode::BadRequest, "not a request");
                return reply(&link, self.name(), corr, body).await;
            }
            who if !permits(who, peer.role, read_only) => {
                metrics::counter!(m::SHARD_REJECTED, "reason" => "forbidden").increment(1);
                let why = format!("role {} may not send {}", peer.role, kind.as_str());
                self.inner
                    .audit
                    .record(&peer, kind.as_str(), "", &format!("denied: {why}"))
                    .await;
                let body = error_body(ErrorCode::Forbidden, &why);
                return reply(&link, self.name(), corr, body).await;
            }
            _ => {}
        }
        let body = match &env.body {
            ArchivedBody::ShardRequest(_) => return self.handle_shard(link, frame, corr).await,
            ArchivedBody::StatusRequest => Body::StatusReply(services.status()),
            ArchivedBody::ShardsRequest => Body::ShardsReply(self.shards()),
            ArchivedBody::Ping(n) => Body::Pong(n.to_native()),
            ArchivedBody::LeaseRenew {
                sent_at,
                utilization_milli,
                backlog,
            } => {
                let utilization = f64::from(utilization_milli.to_native().min(1000)) / 1000.0;
                match services.renew_lease(&peer.name, utilization, backlog.to_native()) {
                    Ok(g) => Body::LeaseGrant {
                        sent_at: sent_at.to_native(),
                        ttl_ms: g.ttl.as_millis() as u64,
                        term: g.term,
                        map_index: g.map_index,
                    },
                    Err(code) => error_body(code, "not the leader"),
                }
            }
            ArchivedBody::Control { kind: ck, payload } => {
                let (ck, payload) = (control_kind(ck), payload.as_slice().to_vec());
                return self.reply_later(link, corr, async move {
                    match services.control(peer, ck, payload).await {
                        Ok(bytes) => Body::ControlReply(bytes),
                        Err(code) => error_body(code, "control request failed"),
                    }
                });
            }
            ArchivedBody::Drain { node } => {
                let node = node.as_str().to_string();
                let audit = self.inner.audit.clone();
                return self.reply_later(link, corr, async move {
                    let result = services.drain(node.clone()).await;
                    audit.record(&peer, "drain", &node, &outcome(&result)).await;
                    control_reply(result, |()| Vec::new())
                });
            }
            ArchivedBody::Membership { op, node, serial } => {
                let op = membership_op(op);
                let (node, serial) = (node.as_str().to_string(), serial.as_str().to_string());
                let audit = self.inner.audit.clone();
                return self.reply_later(link, corr, async move {
                    let result = services.membership(op, node.clone(), serial.clone()).await;
                    let target = if serial.is_empty() {
                        node
                    } else {
                        format!("{node} serial={serial}")
                    };
                    audit
                        .record(&peer, op.as_str(), &target, &outcome(&result))
                        .await;
                    control_reply(result, String::into_bytes)
                });
            }
            ArchivedBody::Admin { op, payload } => {
                let (op, payload) = (admin_op(op), payload.as_slice().to_vec());
                let audit = (!op.read_only()).then(|| self.inner.audit.clone());
                return self.reply_later(link, corr, async move {
                    let target = audit.as_ref().map(|_| admin_target(&payload));
                    let result = services.admin(op, payload).await;
                    if let (Some(audit), Some(target)) = (audit, target) {
                        audit
                            .record(&peer, op.as_str(), &target, &outcome(&result))
                            .await;
                    }
                    control_reply(result, |bytes| bytes)
                });
            }
            ArchivedBody::DatasetPart(_) => {
                let Some(Body::DatasetPart(part)) = owned_body(&frame) else {
                    return reply(
                        &link,
                        self.name(),
                        corr,
                        error_body(ErrorCode::BadRequest, "bad part"),
                    )
                    .await;
                };
                let audit = self.inner.audit.clone();
                return self.reply_later(link, corr, async move {
                    let target = format!(
                        "dataset={} import={} shard={} seg={}",
                        part.dataset, part.import, part.shard, part.seg
                    );
                    let result = services.dataset_part(part).await;
                    audit
                        .record(&peer, "dataset_part", &target, &outcome(&result))
                        .await;
                    control_reply(result, |()| Vec::new())
                });
            }
            ArchivedBody::JobTask(_) => {
                let Some(Body::JobTask(task)) = owned_body(&frame) else {
                    return reply(
                        &link,
                        self.name(),
                        corr,
                        error_body(ErrorCode::BadRequest, "bad task"),
                    )
                    .await;
                };
                return self.reply_later(link, corr, async move {
                    Body::JobPartial(services.job_task(task).await)
                });
            }
            ArchivedBody::ParamPull(_) | ArchivedBody::ParamPush(_) => {
                let body = owned_body(&frame);
                return self.reply_later(link, corr, async move {
                    match body {
                        Some(Body::ParamPull(req)) => {
                            Body::ParamReply(services.param_pull(req).await)
                        }
                        Some(Body::ParamPush(req)) => {
                            Body::ParamReply(services.param_push(req).await)
                        }
                        _ => error_body(ErrorCode::BadRequest, "bad parameter request"),
                    }
                });
            }
            _ => error_body(ErrorCode::BadRequest, "not a request"),
        };
        reply(&link, self.name(), corr, body).await;
    }

    /// Answers a request whose work takes a while: runs `body` on its own task and replies with
    /// its result, so the connection's reader is not held up.
    fn reply_later(
        self,
        link: Link,
        corr: u64,
        body: impl std::future::Future<Output = Body> + Send + 'static,
    ) {
        tokio::spawn(async move {
            let body = body.await;
            reply(&link, self.name(), corr, body).await;
        });
    }

    async fn handle_shard(self, link: Link, frame: Frame, corr: u64) {
        let env = frame.envelope();
        let ArchivedBody::ShardRequest(req) = &env.body else {
            return;
        };
        let op = OpRef::from_archived(&req.op);
        let peer = link.peer().clone();
        let refuse = |code: ErrorCode, reason: &'static str, msg: String| {
            metrics::counter!(m::SHARD_REJECTED, "reason" => reason).increment(1);
            error_body(code, &msg)
        };
        let (shard, epoch) = match &env.dest {
            ArchivedDest::Shard { shard, epoch } => (shard.to_native(), epoch.to_native()),
            _ => {
                let body = refuse(
                    ErrorCode::BadRequest,
                    "bad_request",
                    "shard request without a shard".into(),
                );
                return reply(&link, self.name(), corr, body).await;
            }
        };
        let current = self.owner(shard);
        let early = if shard >= self.shard_count() {
            Some(refuse(
                ErrorCode::BadRequest,
                "bad_request",
                format!("no shard {shard}"),
            ))
        } else if op.is_write() && peer.role == Role::Reader {
            let why = format!("role {} may not write", peer.role);
            self.inner
                .audit
                .record(
                    &peer,
                    &format!("shard_{}", op.name()),
                    &format!("shard={shard}"),
                    &format!("denied: {why}"),
                )
                .await;
            Some(refuse(ErrorCode::Forbidden, "forbidden", why))
        } else if self.inner.shutting_down.load(Ordering::SeqCst) {
            Some(refuse(
                ErrorCode::ShuttingDown,
                "shutting_down",
                "node is shutting down".into(),
            ))
        } else if current.as_ref().is_some_and(|(_, e)| epoch < *e) {
            metrics::counter!(m::STALE_EPOCH_REJECTIONS).increment(1);
            Some(refuse(
                ErrorCode::NotOwner,
                "stale_epoch",
                format!("shard {shard} epoch {epoch} is stale"),
            ))
        } else {
            None
        };
        if let Some(body) = early {
            return reply(&link, self.name(), corr, body).await;
        }
        if peer.role == Role::Admin {
            self.inner
                .audit
                .record(
                    &peer,
                    &format!("shard_{}", op.name()),
                    &format!("shard={shard}"),
                    "admitted",
                )
                .await;
        }
        let Some((owner, map_epoch)) = current else {
            let body = refuse(
                ErrorCode::NotOwner,
                "not_owner",
                format!("shard {shard} is unassigned"),
            );
            return reply(&link, self.name(), corr, body).await;
        };
        if owner == self.inner.cfg.name {
            // Buffer during a graceful handoff (bounded), serve when accepting.
            let full = {
                let mut s = self.inner.slots[shard as usize].lock();
                if s.actor.is_some() && s.epoch == map_epoch && !s.accepting {
                    if s.buffer.len() < self.inner.cfg.handoff_buffer {
                        s.buffer.push_back(Buffered { link, frame, corr });
                        metrics::gauge!(m::HANDOFF_BUFFERED).increment(1.0);
                        return;
                    }
                    true
                } else {
                    false
                }
            };
            if full {
                let body = refuse(
                    ErrorCode::Overloaded,
                    "handoff_buffer_full",
                    format!("shard {shard} is moving"),
                );
                return reply(&link, self.name(), corr, body).await;
            }
            let (permit, actor) = match self.admit_local(shard, map_epoch).await {
                Ok(x) => x,
                Err(code) => {
                    let body = refuse(
                        code,
                        "not_owner",
                        format!("shard {shard} is not served here now"),
                    );
                    return reply(&link, self.name(), corr, body).await;
                }
            };
            tokio::spawn(async move {
                let result = call(actor, ShardInput::Wire(frame), permit).await;
                reply(&link, self.name(), corr, result_body(result)).await;
            });
        } else if peer.role == Role::Node {
            let body = refuse(
                ErrorCode::NotOwner,
                "not_owner",
                format!("shard {shard} is owned by {owner}"),
            );
            reply(&link, self.name(), corr, body).await;
        } else {
            // A client with an old map: forward on its behalf (bounded).
            let Ok(permit) = self.inner.forwards.clone().acquire_owned().await else {
                return;
            };
            let Some(owned_req) = owned_request(&frame) else {
                let body = refuse(ErrorCode::BadRequest, "bad_request", "bad request".into());
                return reply(&link, self.name(), corr, body).await;
            };
            tokio::spawn(async move {
                let _permit = permit;
                let result = self.send_to_shard(shard, owned_req).await;
                let label = if result.is_ok() { "ok" } else { "error" };
                metrics::counter!(m::ROUTER_FORWARDED, "result" => label).increment(1);
                reply(&link, self.name(), corr, result_body(result)).await;
            });
        }
    }
}

fn control_kind(k: &tidepool_runtime::codec::ArchivedControlKind) -> ControlKind {
    use tidepool_runtime::codec::ArchivedControlKind as A;
    match k {
        A::RaftAppend => ControlKind::RaftAppend,
        A::RaftVote => ControlKind::RaftVote,
        A::RaftSnapshot => ControlKind::RaftSnapshot,
        A::Propose => ControlKind::Propose,
        A::Join => ControlKind::Join,
    }
}

fn membership_op(k: &tidepool_runtime::codec::ArchivedMembershipOp) -> MembershipOp {
    use tidepool_runtime::codec::ArchivedMembershipOp as A;
    match k {
        A::Undrain => MembershipOp::Undrain,
        A::VoterAdd => MembershipOp::VoterAdd,
        A::VoterRemove => MembershipOp::VoterRemove,
        A::Revoke => MembershipOp::Revoke,
    }
}

/// The reply to an admin or control request: its bytes, or its error.
fn control_reply<T>(r: Result<T, (ErrorCode, String)>, bytes: impl FnOnce(T) -> Vec<u8>) -> Body {
    match r {
        Ok(v) => Body::ControlReply(bytes(v)),
        Err((code, message)) => error_body(code, &message),
    }
}

/// The audit log's `result` of an admin request.
fn outcome<T>(r: &Result<T, (ErrorCode, String)>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err((ErrorCode::Forbidden, m)) => format!("denied: {m}"),
        Err((code, m)) => format!("error: {code:?}: {m}"),
    }
}

/// The ids an admin request names (dataset, import, job), for the audit log: read from its
/// JSON payload; whatever is not there is left out.
fn admin_target(payload: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return String::new();
    };
    ["name", "import", "id", "dataset"]
        .iter()
        .filter_map(|k| {
            v.get(*k)
                .and_then(|x| x.as_str())
                .map(|x| format!("{k}={x}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn admin_op(k: &tidepool_runtime::codec::ArchivedAdminOp) -> AdminOp {
    use tidepool_runtime::codec::ArchivedAdminOp as A;
    match k {
        A::DatasetCommit => AdminOp::DatasetCommit,
        A::DatasetAbort => AdminOp::DatasetAbort,
        A::DatasetList => AdminOp::DatasetList,
        A::JobSubmit => AdminOp::JobSubmit,
        A::JobStatus => AdminOp::JobStatus,
        A::JobList => AdminOp::JobList,
        A::JobCancel => AdminOp::JobCancel,
        A::JobResult => AdminOp::JobResult,
        A::DatasetDelete => AdminOp::DatasetDelete,
        A::JobResultChunk => AdminOp::JobResultChunk,
        A::DatasetImport => AdminOp::DatasetImport,
        A::DatasetImportStatus => AdminOp::DatasetImportStatus,
    }
}

pub(super) async fn reply(link: &Link, me: &str, corr: u64, body: Body) {
    if let Err(e) = link.reply(Envelope::new(me, Dest::Peer, corr, body)).await {
        debug!(peer = %link.peer().name, error = %e, "reply not sent");
    }
}

impl Inbound for Router {
    fn on_request(&self, link: Link, frame: Frame) -> BoxFuture {
        Box::pin(self.clone().handle(link, frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Authority follows identity: the whole table, every kind against every role.
    #[test]
    fn who_may_send_what() {
        use Role::{Admin, Node, Reader};
        let table: [(Kind, [bool; 3]); 12] = [
            // kind, [node, admin, reader] (admin requests: a read-only one)
            (Kind::ShardRequest, [true, true, true]),
            (Kind::StatusRequest, [true, true, true]),
            (Kind::Ping, [true, true, true]),
            (Kind::LeaseRenew, [true, false, false]),
            (Kind::Control, [true, false, false]),
            (Kind::JobTask, [true, false, false]),
            (Kind::ParamPull, [true, false, false]),
            (Kind::ParamPush, [true, false, false]),
            (Kind::Drain, [false, true, false]),
            (Kind::Membership, [false, true, false]),
            (Kind::DatasetPart, [false, true, false]),
            (Kind::Admin, [false, true, true]),
        ];
        for (kind, want) in table {
            for (role, want) in [Node, Admin, Reader].into_iter().zip(want) {
                assert_eq!(
                    permits(allowed(kind), role, true),
                    want,
                    "{kind:?} {role:?}"
                );
            }
        }
        assert!(
            !permits(allowed(Kind::Admin), Reader, false),
            "a reader may not write"
        );
        for k in [
            Kind::ShardReply,
            Kind::Pong,
            Kind::LeaseGrant,
            Kind::JobPartial,
            Kind::ParamReply,
        ] {
            assert_eq!(allowed(k), Allowed::NotARequest);
        }
    }
}
