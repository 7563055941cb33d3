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

fn three_voters() -> Vec<String> {
    vec!["n1".into(), "n2".into(), "n3".into()]
}

#[test]
fn defaults_are_valid() {
    let c = NodeConfig::default();
    assert_eq!(c.validate(), Ok(()));
    assert!(c.is_voter());
    assert_eq!(c.node.listen.to_string(), "127.0.0.1:7400");
    assert_eq!(c.node.admin.to_string(), "127.0.0.1:7401");
    assert_eq!(c.cluster.seeds, vec!["127.0.0.1:7400"]);
    assert_eq!(c.cluster.voters, vec!["n1"]);
    assert_eq!(c.cluster.max_concurrent_handoffs, 4);
    assert_eq!(c.cluster.name, "tidepool");
    assert_eq!(c.transport.max_frame_bytes, 64 * 1024 * 1024);
    assert_eq!(c.shard.max_inflight, 1024);
    assert_eq!(c.shard.handoff_buffer, 1024);
    assert_eq!(
        c.lease,
        LeaseSection {
            ttl_ms: 2000,
            renew_ms: 500,
            drift_margin_ms: 200,
        }
    );
}

#[test]
fn the_data_key_file_defaults_to_the_tls_dir() {
    let c = NodeConfig::default();
    assert_eq!(c.storage.key_file, None);
    assert_eq!(c.data_key_file(), Path::new("./certs/n1/data.key"));
    let c = load_toml("[tls]\ndir = \"/etc/tp\"\n").unwrap();
    assert_eq!(c.data_key_file(), Path::new("/etc/tp/data.key"));
    let c = load_toml("[storage]\nkey_file = \"/run/secrets/k\"\n").unwrap();
    assert_eq!(c.data_key_file(), Path::new("/run/secrets/k"));
    let e = load_toml("[storage]\nkey_file = \"\"\n").unwrap_err();
    assert_eq!(e.key, "storage.key_file");
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

/// The commented 3-node example in `config/node.toml`, uncommented, must be valid.
#[test]
fn shipped_cluster_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/node.toml");
    let text = std::fs::read_to_string(path).expect("read config/node.toml");
    let example: String = text
        .lines()
        .skip_while(|l| !l.contains("BEGIN 3-node example"))
        .skip(1)
        .take_while(|l| !l.contains("END 3-node example"))
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        example.contains("[cluster]"),
        "example not found:\n{example}"
    );
    let c = load_toml(&example).expect("example is valid");
    assert_eq!(c.node.name, "n2");
    assert!(c.is_voter());
    assert_eq!(c.cluster.voters, three_voters());
    assert_eq!(
        c.cluster.seeds,
        vec!["127.0.0.1:7400", "127.0.0.2:7400", "127.0.0.3:7400"],
        "seeds point at the three voters, this node's own listen included"
    );
    assert!(c.cluster.seeds.contains(&c.node.listen.to_string()));
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
fn env_renames_node() {
    let vars = env(&[
        ("TIDEPOOL_NODE__NAME", "n2"),
        ("TIDEPOOL_CLUSTER__VOTERS", r#"["n1","n2"]"#),
    ]);
    let c = NodeConfig::load_from(None, &vars).expect("valid");
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
    let c = NodeConfig::load_from(Some(f.path()), &vars).expect("valid");
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
        NodeConfig::load_from(Some(f.path()), &[]).map(|c| c.lease.renew_ms),
        Ok(500),
        "unset keys keep defaults"
    );
}

#[test]
fn unknown_lease_key_is_named() {
    let e = load_toml("[lease]\nttl = 2000\n").expect_err("unknown key");
    assert_eq!(e.key, "lease.ttl", "{e}");
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
        seeds = ["127.0.0.2:7400"]
        "#,
    );
    let vars = env(&[("TIDEPOOL_CLUSTER__VOTERS", r#"["n1","n2","n3"]"#)]);
    let c = NodeConfig::load_from(Some(f.path()), &vars).expect("valid");
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
    let e = NodeConfig::load_from(None, &vars).expect_err("unknown key");
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
fn closest_key_by_edit_distance() {
    let known = ["name", "listen", "admin", "data_dir", "shutdown_grace_ms"];
    assert_eq!(closest("nmae", &known), Some("name"));
    assert_eq!(closest("NAME", &known), Some("name"));
    assert_eq!(closest("datadir", &known), Some("data_dir"));
    assert_eq!(closest("shutdown_grace", &known), Some("shutdown_grace_ms"));
    assert_eq!(closest("lsn", &known), None);
    assert_eq!(closest("x", &known), None);
    assert_eq!(closest("anything", &[]), None);
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

/// Old configs with a static member list get an error saying why it is gone.
#[test]
fn static_members_rejected_with_reason() {
    let f = toml_file(
        r#"
        [cluster]
        members = [{ name = "n1", addr = "127.0.0.1:7400" }]
        "#,
    );
    let e = NodeConfig::load_from(Some(f.path()), &[]).expect_err("members is gone");
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
    let e = NodeConfig::load_from(None, &vars).expect_err("members is gone");
    assert_eq!(e.key, "cluster.members", "{e}");
    assert!(e.reason.contains("dynamic"), "{e}");
    assert!(e.reason.contains("TIDEPOOL_CLUSTER__MEMBERS"), "{e}");
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
    let e = load_toml("[cluster]\nvoters = [\"n1\", 2]\n").expect_err("bad list element");
    assert_eq!(e.key, "cluster.voters[1]");
    let e = load_toml("[lease]\nttl_ms = -1\n").expect_err("negative");
    assert_eq!(e.key, "lease.ttl_ms");
    let e = load_toml("[cluster]\nmax_concurrent_handoffs = \"4\"\n").expect_err("string");
    assert_eq!(e.key, "cluster.max_concurrent_handoffs");
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

/// Applies `edit` to a valid 3-voter config for node `n1` and returns the failing key.
fn invalid(edit: impl FnOnce(&mut NodeConfig)) -> String {
    let mut c = NodeConfig::default();
    c.cluster.voters = three_voters();
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
        c.cluster.voters = vec![name.into()];
        assert_eq!(c.validate(), Ok(()), "{name:?}");
    }
}

#[test]
fn non_voter_with_seeds_is_valid() {
    let mut c = NodeConfig::default();
    c.node.name = "n4".into();
    c.node.listen = "127.0.0.4:7400".parse().expect("addr");
    c.cluster.voters = three_voters();
    c.cluster.seeds = vec!["127.0.0.1:7400".into()];
    assert!(!c.is_voter());
    assert_eq!(c.validate(), Ok(()));
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
    let e = NodeConfig::load_from(None, &vars).expect_err("n2 is not a voter");
    assert_eq!(e.key, "cluster.seeds");
}

#[test]
fn voter_without_seeds_starts_a_new_cluster() {
    let mut c = NodeConfig::default();
    c.cluster.seeds.clear();
    assert_eq!(c.validate(), Ok(()));
    c.node.name = "n2".into();
    c.cluster.voters = three_voters();
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn seed_equal_to_own_listen_is_allowed() {
    let mut c = NodeConfig::default();
    c.node.name = "n2".into();
    c.node.listen = "127.0.0.2:7400".parse().expect("addr");
    c.node.admin = "127.0.0.2:7401".parse().expect("addr");
    c.cluster.voters = three_voters();
    c.cluster.seeds = vec!["127.0.0.2:7400".into()];
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn listen_port_is_free() {
    let mut c = NodeConfig::default();
    c.node.listen = "127.0.0.1:7500".parse().expect("addr");
    assert_eq!(c.validate(), Ok(()), "no member entry to match any more");
}

#[test]
fn listen_on_other_ip_same_port_is_fine() {
    let mut c = NodeConfig::default();
    c.node.listen = "0.0.0.0:7400".parse().expect("addr");
    c.node.advertise = Some("10.0.0.7:7400".parse().expect("addr"));
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
        invalid(|c| c.cluster.voters.push("n1".into())),
        "cluster.voters"
    );
    for name in ["", "N4", "n_4", "-n4", "n4-", "n4.example", &"a".repeat(64)] {
        assert_eq!(
            invalid(|c| c.cluster.voters.push(name.into())),
            "cluster.voters[3]",
            "{name:?}"
        );
    }
}

#[test]
fn voters_need_not_include_this_node_or_be_known() {
    let mut c = NodeConfig::default();
    c.cluster.voters = vec!["n7".into(), "n8".into(), "n9".into()];
    assert!(!c.is_voter());
    assert_eq!(c.validate(), Ok(()), "non-voter with the default seed");
}

#[test]
fn bad_seeds() {
    for seed in [
        "",
        "host",
        "host:",
        ":7400",
        "host:0",
        "host:65536",
        "host:70000",
        "host:-1",
        "host:port",
    ] {
        assert_eq!(
            invalid(|c| c.cluster.seeds = vec![seed.into()]),
            "cluster.seeds[0]",
            "{seed:?}"
        );
        assert_eq!(
            invalid(|c| c.cluster.seeds = vec!["127.0.0.1:7400".into(), seed.into()]),
            "cluster.seeds[1]",
            "{seed:?}"
        );
    }
    let mut c = NodeConfig::default();
    c.cluster.seeds = vec![
        "[::1]:7400".into(),
        "node-2.example:7400".into(),
        "h:1".into(),
        "h:65535".into(),
    ];
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
    // The budgets must hold one frame of the largest size.
    assert_eq!(
        c.validate().unwrap_err().key,
        "transport.connection_inflight_bytes"
    );
    c.transport.connection_inflight_bytes = 1 << 30;
    c.transport.node_inflight_bytes = 1 << 31;
    c.transport.connection_send_bytes = 1 << 30;
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn memory_budgets_hold_a_frame_and_nest() {
    assert_eq!(
        invalid(|c| c.transport.connection_inflight_bytes = c.transport.max_frame_bytes - 1),
        "transport.connection_inflight_bytes"
    );
    assert_eq!(
        invalid(|c| c.transport.node_inflight_bytes = c.transport.connection_inflight_bytes - 1),
        "transport.node_inflight_bytes"
    );
    assert_eq!(
        invalid(|c| c.transport.connection_send_bytes = c.transport.max_frame_bytes - 1),
        "transport.connection_send_bytes"
    );
    for key in [
        "send_stall_ms",
        "receive_stall_ms",
        "max_requests_per_connection",
        "max_connections_per_peer",
        "max_streams_per_connection",
    ] {
        let got = invalid(|c| match key {
            "send_stall_ms" => c.transport.send_stall_ms = 0,
            "receive_stall_ms" => c.transport.receive_stall_ms = 0,
            "max_requests_per_connection" => c.transport.max_requests_per_connection = 0,
            "max_connections_per_peer" => c.transport.max_connections_per_peer = 0,
            _ => c.transport.max_streams_per_connection = 0,
        });
        assert_eq!(got, format!("transport.{key}"));
    }
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
    assert_eq!(
        invalid(|c| c.shard.handoff_buffer = 0),
        "shard.handoff_buffer"
    );
    assert_eq!(invalid(|c| c.cluster.name = "a b".into()), "cluster.name");
    assert_eq!(
        invalid(|c| c.cluster.max_concurrent_handoffs = 0),
        "cluster.max_concurrent_handoffs"
    );
    let mut c = NodeConfig::default();
    c.shard.handoff_buffer = 1;
    c.cluster.max_concurrent_handoffs = 1;
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn lease_ttl_must_be_positive() {
    assert_eq!(invalid(|c| c.lease.ttl_ms = 0), "lease.ttl_ms");
}

#[test]
fn lease_renew_must_be_in_range() {
    assert_eq!(invalid(|c| c.lease.renew_ms = 0), "lease.renew_ms");
    assert_eq!(invalid(|c| c.lease.renew_ms = 2000), "lease.renew_ms");
    assert_eq!(invalid(|c| c.lease.renew_ms = 5000), "lease.renew_ms");
    // Not shorter than the validity window `ttl - drift` (1800 ms at the defaults): the lease
    // would lapse between renewals even with instant grants.
    assert_eq!(invalid(|c| c.lease.renew_ms = 1800), "lease.renew_ms");
    let e = {
        let mut c = NodeConfig::default();
        c.lease.renew_ms = 1800;
        c.validate().expect_err("too slow")
    };
    assert!(e.reason.contains("1800"), "{e}");
    let mut c = NodeConfig::default();
    c.lease.renew_ms = 1;
    assert_eq!(c.validate(), Ok(()));
    c.lease.renew_ms = 1799;
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn lease_drift_margin_below_half_ttl() {
    assert_eq!(
        invalid(|c| c.lease.drift_margin_ms = 1000),
        "lease.drift_margin_ms"
    );
    assert_eq!(
        invalid(|c| c.lease.drift_margin_ms = 5000),
        "lease.drift_margin_ms"
    );
    // Checked before renew_ms, so a huge margin is blamed on itself.
    assert_eq!(
        invalid(|c| c.lease.drift_margin_ms = u64::MAX),
        "lease.drift_margin_ms"
    );
    let mut c = NodeConfig::default();
    c.lease.drift_margin_ms = 0;
    assert_eq!(c.validate(), Ok(()));
    c.lease.drift_margin_ms = 999;
    c.lease.renew_ms = 1000;
    assert_eq!(c.validate(), Ok(()));
}

#[test]
fn lease_extremes_do_not_overflow() {
    let mut c = NodeConfig {
        lease: LeaseSection {
            ttl_ms: u64::MAX,
            renew_ms: u64::MAX / 2,
            drift_margin_ms: u64::MAX / 2 - 1,
        },
        ..NodeConfig::default()
    };
    assert_eq!(c.validate(), Ok(()));
    c.lease.ttl_ms = 1;
    assert_eq!(
        c.validate().map_err(|e| e.key),
        Err("lease.drift_margin_ms".into())
    );
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

#[test]
fn wildcard_listen_needs_a_dialable_advertise_address() {
    let wild = "[node]\nlisten = \"0.0.0.0:7400\"\nadmin = \"0.0.0.0:7401\"\n";
    assert_eq!(err_key(load_toml(wild)), "node.advertise");
    let bad = format!("{wild}advertise = \"0.0.0.0:7400\"\n");
    assert_eq!(err_key(load_toml(&bad)), "node.advertise");
    let good = format!("{wild}advertise = \"10.1.2.3:7400\"\n");
    let c = load_toml(&good).unwrap();
    assert_eq!(c.node.advertise, Some("10.1.2.3:7400".parse().unwrap()));
}

#[test]
fn autoscale_bounds_are_checked() {
    assert_eq!(
        invalid(|c| c.autoscale.min_nodes = 0),
        "autoscale.min_nodes"
    );
    assert_eq!(
        invalid(|c| {
            c.autoscale.min_nodes = 5;
            c.autoscale.max_nodes = 3;
        }),
        "autoscale.max_nodes"
    );
    assert_eq!(
        invalid(|c| c.autoscale.target_utilization = 1.5),
        "autoscale.target_utilization"
    );
    assert_eq!(
        invalid(|c| c.autoscale.tolerance = 1.0),
        "autoscale.tolerance"
    );
    assert_eq!(
        invalid(|c| c.autoscale.sample_ms = 0),
        "autoscale.sample_ms"
    );
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
        NodeConfig::load_from(None, &vars).map(|c| c.admin.max_connections),
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
        NodeConfig::load_from(None, &vars).map(|c| c.jobs.memory_budget_bytes),
        Ok(1 << 20)
    );
}
