//! Node identity: who a peer is, as its certificate proves it.
//!
//! Every node has its own key pair, made on the node (or by `shoal cluster add-node`
//! for offline issuance). Its **node id** is derived from the public key
//! ([`node_id_of_key`]): whoever can use the key is that node, and nobody else can be.
//! Its **name** is the common name of its certificate, which the cluster CA signed: the
//! CA vouches for the name, the key for the id.
//!
//! Nothing a peer says about itself is believed. The transport records the verified
//! certificate of every connection's peer ([`RecordPeerCertificate`], an s2n-quic event
//! subscriber), and [`peer_identity`] reads it back; a `Hello` whose node id is not the
//! one its certificate proves is refused.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use s2n_quic::provider::event::{ConnectionInfo, ConnectionMeta, Subscriber, events};

use crate::ids::NodeId;

/// The BLAKE3 `derive_key` context of node ids.
const NODE_ID_CONTEXT: &str = "shoal 2026-11 node id from SubjectPublicKeyInfo";

/// The longest node name (a DNS label's length).
pub const MAX_NODE_NAME: usize = 63;

/// The common name of the one certificate every node shared before per-node identity;
/// such a certificate proves nothing about which node presents it.
pub const SHARED_CERT_NAME: &str = "Shoal node";

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("the peer's certificate is not a valid X.509 certificate: {0}")]
    Unparsable(String),
    #[error("the peer's certificate has no node name (common name)")]
    NoName,
    #[error("the peer's certificate names {0:?}, which is not a node name")]
    BadName(String),
    #[error(
        "the certificate is the one all nodes shared before each node had its own; issue each node its own (`shoal cluster add-node NAME`, or give nodes ca-key.pem to sign their own)"
    )]
    Shared,
    #[error("the connection has no verified peer certificate ({0})")]
    Unknown(String),
}

/// What a verified certificate proves about the node presenting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proven {
    pub node_id: NodeId,
    pub name: String,
    /// When the certificate stops being valid.
    pub not_after: SystemTime,
}

impl Proven {
    /// Reads what a DER certificate proves. Only call it for a certificate whose CA
    /// signature was checked (the TLS handshake did), or for our own.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        let name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or(IdentityError::NoName)?;
        if name == SHARED_CERT_NAME {
            return Err(IdentityError::Shared);
        }
        if !is_node_name(name) {
            return Err(IdentityError::BadName(name.to_string()));
        }
        let not_after = u64::try_from(cert.validity().not_after.timestamp())
            .map_or(UNIX_EPOCH, |secs| UNIX_EPOCH + Duration::from_secs(secs));
        Ok(Proven {
            node_id: node_id_of_key(cert.public_key().raw),
            name: name.to_string(),
            not_after,
        })
    }

    /// `name (id)`, for logs and errors.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.name, self.node_id)
    }
}

/// The node id of the key whose DER `SubjectPublicKeyInfo` is `spki_der`: the first 8
/// bytes (little-endian) of a BLAKE3 key derivation over it.
pub fn node_id_of_key(spki_der: &[u8]) -> NodeId {
    let hash = blake3::derive_key(NODE_ID_CONTEXT, spki_der);
    NodeId(u64::from_le_bytes(hash[..8].try_into().expect("8 bytes")))
}

/// A node name: 1 to 63 of `[a-zA-Z0-9_.-]`, starting with a letter or digit (so it is
/// never mistaken for a flag, and fits a DNS label).
pub fn is_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name.len() <= MAX_NODE_NAME
}

/// The s2n-quic event subscriber that keeps, per connection, what the peer's verified
/// certificate proves.
pub struct RecordPeerCertificate;

/// Per connection: `None` until the handshake has checked the peer's certificate.
pub struct PeerCertificate(Option<Result<Proven, IdentityError>>);

impl Subscriber for RecordPeerCertificate {
    type ConnectionContext = PeerCertificate;

    fn create_connection_context(
        &mut self,
        _meta: &ConnectionMeta,
        _info: &ConnectionInfo,
    ) -> PeerCertificate {
        PeerCertificate(None)
    }

    fn on_tls_exporter_ready(
        &mut self,
        context: &mut PeerCertificate,
        _meta: &ConnectionMeta,
        event: &events::TlsExporterReady,
    ) {
        let proven = match event.session.peer_cert_chain_der() {
            Ok(chain) => match chain.first() {
                Some(leaf) => Proven::from_der(leaf),
                None => Err(IdentityError::Unknown("empty certificate chain".into())),
            },
            Err(e) => Err(IdentityError::Unknown(format!("{e:?}"))),
        };
        context.0 = Some(proven);
    }
}

/// What the certificate of `connection`'s peer proves.
pub fn peer_identity(connection: &s2n_quic::connection::Handle) -> Result<Proven, IdentityError> {
    connection
        .query_event_context(|context: &PeerCertificate| context.0.clone())
        .map_err(|e| IdentityError::Unknown(format!("{e:?}")))?
        .unwrap_or_else(|| Err(IdentityError::Unknown("handshake not complete".into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    #[test]
    fn node_names_are_short_plain_words() {
        for good in ["a", "node-1", "web_2.eu", &"x".repeat(MAX_NODE_NAME)] {
            assert!(is_node_name(good), "{good:?}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "a b",
            "a/b",
            "é",
            &"x".repeat(MAX_NODE_NAME + 1),
        ] {
            assert!(!is_node_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_node_id_follows_the_key_alone() {
        let a = rcgen::KeyPair::generate().unwrap();
        let b = rcgen::KeyPair::generate().unwrap();
        assert_eq!(
            node_id_of_key(&a.subject_public_key_info()),
            node_id_of_key(&a.subject_public_key_info())
        );
        assert_ne!(
            node_id_of_key(&a.subject_public_key_info()),
            node_id_of_key(&b.subject_public_key_info())
        );
    }

    #[test]
    fn garbage_is_no_certificate() {
        assert!(matches!(
            Proven::from_der(b"not a certificate"),
            Err(IdentityError::Unparsable(_))
        ));
    }
}
