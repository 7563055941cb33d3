use super::*;

use std::io::Write;

fn toml_file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(contents.as_bytes()).expect("write temp file");
    f
}

fn load_toml(contents: &str) -> Result<NodeConfig, ConfigError> {
    let f = toml_file(contents);
    NodeConfig::load(Some(f.path()))
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
    assert_eq!(NodeConfig::load(None), Ok(NodeConfig::default()));
}

#[test]
fn empty_file_gives_defaults() {
    assert_eq!(load_toml(""), Ok(NodeConfig::default()));
}

/// `config/node.toml` is the documented default: it must parse to exactly `Default`.
#[test]
fn shipped_node_toml_equals_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/node.toml");
    assert_eq!(NodeConfig::load(Some(&path)), Ok(NodeConfig::default()));
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
fn unknown_lease_key_is_named() {
    let e = load_toml("[lease]\nttl = 2000\n").expect_err("unknown key");
    assert_eq!(e.key, "lease.ttl", "{e}");
}

#[test]
fn unknown_key_in_file_is_named() {
    let e = load_toml("[node]\nnmae = \"n1\"\n").expect_err("unknown key");
    assert_eq!(e.key, "node.nmae");
    assert!(e.reason.contains("unknown field"), "{e}");
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
fn missing_file_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let e = NodeConfig::load(Some(&dir.path().join("absent.toml"))).expect_err("missing file");
    assert_eq!(e.key, "config file");
    assert!(e.reason.contains("absent.toml"), "{e}");
}

#[test]
fn unparsable_file_is_named() {
    let e = load_toml("[node\nname = ").expect_err("syntax error");
    assert_eq!(e.key, "config file");
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
fn sections_convert_to_the_components_they_configure() {
    let c = NodeConfig::default();
    assert_eq!(
        crate::lease::LeaseConfig::from(&c.lease),
        crate::lease::LeaseConfig::default()
    );
    let t = crate::transport::TransportConfig::from(&c.transport);
    assert_eq!(t.max_frame_bytes as u64, c.transport.max_frame_bytes);
    assert_eq!(
        t.connect_timeout,
        std::time::Duration::from_millis(c.transport.connect_timeout_ms)
    );
    let r = crate::rebalance::RebalanceConfig::from(&c.cluster);
    assert_eq!(r.max_concurrent_handoffs, c.cluster.max_concurrent_handoffs);
}

#[test]
fn import_urls_are_url_prefixes_without_globs() {
    for bad in [
        "/data",
        "file://relative",
        "http://x/",
        "s3://",
        "s3://lake/*.parquet",
        "",
    ] {
        assert_eq!(
            invalid(|c| c.jobs.import_urls = vec!["s3://ok/".into(), bad.into()]),
            "jobs.import_urls[1]",
            "{bad:?}"
        );
    }
    let mut c = NodeConfig::default();
    c.cluster.voters = three_voters();
    c.jobs.import_urls = vec!["file:///data/".into(), "s3://lake/".into(), "gs://b".into()];
    assert_eq!(c.validate(), Ok(()));
}
