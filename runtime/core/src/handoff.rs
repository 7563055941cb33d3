//! Sans-IO shard handoff: one shard's ownership, seen from one node, as a state machine that
//! takes events and returns effects (ARCHITECTURE.md, invariants 1 "one owner", 3 "acknowledged
//! means durable" and 4 "lossless handoff").
//!
//! [`ShardHandoff::handle`] takes the instant and an [`Event`] (a cluster-map assignment, a lease
//! change, the result of an effect the caller ran) and returns the [`Effect`]s to run, in order.
//! It never reads a clock, sends, or touches storage; the caller (the node's shard supervisor)
//! does, and reports back with more events. Unexpected events (a result nobody waits for, a
//! duplicate) change nothing and return no effects.
//!
//! # Rules
//!
//! - **Serve** ([`ShardRole::Serving`]) only while the shard is assigned to this node at epoch `e`,
//!   the node's lease is valid, and the shard was restored at `e` (restore fences the storage log
//!   at `e`, so any older owner's writes are refused: invariant 2).
//! - **Graceful handoff** (the assignment says `handoff_to = X` while this node owns the shard):
//!   [`Effect::StopAccepting`] (the router buffers new messages), [`Effect::WaitInflight`], then
//!   [`Effect::WriteCheckpoint`], then [`Effect::ReportHandoffDone`]. When the control plane
//!   commits `(epoch + 1, X)` this node stops and the router forwards its buffer to X, in order
//!   ([`Effect::DeliverBuffered`]). The target may change at the same epoch (the checkpoint is
//!   reported again), but the handoff cannot be *withdrawn* at that epoch: a report from it may
//!   still be in flight to the leader, and resuming service while the leader commits it would
//!   make two owners. The control plane cancels a handoff by assigning the same owner at
//!   `epoch + 1` (a stale report then fails the epoch compare-and-set); an assignment that merely
//!   clears `handoff_to` at the same epoch leaves this node draining toward the last target.
//! - **Takeover** (assigned to this node at a new epoch, gracefully or after a crash):
//!   [`Effect::StopAccepting`], [`Effect::Restore`], then [`Effect::StartServing`] and
//!   [`Effect::DeliverBuffered`].
//! - **Lease lost**: stop admitting at once and buffer ([`Effect::StopAccepting`]; the actor and
//!   its log writer already refuse everything once the lease lapsed on the node's own clock). A
//!   shard that was serving plainly (no handoff under way) is *suspended*: its actor keeps its
//!   state. On regaining the lease while the assignment is unchanged, [`Effect::CheckFence`]
//!   proves from storage that no newer epoch took the log meanwhile, and [`Effect::Resume`] lets
//!   the same actor serve again: a short lapse costs one storage read, not a restore (under CPU
//!   starvation, restoring every shard after every lapse starved the next renewal, a loop). The
//!   suspended state is the log's: an op is applied in memory before its append, but an append
//!   that fails faults the writer, which then answers nothing more, and the caller throws the
//!   machine and the actor away and restores from storage. Any other lapse (during a handoff,
//!   a restore or a check) stops the actor ([`Effect::StopServing`]), and regaining the lease
//!   restores again before serving: the restore's fence is what proves that nobody took the
//!   shard meanwhile. Restores are numbered, and only the latest attempt's result counts: an
//!   earlier restore at the same epoch that finishes late read the log before the writes
//!   acknowledged since (by this node, between two lease losses), and serving its state would
//!   answer reads without them.
//! - **Fenced by storage** (a write was refused because a newer epoch fenced the log): stop and
//!   stay [`ShardRole::Fenced`] until an assignment with a newer epoch arrives.
//! - **Stale assignments** (an epoch older than one already seen, or the same epoch naming another
//!   owner) are ignored and reported as [`Effect::StaleIgnored`] for
//!   `tidepool_stale_epoch_rejections_total`.
//!
//! # What the caller must guarantee
//!
//! - [`Event::Assigned`] for one shard arrive in the order the control plane committed them (the
//!   node applies the replicated cluster map in log order). Epochs order ownership changes, but a
//!   handoff's start, retarget and withdrawal share an epoch, so only log order tells them apart.
//! - A node whose lease the leader declared expired learns the cluster map that came with its next
//!   grant (and feeds the assignments here) before it reports [`Event::LeaseRegained`].
//! - [`Effect::Restore`] fences before it reads, and reports [`Event::FencedByStorage`] if the log
//!   is already fenced at a newer epoch. Operations are acknowledged only once durable in the log
//!   at the shard's epoch (invariant 3), so a write that loses the fence race was never
//!   acknowledged.

use crate::node_id::NodeId;
use std::collections::VecDeque;
use std::time::Instant;

/// Why a handoff component could not be built. Nothing was created; the caller keeps what it had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    /// A [`RouterBuffer`] needs room for at least one message: with none, every message sent
    /// during a handoff is refused, which is almost certainly a configuration mistake.
    #[error("router buffer capacity must be at least 1")]
    ZeroCapacity,
}

/// What this node is doing with the shard (the projection that metrics, `/readyz` and the router
/// read). At most one node is [`Serving`](Self::Serving) a shard at any instant (invariant 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardRole {
    /// Accepting and applying operations at `epoch`.
    Serving {
        /// The fencing epoch every operation and write carries.
        epoch: u64,
    },
    /// Handing off to `to`: no new operations; finishing in-flight ones, then checkpointing.
    Draining {
        /// The epoch being handed off.
        epoch: u64,
        /// The node taking over.
        to: NodeId,
    },
    /// Storage refused a write at `epoch` because a newer epoch fenced the log: someone else owns
    /// the shard now; waiting for the assignment that says so.
    Fenced {
        /// The epoch this node held, now superseded.
        epoch: u64,
    },
    /// Assigned here at `epoch` with a valid lease; loading state and fencing the log.
    Restoring {
        /// The epoch being taken over.
        epoch: u64,
    },
    /// Not serving: another node owns the shard, or this node has no valid lease for it.
    NotOwner,
}

/// An input to [`ShardHandoff::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The control plane says the shard is owned by `owner` (this node or another) at `epoch`,
    /// and is being handed to `handoff_to` if set. Delivered in commit order.
    Assigned {
        /// The shard's fencing epoch.
        epoch: u64,
        /// The owning node (`None`: unassigned).
        owner: Option<NodeId>,
        /// The node taking over, during a graceful handoff.
        handoff_to: Option<NodeId>,
    },
    /// This node's lease lapsed ([`crate::lease::LeaseHolder::is_valid`] turned false).
    LeaseLost,
    /// This node holds a valid lease again (or for the first time: a new machine starts without).
    LeaseRegained,
    /// Draining: the shard actor reports that its in-flight operations reached zero.
    InflightDrained,
    /// A checkpoint asked for by [`Effect::WriteCheckpoint`] is durable at `(epoch, seq)`.
    CheckpointWritten {
        /// The epoch the checkpoint was written under.
        epoch: u64,
        /// The op-log sequence number the checkpoint covers.
        seq: u64,
    },
    /// Writing the checkpoint failed (not fenced: e.g. storage unavailable). The machine waits for
    /// [`Event::Retry`], so the caller chooses the backoff.
    CheckpointFailed {
        /// For logs.
        reason: String,
    },
    /// [`Effect::Restore`] number `attempt` finished: the log is fenced at `epoch` and the state
    /// is loaded up to `seq`. Only the latest attempt counts: an earlier restore at the same
    /// epoch that finishes late read the log before writes acknowledged since, and serving its
    /// state would answer reads without them.
    Restored {
        /// The epoch the log was fenced at.
        epoch: u64,
        /// The last op-log sequence number applied.
        seq: u64,
        /// The [`Effect::Restore`] this answers.
        attempt: u64,
    },
    /// Restore `attempt` failed (not fenced: e.g. storage unavailable). Waits for
    /// [`Event::Retry`].
    RestoreFailed {
        /// For logs.
        reason: String,
        /// The [`Effect::Restore`] this answers.
        attempt: u64,
    },
    /// A storage write (restore fence, op-log append or checkpoint) carrying `epoch` was refused
    /// because a newer epoch fenced the log. Reports for an epoch older than the current
    /// assignment are late and ignored.
    FencedByStorage {
        /// The epoch the refused write carried.
        epoch: u64,
    },
    /// Retry whatever failed last (a restore or a checkpoint); a no-op if nothing did.
    Retry,
}

/// An output of [`ShardHandoff::handle`], to be run by the caller in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// New operations for the shard are buffered at the router (or refused with a retryable
    /// `NotOwner` when the buffer is full) until [`Effect::DeliverBuffered`]. In-flight operations
    /// finish. Invariant 4: nothing is dropped while ownership moves.
    StopAccepting,
    /// Ask the shard actor to send [`Event::InflightDrained`] when its in-flight count is zero.
    WaitInflight,
    /// Write a checkpoint of the shard under `epoch`; answer with [`Event::CheckpointWritten`],
    /// [`Event::CheckpointFailed`] or [`Event::FencedByStorage`].
    WriteCheckpoint {
        /// The epoch to write under (the storage fence checks it).
        epoch: u64,
    },
    /// Tell the control plane the shard is checkpointed: commit `(epoch + 1, handoff_to)`.
    ReportHandoffDone {
        /// The epoch handed off.
        epoch: u64,
        /// The sequence number the checkpoint covers.
        seq: u64,
    },
    /// Fence the log at `epoch`, then load the newest valid checkpoint of the highest epoch and
    /// the op log since. Answer with [`Event::Restored`], [`Event::RestoreFailed`] or
    /// [`Event::FencedByStorage`].
    Restore {
        /// The epoch being taken over.
        epoch: u64,
        /// Numbers this machine's restores; the answer carries it back.
        attempt: u64,
    },
    /// Start accepting operations at `epoch`, on the restored state (a new actor).
    StartServing {
        /// The epoch to stamp on every write.
        epoch: u64,
    },
    /// Read (never write) the shard's log and check that `epoch` still holds it: no newer epoch
    /// fenced or wrote it since this node's suspended actor last served. Answer with
    /// [`Event::Restored`] (same `attempt`; `seq` is not used), [`Event::FencedByStorage`], or
    /// [`Event::RestoreFailed`] (which stops the actor and falls back to a full restore).
    CheckFence {
        /// The epoch the suspended actor serves at.
        epoch: u64,
        /// Numbered with the restores; the answer carries it back.
        attempt: u64,
    },
    /// The suspended actor (still alive, its state the log's) accepts operations at `epoch`
    /// again; the router delivers what it buffered meanwhile to it.
    Resume {
        /// The epoch the actor serves at.
        epoch: u64,
    },
    /// Stop the shard actor: no more operations are applied or acknowledged here.
    StopServing {
        /// Why, for logs: `"lease lost"`, `"handed off"`, `"reassigned"`, `"fenced"`,
        /// `"epoch changed"`.
        reason: &'static str,
    },
    /// Flush the router's buffer for the shard, in arrival order, to the current owner (this
    /// node after [`Effect::StartServing`], else the assigned owner).
    DeliverBuffered,
    /// An assignment was older than one already seen and was ignored; count it in
    /// `tidepool_stale_epoch_rejections_total`.
    StaleIgnored,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Assignment {
    epoch: u64,
    owner: Option<NodeId>,
    handoff_to: Option<NodeId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RestoreState {
    Idle,
    /// (epoch, attempt)
    InFlight(u64, u64),
    /// (epoch, attempt)
    Failed(u64, u64),
    Done(u64),
    /// The actor of this epoch is alive but admits nothing: the lease lapsed while it served.
    Suspended(u64),
    /// (epoch, attempt): [`Effect::CheckFence`] issued for a suspended actor.
    Checking(u64, u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainPhase {
    WaitingInflight,
    Checkpointing,
    CheckpointFailed,
    Reported { seq: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Drain {
    epoch: u64,
    to: NodeId,
    phase: DrainPhase,
}

/// One shard's ownership from one node's point of view (invariants 1, 3, 4). See the module
/// documentation for the rules.
///
/// A new machine has no assignment and no lease: it does nothing until it has both.
#[derive(Debug, Clone)]
pub struct ShardHandoff {
    me: NodeId,
    shard: u32,
    assignment: Option<Assignment>,
    lease_valid: bool,
    restore: RestoreState,
    /// Restores issued so far (the last one's number is the only answer taken).
    restore_attempts: u64,
    drain: Option<Drain>,
    /// The last handoff target seen while this node owned the shard, and its epoch: once a
    /// handoff began at an epoch, this node never serves at that epoch again.
    handoff_seen: Option<(u64, NodeId)>,
    /// The last accepted assignment changed `handoff_to` at the same epoch: a finished drain
    /// reports again (the leader may have ignored the earlier report while no handoff was set).
    handoff_changed: bool,
    /// The epoch at which storage refused us; cleared by a newer assignment.
    fenced: Option<u64>,
    /// The shard actor runs: StartServing sent, StopServing not since.
    live: bool,
    /// The actor takes new operations: StartServing sent, no StopAccepting/StopServing since.
    accepting: bool,
    /// The router buffers the shard's messages: StopAccepting sent, DeliverBuffered not since.
    buffering: bool,
    role: ShardRole,
    role_since: Option<Instant>,
}

impl ShardHandoff {
    /// The machine for `shard` on the node called `me`: no assignment, no lease, not owner.
    pub fn new(me: impl Into<NodeId>, shard: u32) -> Self {
        Self {
            me: me.into(),
            shard,
            assignment: None,
            lease_valid: false,
            restore: RestoreState::Idle,
            restore_attempts: 0,
            drain: None,
            handoff_seen: None,
            handoff_changed: false,
            fenced: None,
            live: false,
            accepting: false,
            buffering: false,
            role: ShardRole::NotOwner,
            role_since: None,
        }
    }

    /// The node this machine runs on.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The shard this machine is about.
    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// What this node is doing with the shard now.
    pub fn role(&self) -> &ShardRole {
        &self.role
    }

    /// When the current role began (the `now` of the event that entered it), for handoff
    /// duration metrics and stuck-handoff alerts. `None` until the first role change.
    pub fn role_since(&self) -> Option<Instant> {
        self.role_since
    }

    /// The newest epoch this node has seen assigned for the shard.
    pub fn epoch(&self) -> Option<u64> {
        self.assignment.as_ref().map(|a| a.epoch)
    }

    /// The restore this machine waits for, as `(epoch, attempt)`: the only
    /// [`Event::Restored`] it will take. The caller keeps the restored state of that attempt
    /// alone (an earlier attempt's, finishing late, may miss acknowledged writes).
    pub fn awaiting_restore(&self) -> Option<(u64, u64)> {
        match self.restore {
            RestoreState::InFlight(e, a) | RestoreState::Failed(e, a) => Some((e, a)),
            _ => None,
        }
    }

    /// Whether the router should buffer this shard's messages now (between
    /// [`Effect::StopAccepting`] and [`Effect::DeliverBuffered`]).
    pub fn is_buffering(&self) -> bool {
        self.buffering
    }

    /// Feeds one event at `now` and returns the effects to run, in order.
    pub fn handle(&mut self, now: Instant, ev: Event) -> Vec<Effect> {
        let mut fx = Vec::new();
        match ev {
            Event::Assigned {
                epoch,
                owner,
                handoff_to,
            } => {
                if !self.accept_assignment(epoch, owner, handoff_to) {
                    fx.push(Effect::StaleIgnored);
                    return fx;
                }
            }
            Event::LeaseLost => self.lease_valid = false,
            Event::LeaseRegained => self.lease_valid = true,
            Event::InflightDrained => self.on_inflight_drained(&mut fx),
            Event::CheckpointWritten { epoch, seq } => {
                self.on_checkpoint_written(epoch, seq, &mut fx)
            }
            Event::CheckpointFailed { .. } => {
                if let Some(d) = self
                    .drain
                    .as_mut()
                    .filter(|d| d.phase == DrainPhase::Checkpointing)
                {
                    d.phase = DrainPhase::CheckpointFailed;
                }
            }
            Event::Restored { epoch, attempt, .. } => {
                if matches!(self.restore, RestoreState::InFlight(e, a) | RestoreState::Failed(e, a) | RestoreState::Checking(e, a) if e == epoch && a == attempt)
                {
                    self.restore = RestoreState::Done(epoch);
                }
            }
            Event::RestoreFailed { attempt, .. } => match self.restore {
                RestoreState::InFlight(e, a) if a == attempt => {
                    self.restore = RestoreState::Failed(e, a);
                }
                // The check could not read the log: give up the suspended actor and restore.
                RestoreState::Checking(_, a) if a == attempt => {
                    self.stand_down(&mut fx, "resume check failed");
                }
                _ => {}
            },
            Event::FencedByStorage { epoch } => self.on_fenced(epoch),
            Event::Retry => self.on_retry(&mut fx),
        }
        self.reconcile(&mut fx);
        self.handoff_changed = false;
        self.update_role(now);
        fx
    }

    /// Records a newer (or same-epoch, same-owner) assignment; false if it is stale.
    fn accept_assignment(
        &mut self,
        epoch: u64,
        owner: Option<NodeId>,
        handoff_to: Option<NodeId>,
    ) -> bool {
        if let Some(a) = &self.assignment {
            // The control plane never gives one epoch to two owners: the same epoch naming
            // another owner can only be a stale or forged message.
            if epoch < a.epoch || (epoch == a.epoch && owner != a.owner) {
                return false;
            }
        }
        if self.fenced.is_some_and(|f| epoch > f) {
            self.fenced = None;
        }
        // A "handoff" to the owner itself moves nothing.
        let handoff_to = handoff_to.filter(|to| owner.as_ref() != Some(to));
        self.handoff_changed = self
            .assignment
            .as_ref()
            .is_some_and(|a| a.epoch == epoch && a.handoff_to != handoff_to);
        if let Some(to) = handoff_to
            .as_ref()
            .filter(|_| owner.as_ref() == Some(&self.me))
        {
            self.handoff_seen = Some((epoch, to.clone()));
        }
        self.assignment = Some(Assignment {
            epoch,
            owner,
            handoff_to,
        });
        true
    }

    fn on_inflight_drained(&mut self, fx: &mut Vec<Effect>) {
        if let Some(d) = self
            .drain
            .as_mut()
            .filter(|d| d.phase == DrainPhase::WaitingInflight)
        {
            d.phase = DrainPhase::Checkpointing;
            fx.push(Effect::WriteCheckpoint { epoch: d.epoch });
        }
    }

    fn on_checkpoint_written(&mut self, epoch: u64, seq: u64, fx: &mut Vec<Effect>) {
        let waiting =
            |p: DrainPhase| matches!(p, DrainPhase::Checkpointing | DrainPhase::CheckpointFailed);
        if let Some(d) = self
            .drain
            .as_mut()
            .filter(|d| d.epoch == epoch && waiting(d.phase))
        {
            d.phase = DrainPhase::Reported { seq };
            fx.push(Effect::ReportHandoffDone { epoch, seq });
        }
    }

    fn on_fenced(&mut self, epoch: u64) {
        if let Some(a) = self
            .assignment
            .as_ref()
            .filter(|a| a.owner.as_ref() == Some(&self.me) && epoch >= a.epoch)
        {
            self.fenced = Some(a.epoch);
        }
    }

    fn on_retry(&mut self, fx: &mut Vec<Effect>) {
        if let RestoreState::Failed(e, _) = self.restore {
            self.start_restore(e, fx);
        }
        if let Some(d) = self
            .drain
            .as_mut()
            .filter(|d| d.phase == DrainPhase::CheckpointFailed)
        {
            d.phase = DrainPhase::Checkpointing;
            fx.push(Effect::WriteCheckpoint { epoch: d.epoch });
        }
        // A report the control plane did not take (timed out, refused while the leader's map
        // lagged) is sent again; while the shard is still ours at that epoch the handoff is
        // otherwise stuck.
        if let Some(d) = self.drain.as_ref() {
            let ours = self
                .assignment
                .as_ref()
                .is_some_and(|a| a.owner.as_ref() == Some(&self.me) && a.epoch == d.epoch);
            if let (DrainPhase::Reported { seq }, true) = (d.phase, ours) {
                fx.push(Effect::ReportHandoffDone {
                    epoch: d.epoch,
                    seq,
                });
            }
        }
    }

    /// Brings the effects in line with the inputs (assignment, lease, restore, fence). Every
    /// path that may serve checks all of: assigned here, lease valid, not fenced, restored.
    fn reconcile(&mut self, fx: &mut Vec<Effect>) {
        let Some(a) = self.assignment.clone() else {
            return;
        };
        if a.owner.as_ref() != Some(&self.me) {
            let handed_off = self
                .drain
                .as_ref()
                .is_some_and(|d| a.owner.as_ref() == Some(&d.to));
            self.stand_down(
                fx,
                if handed_off {
                    "handed off"
                } else {
                    "reassigned"
                },
            );
            match a.handoff_to {
                // The owner is handing off: hold messages until the new owner is committed.
                Some(_) => self.buffer(fx),
                None => self.flush(fx),
            }
            return;
        }
        if self.fenced.is_some_and(|f| f >= a.epoch) {
            self.stand_down(fx, "fenced");
            self.buffer(fx);
            return;
        }
        if !self.lease_valid {
            match self.restore {
                // Serving plainly at this epoch (or suspended, or checking, since): suspend.
                RestoreState::Done(e)
                | RestoreState::Suspended(e)
                | RestoreState::Checking(e, _)
                    if e == a.epoch && self.live && self.drain.is_none() =>
                {
                    self.restore = RestoreState::Suspended(e);
                }
                _ => self.stand_down(fx, "lease lost"),
            }
            self.buffer(fx);
            return;
        }
        match self.restore {
            RestoreState::Done(e) if e == a.epoch => {}
            RestoreState::Suspended(e) if e == a.epoch && self.live => {
                self.buffer(fx);
                self.restore_attempts += 1;
                let attempt = self.restore_attempts;
                self.restore = RestoreState::Checking(e, attempt);
                fx.push(Effect::CheckFence { epoch: e, attempt });
                return;
            }
            RestoreState::Checking(e, _) if e == a.epoch => {
                self.buffer(fx);
                return;
            }
            RestoreState::InFlight(e, _) | RestoreState::Failed(e, _) if e == a.epoch => {
                self.buffer(fx);
                return;
            }
            _ => {
                self.stand_down(fx, "epoch changed");
                self.buffer(fx);
                self.start_restore(a.epoch, fx);
                return;
            }
        }
        // A handoff withdrawn at its own epoch keeps draining (see the module docs).
        let rereport = self.handoff_changed && a.handoff_to.is_some();
        let target = a.handoff_to.or_else(|| {
            self.handoff_seen
                .as_ref()
                .filter(|(e, _)| *e == a.epoch)
                .map(|(_, to)| to.clone())
        });
        match target {
            None => {
                self.drain = None;
                if !self.accepting {
                    if self.live {
                        // A suspended actor whose fence checked out: it serves on, and the
                        // router hands it what it buffered meanwhile.
                        fx.push(Effect::Resume { epoch: a.epoch });
                        self.buffering = false;
                    } else {
                        fx.push(Effect::StartServing { epoch: a.epoch });
                    }
                    self.accepting = true;
                    self.live = true;
                }
                self.flush(fx);
            }
            Some(to) => self.drain_to(a.epoch, to, rereport, fx),
        }
    }

    /// Starts (or retargets) a graceful handoff of `epoch` to `to`. `rereport`: the leader set
    /// the handoff anew, so a finished drain reports again.
    fn drain_to(&mut self, epoch: u64, to: NodeId, rereport: bool, fx: &mut Vec<Effect>) {
        if let Some(d) = self.drain.as_mut().filter(|d| d.epoch == epoch) {
            if d.to != to || rereport {
                d.to = to;
                // The checkpoint does not depend on the target: report again for the new one.
                if let DrainPhase::Reported { seq } = d.phase {
                    fx.push(Effect::ReportHandoffDone { epoch, seq });
                }
            }
            return;
        }
        let was_accepting = self.accepting;
        self.buffer(fx);
        let phase = if was_accepting {
            fx.push(Effect::WaitInflight);
            DrainPhase::WaitingInflight
        } else {
            // Restored but never served at this epoch (e.g. restarted mid-handoff): nothing is
            // in flight.
            fx.push(Effect::WriteCheckpoint { epoch });
            DrainPhase::Checkpointing
        };
        self.drain = Some(Drain { epoch, to, phase });
    }

    /// Issues restore attempt number `restore_attempts + 1` at `epoch`.
    fn start_restore(&mut self, epoch: u64, fx: &mut Vec<Effect>) {
        self.restore_attempts += 1;
        let attempt = self.restore_attempts;
        self.restore = RestoreState::InFlight(epoch, attempt);
        fx.push(Effect::Restore { epoch, attempt });
    }

    /// Stops the actor (if running) and forgets restore and drain progress: serving again needs a
    /// fresh restore (and so a fresh fence).
    fn stand_down(&mut self, fx: &mut Vec<Effect>, reason: &'static str) {
        if self.live {
            fx.push(Effect::StopServing { reason });
        }
        self.live = false;
        self.accepting = false;
        self.drain = None;
        self.restore = RestoreState::Idle;
    }

    fn buffer(&mut self, fx: &mut Vec<Effect>) {
        if !self.buffering {
            fx.push(Effect::StopAccepting);
            self.buffering = true;
        }
        self.accepting = false;
    }

    fn flush(&mut self, fx: &mut Vec<Effect>) {
        if self.buffering {
            fx.push(Effect::DeliverBuffered);
            self.buffering = false;
        }
    }

    fn derive_role(&self) -> ShardRole {
        let Some(a) = self
            .assignment
            .as_ref()
            .filter(|a| a.owner.as_ref() == Some(&self.me))
        else {
            return ShardRole::NotOwner;
        };
        if self.fenced.is_some_and(|f| f >= a.epoch) {
            ShardRole::Fenced { epoch: a.epoch }
        } else if !self.lease_valid {
            ShardRole::NotOwner
        } else if let Some(d) = &self.drain {
            ShardRole::Draining {
                epoch: d.epoch,
                to: d.to.clone(),
            }
        } else if self.live && self.accepting {
            ShardRole::Serving { epoch: a.epoch }
        } else {
            ShardRole::Restoring { epoch: a.epoch }
        }
    }

    fn update_role(&mut self, now: Instant) {
        let role = self.derive_role();
        if role != self.role || self.role_since.is_none() {
            self.role = role;
            self.role_since = Some(now);
        }
    }
}

/// A bounded FIFO of messages that arrive for a shard while it is in handoff (invariants 4 and
/// 7): delivered in arrival order to the new owner, and refused when full so the sender gets a
/// retryable `Overloaded` and backs off instead of the node growing without bound.
#[derive(Debug, Clone)]
pub struct RouterBuffer<T> {
    items: VecDeque<T>,
    cap: usize,
}

impl<T> RouterBuffer<T> {
    /// An empty buffer holding at most `cap` messages.
    pub fn new(cap: usize) -> Result<Self, HandoffError> {
        if cap == 0 {
            return Err(HandoffError::ZeroCapacity);
        }
        Ok(Self {
            items: VecDeque::new(),
            cap,
        })
    }

    /// Appends `item`, or hands it back when the buffer is full: the caller then answers the
    /// sender with a retryable `Overloaded` (the sender retries with the same idempotency key).
    pub fn push(&mut self, item: T) -> Result<(), T> {
        if self.items.len() >= self.cap {
            return Err(item);
        }
        self.items.push_back(item);
        Ok(())
    }

    /// Removes and yields every buffered message, oldest first.
    pub fn drain(&mut self) -> std::collections::vec_deque::Drain<'_, T> {
        self.items.drain(..)
    }

    /// Messages buffered now.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether the next [`push`](Self::push) would be refused.
    pub fn is_full(&self) -> bool {
        self.items.len() >= self.cap
    }

    /// The most messages this buffer holds.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

#[cfg(test)]
#[path = "handoff_tests.rs"]
mod tests;
