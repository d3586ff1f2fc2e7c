//! Framing: `u32 LE length || u8 kind || body`, the limit checked before the body is
//! read.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{MAX_CHUNK_FRAME, MAX_CONTROL_FRAME, ProtocolError, Request};

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    (kind, body): (u8, Vec<u8>),
) -> Result<(), ProtocolError> {
    let len = u32::try_from(body.len() + 1).map_err(|_| ProtocolError::TooLarge {
        len: body.len(),
        limit: MAX_CHUNK_FRAME,
    })?;
    let mut header = [0u8; 5];
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4] = kind;
    w.write_all(&header).await?;
    w.write_all(&body).await?;
    Ok(())
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
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Err(ProtocolError::Malformed("empty frame".into()));
    }
    if len > limit {
        return Err(ProtocolError::TooLarge { len, limit });
    }
    Ok(Some(FrameHeader {
        kind: header[4],
        body_len: len - 1,
    }))
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
