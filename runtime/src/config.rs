//! Typed node configuration: defaults with units, loading, validation.
//!
//! A node's configuration is a TOML file (`config/node.toml` is the documented default) merged
//! with `TIDEPOOL_*` environment variables, then validated before any socket is bound. Every
//! field has a default, so an empty file (or no file) is a valid single-node `n1` config.
//!
//! # Environment variables
//!
//! Read with figment's own environment provider (`Env`, split on `__`); the rules around it
//! (an upper-case prefix, no empty segments, errors naming the variable) are checked here.
//! A variable is configuration only when its name starts with `TIDEPOOL_` *and* contains `__`.
//! The rest of the name, lowercased, is the key path with `__` between levels:
//! `TIDEPOOL_NODE__NAME=n2` sets `node.name`, `TIDEPOOL_CLUSTER__PLACEMENT_EPS=0.5` sets
//! `cluster.placement_eps`. Other `TIDEPOOL_*` variables (`TIDEPOOL_CONNECT`,
//! `TIDEPOOL_CERT_DIR`) belong to the CLI and are ignored here.
//!
//! Values are parsed like TOML-ish literals: `5000` is a number, `true` a bool,
//! `["n1","n2"]` a list, `{ttl_ms=4000,renew_ms=1000}` a table, anything else a string. A
//! string that looks like a number must be quoted (`TIDEPOOL_NODE__NAME='"42"'`). Environment
//! values replace file values; lists are replaced whole, not appended to.
//!
//! # Errors
//!
//! Every failure is a [`ConfigError`] naming the offending key (dotted path, list elements as
//! `cluster.seeds[1]`) or `config file` when the file itself is missing or unparsable.
//! The binary exits with [`ConfigError::EXIT_CODE`] (64, `EX_USAGE`).
//!
//! # Membership
//!
//! Membership is dynamic: the Raft control plane learns members from nodes that join through
//! `cluster.seeds` (a node dials each seed and learns its name from the peer's certificate).
//! The file names only the control-plane voters (`cluster.voters`), never their addresses. The
//! old static `cluster.members` list is rejected with an error that says so.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Prefix of environment variables that may carry configuration.
pub const ENV_PREFIX: &str = "TIDEPOOL_";
/// Separator between key levels in an environment variable name.
pub const ENV_SEPARATOR: &str = "__";

/// The whole configuration of one node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's identity and local addresses.
    pub node: NodeSection,
    /// How to join the cluster, control-plane voters, sharding.
    pub cluster: ClusterSection,
    /// Certificates for mutual TLS.
    pub tls: TlsSection,
    /// Shared object storage for datasets and checkpoints.
    pub storage: StorageSection,
    /// QUIC transport limits and timeouts.
    pub transport: TransportSection,
    /// Compute worker pool.
    pub workers: WorkerSection,
    /// Per-shard limits.
    pub shard: ShardSection,
    /// Ownership leases: when a node may serve its shards.
    pub lease: LeaseSection,
    /// The autoscaling recommendation the Raft leader computes and exports.
    pub autoscale: AutoscaleSection,
    /// Limits of the admin HTTP listener (`node.admin`).
    pub admin: AdminSection,
    /// Job admission: memory budget and step caps.
    pub jobs: JobsSection,
}

/// `[node]`: this node's identity and local addresses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Node name, a DNS label (1–63 of `[a-z0-9-]`, no leading/trailing `-`). Must match the
    /// CN/SAN of the node certificate: peers learn it from there. Default `"n1"`.
    pub name: String,
    /// QUIC (UDP) address for peers and clients. Default `127.0.0.1:7400`.
    pub listen: SocketAddr,
    /// Admin HTTP (TCP) address serving `/metrics`, `/livez`, `/readyz`. Default `127.0.0.1:7401`.
    pub admin: SocketAddr,
    /// Directory for this node's local state (raft log, caches). Default `./data/n1`.
    pub data_dir: PathBuf,
    /// Milliseconds allowed between SIGTERM and exit for draining shards. Default 10000 (10 s).
    pub shutdown_grace_ms: u64,
    /// The QUIC address peers dial, when it differs from `listen` (a wildcard `listen` such as
    /// `0.0.0.0:7400` in a container: advertise the pod IP). Default: `listen`.
    pub advertise: Option<SocketAddr>,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            name: "n1".into(),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7400),
            admin: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7401),
            data_dir: PathBuf::from("./data/n1"),
            shutdown_grace_ms: 10_000,
            advertise: None,
        }
    }
}

/// `[cluster]`: how to join the cluster, control-plane voters, sharding.
///
/// There is no member list: the control plane learns members from nodes joining through seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Name of the cluster, exported as the `cluster` label of every metric (dashboards and
    /// alerts tell clusters apart by it). 1..=63 characters of `[A-Za-z0-9_.-]`. Default
    /// `"tidepool"`.
    pub name: String,
    /// `host:port` (port 1..=65535) of reachable nodes to join through; the node dials each and
    /// learns its name from its certificate. Empty = start a new cluster, allowed only when this
    /// node is in `voters`. A seed equal to this node's own `node.listen` is allowed and ignored
    /// at run time, so all nodes can share one seed list. Default `["127.0.0.1:7400"]`.
    pub seeds: Vec<String>,
    /// Names (DNS labels) of the control-plane voters, non-empty and unique (1 for dev, 3 or 5
    /// in production). Their addresses are discovered through `seeds`. Default `["n1"]`.
    pub voters: Vec<String>,
    /// Number of shards, 1..=65536. Fixed for the life of the cluster. Default 64.
    pub shards: u32,
    /// Bounded-load slack for shard placement: no member owns more than
    /// `ceil(shards / members * (1 + eps))` shards. In (0, 10]. Default 0.25.
    pub placement_eps: f64,
    /// Graceful shard moves (handoffs) in flight at once; further moves wait until one
    /// finishes. >= 1. Default 4.
    pub max_concurrent_handoffs: usize,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            name: "tidepool".into(),
            seeds: vec!["127.0.0.1:7400".into()],
            voters: vec!["n1".into()],
            shards: 64,
            placement_eps: 0.25,
            max_concurrent_handoffs: 4,
        }
    }
}

/// `[tls]`: certificates for mutual TLS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// Directory holding `ca.pem`, `node.pem`, `node.key`. Default `./certs/n1`.
    pub dir: PathBuf,
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./certs/n1"),
        }
    }
}

/// `[storage]`: shared object storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// object_store URL; scheme one of `file`, `s3`, `gs`, `az`, `memory`.
    /// Default `file://./data/shared`.
    pub url: String,
    /// The data key file that seals every storage object at rest (format in
    /// `storage::keys`). Default (unset): `data.key` in the `[tls]` directory, where
    /// `tidepool certs issue --node` puts it. Every node of a cluster needs the same keys.
    pub key_file: Option<PathBuf>,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            url: "file://./data/shared".into(),
            key_file: None,
        }
    }
}

/// Name of the data key file in a certificate directory.
pub const DATA_KEY_FILE: &str = "data.key";

/// `[transport]`: QUIC transport limits and timeouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportSection {
    /// Largest accepted frame in bytes, 1 KiB..=1 GiB; larger frames close the stream.
    /// Default 67108864 (64 MiB).
    pub max_frame_bytes: u64,
    /// Messages queued per peer link before senders see backpressure, >= 1. Default 1024.
    pub send_queue_depth: usize,
    /// Milliseconds to establish a connection, > 0. Default 5000.
    pub connect_timeout_ms: u64,
    /// Milliseconds to wait for a response, > 0. Default 10000.
    pub request_timeout_ms: u64,
    /// Ceiling of the exponential reconnect backoff in milliseconds, > 0. Default 5000.
    pub reconnect_max_backoff_ms: u64,
    /// Bytes one connection may hold in frames being received or not yet handled,
    /// >= `max_frame_bytes`. Default 134217728 (128 MiB).
    pub connection_inflight_bytes: u64,
    /// Bytes all connections together may hold that way, >= `connection_inflight_bytes`.
    /// Default 536870912 (512 MiB).
    pub node_inflight_bytes: u64,
    /// Bytes queued for sending to one peer, >= `max_frame_bytes`. Default 67108864 (64 MiB).
    pub connection_send_bytes: u64,
    /// Milliseconds a frame may wait for send budget; a peer that does not read for this long
    /// has its connection closed (and the memory returned). > 0. Default 10000.
    pub send_stall_ms: u64,
    /// Milliseconds a peer may pause in the middle of a frame before the stream is reset, and
    /// a received frame may wait for memory budget. > 0. Default 10000.
    pub receive_stall_ms: u64,
    /// Requests one connection may have outstanding (read, not yet answered); further ones
    /// wait in the peer's stream (backpressure), >= 1. Default 256.
    pub max_requests_per_connection: usize,
    /// Connections one certificate name may hold open to a node at once, >= 1. Default 64.
    pub max_connections_per_peer: usize,
    /// Concurrent incoming QUIC streams per connection (quinn's limit), >= 1. Default 256.
    pub max_streams_per_connection: u32,
}

impl Default for TransportSection {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * MIB,
            send_queue_depth: 1024,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            reconnect_max_backoff_ms: 5_000,
            connection_inflight_bytes: 128 * MIB,
            node_inflight_bytes: 512 * MIB,
            connection_send_bytes: 64 * MIB,
            send_stall_ms: 10_000,
            receive_stall_ms: 10_000,
            max_requests_per_connection: 256,
            max_connections_per_peer: 64,
            max_streams_per_connection: 256,
        }
    }
}

/// `[workers]`: compute worker pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSection {
    /// Worker threads; 0 = number of CPUs. Default 0.
    pub threads: usize,
    /// Tasks queued for the pool before submitters see backpressure, >= 1. Default 256.
    pub queue_depth: usize,
}

impl Default for WorkerSection {
    fn default() -> Self {
        Self {
            threads: 0,
            queue_depth: 256,
        }
    }
}

/// `[shard]`: per-shard limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShardSection {
    /// Operations queued per shard before senders see backpressure, >= 1. Default 1024.
    pub max_inflight: usize,
    /// Requests buffered per shard while it is handed off gracefully to its new owner; once
    /// full, further requests are refused as retryable (overloaded). >= 1. Default 1024.
    pub handoff_buffer: usize,
}

impl Default for ShardSection {
    fn default() -> Self {
        Self {
            max_inflight: 1024,
            handoff_buffer: 1024,
        }
    }
}

/// `[lease]`: ownership leases, which keep two nodes from serving one shard at once.
///
/// A node serves its shards only while its lease is valid. Validity is counted on the node's own
/// clock from the instant it *sent* the renewal that the leader granted, and lasts
/// `ttl_ms - drift_margin_ms`. The control-plane leader declares a node down (and may reassign
/// its shards) only `ttl_ms + drift_margin_ms` after its last grant to that node, so the node
/// has stopped serving `2 * drift_margin_ms` before anyone else may start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseSection {
    /// Lease length in milliseconds, > 0. Longer = fewer renewals but slower failover: a crashed
    /// node's shards wait `ttl_ms + drift_margin_ms`. Default 2000 (2 s).
    pub ttl_ms: u64,
    /// Milliseconds between renewals, > 0 and < `ttl_ms - drift_margin_ms` (the time a grant
    /// keeps the node valid). Default 500, so three renewals in a row may be lost.
    pub renew_ms: u64,
    /// Safety margin in milliseconds for clock-rate error between node and leader: subtracted by
    /// the node, added by the leader. < `ttl_ms / 2`. Default 200.
    pub drift_margin_ms: u64,
}

impl Default for LeaseSection {
    fn default() -> Self {
        Self {
            ttl_ms: 2_000,
            renew_ms: 500,
            drift_margin_ms: 200,
        }
    }
}

/// `[autoscale]`: the recommendation (`tidepool_autoscale_desired_nodes`) the Raft leader computes
/// from the load every node reports with its lease renewals. See [`crate::autoscale`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoscaleSection {
    /// Fewest nodes to recommend, >= 1 (at least the voters). Default 1.
    pub min_nodes: u32,
    /// Most nodes to recommend, >= min_nodes. Default 100.
    pub max_nodes: u32,
    /// Mean worker utilisation to aim for, in (0, 1]. Default 0.7.
    pub target_utilization: f64,
    /// Runnable backlog (queued tasks + messages) per node to aim for, > 0. Default 100.
    pub target_backlog_per_node: f64,
    /// No change while each signal is within this fraction of its target, in [0, 1). Default 0.1.
    pub tolerance: f64,
    /// A scale-up must be wanted for this long (ms). Default 30000.
    pub scale_up_stabilization_ms: u64,
    /// A scale-down must be wanted for this long (ms). Default 300000 (5 min).
    pub scale_down_stabilization_ms: u64,
    /// How often the leader samples the load (ms), > 0. Default 5000.
    pub sample_ms: u64,
}

impl Default for AutoscaleSection {
    fn default() -> Self {
        Self {
            min_nodes: 1,
            max_nodes: 100,
            target_utilization: 0.7,
            target_backlog_per_node: 100.0,
            tolerance: 0.1,
            scale_up_stabilization_ms: 30_000,
            scale_down_stabilization_ms: 300_000,
            sample_ms: 5_000,
        }
    }
}

impl AutoscaleSection {
    /// The policy these settings describe.
    pub fn policy(&self) -> crate::autoscale::AutoscalePolicy {
        crate::autoscale::AutoscalePolicy {
            min_nodes: self.min_nodes,
            max_nodes: self.max_nodes,
            target_utilization: self.target_utilization,
            target_backlog_per_node: self.target_backlog_per_node,
            tolerance: self.tolerance,
            scale_up_window: std::time::Duration::from_millis(self.scale_up_stabilization_ms),
            scale_down_window: std::time::Duration::from_millis(self.scale_down_stabilization_ms),
        }
    }
}

impl From<&LeaseSection> for crate::lease::LeaseConfig {
    fn from(l: &LeaseSection) -> Self {
        crate::lease::LeaseConfig {
            ttl: std::time::Duration::from_millis(l.ttl_ms),
            renew_every: std::time::Duration::from_millis(l.renew_ms),
            drift_margin: std::time::Duration::from_millis(l.drift_margin_ms),
        }
    }
}

impl From<&TransportSection> for crate::transport::TransportConfig {
    fn from(t: &TransportSection) -> Self {
        use std::time::Duration;
        crate::transport::TransportConfig {
            max_frame_bytes: t.max_frame_bytes as usize,
            send_queue_depth: t.send_queue_depth,
            connect_timeout: Duration::from_millis(t.connect_timeout_ms),
            reconnect_max_backoff: Duration::from_millis(t.reconnect_max_backoff_ms),
            connection_inflight_bytes: t.connection_inflight_bytes as usize,
            node_inflight_bytes: t.node_inflight_bytes as usize,
            connection_send_bytes: t.connection_send_bytes as usize,
            send_stall: Duration::from_millis(t.send_stall_ms),
            receive_stall: Duration::from_millis(t.receive_stall_ms),
            max_requests_per_connection: t.max_requests_per_connection,
            max_connections_per_peer: t.max_connections_per_peer,
            max_streams_per_connection: t.max_streams_per_connection,
        }
    }
}

impl From<&ClusterSection> for crate::rebalance::RebalanceConfig {
    fn from(c: &ClusterSection) -> Self {
        crate::rebalance::RebalanceConfig {
            max_concurrent_handoffs: c.max_concurrent_handoffs,
            eps: c.placement_eps,
        }
    }
}

/// `[admin]`: limits of the admin HTTP listener (`/metrics`, `/livez`, `/readyz`), so that idle
/// or slow clients cannot hold the node's file descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Milliseconds a connection may take to send a request's headers, and may sit idle between
    /// requests, before it is closed. > 0. Default 5000 (5 s).
    pub header_read_timeout_ms: u64,
    /// Milliseconds a request may take to be answered (503 after that). > 0. Default 10000.
    pub request_timeout_ms: u64,
    /// Open admin connections at once; further connections are closed as soon as they are
    /// accepted. >= 1. Default 64.
    pub max_connections: usize,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            max_connections: 64,
        }
    }
}

/// `[jobs]`: admission control (see `crate::admission`): a job or synthetic dataset that does
/// not fit is refused at submit, with the numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsSection {
    /// Bytes of job data and model one node may hold resident: one shard's partition per worker
    /// thread plus its model and messages, and the cache of mapped partitions (half of it).
    /// 1 MiB..=1 TiB. Default 8589934592 (8 GiB).
    pub memory_budget_bytes: u64,
    /// Most steps a job may plan (epochs x steps per epoch, k-means iterations). >= 1.
    /// Default 10000000.
    pub max_steps: u64,
    /// Most epochs a training job may ask for. >= 1. Default 100000.
    pub max_epochs: u64,
    /// URL prefixes `dataset import URL` may read from (`s3://lake/`, `file:///data/`). A
    /// `file://` URL is compared after resolving `..` and links. Default empty: imports from
    /// storage are refused until the operator names where they may read (a node's own files,
    /// its keys included, are never importable by accident).
    pub import_urls: Vec<String>,
}

impl Default for JobsSection {
    fn default() -> Self {
        Self {
            memory_budget_bytes: 8 * GIB,
            max_steps: 10_000_000,
            max_epochs: 100_000,
            import_urls: Vec::new(),
        }
    }
}

impl NodeConfig {
    /// The limits job admission checks against on this node.
    pub fn admission_limits(&self) -> crate::admission::Limits {
        crate::admission::Limits {
            memory_budget_bytes: self.jobs.memory_budget_bytes,
            max_frame_bytes: self.transport.max_frame_bytes,
        }
    }

    /// The caps on a job spec's steps and epochs on this node.
    pub fn job_caps(&self) -> crate::jobspec::JobCaps {
        crate::jobspec::JobCaps {
            max_steps: self.jobs.max_steps,
            max_epochs: self.jobs.max_epochs,
        }
    }

    fn validate_admin_and_jobs(&self) -> Result<(), ConfigError> {
        let a = &self.admin;
        positive("admin.header_read_timeout_ms", a.header_read_timeout_ms)?;
        positive("admin.request_timeout_ms", a.request_timeout_ms)?;
        positive("admin.max_connections", a.max_connections as u64)?;
        let j = &self.jobs;
        if !(MIB..=1024 * GIB).contains(&j.memory_budget_bytes) {
            let reason = format!("{} bytes is outside 1 MiB..=1 TiB", j.memory_budget_bytes);
            return Err(ConfigError::new("jobs.memory_budget_bytes", reason));
        }
        positive("jobs.max_steps", j.max_steps)?;
        positive("jobs.max_epochs", j.max_epochs)?;
        for (i, u) in j.import_urls.iter().enumerate() {
            let ok = ["file:///", "s3://", "gs://", "az://"]
                .iter()
                .any(|s| u.starts_with(s) && u.len() > s.len())
                && !u.contains(['*', '?', '[', '{']);
            if !ok {
                return Err(ConfigError::new(
                    format!("jobs.import_urls[{i}]"),
                    format!(
                        "{u:?} is not a URL prefix: file:///absolute/dir/, s3://bucket/..., gs://... or az://... (no globs)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A configuration problem: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {reason}")]
pub struct ConfigError {
    /// Dotted key path (`node.name`, `cluster.seeds[1]`), or `config file`.
    pub key: String,
    /// Human-readable reason, including the source of the value where known.
    pub reason: String,
}

impl ConfigError {
    /// Process exit code for a bad configuration: 64, `EX_USAGE` from sysexits.h.
    pub const EXIT_CODE: i32 = 64;

    /// Key used when the file itself is missing or cannot be parsed.
    pub const FILE_KEY: &'static str = "config file";

    /// An error for `key` with `reason`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const MAX_SHARDS: u32 = 65_536;
const STORAGE_SCHEMES: [&str; 5] = ["file", "s3", "gs", "az", "memory"];

impl NodeConfig {
    /// Loads the TOML file at `path` (if any) merged with the process's `TIDEPOOL_*` environment
    /// variables (`__` for nesting: `TIDEPOOL_NODE__NAME=n2` sets `node.name`; figment's own
    /// `Env::prefixed(..).split("__")` provider), then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        // figment skips variables that are not UTF-8; a configuration variable must not vanish.
        // figment would also take `__x` as a key named ``, and a lowercase prefix.
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if !is_config_var(name) {
                continue;
            }
            if value.to_str().is_none() {
                let reason = format!("{name} is not valid UTF-8");
                return Err(ConfigError::new(env_key_path(name), reason));
            }
            if env_key_path(name).split('.').any(str::is_empty) {
                let reason = format!("{name}: empty key segment (use `__` between levels only)");
                return Err(ConfigError::new(env_key_path(name), reason));
            }
        }
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.is_file() {
                return Err(ConfigError::new(
                    ConfigError::FILE_KEY,
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // `Env::prefixed` matches the prefix in any case; ours is upper case only.
        let env = Env::raw()
            .filter_map(|key| {
                let key = key.as_str();
                is_config_var(key).then(|| key[ENV_PREFIX.len()..].to_owned().into())
            })
            .split(ENV_SEPARATOR);
        let figment = figment.merge(env);
        reject_static_members(&figment)?;
        let config: NodeConfig = figment.extract().map_err(from_figment)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every cross-field and range rule; the error names the first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_node()?;
        self.validate_cluster()?;
        self.validate_transport()?;
        self.validate_limits()?;
        self.validate_lease()?;
        self.validate_autoscale()?;
        self.validate_admin_and_jobs()?;
        validate_storage_url(&self.storage.url)?;
        if self.storage.key_file.as_deref() == Some(Path::new("")) {
            let reason = "is empty; leave it out for data.key in the [tls] dir";
            return Err(ConfigError::new("storage.key_file", reason));
        }
        Ok(())
    }

    /// The data key file: `storage.key_file`, or `data.key` in `tls.dir`.
    pub fn data_key_file(&self) -> PathBuf {
        self.storage
            .key_file
            .clone()
            .unwrap_or_else(|| self.tls.dir.join(DATA_KEY_FILE))
    }

    /// Whether this node (`node.name`) is one of the control-plane voters (`cluster.voters`).
    pub fn is_voter(&self) -> bool {
        self.cluster.voters.contains(&self.node.name)
    }

    fn validate_node(&self) -> Result<(), ConfigError> {
        let node = &self.node;
        check_dns_label(&node.name).map_err(|r| ConfigError::new("node.name", r))?;
        if node.listen == node.admin {
            let reason = format!("{} is also node.listen", node.admin);
            return Err(ConfigError::new("node.admin", reason));
        }
        match node.advertise {
            Some(a) if a.ip().is_unspecified() || a.port() == 0 => {
                let reason = format!("{a} is not an address peers can dial");
                return Err(ConfigError::new("node.advertise", reason));
            }
            None if node.listen.ip().is_unspecified() => {
                let reason = format!(
                    "node.listen {} is a wildcard address; set node.advertise to the address peers dial (e.g. the pod IP)",
                    node.listen
                );
                return Err(ConfigError::new("node.advertise", reason));
            }
            _ => {}
        }
        positive("node.shutdown_grace_ms", node.shutdown_grace_ms)
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        let name_ok = (1..=63).contains(&c.name.len())
            && c.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !name_ok {
            return Err(ConfigError::new(
                "cluster.name",
                "must be 1 to 63 characters of A-Z, a-z, 0-9, '_', '.', '-'",
            ));
        }
        if c.voters.is_empty() {
            return Err(ConfigError::new(
                "cluster.voters",
                "must name at least one voter",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, voter) in c.voters.iter().enumerate() {
            check_dns_label(voter)
                .map_err(|r| ConfigError::new(format!("cluster.voters[{i}]"), r))?;
            if !seen.insert(voter.as_str()) {
                let reason = format!("`{voter}` is listed twice");
                return Err(ConfigError::new("cluster.voters", reason));
            }
        }
        for (i, seed) in c.seeds.iter().enumerate() {
            check_host_port(seed)
                .map_err(|r| ConfigError::new(format!("cluster.seeds[{i}]"), r))?;
        }
        if c.seeds.is_empty() && !self.is_voter() {
            let reason = format!(
                "empty means \"start a new cluster\", which only a voter may do, and `{}` is not \
                 in cluster.voters ({}); list at least one node to join through",
                self.node.name,
                c.voters.join(", ")
            );
            return Err(ConfigError::new("cluster.seeds", reason));
        }
        if !(1..=MAX_SHARDS).contains(&c.shards) {
            let reason = format!("{} is outside 1..={MAX_SHARDS}", c.shards);
            return Err(ConfigError::new("cluster.shards", reason));
        }
        // Written so that NaN fails too.
        if !(c.placement_eps > 0.0 && c.placement_eps <= 10.0) {
            let reason = format!("{} is outside (0, 10]", c.placement_eps);
            return Err(ConfigError::new("cluster.placement_eps", reason));
        }
        positive(
            "cluster.max_concurrent_handoffs",
            c.max_concurrent_handoffs as u64,
        )
    }

    fn validate_transport(&self) -> Result<(), ConfigError> {
        let t = &self.transport;
        if !(KIB..=GIB).contains(&t.max_frame_bytes) {
            let reason = format!("{} bytes is outside 1 KiB..=1 GiB", t.max_frame_bytes);
            return Err(ConfigError::new("transport.max_frame_bytes", reason));
        }
        positive("transport.send_queue_depth", t.send_queue_depth as u64)?;
        positive("transport.connect_timeout_ms", t.connect_timeout_ms)?;
        positive("transport.request_timeout_ms", t.request_timeout_ms)?;
        positive(
            "transport.reconnect_max_backoff_ms",
            t.reconnect_max_backoff_ms,
        )?;
        at_least(
            "transport.connection_inflight_bytes",
            t.connection_inflight_bytes,
            "transport.max_frame_bytes",
            t.max_frame_bytes,
        )?;
        at_least(
            "transport.node_inflight_bytes",
            t.node_inflight_bytes,
            "transport.connection_inflight_bytes",
            t.connection_inflight_bytes,
        )?;
        at_least(
            "transport.connection_send_bytes",
            t.connection_send_bytes,
            "transport.max_frame_bytes",
            t.max_frame_bytes,
        )?;
        positive("transport.send_stall_ms", t.send_stall_ms)?;
        positive("transport.receive_stall_ms", t.receive_stall_ms)?;
        positive(
            "transport.max_requests_per_connection",
            t.max_requests_per_connection as u64,
        )?;
        positive(
            "transport.max_connections_per_peer",
            t.max_connections_per_peer as u64,
        )?;
        positive(
            "transport.max_streams_per_connection",
            u64::from(t.max_streams_per_connection),
        )
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        positive("workers.queue_depth", self.workers.queue_depth as u64)?;
        positive("shard.max_inflight", self.shard.max_inflight as u64)?;
        positive("shard.handoff_buffer", self.shard.handoff_buffer as u64)
    }

    /// Mirrors `LeaseConfig::validate` in `lease.rs`, so that a config that loads also starts.
    fn validate_autoscale(&self) -> Result<(), ConfigError> {
        let a = &self.autoscale;
        positive("autoscale.min_nodes", u64::from(a.min_nodes))?;
        if a.max_nodes < a.min_nodes {
            let reason = format!(
                "{} is below autoscale.min_nodes ({})",
                a.max_nodes, a.min_nodes
            );
            return Err(ConfigError::new("autoscale.max_nodes", reason));
        }
        if !(a.target_utilization > 0.0 && a.target_utilization <= 1.0) {
            let reason = format!("{} is not in (0, 1]", a.target_utilization);
            return Err(ConfigError::new("autoscale.target_utilization", reason));
        }
        if !(a.target_backlog_per_node > 0.0 && a.target_backlog_per_node.is_finite()) {
            let reason = format!("{} must be a positive number", a.target_backlog_per_node);
            return Err(ConfigError::new(
                "autoscale.target_backlog_per_node",
                reason,
            ));
        }
        if !(0.0..1.0).contains(&a.tolerance) {
            let reason = format!("{} is not in [0, 1)", a.tolerance);
            return Err(ConfigError::new("autoscale.tolerance", reason));
        }
        positive("autoscale.sample_ms", a.sample_ms)
    }

    fn validate_lease(&self) -> Result<(), ConfigError> {
        let l = &self.lease;
        positive("lease.ttl_ms", l.ttl_ms)?;
        if l.drift_margin_ms >= l.ttl_ms / 2 {
            let reason = format!(
                "{} must be less than half of lease.ttl_ms ({})",
                l.drift_margin_ms, l.ttl_ms
            );
            return Err(ConfigError::new("lease.drift_margin_ms", reason));
        }
        positive("lease.renew_ms", l.renew_ms)?;
        // `drift_margin_ms < ttl_ms / 2` above, so this neither underflows nor is 0.
        let window = l.ttl_ms - l.drift_margin_ms;
        if l.renew_ms >= window {
            let reason = format!(
                "{} must be less than lease.ttl_ms - lease.drift_margin_ms ({window}), how long a \
                 granted renewal keeps this node valid",
                l.renew_ms
            );
            return Err(ConfigError::new("lease.renew_ms", reason));
        }
        Ok(())
    }
}

/// Rejects the static member list of older configs with a reason that says what replaced it,
/// before deserializing (which would only call it an unknown field).
fn reject_static_members(figment: &Figment) -> Result<(), ConfigError> {
    const KEY: &str = "cluster.members";
    if figment.find_value(KEY).is_err() {
        return Ok(());
    }
    let mut reason = String::from(
        "unknown field `members`: membership is dynamic now (the control plane learns members \
         from nodes joining through cluster.seeds); remove the list, name the control-plane \
         voters in cluster.voters and list nodes to join through in cluster.seeds",
    );
    match figment.find_metadata(KEY) {
        Some(md) if is_env(md) => {
            let path = [String::from("cluster"), String::from("members")];
            if let Some(var) = env_var_for(&path) {
                reason.push_str(&format!(" (from {var})"));
            }
        }
        Some(md) => match &md.source {
            Some(src) => reason.push_str(&format!(" (in {src})")),
            None => reason.push_str(&format!(" (from {})", md.name)),
        },
        None => {}
    }
    Err(ConfigError::new(KEY, reason))
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::new(key, "must be greater than 0"));
    }
    Ok(())
}

fn at_least(key: &str, value: u64, other_key: &str, other: u64) -> Result<(), ConfigError> {
    if value < other {
        return Err(ConfigError::new(
            key,
            format!("{value} is less than {other_key} ({other})"),
        ));
    }
    Ok(())
}

/// RFC 1123 label, lowercase only: 1..=63 of `[a-z0-9-]`, no leading or trailing `-`.
fn check_dns_label(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("`{name}` must be 1 to 63 characters long"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "`{name}` contains {c:?}; allowed are a-z, 0-9 and '-'"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("`{name}` must not start or end with '-'"));
    }
    Ok(())
}

/// `host:port` with a non-empty host and a non-zero port (`[::1]:7400` for IPv6).
fn check_host_port(s: &str) -> Result<(), String> {
    let bad = || format!("`{s}` is not host:port");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok(())
}

fn validate_storage_url(url: &str) -> Result<(), ConfigError> {
    let err = |reason: String| Err(ConfigError::new("storage.url", reason));
    let Some((scheme, rest)) = url.split_once("://") else {
        return err(format!("`{url}` is not a URL (expected scheme://...)"));
    };
    if !STORAGE_SCHEMES.contains(&scheme) {
        let allowed = STORAGE_SCHEMES.join(", ");
        return err(format!("scheme `{scheme}` is not one of {allowed}"));
    }
    if rest.is_empty() && scheme != "memory" {
        return err(format!("`{url}` has no path or bucket"));
    }
    Ok(())
}

fn is_config_var(name: &str) -> bool {
    name.strip_prefix(ENV_PREFIX)
        .is_some_and(|rest| rest.contains(ENV_SEPARATOR))
}

/// `TIDEPOOL_CLUSTER__PLACEMENT_EPS` -> `cluster.placement_eps`.
fn env_key_path(name: &str) -> String {
    let rest = name.strip_prefix(ENV_PREFIX).unwrap_or(name);
    rest.to_ascii_lowercase().replace(ENV_SEPARATOR, ".")
}

/// The configuration variable in the process environment that set `path` (or a table
/// containing it, or a key inside it).
fn env_var_for(path: &[String]) -> Option<String> {
    std::env::vars().map(|(name, _)| name).find(|name| {
        if !is_config_var(name) {
            return false;
        }
        let var_path = env_key_path(name);
        let var_keys: Vec<&str> = var_path.split('.').collect();
        let n = var_keys.len().min(path.len());
        var_keys[..n].iter().zip(&path[..n]).all(|(a, b)| *a == b)
    })
}

/// Whether figment's metadata is that of the environment provider (`TIDEPOOL_` environment
/// variable(s)).
fn is_env(md: &figment::Metadata) -> bool {
    md.name.contains("environment variable")
}

/// Maps the first figment error to the key it concerns and where the value came from.
fn from_figment(err: figment::Error) -> ConfigError {
    let Some(err) = err.into_iter().next() else {
        return ConfigError::new(ConfigError::FILE_KEY, "unknown error");
    };
    let mut path = err.path.clone();
    // Name the field itself: figment ends the path with an unknown field's name but not with a
    // missing one's.
    let field = match &err.kind {
        figment::error::Kind::UnknownField(field, _) => Some(field.clone()),
        figment::error::Kind::MissingField(field) => Some(field.to_string()),
        _ => None,
    };
    if let Some(field) = field {
        if path.last() != Some(&field) {
            path.push(field);
        }
    }
    let key = if path.is_empty() {
        ConfigError::FILE_KEY.to_owned()
    } else {
        display_path(&path)
    };
    let mut reason = err.kind.to_string();
    // figment may name the environment for a key that came from the file; only a variable
    // that really set the key makes it "from the environment".
    let var = err
        .metadata
        .as_ref()
        .filter(|md| is_env(md))
        .and_then(|_| env_var_for(&path));
    let from_env = var.is_some();
    // "Did you mean": the known key closest to an unknown one, in the form it was written in.
    let suggestion = match &err.kind {
        figment::error::Kind::UnknownField(field, known) => closest(field, known).map(|k| {
            let mut known_path = path.clone();
            known_path.pop();
            known_path.push(k.to_owned());
            if from_env {
                env_var_name(&known_path)
            } else {
                format!("`{}`", display_path(&known_path))
            }
        }),
        _ => None,
    };
    match &err.metadata {
        Some(_) if from_env => {
            if let Some(var) = &var {
                reason.push_str(&format!(" (from {var})"));
            }
            if matches!(&err.kind, figment::error::Kind::InvalidType(_, exp) if exp.contains("string"))
            {
                reason.push_str("; quote strings that look like numbers or bools: '\"42\"'");
            }
        }
        Some(md) => match &md.source {
            Some(src) => reason.push_str(&format!(" (in {src})")),
            None => reason.push_str(&format!(" (from {})", md.name)),
        },
        None => {}
    }
    if let Some(s) = suggestion {
        reason.push_str(&format!("; did you mean {s}?"));
    }
    ConfigError::new(key, reason)
}

/// The known key closest to `unknown` by edit distance (transpositions count once), if it is
/// close enough to be a plausible typo: at most a third of the longer name's characters differ
/// (at least one may), or one name is the other plus a suffix (`ttl` for `ttl_ms`).
pub fn closest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    let unknown = unknown.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(&unknown, k), *k))
        .filter(|(d, k)| {
            let longest = unknown.chars().count().max(k.chars().count());
            *d <= (longest / 3).max(1)
                || (unknown.len() >= 2 && (k.starts_with(&unknown) || unknown.starts_with(*k)))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// `["transport", "max_frame_bytes"]` -> `TIDEPOOL_TRANSPORT__MAX_FRAME_BYTES`.
fn env_var_name(path: &[String]) -> String {
    format!(
        "{ENV_PREFIX}{}",
        path.join(ENV_SEPARATOR).to_ascii_uppercase()
    )
}

/// `["cluster", "seeds", "1"]` -> `cluster.seeds[1]`, matching validation keys.
fn display_path(path: &[String]) -> String {
    let mut out = String::new();
    for segment in path {
        if !out.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
