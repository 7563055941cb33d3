//! Real quinn endpoints on loopback: one good handshake, then each way a peer must be refused.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connecting, Connection, ConnectionError, Endpoint};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::*;
use crate::certs::{init_ca, issue, Subject, Validity};

/// Upper bound on any single handshake or refusal on loopback; generous for loaded CI hosts.
const DEADLINE: Duration = Duration::from_secs(10);

/// A temporary cluster CA and helpers to issue and load material from it.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        // Refusal reasons are logged; show them with `--nocapture` when a case fails.
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let dir = tempfile::tempdir().unwrap();
        init_ca(&dir.path().join("ca")).unwrap();
        Pki { dir }
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    fn issue(&self, subject: Subject, out: &str, validity: Validity) -> PathBuf {
        let out = self.dir.path().join(out);
        issue(&self.ca_dir(), &subject, &out, validity).unwrap();
        out
    }

    fn node(&self, name: &str) -> TlsMaterial {
        let dir = self.issue(Subject::Node(name.into()), name, Validity::days_from_now(1));
        TlsMaterial::load_node(&dir).unwrap()
    }
}

/// Admits clients, and nodes only if they are listed.
#[derive(Debug)]
struct Members(Vec<&'static str>);

impl PeerPolicy for Members {
    fn admit(&self, peer: &Identity) -> Result<(), String> {
        if peer.role != Role::Node || self.0.contains(&peer.name.as_str()) {
            Ok(())
        } else {
            Err(format!("{} is not a member", peer.name))
        }
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn server(config: quinn::ServerConfig) -> (Endpoint, SocketAddr) {
    let ep = Endpoint::server(config, loopback()).unwrap();
    let addr = ep.local_addr().unwrap();
    (ep, addr)
}

fn node_server(m: &TlsMaterial) -> (Endpoint, SocketAddr) {
    server(server_config(m, Arc::new(Members(vec!["n1", "n2"]))).unwrap())
}

fn dial(config: quinn::ClientConfig, addr: SocketAddr, name: &str) -> (Endpoint, Connecting) {
    let ep = Endpoint::client(loopback()).unwrap();
    let connecting = ep.connect_with(config, addr, name).unwrap();
    (ep, connecting)
}

/// The server side of one connection attempt.
async fn accept_one(ep: &Endpoint) -> Result<Connection, ConnectionError> {
    let incoming = tokio::time::timeout(DEADLINE, ep.accept())
        .await
        .expect("no connection attempt arrived before the deadline")
        .expect("endpoint closed");
    tokio::time::timeout(DEADLINE, incoming)
        .await
        .expect("server handshake hung")
}

/// The client side of an attempt the server refuses. With TLS 1.3 the client sends its
/// certificate in its last flight, so it may believe the handshake succeeded; the refusal then
/// shows up as the connection closing under the first stream. Returns the error it saw.
async fn client_refused(connecting: Connecting) -> String {
    let attempt = async {
        let conn = connecting.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"ping").await?;
        send.finish()?;
        // The server never answers: this returns only when the connection is closed.
        recv.read_to_end(64).await?;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    };
    match tokio::time::timeout(DEADLINE, attempt)
        .await
        .expect("client neither failed nor succeeded")
    {
        Ok(()) => panic!("client was not refused"),
        Err(e) => e.to_string(),
    }
}

/// The client side of an attempt the client itself refuses: the handshake must fail.
async fn handshake_fails(connecting: Connecting) -> ConnectionError {
    match tokio::time::timeout(DEADLINE, connecting)
        .await
        .expect("client handshake hung")
    {
        Ok(conn) => panic!("handshake with {:?} succeeded", peer_identity(&conn)),
        Err(e) => e,
    }
}

#[tokio::test]
async fn nodes_and_clients_authenticate_each_other() {
    let pki = Pki::new();
    let (n1, n2) = (pki.node("n1"), pki.node("n2"));
    let (server_ep, addr) = node_server(&n1);

    let (_client_ep, connecting) = dial(client_config(&n2).unwrap(), addr, "n1");
    let (accepted, connected) = tokio::join!(accept_one(&server_ep), connecting);
    let (accepted, connected) = (accepted.unwrap(), connected.unwrap());
    let got = peer_identity(&accepted).unwrap();
    assert_eq!((got.name.as_str(), got.role), ("n2", Role::Node));
    assert!(!got.serial.is_empty());
    let got = peer_identity(&connected).unwrap();
    assert_eq!((got.name.as_str(), got.role), ("n1", Role::Node));
    assert!(!got.serial.is_empty());
    assert_eq!(
        accepted
            .handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap()
            .protocol,
        Some(ALPN.to_vec())
    );

    // A CLI client with an admin certificate is admitted too and seen as such.
    let dir = pki.issue(
        Subject::Client {
            name: "ops".into(),
            role: Role::Admin,
        },
        "ops",
        Validity::days_from_now(1),
    );
    let ops = TlsMaterial::load_client(&dir).unwrap();
    let got = &ops.identity;
    assert_eq!((got.name.as_str(), got.role), ("ops", Role::Admin));
    assert!(!got.serial.is_empty());
    let (_client_ep, connecting) = dial(client_config(&ops).unwrap(), addr, "n1");
    let (accepted, connected) = tokio::join!(accept_one(&server_ep), connecting);
    assert_eq!(peer_identity(&accepted.unwrap()).unwrap().role, Role::Admin);
    assert_eq!(peer_identity(&connected.unwrap()).unwrap().name, "n1");
}

/// Dials `n1` (admitting n1, n2) with `config`; asserts the server refuses the client.
async fn refused_by_server(pki: &Pki, config: quinn::ClientConfig) {
    let (server_ep, addr) = node_server(&pki.node("n1"));
    let (_client_ep, connecting) = dial(config, addr, "n1");
    let (accepted, client_err) = tokio::join!(accept_one(&server_ep), client_refused(connecting));
    assert!(accepted.is_err(), "server accepted the connection");
    assert!(!client_err.is_empty());
}

#[tokio::test]
async fn refuses_client_without_certificate() {
    let pki = Pki::new();
    let n2 = pki.node("n2");
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(n2.ca_roots.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    refused_by_server(&pki, config).await;
}

#[tokio::test]
async fn refuses_client_from_foreign_ca() {
    let pki = Pki::new();
    let foreign = Pki::new();
    let dir = foreign.issue(Subject::Node("n2".into()), "n2", Validity::days_from_now(1));
    // Trust the real CA (so the client accepts the server) but present the foreign cert.
    std::fs::copy(pki.ca_dir().join("ca.pem"), dir.join("ca.pem")).unwrap();
    let n2 = TlsMaterial::load_node(&dir).unwrap();
    refused_by_server(&pki, client_config(&n2).unwrap()).await;
}

#[tokio::test]
async fn refuses_expired_client() {
    let pki = Pki::new();
    let now = OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - time::Duration::days(2),
        not_after: now - time::Duration::days(1),
    };
    let dir = pki.issue(Subject::Node("n2".into()), "n2", expired);
    let n2 = TlsMaterial::load_node(&dir).unwrap();
    refused_by_server(&pki, client_config(&n2).unwrap()).await;
}

#[tokio::test]
async fn refuses_node_that_is_not_a_member() {
    let pki = Pki::new();
    let n4 = pki.node("n4");
    refused_by_server(&pki, client_config(&n4).unwrap()).await;
}

/// Dials `expect` at a server configured with `server`; the client must refuse the server.
async fn refused_by_client(client: &TlsMaterial, server: quinn::ServerConfig, expect: &str) {
    let (server_ep, addr) = self::server(server);
    let (_client_ep, connecting) = dial(client_config(client).unwrap(), addr, expect);
    let (accepted, client_err) = tokio::join!(accept_one(&server_ep), handshake_fails(connecting));
    assert!(accepted.is_err(), "server saw a completed handshake");
    // Any error but a timeout; the exact alert depends on which check fired.
    assert!(
        !matches!(client_err, ConnectionError::TimedOut),
        "{client_err}"
    );
}

#[tokio::test]
async fn refuses_server_with_another_nodes_name() {
    let pki = Pki::new();
    // n1 dials "n2"; the server presents n3's perfectly valid node certificate.
    let (n1, n3) = (pki.node("n1"), pki.node("n3"));
    let config = server_config(&n3, Arc::new(Members(vec!["n1"]))).unwrap();
    refused_by_client(&n1, config, "n2").await;
}

/// A server config built by hand: `server_config` itself refuses non-node material.
fn raw_server(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> quinn::ServerConfig {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).unwrap()))
}

#[tokio::test]
async fn refuses_client_certificate_posing_as_server() {
    let pki = Pki::new();
    let n1 = pki.node("n1");
    // An admin certificate named like the node we dial: no serverAuth EKU, no DNS SAN.
    let dir = pki.issue(
        Subject::Client {
            name: "n2".into(),
            role: Role::Admin,
        },
        "fake-n2",
        Validity::days_from_now(1),
    );
    let fake = TlsMaterial::load_client(&dir).unwrap();
    assert!(matches!(
        server_config(&fake, Arc::new(Members(vec![]))),
        Err(TlsError::WrongRole { .. })
    ));
    refused_by_client(
        &n1,
        raw_server(fake.chain.clone(), fake.key.clone_key()),
        "n2",
    )
    .await;

    // Even a CA-signed certificate with serverAuth and the right SAN is refused if its role is
    // not node: webpki passes it, so this exercises our own check.
    let (chain, key) = ca_signed_admin_with_server_eku(&pki.ca_dir(), "n2");
    refused_by_client(&n1, raw_server(chain, key), "n2").await;
}

/// What `certs::issue` never makes: OU=admin, but with a DNS SAN and serverAuth.
fn ca_signed_admin_with_server_eku(
    ca_dir: &Path,
    name: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "tidepool");
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, "admin");
    params.subject_alt_names = vec![SanType::DnsName(name.try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let v = Validity::days_from_now(1);
    params.not_before = v.not_before;
    params.not_after = v.not_after;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (vec![cert.der().clone()], key)
}

#[test]
fn load_checks_roles_and_files() {
    let pki = Pki::new();
    let node_dir = pki.issue(Subject::Node("n1".into()), "n1", Validity::days_from_now(1));
    assert!(matches!(
        TlsMaterial::load_client(&node_dir),
        Err(TlsError::Io { .. })
    ));
    // A node certificate renamed to client.pem is still a node's.
    std::fs::copy(node_dir.join("node.pem"), node_dir.join("client.pem")).unwrap();
    std::fs::copy(node_dir.join("node.key"), node_dir.join("client.key")).unwrap();
    assert!(matches!(
        TlsMaterial::load_client(&node_dir),
        Err(TlsError::WrongRole { .. })
    ));
    std::fs::write(node_dir.join("ca.pem"), "not pem").unwrap();
    assert!(matches!(
        TlsMaterial::load_node(&node_dir),
        Err(TlsError::Pem { .. })
    ));
    let m = pki.node("n2");
    assert!(
        !format!("{m:?}").contains("key:"),
        "Debug must not print the key"
    );
}

#[tokio::test]
async fn any_node_accepts_only_node_certificates() {
    let pki = Pki::new();
    let dir = pki.issue(
        Subject::Client {
            name: "ops".into(),
            role: Role::Reader,
        },
        "ops",
        Validity::days_from_now(1),
    );
    let ops = TlsMaterial::load_client(&dir).unwrap();

    // Any node will do, and the client learns which one it reached.
    let (server_ep, addr) = node_server(&pki.node("n1"));
    let (_client_ep, connecting) = dial(client_config(&ops).unwrap(), addr, ANY_NODE);
    let (accepted, connected) = tokio::join!(accept_one(&server_ep), connecting);
    assert_eq!(peer_identity(&accepted.unwrap()).unwrap().name, "ops");
    let got = peer_identity(&connected.unwrap()).unwrap();
    assert_eq!((got.name.as_str(), got.role), ("n1", Role::Node));
    assert!(!got.serial.is_empty());

    // ...but it must still be a node: a CA-signed non-node certificate that would otherwise
    // pass webpki (serverAuth, SAN = its CN) is refused.
    let (chain, key) = ca_signed_admin_with_server_eku(&pki.ca_dir(), "n2");
    refused_by_client(&ops, raw_server(chain, key), ANY_NODE).await;
    // So is a plain client certificate.
    refused_by_client(
        &ops,
        raw_server(ops.chain.clone(), ops.key.clone_key()),
        ANY_NODE,
    )
    .await;
}

/// The expiry gauge's source: a node certificate's not-after, in Unix seconds.
#[test]
fn not_after_is_read_from_the_node_certificate() {
    let pki = Pki::new();
    let validity = Validity::days_from_now(20);
    let want = validity.not_after.unix_timestamp();
    let dir = pki.issue(Subject::Node("n9".into()), "n9", validity);
    let m = TlsMaterial::load_node(&dir).unwrap();
    let got = not_after_unix(&m.chain[0]).unwrap();
    assert!((got - want).abs() <= 1, "{got} vs {want}");
}
