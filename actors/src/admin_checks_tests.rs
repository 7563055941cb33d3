//! The malicious payloads of issue 12 (item 7) and their neighbours, without I/O.

use super::*;
use tidepool_runtime::control::{apply, Command, JobRecord, JobState};

const LIMITS: Limits = Limits {
    memory_budget_bytes: 8 << 30,
    max_frame_bytes: 64 << 20,
};

fn imported(name: &str, import: &str) -> DatasetRecord {
    DatasetRecord {
        name: name.into(),
        features: vec!["a".into(), "b".into()],
        label: "y".into(),
        rows: 100,
        shards: 4,
        source: DatasetSource::Imported {
            import: import.into(),
            segments: vec![1; 4],
        },
    }
}

fn synthetic(rows: u64, kind: &str) -> DatasetRecord {
    DatasetRecord {
        source: DatasetSource::Synthetic {
            kind: kind.into(),
            seed: 1,
        },
        rows,
        ..imported("s", "x")
    }
}

/// A map with dataset `d` committed from import `i1`.
fn map() -> ClusterMap {
    let mut map = ClusterMap::default();
    assert!(apply(&mut map, &Command::Init { shards: 4 }).is_ok());
    assert!(apply(
        &mut map,
        &Command::PutDataset(Box::new(imported("d", "i1")))
    )
    .is_ok());
    map
}

fn job(state: JobState) -> JobRecord {
    JobRecord {
        id: "j1".into(),
        spec: String::new(),
        kind: "sgd".into(),
        dataset: "d".into(),
        coordinator_shard: 0,
        state,
        step: 0,
        steps: 1,
        loss: None,
        samples_per_sec: None,
        coordinator: None,
        error: None,
        submitted_seq: 1,
    }
}

#[test]
fn commits_table() {
    let map = map();
    let mut wrong_segments = imported("e", "i2");
    if let DatasetSource::Imported { segments, .. } = &mut wrong_segments.source {
        segments.pop();
    }
    let mut no_features = imported("e", "i2");
    no_features.features.clear();
    let mut wrong_shards = imported("e", "i2");
    wrong_shards.shards = 8;
    // (record, expected: Ok(Commit) or the error's text, cleanup prefix on refusal)
    let cases: Vec<(DatasetRecord, Result<Commit, &str>, Option<&str>)> = vec![
        (imported("e", "i2"), Ok(Commit::New), Some("datasets/e/i2")),
        (imported("d", "i1"), Ok(Commit::Retry), None),
        // Issue 12: an empty import id on an existing name; refused, and nothing deleted.
        (imported("d", ""), Err("import \"\""), None),
        (
            imported("d", "i2"),
            Err("already exists"),
            Some("datasets/d/i2"),
        ),
        // Another record reusing the committed import id: refused, the import kept.
        (
            DatasetRecord {
                rows: 7,
                ..imported("d", "i1")
            },
            Err("already exists"),
            None,
        ),
        (imported("", "i2"), Err("dataset \"\""), None),
        (imported("../d", "i2"), Err("not a valid name"), None),
        (imported("d", "../../jobs"), Err("not a valid name"), None),
        (imported("e", ".hidden"), Err("not a valid name"), None),
        (
            wrong_segments,
            Err("3 segment counts"),
            Some("datasets/e/i2"),
        ),
        (no_features, Err("0 features"), Some("datasets/e/i2")),
        (
            wrong_shards,
            Err("partitioned for 8 shards"),
            Some("datasets/e/i2"),
        ),
        (synthetic(2_000_000, "logistic"), Ok(Commit::New), None),
        (
            synthetic(1_000_000_000, "logistic"),
            Err("jobs.memory_budget_bytes"),
            None,
        ),
        (synthetic(10, "quadratic"), Err("synthetic kind"), None),
    ];
    for (rec, want, cleanup) in cases {
        let got = check_commit(&rec, &map, &LIMITS);
        match (&want, &got) {
            (Ok(w), Ok(g)) => assert_eq!(w, g, "{rec:?}"),
            (Err(w), Err(g)) => assert!(g.to_string().contains(w), "{rec:?}: {g}"),
            _ => panic!("{rec:?}: want {want:?}, got {got:?}"),
        }
        assert_eq!(
            refused_commit_cleanup(&rec, &map).as_deref(),
            cleanup,
            "{rec:?}"
        );
    }
}

#[test]
fn aborts_table() {
    let map = map();
    let cases = [
        ("d", "i2", Ok("datasets/d/i2")),
        ("e", "i1", Ok("datasets/e/i1")),
        ("d", "i1", Err("is committed as dataset")),
        ("d", "", Err("not a valid name")),
        ("", "i1", Err("not a valid name")),
        ("d", "i1/../..", Err("not a valid name")),
    ];
    for (name, import, want) in cases {
        let got = check_abort(name, import, &map).map_err(|e| e.to_string());
        match (want, &got) {
            (Ok(w), Ok(g)) => assert_eq!(w, g),
            (Err(w), Err(g)) => assert!(g.contains(w), "{name}/{import}: {g}"),
            _ => panic!("{name}/{import}: want {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn deletes_table() {
    let mut map = map();
    assert!(apply(
        &mut map,
        &Command::PutDataset(Box::new(synthetic(10, "linear")))
    )
    .is_ok());
    assert_eq!(
        check_delete("d", &map),
        Ok(Delete::Remove {
            prefix: Some("datasets/d/i1".into())
        })
    );
    assert_eq!(check_delete("s", &map), Ok(Delete::Remove { prefix: None }));
    assert_eq!(check_delete("nope", &map), Ok(Delete::Absent));
    assert!(check_delete("", &map).is_err());
    for (state, refused) in [
        (JobState::Pending, true),
        (JobState::Running, true),
        (JobState::Succeeded, false),
        (JobState::Failed, false),
        (JobState::Cancelled, false),
    ] {
        map.jobs.insert("j1".into(), job(state));
        let got = check_delete("d", &map);
        assert_eq!(got.is_err(), refused, "{state:?}: {got:?}");
        if let Err(e) = got {
            assert!(e.to_string().contains("job j1"), "{e}");
        }
    }
}
