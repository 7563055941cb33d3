//! The audit log: one JSON line per admin request, naming the client's certificate, appended to
//! `{data_dir}/audit.log`. A bounded queue feeds one writer task; a full queue makes the request
//! wait (an admin request is never served unaudited).

use std::path::{Path, PathBuf};

use tidepool_runtime::certs::Identity;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

const QUEUE: usize = 4096;

/// Errors opening the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A handle to the audit log. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<String>,
    node: String,
}

impl AuditLog {
    /// Opens (appends to) `dir/audit.log` and starts its writer task.
    pub async fn open(dir: &Path, node: &str) -> Result<Self, AuditError> {
        let path = dir.join("audit.log");
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(|source| AuditError::Open {
                path: path.clone(),
                source,
            })?;
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        tokio::spawn(async move {
            let mut w = tokio::io::BufWriter::new(file);
            while let Some(line) = rx.recv().await {
                let mut ok = w.write_all(line.as_bytes()).await.is_ok();
                while let Ok(more) = rx.try_recv() {
                    ok &= w.write_all(more.as_bytes()).await.is_ok();
                }
                ok &= w.flush().await.is_ok();
                if !ok {
                    tracing::error!(path = %path.display(), "audit log write failed");
                }
            }
        });
        Ok(AuditLog {
            tx,
            node: node.to_string(),
        })
    }

    /// Records that `who` made an admin request of kind `what` (`detail` is free text).
    pub async fn record(&self, who: &Identity, what: &str, detail: &str) {
        let line = serde_line(&self.node, who, what, detail);
        if self.tx.send(line).await.is_err() {
            tracing::error!(client = %who.name, what, "audit log is closed");
        }
    }
}

fn serde_line(node: &str, who: &Identity, what: &str, detail: &str) -> String {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!(
        "{{\"ts_ms\":{ts},\"node\":{},\"client\":{},\"role\":\"{}\",\"request\":{},\"detail\":{}}}\n",
        json_str(node),
        json_str(&who.name),
        who.role,
        json_str(what),
        json_str(detail)
    )
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_runtime::certs::Role;

    #[tokio::test]
    async fn lines_name_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), "n1").await.unwrap();
        let who = Identity {
            name: "ops\"1".into(),
            role: Role::Admin,
        };
        log.record(&who, "shard_request", "incr k").await;
        let path = dir.path().join("audit.log");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains("\"client\":\"ops\\\"1\"") {
                assert!(text.contains("\"role\":\"admin\""));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "audit line never written: {text}"
            );
            tokio::task::yield_now().await;
        }
    }
}
