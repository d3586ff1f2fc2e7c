//! Shoal's wire protocol, version 1 (specified in `schema/protocol.md`).
//!
//! Nodes talk over QUIC connections ([`crate::transport`]). Every request opens its own
//! bidirectional stream: the requester writes one request frame and finishes its side;
//! the responder writes one or more response frames and finishes. Many requests are in
//! flight on one connection at once, each on its own stream, so a large chunk transfer
//! never blocks a tree lookup.
//!
//! A frame is `u32 LE length || u8 kind || body`, where the length counts the kind byte
//! and the body. Every frame has a size limit checked before anything is allocated;
//! bodies are decoded with bounds checks, and an unknown kind, a short or long body, an
//! invalid path or volume name is a [`ProtocolError`]: the stream is closed with an
//! error frame and the problem logged, never a panic.

pub mod frame;
pub mod message;

use crate::encoding::DecodeError;

pub use frame::{
    FrameHeader, FrameReader, read_body, read_frame, read_header, response_limit, send_frame,
    write_frame,
};
pub use message::{Hello, ListPart, Request, Response, WireEntry};

/// The newest protocol version this build speaks. Version 2 (see
/// `schema/protocol.md`, "Versioning") added FIFO entries (kind 4) and symlinks with
/// any target; version 3 adds the change feed (`GetChanges`).
pub const PROTOCOL_VERSION: u16 = 3;

/// The first version with `GetChanges`: with an older peer the puller walks the tree.
pub const CHANGES_VERSION: u16 = 3;

/// Every protocol version this build speaks, newest first, each with its ALPN. Both
/// sides offer all of theirs in the TLS handshake and the server takes the first of its
/// list that the client offers too: the newest version both speak. The `Hello`s then
/// carry that version. A release that adds version 3 lists `(3, "shoal/3")` before
/// `(2, "shoal/2")`: during a rolling update its nodes talk 3 among themselves and 2
/// with the nodes not yet upgraded, and sync never stops (DESIGN.md, invariant 10).
pub const VERSIONS: &[(u16, &str)] = &[(PROTOCOL_VERSION, "shoal/3"), (2, "shoal/2")];

/// The ALPNs of [`VERSIONS`], in its order (for the TLS configuration).
pub fn alpns() -> impl Iterator<Item = &'static [u8]> {
    VERSIONS.iter().map(|(_, alpn)| alpn.as_bytes())
}

/// The version a negotiated ALPN names, if this build speaks it.
pub fn version_of_alpn(alpn: &[u8]) -> Option<u16> {
    VERSIONS
        .iter()
        .find(|(_, name)| name.as_bytes() == alpn)
        .map(|(version, _)| *version)
}

/// The protocol version of a connection: the one its negotiated ALPN names.
pub fn negotiated_version(connection: &s2n_quic::connection::Handle) -> Result<u16, ProtocolError> {
    let alpn = connection
        .application_protocol()
        .map_err(|e| ProtocolError::Malformed(format!("no protocol negotiated: {e}")))?;
    version_of_alpn(&alpn).ok_or_else(|| {
        ProtocolError::Malformed(format!(
            "negotiated protocol {} is not one this node speaks",
            String::from_utf8_lossy(&alpn)
        ))
    })
}

/// Largest frame other than chunk data.
pub const MAX_CONTROL_FRAME: usize = 4 << 20;
/// A chunk frame's bytes besides the chunk's: the header, the id and the length.
pub const CHUNK_FRAME_OVERHEAD: usize = 64;
/// Largest chunk-data frame: the largest chunk FastCDC allows plus its header.
pub const MAX_CHUNK_FRAME: usize = fastcdc::v2020::MAXIMUM_MAX as usize + CHUNK_FRAME_OVERHEAD;

/// Largest frame of a `GetChunks` answer between two nodes whose largest chunk is
/// `max_chunk` bytes (their chunk sizes are equal, `Hello` checks it).
pub fn chunk_frame_limit(max_chunk: u32) -> usize {
    (max_chunk as usize + CHUNK_FRAME_OVERHEAD).min(MAX_CHUNK_FRAME)
}
/// Entries in one `Entries` response; more come with `more = true`.
pub const MAX_ENTRIES_PER_RESPONSE: usize = 4096;
/// Bytes of encoded entries in one `Entries` response.
pub const MAX_ENTRIES_BYTES: usize = 2 << 20;
/// Files with at most this many chunks have their chunk list sent inline in `Entries`.
pub const MAX_INLINE_CHUNKS: usize = 16;
/// Pages asked for in one `GetChunkList` (a 16 MiB-chunk, 4 TiB file has ~64k pages).
pub const MAX_LIST_PAGES: usize = 1 << 20;
/// Chunk refs in one `ChunkList` answer (whole lists up to this size, or the pages
/// asked for): with the frame header, within `MAX_CONTROL_FRAME`.
pub const MAX_LIST_CHUNKS: usize = 100_000;
/// Chunk ids in one `GetChunks` request.
pub const MAX_CHUNKS_PER_REQUEST: usize = 64;
/// Volumes a node may announce.
pub const MAX_VOLUMES: usize = 1024;

/// Why a request was refused: the `u16` code of an `Error` frame, and the QUIC
/// application close code when the refusal ends the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// `Hello` with another protocol version (ends the connection).
    Version,
    /// A frame that does not decode, or a request out of place.
    Malformed,
    /// A request frame over its limit.
    TooLarge,
    /// `Hello` with other chunk sizes (ends the connection).
    ChunkParams,
    /// The volume is not synced by the responder.
    UnknownVolume,
    /// A store or stream error on the responder.
    Internal,
    /// `Hello` with a node id other than the one the peer's certificate proves, or from
    /// a revoked node (ends the connection).
    Identity,
    /// The requester may not hold the volume it names (per-volume access).
    Forbidden,
    /// The responder's operator paused the volume (or the whole node): asked again
    /// after resume.
    Paused,
}

impl ErrorCode {
    /// The code on the wire.
    pub fn number(self) -> u16 {
        match self {
            ErrorCode::Version => 1,
            ErrorCode::Malformed => 2,
            ErrorCode::TooLarge => 3,
            ErrorCode::ChunkParams => 4,
            ErrorCode::UnknownVolume => 5,
            ErrorCode::Internal => 6,
            ErrorCode::Identity => 7,
            ErrorCode::Forbidden => 8,
            ErrorCode::Paused => 9,
        }
    }

    /// Whether the responder closes the connection after it: the two nodes cannot talk.
    pub fn ends_connection(self) -> bool {
        matches!(
            self,
            ErrorCode::Version | ErrorCode::ChunkParams | ErrorCode::Identity
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("connection reset in the middle of a frame")]
    Truncated,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("unexpected message kind {0:#04x}")]
    UnexpectedKind(u8),
    /// The peer answered with an `Error` frame (its code may be one this node does not
    /// know).
    #[error("peer reported error {code}: {message}")]
    Remote { code: u16, message: String },
    /// This node refuses the request.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

impl ProtocolError {
    /// The code to send back for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::TooLarge { .. } => ErrorCode::TooLarge,
            ProtocolError::Refused { code, .. } => *code,
            ProtocolError::Io(_) | ProtocolError::Remote { .. } => ErrorCode::Internal,
            ProtocolError::Truncated
            | ProtocolError::Malformed(_)
            | ProtocolError::UnexpectedKind(_) => ErrorCode::Malformed,
        }
    }
}

impl From<DecodeError> for ProtocolError {
    fn from(e: DecodeError) -> Self {
        ProtocolError::Malformed(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_keep_their_wire_numbers() {
        let codes = [
            (ErrorCode::Version, 1),
            (ErrorCode::Malformed, 2),
            (ErrorCode::TooLarge, 3),
            (ErrorCode::ChunkParams, 4),
            (ErrorCode::UnknownVolume, 5),
            (ErrorCode::Internal, 6),
            (ErrorCode::Identity, 7),
            (ErrorCode::Forbidden, 8),
            (ErrorCode::Paused, 9),
        ];
        for (code, number) in codes {
            assert_eq!(code.number(), number);
            assert_eq!(
                code.ends_connection(),
                matches!(
                    code,
                    ErrorCode::Version | ErrorCode::ChunkParams | ErrorCode::Identity
                )
            );
        }
    }

    #[test]
    fn every_version_has_its_own_alpn_and_the_current_one_comes_first() {
        assert_eq!(VERSIONS[0].0, PROTOCOL_VERSION);
        assert_eq!(version_of_alpn(b"shoal/3"), Some(3));
        assert_eq!(version_of_alpn(b"shoal/2"), Some(2));
        assert_eq!(version_of_alpn(b"shoal/1"), None);
        assert_eq!(version_of_alpn(b"h3"), None);
        let alpns: Vec<&[u8]> = alpns().collect();
        assert_eq!(alpns.len(), VERSIONS.len());
        for (version, alpn) in VERSIONS {
            assert_eq!(version_of_alpn(alpn.as_bytes()), Some(*version));
        }
    }
}
