//! Hostile peers (fault class F9), shared by `tests/hostile.rs` and the chaos harness: TLS
//! handshakes that must be refused (no certificate, a foreign CA, an expired certificate, a
//! server that is not who we dialed), a connection flood, garbage datagrams, and malformed,
//! truncated, oversized and wrong-version frames from an authenticated client.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tidepool_runtime::certs::{self, Role, Subject, Validity};
use tidepool_runtime::codec::{self, ArchivedBody, Body, Dest, Envelope, FRAME_HEADER_LEN};
use tidepool_runtime::transport::tls::{self, ANY_NODE};
use tidepool_runtime::transport::TlsMaterial;

pub fn ping_frame(n: u64) -> Vec<u8> {
    codec::encode(&Envelope::new("probe", Dest::Peer, n, Body::Ping(n)))
        .expect("static TLS config")
        .to_vec()
}

/// Connects with `config`, sends a Ping and waits for the Pong. `Ok` only if the node answered.
pub async fn probe(
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<(), String> {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("static TLS config"))
        .map_err(|e| e.to_string())?;
    let attempt = async {
        let conn = ep
            .connect_with(config, addr, server_name)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
        s.write_all(&ping_frame(7))
            .await
            .map_err(|e| e.to_string())?;
        let mut r = conn.accept_uni().await.map_err(|e| e.to_string())?;
        let f = codec::read_frame(&mut r, 1 << 20)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no reply")?;
        match f.envelope().body {
            ArchivedBody::Pong(_) => Ok(()),
            _ => Err("not a pong".to_string()),
        }
    };
    let out = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    ep.close(0u32.into(), b"");
    out
}

/// A client that presents no certificate at all (and trusts any server, to get that far).
pub fn no_cert_config() -> quinn::ClientConfig {
    #[derive(Debug)]
    struct AnyServer(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = tls::provider();
    let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("static TLS config")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    c.alpn_protocols = vec![tls::ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(c).expect("static TLS config"),
    ))
}

/// What a hostile round did; `accepted` lists anything that should have been refused and was not.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostileReport {
    pub refused_handshakes: usize,
    pub garbage_datagrams: usize,
    pub bad_frames: usize,
    pub flood_attempts: usize,
    pub accepted: Vec<String>,
}

/// Runs every hostile case against the node at `target` (QUIC address). `ca_dir` is the
/// cluster CA (to issue an expired certificate), `admin` a valid client's material, `scratch` a
/// directory for throwaway certificates.
pub async fn attack(
    target: SocketAddr,
    ca_dir: &Path,
    admin: &TlsMaterial,
    scratch: &Path,
    seed: u64,
) -> Result<HostileReport> {
    let mut r = HostileReport::default();
    let refused =
        |what: &str, res: std::result::Result<(), String>, r: &mut HostileReport| match res {
            Ok(()) => r.accepted.push(format!("{what} was ACCEPTED")),
            Err(_) => r.refused_handshakes += 1,
        };
    refused(
        "no client certificate",
        probe(no_cert_config(), target, "n1").await,
        &mut r,
    );
    let foreign = scratch.join("foreign-ca");
    certs::init_ca(&foreign)?;
    certs::issue(
        &foreign,
        &Subject::Client {
            name: "mallory".into(),
            role: Role::Admin,
        },
        &scratch.join("foreign"),
        Validity::days_from_now(1),
    )?;
    let m = TlsMaterial::load_client(&scratch.join("foreign"))?;
    refused(
        "a foreign CA's certificate",
        probe(tls::client_config(&m)?, target, ANY_NODE).await,
        &mut r,
    );
    let now = time::OffsetDateTime::now_utc();
    certs::issue(
        ca_dir,
        &Subject::Client {
            name: "late".into(),
            role: Role::Admin,
        },
        &scratch.join("expired"),
        Validity {
            not_before: now - time::Duration::days(3),
            not_after: now - time::Duration::days(1),
        },
    )?;
    let m = TlsMaterial::load_client(&scratch.join("expired"))?;
    refused(
        "an expired certificate",
        probe(tls::client_config(&m)?, target, ANY_NODE).await,
        &mut r,
    );
    refused(
        "a server with another node's name",
        probe(tls::client_config(admin)?, target, "not-this-node").await,
        &mut r,
    );
    // A flood of certificate-less connection attempts, all at once.
    let flood: Vec<_> = (0..50)
        .map(|_| probe(no_cert_config(), target, "n1"))
        .collect();
    for res in futures::future::join_all(flood).await {
        r.flood_attempts += 1;
        if res.is_ok() {
            r.accepted
                .push("a flood connection without a certificate was ACCEPTED".into());
        }
    }
    // Garbage datagrams.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..2000 {
        let len = rng.random_range(1..1400);
        let junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let _ = udp.send_to(&junk, target).await;
        r.garbage_datagrams += 1;
    }
    // Malformed frames from an authenticated client, each on its own stream.
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().context("addr")?)?;
    let conn = ep
        .connect_with(tls::client_config(admin)?, target, ANY_NODE)?
        .await
        .context("authenticated client connection")?;
    let good = ping_frame(1);
    let mut oversized = good.clone();
    oversized[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut version = good.clone();
    version[4..6].copy_from_slice(&9u16.to_le_bytes());
    let mut malformed = good.clone();
    malformed[FRAME_HEADER_LEN..]
        .iter_mut()
        .for_each(|b| *b = 0xff);
    let truncated = good[..good.len() - 3].to_vec();
    for bad in [oversized, version, malformed, truncated] {
        let mut s = conn.open_uni().await?;
        let _ = s.write_all(&bad).await;
        let _ = s.finish();
        r.bad_frames += 1;
    }
    // The connection still works after its bad streams were reset.
    let mut s = conn.open_uni().await?;
    s.write_all(&ping_frame(2)).await?;
    let answered = async {
        let mut rs = conn.accept_uni().await.map_err(|e| e.to_string())?;
        let f = codec::read_frame(&mut rs, 1 << 20)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no reply")?;
        match f.envelope().body {
            ArchivedBody::Pong(_) => Ok(()),
            _ => Err("not a pong".to_string()),
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), answered).await {
        Ok(Ok(())) => {}
        other => r.accepted.push(format!(
            "the authenticated connection stopped working after bad frames: {other:?}"
        )),
    }
    conn.close(0u32.into(), b"");
    ep.close(0u32.into(), b"");
    Ok(r)
}
