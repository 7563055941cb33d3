use super::*;

use std::io::Write;

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn toml_file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(contents.as_bytes()).expect("write temp file");
    f
}

fn load_toml(contents: &str) -> Result<NodeConfig, ConfigError> {
    let f = toml_file(contents);
    NodeConfig::load_from(Some(f.path()), &[])
}

fn err_key(result: Result<NodeConfig, ConfigError>) -> String {
    match result {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.key,
    }
}

fn three_members() -> Vec<MemberConfig> {
    (1..=3)
        .map(|i| MemberConfig {
            name: format!("n{i}"),
            addr: format!("127.0.0.{i}:7400").parse().expect("addr"),
        })
        .collect()
}

#[test]
fn defaults_are_valid() {
    let c = NodeConfig::default();
    assert_eq!(c.validate(), Ok(()));
    assert_eq!(c.this_member().name, "n1");
    assert_eq!(c.node.listen.to_string(), "127.0.0.1:7400");
    assert_eq!(c.node.admin.to_string(), "127.0.0.1:7401");
    assert_eq!(c.transport.max_frame_bytes, 64 * 1024 * 1024);
}

#[test]
fn no_file_no_env_gives_defaults() {
    assert_eq!(NodeConfig::load_from(None, &[]), Ok(NodeConfig::default()));
}

#[test]
fn empty_file_gives_defaults() {
    assert_eq!(load_toml(""), Ok(NodeConfig::default()));
}

/// `config/node.toml` is the documented default: it must parse to exactly `Default`.
#[test]
fn shipped_node_toml_equals_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/node.toml");
    assert_eq!(
        NodeConfig::load_from(Some(&path), &[]),
        Ok(NodeConfig::default())
    );
}

/// The commented 3-member example in `config/node.toml`, uncommented, must be valid.
#[test]
fn shipped_cluster_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/node.toml");
    let text = std::fs::read_to_string(path).expect("read config/node.toml");
    let example: String = text
        .lines()
        .skip_while(|l| !l.contains("BEGIN 3-member example"))
        .skip(1)
        .take_while(|l| !l.contains("END 3-member example"))
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        example.contains("[cluster]"),
        "example not found:\n{example}"
    );
    let c = load_toml(&example).expect("example is valid");
    assert_eq!(c.cluster.members.len(), 3);
    assert_eq!(c.cluster.voters.len(), 3);
}

#[test]
fn roundtrips_through_toml_and_serialize() {
    let c = NodeConfig::default();
    let value = figment::value::Value::serialize(&c).expect("serialize");
    let back: NodeConfig = value.deserialize().expect("deserialize");
    assert_eq!(back, c);
}

#[test]
fn file_values_are_read() {
    let c = load_toml(
        r#"
        [node]
        shutdown_grace_ms = 2500
        [cluster]
        shards = 128
        placement_eps = 0.5
        "#,
    )
    .expect("valid");
    assert_eq!(c.node.shutdown_grace_ms, 2500);
    assert_eq!(c.cluster.shards, 128);
    assert_eq!(c.cluster.placement_eps, 0.5);
    assert_eq!(c.node.name, "n1", "untouched keys keep defaults");
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
    let c = NodeConfig::load_from(Some(f.path()), &vars).expect("valid");
    assert_eq!(c.cluster.shards, 256);
    assert_eq!(c.node.shutdown_grace_ms, 1);
    assert_eq!(c.node.data_dir, PathBuf::from("/var/lib/tidepool"));
    assert_eq!(c.node.admin.to_string(), "0.0.0.0:9000");
    assert_eq!(c.storage.url, "s3://bucket/prefix");
    assert_eq!(c.cluster.placement_eps, 1.0);
}

#[test]
fn env_renames_node_and_members() {
    let vars = env(&[
        ("TIDEPOOL_NODE__NAME", "n2"),
        (
            "TIDEPOOL_CLUSTER__MEMBERS",
            r#"[{name="n1",addr="127.0.0.1:7400"},{name="n2",addr="127.0.0.2:7400"}]"#,
        ),
        ("TIDEPOOL_CLUSTER__VOTERS", r#"["n1","n2"]"#),
    ]);
    let c = NodeConfig::load_from(None, &vars).expect("valid");
    assert_eq!(c.node.name, "n2");
    assert_eq!(c.this_member().addr.to_string(), "127.0.0.2:7400");
}

#[test]
fn list_from_env() {
    let vars = env(&[(
        "TIDEPOOL_CLUSTER__SEEDS",
        r#"["10.0.0.1:7400", "10.0.0.2:7400"]"#,
    )]);
    let c = NodeConfig::load_from(None, &vars).expect("valid");
    assert_eq!(c.cluster.seeds, vec!["10.0.0.1:7400", "10.0.0.2:7400"]);

    let vars = env(&[("TIDEPOOL_CLUSTER__SEEDS", "[]")]);
    let c = NodeConfig::load_from(None, &vars).expect("valid");
    assert!(c.cluster.seeds.is_empty());
}

#[test]
fn voters_list_from_env_replaces_file_list() {
    let f = toml_file(
        r#"
        [cluster]
        voters = ["n1"]
        members = [
          { name = "n1", addr = "127.0.0.1:7400" },
          { name = "n2", addr = "127.0.0.2:7400" },
          { name = "n3", addr = "127.0.0.3:7400" },
        ]
        "#,
    );
    let vars = env(&[("TIDEPOOL_CLUSTER__VOTERS", r#"["n1","n2","n3"]"#)]);
    let c = NodeConfig::load_from(Some(f.path()), &vars).expect("valid");
    assert_eq!(c.cluster.voters, vec!["n1", "n2", "n3"]);
    assert_eq!(c.cluster.members, three_members());
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
    assert_eq!(
        NodeConfig::load_from(None, &vars),
        Ok(NodeConfig::default())
    );
}

#[test]
fn env_var_order_does_not_matter() {
    let a = env(&[
        ("TIDEPOOL_CLUSTER__SHARDS", "8"),
        ("TIDEPOOL_WORKERS__THREADS", "3"),
    ]);
    let mut b = a.clone();
    b.reverse();
    assert_eq!(
        NodeConfig::load_from(None, &a),
        NodeConfig::load_from(None, &b)
    );
}

#[test]
fn unknown_key_in_file_is_named() {
    let e = load_toml("[node]\nnmae = \"n1\"\n").expect_err("unknown key");
    assert_eq!(e.key, "node.nmae");
    assert!(e.reason.contains("unknown field"), "{e}");
}

#[test]
fn unknown_section_in_file_is_named() {
    let e = load_toml("[nodes]\nname = \"n1\"\n").expect_err("unknown section");
    assert_eq!(e.key, "nodes");
    let vars = env(&[("TIDEPOOL_NODES__NAME", "n1")]);
    let e = NodeConfig::load_from(None, &vars).expect_err("unknown section");
    assert_eq!(e.key, "nodes");
    assert!(e.reason.contains("TIDEPOOL_NODES__NAME"), "{e}");
}

#[test]
fn unknown_key_in_member_is_named() {
    let e = load_toml("[[cluster.members]]\nname = \"n1\"\naddr = \"127.0.0.1:7400\"\nport = 1\n")
        .expect_err("unknown key");
    assert_eq!(e.key, "cluster.members[0].port", "{e}");
}

#[test]
fn unknown_key_in_env_is_named_with_variable() {
    let vars = env(&[("TIDEPOOL_TRANSPORT__MAX_FRAME", "1024")]);
    let e = NodeConfig::load_from(None, &vars).expect_err("unknown key");
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
    let e = NodeConfig::load_from(None, &vars).expect_err("negative");
    assert_eq!(e.key, "transport.send_queue_depth");
    assert!(
        e.reason.contains("TIDEPOOL_TRANSPORT__SEND_QUEUE_DEPTH"),
        "{e}"
    );
    let e = load_toml("[cluster]\nseeds = [\"a:1\", 3]\n").expect_err("bad list element");
    assert_eq!(e.key, "cluster.seeds[1]");
    let e = load_toml(
        "[cluster]\nmembers = [{name=\"n1\", addr=\"127.0.0.1:7400\"}, {name=\"n2\", addr=\"x\"}]\n",
    )
    .expect_err("bad addr");
    assert_eq!(e.key, "cluster.members[1].addr");
}

#[test]
fn missing_member_field_is_named() {
    let e = load_toml("[[cluster.members]]\nname = \"n1\"\n").expect_err("missing addr");
    assert_eq!(e.key, "cluster.members[0].addr", "{e}");
    let vars = env(&[("TIDEPOOL_CLUSTER__MEMBERS", r#"[{name="n1"}]"#)]);
    let e = NodeConfig::load_from(None, &vars).expect_err("missing addr");
    assert_eq!(e.key, "cluster.members[0].addr", "{e}");
    assert!(e.reason.contains("TIDEPOOL_CLUSTER__MEMBERS"), "{e}");
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let e = NodeConfig::load_from(Some(&dir.path().join("absent.toml")), &[])
        .expect_err("missing file");
    assert_eq!(e.key, "config file");
    assert!(e.reason.contains("absent.toml"), "{e}");
}

#[test]
fn unparsable_file_is_named() {
    let e = load_toml("[node\nname = ").expect_err("syntax error");
    assert_eq!(e.key, "config file");
}

#[test]
fn empty_env_segment_is_rejected() {
    let vars = env(&[("TIDEPOOL_NODE____NAME", "n1")]);
    let e = NodeConfig::load_from(None, &vars).expect_err("empty segment");
    assert_eq!(e.key, "node..name");
}

#[test]
fn conflicting_env_vars_are_rejected() {
    let vars = env(&[
        ("TIDEPOOL_NODE__NAME", "n1"),
        ("TIDEPOOL_NODE__NAME__X", "1"),
    ]);
    assert!(NodeConfig::load_from(None, &vars).is_err());
}

#[test]
fn display_names_the_key() {
    let e = ConfigError::new("cluster.shards", "0 is outside 1..=65536");
    assert_eq!(
        e.to_string(),
        "config key `cluster.shards`: 0 is outside 1..=65536"
    );
    assert_eq!(ConfigError::EXIT_CODE, 64);
}

/// Applies `edit` to a valid 3-member config for node `n1` and returns the failing key.
fn invalid(edit: impl FnOnce(&mut NodeConfig)) -> String {
    let mut c = NodeConfig::default();
    c.cluster.members = three_members();
    c.cluster.voters = vec!["n1".into(), "n2".into(), "n3".into()];
    assert_eq!(c.validate(), Ok(()), "base config must be valid");
    edit(&mut c);
    err_key(c.validate().map(|()| c))
}

#[test]
fn invalid_node_name() {
    for name in ["", "N1", "n_1", "-n1", "n1-", "n1.example", &"a".repeat(64)] {
        assert_eq!(
            invalid(|c| c.node.name = name.into()),
            "node.name",
            "{name:?}"
        );
    }
}

#[test]
fn valid_node_names() {
    for name in ["a", "0", "node-7", &"a".repeat(63)] {
        let mut c = NodeConfig::default();
        c.node.name = name.into();
        c.cluster.members[0].name = name.into();
        c.cluster.voters = vec![name.into()];
        assert_eq!(c.validate(), Ok(()), "{name:?}");
    }
}

#[test]
fn node_not_a_member() {
    assert_eq!(invalid(|c| c.node.name = "n9".into()), "node.name");
}

#[test]
fn empty_members() {
    assert_eq!(invalid(|c| c.cluster.members.clear()), "cluster.members");
}

#[test]
fn invalid_member_name() {
    assert_eq!(
        invalid(|c| c.cluster.members[2].name = "N3".into()),
        "cluster.members[2].name"
    );
}

#[test]
fn duplicate_member_name() {
    assert_eq!(
        invalid(|c| c.cluster.members[1].name = "n3".into()),
        "cluster.members[2].name"
    );
}

#[test]
fn duplicate_member_addr() {
    let addr = "127.0.0.1:7400".parse().expect("addr");
    assert_eq!(
        invalid(|c| c.cluster.members[1].addr = addr),
        "cluster.members[1].addr"
    );
}

#[test]
fn listen_port_differs_from_member_addr() {
    let addr = "127.0.0.1:7500".parse().expect("addr");
    assert_eq!(invalid(|c| c.node.listen = addr), "node.listen");
}

#[test]
fn listen_on_other_ip_same_port_is_fine() {
    let mut c = NodeConfig::default();
    c.node.listen = "0.0.0.0:7400".parse().expect("addr");
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn admin_equals_listen() {
    assert_eq!(invalid(|c| c.node.admin = c.node.listen), "node.admin");
}

#[test]
fn shards_out_of_range() {
    assert_eq!(invalid(|c| c.cluster.shards = 0), "cluster.shards");
    assert_eq!(invalid(|c| c.cluster.shards = 65_537), "cluster.shards");
    let mut c = NodeConfig::default();
    c.cluster.shards = 65_536;
    assert_eq!(c.validate(), Ok(()));
    c.cluster.shards = 1;
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn bad_voters() {
    assert_eq!(invalid(|c| c.cluster.voters.clear()), "cluster.voters");
    assert_eq!(
        invalid(|c| c.cluster.voters.push("n4".into())),
        "cluster.voters"
    );
    assert_eq!(
        invalid(|c| c.cluster.voters.push("n1".into())),
        "cluster.voters"
    );
}

#[test]
fn bad_seeds() {
    for seed in [
        "",
        "host",
        "host:",
        ":7400",
        "host:0",
        "host:70000",
        "host:port",
    ] {
        assert_eq!(
            invalid(|c| c.cluster.seeds = vec![seed.into()]),
            "cluster.seeds[0]",
            "{seed:?}"
        );
    }
    let mut c = NodeConfig::default();
    c.cluster.seeds = vec!["[::1]:7400".into(), "node-2.example:7400".into()];
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn placement_eps_out_of_range() {
    for eps in [0.0, -0.1, 10.5, f64::NAN, f64::INFINITY] {
        assert_eq!(
            invalid(|c| c.cluster.placement_eps = eps),
            "cluster.placement_eps",
            "{eps}"
        );
    }
    let mut c = NodeConfig::default();
    c.cluster.placement_eps = 10.0;
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn max_frame_bytes_out_of_range() {
    let key = "transport.max_frame_bytes";
    assert_eq!(invalid(|c| c.transport.max_frame_bytes = 1023), key);
    assert_eq!(
        invalid(|c| c.transport.max_frame_bytes = (1 << 30) + 1),
        key
    );
    let mut c = NodeConfig::default();
    c.transport.max_frame_bytes = 1024;
    assert_eq!(c.validate(), Ok(()));
    c.transport.max_frame_bytes = 1 << 30;
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn zero_depths_and_timeouts() {
    let t = "transport";
    assert_eq!(
        invalid(|c| c.transport.send_queue_depth = 0),
        format!("{t}.send_queue_depth")
    );
    assert_eq!(
        invalid(|c| c.transport.connect_timeout_ms = 0),
        format!("{t}.connect_timeout_ms")
    );
    assert_eq!(
        invalid(|c| c.transport.request_timeout_ms = 0),
        format!("{t}.request_timeout_ms")
    );
    assert_eq!(
        invalid(|c| c.transport.reconnect_max_backoff_ms = 0),
        format!("{t}.reconnect_max_backoff_ms")
    );
    assert_eq!(
        invalid(|c| c.node.shutdown_grace_ms = 0),
        "node.shutdown_grace_ms"
    );
    assert_eq!(
        invalid(|c| c.workers.queue_depth = 0),
        "workers.queue_depth"
    );
    assert_eq!(invalid(|c| c.shard.max_inflight = 0), "shard.max_inflight");
}

#[test]
fn worker_threads_zero_means_cpus() {
    let mut c = NodeConfig::default();
    c.workers.threads = 0;
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn storage_url_schemes() {
    for url in [
        "file://./data",
        "file:///abs",
        "s3://b/p",
        "gs://b",
        "az://c/p",
        "memory://",
    ] {
        let mut c = NodeConfig::default();
        c.storage.url = url.into();
        assert_eq!(c.validate(), Ok(()), "{url}");
    }
    for url in [
        "", "./data", "http://x", "ftp://x", "S3://b", "file://", "s3:/b",
    ] {
        assert_eq!(
            invalid(|c| c.storage.url = url.into()),
            "storage.url",
            "{url:?}"
        );
    }
}

#[test]
fn validation_error_from_load_names_key() {
    let vars = env(&[("TIDEPOOL_CLUSTER__SHARDS", "0")]);
    let e = NodeConfig::load_from(None, &vars).expect_err("invalid");
    assert_eq!(e.key, "cluster.shards");
}

#[test]
fn quoted_numeric_string_from_env() {
    let vars = env(&[
        ("TIDEPOOL_NODE__NAME", r#""42""#),
        (
            "TIDEPOOL_CLUSTER__MEMBERS",
            r#"[{name="42",addr="127.0.0.1:7400"}]"#,
        ),
        ("TIDEPOOL_CLUSTER__VOTERS", r#"["42"]"#),
    ]);
    let c = NodeConfig::load_from(None, &vars).expect("valid");
    assert_eq!(c.node.name, "42");
}

#[test]
fn unquoted_numeric_name_from_env_explains_quoting() {
    let vars = env(&[("TIDEPOOL_NODE__NAME", "42")]);
    let e = NodeConfig::load_from(None, &vars).expect_err("number is not a string");
    assert_eq!(e.key, "node.name");
    assert!(e.reason.contains("quote"), "{e}");
}
