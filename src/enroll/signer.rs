//! `shoal signer`: the one process that holds `ca-key.pem`. It issues nodes short-lived
//! certificates for the keys they made themselves: to a new node that shows the join
//! token, and to a member that shows its current certificate (renewal). A revoked node
//! gets neither.
//!
//! It reads the CA (`ca.pem`, `ca-key.pem`) from `--ca`, and its state directory
//! (`--state`, default the CA directory: a writable place when the CA comes from
//! read-only secrets) as `shoal cluster` left it, at every request: the token's hash
//! (`join-token.blake3`, or the CA directory's while the state has none; so `shoal
//! cluster rotate-token` takes effect at once, with no restart and no member
//! disconnected), the revocation list, and the record of each name's last certificate
//! (`nodes/NAME.pem`, which `revoke NAME` reads to find the key's id). A
//! name whose certificate is still valid belongs to its key: another key cannot take
//! it until that certificate expires.
//!
//! Everything a request carries is bounded ([`super::MAX_REQUEST`], one request per
//! stream, [`REQUEST_TIMEOUT`], at most [`MAX_CONNECTIONS`] connections and 4 streams
//! each). Tokens are compared by their BLAKE3 hashes, in constant time. An address
//! whose requests were refused [`MAX_FAILURES`] times within [`FAILURE_WINDOW`] is
//! refused `RATE_LIMITED` until the window ends.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use rcgen::KeyPair;
use x509_parser::prelude::FromDer;

use super::{MAX_REQUEST, Refusal, Request, Response};
use crate::credentials::{
    Authority, ISSUED_DIR, JOIN_TOKEN_HASH_FILE, prove_pem, replace_file, token_hash,
};
use crate::identity::{Proven, is_node_name, node_id_of_key};
use crate::ids::NodeId;
use crate::revocation::{REVOCATIONS_FILE, Revocations};

pub struct SignerOptions {
    /// The CA directory: `ca.pem`, `ca-key.pem` (and `join-token.blake3` until the state
    /// has its own).
    pub ca_dir: PathBuf,
    /// Where the signer reads `join-token.blake3` and `revocations.txt` and keeps
    /// `nodes/`.
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    /// How long the certificates it issues are valid.
    pub lifetime: Duration,
    pub gso: bool,
}

/// Shortest certificate lifetime (renewal happens at 2/3 of it).
pub const MIN_LIFETIME: Duration = Duration::from_secs(15);

/// Enrolling nodes' connections served at once; past it, new ones are closed.
const MAX_CONNECTIONS: usize = 64;
/// How long a node may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may stay.
const CONNECTION_TIME: Duration = Duration::from_secs(30);
/// Refused requests one address may make within [`FAILURE_WINDOW`].
const MAX_FAILURES: u32 = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses whose failures are counted one by one; beyond, they share one count.
const MAX_TRACKED: usize = 4096;
/// Largest file the signer reads from its CA directory (a record, the token hash).
const MAX_SMALL_FILE: u64 = 64 * 1024;
/// Largest revocation list it sends.
const MAX_REVOCATIONS: u64 = 1 << 20;

/// Runs the signer until `shutdown` resolves.
pub async fn run(
    options: SignerOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if options.lifetime < MIN_LIFETIME {
        anyhow::bail!(
            "--lifetime must be at least {}",
            humantime::format_duration(MIN_LIFETIME)
        );
    }
    let authority = Authority::load(&options.ca_dir)?;
    let hashes = [&options.state_dir, &options.ca_dir].map(|d| d.join(JOIN_TOKEN_HASH_FILE));
    if !hashes.iter().any(|h| h.is_file()) {
        anyhow::bail!(
            "{} does not exist: make a join token with `shoal cluster rotate-token --ca {} --state {}`",
            hashes[0].display(),
            options.ca_dir.display(),
            options.state_dir.display()
        );
    }
    std::fs::create_dir_all(options.state_dir.join(ISSUED_DIR))
        .with_context(|| format!("cannot write to {}", options.state_dir.display()))?;
    // The signer's own key lives only in memory: a restart makes another.
    let key = KeyPair::generate()?;
    let cert = authority.sign_signer(&key)?;
    let mut server = crate::transport::signer_listen(
        options.listen,
        (&cert, &key.serialize_pem()),
        options.gso,
    )?;
    let signer = Arc::new(Signer {
        ca_der: pem_der(&authority.ca_pem).context("ca.pem")?,
        authority,
        ca_dir: options.ca_dir.clone(),
        state_dir: options.state_dir.clone(),
        lifetime: options.lifetime,
        failures: Mutex::new(Failures::default()),
    });
    tracing::info!(listen = %options.listen, lifetime = %humantime::format_duration(options.lifetime), ca = %options.ca_dir.display(), state = %options.state_dir.display(), "signing");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = server.accept() => match accepted {
                Some(connection) => match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let signer = signer.clone();
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(CONNECTION_TIME, serve_connection(signer, connection)).await;
                            drop(permit);
                        });
                    }
                    Err(_) => tracing::warn!("{MAX_CONNECTIONS} enrollment connections open; refusing another"),
                },
                None => break,
            },
            _ = &mut shutdown => break,
        }
    }
    tracing::info!("signer stopped");
    Ok(())
}

async fn serve_connection(signer: Arc<Signer>, mut connection: s2n_quic::Connection) {
    let Ok(from) = connection.remote_addr().map(|a| a.ip()) else {
        return;
    };
    while let Ok(Some(stream)) = connection.accept_bidirectional_stream().await {
        let signer = signer.clone();
        tokio::spawn(async move { serve_stream(&signer, stream, from).await });
    }
}

async fn serve_stream(
    signer: &Signer,
    stream: s2n_quic::stream::BidirectionalStream,
    from: IpAddr,
) {
    let (mut recv, mut send) = stream.split();
    let frame = tokio::time::timeout(
        REQUEST_TIMEOUT,
        crate::protocol::read_frame(&mut recv, MAX_REQUEST),
    )
    .await;
    let response = match frame {
        Ok(Ok(Some((kind, body)))) => match Request::decode(kind, &body) {
            Ok(request) => signer.answer(request, from),
            Err(e) => signer.refuse(from, Refusal::Malformed, e.to_string()),
        },
        Ok(Ok(None)) | Err(_) => return,
        Ok(Err(e)) => signer.refuse(from, Refusal::Malformed, e.to_string()),
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        crate::protocol::write_frame(&mut send, response.encode()).await?;
        send.close().await.map_err(std::io::Error::other)?;
        Ok::<_, crate::protocol::ProtocolError>(())
    })
    .await;
}

type Refused = (Refusal, String);

struct Signer {
    authority: Authority,
    ca_der: Vec<u8>,
    ca_dir: PathBuf,
    state_dir: PathBuf,
    lifetime: Duration,
    failures: Mutex<Failures>,
}

impl Signer {
    fn answer(&self, request: Request, from: IpAddr) -> Response {
        let limited = self
            .failures
            .lock()
            .expect("failures lock")
            .limited(from, Instant::now());
        let (what, result) = match &request {
            // Public (the list is CA-signed) and never refused.
            Request::GetRevocations { serial } => {
                return Response::Revocations {
                    list: self.revocations_after(*serial),
                };
            }
            _ if limited => {
                return Response::Refused {
                    code: Refusal::RateLimited,
                    message: format!(
                        "{MAX_FAILURES} refused requests from {from} within {} s; try again later",
                        FAILURE_WINDOW.as_secs()
                    ),
                };
            }
            Request::Enroll { token, csr } => ("enrolled", self.enroll(token, csr)),
            Request::Renew { cert, csr } => ("renewed", self.renew(cert, csr)),
        };
        match result {
            Ok((cert_pem, proven)) => {
                tracing::info!(node = %proven.describe(), %from, "{what}");
                Response::Issued {
                    cert_pem,
                    revocations: self.revocation_text(),
                }
            }
            Err((code, message)) => self.refuse(from, code, message),
        }
    }

    /// Logs and counts a refusal (a failure of the signer's own is not the node's).
    fn refuse(&self, from: IpAddr, code: Refusal, message: String) -> Response {
        tracing::warn!(%from, %code, "refused: {message}");
        if code != Refusal::Internal {
            self.failures
                .lock()
                .expect("failures lock")
                .failed(from, Instant::now());
        }
        Response::Refused { code, message }
    }

    fn enroll(&self, token: &str, csr: &[u8]) -> Result<(String, Proven), Refused> {
        self.check_token(token)?;
        let (name, spki) = parse_request(csr)?;
        let id = node_id_of_key(&spki);
        self.check_not_revoked(&name, id)?;
        self.check_name_free(&name, id)?;
        self.issue(&name, &spki)
    }

    fn renew(&self, cert: &[u8], csr: &[u8]) -> Result<(String, Proven), Refused> {
        let member = self.verify_member(cert)?;
        let (_, spki) = parse_request(csr)?;
        if node_id_of_key(&spki) != member.node_id {
            return Err((
                Refusal::Malformed,
                "the certification request is not for the certificate's key".into(),
            ));
        }
        self.check_not_revoked(&member.name, member.node_id)?;
        self.issue(&member.name, &spki)
    }

    fn check_token(&self, token: &str) -> Result<(), Refused> {
        let path = [&self.state_dir, &self.ca_dir]
            .map(|d| d.join(JOIN_TOKEN_HASH_FILE))
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| self.state_dir.join(JOIN_TOKEN_HASH_FILE));
        let text = read_small(&path).map_err(internal)?;
        let held = blake3::Hash::from_hex(text.trim())
            .map_err(|_| internal(format!("{} is not a BLAKE3 hash", path.display())))?;
        // blake3::Hash compares in constant time.
        if token_hash(token) == held {
            Ok(())
        } else {
            Err((
                Refusal::BadToken,
                "the join token is not the cluster's current one".into(),
            ))
        }
    }

    /// What a certificate a member offers for renewal proves: it must be the CA's and
    /// unexpired.
    fn verify_member(&self, der: &[u8]) -> Result<Proven, Refused> {
        let bad = |why: &str| (Refusal::BadCertificate, why.to_string());
        let (rest, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|_| bad("the certificate does not parse"))?;
        if !rest.is_empty() {
            return Err(bad("bytes after the certificate"));
        }
        let (_, ca) = x509_parser::parse_x509_certificate(&self.ca_der)
            .map_err(|e| internal(format!("ca.pem: {e}")))?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|_| bad("the certificate is not signed by the cluster CA"))?;
        if !cert.validity().is_valid() {
            return Err(bad(
                "the certificate has expired (or is not valid yet): enroll again with the join token",
            ));
        }
        Proven::from_der(der).map_err(|e| bad(&e.to_string()))
    }

    fn check_not_revoked(&self, name: &str, node_id: NodeId) -> Result<(), Refused> {
        let list = Revocations::load(
            &self.state_dir.join(REVOCATIONS_FILE),
            &self.authority.ca_pem,
        )
        .map_err(|e| internal(e.to_string()))?;
        let node = Proven {
            node_id,
            name: name.to_string(),
            not_after: SystemTime::UNIX_EPOCH,
        };
        if list.is_revoked(&node) {
            return Err((
                Refusal::Revoked,
                format!("node {} is revoked", node.describe()),
            ));
        }
        Ok(())
    }

    fn record(&self, name: &str) -> PathBuf {
        self.state_dir.join(ISSUED_DIR).join(format!("{name}.pem"))
    }

    /// A name belongs to the key of its last certificate while that is valid.
    fn check_name_free(&self, name: &str, node_id: NodeId) -> Result<(), Refused> {
        let path = self.record(name);
        if !path.exists() {
            return Ok(());
        }
        let text = read_small(&path).map_err(internal)?;
        let held = prove_pem(&path, &text).map_err(|e| internal(e.to_string()))?;
        if held.node_id != node_id && held.not_after > SystemTime::now() {
            return Err((
                Refusal::NameTaken,
                format!(
                    "node name {name} belongs to another key (node {}) until {}: choose another --node-name, or wait until then",
                    held.node_id,
                    humantime::format_rfc3339_seconds(held.not_after)
                ),
            ));
        }
        Ok(())
    }

    fn issue(&self, name: &str, spki: &[u8]) -> Result<(String, Proven), Refused> {
        let key = rcgen::SubjectPublicKeyInfo::from_der(spki)
            .map_err(|e| (Refusal::Malformed, format!("unsupported key: {e}")))?;
        let cert_pem = self
            .authority
            .sign_node_for(name, &key, self.lifetime)
            .map_err(|e| internal(e.to_string()))?;
        let record = self.record(name);
        let proven = prove_pem(&record, &cert_pem).map_err(|e| internal(e.to_string()))?;
        std::fs::create_dir_all(self.state_dir.join(ISSUED_DIR))
            .map_err(|e| internal(format!("{}: {e}", self.state_dir.display())))?;
        replace_file(&record, &cert_pem, false).map_err(|e| internal(e.to_string()))?;
        Ok((cert_pem, proven))
    }

    /// The CA's revocation list if its serial is higher than `serial`, else "".
    fn revocations_after(&self, serial: u64) -> String {
        let path = self.state_dir.join(REVOCATIONS_FILE);
        match Revocations::load(&path, &self.authority.ca_pem) {
            Ok(list) if list.serial > serial => list.signed,
            Ok(_) => String::new(),
            Err(e) => {
                tracing::error!("cannot send the revocation list: {e}");
                String::new()
            }
        }
    }

    /// The CA's revocation list as its file holds it ("" if there is none, or it is
    /// unreadable: the node keeps what it has).
    fn revocation_text(&self) -> String {
        let path = self.state_dir.join(REVOCATIONS_FILE);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() <= MAX_REVOCATIONS => {
                std::fs::read_to_string(&path).unwrap_or_default()
            }
            _ => String::new(),
        }
    }
}

fn internal(message: impl std::fmt::Display) -> Refused {
    (Refusal::Internal, message.to_string())
}

fn read_small(path: &Path) -> Result<String, String> {
    let fail = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let len = std::fs::metadata(path).map_err(fail)?.len();
    if len > MAX_SMALL_FILE {
        return Err(format!(
            "{} is larger than {MAX_SMALL_FILE} bytes",
            path.display()
        ));
    }
    std::fs::read_to_string(path).map_err(fail)
}

fn pem_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not PEM: {e}"))?;
    Ok(pem.contents)
}

/// The node name and the key (DER SubjectPublicKeyInfo) of a PKCS#10 request, whose
/// signature (by that key) must hold.
fn parse_request(der: &[u8]) -> Result<(String, Vec<u8>), Refused> {
    let bad = |why: String| (Refusal::Malformed, why);
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| bad(format!("the certification request does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(bad("bytes after the certification request".into()));
    }
    csr.verify_signature()
        .map_err(|_| bad("the certification request is not signed by its key".into()))?;
    let info = &csr.certification_request_info;
    let name = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| bad("the certification request names no node".into()))?;
    if !is_node_name(name) {
        return Err(bad(format!(
            "{name:?} is not a node name (1 to 63 letters, digits, '_', '.' or '-')"
        )));
    }
    Ok((name.to_string(), info.subject_pki.raw.to_vec()))
}

/// Refused requests per address, counted over fixed windows.
#[derive(Default)]
struct Failures {
    by_addr: HashMap<IpAddr, (Instant, u32)>,
}

impl Failures {
    fn key(&self, addr: IpAddr) -> IpAddr {
        if self.by_addr.len() >= MAX_TRACKED && !self.by_addr.contains_key(&addr) {
            // The table is full: untracked addresses share one count.
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            addr
        }
    }

    fn limited(&self, addr: IpAddr, now: Instant) -> bool {
        self.by_addr.get(&self.key(addr)).is_some_and(|(since, n)| {
            now.duration_since(*since) < FAILURE_WINDOW && *n >= MAX_FAILURES
        })
    }

    fn failed(&mut self, addr: IpAddr, now: Instant) {
        if self.by_addr.len() >= MAX_TRACKED {
            self.by_addr
                .retain(|_, (since, _)| now.duration_since(*since) < FAILURE_WINDOW);
        }
        let key = self.key(addr);
        let entry = self.by_addr.entry(key).or_insert((now, 0));
        if now.duration_since(entry.0) >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_limited_after_its_failures_until_the_window_ends() {
        let mut failures = Failures::default();
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let start = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(!failures.limited(a, start));
            failures.failed(a, start);
        }
        assert!(failures.limited(a, start));
        assert!(!failures.limited(b, start));
        assert!(!failures.limited(a, start + FAILURE_WINDOW));
        // Many addresses cannot grow the table without bound.
        for i in 0..(MAX_TRACKED as u32 + 100) {
            failures.failed(IpAddr::from(i.to_be_bytes()), start);
        }
        assert!(failures.by_addr.len() <= MAX_TRACKED + 1);
    }

    #[test]
    fn a_request_must_be_signed_by_its_key_and_name_a_node() {
        let key = KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "node-7");
        let der = params.serialize_request(&key).unwrap().der().to_vec();
        let (name, spki) = parse_request(&der).unwrap();
        assert_eq!(name, "node-7");
        assert_eq!(
            node_id_of_key(&spki),
            node_id_of_key(&rcgen::PublicKeyData::subject_public_key_info(&key))
        );
        let mut forged = der.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(parse_request(&forged).is_err());
        assert!(parse_request(b"garbage").is_err());
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "not a name");
        let der = params.serialize_request(&key).unwrap().der().to_vec();
        assert!(parse_request(&der).is_err());
    }
}
