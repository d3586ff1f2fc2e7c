//! What can go wrong while syncing with a peer, said so that the caller can tell the
//! peer's fault (try another peer, or reconnect) from this node's own (a local disk or
//! store error: no other peer would do better).

use std::net::SocketAddr;

use crate::pathname::InvalidPath;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::unsyncable::Cause;
use crate::volume_fs::FsError;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The peer broke the protocol, or answered with an `Error` frame.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The connection failed or timed out.
    #[error("connection: {0}")]
    Connection(String),
    /// The peer has no open connection (it left, or was never reached).
    #[error("connection: not connected")]
    NotConnected,
    /// The peer answered a request with a response of another kind.
    #[error("unexpected answer to {request}: {answer}")]
    Unexpected {
        request: &'static str,
        answer: String,
    },
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {0}")]
    PeerVersion(u16),
    /// The peer is not who it says, or is not allowed in: what its certificate proves
    /// does not match its `Hello`, or it was revoked.
    #[error("peer identity: {0}")]
    Identity(String),
    /// The address reached this node itself (a peer list that includes our own address).
    #[error("the peer is this node itself")]
    SelfConnection,
    /// The peer sent a chunk list that its content id does not vouch for.
    #[error("peer {0} sent a chunk list that does not match its content id")]
    BadChunkList(SocketAddr),
    /// The peer's version vector cannot be merged with ours within the bound.
    #[error(transparent)]
    Vector(#[from] crate::entry::VectorError),
    /// A name from the peer makes no valid path here (too long, say).
    #[error(transparent)]
    InvalidPath(#[from] InvalidPath),
    /// This node's index.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// This node's volume, through its safe file-system access.
    #[error(transparent)]
    Fs(#[from] crate::volume_fs::FsError),
    /// This node's disk otherwise: staging files, conflict copies.
    #[error("{what}: {source}")]
    LocalIo {
        what: String,
        source: std::io::Error,
    },
    /// A round would hold more than its memory budget (directories still to compare):
    /// it ends there, and what it applied stays.
    #[error("{0}")]
    OverBudget(String),
    /// A task of this node failed (panicked or was cancelled).
    #[error("{what} task failed: {source}")]
    Task {
        what: &'static str,
        source: tokio::task::JoinError,
    },
}

impl SyncError {
    /// This node's own failure (its disk, its index, its tasks): asking another peer
    /// would not help.
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            SyncError::Store(_)
                | SyncError::Fs(_)
                | SyncError::LocalIo { .. }
                | SyncError::Task { .. }
        )
    }

    /// This node's disk is full (`ENOSPC` while writing a volume).
    pub fn is_no_space(&self) -> bool {
        let source = match self {
            SyncError::LocalIo { source, .. } => source,
            SyncError::Fs(FsError::Io { source, .. }) => source,
            _ => return false,
        };
        source.raw_os_error() == Some(libc::ENOSPC)
    }

    /// The connection to the peer is unusable: the peer's task reconnects. A refusal
    /// for one volume (the peer's access rules, or its operator's pause) leaves the
    /// others syncing.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            SyncError::Protocol(ProtocolError::Remote { code, .. }) => {
                *code != ErrorCode::Forbidden.number() && *code != ErrorCode::Paused.number()
            }
            SyncError::Connection(_) | SyncError::NotConnected | SyncError::Protocol(_) => true,
            _ => false,
        }
    }

    /// The peer's operator paused the volume (or the peer): not a failure of this node.
    pub fn is_peer_paused(&self) -> bool {
        matches!(self, SyncError::Protocol(ProtocolError::Remote { code, .. }) if *code == ErrorCode::Paused.number())
    }

    /// Why this node's file system refused one name of the volume, if this error is
    /// such a refusal: a name too long for it or in an encoding it does not take, a
    /// kind of item it cannot make, a directory this node may not write. A full disk or
    /// an I/O error is not (they are the node's trouble, not the name's).
    pub fn refusal(&self) -> Option<Cause> {
        match self {
            SyncError::InvalidPath(InvalidPath::PathTooLong(_) | InvalidPath::NameTooLong(_)) => {
                Some(Cause::PathTooLong)
            }
            SyncError::Fs(FsError::CannotMake { .. }) => Some(Cause::TypeNotSupported),
            SyncError::Fs(FsError::Io { source, .. }) => {
                source.raw_os_error().and_then(Cause::of_errno)
            }
            _ => None,
        }
    }

    /// The operating system's error underneath, if there is one.
    pub fn os_error(&self) -> Option<&std::io::Error> {
        match self {
            SyncError::Fs(FsError::Io { source, .. } | FsError::CannotMake { source, .. })
            | SyncError::LocalIo { source, .. } => Some(source),
            _ => None,
        }
    }

    /// A local I/O error, with what was being done.
    pub fn local(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SyncError {
        let what = what.into();
        move |source| SyncError::LocalIo { what, source }
    }

    /// An answer of the wrong kind to `request`.
    pub fn unexpected(request: &'static str, answer: &impl std::fmt::Debug) -> SyncError {
        SyncError::Unexpected {
            request,
            answer: format!("{answer:?}"),
        }
    }
}
