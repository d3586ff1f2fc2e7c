//! Cluster credentials: a cluster CA and the certificate every node presents.
//!
//! `shoal cluster init --out DIR` writes them as PEM files that map one to one onto
//! Docker secrets; `shoal serve --credentials DIR` (default `/run/secrets`) reads them.
//! Nothing is ever shipped: without these files the daemon refuses to start.
//!
//! | file         | what                                   | needed by a node |
//! |--------------|----------------------------------------|------------------|
//! | `ca.pem`     | the cluster CA certificate             | yes              |
//! | `cert.pem`   | the node certificate, signed by the CA | yes              |
//! | `key.pem`    | the node certificate's private key     | yes (secret)     |
//! | `ca-key.pem` | the CA's private key                   | no: keep offline, it signs new certificates |
//!
//! Every node certificate names [`CLUSTER_SERVER_NAME`]; peers connect with that name,
//! so nodes are addressed by IP and still verified. Trust comes from the CA alone.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The name in every node certificate, and the server name clients ask for.
pub const CLUSTER_SERVER_NAME: &str = "node.shoal.cluster";

pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// How long generated certificates are valid.
const VALIDITY_DAYS: i64 = 10 * 365;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "no cluster credentials in {dir}: missing {missing}. Create them with `shoal cluster init --out DIR` and pass them as Docker secrets ({CA_FILE}, {CERT_FILE}, {KEY_FILE} under /run/secrets) or with --credentials DIR"
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
}

/// The PEM texts a node needs.
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Credentials {
    /// Reads `ca.pem`, `cert.pem` and `key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, CredentialsError> {
        let missing: Vec<&str> = [CA_FILE, CERT_FILE, KEY_FILE]
            .into_iter()
            .filter(|f| !dir.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            return Err(CredentialsError::Missing {
                dir: dir.to_path_buf(),
                missing: missing.join(", "),
            });
        }
        let read = |file: &str, what: &'static str, marker: &str| {
            let path = dir.join(file);
            let text = fs::read_to_string(&path).map_err(|source| CredentialsError::Read {
                path: path.clone(),
                source,
            })?;
            if !text.contains(marker) {
                return Err(CredentialsError::NotPem { path, what });
            }
            Ok(text)
        };
        Ok(Credentials {
            ca_pem: read(CA_FILE, "certificate", "-----BEGIN CERTIFICATE-----")?,
            cert_pem: read(CERT_FILE, "certificate", "-----BEGIN CERTIFICATE-----")?,
            key_pem: read(KEY_FILE, "private key", "PRIVATE KEY-----")?,
        })
    }
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    // A day of slack for clocks that are a little behind.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(VALIDITY_DAYS);
}

/// Creates a new cluster CA and a node certificate in `out` (created if needed).
/// Existing files are never overwritten.
pub fn init_cluster(out: &Path) -> Result<Vec<PathBuf>, CredentialsError> {
    let files = [CA_FILE, CERT_FILE, KEY_FILE, CA_KEY_FILE].map(|f| out.join(f));
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
    validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let node_key = KeyPair::generate()?;
    let mut node_params = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()])?;
    node_params
        .distinguished_name
        .push(DnType::CommonName, "Shoal node");
    node_params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    node_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut node_params);
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let node_cert = node_params.signed_by(&node_key, &issuer)?;

    let contents = [
        ca_cert.pem(),
        node_cert.pem(),
        node_key.serialize_pem(),
        ca_key.serialize_pem(),
    ];
    for (path, text) in files.iter().zip(contents) {
        let secret = path.ends_with(KEY_FILE) || path.ends_with(CA_KEY_FILE);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
            .map_err(|source| CredentialsError::Write {
                path: path.clone(),
                source,
            })?;
    }
    Ok(files.to_vec())
}
