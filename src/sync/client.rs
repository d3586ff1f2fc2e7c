//! The requesting side of a connection: one request per stream, its answers read as
//! they arrive.

use s2n_quic::connection::Handle;

use super::SyncError;
use crate::protocol::{self, ProtocolError, Request, Response};

/// Sends one request on a new stream and reads its single response.
pub async fn request(handle: &mut Handle, request: &Request) -> Result<Response, SyncError> {
    let mut responses = open_request(handle, request).await?;
    let response = responses.next().await?.ok_or(ProtocolError::Truncated)?;
    match response {
        Response::Error { code, message } => Err(ProtocolError::Remote { code, message }.into()),
        other => Ok(other),
    }
}

/// The response frames of one request, read as they arrive.
pub struct Responses {
    recv: s2n_quic::stream::ReceiveStream,
    limit: usize,
}

/// How long a peer may take to send the next frame of an answer. A live connection
/// whose peer never answers would otherwise hold the volume lock of the pull waiting
/// on it (QUIC keep-alives stop the idle timeout from ending it).
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl Responses {
    pub async fn next(&mut self) -> Result<Option<Response>, SyncError> {
        let frame = tokio::time::timeout(
            ANSWER_TIMEOUT,
            protocol::read_frame(&mut self.recv, self.limit),
        )
        .await
        .map_err(|_| {
            SyncError::Connection(format!(
                "the peer sent nothing for {} s",
                ANSWER_TIMEOUT.as_secs()
            ))
        })??;
        match frame {
            Some((kind, body)) => Ok(Some(Response::decode(kind, &body)?)),
            None => Ok(None),
        }
    }
}

/// Opens a stream, sends `request` and finishes the sending side.
pub async fn open_request(handle: &mut Handle, request: &Request) -> Result<Responses, SyncError> {
    let stream = handle
        .open_bidirectional_stream()
        .await
        .map_err(|e| SyncError::Connection(e.to_string()))?;
    let (recv, mut send) = stream.split();
    protocol::write_frame(&mut send, request.encode()).await?;
    send.close()
        .await
        .map_err(|e| SyncError::Connection(e.to_string()))?;
    Ok(Responses {
        recv,
        limit: protocol::response_limit(request),
    })
}
