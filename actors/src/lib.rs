//! Tidepool actors: what runs inside a node.
//!
//! # Layout
//! - [`supervisor`]: `NodeSupervisor`, the root actor of a node. Spawns one [`shard`] actor per
//!   owned shard, restarts failed ones within a [`restart`] budget, escalates past it.
//! - [`shard`]: `ShardActor`, applying ops to the shard's key-value state with idempotent ops
//!   (`ShardState` and [`dedup`], pure, in `tidepool_runtime`; re-exported here, as is
//!   [`restore`]).
//! - [`worker`]: the bounded `WorkerPool`; CPU work runs on blocking threads, never the reactor.
//! - [`router`]: `send_to_shard`: local shards by actor message (no serialization), remote ones
//!   over QUIC; answers requests arriving from the transport.
//! - [`serve_gate`]: whether this node may serve at this instant (its lease on its own clock), asked
//!   on admission, before applying and before answering; the exact serving edges for the
//!   ownership log ([`ownership_log`]).
//! - [`ownership_log`]: the ownership log's writer thread (intervals at the instants admission
//!   began and ended).
//! - [`forming`]: the start-up phase (forming, joining, running) and the stand-in handler that
//!   answers `cluster status` while a voter waits for the others.
//! - [`node`]: assembles a node: transport, router, supervisor, worker pool; clean shutdown.
//! - [`load`]: the node's load signals (utilisation, backlog, mailboxes, QUIC stats).
//! - [`audit`]: the audit log of admin requests.
//! - [`job_exec`]: a node's side of a job step: map its shards, pre-sum, reply; partition cache.
//! - [`params`]: the parameter tables of the shards a node owns (pulls, pushes, saves, loads);
//!   the worker's side of a parameter-server step is in `job_exec`.
//! - [`spill`]: partition files on local disk, memory-mapped (more data than memory).
//! - [`coordinator`]: the JobCoordinator of one job, on the owner of its coordinator shard.
//! - [`job_admin`]: dataset import / job admin requests, and the manager that runs coordinators.
//! - [`imports`]: `dataset import URL` (plan, record through Raft), its status, and the manager
//!   that reads the import splits of the shards a node serves.
//! - [`admin_checks`]: sans-IO validation of dataset admin payloads (what a commit, abort or
//!   delete may touch).
//! - [`jobs`]: the pure math of the learning jobs (statistics, models, k-means, synchronous SGD).

pub mod admin_checks;
pub mod audit;
pub mod coordinator;
pub use tidepool_runtime::dedup;
pub mod driver;
pub mod forming;
pub mod imports;
pub mod job_admin;
pub mod job_exec;
pub mod jobs;
pub mod leader;
pub mod load;
pub mod node;
pub mod ownership_log;
pub mod params;
pub mod restart;
pub use tidepool_runtime::restore;
pub mod router;
pub mod serve_gate;
pub mod services;
pub mod shard;
pub mod shard_log;
pub mod spill;
pub mod supervisor;
pub mod worker;
