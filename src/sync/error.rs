//! What can go wrong while syncing with a peer.

use crate::protocol::ProtocolError;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("connection: {0}")]
    Connection(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Fs(#[from] crate::volume_fs::FsError),
    #[error("{0}")]
    Refused(String),
}
