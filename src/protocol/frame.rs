//! Framing: `u32 LE length || u8 kind || body`, the limit checked before the body is
//! read.
//!
//! Any byte stream can carry frames ([`write_frame`], [`read_frame`]); on a QUIC stream
//! answers go with fewer copies: [`send_frame`] hands the body's buffers to the stream
//! as they are, and [`FrameReader`] takes chunk data as received ([`FrameReader::take`]).

use bytes::{Buf, Bytes, BytesMut};
use s2n_quic::stream::{ReceiveStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{MAX_CHUNK_FRAME, MAX_CONTROL_FRAME, ProtocolError, Request};

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    (kind, body): (u8, Vec<u8>),
) -> Result<(), ProtocolError> {
    w.write_all(&header_bytes(kind, body.len())?).await?;
    w.write_all(&body).await?;
    Ok(())
}

/// The 5 bytes that open a frame of `kind` whose body is `body_len` bytes long.
fn header_bytes(kind: u8, body_len: usize) -> Result<[u8; 5], ProtocolError> {
    let len = u32::try_from(body_len + 1).map_err(|_| ProtocolError::TooLarge {
        len: body_len,
        limit: MAX_CHUNK_FRAME,
    })?;
    let mut header = [0u8; 5];
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4] = kind;
    Ok(header)
}

/// Sends one frame on a QUIC stream, its body `body` followed by `tail`: the buffers
/// are handed to the stream as they are (s2n-quic keeps them until the peer
/// acknowledges them), none is copied. Returns the frame's length.
pub async fn send_frame(
    send: &mut SendStream,
    kind: u8,
    body: Vec<u8>,
    tail: Vec<Bytes>,
) -> Result<usize, ProtocolError> {
    let body_len = body.len() + tail.iter().map(Bytes::len).sum::<usize>();
    let header = header_bytes(kind, body_len)?;
    let mut parts = Vec::with_capacity(2 + tail.len());
    parts.push(Bytes::copy_from_slice(&header));
    parts.push(Bytes::from(body));
    parts.extend(tail);
    parts.retain(|part| !part.is_empty());
    send.send_vectored(&mut parts)
        .await
        .map_err(|e| ProtocolError::Io(e.into()))?;
    Ok(header.len() + body_len)
}

/// Reads one frame; `None` at a clean end of stream. Frames over `limit` bytes are
/// refused before their body is read.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: usize,
) -> Result<Option<(u8, Vec<u8>)>, ProtocolError> {
    let Some(header) = read_header(r, limit).await? else {
        return Ok(None);
    };
    Ok(Some((header.kind, read_body(r, &header).await?)))
}

/// A frame's header: its kind and the length of the body that follows.
#[derive(Clone, Copy, Debug)]
pub struct FrameHeader {
    pub kind: u8,
    pub body_len: usize,
}

/// Reads a frame's header (`None` at a clean end of stream), refusing a length over
/// `limit`: what the body will cost is known before anything is allocated for it.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: usize,
) -> Result<Option<FrameHeader>, ProtocolError> {
    let mut header = [0u8; 5];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(ProtocolError::Truncated),
            n => got += n,
        }
    }
    parse_header(header, limit).map(Some)
}

/// A frame header's fields, its length checked against `limit`.
fn parse_header(header: [u8; 5], limit: usize) -> Result<FrameHeader, ProtocolError> {
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Err(ProtocolError::Malformed("empty frame".into()));
    }
    if len > limit {
        return Err(ProtocolError::TooLarge { len, limit });
    }
    Ok(FrameHeader {
        kind: header[4],
        body_len: len - 1,
    })
}

/// Reads the body of the frame whose header was just read.
pub async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    header: &FrameHeader,
) -> Result<Vec<u8>, ProtocolError> {
    let mut body = vec![0u8; header.body_len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    })?;
    Ok(body)
}

/// Reads the frames of a QUIC stream from the buffers s2n-quic hands over (what it
/// received by the time it is asked: about a packet's worth while a transfer streams).
pub struct FrameReader {
    recv: ReceiveStream,
    /// What the stream gave and was not read yet (the rest of its last buffer).
    pending: Bytes,
}

impl FrameReader {
    pub fn new(recv: ReceiveStream) -> Self {
        FrameReader {
            recv,
            pending: Bytes::new(),
        }
    }

    /// Reads a frame's header (`None` at a clean end of stream), refusing a length
    /// over `limit` ([`read_header`]).
    pub async fn header(&mut self, limit: usize) -> Result<Option<FrameHeader>, ProtocolError> {
        let mut header = [0u8; 5];
        if !self.read_exact(&mut header).await? {
            return Ok(None);
        }
        parse_header(header, limit).map(Some)
    }

    /// Reads the next `len` bytes into one buffer.
    pub async fn body(&mut self, len: usize) -> Result<Vec<u8>, ProtocolError> {
        let mut body = vec![0u8; len];
        if !self.read_exact(&mut body).await? && len > 0 {
            return Err(ProtocolError::Truncated);
        }
        Ok(body)
    }

    /// Fills `out` from the stream; `false` if the stream ended before the first byte.
    pub async fn read_exact(&mut self, out: &mut [u8]) -> Result<bool, ProtocolError> {
        let mut got = 0;
        while got < out.len() {
            if !self.fill().await? {
                return match got {
                    0 => Ok(false),
                    _ => Err(ProtocolError::Truncated),
                };
            }
            let n = (out.len() - got).min(self.pending.len());
            out[got..got + n].copy_from_slice(&self.pending[..n]);
            self.pending.advance(n);
            got += n;
        }
        Ok(true)
    }

    /// The next `len` bytes in one buffer: the received one itself when it holds them
    /// all, else the pieces they arrived in joined (one copy). Kept in pieces, they would
    /// be hashed piece by piece, at a fraction of BLAKE3's speed: it hashes 16 KiB at once
    /// (AVX-512), a piece is about a packet.
    pub async fn take(&mut self, len: usize) -> Result<Bytes, ProtocolError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        if !self.fill().await? {
            return Err(ProtocolError::Truncated);
        }
        if self.pending.len() >= len {
            return Ok(self.pending.split_to(len));
        }
        let mut joined = BytesMut::with_capacity(len);
        while joined.len() < len {
            if !self.fill().await? {
                return Err(ProtocolError::Truncated);
            }
            let n = (len - joined.len()).min(self.pending.len());
            joined.extend_from_slice(&self.pending[..n]);
            self.pending.advance(n);
        }
        Ok(joined.freeze())
    }

    /// Makes sure something is pending; `false` at the end of the stream.
    async fn fill(&mut self) -> Result<bool, ProtocolError> {
        while self.pending.is_empty() {
            match self.recv.receive().await {
                Ok(Some(bytes)) => self.pending = bytes,
                Ok(None) => return Ok(false),
                Err(e) => return Err(ProtocolError::Io(e.into())),
            }
        }
        Ok(true)
    }
}

/// The frame size limit for a response to `request`.
pub fn response_limit(request: &Request) -> usize {
    match request {
        Request::GetChunks { .. } => MAX_CHUNK_FRAME,
        _ => MAX_CONTROL_FRAME,
    }
}

#[cfg(test)]
mod tests {
    use super::super::message::kind;
    use super::*;

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let mut huge = Vec::new();
        huge.extend_from_slice(&(u32::MAX).to_le_bytes());
        huge.push(kind::HELLO);
        assert!(matches!(
            read_frame(&mut &huge[..], MAX_CONTROL_FRAME).await,
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut short = Vec::new();
        write_frame(&mut short, Request::Notify { volume: "v".into() }.encode())
            .await
            .unwrap();
        short.pop();
        assert!(matches!(
            read_frame(&mut &short[..], MAX_CONTROL_FRAME).await,
            Err(ProtocolError::Truncated)
        ));
        assert!(
            read_frame(&mut &b""[..], MAX_CONTROL_FRAME)
                .await
                .unwrap()
                .is_none()
        );
        assert!(Request::decode(0x42, b"").is_err());
    }
}
