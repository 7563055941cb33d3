//! Mutual TLS for the QUIC endpoint: who may talk to this node, and how we check whom we dial.
//!
//! Both directions verify the peer's chain against the cluster CA (webpki: signature, validity
//! period, EKU), then read the peer's [`Identity`] out of its certificate:
//! - As a server we require a client certificate and hand the identity to a [`PeerPolicy`]
//!   (e.g. "is this node a member?"). A refusal fails the handshake itself, so a refused peer
//!   never gets a connection to send frames on.
//! - As a client we dial a node *by name*; the server must present a node certificate for
//!   exactly that name. This is what stops a valid certificate for `n3` from answering for `n2`.
//!
//! Only TLS 1.3 (QUIC requires it) and only the `ring` provider, passed explicitly everywhere
//! so that no process-wide default (which another crate could install as aws-lc) is consulted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::certs::{self, CertError, Identity, Role};

/// ALPN protocol id of the Tidepool wire protocol; bump the version on incompatible changes so
/// that mismatched peers fail at the handshake instead of on the first frame.
pub const ALPN: &[u8] = b"tidepool/1";

/// Server name to dial when any node of the cluster will do (a CLI given only `--connect
/// ADDR`): the chain, expiry and node role are still verified, and the node's real name is then
/// taken from its certificate. Node-to-node dials always use the peer's real name.
pub const ANY_NODE: &str = "any-node.tidepool.invalid";

/// Errors from loading TLS material, building configs, or reading a peer's identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid PEM, or holds no item of the kind expected (certificate or key).
    #[error("{}: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A certificate could not be interpreted as a Tidepool identity.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The material in a directory is for the wrong kind of holder (e.g. a client certificate
    /// where a node's was expected, or a server config built from a client certificate).
    #[error("certificate is for {found}, expected role {expected}")]
    WrongRole {
        /// What the caller needed.
        expected: &'static str,
        /// What the certificate says.
        found: Identity,
    },
    /// rustls refused the configuration (e.g. key does not match certificate, bad CA cert).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A webpki verifier could not be built (e.g. no CA certificates).
    #[error("certificate verifier: {0}")]
    Verifier(#[from] VerifierBuilderError),
    /// The rustls config cannot be used for QUIC (no TLS 1.3 AES-128-GCM suite).
    #[error("QUIC crypto: {0}")]
    Quic(#[from] NoInitialCipherSuite),
    /// The connection has no peer certificate (handshake incomplete, or peer sent none).
    #[error("peer presented no certificate")]
    NoIdentity,
}

/// Certificates and key of this process, plus the cluster CA it trusts.
pub struct TlsMaterial {
    ca_roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Who we are, as our own certificate says.
    pub identity: Identity,
}

impl std::fmt::Debug for TlsMaterial {
    // Hand-written so that the private key can never end up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("identity", &self.identity)
            .field("ca_roots", &self.ca_roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Loads a node's material from `dir`: `ca.pem`, `node.pem`, `node.key`. The certificate
    /// must have role node.
    pub fn load_node(dir: &Path) -> Result<Self, TlsError> {
        let m = Self::load(dir, "node")?;
        if m.identity.role != Role::Node {
            return Err(TlsError::WrongRole {
                expected: "node",
                found: m.identity,
            });
        }
        if let Some(not_after) = m.chain.first().and_then(|c| not_after_unix(c)) {
            metrics::gauge!(crate::metrics::CERT_EXPIRY).set(not_after as f64);
        }
        Ok(m)
    }

    /// Loads a CLI client's material from `dir`: `ca.pem`, `client.pem`, `client.key`. The
    /// certificate must have role admin or reader.
    pub fn load_client(dir: &Path) -> Result<Self, TlsError> {
        let m = Self::load(dir, "client")?;
        if m.identity.role == Role::Node {
            return Err(TlsError::WrongRole {
                expected: "admin or reader",
                found: m.identity,
            });
        }
        Ok(m)
    }

    fn load(dir: &Path, stem: &str) -> Result<Self, TlsError> {
        let ca_path = dir.join("ca.pem");
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&ca_path)? {
            roots.add(ca)?;
        }
        let cert_path = dir.join(format!("{stem}.pem"));
        let chain = read_certs(&cert_path)?;
        let key_path = dir.join(format!("{stem}.key"));
        let key = PrivateKeyDer::from_pem_slice(&read(&key_path)?).map_err(|e| TlsError::Pem {
            path: key_path,
            reason: e.to_string(),
        })?;
        // read_certs never returns an empty list.
        let end_entity = chain.first().ok_or(TlsError::NoIdentity)?;
        let identity = certs::identity_from_der(end_entity)?;
        warn_if_outside_validity(end_entity, &cert_path);
        Ok(TlsMaterial {
            ca_roots: Arc::new(roots),
            chain,
            key,
            identity,
        })
    }
}

/// Decides, after the chain is verified, whether an authenticated identity may connect to this node.
pub trait PeerPolicy: Send + Sync + std::fmt::Debug + 'static {
    /// `Ok(())` admits the peer; `Err(reason)` fails its handshake, and the reason is logged.
    fn admit(&self, peer: &Identity) -> Result<(), String>;
}

/// The crypto provider for every TLS object in Tidepool: `ring`, always passed explicitly.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QUIC transport settings shared by the server and client side.
///
/// - keep-alive 1 s and idle timeout 10 s: a silent peer is declared gone within 10 s, while an
///   idle but healthy link never times out (keep-alives are ten times more frequent).
/// - stream window 16 MiB, connection window 64 MiB, send window 64 MiB: a 64 MiB frame (the
///   frame cap) flows without stalling on window updates every few KiB over a fast link.
/// - 1024 concurrent streams each way: one stream per request, many requests in flight.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = base_transport_config(1024);
    t.max_concurrent_bidi_streams(VarInt::from_u32(1024));
    Arc::new(t)
}

/// [`transport_config`] with another cap on the peer's concurrent streams.
/// Tidepool itself uses only unidirectional streams, so a node's endpoint grants a peer none
/// of the other kind (data on streams nobody reads would only sit in buffers).
pub fn transport_config_with(max_streams: u32) -> Arc<quinn::TransportConfig> {
    Arc::new(base_transport_config(max_streams))
}

fn base_transport_config(max_streams: u32) -> quinn::TransportConfig {
    const MIB: u32 = 1 << 20;
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(10_000))))
        .stream_receive_window(VarInt::from_u32(16 * MIB))
        .receive_window(VarInt::from_u32(64 * MIB))
        .send_window(64 * u64::from(MIB))
        .max_concurrent_uni_streams(VarInt::from_u32(max_streams))
        .max_concurrent_bidi_streams(VarInt::from_u32(0));
    t
}

/// Server side of the QUIC endpoint: presents our node certificate, requires a client
/// certificate from the cluster CA, and lets `policy` decide whether that identity may connect.
pub fn server_config(
    m: &TlsMaterial,
    policy: Arc<dyn PeerPolicy>,
) -> Result<quinn::ServerConfig, TlsError> {
    // Only nodes serve; a client certificate lacks serverAuth and peers would refuse it anyway,
    // so fail here with a clear message instead of on every handshake.
    if m.identity.role != Role::Node {
        return Err(TlsError::WrongRole {
            expected: "node",
            found: m.identity.clone(),
        });
    }
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(m.ca_roots.clone(), provider.clone())
        .build()?;
    let verifier = Arc::new(PolicyClientVerifier { inner, policy });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(transport_config());
    Ok(config)
}

/// Client side: presents our certificate (node or CLI client) and accepts only a server that
/// holds a node certificate for the name passed to `quinn::Endpoint::connect`.
pub fn client_config(m: &TlsMaterial) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(m.ca_roots.clone(), provider.clone())
        .build()?;
    let verifier = Arc::new(NodeServerVerifier { inner });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(transport_config());
    Ok(config)
}

/// The verified identity of the other end of an established connection.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, TlsError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(TlsError::NoIdentity)?;
    let end_entity = certs.first().ok_or(TlsError::NoIdentity)?;
    Ok(certs::identity_from_der(end_entity)?)
}

/// Webpki client verification, then identity parsing and the admission policy. Every failure
/// is a certificate error, so rustls aborts the handshake with an alert.
#[derive(Debug)]
struct PolicyClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: Arc<dyn PeerPolicy>,
}

impl ClientCertVerifier for PolicyClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            refuse("client", end_entity, &e.to_string());
            return Err(e);
        }
        let identity = certs::identity_from_der(end_entity).map_err(|e| {
            refuse("client", end_entity, &e.to_string());
            application_failure()
        })?;
        self.policy.admit(&identity).map_err(|reason| {
            tracing::warn!(peer = %identity.name, role = %identity.role, %reason, "refused TLS client: not admitted");
            application_failure()
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Webpki server verification (chain, expiry, serverAuth EKU, SAN = server name), then a check
/// that the certificate is a node certificate whose name is exactly the name we dialed.
#[derive(Debug)]
struct NodeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // For ANY_NODE, verify against the name the certificate itself claims (its SAN); the
        // role check below still insists on a node certificate.
        let claimed;
        let server_name = match server_name {
            ServerName::DnsName(n) if n.as_ref() == ANY_NODE => {
                let id = certs::identity_from_der(end_entity).map_err(|e| {
                    refuse("server", end_entity, &e.to_string());
                    application_failure()
                })?;
                claimed = ServerName::try_from(id.name).map_err(|_| application_failure())?;
                &claimed
            }
            other => other,
        };
        if let Err(e) = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            refuse(
                "server",
                end_entity,
                &format!("dialing {}: {e}", server_name.to_str()),
            );
            return Err(e);
        }
        let identity = certs::identity_from_der(end_entity).map_err(|e| {
            refuse("server", end_entity, &e.to_string());
            application_failure()
        })?;
        let expected = match server_name {
            ServerName::DnsName(name) => name.as_ref(),
            // Nodes are dialed by name; an IP here is a caller bug, not something to accept.
            _ => "",
        };
        if identity.role != Role::Node || identity.name != expected {
            tracing::warn!(
                peer = %identity.name, role = %identity.role, expected = %server_name.to_str(),
                "refused TLS server: not the node we dialed"
            );
            return Err(application_failure());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

fn application_failure() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// Logs a refused certificate with whatever name it claims: the name is unverified, but it is
/// what an operator needs to find the misconfigured peer.
fn refuse(side: &str, cert: &CertificateDer<'_>, reason: &str) {
    let presented = certs::common_name(cert).unwrap_or_else(|| "<unreadable>".to_owned());
    tracing::warn!(%side, %presented, %reason, "refused TLS peer certificate");
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// All certificates in a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: "no certificate".to_owned(),
        });
    }
    Ok(certs)
}

/// The certificate's not-after time in Unix seconds (exported as
/// `tidepool_cert_expiry_timestamp_seconds` each time a node loads its material).
pub fn not_after_unix(cert: &CertificateDer<'_>) -> Option<i64> {
    use x509_parser::prelude::FromDer;
    let (_, x509) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    Some(x509.validity().not_after.timestamp())
}

/// Our own expired certificate is not an error at load time (peers will refuse it, and the
/// operator may be about to rotate), but it should not be a mystery either.
fn warn_if_outside_validity(cert: &CertificateDer<'_>, path: &Path) {
    use x509_parser::prelude::FromDer;
    if let Ok((_, x509)) = x509_parser::certificate::X509Certificate::from_der(cert) {
        if !x509.validity().is_valid() {
            tracing::warn!(
                path = %path.display(),
                not_before = %x509.validity().not_before,
                not_after = %x509.validity().not_after,
                "own certificate is outside its validity period; peers will refuse it"
            );
        }
    }
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
