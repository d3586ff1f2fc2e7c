//! Revocation: the CA-signed list of nodes that are members no more.
//!
//! `shoal cluster revoke NODE --ca DIR` adds a node (by name, or by its 16-hex-digit
//! id) to `DIR/revocations.txt`, raises the list's serial and signs it with the CA key.
//! Members read the list from their credentials directory at start and again every
//! heartbeat, get it from the signer (enrolled nodes ask every heartbeat) and from each
//! other (a member that adopts a newer list passes it to its connected peers, and
//! offers its list on every connection it opens); a list is believed only with a valid
//! CA signature and only if its serial is higher than the one held, so a copy can
//! travel any way without being trusted for how it came. The newest a node holds is
//! kept in its state directory ([`HELD_FILE`]), so a restart does not forget it. A revoked node's
//! connections are closed and every later request or handshake of it is refused; no
//! other node is re-keyed.
//!
//! The format is text, one item a line:
//!
//! ```text
//! shoal-revocations 1
//! serial 3
//! id 0f1e2d3c4b5a6978
//! name node-c
//! signature 3045022100...      (hex DER ECDSA P-256/SHA-256 over every byte above)
//! ```
//!
//! A node is revoked if its certificate's key has a listed id, or its certificate's
//! name is listed (a name the CA issued to it; to shut out a re-enrolled key too, also
//! rotate the join credentials).

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::SigningKey;

use crate::credentials::{Authority, CredentialsError, ISSUED_DIR};
use crate::identity::{Proven, is_node_name};
use crate::ids::NodeId;

/// The list's file name, in the CA directory and in a node's credentials directory.
pub const REVOCATIONS_FILE: &str = "revocations.txt";
/// Where a node keeps the newest list it adopted, under its state directory.
pub const HELD_FILE: &str = "identity/revocations.txt";

const HEADER: &str = "shoal-revocations 1";
/// Largest list read, from a file or a peer (about 20,000 entries).
pub const MAX_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: not a revocation list: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path}: the signature is not the cluster CA's")]
    BadSignature { path: PathBuf },
    #[error("the CA certificate has no usable public key: {0}")]
    CaKey(String),
    #[error("{0:?} is neither a node name nor a 16-hex-digit node id")]
    BadNode(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("cannot sign: {0}")]
    Sign(#[from] rcgen::Error),
}

/// Which nodes are revoked, as of `serial`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    pub serial: u64,
    pub ids: BTreeSet<NodeId>,
    pub names: BTreeSet<String>,
    /// The signed text, as it travels (empty for the empty list no CA signed).
    pub signed: String,
}

/// What a node needs to believe the lists it receives, and where it keeps the newest.
#[derive(Debug, Clone)]
pub struct Trust {
    pub ca_pem: String,
    /// The state directory's [`HELD_FILE`] (none for a node that keeps nothing).
    pub keep: Option<PathBuf>,
}

impl Revocations {
    pub fn is_revoked(&self, node: &Proven) -> bool {
        self.ids.contains(&node.node_id) || self.names.contains(&node.name)
    }

    /// The signed lines above the signature.
    fn body(&self) -> String {
        let mut out = format!("{HEADER}\nserial {}\n", self.serial);
        for id in &self.ids {
            out.push_str(&format!("id {id}\n"));
        }
        for name in &self.names {
            out.push_str(&format!("name {name}\n"));
        }
        out
    }

    /// The whole file, signed with the CA key.
    pub fn sign(&self, ca: &Authority) -> Result<String, RevocationError> {
        let body = self.body();
        let signature = ca.key.sign(body.as_bytes())?;
        Ok(format!(
            "{body}signature {}\n",
            crate::ids::to_hex(&signature)
        ))
    }

    /// Reads the list at `path` and checks its signature against `ca_pem`; a missing
    /// file is the empty list.
    pub fn load(path: &Path, ca_pem: &str) -> Result<Self, RevocationError> {
        let read_err = |source| RevocationError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = match fs::metadata(path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(read_err(e)),
        };
        if len > MAX_FILE {
            return Err(RevocationError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = fs::read_to_string(path).map_err(read_err)?;
        Self::parse_verified(&text, ca_pem, path)
    }

    /// Parses `text` (named `path` in errors) and checks its CA signature.
    pub fn parse_verified(text: &str, ca_pem: &str, path: &Path) -> Result<Self, RevocationError> {
        let malformed = |reason: &str| RevocationError::Malformed {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if text.len() as u64 > MAX_FILE {
            return Err(RevocationError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let at = text
            .rfind("signature ")
            .filter(|&at| at == 0 || text.as_bytes()[at - 1] == b'\n')
            .ok_or_else(|| malformed("no signature line"))?;
        let (body, signature) = text.split_at(at);
        let signature = signature["signature ".len()..].trim_end();
        let signature =
            crate::ids::from_hex(signature).ok_or_else(|| malformed("signature is not hex"))?;
        let ca_key = ca_public_key(ca_pem)?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, ca_key)
            .verify(body.as_bytes(), &signature)
            .map_err(|_| RevocationError::BadSignature {
                path: path.to_path_buf(),
            })?;
        let mut lines = body.lines();
        if lines.next() != Some(HEADER) {
            return Err(malformed("unknown header (another version?)"));
        }
        let mut list = Revocations::default();
        let serial = lines
            .next()
            .and_then(|l| l.strip_prefix("serial "))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| malformed("no serial"))?;
        list.serial = serial;
        for line in lines {
            match line.split_once(' ') {
                Some(("id", hex)) => {
                    list.ids
                        .insert(parse_id(hex).ok_or_else(|| malformed(line))?);
                }
                Some(("name", name)) if is_node_name(name) => {
                    list.names.insert(name.to_string());
                }
                _ => return Err(malformed(line)),
            }
        }
        list.signed = text.to_string();
        Ok(list)
    }
}

/// The newest list a node holds at start: its credentials directory's, or the one it
/// kept in its state directory.
pub fn held(
    credentials_dir: &Path,
    state_dir: &Path,
    ca_pem: &str,
) -> Result<Revocations, RevocationError> {
    let given = Revocations::load(&credentials_dir.join(REVOCATIONS_FILE), ca_pem)?;
    let kept = Revocations::load(&state_dir.join(HELD_FILE), ca_pem)?;
    Ok(if kept.serial > given.serial {
        kept
    } else {
        given
    })
}

/// Keeps `list` at `path` (atomically), for the next start.
pub fn keep(path: &Path, list: &Revocations) -> Result<(), RevocationError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|source| RevocationError::Write {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    write_atomically(path, &list.signed)
}

fn parse_id(hex: &str) -> Option<NodeId> {
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok().map(NodeId))
        .flatten()
}

/// The CA certificate's public key (the uncompressed EC point).
fn ca_public_key(ca_pem: &str) -> Result<Vec<u8>, RevocationError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes())
        .map_err(|e| RevocationError::CaKey(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents)
        .map_err(|e| RevocationError::CaKey(e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// Adds `node` (a name, or a node id) to the CA's revocation list in `state_dir` (the
/// CA directory, or the signer's `--state`; the CA key is read from `ca_dir`), signed
/// with a higher serial; a name the CA issued a certificate to (`add-node`) has that
/// key's id listed too. Returns the new list and where it was written.
pub fn revoke(
    ca_dir: &Path,
    state_dir: &Path,
    node: &str,
) -> Result<(Revocations, PathBuf), RevocationError> {
    let ca = Authority::load(ca_dir)?;
    let path = state_dir.join(REVOCATIONS_FILE);
    let mut list = Revocations::load(&path, &ca.ca_pem)?;
    if let Some(id) = parse_id(node) {
        list.ids.insert(id);
    } else if is_node_name(node) {
        list.names.insert(node.to_string());
        let issued = state_dir.join(ISSUED_DIR).join(format!("{node}.pem"));
        if issued.is_file() {
            let text = fs::read_to_string(&issued).map_err(|source| RevocationError::Read {
                path: issued.clone(),
                source,
            })?;
            list.ids
                .insert(crate::credentials::prove_pem(&issued, &text)?.node_id);
        }
    } else {
        return Err(RevocationError::BadNode(node.to_string()));
    }
    list.serial += 1;
    let text = list.sign(&ca)?;
    write_atomically(&path, &text)?;
    list.signed = text;
    Ok((list, path))
}

/// Writes `text` to a temporary file beside `path`, then renames it over `path`: a
/// reader sees the old list or the new one.
fn write_atomically(path: &Path, text: &str) -> Result<(), RevocationError> {
    let write_err = |source| RevocationError::Write {
        path: path.to_path_buf(),
        source,
    };
    let temp = path.with_extension("txt.tmp");
    fs::File::create(&temp)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
        .map_err(write_err)?;
    fs::rename(&temp, path).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_is_signed_and_tampering_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        crate::credentials::init_cluster(&ca_dir).unwrap();
        let issued =
            crate::credentials::add_node(&ca_dir, "gamma", &dir.path().join("g"), 1).unwrap();
        let (first, path) = revoke(&ca_dir, &ca_dir, "gamma").unwrap();
        assert_eq!(first.serial, 1);
        assert!(first.is_revoked(&issued));
        let (second, _) = revoke(&ca_dir, &ca_dir, "00000000000000ff").unwrap();
        assert_eq!(second.serial, 2);
        assert!(second.ids.contains(&NodeId(0xff)) && second.names.contains("gamma"));
        let ca_pem = fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
        assert_eq!(Revocations::load(&path, &ca_pem).unwrap(), second);

        let text = fs::read_to_string(&path).unwrap();
        let forged = text.replace("name gamma", "name delta");
        assert!(matches!(
            Revocations::parse_verified(&forged, &ca_pem, &path),
            Err(RevocationError::BadSignature { .. })
        ));
        let other = dir.path().join("other");
        crate::credentials::init_cluster(&other).unwrap();
        let other_pem = fs::read_to_string(other.join("ca.pem")).unwrap();
        assert!(matches!(
            Revocations::parse_verified(&text, &other_pem, &path),
            Err(RevocationError::BadSignature { .. })
        ));
        assert!(matches!(
            revoke(&ca_dir, &ca_dir, "not a node"),
            Err(RevocationError::BadNode(_))
        ));
    }
}
