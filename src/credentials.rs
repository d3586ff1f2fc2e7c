//! Cluster credentials: the cluster CA, and each node's own key and certificate.
//!
//! `shoal cluster init --out DIR` makes the CA. Each node then gets a certificate of its
//! own, naming it (common name) and binding its key, whose hash is its node id (see
//! [`crate::identity`]). Two ways, both read by `shoal serve --credentials DIR`
//! (default `/run/secrets`, where Docker puts secrets):
//!
//! | files in DIR                    | the node's key and certificate                     |
//! |---------------------------------|----------------------------------------------------|
//! | `ca.pem`, `cert.pem`, `key.pem` | issued offline by `shoal cluster add-node NAME`    |
//! | `ca.pem`, `ca-key.pem`          | the node makes its key on first start (`STATE/identity/key.pem`, 0600, never leaves it) and signs its certificate itself, for `--node-name` |
//! | `ca.pem`, `join-token`          | the node makes its key the same way and enrolls with the signer ([`crate::enroll`]), which returns a short-lived certificate (kept as `STATE/identity/cert.pem`) |
//!
//! The second and third are for a Swarm service, whose secrets are the same on every
//! node: each node has its own key and id either way, but with the second every node
//! holds the CA key (see the README's trust section), with the third only the signer
//! does. Nothing is ever shipped: without these files the daemon refuses to start.
//!
//! The join token is a random secret that `shoal cluster init` makes beside the CA (and
//! `shoal cluster rotate-token` replaces); the CA directory keeps it and its BLAKE3
//! hash, which is all the signer reads.
//!
//! Every node certificate also names [`CLUSTER_SERVER_NAME`]; peers connect with that
//! name, so nodes are addressed by IP and still verified. The certificate of the shared
//! kind older releases issued to every node is refused.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};

use crate::identity::{IdentityError, Proven};

/// The name in every node certificate, and the server name clients ask for.
pub const CLUSTER_SERVER_NAME: &str = "node.shoal.cluster";
/// The name in the signer's certificate, and the server name enrolling nodes ask for.
pub const SIGNER_SERVER_NAME: &str = "signer.shoal.cluster";

pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The join token, in the CA directory and in an enrolling node's credentials.
pub const JOIN_TOKEN_FILE: &str = "join-token";
/// The join token's BLAKE3 hash (hex), in the CA directory: what the signer compares.
pub const JOIN_TOKEN_HASH_FILE: &str = "join-token.blake3";
/// Where an enrolled node keeps the certificate the signer issued, under its state
/// directory.
pub const NODE_CERT_FILE: &str = "identity/cert.pem";
/// Where a node keeps the key it made itself, under its state directory.
pub const NODE_KEY_FILE: &str = "identity/key.pem";
/// Where `add-node` keeps a copy of each certificate it issued, under the CA directory
/// (so that `revoke NAME` can find the node's id).
pub const ISSUED_DIR: &str = "nodes";

/// How long the CA is valid.
const CA_VALIDITY_DAYS: i64 = 10 * 365;
/// How long a certificate a node signs itself (at every start) is valid.
const SELF_SIGNED_DAYS: i64 = 365;
/// Default lifetime of an offline-issued node certificate.
pub const DEFAULT_NODE_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "no cluster credentials in {dir}: expected {CA_FILE} with either {CERT_FILE} and {KEY_FILE} (from `shoal cluster add-node NAME`) or {CA_KEY_FILE} (the node signs its own certificate); missing {missing}. Create a cluster with `shoal cluster init --out DIR` and pass the files as Docker secrets (under /run/secrets) or with --credentials DIR"
    )]
    Missing { dir: PathBuf, missing: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a PEM {what}")]
    NotPem { path: PathBuf, what: &'static str },
    #[error("{path} already exists; refusing to overwrite cluster credentials")]
    Exists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Identity {
        path: PathBuf,
        source: IdentityError,
    },
    #[error(
        "invalid node name {0:?}: 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit (set it with --node-name or SHOAL_NODE_NAME)"
    )]
    NodeName(String),
    #[error("{cert} is for node {cert_name}, but --node-name says {wanted}")]
    NameMismatch {
        cert: PathBuf,
        cert_name: String,
        wanted: String,
    },
    #[error("{path} is readable by other users (mode {mode:o}); make it 0600")]
    KeyExposed { path: PathBuf, mode: u32 },
    #[error(
        "this node enrolls with a signer ({dir} holds {JOIN_TOKEN_FILE}) and has no valid certificate from it yet in {cert}: start `shoal serve --signer HOST:PORT` once"
    )]
    NotEnrolled { dir: PathBuf, cert: PathBuf },
    #[error("{path} holds no join token (expected one line, SHOAL-TOKEN-1- and 64 hex digits)")]
    BadToken { path: PathBuf },
}

/// Where a node's certificate comes from (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `cert.pem` and `key.pem`, issued offline.
    Issued,
    /// `ca-key.pem`: the node signs its own.
    SelfSigned,
    /// `join-token`: the signer issues it.
    Enrolled,
}

/// The PEM texts a node needs, and what its own certificate proves.
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub identity: Proven,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn read_pem(path: &Path, what: &'static str, marker: &str) -> Result<String, CredentialsError> {
    let text = fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !text.contains(marker) {
        return Err(CredentialsError::NotPem {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(text)
}

fn read_cert(path: &Path) -> Result<String, CredentialsError> {
    read_pem(path, "certificate", "-----BEGIN CERTIFICATE-----")
}

/// A private key's PEM text; a key that the group or others may read is used, with a
/// warning (Docker secrets are mounted 0444 unless the stack says otherwise).
fn read_key(path: &Path) -> Result<String, CredentialsError> {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            "{} is readable by other users (mode {:o}): whoever can read it can pose as its owner; make it 0600 (as a Docker secret: `mode: 0400` under the service's secrets)",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    read_pem(path, "private key", "PRIVATE KEY-----")
}

/// What the first certificate in PEM `text` (read from `path`) proves.
pub fn prove_pem(path: &Path, text: &str) -> Result<Proven, CredentialsError> {
    let identity = |source| CredentialsError::Identity {
        path: path.to_path_buf(),
        source,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes())
        .map_err(|e| identity(IdentityError::Unparsable(e.to_string())))?;
    Proven::from_der(&pem.contents).map_err(identity)
}

impl Credentials {
    /// This node's credentials from `dir` (see the module doc for the two layouts);
    /// `state_dir` holds the key a node makes itself, `node_name` names it (required
    /// then, checked against the certificate otherwise).
    pub fn load(
        dir: &Path,
        state_dir: &Path,
        node_name: Option<&str>,
    ) -> Result<Self, CredentialsError> {
        let has = |file: &str| dir.join(file).is_file();
        let missing = |files: &[&str]| CredentialsError::Missing {
            dir: dir.to_path_buf(),
            missing: files
                .iter()
                .filter(|f| !has(f))
                .copied()
                .collect::<Vec<_>>()
                .join(", "),
        };
        if !has(CA_FILE) {
            return Err(missing(&[CA_FILE, CERT_FILE, KEY_FILE]));
        }
        let ca_pem = read_cert(&dir.join(CA_FILE))?;
        if has(CERT_FILE) && has(KEY_FILE) {
            let cert_path = dir.join(CERT_FILE);
            let cert_pem = read_cert(&cert_path)?;
            let identity = prove_pem(&cert_path, &cert_pem)?;
            if let Some(wanted) = node_name.filter(|n| *n != identity.name) {
                return Err(CredentialsError::NameMismatch {
                    cert: cert_path,
                    cert_name: identity.name,
                    wanted: wanted.to_string(),
                });
            }
            return Ok(Credentials {
                ca_pem,
                cert_pem,
                key_pem: read_key(&dir.join(KEY_FILE))?,
                identity,
            });
        }
        if !has(CA_KEY_FILE) {
            if has(JOIN_TOKEN_FILE) {
                return Self::enrolled(dir, state_dir, ca_pem);
            }
            return Err(missing(&[CERT_FILE, KEY_FILE]));
        }
        let name = match node_name {
            Some(name) => name.to_string(),
            None => default_node_name()?,
        };
        let ca = Authority::load(dir)?;
        let key = own_key(&state_dir.join(NODE_KEY_FILE))?;
        let cert_pem = ca.sign_node(&name, &key, SELF_SIGNED_DAYS)?;
        Ok(Credentials {
            identity: prove_pem(&dir.join(CA_KEY_FILE), &cert_pem)?,
            ca_pem,
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }
}

impl Credentials {
    /// Which layout `dir` holds; `None` if it has no `ca.pem`.
    pub fn source(dir: &Path) -> Option<Source> {
        let has = |file: &str| dir.join(file).is_file();
        if !has(CA_FILE) {
            return None;
        }
        Some(if has(CERT_FILE) && has(KEY_FILE) {
            Source::Issued
        } else if has(CA_KEY_FILE) || !has(JOIN_TOKEN_FILE) {
            Source::SelfSigned
        } else {
            Source::Enrolled
        })
    }

    /// An enrolled node's credentials as it last received them (for commands that do
    /// not enroll, such as `repair`): the key and the certificate in `state_dir`, if
    /// that certificate is still valid.
    fn enrolled(dir: &Path, state_dir: &Path, ca_pem: String) -> Result<Self, CredentialsError> {
        let cert_path = state_dir.join(NODE_CERT_FILE);
        let not_enrolled = || CredentialsError::NotEnrolled {
            dir: dir.to_path_buf(),
            cert: cert_path.clone(),
        };
        if !cert_path.is_file() {
            return Err(not_enrolled());
        }
        let key = own_key(&state_dir.join(NODE_KEY_FILE))?;
        let cert_pem = read_cert(&cert_path)?;
        let identity = prove_pem(&cert_path, &cert_pem)?;
        let own_id = crate::identity::node_id_of_key(&key.subject_public_key_info());
        if identity.node_id != own_id || identity.not_after <= std::time::SystemTime::now() {
            return Err(not_enrolled());
        }
        Ok(Credentials {
            ca_pem,
            cert_pem,
            key_pem: key.serialize_pem(),
            identity,
        })
    }
}

/// A new join token: `SHOAL-TOKEN-1-` and 32 random bytes in hex.
pub fn new_token() -> Result<String, CredentialsError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| CredentialsError::Write {
        path: PathBuf::from("(random source)"),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(format!("{TOKEN_PREFIX}{}", crate::ids::to_hex(&secret)))
}

const TOKEN_PREFIX: &str = "SHOAL-TOKEN-1-";

/// Reads the join token in the file at `path` (surrounding white space ignored).
pub fn read_token(path: &Path) -> Result<String, CredentialsError> {
    let bad = || CredentialsError::BadToken {
        path: path.to_path_buf(),
    };
    let len = fs::metadata(path)
        .map_err(|source| CredentialsError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if len > 1024 {
        return Err(bad());
    }
    let text = fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    let hex = token.strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok(token.to_string())
}

/// The hash of `token` the CA directory keeps.
pub fn token_hash(token: &str) -> blake3::Hash {
    blake3::hash(token.as_bytes())
}

/// Writes a new join token and its hash into `state_dir` (the CA directory, or the
/// signer's `--state`), replacing the old ones, each file atomically; the hash last, so
/// the signer never accepts a token that is not on disk yet. Returns the token file.
pub fn rotate_token(ca_dir: &Path, state_dir: &Path) -> Result<PathBuf, CredentialsError> {
    // The CA must be there: a token for no cluster is a mistake.
    Authority::load(ca_dir)?;
    fs::create_dir_all(state_dir).map_err(|source| CredentialsError::Write {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let token = new_token()?;
    let token_path = state_dir.join(JOIN_TOKEN_FILE);
    replace_file(&token_path, &format!("{token}\n"), true)?;
    replace_file(
        &state_dir.join(JOIN_TOKEN_HASH_FILE),
        &format!("{}\n", token_hash(&token).to_hex()),
        false,
    )?;
    Ok(token_path)
}

/// Writes `text` to a temporary file beside `path` and renames it over `path`.
pub fn replace_file(path: &Path, text: &str, secret: bool) -> Result<(), CredentialsError> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    let _ = fs::remove_file(&temp);
    write_new(&temp, text, secret)?;
    fs::rename(&temp, path).map_err(|source| CredentialsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The host's name, as the node name when none is given.
pub fn default_node_name() -> Result<String, CredentialsError> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    if crate::identity::is_node_name(&name) {
        Ok(name)
    } else {
        Err(CredentialsError::NodeName(name))
    }
}

/// The key at `path`, made (mode 0600) if there is none yet.
pub fn own_key(path: &Path) -> Result<KeyPair, CredentialsError> {
    if path.exists() {
        let mode = fs::metadata(path)
            .map_err(|source| CredentialsError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CredentialsError::KeyExposed {
                path: path.to_path_buf(),
                mode: mode & 0o777,
            });
        }
        return Ok(KeyPair::from_pem(&read_key(path)?)?);
    }
    let key = KeyPair::generate()?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|source| CredentialsError::Write {
            path: parent.to_path_buf(),
            source,
        })?;
        fs::set_permissions(parent, fs::Permissions::from_mode(0o700)).map_err(|source| {
            CredentialsError::Write {
                path: parent.to_path_buf(),
                source,
            }
        })?;
    }
    write_new(path, &key.serialize_pem(), true)?;
    tracing::info!(key = %path.display(), node = %crate::identity::node_id_of_key(&key.subject_public_key_info()), "made this node's key");
    Ok(key)
}

/// Writes a file that must not exist yet, durably (`secret`: mode 0600).
fn write_new(path: &Path, text: &str, secret: bool) -> Result<(), CredentialsError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => CredentialsError::Exists {
                path: path.to_path_buf(),
            },
            _ => CredentialsError::Write {
                path: path.to_path_buf(),
                source,
            },
        })
}

/// What every node certificate says besides its validity.
fn node_params(name: &str) -> Result<CertificateParams, CredentialsError> {
    if !crate::identity::is_node_name(name) {
        return Err(CredentialsError::NodeName(name.to_string()));
    }
    let mut params = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// How far back a short-lived certificate is valid from, for clocks a little behind.
const CLOCK_SLACK: time::Duration = time::Duration::minutes(10);

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // A day of slack for clocks that are a little behind.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
}

/// The cluster CA: its certificate and its signing key.
pub struct Authority {
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA key again, for what is signed outside certificates (revocation lists).
    pub key: KeyPair,
}

impl Authority {
    /// Reads `ca.pem` and `ca-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, CredentialsError> {
        let ca_pem = read_cert(&dir.join(CA_FILE))?;
        let key_pem = read_key(&dir.join(CA_KEY_FILE))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&key_pem)?)?;
        Ok(Authority {
            ca_pem,
            issuer,
            key: KeyPair::from_pem(&key_pem)?,
        })
    }

    /// A certificate for node `name` with `key`, valid for `days`.
    pub fn sign_node(
        &self,
        name: &str,
        key: &impl PublicKeyData,
        days: i64,
    ) -> Result<String, CredentialsError> {
        let mut params = node_params(name)?;
        validity(&mut params, days);
        Ok(params.signed_by(key, &self.issuer)?.pem())
    }

    /// A short-lived certificate for node `name` with `key` (the signer's): valid from
    /// [`CLOCK_SLACK`] ago until `lifetime` from now, to the second.
    pub fn sign_node_for(
        &self,
        name: &str,
        key: &impl PublicKeyData,
        lifetime: std::time::Duration,
    ) -> Result<String, CredentialsError> {
        let mut params = node_params(name)?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SLACK;
        params.not_after = now + lifetime;
        Ok(params.signed_by(key, &self.issuer)?.pem())
    }

    /// The signer's own certificate for `key`: it names [`SIGNER_SERVER_NAME`] only (no
    /// node name, so it can never pass for a node, and no node's certificate can pass
    /// for the signer), valid for [`SELF_SIGNED_DAYS`].
    pub fn sign_signer(&self, key: &impl PublicKeyData) -> Result<String, CredentialsError> {
        let mut params = CertificateParams::new(vec![SIGNER_SERVER_NAME.to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Shoal signer");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, SELF_SIGNED_DAYS);
        Ok(params.signed_by(key, &self.issuer)?.pem())
    }
}

/// Creates a new cluster CA in `out` (created if needed): `ca.pem`, `ca-key.pem`
/// (0600), a join token (`join-token`, 0600) and its hash. Existing files are never
/// overwritten.
pub fn init_cluster(out: &Path) -> Result<Vec<PathBuf>, CredentialsError> {
    let files = [CA_FILE, CA_KEY_FILE, JOIN_TOKEN_FILE, JOIN_TOKEN_HASH_FILE].map(|f| out.join(f));
    if let Some(existing) = files.iter().find(|p| p.exists()) {
        return Err(CredentialsError::Exists {
            path: existing.clone(),
        });
    }
    fs::create_dir_all(out).map_err(|source| CredentialsError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Shoal cluster CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params, CA_VALIDITY_DAYS);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    // The key first: a directory with a CA certificate but no key would be useless.
    write_new(&files[1], &ca_key.serialize_pem(), true)?;
    write_new(&files[0], &ca_cert.pem(), false)?;
    let token = new_token()?;
    write_new(&files[2], &format!("{token}\n"), true)?;
    write_new(
        &files[3],
        &format!("{}\n", token_hash(&token).to_hex()),
        false,
    )?;
    Ok(files.to_vec())
}

/// Issues node `name` its own key and certificate, offline, with the CA in `ca_dir`:
/// writes `ca.pem`, `cert.pem` and `key.pem` (0600) into `out` (never overwriting),
/// and a copy of the certificate as `ca_dir/nodes/NAME.pem`.
pub fn add_node(
    ca_dir: &Path,
    name: &str,
    out: &Path,
    days: i64,
) -> Result<Proven, CredentialsError> {
    let ca = Authority::load(ca_dir)?;
    let record = ca_dir.join(ISSUED_DIR).join(format!("{name}.pem"));
    let files = [CA_FILE, CERT_FILE, KEY_FILE].map(|f| out.join(f));
    if let Some(existing) = files.iter().chain([&record]).find(|p| p.exists()) {
        return Err(CredentialsError::Exists {
            path: existing.clone(),
        });
    }
    let key = KeyPair::generate()?;
    let cert_pem = ca.sign_node(name, &key, days)?;
    let proven = prove_pem(&files[1], &cert_pem)?;
    for dir in [out, &ca_dir.join(ISSUED_DIR)] {
        fs::create_dir_all(dir).map_err(|source| CredentialsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    write_new(&files[2], &key.serialize_pem(), true)?;
    write_new(&files[1], &cert_pem, false)?;
    write_new(&files[0], &ca.ca_pem, false)?;
    write_new(&record, &cert_pem, false)?;
    Ok(proven)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_signing_its_own_certificate_keeps_its_key_and_id() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_cluster(&ca).unwrap();
        let state = dir.path().join("state");
        let first = Credentials::load(&ca, &state, Some("alpha")).unwrap();
        let again = Credentials::load(&ca, &state, Some("alpha")).unwrap();
        assert_eq!(first.identity.node_id, again.identity.node_id);
        assert_eq!(first.identity.name, "alpha");
        let key = state.join(NODE_KEY_FILE);
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let other = Credentials::load(&ca, &dir.path().join("other"), Some("alpha")).unwrap();
        assert_ne!(first.identity.node_id, other.identity.node_id);
    }

    #[test]
    fn offline_issued_credentials_name_their_node() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_cluster(&ca).unwrap();
        let out = dir.path().join("beta");
        let proven = add_node(&ca, "beta", &out, 30).unwrap();
        let loaded = Credentials::load(&out, &dir.path().join("state"), None).unwrap();
        assert_eq!(loaded.identity, proven);
        assert!(ca.join("nodes/beta.pem").is_file());
        assert!(matches!(
            Credentials::load(&out, &dir.path().join("state"), Some("gamma")),
            Err(CredentialsError::NameMismatch { .. })
        ));
        assert!(matches!(
            add_node(&ca, "beta", &dir.path().join("again"), 30),
            Err(CredentialsError::Exists { .. })
        ));
        assert!(matches!(
            add_node(&ca, "-x", &dir.path().join("bad"), 30),
            Err(CredentialsError::NodeName(_))
        ));
    }
}
