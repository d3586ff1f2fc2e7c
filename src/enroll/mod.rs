//! Enrollment: how a node that holds only `ca.pem` and the join token gets a
//! certificate of its own from the signer, and renews it while it runs.
//!
//! The **signer** (`shoal signer`, [`signer`]) is the one process that holds
//! `ca-key.pem`. It listens on a QUIC port of its own (default 7031) with ALPN
//! `shoal-enroll/1`, authenticated by a certificate the CA issues it that names
//! [`SIGNER_SERVER_NAME`] only; it asks no client certificate (an enrolling node has
//! none yet). A node ([`client`]) makes its key locally (it never leaves the node),
//! trusts only `ca.pem`, and sends on one stream per request either
//!
//! - `Enroll`: the join token and a PKCS#10 request signed by its key (proof that it
//!   holds the key) naming the node, or
//! - `Renew`: its current, unexpired certificate and such a request for the same key,
//!
//! and receives a short-lived certificate for its key and the CA-signed revocation list,
//! or a refusal with a code and a sentence. A revoked node is refused both. A running
//! node also asks every heartbeat whether the CA's revocation list is newer than the
//! one it holds (`GetRevocations`, which needs no proof: the list is CA-signed).
//!
//! Every byte is specified in `schema/protocol.md`, "Enrollment". The framing is the
//! one of the sync protocol ([`crate::protocol::read_frame`]); the limits are this
//! module's.

pub mod client;
pub mod signer;

use crate::encoding::{DecodeError, Reader, put_short_bytes};

/// The ALPN of the enrollment protocol, on the signer's port.
pub const ALPN: &[u8] = b"shoal-enroll/1";

/// The signer's default port (UDP).
pub const DEFAULT_PORT: u16 = 7031;

/// Largest request frame the signer reads (a token, a certificate and a request are
/// each well under 4 KiB).
pub const MAX_REQUEST: usize = 16 * 1024;
/// Largest response frame a node reads: a certificate and a revocation list of at most
/// 1 MiB ([`crate::revocation`]'s file limit).
pub const MAX_RESPONSE: usize = (1 << 20) + 16 * 1024;
/// Largest token, certificate or certification request in a request.
const MAX_FIELD: usize = 4096;
/// Largest refusal message.
const MAX_MESSAGE: usize = 1024;

const KIND_ENROLL: u8 = 0x01;
const KIND_RENEW: u8 = 0x02;
const KIND_GET_REVOCATIONS: u8 = 0x03;
const KIND_ISSUED: u8 = 0x81;
const KIND_REVOCATIONS: u8 = 0x82;
const KIND_REFUSED: u8 = 0xff;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A new node: the join token and a certification request (DER).
    Enroll { token: String, csr: Vec<u8> },
    /// A member: its current certificate (DER) and a certification request (DER) for
    /// the same key.
    Renew { cert: Vec<u8>, csr: Vec<u8> },
    /// Anyone: the CA's revocation list, if its serial is higher than `serial`.
    GetRevocations { serial: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The node's certificate (PEM) and the CA's revocation list (its file's text, empty
    /// if there is none yet).
    Issued {
        cert_pem: String,
        revocations: String,
    },
    /// The answer to `GetRevocations`: the list's text, empty if it is not newer.
    Revocations {
        list: String,
    },
    Refused {
        code: Refusal,
        message: String,
    },
}

/// Why the signer refused; unknown codes read as [`Refusal::Internal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The join token is not the current one.
    BadToken,
    /// Too many failed requests from this address lately.
    RateLimited,
    /// The node (its key's id or its name) is revoked.
    Revoked,
    /// Another key holds a valid certificate for this name.
    NameTaken,
    /// The request does not decode, or its certification request is invalid.
    Malformed,
    /// The certificate offered for renewal is expired or not the CA's.
    BadCertificate,
    /// The signer failed (its disk, its key).
    Internal,
}

impl Refusal {
    pub fn number(self) -> u8 {
        match self {
            Refusal::BadToken => 1,
            Refusal::RateLimited => 2,
            Refusal::Revoked => 3,
            Refusal::NameTaken => 4,
            Refusal::Malformed => 5,
            Refusal::BadCertificate => 6,
            Refusal::Internal => 7,
        }
    }

    fn from_number(n: u8) -> Self {
        match n {
            1 => Refusal::BadToken,
            2 => Refusal::RateLimited,
            3 => Refusal::Revoked,
            4 => Refusal::NameTaken,
            5 => Refusal::Malformed,
            6 => Refusal::BadCertificate,
            _ => Refusal::Internal,
        }
    }

    /// Whether asking again, unchanged, could succeed (the node keeps trying).
    pub fn is_transient(self) -> bool {
        matches!(self, Refusal::RateLimited | Refusal::Internal)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::BadToken => "BAD_TOKEN",
            Refusal::RateLimited => "RATE_LIMITED",
            Refusal::Revoked => "REVOKED",
            Refusal::NameTaken => "NAME_TAKEN",
            Refusal::Malformed => "MALFORMED",
            Refusal::BadCertificate => "BAD_CERTIFICATE",
            Refusal::Internal => "INTERNAL",
        })
    }
}

fn field<'a>(r: &mut Reader<'a>, what: &str) -> Result<&'a [u8], DecodeError> {
    let bytes = r.short_bytes(what)?;
    if bytes.len() > MAX_FIELD {
        return Err(DecodeError(format!(
            "{what} of {} bytes is over {MAX_FIELD}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// A byte string prefixed by its u32 length, at most `limit` bytes, as UTF-8.
fn long_text(r: &mut Reader<'_>, what: &str, limit: usize) -> Result<String, DecodeError> {
    let len = r.u32(what)? as usize;
    if len > limit {
        return Err(DecodeError(format!(
            "{what} of {len} bytes is over {limit}"
        )));
    }
    let bytes = r.take(len, what)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError(format!("{what} is not UTF-8")))
}

fn put_long(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("responses are bounded by MAX_RESPONSE");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

impl Request {
    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut body = Vec::new();
        match self {
            Request::Enroll { token, csr } => {
                put_short_bytes(&mut body, token.as_bytes());
                put_short_bytes(&mut body, csr);
                (KIND_ENROLL, body)
            }
            Request::Renew { cert, csr } => {
                put_short_bytes(&mut body, cert);
                put_short_bytes(&mut body, csr);
                (KIND_RENEW, body)
            }
            Request::GetRevocations { serial } => {
                body.extend_from_slice(&serial.to_le_bytes());
                (KIND_GET_REVOCATIONS, body)
            }
        }
    }

    pub fn decode(kind: u8, body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let request = match kind {
            KIND_ENROLL => {
                let token = field(&mut r, "token")?;
                let token = std::str::from_utf8(token)
                    .map_err(|_| DecodeError("token is not UTF-8".into()))?
                    .to_string();
                Request::Enroll {
                    token,
                    csr: field(&mut r, "certification request")?.to_vec(),
                }
            }
            KIND_RENEW => Request::Renew {
                cert: field(&mut r, "certificate")?.to_vec(),
                csr: field(&mut r, "certification request")?.to_vec(),
            },
            KIND_GET_REVOCATIONS => Request::GetRevocations {
                serial: r.u64("serial")?,
            },
            other => return Err(DecodeError(format!("unknown request kind {other:#04x}"))),
        };
        r.finish("the request")?;
        Ok(request)
    }
}

impl Response {
    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut body = Vec::new();
        match self {
            Response::Issued {
                cert_pem,
                revocations,
            } => {
                put_long(&mut body, cert_pem.as_bytes());
                put_long(&mut body, revocations.as_bytes());
                (KIND_ISSUED, body)
            }
            Response::Revocations { list } => {
                put_long(&mut body, list.as_bytes());
                (KIND_REVOCATIONS, body)
            }
            Response::Refused { code, message } => {
                body.push(code.number());
                let mut end = message.len().min(MAX_MESSAGE);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                put_short_bytes(&mut body, &message.as_bytes()[..end]);
                (KIND_REFUSED, body)
            }
        }
    }

    pub fn decode(kind: u8, body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let response = match kind {
            KIND_ISSUED => Response::Issued {
                cert_pem: long_text(&mut r, "certificate", MAX_FIELD * 2)?,
                revocations: long_text(&mut r, "revocation list", MAX_RESPONSE)?,
            },
            KIND_REVOCATIONS => Response::Revocations {
                list: long_text(&mut r, "revocation list", MAX_RESPONSE)?,
            },
            KIND_REFUSED => {
                let code = Refusal::from_number(r.u8("refusal code")?);
                let message = r.short_bytes("refusal message")?;
                if message.len() > MAX_MESSAGE {
                    return Err(DecodeError("refusal message over 1024 bytes".into()));
                }
                Response::Refused {
                    code,
                    message: String::from_utf8_lossy(message).into_owned(),
                }
            }
            other => return Err(DecodeError(format!("unknown response kind {other:#04x}"))),
        };
        r.finish("the response")?;
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let requests = [
            Request::Enroll {
                token: "SHOAL-TOKEN-1-00".into(),
                csr: vec![1, 2, 3],
            },
            Request::Renew {
                cert: vec![4; 100],
                csr: vec![5; 10],
            },
            Request::GetRevocations { serial: 7 },
        ];
        for request in requests {
            let (kind, body) = request.encode();
            assert_eq!(Request::decode(kind, &body).unwrap(), request);
            for cut in 0..body.len() {
                assert!(Request::decode(kind, &body[..cut]).is_err());
            }
            let mut long = body.clone();
            long.push(0);
            assert!(Request::decode(kind, &long).is_err());
        }
        let responses = [
            Response::Issued {
                cert_pem: "-----BEGIN CERTIFICATE-----".into(),
                revocations: String::new(),
            },
            Response::Refused {
                code: Refusal::BadToken,
                message: "no".into(),
            },
            Response::Revocations {
                list: "shoal-revocations 1".into(),
            },
        ];
        for response in responses {
            let (kind, body) = response.encode();
            assert_eq!(Response::decode(kind, &body).unwrap(), response);
            for cut in 0..body.len() {
                assert!(Response::decode(kind, &body[..cut]).is_err());
            }
        }
        assert!(Request::decode(0x03, &[]).is_err());
        // A length over the limit is refused before anything is taken.
        let mut huge = vec![0u8; 5];
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Response::decode(KIND_ISSUED, &huge).is_err());
        let (kind, body) = Request::Enroll {
            token: "x".repeat(MAX_FIELD + 1),
            csr: Vec::new(),
        }
        .encode();
        assert!(Request::decode(kind, &body).is_err());
    }
}
