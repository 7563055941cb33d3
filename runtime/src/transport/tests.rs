#![allow(clippy::unwrap_used)]
//! In-process transport tests on loopback: real QUIC, real mutual TLS, and the fault-injecting
//! socket. Waits poll a condition with a deadline.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::certs::{self, Subject, Validity};
use crate::codec::{ArchivedBody, Body, Dest, Envelope};

#[derive(Debug)]
struct AdmitAll;
impl PeerPolicy for AdmitAll {
    fn admit(&self, _: &Identity) -> Result<(), String> {
        Ok(())
    }
}

/// Answers every Ping with a Pong.
struct Echo;
impl Inbound for Echo {
    fn on_request(&self, link: Link, frame: Frame) -> BoxFuture {
        Box::pin(async move {
            let env = frame.envelope();
            if let ArchivedBody::Ping(n) = &env.body {
                let reply = Envelope::new(
                    "echo",
                    Dest::Peer,
                    env.correlation.to_native(),
                    Body::Pong(n.to_native()),
                );
                let _ = link.send(&reply).await;
            }
        })
    }
}

fn pki(dir: &Path, names: &[&str]) {
    certs::init_ca(&dir.join("ca")).unwrap();
    for n in names {
        certs::issue(
            &dir.join("ca"),
            &Subject::Node(n.to_string()),
            &dir.join(n),
            Validity::days_from_now(1),
        )
        .unwrap();
    }
}

fn node(dir: &Path, name: &str, socket: Socket) -> Transport {
    let tls = TlsMaterial::load_node(&dir.join(name)).unwrap();
    let t = Transport::bind(
        name,
        socket,
        &tls,
        Arc::new(AdmitAll),
        TransportConfig::default(),
    )
    .unwrap();
    t.start(Arc::new(Echo));
    t
}

fn loopback() -> Socket {
    Socket::Bind("127.0.0.1:0".parse().unwrap())
}

fn introduce(a: &Transport, b: &Transport) {
    let addr = |t: &Transport| t.local_addr().unwrap();
    a.set_members([(b.name().to_string(), addr(b))]);
    b.set_members([(a.name().to_string(), addr(a))]);
}

async fn ping(t: &Transport, peer: &str, n: u64, timeout: Duration) -> Result<(), TransportError> {
    let link = t.link(peer).await?;
    let f = link
        .request(
            Envelope::new(t.name(), Dest::Node(peer.into()), 0, Body::Ping(n)),
            timeout,
        )
        .await?;
    match f.envelope().body {
        ArchivedBody::Pong(m) if m == n => Ok(()),
        _ => Err(TransportError::Connection("wrong reply".into())),
    }
}

async fn eventually(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reused_link_carries_many_requests_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["a", "b"]);
    let (a, b) = (
        node(dir.path(), "a", loopback()),
        node(dir.path(), "b", loopback()),
    );
    introduce(&a, &b);
    let first = a.link("b").await.unwrap();
    let mut set = tokio::task::JoinSet::new();
    for n in 0..500 {
        let a = a.clone();
        set.spawn(async move { ping(&a, "b", n, Duration::from_secs(10)).await });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    assert!(
        a.link("b").await.unwrap().same_connection(&first),
        "the link is reused"
    );
    assert_eq!(
        first.peer().name,
        "b",
        "identity comes from the certificate"
    );
    // b can use the connection a opened (it registered it on accept) rather than dialing anew.
    ping(&b, "a", 1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(a.live_peers(), vec!["b".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_with_backoff_after_the_peer_restarts() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &["a", "b"]);
    let a = node(dir.path(), "a", loopback());
    let b = node(dir.path(), "b", loopback());
    let b_addr = b.local_addr().unwrap();
    introduce(&a, &b);
    ping(&a, "b", 1, Duration::from_secs(10)).await.unwrap();
    b.shutdown(Duration::from_secs(1)).await;
    drop(b);
    eventually("a notices b is gone", Duration::from_secs(15), async || {
        ping(&a, "b", 2, Duration::from_millis(200)).await.is_err()
    })
    .await;
    let b2 = node(dir.path(), "b", Socket::Bind(b_addr));
    b2.set_members([("a".to_string(), a.local_addr().unwrap())]);
    eventually(
        "a reconnects to the restarted b",
        Duration::from_secs(20),
        async || ping(&a, "b", 3, Duration::from_secs(1)).await.is_ok(),
    )
    .await;
}

#[cfg(feature = "fault-injection")]
mod faults {
    use super::*;
    use crate::transport::fault::{FaultPlan, FaultSocket, Rule};

    fn faulty(dir: &Path, name: &str, plan: &FaultPlan) -> Transport {
        let sock = FaultSocket::bind(
            "127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap(),
            plan.clone(),
        )
        .unwrap();
        node(dir, name, Socket::Abstract(sock))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocked_peer_times_out_and_recovers_when_healed() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path(), &["a", "b"]);
        let plan = FaultPlan::new(7);
        let a = faulty(dir.path(), "a", &plan);
        let b = node(dir.path(), "b", loopback());
        introduce(&a, &b);
        ping(&a, "b", 1, Duration::from_secs(10)).await.unwrap();

        plan.block(b.local_addr().unwrap());
        let err = ping(&a, "b", 2, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Timeout { .. }), "{err}");
        assert!(plan.dropped() > 0);

        plan.heal();
        eventually("traffic flows again", Duration::from_secs(20), async || {
            ping(&a, "b", 3, Duration::from_secs(1)).await.is_ok()
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loss_and_delay_are_absorbed_by_quic() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path(), &["a", "b"]);
        let plan = FaultPlan::new(11);
        let a = faulty(dir.path(), "a", &plan);
        let b = node(dir.path(), "b", loopback());
        introduce(&a, &b);
        ping(&a, "b", 0, Duration::from_secs(10)).await.unwrap();
        plan.set_default(Rule {
            drop_rate: 0.2,
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(5),
            duplicate_rate: 0.1,
            ..Rule::default()
        });
        for n in 1..=100 {
            ping(&a, "b", n, Duration::from_secs(10)).await.unwrap();
        }
        assert!(plan.dropped() > 0, "the plan really dropped datagrams");
    }
}
