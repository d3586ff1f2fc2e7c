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

pub use frame::{read_frame, response_limit, write_frame};
pub use message::{Hello, ListPart, Request, Response, WireEntry};

/// Protocol version carried in `Hello`; a peer with another version is refused.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest frame other than chunk data.
pub const MAX_CONTROL_FRAME: usize = 4 << 20;
/// Largest chunk-data frame: the largest chunk FastCDC allows plus its header.
pub const MAX_CHUNK_FRAME: usize = fastcdc::v2020::MAXIMUM_MAX as usize + 64;
/// Entries in one `Entries` response; more come with `more = true`.
pub const MAX_ENTRIES_PER_RESPONSE: usize = 4096;
/// Bytes of encoded entries in one `Entries` response.
pub const MAX_ENTRIES_BYTES: usize = 2 << 20;
/// Files with at most this many chunks have their chunk list sent inline in `Entries`.
pub const MAX_INLINE_CHUNKS: usize = 16;
/// Pages asked for in one `GetChunkList` (a 16 MiB-chunk, 4 TiB file has ~64k pages).
pub const MAX_LIST_PAGES: usize = 1 << 20;
/// Chunk ids in one `GetChunks` request.
pub const MAX_CHUNKS_PER_REQUEST: usize = 64;
/// Volumes a node may announce.
pub const MAX_VOLUMES: usize = 1024;

/// Error codes, in `Error` frames and as QUIC application close codes.
pub mod code {
    pub const VERSION: u16 = 1;
    pub const MALFORMED: u16 = 2;
    pub const TOO_LARGE: u16 = 3;
    pub const CHUNK_PARAMS: u16 = 4;
    pub const UNKNOWN_VOLUME: u16 = 5;
    pub const INTERNAL: u16 = 6;
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
    #[error("peer reported error {code}: {message}")]
    Remote { code: u16, message: String },
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

impl ProtocolError {
    /// The code to send back for this error.
    pub fn code(&self) -> u16 {
        match self {
            ProtocolError::TooLarge { .. } => code::TOO_LARGE,
            ProtocolError::Remote { code, .. } => *code,
            ProtocolError::Io(_) => code::INTERNAL,
            _ => code::MALFORMED,
        }
    }
}

impl From<DecodeError> for ProtocolError {
    fn from(e: DecodeError) -> Self {
        ProtocolError::Malformed(e.0)
    }
}
