//! Authenticated but malicious peers (fault class F9, second half): a holder of a valid
//! certificate from the cluster CA who sends what the node's own code never would. Shared by
//! `tests/trust.rs` and the chaos harness.
//!
//! Frames are built here byte by byte where the attack is in the framing (announced lengths),
//! and Raft payloads are written as JSON by hand (not through openraft's types), the way an
//! independent client would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tidepool_runtime::codec::{
    self, Body, ControlKind, Dest, Envelope, ErrorCode, IdemKey, Op, ShardRequest,
    FRAME_HEADER_LEN, PROTOCOL_VERSION,
};
use tidepool_runtime::control::node_id;
use tidepool_runtime::transport::tls::{self, ANY_NODE};
use tidepool_runtime::transport::TlsMaterial;

/// A raw QUIC connection under some certificate.
pub struct Attacker {
    ep: quinn::Endpoint,
    pub conn: quinn::Connection,
    /// The name the certificate carries.
    pub name: String,
    /// Replies read by a background reader, by correlation id (`None`: replies are not read).
    replies: Option<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<(u64, Answer)>>>,
}

impl std::fmt::Debug for Attacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attacker")
            .field("name", &self.name)
            .finish()
    }
}

/// What a node answered to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `ControlReply` payload (as text).
    Reply(String),
    /// An error reply.
    Error(ErrorCode, String),
    /// No answer in time (dropped, or the stream was reset).
    Nothing,
}

impl Attacker {
    /// Connects to `target` presenting `m` (a node's or a client's material) and reads every
    /// reply the node sends.
    pub async fn connect(target: SocketAddr, m: &TlsMaterial) -> Result<Attacker> {
        Self::connect_with(target, m, true).await
    }

    /// Connects; with `read` false nothing the node sends is ever read.
    pub async fn connect_with(target: SocketAddr, m: &TlsMaterial, read: bool) -> Result<Attacker> {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().context("addr")?)?;
        let conn = ep
            .connect_with(tls::client_config(m)?, target, ANY_NODE)?
            .await
            .context("handshake")?;
        let replies = read.then(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            tokio::spawn(read_replies(conn.clone(), tx));
            tokio::sync::Mutex::new(rx)
        });
        Ok(Attacker {
            ep,
            conn,
            name: m.identity.name.clone(),
            replies,
        })
    }

    /// Sends one request envelope on a stream of its own and waits up to `wait` for the reply.
    pub async fn ask(&self, corr: u64, body: Body, wait: Duration) -> Result<Answer> {
        let env = Envelope::new(&self.name, Dest::Peer, corr, body);
        let mut s = self.conn.open_uni().await?;
        s.write_all(&codec::encode(&env)?.to_vec()).await?;
        let _ = s.finish();
        let Some(replies) = &self.replies else {
            return Ok(Answer::Nothing);
        };
        let read = async {
            let mut rx = replies.lock().await;
            while let Some((c, answer)) = rx.recv().await {
                if c == corr {
                    return answer;
                }
            }
            Answer::Nothing
        };
        Ok(tokio::time::timeout(wait, read)
            .await
            .unwrap_or(Answer::Nothing))
    }

    /// A control-plane RPC with a hand-written JSON payload.
    pub async fn control(&self, corr: u64, kind: ControlKind, json: String) -> Result<Answer> {
        let body = Body::Control {
            kind,
            payload: json.into_bytes(),
        };
        self.ask(corr, body, Duration::from_secs(5)).await
    }

    pub async fn close(self) {
        self.conn.close(0u32.into(), b"");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ep.wait_idle()).await;
    }
}

/// Reads every frame on every stream the node opens and passes replies on.
async fn read_replies(conn: quinn::Connection, tx: tokio::sync::mpsc::Sender<(u64, Answer)>) {
    while let Ok(mut r) = conn.accept_uni().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(f)) = codec::read_frame(&mut r, 64 << 20).await {
                let Ok(env) = f.to_owned_envelope() else {
                    return;
                };
                let answer = match env.body {
                    Body::ControlReply(b) => {
                        Answer::Reply(String::from_utf8_lossy(&b).into_owned())
                    }
                    Body::Error { code, message } => Answer::Error(code, message),
                    other => Answer::Reply(format!("{other:?}")),
                };
                if tx.send((env.correlation, answer)).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// RequestVote from `candidate` (a node name) at `term`, as openraft's JSON.
pub fn vote_json(candidate: &str, term: u64) -> String {
    format!(
        r#"{{"vote":{{"leader_id":{{"term":{term},"node_id":{}}},"committed":false}},"last_log_id":{{"leader_id":{{"term":{term},"node_id":{}}},"index":1000000}}}}"#,
        node_id(candidate),
        node_id(candidate)
    )
}

/// AppendEntries from `leader` at `term`: a heartbeat (`entries` empty) or blank entries at
/// the given indexes after `prev` (`(term, index)`).
pub fn append_json(leader: &str, term: u64, prev: Option<(u64, u64)>, entries: &[u64]) -> String {
    let id = node_id(leader);
    let lid = |t: u64| format!(r#"{{"term":{t},"node_id":{id}}}"#);
    let prev = prev.map_or("null".to_string(), |(t, i)| {
        format!(r#"{{"leader_id":{},"index":{i}}}"#, lid(t))
    });
    let entries: Vec<String> = entries
        .iter()
        .map(|i| {
            format!(
                r#"{{"log_id":{{"leader_id":{},"index":{i}}},"payload":"Blank"}}"#,
                lid(term)
            )
        })
        .collect();
    format!(
        r#"{{"vote":{{"leader_id":{},"committed":true}},"prev_log_id":{prev},"entries":[{}],"leader_commit":null}}"#,
        lid(term),
        entries.join(",")
    )
}

/// A forwarded proposal to set `name`'s member state.
pub fn propose_state_json(name: &str, state: &str) -> String {
    format!(r#"{{"cmd":{{"SetMemberState":{{"name":"{name}","state":"{state}"}}}}}}"#)
}

/// A join request for `name` at `addr`.
pub fn join_json(name: &str, addr: &str, voter: bool) -> String {
    format!(r#"{{"info":{{"name":"{name}","addr":"{addr}"}},"voter":{voter}}}"#)
}

/// Opens `streams` streams on one connection, each announcing a frame of `announce` bytes and
/// sending only `send` of them, and keeps them open (the attack holds while the returned
/// attacker lives).
pub async fn announce_oversized(
    target: SocketAddr,
    m: &TlsMaterial,
    streams: usize,
    announce: u32,
    send: usize,
) -> Result<(Attacker, Vec<quinn::SendStream>)> {
    let a = Attacker::connect(target, m).await?;
    let mut open = Vec::with_capacity(streams);
    for _ in 0..streams {
        let mut s = a.conn.open_uni().await?;
        let mut head = [0u8; FRAME_HEADER_LEN];
        head[..4].copy_from_slice(&announce.to_le_bytes());
        head[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        s.write_all(&head).await?;
        s.write_all(&vec![0x5a; send]).await?;
        open.push(s);
    }
    Ok((a, open))
}

/// Sends `n` Gets of `key` (on `shard` at `epoch`) and never reads a reply: the client's
/// receive windows fill and the node's replies have nowhere to go. Returns the attacker (the
/// connection stays open, unread, while it lives).
pub async fn never_read(
    target: SocketAddr,
    m: &TlsMaterial,
    shard: u32,
    epoch: u64,
    key: &str,
    n: u64,
) -> Result<Attacker> {
    let a = Attacker::connect_with(target, m, false).await?;
    let mut s = a.conn.open_uni().await?;
    let started = Instant::now();
    for seq in 1..=n {
        let env = Envelope::new(
            &a.name,
            Dest::Shard { shard, epoch },
            seq,
            Body::ShardRequest(ShardRequest {
                idem: IdemKey {
                    sender: 0x6d61_6c6c,
                    seq,
                },
                op: Op::Get { key: key.into() },
            }),
        );
        // The node may stop reading our stream (request slots full): that is the point.
        match tokio::time::timeout(
            Duration::from_secs(2),
            s.write_all(&codec::encode(&env)?.to_vec()),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break,
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("sending {n} requests took over 30 s");
        }
    }
    Ok(a)
}

/// Resident set size of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS")
}

/// A KiB field of `/proc/PID/status` (`VmRSS`, `VmHWM`: the peak resident set size).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Samples `pid`'s RSS every 50 ms while `f` runs; returns `f`'s output and the peak in KiB.
pub async fn peak_rss<T>(pid: u32, f: impl std::future::Future<Output = T>) -> (T, u64) {
    let (out, peaks) = peak_rss_of(&[pid], f).await;
    (out, peaks.first().copied().unwrap_or(0))
}

/// [`peak_rss`] of several processes at once: the peak of each, in KiB, in `pids` order.
pub async fn peak_rss_of<T>(
    pids: &[u32],
    f: impl std::future::Future<Output = T>,
) -> (T, Vec<u64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let peaks: Arc<Vec<AtomicU64>> = Arc::new(
        pids.iter()
            .map(|&p| AtomicU64::new(rss_kib(p).unwrap_or(0)))
            .collect(),
    );
    let sampler = {
        let (pids, peaks) = (pids.to_vec(), peaks.clone());
        tokio::spawn(async move {
            loop {
                for (p, peak) in pids.iter().zip(peaks.iter()) {
                    if let Some(r) = rss_kib(*p) {
                        peak.fetch_max(r, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await; // sampling interval
            }
        })
    };
    let out = f.await;
    sampler.abort();
    (
        out,
        peaks.iter().map(|p| p.load(Ordering::Relaxed)).collect(),
    )
}

/// What one round of authenticated attacks did; `accepted` lists anything not refused.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MaliciousReport {
    pub control_refused: usize,
    pub oversized_streams: usize,
    /// Admin HTTP connections opened idle or half-sent.
    pub slow_http: usize,
    /// Whether the node closed the connection of a client that never read its replies.
    pub never_read_closed: bool,
    pub accepted: Vec<String>,
}

/// One round of attacks by holders of valid certificates against the node at `target`: a vote
/// storm, a made-up leader and an impersonating vote from a spare node certificate issued for
/// the occasion, a proposal and a join about another node, and 32 streams announcing 64 MiB
/// frames and slow admin HTTP clients (held for a second), and a reader that never reads its
/// replies (until the node closes it). `ca_dir` issues the certificates into `scratch`;
/// `admin` stores the value the never-reading client asks for.
pub async fn malicious_round(
    target: SocketAddr,
    admin_http: SocketAddr,
    admin: &TlsMaterial,
    ca_dir: &std::path::Path,
    scratch: &std::path::Path,
    seed: u64,
) -> Result<MaliciousReport> {
    use tidepool_runtime::certs::{self, Role, Subject, Validity};
    let mut r = MaliciousReport::default();
    let spare_name = format!("spare{}", seed % 1000);
    let spare_dir = scratch.join(&spare_name);
    certs::issue(
        ca_dir,
        &Subject::Node(spare_name.clone()),
        &spare_dir,
        Validity::days_from_now(1),
    )?;
    let spare = TlsMaterial::load_node(&spare_dir)?;
    let reader_dir = scratch.join("mallory-reader");
    certs::issue(
        ca_dir,
        &Subject::Client {
            name: "mallory".into(),
            role: Role::Reader,
        },
        &reader_dir,
        Validity::days_from_now(1),
    )?;
    let reader = TlsMaterial::load_client(&reader_dir)?;

    let a = Attacker::connect(target, &spare).await?;
    let mut corr = 1u64;
    let mut rpcs: Vec<(&str, ControlKind, String)> = Vec::new();
    for term in 0..15u64 {
        rpcs.push((
            "vote storm",
            ControlKind::RaftVote,
            vote_json(&spare_name, 1_000 + term),
        ));
    }
    rpcs.push((
        "fake leader",
        ControlKind::RaftAppend,
        append_json(&spare_name, 2_000, None, &[]),
    ));
    rpcs.push((
        "impersonated vote",
        ControlKind::RaftVote,
        vote_json("n1", 3_000),
    ));
    rpcs.push((
        "proposal about another node",
        ControlKind::Propose,
        propose_state_json("n1", "draining"),
    ));
    rpcs.push((
        "join under another name",
        ControlKind::Join,
        join_json("n1", "127.0.0.1:9", false),
    ));
    for (what, kind, json) in rpcs {
        let answer = a.control(corr, kind, json).await?;
        corr += 1;
        let refused = match &answer {
            Answer::Error(ErrorCode::Forbidden, _) => true,
            // Forwarded requests are answered with the refusal itself.
            Answer::Reply(t) => t.contains("refused") || t.contains("NotLeader"),
            _ => false,
        };
        if refused {
            r.control_refused += 1;
        } else {
            r.accepted.push(format!(
                "{what} from a non-member node certificate: {answer:?}"
            ));
        }
    }
    a.close().await;

    let (a, streams) = announce_oversized(target, &reader, 32, 64 << 20, 1024).await?;
    r.oversized_streams = streams.len();
    // Meanwhile, slow HTTP clients on the admin port: idle and half-sent requests.
    let mut held = Vec::new();
    for i in 0..40 {
        if let Ok(mut c) = tokio::net::TcpStream::connect(admin_http).await {
            if i % 2 == 0 {
                use tokio::io::AsyncWriteExt;
                let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
            }
            held.push(c);
        }
    }
    r.slow_http = held.len();
    tokio::time::sleep(Duration::from_secs(1)).await; // the attack holds for a second
    match tokio::time::timeout(
        Duration::from_secs(5),
        crate::http::get(admin_http, "/livez"),
    )
    .await
    {
        Ok(Ok((200, _))) => {}
        other => r.accepted.push(format!(
            "the admin port stopped answering under slow clients: {other:?}"
        )),
    }
    drop(held);
    drop(streams);
    a.close().await;

    // A reader that never reads: 1000 Gets of a 512 KiB value (500 MiB of replies). The node
    // must close the connection once its send budget stays full (`transport.send_stall_ms`).
    let opts = tidepool_runtime::client::ClientOptions::default();
    let client = tidepool_runtime::client::ClusterClient::connect(&[target], admin, opts).await?;
    // A key the target itself serves (a forwarded Get may be refused small, e.g. as stale).
    let status = client.status().await?;
    let me = status
        .members
        .iter()
        .find(|m| m.addr == target.to_string())
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let shards = client.shards().await?;
    let owned = |k: &str| {
        let s = client.shard_of(k);
        shards
            .iter()
            .find(|i| i.id == s && i.owner.as_ref() == Some(&me))
            .map(|i| (s, i.epoch))
    };
    let Some((key, (shard, epoch))) = (0..1000)
        .map(|i| format!("f9-never-read-{i}"))
        .find_map(|k| owned(&k).map(|o| (k, o)))
    else {
        client.close().await;
        return Ok(r);
    };
    client
        .op(
            &key,
            Op::Put {
                key: key.clone(),
                value: vec![0x42; 512 << 10],
            },
        )
        .await?;
    client.close().await;
    let quiet = never_read(target, &reader, shard, epoch, &key, 1000).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while quiet.conn.close_reason().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
    }
    r.never_read_closed = quiet.conn.close_reason().is_some();
    if !r.never_read_closed {
        r.accepted
            .push("a client that never reads its replies kept its connection for 30 s".into());
    }
    quiet.close().await;
    Ok(r)
}
