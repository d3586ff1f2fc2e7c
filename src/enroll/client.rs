//! The node's side of enrollment: its own key (`STATE/identity/key.pem`, made once,
//! never sent), the certificate the signer last issued it (`STATE/identity/cert.pem`),
//! and asking the signer for a new one: with that certificate while it is valid
//! (renewal), with the join token otherwise.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData};

use super::{MAX_RESPONSE, Refusal, Request, Response};
use crate::credentials::{
    CA_FILE, Credentials, CredentialsError, JOIN_TOKEN_FILE, NODE_CERT_FILE, NODE_KEY_FILE,
    default_node_name, own_key, prove_pem, read_token, replace_file,
};
use crate::identity::node_id_of_key;
use crate::revocation::Revocations;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("cannot resolve the signer {signer:?} (expected HOST:PORT)")]
    Resolve { signer: String },
    #[error("cannot reach the signer at {signer}: {message}")]
    Unreachable { signer: String, message: String },
    #[error("the signer at {signer} refused: {code}: {message}")]
    Refused {
        signer: String,
        code: Refusal,
        message: String,
    },
    #[error("the signer at {signer} answered nonsense: {message}")]
    Answer { signer: String, message: String },
    #[error("{dir} holds a join token: name the signer with --signer HOST:PORT (SHOAL_SIGNER)")]
    NoSigner { dir: PathBuf },
}

/// How long one exchange with the signer may take (handshake, request, answer).
const ASK_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a node enrolls, and with what.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// The signer's `HOST:PORT`.
    pub signer: String,
    /// The node's credentials directory (`ca.pem`, `join-token`).
    pub credentials_dir: PathBuf,
    pub state_dir: PathBuf,
    /// The name to enroll under [default: the host name].
    pub node_name: Option<String>,
    pub gso: bool,
}

/// What the signer gave: the node's credentials, and the CA's revocation list if it
/// sent one whose signature holds.
pub struct Obtained {
    pub credentials: Credentials,
    pub revocations: Option<Revocations>,
}

impl Enrollment {
    /// A new certificate from the signer: renewing the one held while it is valid (and
    /// for the wanted name), enrolling with the join token otherwise.
    pub async fn obtain(&self) -> Result<Obtained, EnrollError> {
        let ca_pem = self.ca_pem()?;
        let key = own_key(&self.state_dir.join(NODE_KEY_FILE))?;
        let held = self.held(&ca_pem, &key);
        if let Some(held) = &held
            && let Some(cert) = pem_der(&held.cert_pem)
        {
            let request = Request::Renew {
                cert,
                csr: certification_request(&held.identity.name, &key)?,
            };
            match self.ask(&ca_pem, &key, &request).await {
                // The signer does not take it (its clock, a new CA): enroll afresh.
                Err(EnrollError::Refused {
                    code: Refusal::BadCertificate,
                    ..
                }) => {}
                other => return other,
            }
        }
        let name = match &self.node_name {
            Some(name) => name.clone(),
            None => default_node_name()?,
        };
        let request = Request::Enroll {
            token: read_token(&self.credentials_dir.join(JOIN_TOKEN_FILE))?,
            csr: certification_request(&name, &key)?,
        };
        self.ask(&ca_pem, &key, &request).await
    }

    /// [`Self::obtain`], tried again while the signer cannot be reached or refuses for
    /// a passing reason, up to `attempts` times; with a valid certificate held, that one
    /// if the signer stays out of reach.
    pub async fn obtain_patiently(&self, attempts: u32) -> Result<Obtained, EnrollError> {
        let mut pause = Duration::from_secs(1);
        for attempt in 1.. {
            match self.obtain().await {
                Err(e) if attempt < attempts && is_transient(&e) => {
                    // A signer that starts after its nodes (a stack deployed at once)
                    // is expected: said quietly until it is given up on.
                    tracing::info!(
                        "waiting for the signer: {e}; trying again in {} s",
                        pause.as_secs()
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(10));
                }
                Err(e) if is_transient(&e) => {
                    let ca_pem = std::fs::read_to_string(self.credentials_dir.join(CA_FILE))
                        .unwrap_or_default();
                    let key = own_key(&self.state_dir.join(NODE_KEY_FILE))?;
                    return match self.held(&ca_pem, &key) {
                        Some(credentials) => {
                            tracing::warn!(
                                "{e}; going on with the certificate held (valid until {})",
                                humantime::format_rfc3339_seconds(credentials.identity.not_after)
                            );
                            Ok(Obtained {
                                credentials,
                                revocations: None,
                            })
                        }
                        None => Err(e),
                    };
                }
                other => return other,
            }
        }
        unreachable!("the loop returns")
    }

    /// The certificate held in the state directory, if it is for this key (and the
    /// wanted name) and still valid.
    fn held(&self, ca_pem: &str, key: &KeyPair) -> Option<Credentials> {
        let path = self.state_dir.join(NODE_CERT_FILE);
        let cert_pem = std::fs::read_to_string(&path).ok()?;
        let identity = prove_pem(&path, &cert_pem).ok()?;
        let fits = identity.node_id == node_id_of_key(&key.subject_public_key_info())
            && identity.not_after > SystemTime::now()
            && self.node_name.as_ref().is_none_or(|n| *n == identity.name);
        fits.then(|| Credentials {
            ca_pem: ca_pem.to_string(),
            cert_pem,
            key_pem: key.serialize_pem(),
            identity,
        })
    }

    /// The cluster CA's certificate, read from the credentials directory each time (it
    /// may be replaced while the node runs).
    fn ca_pem(&self) -> Result<String, EnrollError> {
        let path = self.credentials_dir.join(CA_FILE);
        Ok(std::fs::read_to_string(&path)
            .map_err(|source| CredentialsError::Read { path, source })?)
    }

    /// The CA's revocation list from the signer, if its serial is higher than `serial`.
    pub async fn revocations_after(&self, serial: u64) -> Result<Option<String>, EnrollError> {
        let ca_pem = self.ca_pem()?;
        match self
            .exchange(&ca_pem, &Request::GetRevocations { serial })
            .await?
        {
            Response::Revocations { list } => Ok((!list.is_empty()).then_some(list)),
            Response::Refused { code, message } => Err(EnrollError::Refused {
                signer: self.signer.clone(),
                code,
                message,
            }),
            Response::Issued { .. } => Err(EnrollError::Answer {
                signer: self.signer.clone(),
                message: "a certificate for a revocation list request".into(),
            }),
        }
    }

    /// One request to the signer and its answer.
    async fn exchange(&self, ca_pem: &str, request: &Request) -> Result<Response, EnrollError> {
        let signer = self.signer.clone();
        let addr = tokio::net::lookup_host(signer.as_str())
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| EnrollError::Resolve {
                signer: signer.clone(),
            })?;
        let unreachable = |message: String| EnrollError::Unreachable {
            signer: signer.clone(),
            message,
        };
        let bind = match addr {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let client = crate::transport::enroll_client(bind, ca_pem, self.gso)
            .map_err(|e| unreachable(e.to_string()))?;
        let exchange = async {
            let mut connection = crate::transport::connect_signer(&client, addr)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let stream = connection
                .open_bidirectional_stream()
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let (mut recv, mut send) = stream.split();
            crate::protocol::write_frame(&mut send, request.encode())
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            send.finish().map_err(|e| unreachable(e.to_string()))?;
            crate::protocol::read_frame(&mut recv, MAX_RESPONSE)
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .ok_or_else(|| unreachable("the signer closed the stream".into()))
        };
        let (kind, body) = tokio::time::timeout(ASK_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {} s", ASK_TIMEOUT.as_secs())))??;
        Response::decode(kind, &body).map_err(|e| EnrollError::Answer {
            signer: signer.clone(),
            message: e.to_string(),
        })
    }

    /// One certificate request to the signer; an issued certificate is checked (our
    /// key, a node name) and kept in the state directory before it is returned.
    async fn ask(
        &self,
        ca_pem: &str,
        key: &KeyPair,
        request: &Request,
    ) -> Result<Obtained, EnrollError> {
        let signer = self.signer.clone();
        let answer_err = |message: String| EnrollError::Answer {
            signer: signer.clone(),
            message,
        };
        match self.exchange(ca_pem, request).await? {
            Response::Revocations { .. } => Err(answer_err(
                "a revocation list for a certificate request".into(),
            )),

            Response::Refused { code, message } => Err(EnrollError::Refused {
                signer: signer.clone(),
                code,
                message,
            }),
            Response::Issued {
                cert_pem,
                revocations,
            } => {
                let path = self.state_dir.join(NODE_CERT_FILE);
                let identity =
                    prove_pem(&path, &cert_pem).map_err(|e| answer_err(e.to_string()))?;
                if identity.node_id != node_id_of_key(&key.subject_public_key_info()) {
                    return Err(answer_err("a certificate for another key".into()));
                }
                replace_file(&path, &cert_pem, false)?;
                let revocations = (!revocations.is_empty())
                    .then(|| {
                        Revocations::parse_verified(
                            &revocations,
                            ca_pem,
                            Path::new("the signer's revocation list"),
                        )
                        .map_err(|e| tracing::warn!("ignoring the signer's revocation list: {e}"))
                        .ok()
                    })
                    .flatten();
                Ok(Obtained {
                    credentials: Credentials {
                        ca_pem: ca_pem.to_string(),
                        cert_pem,
                        key_pem: key.serialize_pem(),
                        identity,
                    },
                    revocations,
                })
            }
        }
    }
}

/// Where this node's credentials come from (see [`crate::credentials`]): loaded from
/// `dir`, or, for a directory with a join token, obtained from `signer` (then also the
/// [`Enrollment`] that renews them).
pub async fn node_credentials(
    dir: &Path,
    state_dir: &Path,
    node_name: Option<&str>,
    signer: Option<&str>,
    gso: bool,
) -> Result<(Obtained, Option<Enrollment>), EnrollError> {
    if Credentials::source(dir) != Some(crate::credentials::Source::Enrolled) {
        let credentials = Credentials::load(dir, state_dir, node_name)?;
        let obtained = Obtained {
            credentials,
            revocations: None,
        };
        return Ok((obtained, None));
    }
    let signer = signer.ok_or_else(|| EnrollError::NoSigner {
        dir: dir.to_path_buf(),
    })?;
    let enrollment = Enrollment {
        signer: signer.to_string(),
        credentials_dir: dir.to_path_buf(),
        state_dir: state_dir.to_path_buf(),
        node_name: node_name.map(str::to_string),
        gso,
    };
    let obtained = enrollment.obtain_patiently(START_ATTEMPTS).await?;
    tracing::info!(node = %obtained.credentials.identity.describe(), until = %humantime::format_rfc3339_seconds(obtained.credentials.identity.not_after), signer, "certificate from the signer");
    Ok((obtained, Some(enrollment)))
}

/// Tries at start before giving up (about a minute with the pauses and timeouts).
const START_ATTEMPTS: u32 = 5;

/// Renews this node's certificate at 2/3 of its lifetime (counted from when it was
/// obtained) for as long as the node runs, until `stop` flips: new connections then
/// present the new certificate, open ones go on with theirs. A failed renewal is tried
/// again after a tenth of the time left (1 to 60 s).
pub async fn keep_renewed(
    node: std::sync::Arc<crate::sync::Node>,
    enrollment: Enrollment,
    tls: crate::transport::NodeTls,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut obtained_at = SystemTime::now();
    let mut last_error = String::new();
    loop {
        let Some(current) = node.identity() else {
            return;
        };
        let lifetime = current
            .not_after
            .duration_since(obtained_at)
            .unwrap_or_default();
        let wait = (obtained_at + lifetime * 2 / 3)
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match enrollment.obtain().await {
            Ok(obtained) => {
                last_error.clear();
                if let Err(e) = tls.replace(&obtained.credentials) {
                    tracing::error!("cannot use the renewed certificate: {e}");
                } else {
                    let identity = obtained.credentials.identity;
                    tracing::info!(until = %humantime::format_rfc3339_seconds(identity.not_after), "certificate renewed");
                    *node.identity.write().expect("identity lock") = Some(identity);
                }
                if let Some(list) = obtained.revocations {
                    node.adopt_revocations(list);
                }
                obtained_at = SystemTime::now();
            }
            Err(EnrollError::Refused {
                code: Refusal::Revoked,
                message,
                ..
            }) => {
                // Revocation is for good: asking again would only load the signer.
                tracing::error!(
                    "this node's certificate will not be renewed (valid until {}): the signer refused: {}: {message}",
                    humantime::format_rfc3339_seconds(current.not_after),
                    Refusal::Revoked
                );
                return;
            }
            Err(e) => {
                let left = current
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                let retry = (left / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
                // Said again only when the reason changes (a revoked node is refused
                // every time).
                let message = e.to_string();
                if message != last_error {
                    tracing::warn!(
                        "cannot renew this node's certificate (valid until {}): {message}; trying again every {} s or sooner",
                        humantime::format_rfc3339_seconds(current.not_after),
                        retry.as_secs()
                    );
                    last_error = message;
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

fn is_transient(e: &EnrollError) -> bool {
    match e {
        EnrollError::Unreachable { .. } | EnrollError::Resolve { .. } => true,
        EnrollError::Refused { code, .. } => code.is_transient(),
        _ => false,
    }
}

/// A PKCS#10 request for `name`, signed by `key` (proof that the node holds it).
fn certification_request(name: &str, key: &KeyPair) -> Result<Vec<u8>, CredentialsError> {
    if !crate::identity::is_node_name(name) {
        return Err(CredentialsError::NodeName(name.to_string()));
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    Ok(params.serialize_request(key)?.der().to_vec())
}

fn pem_der(pem: &str) -> Option<Vec<u8>> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .ok()
        .map(|(_, pem)| pem.contents)
}
