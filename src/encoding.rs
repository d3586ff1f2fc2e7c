//! Little-endian integers and length-prefixed byte strings, as the store's encodings
//! ([`crate::store::codec`]) and the wire protocol ([`crate::protocol`]) lay them out.
//!
//! Decoding never trusts a length: every read is bounds-checked and names the field it
//! was reading, so a short, long or garbled value is a [`DecodeError`], never a panic.

use crate::ids::HASH_LEN;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// Bounds-checked reader over one value.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError(format!("value ends inside {what}")));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }

    pub fn hash(&mut self, what: &str) -> Result<[u8; HASH_LEN], DecodeError> {
        self.array(what)
    }

    /// A byte string prefixed by its u16 length.
    pub fn short_bytes(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    pub fn finish(self, what: &str) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError(format!(
                "{} unexpected bytes after {what}",
                self.bytes.len()
            )))
        }
    }
}

pub fn put_short_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Names are at most 255 bytes and symlink targets at most PATH_MAX (4096); both fit.
    let len = u16::try_from(bytes.len()).expect("short byte strings are bounded by PATH_MAX");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}
