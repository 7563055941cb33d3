//! Configuration from `TIDEPOOL_*__*` environment variables (figment's `Env` provider over the
//! process environment). A test binary of its own: every test holds one lock while it sets
//! variables, so no other thread of this process reads the environment meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tidepool_runtime::config::*;

static ENV: Mutex<()> = Mutex::new(());

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// [`NodeConfig::load`] with exactly `vars` as configuration variables.
fn load_from(path: Option<&Path>, vars: &[(String, String)]) -> Result<NodeConfig, ConfigError> {
    let _only_me = ENV.lock().unwrap_or_else(|e| e.into_inner());
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with(ENV_PREFIX)) {
            std::env::remove_var(k);
        }
    }
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    let loaded = NodeConfig::load(path);
    for (k, _) in vars {
        std::env::remove_var(k);
    }
    loaded
}

fn toml_file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(contents.as_bytes()).expect("write temp file");
    f
}

fn load_toml(contents: &str) -> Result<NodeConfig, ConfigError> {
    let f = toml_file(contents);
    load_from(Some(f.path()), &[])
}

fn err_key(result: Result<NodeConfig, ConfigError>) -> String {
    match result {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.key,
    }
}

fn invalid(edit: impl FnOnce(&mut NodeConfig)) -> String {
    let mut c = NodeConfig::default();
    c.cluster.voters = three_voters();
    assert_eq!(c.validate(), Ok(()), "base config must be valid");
    edit(&mut c);
    err_key(c.validate().map(|()| c))
}

fn three_voters() -> Vec<String> {
    vec!["n1".into(), "n2".into(), "n3".into()]
}

#[test]
fn env_overrides_file_with_nesting() {
    let f = toml_file("[cluster]\nshards = 128\n");
    let vars = env(&[
        ("TIDEPOOL_CLUSTER__SHARDS", "256"),
        ("TIDEPOOL_NODE__SHUTDOWN_GRACE_MS", "1"),
        ("TIDEPOOL_NODE__DATA_DIR", "/var/lib/tidepool"),
        ("TIDEPOOL_NODE__ADMIN", "0.0.0.0:9000"),
        ("TIDEPOOL_STORAGE__URL", "s3://bucket/prefix"),
        ("TIDEPOOL_CLUSTER__PLACEMENT_EPS", "1"),
    ]);
    let c = load_from(Some(f.path()), &vars).expect("valid");
    assert_eq!(c.cluster.shards, 256);
    assert_eq!(c.node.shutdown_grace_ms, 1);
    assert_eq!(c.node.data_dir, PathBuf::from("/var/lib/tidepool"));
    assert_eq!(c.node.admin.to_string(), "0.0.0.0:9000");
    assert_eq!(c.storage.url, "s3://bucket/prefix");
    assert_eq!(c.cluster.placement_eps, 1.0);
}

#[test]
fn env_renames_node() {
    let vars = env(&[
        ("TIDEPOOL_NODE__NAME", "n2"),
        ("TIDEPOOL_CLUSTER__VOTERS", r#"["n1","n2"]"#),
    ]);
    let c = load_from(None, &vars).expect("valid");
    assert_eq!(c.node.name, "n2");
    assert!(c.is_voter());
}

#[test]
fn new_keys_from_file_and_env() {
    let f = toml_file(
        r#"
        [cluster]
        max_concurrent_handoffs = 2
        [shard]
        handoff_buffer = 16
        [lease]
        ttl_ms = 4000
        "#,
    );
    let vars = env(&[
        ("TIDEPOOL_LEASE__RENEW_MS", "1000"),
        ("TIDEPOOL_LEASE__DRIFT_MARGIN_MS", "400"),
        ("TIDEPOOL_SHARD__HANDOFF_BUFFER", "32"),
    ]);
    let c = load_from(Some(f.path()), &vars).expect("valid");
    assert_eq!(c.cluster.max_concurrent_handoffs, 2);
    assert_eq!(c.shard.handoff_buffer, 32, "env replaces file");
    assert_eq!(
        c.lease,
        LeaseSection {
            ttl_ms: 4000,
            renew_ms: 1000,
            drift_margin_ms: 400,
        }
    );
    assert_eq!(
        load_from(Some(f.path()), &[]).map(|c| c.lease.renew_ms),
        Ok(500),
        "unset keys keep defaults"
    );
}

#[test]
fn list_from_env() {
    let vars = env(&[(
        "TIDEPOOL_CLUSTER__SEEDS",
        r#"["10.0.0.1:7400", "10.0.0.2:7400"]"#,
    )]);
    let c = load_from(None, &vars).expect("valid");
    assert_eq!(c.cluster.seeds, vec!["10.0.0.1:7400", "10.0.0.2:7400"]);

    let vars = env(&[("TIDEPOOL_CLUSTER__SEEDS", "[]")]);
    let c = load_from(None, &vars).expect("valid");
    assert!(c.cluster.seeds.is_empty());
}

#[test]
fn voters_list_from_env_replaces_file_list() {
    let f = toml_file(
        r#"
        [cluster]
        voters = ["n1"]
        seeds = ["127.0.0.2:7400"]
        "#,
    );
    let vars = env(&[("TIDEPOOL_CLUSTER__VOTERS", r#"["n1","n2","n3"]"#)]);
    let c = load_from(Some(f.path()), &vars).expect("valid");
    assert_eq!(c.cluster.voters, three_voters());
    assert_eq!(c.cluster.seeds, vec!["127.0.0.2:7400"]);
}

#[test]
fn cli_vars_and_other_env_ignored() {
    let vars = env(&[
        ("TIDEPOOL_CONNECT", "10.0.0.9:7400"),
        ("TIDEPOOL_CERT_DIR", "/nonexistent"),
        ("TIDEPOOL_LOG", "debug"),
        ("HOME", "/root"),
        ("OTHER__NESTED", "1"),
        ("tidepool_node__name", "lowercase-prefix-is-not-ours"),
    ]);
    assert_eq!(load_from(None, &vars), Ok(NodeConfig::default()));
}

#[test]
fn env_var_order_does_not_matter() {
    let a = env(&[
        ("TIDEPOOL_CLUSTER__SHARDS", "8"),
        ("TIDEPOOL_WORKERS__THREADS", "3"),
    ]);
    let mut b = a.clone();
    b.reverse();
    assert_eq!(load_from(None, &a), load_from(None, &b));
}

#[test]
fn unknown_key_suggests_the_closest_known_key() {
    let e = load_toml("[transport]\nmax_frame_byts = 1024\n").expect_err("unknown key");
    assert_eq!(e.key, "transport.max_frame_byts", "{e}");
    assert!(
        e.reason
            .ends_with("did you mean `transport.max_frame_bytes`?"),
        "{e}"
    );
    let e = load_toml("[node]\nnmae = \"n1\"\n").expect_err("unknown key");
    assert!(e.reason.contains("did you mean `node.name`?"), "{e}");
    let e = load_toml("[lease]\nttl = 2000\n").expect_err("unknown key");
    assert!(e.reason.contains("did you mean `lease.ttl_ms`?"), "{e}");
    let e = load_toml("[trasnport]\nmax_frame_bytes = 1024\n").expect_err("unknown section");
    assert_eq!(e.key, "trasnport", "{e}");
    assert!(e.reason.contains("did you mean `transport`?"), "{e}");
    // Nothing close: no suggestion.
    let e = load_toml("[node]\ncolour = \"blue\"\n").expect_err("unknown key");
    assert!(!e.reason.contains("did you mean"), "{e}");

    // From the environment the suggestion is the variable to set.
    let vars = env(&[("TIDEPOOL_TRANSPORT__MAX_FRAME_BYTS", "1024")]);
    let e = load_from(None, &vars).expect_err("unknown key");
    assert_eq!(e.key, "transport.max_frame_byts", "{e}");
    assert!(
        e.reason.contains("TIDEPOOL_TRANSPORT__MAX_FRAME_BYTS"),
        "{e}"
    );
    assert!(
        e.reason
            .contains("did you mean TIDEPOOL_TRANSPORT__MAX_FRAME_BYTES?"),
        "{e}"
    );
}

#[test]
fn unknown_section_in_file_is_named() {
    let e = load_toml("[nodes]\nname = \"n1\"\n").expect_err("unknown section");
    assert_eq!(e.key, "nodes");
    let vars = env(&[("TIDEPOOL_NODES__NAME", "n1")]);
    let e = load_from(None, &vars).expect_err("unknown section");
    assert_eq!(e.key, "nodes");
    assert!(e.reason.contains("TIDEPOOL_NODES__NAME"), "{e}");
}

/// Old configs with a static member list get an error saying why it is gone.
#[test]
fn static_members_rejected_with_reason() {
    let f = toml_file(
        r#"
        [cluster]
        members = [{ name = "n1", addr = "127.0.0.1:7400" }]
        "#,
    );
    let e = load_from(Some(f.path()), &[]).expect_err("members is gone");
    assert_eq!(e.key, "cluster.members", "{e}");
    assert!(e.reason.contains("unknown field"), "{e}");
    assert!(e.reason.contains("dynamic"), "{e}");
    assert!(e.reason.contains("cluster.seeds"), "{e}");
    let file = f.path().display().to_string();
    assert!(e.reason.contains(&file), "names the file: {e}");

    // Array-of-tables form, and an empty list, too.
    let e = load_toml("[[cluster.members]]\nname = \"n1\"\naddr = \"127.0.0.1:7400\"\n")
        .expect_err("members is gone");
    assert_eq!(e.key, "cluster.members", "{e}");
    assert!(e.reason.contains("dynamic"), "{e}");
    let e = load_toml("[cluster]\nmembers = []\n").expect_err("members is gone");
    assert_eq!(e.key, "cluster.members", "{e}");

    // Reported before other errors in the same file.
    let e = load_toml("[cluster]\nmembers = []\n[node]\nnmae = \"x\"\n").expect_err("gone");
    assert_eq!(e.key, "cluster.members", "{e}");

    let vars = env(&[(
        "TIDEPOOL_CLUSTER__MEMBERS",
        r#"[{name="n1",addr="127.0.0.1:7400"}]"#,
    )]);
    let e = load_from(None, &vars).expect_err("members is gone");
    assert_eq!(e.key, "cluster.members", "{e}");
    assert!(e.reason.contains("dynamic"), "{e}");
    assert!(e.reason.contains("TIDEPOOL_CLUSTER__MEMBERS"), "{e}");
}

#[test]
fn unknown_key_in_env_is_named_with_variable() {
    let vars = env(&[("TIDEPOOL_TRANSPORT__MAX_FRAME", "1024")]);
    let e = load_from(None, &vars).expect_err("unknown key");
    assert_eq!(e.key, "transport.max_frame");
    assert!(e.reason.contains("TIDEPOOL_TRANSPORT__MAX_FRAME"), "{e}");
}

#[test]
fn wrong_type_is_named() {
    let e = load_toml("[cluster]\nshards = \"many\"\n").expect_err("wrong type");
    assert_eq!(e.key, "cluster.shards");
    let e = load_toml("[node]\nlisten = \"localhost\"\n").expect_err("bad addr");
    assert_eq!(e.key, "node.listen");
    let vars = env(&[("TIDEPOOL_TRANSPORT__SEND_QUEUE_DEPTH", "-1")]);
    let e = load_from(None, &vars).expect_err("negative");
    assert_eq!(e.key, "transport.send_queue_depth");
    assert!(
        e.reason.contains("TIDEPOOL_TRANSPORT__SEND_QUEUE_DEPTH"),
        "{e}"
    );
    let e = load_toml("[cluster]\nseeds = [\"a:1\", 3]\n").expect_err("bad list element");
    assert_eq!(e.key, "cluster.seeds[1]");
    let e = load_toml("[cluster]\nvoters = [\"n1\", 2]\n").expect_err("bad list element");
    assert_eq!(e.key, "cluster.voters[1]");
    let e = load_toml("[lease]\nttl_ms = -1\n").expect_err("negative");
    assert_eq!(e.key, "lease.ttl_ms");
    let e = load_toml("[cluster]\nmax_concurrent_handoffs = \"4\"\n").expect_err("string");
    assert_eq!(e.key, "cluster.max_concurrent_handoffs");
}

#[test]
fn empty_env_segment_is_rejected() {
    let vars = env(&[("TIDEPOOL_NODE____NAME", "n1")]);
    let e = load_from(None, &vars).expect_err("empty segment");
    assert_eq!(e.key, "node..name");
}

#[test]
fn conflicting_env_vars_are_rejected() {
    let vars = env(&[
        ("TIDEPOOL_NODE__NAME", "n1"),
        ("TIDEPOOL_NODE__NAME__X", "1"),
    ]);
    assert!(load_from(None, &vars).is_err());
}

#[test]
fn non_voter_without_seeds_is_rejected() {
    let mut c = NodeConfig::default();
    c.node.name = "n4".into();
    c.cluster.voters = three_voters();
    c.cluster.seeds.clear();
    let e = c.validate().expect_err("nobody to join");
    assert_eq!(e.key, "cluster.seeds");
    assert!(e.reason.contains("n4"), "{e}");
    assert!(e.reason.contains("voter"), "{e}");

    let vars = env(&[
        ("TIDEPOOL_NODE__NAME", "n2"),
        ("TIDEPOOL_CLUSTER__SEEDS", "[]"),
    ]);
    let e = load_from(None, &vars).expect_err("n2 is not a voter");
    assert_eq!(e.key, "cluster.seeds");
}

#[test]
fn validation_error_from_load_names_key() {
    let vars = env(&[("TIDEPOOL_CLUSTER__SHARDS", "0")]);
    let e = load_from(None, &vars).expect_err("invalid");
    assert_eq!(e.key, "cluster.shards");
}

#[test]
fn quoted_numeric_string_from_env() {
    let vars = env(&[
        ("TIDEPOOL_NODE__NAME", r#""42""#),
        ("TIDEPOOL_CLUSTER__VOTERS", r#"["42"]"#),
    ]);
    let c = load_from(None, &vars).expect("valid");
    assert_eq!(c.node.name, "42");
}

#[test]
fn unquoted_numeric_name_from_env_explains_quoting() {
    let vars = env(&[("TIDEPOOL_NODE__NAME", "42")]);
    let e = load_from(None, &vars).expect_err("number is not a string");
    assert_eq!(e.key, "node.name");
    assert!(e.reason.contains("quote"), "{e}");
}

#[test]
fn admin_http_limits() {
    let c = NodeConfig::default();
    assert_eq!(
        c.admin,
        AdminSection {
            header_read_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            max_connections: 64,
        }
    );
    for (key, edit) in [
        (
            "admin.header_read_timeout_ms",
            Box::new(|c: &mut NodeConfig| c.admin.header_read_timeout_ms = 0)
                as Box<dyn FnOnce(&mut NodeConfig)>,
        ),
        (
            "admin.request_timeout_ms",
            Box::new(|c: &mut NodeConfig| c.admin.request_timeout_ms = 0),
        ),
        (
            "admin.max_connections",
            Box::new(|c: &mut NodeConfig| c.admin.max_connections = 0),
        ),
    ] {
        assert_eq!(invalid(edit), key);
    }
    let vars = env(&[("TIDEPOOL_ADMIN__MAX_CONNECTIONS", "8")]);
    assert_eq!(
        load_from(None, &vars).map(|c| c.admin.max_connections),
        Ok(8)
    );
}

#[test]
fn job_admission_limits() {
    let c = NodeConfig::default();
    assert_eq!(c.jobs.memory_budget_bytes, 8 << 30);
    assert_eq!(c.admission_limits().max_frame_bytes, 64 << 20);
    assert_eq!(c.job_caps().max_steps, 10_000_000);
    assert_eq!(c.job_caps().max_epochs, 100_000);
    let key = "jobs.memory_budget_bytes";
    assert_eq!(invalid(|c| c.jobs.memory_budget_bytes = (1 << 20) - 1), key);
    assert_eq!(invalid(|c| c.jobs.memory_budget_bytes = (1 << 40) + 1), key);
    assert_eq!(invalid(|c| c.jobs.max_steps = 0), "jobs.max_steps");
    assert_eq!(invalid(|c| c.jobs.max_epochs = 0), "jobs.max_epochs");
    let vars = env(&[("TIDEPOOL_JOBS__MEMORY_BUDGET_BYTES", "1048576")]);
    assert_eq!(
        load_from(None, &vars).map(|c| c.jobs.memory_budget_bytes),
        Ok(1 << 20)
    );
}
