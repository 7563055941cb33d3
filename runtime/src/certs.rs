//! The cluster CA and the certificates it issues to nodes and clients.
//!
//! Every peer on the QUIC port proves who it is with a certificate signed by the cluster CA.
//! The certificate is the whole identity: `CN` is the name, `OU` is the [`Role`], and a node's
//! name is repeated as a DNS SAN so that ordinary hostname verification (done by webpki on the
//! dialing side) checks it too. Nothing else (config, handshake payloads) is trusted to say who
//! a peer is.
//!
//! Files, all PEM except `data.key`:
//! - CA directory: `ca.pem`, `ca.key` (0600), `data.key` (0600).
//! - Node directory: `ca.pem`, `node.pem`, `node.key` (0600), `data.key` (0600).
//! - Client directory: `ca.pem`, `client.pem`, `client.key` (0600).
//!
//! `data.key` is not a TLS key: it is the cluster's data key file, which seals storage objects
//! at rest ([`crate::storage::keys`]). It lives with the CA because it is distributed the same
//! way, to nodes only (clients never read the storage).
//!
//! Keys are ECDSA P-256: small, fast to verify, and supported by the `ring` provider.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

pub use crate::config::DATA_KEY_FILE;

/// Common name of the cluster CA certificate.
pub const CA_COMMON_NAME: &str = "tidepool cluster CA";
/// Organization written into every certificate this module issues.
pub const ORGANIZATION: &str = "tidepool";
/// Default lifetime of a CA made by [`init_ca`], in days (10 years).
pub const CA_VALIDITY_DAYS: i64 = 3650;

/// How far `not_before` is set in the past, so that a peer whose clock is slightly behind
/// ours does not reject a freshly issued certificate as "not yet valid".
const CLOCK_SKEW: Duration = Duration::minutes(5);

/// Errors from making, writing, reading or interpreting certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Reading or writing a file failed; nothing is assumed about which of the files of one
    /// operation were written before the failure.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// rcgen could not generate a key, build a certificate, or load the CA key/certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate (or PEM file) could not be parsed, or lacks a field we require.
    #[error("certificate parse error: {0}")]
    Parse(String),
    /// A node or client name is not a DNS label (see [`valid_name`]).
    #[error(
        "invalid name {0:?}: must be 1-63 characters of [a-z0-9-], not starting or ending with '-'"
    )]
    InvalidName(String),
    /// The file exists and overwriting it would destroy something irreplaceable (a CA key).
    #[error("{} already exists; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    /// A role string (or certificate OU) is none of `node`, `admin`, `reader`.
    #[error("unknown role {0:?}: expected node, admin or reader")]
    UnknownRole(String),
    /// A client certificate was requested with a role only nodes may hold.
    #[error("client certificates must have role admin or reader, not {0}")]
    BadRole(Role),
    /// A node certificate's CN is not among its DNS SANs, so hostname verification and the
    /// name we report could disagree.
    #[error("node certificate CN {cn:?} is not one of its DNS SANs {sans:?}")]
    NameMismatch {
        /// The common name.
        cn: String,
        /// The DNS names in the SAN extension.
        sans: Vec<String>,
    },
    /// Making, reading or copying the data key file failed.
    #[error(transparent)]
    DataKey(#[from] crate::storage::KeyError),
    /// `not_after` is not later than `not_before`.
    #[error(
        "validity period is empty: not_before {not_before} is not before not_after {not_after}"
    )]
    InvalidValidity {
        /// Requested start.
        not_before: OffsetDateTime,
        /// Requested end.
        not_after: OffsetDateTime,
    },
}

/// What a certificate holder may do in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A cluster member: serves shards, takes part in the control plane.
    Node,
    /// An operator client: may change the cluster (drain, submit jobs, ...).
    Admin,
    /// A read-only client: status, results.
    Reader,
}

impl Role {
    /// The string used in the certificate OU and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Admin => "admin",
            Role::Reader => "reader",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "node" => Ok(Role::Node),
            "admin" => Ok(Role::Admin),
            "reader" => Ok(Role::Reader),
            other => Err(CertError::UnknownRole(other.to_owned())),
        }
    }
}

/// An authenticated peer: who the CA says the certificate holder is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Node name or client name (a DNS label).
    pub name: String,
    /// What the holder may do.
    pub role: Role,
    /// The certificate's serial number, lowercase hex (what `certs revoke` names).
    pub serial: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// Whom a certificate is issued to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A cluster node with this name.
    Node(String),
    /// A client; `role` must be [`Role::Admin`] or [`Role::Reader`].
    Client {
        /// Client name.
        name: String,
        /// Client role.
        role: Role,
    },
}

/// The period in which a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// Valid from five minutes ago (clock skew between peers) until `days` from now.
    pub fn days_from_now(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - CLOCK_SKEW,
            not_after: now + Duration::days(days),
        }
    }

    fn check(&self) -> Result<(), CertError> {
        if self.not_before < self.not_after {
            Ok(())
        } else {
            Err(CertError::InvalidValidity {
                not_before: self.not_before,
                not_after: self.not_after,
            })
        }
    }
}

/// Whether `name` can be a node or client name: a DNS label of 1..=63 characters from
/// `[a-z0-9-]`, not starting or ending with `-`. Names double as DNS SANs and as TLS server
/// names, so anything else would fail hostname verification later in a confusing way. For the
/// same reason a label rustls refuses as a server name is refused here too: all digits
/// (`"123"`) or a hex number (`"0xff"`), which could be mistaken for an IPv4 address.
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
        && rustls_pki_types::DnsName::try_from(name).is_ok()
}

/// Creates a new cluster CA in `out`: `ca.pem` and `ca.key` (mode 0600), valid for
/// [`CA_VALIDITY_DAYS`], and a fresh data key file `data.key` (mode 0600) unless one is there.
/// Refuses to overwrite an existing `ca.key`: losing the CA key means re-issuing every
/// certificate in the cluster.
pub fn init_ca(out: &Path) -> Result<(), CertError> {
    create_dir(out)?;
    let key_path = out.join("ca.key");
    if key_path.exists() {
        return Err(CertError::Exists(key_path));
    }

    let validity = Validity::days_from_now(CA_VALIDITY_DAYS);
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(CA_COMMON_NAME, None);
    // Path length 0: the CA signs end-entity certificates only, never intermediates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;

    // The key goes first, with create_new, so two concurrent `init_ca` calls cannot both win.
    write_new_secret(&key_path, key.serialize_pem().as_bytes())?;
    if let Err(e) = write_atomic(&out.join("ca.pem"), cert.pem().as_bytes(), false) {
        // A key without its certificate is useless and would block the retry.
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    ensure_data_key(out)?;
    Ok(())
}

/// Makes `dir/data.key` with one fresh key unless it exists. An existing one is kept: losing a
/// data key loses every object sealed with it.
fn ensure_data_key(dir: &Path) -> Result<PathBuf, CertError> {
    let path = dir.join(DATA_KEY_FILE);
    match crate::storage::keys::write_new_key_file(&path) {
        Ok(()) | Err(crate::storage::KeyError::Exists(_)) => Ok(path),
        Err(e) => Err(e.into()),
    }
}

/// Step 1 of a data key rotation: appends a fresh key to the CA directory's `data.key` (made
/// first if missing), leaving `current` alone. Returns the new key's id. The file must then be
/// copied to every node (see README, "Encryption at rest").
pub fn add_data_key(ca_dir: &Path) -> Result<crate::storage::KeyId, CertError> {
    let path = ensure_data_key(ca_dir)?;
    let text = read_to_string(&path)?;
    let (text, id) = crate::storage::keys::add_key_to_file_text(&text)?;
    crate::storage::keys::write_secret(&path, text.as_bytes(), false)?;
    Ok(id)
}

/// Issues a certificate for `subject`, signed by the CA in `ca_dir`, into `out` (created if
/// missing), together with a copy of the CA certificate and, for a node, of the data key file
/// (`data.key`, made in `ca_dir` first if that CA predates it). Returns the path of the new
/// certificate (`node.pem` or `client.pem`). Existing files of the same names are replaced
/// (re-issuing is how certificates are rotated).
pub fn issue(
    ca_dir: &Path,
    subject: &Subject,
    out: &Path,
    validity: Validity,
) -> Result<PathBuf, CertError> {
    validity.check()?;
    let (name, role) = match subject {
        Subject::Node(name) => (name.as_str(), Role::Node),
        Subject::Client {
            role: Role::Node, ..
        } => return Err(CertError::BadRole(Role::Node)),
        Subject::Client { name, role } => (name.as_str(), *role),
    };
    if !valid_name(name) {
        return Err(CertError::InvalidName(name.to_owned()));
    }

    let ca_pem = read_to_string(&ca_dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&read_to_string(&ca_dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = dn(name, Some(role));
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let stem = if role == Role::Node {
        // webpki checks the server name against DNS SANs only, never the CN.
        params.subject_alt_names = vec![SanType::DnsName(name.try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        "node"
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        "client"
    };

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;

    create_dir(out)?;
    let cert_path = out.join(format!("{stem}.pem"));
    write_atomic(
        &out.join(format!("{stem}.key")),
        key.serialize_pem().as_bytes(),
        true,
    )?;
    write_atomic(&cert_path, cert.pem().as_bytes(), false)?;
    // Written from memory rather than fs::copy: `out` may be `ca_dir` itself.
    write_atomic(&out.join("ca.pem"), ca_pem.as_bytes(), false)?;
    if role == Role::Node {
        let data_key = read_to_string(&ensure_data_key(ca_dir)?)?;
        // Checked before it is handed out: a node must not get a file it would refuse.
        crate::storage::KeyRing::parse(&data_key)?;
        crate::storage::keys::write_secret(&out.join(DATA_KEY_FILE), data_key.as_bytes(), false)?;
    }
    Ok(cert_path)
}

/// Reads the identity out of a DER certificate: the role from `OU`, the name from `CN`, and
/// for nodes a check that the name is also a DNS SAN. This does NOT check the signature or
/// validity period; callers must have verified the chain against the cluster CA first (the
/// TLS verifiers in `transport::tls` do), which is what makes the result trustworthy.
pub fn identity_from_der(cert: &[u8]) -> Result<Identity, CertError> {
    let (_, x509) = x509_parser::certificate::X509Certificate::from_der(cert)
        .map_err(|e| CertError::Parse(format!("not an X.509 certificate: {e}")))?;
    let subject = x509.subject();
    let name = single_attr(subject.iter_common_name(), "CN")?;
    let role: Role = single_attr(subject.iter_organizational_unit(), "OU")?.parse()?;
    if !valid_name(&name) {
        return Err(CertError::InvalidName(name));
    }
    if role == Role::Node {
        let sans: Vec<String> = x509
            .subject_alternative_name()
            .map_err(|e| CertError::Parse(format!("subject alternative name: {e}")))?
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(d) => Some((*d).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !sans.contains(&name) {
            return Err(CertError::NameMismatch { cn: name, sans });
        }
    }
    let serial = x509
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Identity { name, role, serial })
}

/// The DER bytes of the first certificate in a PEM file (`certs revoke --cert`).
pub fn first_cert_der(pem: &[u8]) -> Result<Vec<u8>, CertError> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|e| CertError::Parse(format!("not a PEM certificate: {e}")))?;
    Ok(parsed.contents)
}

/// The common name of a certificate, if it can be read; for log lines about certificates we
/// are refusing, where the full [`identity_from_der`] may be exactly what failed.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (_, x509) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    let cn = x509
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(cn)
}

/// Exactly one attribute of a kind, as UTF-8: two CNs or OUs would make the identity
/// ambiguous, so they are an error rather than "take the first".
fn single_attr<'a>(
    mut attrs: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>,
    what: &str,
) -> Result<String, CertError> {
    let first = attrs
        .next()
        .ok_or_else(|| CertError::Parse(format!("no {what} in subject")))?;
    if attrs.next().is_some() {
        return Err(CertError::Parse(format!("more than one {what} in subject")));
    }
    first
        .as_str()
        .map(str::to_owned)
        .map_err(|e| CertError::Parse(format!("{what} is not a string: {e}")))
}

fn dn(common_name: &str, role: Option<Role>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, ORGANIZATION);
    if let Some(role) = role {
        dn.push(DnType::OrganizationalUnitName, role.as_str());
    }
    dn
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_owned(),
        source,
    }
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(io_err(dir))
}

fn read_to_string(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn open_options(secret: bool) -> fs::OpenOptions {
    let mut opts = fs::OpenOptions::new();
    opts.write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Set at creation so the key is never readable by others, not even briefly.
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    opts
}

/// Writes a file that must not exist yet, readable by the owner only.
fn write_new_secret(path: &Path, contents: &[u8]) -> Result<(), CertError> {
    let mut file = open_options(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::Exists(path.to_owned())
            } else {
                CertError::Io {
                    path: path.to_owned(),
                    source: e,
                }
            }
        })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_err(path))
}

/// Writes through a temporary file and a rename, so a reader (a node restarting during
/// rotation) sees either the old file or the new one, never half of one; and a key file that
/// existed with looser permissions is replaced by one created 0600.
fn write_atomic(path: &Path, contents: &[u8], secret: bool) -> Result<(), CertError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    // A leftover from a crash may have other permissions; start from nothing.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(CertError::Io {
                path: tmp,
                source: e,
            })
        }
    }
    let mut file = open_options(secret)
        .create_new(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn read_der(path: &Path) -> Vec<u8> {
        let pem = fs::read(path).unwrap();
        let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        parsed.contents
    }

    #[test]
    fn node_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        let out = dir.path().join("n1");
        let cert = issue(
            &ca,
            &Subject::Node("n1".into()),
            &out,
            Validity::days_from_now(30),
        )
        .unwrap();
        assert_eq!(cert, out.join("node.pem"));
        assert!(out.join("node.key").exists());
        assert_eq!(
            fs::read(out.join("ca.pem")).unwrap(),
            fs::read(ca.join("ca.pem")).unwrap()
        );
        let id = identity_from_der(&read_der(&cert)).unwrap();
        let got = id;
        assert_eq!((got.name.as_str(), got.role), ("n1", Role::Node));
        assert!(!got.serial.is_empty());

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [ca.join("ca.key"), out.join("node.key")] {
                let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", key.display());
            }
        }
    }

    #[test]
    fn client_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        for role in [Role::Admin, Role::Reader] {
            let out = dir.path().join(role.as_str());
            let subject = Subject::Client {
                name: "ops".into(),
                role,
            };
            let cert = issue(dir.path(), &subject, &out, Validity::days_from_now(1)).unwrap();
            assert_eq!(cert, out.join("client.pem"));
            assert!(out.join("client.key").exists());
            let id = identity_from_der(&read_der(&cert)).unwrap();
            let got = id;
            assert_eq!((got.name.as_str(), got.role), ("ops", role));
            assert!(!got.serial.is_empty());
        }
        // Issuing into the CA directory itself must not clobber ca.pem.
        let ca_before = fs::read(dir.path().join("ca.pem")).unwrap();
        issue(
            dir.path(),
            &Subject::Node("n9".into()),
            dir.path(),
            Validity::days_from_now(1),
        )
        .unwrap();
        assert_eq!(fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
    }

    #[test]
    fn refuses_to_overwrite_ca_key() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let key = fs::read(dir.path().join("ca.key")).unwrap();
        assert!(matches!(init_ca(dir.path()), Err(CertError::Exists(p)) if p.ends_with("ca.key")));
        assert_eq!(fs::read(dir.path().join("ca.key")).unwrap(), key);
    }

    #[test]
    fn rejects_bad_subjects() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let out = dir.path().join("out");
        let v = Validity::days_from_now(1);
        for bad in ["", "N1", "-n1", "n1-", "n_1", "n.1", "ü", &"a".repeat(64)] {
            assert!(
                matches!(
                    issue(dir.path(), &Subject::Node(bad.into()), &out, v),
                    Err(CertError::InvalidName(_))
                ),
                "{bad:?}"
            );
        }
        let node_client = Subject::Client {
            name: "c".into(),
            role: Role::Node,
        };
        assert!(matches!(
            issue(dir.path(), &node_client, &out, v),
            Err(CertError::BadRole(_))
        ));
        let empty = Validity {
            not_before: v.not_after,
            not_after: v.not_before,
        };
        assert!(matches!(
            issue(dir.path(), &Subject::Node("n1".into()), &out, empty),
            Err(CertError::InvalidValidity { .. })
        ));
        assert!(!out.exists(), "nothing written on refusal");
    }

    #[test]
    fn valid_names() {
        for good in ["a", "n1", "node-7", "1n", "0xg", &"a".repeat(63)] {
            assert!(valid_name(good), "{good:?}");
        }
        for bad in [
            "",
            "A",
            "-",
            "a-",
            "-a",
            "a b",
            "a.b",
            "0",
            "123",
            "0xff",
            &"a".repeat(64),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn roles_parse_and_display() {
        for role in [Role::Node, Role::Admin, Role::Reader] {
            assert_eq!(role.to_string().parse::<Role>().unwrap(), role);
        }
        assert!(matches!(
            "root".parse::<Role>(),
            Err(CertError::UnknownRole(_))
        ));
    }

    #[test]
    fn identity_rejects_foreign_shapes() {
        // A node-role certificate whose CN is not a SAN (hand-made; `issue` never does this).
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["other".to_string()]).unwrap();
        params.distinguished_name = dn("n1", Some(Role::Node));
        let cert = params.self_signed(&key).unwrap();
        assert!(matches!(
            identity_from_der(cert.der()),
            Err(CertError::NameMismatch { .. })
        ));

        // Unknown OU.
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("n1", None);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "root");
        let cert = params.self_signed(&key).unwrap();
        assert!(matches!(
            identity_from_der(cert.der()),
            Err(CertError::UnknownRole(_))
        ));

        // No OU at all (the CA certificate itself).
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(CA_COMMON_NAME, None);
        let cert = params.self_signed(&key).unwrap();
        assert!(matches!(
            identity_from_der(cert.der()),
            Err(CertError::Parse(_))
        ));

        assert!(matches!(
            identity_from_der(b"garbage"),
            Err(CertError::Parse(_))
        ));
    }

    #[test]
    fn nodes_get_the_cas_data_key_and_clients_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        let text = fs::read_to_string(ca.join(DATA_KEY_FILE)).unwrap();
        crate::storage::KeyRing::parse(&text).unwrap();
        let (n1, c1) = (dir.path().join("n1"), dir.path().join("c1"));
        let days = Validity::days_from_now(30);
        issue(&ca, &Subject::Node("n1".into()), &n1, days).unwrap();
        let client = Subject::Client {
            name: "c1".into(),
            role: Role::Admin,
        };
        issue(&ca, &client, &c1, days).unwrap();
        assert_eq!(fs::read_to_string(n1.join(DATA_KEY_FILE)).unwrap(), text);
        assert!(!c1.join(DATA_KEY_FILE).exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [ca.join(DATA_KEY_FILE), n1.join(DATA_KEY_FILE)] {
                let mode = fs::metadata(&f).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", f.display());
            }
        }

        // Rotation step 1: a new key, the current one unchanged; the next issue copies it.
        let id = add_data_key(&ca).unwrap();
        assert_eq!(id, crate::storage::KeyId(2));
        issue(&ca, &Subject::Node("n1".into()), &n1, days).unwrap();
        let ring = crate::storage::KeyRing::load(&n1.join(DATA_KEY_FILE)).unwrap();
        use crate::storage::KeyProvider;
        assert_eq!(ring.current().id(), crate::storage::KeyId(1));
        assert!(ring.get(id).is_some());
    }

    #[test]
    fn a_ca_from_before_data_keys_gets_one_on_the_next_issue() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        fs::remove_file(ca.join(DATA_KEY_FILE)).unwrap();
        let n1 = dir.path().join("n1");
        issue(
            &ca,
            &Subject::Node("n1".into()),
            &n1,
            Validity::days_from_now(1),
        )
        .unwrap();
        assert_eq!(
            fs::read(ca.join(DATA_KEY_FILE)).unwrap(),
            fs::read(n1.join(DATA_KEY_FILE)).unwrap()
        );
        // init_ca keeps an existing data key (here, after the CA key is gone).
        fs::remove_file(ca.join("ca.key")).unwrap();
        let before = fs::read(ca.join(DATA_KEY_FILE)).unwrap();
        init_ca(&ca).unwrap();
        assert_eq!(fs::read(ca.join(DATA_KEY_FILE)).unwrap(), before);
    }
}
