//! The messages: every request and response, encoded and decoded with bounds checks.

use bytes::Bytes;

use super::{
    FrameReader, MAX_CHUNKS_PER_REQUEST, MAX_ENTRIES_PER_RESPONSE, MAX_INLINE_CHUNKS,
    MAX_LIST_PAGES, MAX_VOLUMES, ProtocolError,
};
use crate::chunking::{ChunkParams, ChunkRef};
use crate::encoding::{DecodeError, Reader, put_short_bytes};
use crate::entry::Entry;
use crate::ids::{ChunkId, ContentId, HASH_LEN, NodeId, TreeHash};
use crate::pathname::{VolPath, validate_name};
use crate::store::codec;
use crate::store::{FeedId, FeedMark};
use crate::tree::TreeNode;

pub(super) mod kind {
    pub const HELLO: u8 = 0x01;
    pub const GET_DIR: u8 = 0x02;
    pub const GET_ENTRIES: u8 = 0x03;
    pub const GET_CHUNK_LIST: u8 = 0x04;
    pub const GET_CHUNKS: u8 = 0x05;
    pub const NOTIFY: u8 = 0x06;
    pub const REVOCATIONS: u8 = 0x07;
    pub const GET_CHANGES: u8 = 0x08;
    pub const HELLO_REPLY: u8 = 0x81;
    pub const DIR: u8 = 0x82;
    pub const ENTRIES: u8 = 0x83;
    pub const CHUNK_LIST: u8 = 0x84;
    pub const CHUNK: u8 = 0x85;
    pub const CHUNK_MISSING: u8 = 0x86;
    pub const ACK: u8 = 0x87;
    pub const CHUNK_PAGES: u8 = 0x88;
    pub const CHANGES: u8 = 0x89;
    pub const CHANGES_GONE: u8 = 0x8a;
    pub const ERROR: u8 = 0xff;
}

/// What a node says of itself when a connection opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub node_id: NodeId,
    pub chunk_params: ChunkParams,
    pub volumes: Vec<String>,
}

/// Bytes one page takes in `ChunkPages`: its u32 chunk count and its hash.
const PAGE_HASH_LEN: usize = 4 + HASH_LEN;

/// What an entry of an `Entries` response takes in the frame besides its name, its
/// encoded entry and its inline chunk refs: at most 48 bytes (name length 2, subtree
/// flag and hash 1 + 32, entry length 4, chunk list flag, length and count 1 + 4 + 4),
/// counted as 56 as `schema/protocol.md` specifies.
const ENTRY_OVERHEAD: usize = 56;
const _: () = assert!(ENTRY_OVERHEAD >= 2 + 1 + HASH_LEN + 4 + 1 + 4 + 4);

/// One child of a directory as a peer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireEntry {
    pub name: Vec<u8>,
    pub entry: Entry,
    /// The child's sync hash (content and histories, [`TreeNode::sync_hash`]) when it
    /// is a live directory.
    pub subtree: Option<TreeHash>,
    /// A small file's chunk list, sent inline to save a request per file.
    pub chunks: Option<Vec<ChunkRef>>,
}

impl WireEntry {
    /// `short name || u8 subtree flag [|| hash] || u32 LE entry length || entry ||
    /// u8 chunk list flag [|| u32 LE length || chunk list]`, as in `Entries`.
    fn encode_into(&self, out: &mut Vec<u8>) {
        put_short_bytes(out, &self.name);
        match &self.subtree {
            Some(hash) => {
                out.push(1);
                out.extend_from_slice(hash.as_bytes());
            }
            None => out.push(0),
        }
        let encoded = codec::encode_entry(&self.entry);
        out.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        out.extend_from_slice(&encoded);
        match &self.chunks {
            Some(chunks) => {
                out.push(1);
                let list = codec::encode_chunk_list(chunks);
                out.extend_from_slice(&(list.len() as u32).to_le_bytes());
                out.extend_from_slice(&list);
            }
            None => out.push(0),
        }
    }

    /// Reads what [`WireEntry::encode_into`] wrote, checking the name, the entry's
    /// canonical form and the inline chunk list's bound.
    fn decode_from(r: &mut Reader<'_>) -> Result<WireEntry, ProtocolError> {
        let name = r.short_bytes("entry name")?.to_vec();
        validate_name(&name).map_err(|e| ProtocolError::Malformed(format!("entry name: {e}")))?;
        let subtree = match read_flag(r, "subtree flag")? {
            false => None,
            true => Some(TreeHash(r.hash("subtree hash")?)),
        };
        let len = r.u32("entry length")? as usize;
        let entry = codec::decode_canonical_entry(r.take(len, "entry")?)?;
        let chunks = match read_flag(r, "chunk list flag")? {
            false => None,
            true => {
                let len = r.u32("chunk list length")? as usize;
                let list = codec::decode_chunk_list(r.take(len, "chunk list")?)?;
                if list.len() > MAX_INLINE_CHUNKS {
                    return Err(ProtocolError::Malformed(format!(
                        "inline chunk list of {} chunks",
                        list.len()
                    )));
                }
                Some(list)
            }
        };
        Ok(WireEntry {
            name,
            entry,
            subtree,
            chunks,
        })
    }

    /// What the responder counts of this entry toward `MAX_ENTRIES_BYTES`: never less
    /// than it takes in the frame.
    pub fn counted_len(&self) -> usize {
        self.name.len()
            + codec::encode_entry(&self.entry).len()
            + self
                .chunks
                .as_ref()
                .map_or(0, |c| c.len() * codec::CHUNK_REF_LEN)
            + ENTRY_OVERHEAD
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello(Hello),
    /// The tree node of a directory (the root is the empty path).
    GetDir {
        volume: String,
        dir: VolPath,
    },
    /// The children of `dir` (tombstones included) with `start <= name < end` (or
    /// `start < name` when `after` is set, to continue after the last name received).
    GetEntries {
        volume: String,
        dir: VolPath,
        start: Vec<u8>,
        after: bool,
        end: Option<Vec<u8>>,
    },
    /// The chunk list of a file, if it still has that content: whole, as page hashes
    /// only, or the chunks of some pages.
    GetChunkList {
        volume: String,
        path: VolPath,
        content_id: ContentId,
        part: ListPart,
    },
    /// Chunk bytes, by id.
    GetChunks {
        ids: Vec<ChunkId>,
    },
    /// "My volume changed": the receiver should pull from the sender soon.
    Notify {
        volume: String,
    },
    /// The names of the volume changed after `since` in the responder's change feed,
    /// at most `max` of them (protocol version 3). A feed id of 0 (never a feed's)
    /// asks only where the feed is now: the answer is `ChangesGone`.
    GetChanges {
        volume: String,
        since: FeedMark,
        max: u32,
    },
    /// The sender's newest CA-signed revocation list (its text, at most
    /// [`crate::revocation::MAX_FILE`] bytes): the receiver adopts it if it is newer.
    Revocations {
        list: String,
    },
}

/// Which part of a chunk list a `GetChunkList` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListPart {
    Whole,
    /// The list's pages ([`crate::chunking::chunk_list_pages`]) as (chunk count, hash).
    PageHashes,
    /// The chunks of these pages (by index, ascending), concatenated.
    Pages(Vec<u32>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Hello(Hello),
    Dir(Option<TreeNode>),
    Entries {
        entries: Vec<WireEntry>,
        more: bool,
    },
    ChunkList(Option<Vec<ChunkRef>>),
    ChunkPages(Option<Vec<(u32, [u8; 32])>>),
    /// Chunk bytes, by id: the buffer they were read into (sent as it is:
    /// [`Response::into_frame`]) or received in ([`Response::read`]).
    Chunk {
        id: ChunkId,
        data: Bytes,
    },
    ChunkMissing {
        id: ChunkId,
    },
    /// The entries of the names changed after the mark asked for, each with its
    /// directory (in entry-key order: a directory before what it holds); `high` is the
    /// mark they bring the requester to, `more` says the feed holds changes past it.
    Changes {
        high: FeedMark,
        more: bool,
        entries: Vec<(VolPath, WireEntry)>,
    },
    /// The feed does not reach back to the mark asked for (or has another id): the
    /// requester walks the tree. `current` is where the feed is now.
    ChangesGone {
        current: FeedMark,
    },
    Ack,
    Error {
        code: u16,
        message: String,
    },
}

/// `u8 0`, or `u8 1` followed by the payload (which runs to the end of the frame).
fn put_optional(out: &mut Vec<u8>, payload: Option<Vec<u8>>) {
    match payload {
        Some(payload) => {
            out.push(1);
            out.extend_from_slice(&payload);
        }
        None => out.push(0),
    }
}

/// `u64 LE feed id || u64 LE number`.
fn put_mark(out: &mut Vec<u8>, mark: FeedMark) {
    out.extend_from_slice(&mark.feed.0.to_le_bytes());
    out.extend_from_slice(&mark.seq.to_le_bytes());
}

fn read_mark(r: &mut Reader<'_>) -> Result<FeedMark, ProtocolError> {
    Ok(FeedMark {
        feed: FeedId(r.u64("feed id")?),
        seq: r.u64("feed number")?,
    })
}

fn read_volume(r: &mut Reader<'_>) -> Result<String, ProtocolError> {
    let bytes = r.short_bytes("volume name")?;
    let name = std::str::from_utf8(bytes)
        .map_err(|_| ProtocolError::Malformed("volume name is not UTF-8".into()))?;
    crate::config::validate_volume_name(name)
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    Ok(name.to_string())
}

fn read_path(r: &mut Reader<'_>, what: &str) -> Result<VolPath, ProtocolError> {
    VolPath::parse(r.short_bytes(what)?)
        .map_err(|e| ProtocolError::Malformed(format!("{what}: {e}")))
}

fn read_name_bound(r: &mut Reader<'_>, what: &str) -> Result<Vec<u8>, ProtocolError> {
    let name = r.short_bytes(what)?;
    if name.len() > crate::pathname::MAX_NAME_LEN || name.contains(&0) || name.contains(&b'/') {
        return Err(ProtocolError::Malformed(format!(
            "{what} is not a file name"
        )));
    }
    Ok(name.to_vec())
}

fn read_flag(r: &mut Reader<'_>, what: &str) -> Result<bool, ProtocolError> {
    match r.u8(what)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(ProtocolError::Malformed(format!(
            "{what} is {other}, not 0 or 1"
        ))),
    }
}

fn encode_hello(h: &Hello) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&h.version.to_le_bytes());
    out.extend_from_slice(&h.node_id.0.to_le_bytes());
    for n in [h.chunk_params.min, h.chunk_params.avg, h.chunk_params.max] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&(h.volumes.len() as u16).to_le_bytes());
    for v in &h.volumes {
        put_short_bytes(&mut out, v.as_bytes());
    }
    out
}

fn decode_hello(body: &[u8]) -> Result<Hello, ProtocolError> {
    let mut r = Reader::new(body);
    let version = r.u16("version")?;
    if !super::VERSIONS.iter().any(|(known, _)| *known == version) {
        // Nothing after the version is read: a later version may lay it out otherwise
        // (every version this build speaks lays it out alike).
        return Ok(Hello {
            version,
            node_id: NodeId(0),
            chunk_params: ChunkParams::DEFAULT,
            volumes: vec![],
        });
    }
    let node_id = NodeId(r.u64("node id")?);
    let (min, avg, max) = (
        r.u32("chunk sizes")?,
        r.u32("chunk sizes")?,
        r.u32("chunk sizes")?,
    );
    let chunk_params = ChunkParams::new(min, avg, max)
        .map_err(|e| ProtocolError::Malformed(format!("hello: {e}")))?;
    let count = usize::from(r.u16("volume count")?);
    if count > MAX_VOLUMES {
        return Err(ProtocolError::Malformed(format!(
            "hello announces {count} volumes"
        )));
    }
    let volumes = (0..count)
        .map(|_| read_volume(&mut r))
        .collect::<Result<_, _>>()?;
    r.finish("hello")?;
    Ok(Hello {
        version,
        node_id,
        chunk_params,
        volumes,
    })
}

impl Request {
    /// The volume the request is about, if it names one.
    pub fn volume(&self) -> Option<&str> {
        match self {
            Request::GetDir { volume, .. }
            | Request::GetEntries { volume, .. }
            | Request::GetChunkList { volume, .. }
            | Request::GetChanges { volume, .. }
            | Request::Notify { volume } => Some(volume),
            Request::Hello(_) | Request::GetChunks { .. } | Request::Revocations { .. } => None,
        }
    }

    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut out = Vec::new();
        let kind = match self {
            Request::Hello(h) => {
                out = encode_hello(h);
                kind::HELLO
            }
            Request::GetDir { volume, dir } => {
                put_short_bytes(&mut out, volume.as_bytes());
                put_short_bytes(&mut out, dir.as_bytes());
                kind::GET_DIR
            }
            Request::GetEntries {
                volume,
                dir,
                start,
                after,
                end,
            } => {
                put_short_bytes(&mut out, volume.as_bytes());
                put_short_bytes(&mut out, dir.as_bytes());
                put_short_bytes(&mut out, start);
                out.push(u8::from(*after));
                match end {
                    Some(end) => {
                        out.push(1);
                        put_short_bytes(&mut out, end);
                    }
                    None => out.push(0),
                }
                kind::GET_ENTRIES
            }
            Request::GetChunkList {
                volume,
                path,
                content_id,
                part,
            } => {
                put_short_bytes(&mut out, volume.as_bytes());
                put_short_bytes(&mut out, path.as_bytes());
                out.extend_from_slice(content_id.as_bytes());
                match part {
                    ListPart::Whole => out.push(0),
                    ListPart::PageHashes => out.push(1),
                    ListPart::Pages(pages) => {
                        out.push(2);
                        out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
                        for page in pages {
                            out.extend_from_slice(&page.to_le_bytes());
                        }
                    }
                }
                kind::GET_CHUNK_LIST
            }
            Request::GetChunks { ids } => {
                out.extend_from_slice(&(ids.len() as u16).to_le_bytes());
                for id in ids {
                    out.extend_from_slice(id.as_bytes());
                }
                kind::GET_CHUNKS
            }
            Request::Notify { volume } => {
                put_short_bytes(&mut out, volume.as_bytes());
                kind::NOTIFY
            }
            Request::GetChanges { volume, since, max } => {
                put_short_bytes(&mut out, volume.as_bytes());
                put_mark(&mut out, *since);
                out.extend_from_slice(&max.to_le_bytes());
                kind::GET_CHANGES
            }
            Request::Revocations { list } => {
                let len = u32::try_from(list.len()).expect("lists are bounded by MAX_FILE");
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(list.as_bytes());
                kind::REVOCATIONS
            }
        };
        (kind, out)
    }

    pub fn decode(kind: u8, body: &[u8]) -> Result<Request, ProtocolError> {
        let mut r = Reader::new(body);
        let request = match kind {
            kind::HELLO => return Ok(Request::Hello(decode_hello(body)?)),
            kind::GET_DIR => Request::GetDir {
                volume: read_volume(&mut r)?,
                dir: read_path(&mut r, "directory")?,
            },
            kind::GET_ENTRIES => {
                let volume = read_volume(&mut r)?;
                let dir = read_path(&mut r, "directory")?;
                let start = read_name_bound(&mut r, "range start")?;
                let after = read_flag(&mut r, "range start flag")?;
                let end = match r.u8("range end flag")? {
                    0 => None,
                    1 => Some(read_name_bound(&mut r, "range end")?),
                    other => {
                        return Err(ProtocolError::Malformed(format!("range end flag {other}")));
                    }
                };
                Request::GetEntries {
                    volume,
                    dir,
                    start,
                    after,
                    end,
                }
            }
            kind::GET_CHUNK_LIST => Request::GetChunkList {
                volume: read_volume(&mut r)?,
                path: read_path(&mut r, "path")?,
                content_id: ContentId(r.hash("content id")?),
                part: match r.u8("list part")? {
                    0 => ListPart::Whole,
                    1 => ListPart::PageHashes,
                    2 => {
                        let count = r.u32("page count")? as usize;
                        if count > MAX_LIST_PAGES {
                            return Err(ProtocolError::Malformed(format!(
                                "{count} chunk list pages asked"
                            )));
                        }
                        ListPart::Pages(
                            (0..count)
                                .map(|_| r.u32("page index"))
                                .collect::<Result<_, _>>()?,
                        )
                    }
                    other => return Err(ProtocolError::Malformed(format!("list part {other}"))),
                },
            },
            kind::GET_CHUNKS => {
                let count = usize::from(r.u16("chunk count")?);
                if count > MAX_CHUNKS_PER_REQUEST {
                    return Err(ProtocolError::Malformed(format!(
                        "{count} chunks requested at once"
                    )));
                }
                Request::GetChunks {
                    ids: (0..count)
                        .map(|_| r.hash("chunk id").map(ChunkId))
                        .collect::<Result<_, _>>()?,
                }
            }
            kind::NOTIFY => Request::Notify {
                volume: read_volume(&mut r)?,
            },
            kind::GET_CHANGES => {
                let volume = read_volume(&mut r)?;
                let since = read_mark(&mut r)?;
                let max = r.u32("change count")?;
                if max as usize > MAX_ENTRIES_PER_RESPONSE {
                    return Err(ProtocolError::Malformed(format!(
                        "{max} changes asked at once"
                    )));
                }
                Request::GetChanges { volume, since, max }
            }
            kind::REVOCATIONS => {
                let len = r.u32("revocation list length")?;
                if u64::from(len) > crate::revocation::MAX_FILE {
                    return Err(ProtocolError::Malformed(format!(
                        "revocation list of {len} bytes"
                    )));
                }
                let text = r.take(len as usize, "revocation list")?;
                Request::Revocations {
                    list: String::from_utf8(text.to_vec()).map_err(|_| {
                        ProtocolError::Malformed("revocation list is not UTF-8".into())
                    })?,
                }
            }
            other => return Err(ProtocolError::UnexpectedKind(other)),
        };
        r.finish("request")?;
        Ok(request)
    }
}

impl Response {
    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut out = Vec::new();
        let kind = match self {
            Response::Hello(h) => {
                out = encode_hello(h);
                kind::HELLO_REPLY
            }
            Response::Dir(node) => {
                put_optional(&mut out, node.as_ref().map(codec::encode_tree_node));
                kind::DIR
            }
            Response::Entries { entries, more } => {
                out.push(u8::from(*more));
                out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for e in entries {
                    e.encode_into(&mut out);
                }
                kind::ENTRIES
            }
            Response::Changes {
                high,
                more,
                entries,
            } => {
                put_mark(&mut out, *high);
                out.push(u8::from(*more));
                out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                let mut names = Vec::new();
                for (dir, e) in entries {
                    put_short_bytes(&mut names, dir.as_bytes());
                    e.encode_into(&mut names);
                }
                // The responder bounds an answer's entries to `MAX_ENTRIES_BYTES` and a
                // few more: far below `MAX_CHANGES_NAMES_BYTES`.
                out.extend_from_slice(&(names.len() as u32).to_le_bytes());
                out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(
                    &names,
                    CHANGES_DEFLATE_LEVEL,
                ));
                kind::CHANGES
            }
            Response::ChangesGone { current } => {
                put_mark(&mut out, *current);
                kind::CHANGES_GONE
            }
            Response::ChunkList(list) => {
                put_optional(&mut out, list.as_deref().map(codec::encode_chunk_list));
                kind::CHUNK_LIST
            }
            Response::ChunkPages(pages) => {
                put_optional(
                    &mut out,
                    pages.as_ref().map(|pages| {
                        let mut body = (pages.len() as u32).to_le_bytes().to_vec();
                        for (count, hash) in pages {
                            body.extend_from_slice(&count.to_le_bytes());
                            body.extend_from_slice(hash);
                        }
                        body
                    }),
                );
                kind::CHUNK_PAGES
            }
            Response::Chunk { id, data } => {
                out.reserve(HASH_LEN + data.len());
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(data);
                kind::CHUNK
            }
            Response::ChunkMissing { id } => {
                out.extend_from_slice(id.as_bytes());
                kind::CHUNK_MISSING
            }
            Response::Ack => kind::ACK,
            Response::Error { code, message } => {
                out.extend_from_slice(&code.to_le_bytes());
                let message = &message.as_bytes()[..message.len().min(1024)];
                put_short_bytes(&mut out, message);
                kind::ERROR
            }
        };
        (kind, out)
    }

    /// The frame of this response: its kind, the start of its body, and the bytes that
    /// follow them in the buffers they are in (a chunk's, sent without a copy:
    /// [`super::send_frame`]).
    pub fn into_frame(self) -> (u8, Vec<u8>, Vec<Bytes>) {
        match self {
            Response::Chunk { id, data } => (kind::CHUNK, id.as_bytes().to_vec(), vec![data]),
            other => {
                let (kind, body) = other.encode();
                (kind, body, Vec::new())
            }
        }
    }

    /// Reads the next response of a stream (`None` at its end), refusing a frame over
    /// `limit` bytes before its body is read. A chunk's bytes are taken as received
    /// ([`FrameReader::take`]); every other body is read whole and decoded.
    pub async fn read(
        reader: &mut FrameReader,
        limit: usize,
    ) -> Result<Option<Response>, ProtocolError> {
        let Some(header) = reader.header(limit).await? else {
            return Ok(None);
        };
        // A chunk frame too short for its id is decoded, and refused, as any body.
        if header.kind != kind::CHUNK || header.body_len < HASH_LEN {
            let body = reader.body(header.body_len).await?;
            return Response::decode(header.kind, &body).map(Some);
        }
        let mut id = [0u8; HASH_LEN];
        if !reader.read_exact(&mut id).await? {
            return Err(ProtocolError::Truncated);
        }
        let data = reader.take(header.body_len - HASH_LEN).await?;
        Ok(Some(Response::Chunk {
            id: ChunkId(id),
            data,
        }))
    }

    pub fn decode(kind: u8, body: &[u8]) -> Result<Response, ProtocolError> {
        let mut r = Reader::new(body);
        let response = match kind {
            kind::HELLO_REPLY => return Ok(Response::Hello(decode_hello(body)?)),
            kind::DIR => match r.u8("dir flag")? {
                0 => Response::Dir(None),
                1 => return Ok(Response::Dir(Some(codec::decode_tree_node(&body[1..])?))),
                other => return Err(ProtocolError::Malformed(format!("dir flag {other}"))),
            },
            kind::ENTRIES => {
                let more = read_flag(&mut r, "more flag")?;
                let count = r.u32("entry count")? as usize;
                if count > MAX_ENTRIES_PER_RESPONSE {
                    return Err(ProtocolError::Malformed(format!(
                        "{count} entries in one response"
                    )));
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(WireEntry::decode_from(&mut r)?);
                }
                Response::Entries { entries, more }
            }
            kind::CHANGES => {
                let high = read_mark(&mut r)?;
                let more = read_flag(&mut r, "more flag")?;
                let count = r.u32("change count")? as usize;
                if count > MAX_ENTRIES_PER_RESPONSE {
                    return Err(ProtocolError::Malformed(format!(
                        "{count} changes in one response"
                    )));
                }
                let names = inflate_names(&mut r)?;
                let mut names = Reader::new(&names);
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    let dir = read_path(&mut names, "change directory")?;
                    entries.push((dir, WireEntry::decode_from(&mut names)?));
                }
                names.finish("changed names")?;
                Response::Changes {
                    high,
                    more,
                    entries,
                }
            }
            kind::CHANGES_GONE => Response::ChangesGone {
                current: read_mark(&mut r)?,
            },
            kind::CHUNK_LIST => match r.u8("chunk list flag")? {
                0 => Response::ChunkList(None),
                1 => {
                    return Ok(Response::ChunkList(Some(codec::decode_chunk_list(
                        &body[1..],
                    )?)));
                }
                other => return Err(ProtocolError::Malformed(format!("chunk list flag {other}"))),
            },
            kind::CHUNK_PAGES => match read_flag(&mut r, "chunk pages flag")? {
                false => Response::ChunkPages(None),
                true => {
                    let count = r.u32("page count")? as usize;
                    if count > MAX_LIST_PAGES || count * PAGE_HASH_LEN > body.len() {
                        return Err(ProtocolError::Malformed(format!(
                            "{count} chunk list pages in {} bytes",
                            body.len()
                        )));
                    }
                    let pages = (0..count)
                        .map(|_| Ok((r.u32("page chunk count")?, r.hash("page hash")?)))
                        .collect::<Result<_, DecodeError>>()?;
                    Response::ChunkPages(Some(pages))
                }
            },
            kind::CHUNK => {
                let id = ChunkId(r.hash("chunk id")?);
                return Ok(Response::Chunk {
                    id,
                    data: Bytes::copy_from_slice(&body[HASH_LEN..]),
                });
            }
            kind::CHUNK_MISSING => Response::ChunkMissing {
                id: ChunkId(r.hash("chunk id")?),
            },
            kind::ACK => Response::Ack,
            kind::ERROR => {
                let code = r.u16("error code")?;
                let message = String::from_utf8_lossy(r.short_bytes("error message")?).into_owned();
                Response::Error { code, message }
            }
            other => return Err(ProtocolError::UnexpectedKind(other)),
        };
        r.finish("response")?;
        Ok(response)
    }
}

/// How hard a `Changes` answer's names are compressed (deflate, 0-10). The names
/// repeat their directories, version vectors and times, which the fastest level finds;
/// what it leaves (chunk and content ids) does not compress at any level. Level 6 spent
/// 0.3 CPU-s of the sender's on an initial sync of 50,000 files (4% of it) to make a
/// delete of 1,000 files 12 KiB on the wire instead of 14 (docs/BENCHMARKS.md).
const CHANGES_DEFLATE_LEVEL: u8 = 1;

/// The largest the names of one `Changes` answer may be once inflated: a control
/// frame's size, which no honest answer comes near (the responder stops at
/// `MAX_ENTRIES_BYTES`).
pub const MAX_CHANGES_NAMES_BYTES: usize = super::MAX_CONTROL_FRAME;

/// The names of a `Changes` answer: `u32 LE length` (at most
/// [`MAX_CHANGES_NAMES_BYTES`]), then one raw deflate stream (RFC 1951) that inflates to
/// exactly that many bytes and ends with the frame. The length is checked before
/// anything is allocated and inflating never writes past it: a hostile peer's stream
/// costs at most that much memory.
fn inflate_names(r: &mut Reader<'_>) -> Result<Vec<u8>, ProtocolError> {
    use miniz_oxide::inflate::TINFLStatus;
    use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};
    let len = r.u32("changed names length")? as usize;
    if len > MAX_CHANGES_NAMES_BYTES {
        return Err(ProtocolError::Malformed(format!(
            "changed names of {len} bytes, more than {MAX_CHANGES_NAMES_BYTES}"
        )));
    }
    let stream = r.take(r.remaining(), "changed names")?;
    let mut names = vec![0; len];
    let (status, read, written) = decompress(
        &mut Box::<DecompressorOxide>::default(),
        stream,
        &mut names,
        0,
        inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    if status != TINFLStatus::Done || read != stream.len() || written != len {
        return Err(ProtocolError::Malformed(format!(
            "changed names: a deflate stream of {} bytes ({status:?} after {read}) \
             inflating to {written} bytes, not {len}",
            stream.len()
        )));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::super::{ErrorCode, PROTOCOL_VERSION};
    use super::*;
    use crate::entry::{EntryKind, VersionVector};

    fn round_trip_request(request: Request) {
        let (kind, body) = request.encode();
        assert_eq!(Request::decode(kind, &body).unwrap(), request);
        for cut in 0..body.len() {
            assert!(
                Request::decode(kind, &body[..cut]).is_err()
                    || matches!(request, Request::Hello(_))
            );
        }
    }

    #[test]
    fn requests_round_trip_and_short_bodies_fail() {
        let dir = VolPath::parse(b"a/b").unwrap();
        round_trip_request(Request::GetDir {
            volume: "media".into(),
            dir: dir.clone(),
        });
        round_trip_request(Request::GetEntries {
            volume: "m".into(),
            dir: dir.clone(),
            start: b"x".to_vec(),
            after: true,
            end: Some(b"y".to_vec()),
        });
        round_trip_request(Request::GetEntries {
            volume: "m".into(),
            dir: VolPath::root(),
            start: vec![],
            after: false,
            end: None,
        });
        round_trip_request(Request::GetChunkList {
            volume: "m".into(),
            path: dir.clone(),
            content_id: ContentId([1; 32]),
            part: ListPart::Whole,
        });
        round_trip_request(Request::GetChunkList {
            volume: "m".into(),
            path: dir,
            content_id: ContentId([1; 32]),
            part: ListPart::Pages(vec![0, 7]),
        });
        round_trip_request(Request::GetChunks {
            ids: vec![ChunkId([2; 32]), ChunkId([3; 32])],
        });
        round_trip_request(Request::Notify { volume: "m".into() });
        round_trip_request(Request::GetChanges {
            volume: "m".into(),
            since: FeedMark {
                feed: FeedId(7),
                seq: 9,
            },
            max: 4096,
        });
        round_trip_request(Request::Revocations {
            list: "shoal-revocations 1\n".into(),
        });
        let hello = Hello {
            version: PROTOCOL_VERSION,
            node_id: NodeId(9),
            chunk_params: ChunkParams::DEFAULT,
            volumes: vec!["a".into()],
        };
        let (kind, body) = Request::Hello(hello.clone()).encode();
        assert_eq!(Request::decode(kind, &body).unwrap(), Request::Hello(hello));
    }

    #[test]
    fn hostile_paths_and_names_are_rejected() {
        for bad in [&b"../../etc/passwd"[..], b"/abs", b"a/../b", b"a\0b"] {
            let mut body = Vec::new();
            put_short_bytes(&mut body, b"vol");
            put_short_bytes(&mut body, bad);
            assert!(matches!(
                Request::decode(kind::GET_DIR, &body),
                Err(ProtocolError::Malformed(_))
            ));
        }
        let entry = Entry {
            kind: EntryKind::Dir,
            mode: 0o755,
            mtime_ns: 0,
            uid: 0,
            gid: 0,
            xattrs: Default::default(),
            link: None,
            version: VersionVector::default(),
        };
        for bad in [&b".."[..], b"a/b", b""] {
            let response = Response::Entries {
                entries: vec![WireEntry {
                    name: bad.to_vec(),
                    entry: entry.clone(),
                    subtree: None,
                    chunks: None,
                }],
                more: false,
            };
            let (kind, body) = response.encode();
            assert!(Response::decode(kind, &body).is_err(), "{bad:?} accepted");
        }
        let mut volume = Vec::new();
        put_short_bytes(&mut volume, b"../x");
        assert!(Request::decode(kind::NOTIFY, &volume).is_err());
    }

    #[test]
    fn responses_round_trip() {
        let entry = Entry {
            kind: EntryKind::Symlink {
                target: b"t".to_vec(),
            },
            mode: 0,
            mtime_ns: 5,
            uid: 1,
            gid: 2,
            xattrs: Default::default(),
            link: None,
            version: VersionVector::from_pairs([(NodeId(3), 4)]),
        };
        for response in [
            Response::Entries {
                entries: vec![WireEntry {
                    name: b"n".to_vec(),
                    entry: entry.clone(),
                    subtree: Some(TreeHash([7; 32])),
                    chunks: Some(vec![ChunkRef {
                        id: ChunkId([8; 32]),
                        len: 3,
                    }]),
                }],
                more: true,
            },
            Response::Changes {
                high: FeedMark {
                    feed: FeedId(1),
                    seq: 2,
                },
                more: false,
                entries: vec![(
                    VolPath::parse(b"a/b").unwrap(),
                    WireEntry {
                        name: b"c".to_vec(),
                        entry: entry.clone(),
                        subtree: None,
                        chunks: None,
                    },
                )],
            },
            Response::ChangesGone {
                current: FeedMark {
                    feed: FeedId(3),
                    seq: 4,
                },
            },
            Response::ChunkList(Some(vec![ChunkRef {
                id: ChunkId([1; 32]),
                len: 10,
            }])),
            Response::ChunkList(None),
            Response::ChunkPages(Some(vec![(3, [4; 32])])),
            Response::ChunkPages(None),
            Response::Chunk {
                id: ChunkId([5; 32]),
                data: Bytes::from_static(b"bytes"),
            },
            Response::ChunkMissing {
                id: ChunkId([6; 32]),
            },
            Response::Dir(None),
            Response::Ack,
            Response::Error {
                code: ErrorCode::Malformed.number(),
                message: "bad".into(),
            },
        ] {
            let (kind, body) = response.encode();
            assert_eq!(Response::decode(kind, &body).unwrap(), response);
        }
    }

    /// A `Changes` body with `count` names whose deflated part is `names_len ||
    /// stream`, as a hostile peer may send it.
    fn changes_body(count: u32, names_len: u32, stream: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        put_mark(
            &mut body,
            FeedMark {
                feed: FeedId(1),
                seq: 2,
            },
        );
        body.push(0);
        body.extend_from_slice(&count.to_le_bytes());
        body.extend_from_slice(&names_len.to_le_bytes());
        body.extend_from_slice(stream);
        body
    }

    #[test]
    fn a_changes_answer_is_compressed_and_a_hostile_one_is_refused_before_it_costs_memory() {
        let entry = |n: u8| {
            (
                VolPath::parse(b"photos/2024").unwrap(),
                WireEntry {
                    name: vec![b'a' + n],
                    entry: Entry::deleted(VersionVector::from_pairs([(NodeId(9), 3)]), 0),
                    subtree: None,
                    chunks: None,
                },
            )
        };
        let answer = Response::Changes {
            high: FeedMark {
                feed: FeedId(1),
                seq: 2,
            },
            more: false,
            entries: (0..20).map(entry).collect(),
        };
        let (kind, body) = answer.encode();
        assert_eq!(Response::decode(kind, &body).unwrap(), answer);
        let names: usize = (0..20u8)
            .map(|n| {
                let (dir, wire) = entry(n);
                let mut raw = Vec::new();
                put_short_bytes(&mut raw, dir.as_bytes());
                wire.encode_into(&mut raw);
                raw.len()
            })
            .sum();
        assert!(body.len() < names / 3, "{} bytes for {names}", body.len());
        let empty = Response::Changes {
            high: FeedMark {
                feed: FeedId(1),
                seq: 2,
            },
            more: false,
            entries: vec![],
        };
        let (kind, body) = empty.encode();
        assert_eq!(Response::decode(kind, &body).unwrap(), empty);

        let refused = |body: Vec<u8>| {
            let e = Response::decode(kind::CHANGES, &body).unwrap_err();
            assert!(matches!(e, ProtocolError::Malformed(_)), "{e}");
            e.to_string()
        };
        // Announced larger than any answer may be: refused before anything is allocated.
        let huge = refused(changes_body(1, u32::MAX, &[0x03, 0x00]));
        assert!(huge.contains("more than"), "{huge}");
        // A bomb: 4 MiB of zeros deflate to a few KiB, announced as 100 bytes.
        let bomb = miniz_oxide::deflate::compress_to_vec(&vec![0; 4 << 20], 6);
        refused(changes_body(1, 100, &bomb));
        // Announced longer than the stream inflates to, garbage, and bytes after it.
        let (_, good) = answer.encode();
        let names_at = 16 + 1 + 4;
        let announced = u32::from_le_bytes(good[names_at..names_at + 4].try_into().unwrap());
        let stream = &good[names_at + 4..];
        refused(changes_body(20, announced + 1, stream));
        refused(changes_body(20, announced, &[0xff; 64]));
        refused(changes_body(20, announced, &[stream, &[0][..]].concat()));
        // More names counted than the stream holds, or fewer.
        refused(changes_body(21, announced, stream));
        refused(changes_body(19, announced, stream));
    }
}
