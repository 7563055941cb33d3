#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use super::*;

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn lines(json: bool, f: impl FnOnce()) -> Vec<String> {
    let buf = Buf::default();
    let out = buf.clone();
    let builder = tracing_subscriber::fmt().with_writer(move || out.clone());
    let node = "n7".to_string();
    if json {
        let sub = builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(NodeJson { node })
            .finish();
        tracing::subscriber::with_default(sub, f);
    } else {
        let sub = builder
            .with_ansi(false)
            .event_format(NodeText { node })
            .finish();
        tracing::subscriber::with_default(sub, f);
    }
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    text.lines().map(str::to_string).collect()
}

#[test]
fn json_lines_are_flat_and_name_the_node() {
    let out = lines(true, || {
        let span = tracing::info_span!("job", job = "j1");
        let _g = span.enter();
        tracing::info!(shards = 22u64, ok = true, "serving 22 shards");
        tracing::warn!(node = "n3", "lease must have expired");
        tracing::info!(node = "n7", "node stopped");
    });
    assert_eq!(out.len(), 3, "{out:?}");
    let v: Vec<Value> = out
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for l in &v {
        assert_eq!(l["node"], "n7", "{l}");
        assert!(l.get("fields").is_none(), "{l}");
        assert_eq!(l["job"], "j1", "span fields are top-level: {l}");
        assert!(l["timestamp"].as_str().is_some_and(|t| !t.is_empty()));
    }
    assert_eq!(v[0]["message"], "serving 22 shards");
    assert_eq!(v[0]["shards"], 22);
    assert_eq!(v[0]["ok"], true);
    assert_eq!(v[0]["level"], "INFO");
    assert_eq!(v[1]["member"], "n3", "another node's name is not `node`");
    assert_eq!(v[1]["level"], "WARN");
    assert!(v[2].get("member").is_none());
}

#[test]
fn text_lines_name_the_node() {
    let out = lines(false, || tracing::info!(shards = 3, "serving 3 shards"));
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(out[0].contains(" INFO node=n7 "), "{}", out[0]);
    assert!(out[0].contains("serving 3 shards shards=3"), "{}", out[0]);
}

#[test]
fn the_default_filter_parses_and_quiets_openraft_replication() {
    let f = tracing_subscriber::EnvFilter::try_new(DEFAULT_FILTER).unwrap();
    let text = f.to_string();
    assert!(text.contains("openraft::replication=off"), "{text}");
    assert!(text.contains("openraft::raft::raft_inner=off"), "{text}");
}
