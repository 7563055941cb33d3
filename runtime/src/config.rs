//! Typed node configuration: defaults with units, loading, validation.
//!
//! A node's configuration is a TOML file (`config/node.toml` is the documented default) merged
//! with `TIDEPOOL_*` environment variables, then validated before any socket is bound. Every
//! field has a default, so an empty file (or no file) is a valid single-node `n1` config.
//!
//! # Environment variables
//!
//! A variable is configuration only when its name starts with `TIDEPOOL_` *and* contains `__`.
//! The rest of the name, lowercased, is the key path with `__` between levels:
//! `TIDEPOOL_NODE__NAME=n2` sets `node.name`, `TIDEPOOL_CLUSTER__PLACEMENT_EPS=0.5` sets
//! `cluster.placement_eps`. Other `TIDEPOOL_*` variables (`TIDEPOOL_CONNECT`,
//! `TIDEPOOL_CERT_DIR`) belong to the CLI and are ignored here.
//!
//! Values are parsed like TOML-ish literals: `5000` is a number, `true` a bool,
//! `["n1","n2"]` a list, `{name="n2",addr="127.0.0.1:7410"}` a table, anything else a string. A
//! string that looks like a number must be quoted (`TIDEPOOL_NODE__NAME='"42"'`). Environment
//! values replace file values; lists are replaced whole, not appended to.
//!
//! # Errors
//!
//! Every failure is a [`ConfigError`] naming the offending key (dotted path, list elements as
//! `cluster.members[1].addr`) or `config file` when the file itself is missing or unparsable.
//! The binary exits with [`ConfigError::EXIT_CODE`] (64, `EX_USAGE`).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
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
    /// Cluster membership and sharding.
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
}

/// `[node]`: this node's identity and local addresses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Node name, a DNS label (1–63 of `[a-z0-9-]`, no leading/trailing `-`). Must match the
    /// CN/SAN of the node certificate and appear in `cluster.members`. Default `"n1"`.
    pub name: String,
    /// QUIC (UDP) address for peers and clients. Default `127.0.0.1:7400`.
    pub listen: SocketAddr,
    /// Admin HTTP (TCP) address serving `/metrics`, `/livez`, `/readyz`. Default `127.0.0.1:7401`.
    pub admin: SocketAddr,
    /// Directory for this node's local state (raft log, caches). Default `./data/n1`.
    pub data_dir: PathBuf,
    /// Milliseconds allowed between SIGTERM and exit for draining shards. Default 10000 (10 s).
    pub shutdown_grace_ms: u64,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            name: "n1".into(),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7400),
            admin: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7401),
            data_dir: PathBuf::from("./data/n1"),
            shutdown_grace_ms: 10_000,
        }
    }
}

/// `[cluster]`: membership and sharding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// `host:port` of any reachable members to contact on start; empty = start a new cluster.
    /// Default `["127.0.0.1:7400"]`.
    pub seeds: Vec<String>,
    /// Names of control-plane voters (1 for dev, 3 or 5 in production); each must be a member.
    /// Default `["n1"]`.
    pub voters: Vec<String>,
    /// Number of shards, 1..=65536. Fixed for the life of the cluster. Default 64.
    pub shards: u32,
    /// Static membership: every node's name and QUIC address (this node included).
    /// Default `[{ name = "n1", addr = "127.0.0.1:7400" }]`. Raft makes this dynamic later.
    pub members: Vec<MemberConfig>,
    /// Bounded-load slack for shard placement: no member owns more than
    /// `ceil(shards / members * (1 + eps))` shards. In (0, 10]. Default 0.25.
    pub placement_eps: f64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            seeds: vec!["127.0.0.1:7400".into()],
            voters: vec!["n1".into()],
            shards: 64,
            members: vec![MemberConfig::default()],
            placement_eps: 0.25,
        }
    }
}

/// One entry of `cluster.members`. Both fields are required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// Member name, a DNS label; unique within the cluster.
    pub name: String,
    /// The member's QUIC address; unique within the cluster.
    pub addr: SocketAddr,
}

impl Default for MemberConfig {
    fn default() -> Self {
        Self {
            name: "n1".into(),
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7400),
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
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            url: "file://./data/shared".into(),
        }
    }
}

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
}

impl Default for TransportSection {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * MIB,
            send_queue_depth: 1024,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            reconnect_max_backoff_ms: 5_000,
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
}

impl Default for ShardSection {
    fn default() -> Self {
        Self { max_inflight: 1024 }
    }
}

/// A configuration problem: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {reason}")]
pub struct ConfigError {
    /// Dotted key path (`node.name`, `cluster.members[1].addr`), or `config file`.
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
    /// variables (`__` for nesting: `TIDEPOOL_NODE__NAME=n2` sets `node.name`), then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if !is_config_var(name) {
                continue;
            }
            let value = value.into_string().map_err(|_| {
                ConfigError::new(env_key_path(name), format!("{name} is not valid UTF-8"))
            })?;
            env.push((name.to_owned(), value));
        }
        Self::load_from(path, &env)
    }

    /// Like [`NodeConfig::load`] with an explicit environment, for tests. `env` may hold any
    /// variables; only configuration variables (see the module docs) are used.
    pub fn load_from(path: Option<&Path>, env: &[(String, String)]) -> Result<Self, ConfigError> {
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
        let env = EnvVars::new(env)?;
        let config: NodeConfig = figment
            .merge(&env)
            .extract()
            .map_err(|e| from_figment(e, &env))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every cross-field and range rule; the error names the first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_members()?;
        self.validate_node()?;
        self.validate_cluster()?;
        self.validate_transport()?;
        self.validate_limits()?;
        validate_storage_url(&self.storage.url)
    }

    /// This node's entry in `cluster.members`.
    ///
    /// # Panics
    ///
    /// If `node.name` is not a member, which [`NodeConfig::validate`] (called by the loaders)
    /// rejects; only a hand-built, unvalidated config can get here.
    pub fn this_member(&self) -> &MemberConfig {
        self.find_member(&self.node.name)
            .expect("node.name is in cluster.members (checked by NodeConfig::validate)")
    }

    fn find_member(&self, name: &str) -> Option<&MemberConfig> {
        self.cluster.members.iter().find(|m| m.name == name)
    }

    fn validate_members(&self) -> Result<(), ConfigError> {
        let members = &self.cluster.members;
        if members.is_empty() {
            return Err(ConfigError::new(
                "cluster.members",
                "must list at least this node",
            ));
        }
        let mut names = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for (i, m) in members.iter().enumerate() {
            let key = |field: &str| format!("cluster.members[{i}].{field}");
            check_dns_label(&m.name).map_err(|r| ConfigError::new(key("name"), r))?;
            if !names.insert(m.name.as_str()) {
                let reason = format!("duplicate member name `{}`", m.name);
                return Err(ConfigError::new(key("name"), reason));
            }
            if !addrs.insert(m.addr) {
                let reason = format!("duplicate member address {}", m.addr);
                return Err(ConfigError::new(key("addr"), reason));
            }
        }
        Ok(())
    }

    fn validate_node(&self) -> Result<(), ConfigError> {
        let node = &self.node;
        check_dns_label(&node.name).map_err(|r| ConfigError::new("node.name", r))?;
        let Some(me) = self.find_member(&node.name) else {
            let names: Vec<&str> = self
                .cluster
                .members
                .iter()
                .map(|m| m.name.as_str())
                .collect();
            let reason = format!(
                "`{}` is not listed in cluster.members ({})",
                node.name,
                names.join(", ")
            );
            return Err(ConfigError::new("node.name", reason));
        };
        if node.listen.port() != me.addr.port() {
            let reason = format!(
                "port {} differs from this node's cluster.members entry ({})",
                node.listen.port(),
                me.addr
            );
            return Err(ConfigError::new("node.listen", reason));
        }
        if node.listen == node.admin {
            let reason = format!("{} is also node.listen", node.admin);
            return Err(ConfigError::new("node.admin", reason));
        }
        positive("node.shutdown_grace_ms", node.shutdown_grace_ms)
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        for (i, seed) in c.seeds.iter().enumerate() {
            check_host_port(seed)
                .map_err(|r| ConfigError::new(format!("cluster.seeds[{i}]"), r))?;
        }
        if !(1..=MAX_SHARDS).contains(&c.shards) {
            let reason = format!("{} is outside 1..={MAX_SHARDS}", c.shards);
            return Err(ConfigError::new("cluster.shards", reason));
        }
        if c.voters.is_empty() {
            return Err(ConfigError::new(
                "cluster.voters",
                "must name at least one member",
            ));
        }
        let mut seen = BTreeSet::new();
        for voter in &c.voters {
            if self.find_member(voter).is_none() {
                let reason = format!("`{voter}` is not listed in cluster.members");
                return Err(ConfigError::new("cluster.voters", reason));
            }
            if !seen.insert(voter.as_str()) {
                let reason = format!("`{voter}` is listed twice");
                return Err(ConfigError::new("cluster.voters", reason));
            }
        }
        // Written so that NaN fails too.
        if !(c.placement_eps > 0.0 && c.placement_eps <= 10.0) {
            let reason = format!("{} is outside (0, 10]", c.placement_eps);
            return Err(ConfigError::new("cluster.placement_eps", reason));
        }
        Ok(())
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
        )
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        positive("workers.queue_depth", self.workers.queue_depth as u64)?;
        positive("shard.max_inflight", self.shard.max_inflight as u64)
    }
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::new(key, "must be greater than 0"));
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

/// Name of the figment provider for environment variables, used to recognise its errors.
const ENV_PROVIDER: &str = "environment variable";

/// A figment provider over an explicit list of environment variables, so that tests need not
/// touch the process environment (figment's own `Env` reads only the process environment).
struct EnvVars {
    dict: Dict,
    /// `(dotted key path, variable name)` of every configuration variable, sorted.
    vars: Vec<(String, String)>,
}

impl EnvVars {
    fn new(env: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut dict = Dict::new();
        let mut vars = Vec::new();
        // Sorted so that the result does not depend on the order of `env`.
        let mut config_vars: Vec<&(String, String)> =
            env.iter().filter(|(k, _)| is_config_var(k)).collect();
        config_vars.sort();
        for (name, raw) in config_vars {
            let path = env_key_path(name);
            let keys: Vec<&str> = path.split('.').collect();
            if keys.iter().any(|k| k.is_empty()) {
                let reason = format!("{name}: empty key segment (use `__` between levels only)");
                return Err(ConfigError::new(path, reason));
            }
            let value: Value = raw.parse().unwrap_or_else(|e| match e {});
            if insert_nested(&mut dict, &keys, value).is_err() {
                let reason = format!("{name} conflicts with another variable for the same key");
                return Err(ConfigError::new(path, reason));
            }
            vars.push((path, name.clone()));
        }
        Ok(Self { dict, vars })
    }

    /// The variable that set `path` (or a table containing it, or a key inside it).
    fn var_for(&self, path: &[String]) -> Option<&str> {
        self.vars.iter().find_map(|(var_path, name)| {
            let var_keys: Vec<&str> = var_path.split('.').collect();
            let n = var_keys.len().min(path.len());
            let same = var_keys[..n].iter().zip(&path[..n]).all(|(a, b)| *a == b);
            same.then_some(name.as_str())
        })
    }
}

/// Inserts `value` at `keys` into `dict`, creating tables on the way. Fails when a prefix of
/// `keys` already holds a non-table value, or `keys` a table (`A__B=1` and `A__B__C=2`).
fn insert_nested(dict: &mut Dict, keys: &[&str], value: Value) -> Result<(), ()> {
    match keys {
        [] => Err(()),
        [last] => match dict.get(*last) {
            Some(Value::Dict(..)) => Err(()),
            _ => {
                dict.insert((*last).to_owned(), value);
                Ok(())
            }
        },
        [first, rest @ ..] => {
            let entry = dict
                .entry((*first).to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            match entry {
                Value::Dict(_, inner) => insert_nested(inner, rest, value),
                _ => Err(()),
            }
        }
    }
}

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_PROVIDER)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut map = Map::new();
        map.insert(Profile::Default, self.dict.clone());
        Ok(map)
    }
}

/// Maps the first figment error to the key it concerns and where the value came from.
fn from_figment(err: figment::Error, env: &EnvVars) -> ConfigError {
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
    match &err.metadata {
        Some(md) if md.name == ENV_PROVIDER => {
            if let Some(var) = env.var_for(&path) {
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
    ConfigError::new(key, reason)
}

/// `["cluster", "members", "1", "addr"]` -> `cluster.members[1].addr`, matching validation keys.
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
