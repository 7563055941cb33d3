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
        let mut open = tokio::fs::OpenOptions::new();
        open.create(true).append(true);
        #[cfg(unix)]
        open.mode(0o600);
        let file = open.open(&path).await.map_err(|source| AuditError::Open {
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

    /// Records one audited action: `who` (its certificate name, serial and role) asked for `op`
    /// on `target` (node, dataset, job or shard ids), with `result` ("ok", "denied: ...",
    /// "error: ...", or "admitted" for requests whose outcome the client sees later).
    pub async fn record(&self, who: &Identity, op: &str, target: &str, result: &str) {
        let line = audit_line(&self.node, who, op, target, result);
        if self.tx.send(line).await.is_err() {
            tracing::error!(client = %who.name, op, "audit log is closed");
        }
    }
}

fn audit_line(node: &str, who: &Identity, op: &str, target: &str, result: &str) -> String {
    let ts_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut line = serde_json::json!({
        "ts_ms": ts_ms,
        "node": node,
        "client": who.name,
        "serial": who.serial,
        "role": who.role.as_str(),
        "op": op,
        "target": target,
        "result": result,
    })
    .to_string();
    line.push('\n');
    line
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
            serial: "0a1b".into(),
        };
        log.record(&who, "voter_add", "n4", "ok").await;
        let path = dir.path().join("audit.log");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(line) = text.lines().next() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["client"], "ops\"1");
                assert_eq!(v["serial"], "0a1b");
                assert_eq!(v["role"], "admin");
                assert_eq!(v["op"], "voter_add");
                assert_eq!(v["target"], "n4");
                assert_eq!(v["result"], "ok");
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
                    assert_eq!(mode, 0o600, "the audit log is private");
                }
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
