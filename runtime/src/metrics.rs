//! Every metric Tidepool exports: one table of names, types, units and help text.
//!
//! Components record through the `metrics` facade with these constants; the binary installs the
//! Prometheus recorder, calls [`describe_all`] and sets explicit histogram buckets from
//! [`HISTOGRAM_BUCKETS`]. Names follow Prometheus conventions: prefix `tidepool_`, base units as
//! suffix, counters end in `_total`, label values come from closed sets (no unbounded labels).

/// Kind of a metric, for [`describe_all`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: MetricKind,
    pub unit: Option<metrics::Unit>,
    pub help: &'static str,
    /// The label names it carries.
    pub labels: &'static [&'static str],
}

macro_rules! metric_table {
    ($( $konst:ident = $name:literal, $kind:ident, $unit:expr, [$($label:literal),*], $help:literal; )*) => {
        $( #[doc = $help] pub const $konst: &str = $name; )*
        /// All metrics, in one place.
        pub const ALL: &[MetricDef] = &[
            $( MetricDef { name: $name, kind: MetricKind::$kind, unit: $unit, help: $help, labels: &[$($label),*] }, )*
        ];
    };
}

use metrics::Unit;

metric_table! {
    WIRE_REJECTED_FRAMES = "tidepool_wire_rejected_frames_total", Counter, None, ["reason"],
        "Frames refused by the codec (oversized, truncated, malformed, version); the stream was reset.";
    WIRE_FRAMES_RECEIVED = "tidepool_wire_frames_received_total", Counter, None, ["kind"],
        "Valid frames received, by message kind.";
    WIRE_FRAMES_SENT = "tidepool_wire_frames_sent_total", Counter, None, [],
        "Frames written to QUIC streams.";
    WIRE_BYTES_RECEIVED = "tidepool_wire_received_bytes_total", Counter, Some(Unit::Bytes), [],
        "Archive bytes received in valid frames.";
    WIRE_BYTES_SENT = "tidepool_wire_sent_bytes_total", Counter, Some(Unit::Bytes), [],
        "Frame bytes written to QUIC streams.";
    TRANSPORT_CONNECTIONS = "tidepool_transport_connections", Gauge, None, ["role"],
        "Open QUIC connections, by the peer's certificate role (node, admin, reader).";
    TRANSPORT_HANDSHAKE_FAILURES = "tidepool_transport_handshake_failures_total", Counter, None, ["direction"],
        "QUIC/TLS handshakes that failed (refused certificate, timeout), inbound or outbound.";
    TRANSPORT_DIALS = "tidepool_transport_dials_total", Counter, None, ["result"],
        "Outbound connection attempts to peers (ok, error).";
    TRANSPORT_SEND_QUEUE_DEPTH = "tidepool_transport_send_queue_depth", Gauge, None, ["peer"],
        "Frames waiting in per-peer send queues (peer: node name, or client).";
    TRANSPORT_SEND_DROPPED = "tidepool_transport_send_dropped_total", Counter, None, ["reason"],
        "Frames dropped before reaching the wire (disconnected, encode).";
    TRANSPORT_SLOW_PEERS_CLOSED = "tidepool_transport_slow_peers_closed_total", Counter, None, [],
        "Connections closed because the peer left the send budget exhausted (it was not reading).";
    TRANSPORT_INFLIGHT_BYTES = "tidepool_transport_inflight_bytes", Gauge, Some(Unit::Bytes), [],
        "Bytes of received frames held node-wide (being read or not yet handled), against transport.node_inflight_bytes.";
    TRANSPORT_PEERS_REFUSED = "tidepool_transport_peers_refused_total", Counter, None, ["reason"],
        "Connections refused or closed for who the peer is (revoked, duplicate_identity, too_many_connections).";
    CONTROL_REFUSED = "tidepool_control_refused_total", Counter, None, ["reason"],
        "Control-plane requests refused for their sender's identity or for malformed content (not_voter, impersonation, malformed_entries, forbidden_command, wrong_name, not_leader_admin).";
    TRANSPORT_REQUEST_TIMEOUTS = "tidepool_transport_request_timeouts_total", Counter, None, [],
        "Requests that got no reply within the request timeout.";
    TRANSPORT_LATE_REPLIES = "tidepool_transport_late_replies_total", Counter, None, [],
        "Replies that arrived after their request timed out, or matched no request.";
    SHARD_OPS = "tidepool_shard_ops_total", Counter, None, ["op", "result"],
        "Shard operations handled (op: put, get, incr, add_tensor, get_tensor; result: applied, duplicate, read, error).";
    SHARD_OP_DURATION = "tidepool_shard_op_duration_seconds", Histogram, Some(Unit::Seconds), [],
        "Time from a shard request's arrival at its owner to its reply.";
    SHARD_INFLIGHT = "tidepool_shard_inflight", Gauge, None, [],
        "Shard operations admitted and not yet answered on this node (bounded per shard).";
    SHARD_REJECTED = "tidepool_shard_rejected_total", Counter, None, ["reason"],
        "Shard requests refused (not_owner, overloaded, forbidden, bad_request, shutting_down, lease_lapsed: admitted, then the lease ran out before the op was applied or answered).";
    STALE_EPOCH_REJECTIONS = "tidepool_stale_epoch_rejections_total", Counter, None, [],
        "Shard messages refused because they carried an epoch other than the shard's current one.";
    CLUSTER_MEMBERS = "tidepool_cluster_members", Gauge, None, ["state"],
        "Members of the cluster map by state (joining, up, draining, down), as this node sees it.";
    REBALANCES = "tidepool_rebalances_total", Counter, None, ["kind"],
        "Shard moves proposed by the leader (initial: first placement; handoff: graceful; reassign: after a lease expired).";
    HANDOFF_DURATION = "tidepool_handoff_duration_seconds", Histogram, Some(Unit::Seconds), [],
        "Graceful handoff pause on the old owner: stop accepting to handoff committed.";
    HANDOFF_BUFFERED = "tidepool_handoff_buffered_messages", Gauge, None, [],
        "Requests buffered at the router for shards in handoff (bounded per shard).";
    SHARD_RESTORES = "tidepool_shard_restores_total", Counter, None, ["result"],
        "Shard restores from checkpoint + op log when this node became an owner (ok, fenced, error).";
    SHARD_RESUMES = "tidepool_shard_resumes_total", Counter, None, ["result"],
        "Suspended shards whose lease came back: resumed in place after a fence check (ok), found fenced by a newer epoch (fenced), or restored because the check failed (error).";
    STORAGE_REJECTED_OBJECTS = "tidepool_storage_rejected_objects_total", Counter, None, ["reason"],
        "Storage objects refused on read and never served (truncated, malformed, version, unknown_key, forged).";
    STORAGE_SEALED_OBJECTS = "tidepool_storage_sealed_objects_total", Counter, None, [],
        "Storage objects sealed (AES-256-GCM, random nonce) by this node; rotate the data key well before 2^32 per key.";
    RAFT_LEADER_CHANGES = "tidepool_raft_leader_changes_total", Counter, None, [],
        "Control-plane leadership changes seen by this node.";
    RAFT_COMMIT_LATENCY = "tidepool_raft_commit_latency_seconds", Histogram, Some(Unit::Seconds), [],
        "Time for a control-plane proposal to commit and apply.";
    RAFT_TERM = "tidepool_raft_term", Gauge, None, [],
        "Current Raft term.";
    RAFT_IS_LEADER = "tidepool_raft_is_leader", Gauge, None, [],
        "1 while this node is the control plane's Raft leader, else 0 (the `node` label names it).";
    CERT_EXPIRY = "tidepool_cert_expiry_timestamp_seconds", Gauge, Some(Unit::Seconds), [],
        "Not-after time (Unix seconds) of this node's TLS certificate, read when it is loaded.";
    LEASE_EXPIRATIONS = "tidepool_lease_expirations_total", Counter, None, [],
        "Times this node's lease expired (it stopped serving by itself).";
    LEASE_GRANTS_REFUSED = "tidepool_lease_grants_refused_total", Counter, None, [],
        "Lease renewals this leader refused because the renewing member was found expired and its shards are being moved.";
    LEASE_VALID = "tidepool_lease_valid", Gauge, None, [],
        "1 while this node holds a valid lease.";
    SHARDS_OWNED = "tidepool_shards_owned", Gauge, None, [],
        "Shards this node owns.";
    ROUTER_FORWARDED = "tidepool_router_forwarded_total", Counter, None, ["result"],
        "Shard requests forwarded to the owning node (ok, error).";
    SUPERVISOR_EVENTS = "tidepool_supervisor_events_total", Counter, None, ["event"],
        "Supervision events (started, failed, terminated, restarted, escalated).";
    WORKER_TASKS = "tidepool_worker_tasks_total", Counter, None, [],
        "Tasks run by the worker pool.";
    WORKER_BUSY = "tidepool_worker_busy", Gauge, None, [],
        "Worker pool threads running a task now.";
    WORKER_QUEUED = "tidepool_worker_queued", Gauge, None, [],
        "Tasks waiting for a worker.";
    ADMIN_REQUESTS = "tidepool_admin_requests_total", Counter, None, ["role", "kind"],
        "Client requests by certificate role and message kind (each admin one is audited).";
    BUILD_INFO = "tidepool_build_info", Gauge, None, ["version", "revision"],
        "Always 1; the labels say which build runs (crate version and git revision).";
    NODE_READY = "tidepool_node_ready", Gauge, None, [],
        "1 while /readyz answers 200.";
    JOB_TASK_SECONDS = "tidepool_job_task_duration_seconds", Histogram, Some(Unit::Seconds), [],
        "Time a node spent on one job step's task (all its shards).";
    JOB_SHARD_TASKS = "tidepool_job_shard_tasks_total", Counter, None, ["result"],
        "Shard maps run (done) or refused (not the owner at that epoch, partition not loadable).";
    JOB_PARTITIONS_LOADED = "tidepool_job_partitions_loaded_total", Counter, None, [],
        "Dataset partitions loaded (or generated) on this node for the shards it owns.";
    JOB_CACHE_BYTES = "tidepool_job_partition_cache_bytes", Gauge, Some(Unit::Bytes), [],
        "Bytes of dataset partitions held in memory.";
    PARAM_REQUESTS = "tidepool_param_requests_total", Counter, None, ["kind", "status"],
        "Parameter pulls and pushes answered by this node's tables, by status (ok, not_owner, lost, stale, refused).";
    PARAM_VALUES = "tidepool_param_values_total", Counter, None, ["kind"],
        "Parameter values served by pulls and received by pushes on this node.";
    PARAM_DUPLICATE_PUSHES = "tidepool_param_duplicate_pushes_total", Counter, None, [],
        "Pushed rows of a (step, source) already recorded: a retried task's, not applied again.";
    PARAM_TABLE_BYTES = "tidepool_param_table_bytes", Gauge, Some(Unit::Bytes), [],
        "Bytes held by this node's parameter tables (rows written and pushes waiting).";
    PARAM_TABLES_SAVED = "tidepool_param_tables_saved_total", Counter, None, [],
        "Parameter tables saved to storage.";
    PARAM_TABLES_LOST = "tidepool_param_tables_lost_total", Counter, None, [],
        "Requests for a table whose rows were lost with a former owner (the job rolls back).";
    JOB_ROLLBACKS = "tidepool_job_rollbacks_total", Counter, None, [],
        "Parameter-server jobs rolled back to their newest saved tables by coordinators here.";
    JOB_STEPS = "tidepool_job_steps_total", Counter, None, ["kind"],
        "Job steps completed by coordinators on this node.";
    JOB_SAMPLES = "tidepool_job_samples_total", Counter, None, ["kind"],
        "Rows processed by job steps coordinated on this node.";
    JOB_STEP_SECONDS = "tidepool_job_step_duration_seconds", Histogram, Some(Unit::Seconds), ["kind"],
        "Wall time of one job step, scatter to reduce, on the coordinator.";
    JOB_LOSS = "tidepool_job_loss", Gauge, None, ["kind"],
        "Latest loss (objective or inertia) of the jobs coordinated on this node.";
    JOB_CHECKPOINTS = "tidepool_job_checkpoints_total", Counter, None, [],
        "Job state checkpoints written.";
    JOB_RESUMES = "tidepool_job_resumes_total", Counter, None, [],
        "Coordinators started from a checkpoint (failover or restart).";
    JOB_RETRIES = "tidepool_job_shard_retries_total", Counter, None, [],
        "Shard tasks the coordinator re-sent (moved shard, lost node, timeout).";
    JOBS_FINISHED = "tidepool_jobs_finished_total", Counter, None, ["state"],
        "Jobs that ended here, by final state (succeeded, failed, cancelled).";
    JOBS_RUNNING = "tidepool_jobs_running", Gauge, None, [],
        "Job coordinators running on this node.";
    JOB_ADMISSIONS_REFUSED = "tidepool_job_admissions_refused_total", Counter, None, ["stage"],
        "Jobs and datasets refused for their size or length: at submit, at synth, at a coordinator's (re)start, or a partition over the memory budget.";
    ADMIN_HTTP_CLOSED = "tidepool_admin_http_connections_closed_total", Counter, None, ["reason"],
        "Admin HTTP connections closed by the node: over max_connections, header or idle timeout, or an accept error.";
    DATASET_PARTS = "tidepool_dataset_parts_stored_total", Counter, None, [],
        "Dataset partition objects stored by imports through this node.";
    IMPORT_SPLITS = "tidepool_import_splits_total", Counter, None, ["outcome"],
        "Import splits this node read from storage: done, failed (a data error fails the import), retried (a source or storage error).";
    IMPORT_ROWS = "tidepool_import_rows_total", Counter, None, [],
        "Rows written into partitions by the import splits this node read.";
    IMPORT_BYTES = "tidepool_import_source_bytes_total", Counter, Some(Unit::Bytes), [],
        "Source bytes (compressed, for Parquet) of the import splits this node read.";
    WORKER_THREADS = "tidepool_worker_threads", Gauge, None, [],
        "Worker threads of this node's compute pools.";
    WORKER_BUSY_SECONDS = "tidepool_worker_busy_seconds_total", Counter, Some(Unit::Seconds), [],
        "Time worker threads spent running tasks; rate() / tidepool_worker_threads is utilisation.";
    WORKER_UTILIZATION = "tidepool_worker_utilization_ratio", Gauge, None, [],
        "Busy-time ratio of this node's worker threads over the last sampling window (0..1).";
    BACKLOG = "tidepool_backlog_tasks", Gauge, None, [],
        "Runnable backlog: tasks waiting for a worker plus messages queued at this node's shards.";
    MAILBOX_DEPTH = "tidepool_mailbox_depth", Gauge, None, ["mailbox"],
        "Messages waiting per mailbox kind (shards, workers, send_queues).";
    TASK_SECONDS = "tidepool_task_duration_seconds", Histogram, Some(Unit::Seconds), [],
        "Worker task latency, from submission to completion (queueing included).";
    QUIC_RTT = "tidepool_quic_rtt_seconds", Gauge, Some(Unit::Seconds), [],
        "Largest smoothed RTT quinn reports over this node's live peer connections.";
    QUIC_CWND = "tidepool_quic_congestion_window_bytes", Gauge, Some(Unit::Bytes), [],
        "Smallest congestion window quinn reports over this node's live peer connections.";
    QUIC_LOST = "tidepool_quic_lost_packets_total", Counter, None, [],
        "Packets quinn declared lost on this node's peer connections.";
    QUIC_SENT = "tidepool_quic_sent_packets_total", Counter, None, [],
        "UDP datagrams quinn sent on this node's peer connections.";
    AUTOSCALE_DESIRED = "tidepool_autoscale_desired_nodes", Gauge, None, [],
        "Recommended node count (HPA rule with tolerance, bounds and stabilisation); set by the Raft leader, 0 elsewhere.";
    AUTOSCALE_CURRENT = "tidepool_autoscale_current_nodes", Gauge, None, [],
        "Nodes up, as the Raft leader counts them for autoscaling; 0 on other nodes.";
    AUTOSCALE_UTILIZATION = "tidepool_autoscale_utilization_ratio", Gauge, None, [],
        "Mean worker utilisation over the up nodes, as reported in their lease renewals (leader only).";
    AUTOSCALE_BACKLOG = "tidepool_autoscale_backlog_tasks", Gauge, None, [],
        "Total runnable backlog over the up nodes (leader only).";
    AUTOSCALE_CHANGES = "tidepool_autoscale_recommendation_changes_total", Counter, None, [],
        "Times the leader's recommended node count changed.";
}

/// Buckets of the request-scale latency histograms (seconds): 50 µs to 10 s (shard ops, Raft
/// commits, handoff pauses, worker tasks).
pub const HISTOGRAM_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Buckets of the job histograms (seconds): a step or a node's share of it takes milliseconds
/// on a small dataset and minutes on a large one; 10 ms to 10 min.
pub const JOB_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The buckets of histogram `name`.
pub fn buckets_for(name: &str) -> &'static [f64] {
    match name {
        JOB_STEP_SECONDS | JOB_TASK_SECONDS => JOB_BUCKETS,
        _ => HISTOGRAM_BUCKETS,
    }
}

/// The label values of a job's `kind` (runtime/src/jobspec.rs `JobKind::as_str`).
pub const JOB_KINDS: &[&str] = &["sgd", "local_sgd", "kmeans", "stats", "mf"];

/// The closed label sets of the counters that may stay at zero for a long time, so they are
/// exported (as 0) from the start: a dashboard or alert on them has data before the first event.
pub const ZERO_SERIES: &[(&str, &str, &[&str])] = &[
    (
        WIRE_REJECTED_FRAMES,
        "reason",
        &[
            "oversized",
            "truncated",
            "malformed",
            "version",
            "over_budget",
            "stalled",
            "duplicate_correlation",
        ],
    ),
    (
        TRANSPORT_PEERS_REFUSED,
        "reason",
        &["revoked", "duplicate_identity", "too_many_connections"],
    ),
    (
        CONTROL_REFUSED,
        "reason",
        &[
            "not_voter",
            "impersonation",
            "malformed_entries",
            "forbidden_command",
            "wrong_name",
        ],
    ),
    (
        TRANSPORT_HANDSHAKE_FAILURES,
        "direction",
        &["inbound", "outbound"],
    ),
    (
        TRANSPORT_SEND_DROPPED,
        "reason",
        &["disconnected", "encode", "stream_reset", "peer_not_reading"],
    ),
    (
        SHARD_REJECTED,
        "reason",
        &[
            "not_owner",
            "overloaded",
            "forbidden",
            "bad_request",
            "shutting_down",
            "lease_lapsed",
        ],
    ),
    (ROUTER_FORWARDED, "result", &["ok", "error"]),
    (SHARD_RESTORES, "result", &["ok", "fenced", "error"]),
    (SHARD_RESUMES, "result", &["ok", "fenced", "error"]),
    (
        STORAGE_REJECTED_OBJECTS,
        "reason",
        &["truncated", "malformed", "version", "unknown_key", "forged"],
    ),
    (JOB_SHARD_TASKS, "result", &["done", "refused"]),
    (
        JOB_ADMISSIONS_REFUSED,
        "stage",
        &["submit", "synth", "start", "partition"],
    ),
    (
        ADMIN_HTTP_CLOSED,
        "reason",
        &["limit", "timeout", "accept_error"],
    ),
    (
        JOBS_FINISHED,
        "state",
        &["succeeded", "failed", "cancelled"],
    ),
    (PARAM_VALUES, "kind", &["pull", "push"]),
    (JOB_STEPS, "kind", JOB_KINDS),
    (JOB_SAMPLES, "kind", JOB_KINDS),
    (TRANSPORT_DIALS, "result", &["ok", "error"]),
    (
        IMPORT_SPLITS,
        "outcome",
        &["done", "failed", "retried", "decoder_panic"],
    ),
    (REBALANCES, "kind", &["initial", "handoff", "reassign"]),
    (
        SUPERVISOR_EVENTS,
        "event",
        &["started", "failed", "terminated", "restarted", "escalated"],
    ),
];

/// Exports, from start-up, every series a dashboard or alert reads: every unlabelled counter
/// and gauge at 0, every series of [`ZERO_SERIES`] at 0, every unlabelled histogram and the
/// job-step histogram per job kind with empty buckets, connections per role at 0, and the job
/// loss per kind as NaN (no value yet, not a loss of 0). Adding 0 never overwrites a value set
/// before.
pub fn register_zeros() {
    for m in ALL.iter().filter(|m| m.labels.is_empty()) {
        match m.kind {
            MetricKind::Counter => metrics::counter!(m.name).increment(0),
            // Set when the certificate loads; a 0 would read as "expired in 1970".
            MetricKind::Gauge if m.name == CERT_EXPIRY => {}
            MetricKind::Gauge => metrics::gauge!(m.name).increment(0.0),
            MetricKind::Histogram => {
                let _ = metrics::histogram!(m.name);
            }
        }
    }
    for (name, label, values) in ZERO_SERIES {
        for v in *values {
            metrics::counter!(*name, *label => *v).increment(0);
        }
    }
    for kind in JOB_KINDS {
        let _ = metrics::histogram!(JOB_STEP_SECONDS, "kind" => *kind);
        metrics::gauge!(JOB_LOSS, "kind" => *kind).set(f64::NAN);
    }
    for role in ["node", "admin", "reader"] {
        metrics::gauge!(TRANSPORT_CONNECTIONS, "role" => role).increment(0.0);
    }
    for (name, (l1, v1), (l2, v2)) in ZERO_PAIRS {
        for a in *v1 {
            for b in *v2 {
                metrics::counter!(*name, *l1 => *a, *l2 => *b).increment(0);
            }
        }
    }
}

/// Counters with two labels exported at 0 for every pair of values (the client message kinds
/// a client sends; the shard operations and their results).
#[allow(clippy::type_complexity)]
const ZERO_PAIRS: &[(&str, (&str, &[&str]), (&str, &[&str]))] = &[
    (
        SHARD_OPS,
        ("op", &["put", "get", "incr", "add_tensor", "get_tensor"]),
        ("result", &["applied", "duplicate", "read", "error"]),
    ),
    (
        PARAM_REQUESTS,
        ("kind", &["pull", "push"]),
        ("status", &["ok", "not_owner", "lost", "stale", "refused"]),
    ),
    (
        ADMIN_REQUESTS,
        ("role", &["admin", "reader"]),
        (
            "kind",
            &[
                "shard_request",
                "status_request",
                "shards_request",
                "ping",
                "membership",
                "admin",
                "dataset_part",
            ],
        ),
    ),
];

/// Registers help text and units with the installed recorder.
pub fn describe_all() {
    for m in ALL {
        let help = m.help;
        match (m.kind, m.unit) {
            (MetricKind::Counter, Some(u)) => metrics::describe_counter!(m.name, u, help),
            (MetricKind::Counter, None) => metrics::describe_counter!(m.name, help),
            (MetricKind::Gauge, Some(u)) => metrics::describe_gauge!(m.name, u, help),
            (MetricKind::Gauge, None) => metrics::describe_gauge!(m.name, help),
            (MetricKind::Histogram, Some(u)) => metrics::describe_histogram!(m.name, u, help),
            (MetricKind::Histogram, None) => metrics::describe_histogram!(m.name, help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_histograms_reach_minutes_and_latencies_stay_fine() {
        for name in [JOB_STEP_SECONDS, JOB_TASK_SECONDS] {
            let b = buckets_for(name);
            assert!(b.last().is_some_and(|&l| l >= 600.0), "{name}: {b:?}");
            assert!(b.iter().any(|&l| (30.0..=120.0).contains(&l)), "{name}");
        }
        for m in ALL.iter().filter(|m| m.kind == MetricKind::Histogram) {
            let b = buckets_for(m.name);
            assert!(
                b.windows(2).all(|w| w[0] < w[1]),
                "{}: not increasing",
                m.name
            );
            if ![JOB_STEP_SECONDS, JOB_TASK_SECONDS].contains(&m.name) {
                assert!(b[0] <= 0.0001, "{}: no sub-millisecond bucket", m.name);
            }
        }
    }

    #[test]
    fn names_follow_conventions() {
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            assert!(m.name.starts_with("tidepool_"), "{}", m.name);
            assert!(seen.insert(m.name), "duplicate {}", m.name);
            assert_eq!(
                m.kind == MetricKind::Counter,
                m.name.ends_with("_total"),
                "{}",
                m.name
            );
            if m.kind == MetricKind::Histogram {
                assert!(
                    m.name.ends_with("_seconds") || m.name.ends_with("_bytes"),
                    "{}",
                    m.name
                );
            }
        }
    }
}
