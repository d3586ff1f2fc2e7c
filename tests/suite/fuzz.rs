//! Fuzzing every decoder of bytes Shoal reads from the network or its disk: wire frames
//! (each request and response kind, of the sync and the enrollment protocols), store values (entries, chunk lists, scan stamps,
//! extents, tree nodes, entry keys) and pack files. Inputs are valid encodings mutated
//! (bytes flipped, inserted, deleted, lengths blown up, cut short, kinds swapped) and
//! plain random bytes, from a fixed seed. A decoder must return a value or an error,
//! never panic, and a value it returns must encode again.
//!
//! CI runs a short form (a few thousand inputs per decoder). A campaign runs each
//! decoder for a time instead: `SHOAL_FUZZ_SECONDS=600 tools/fuzz.sh` (see
//! docs/SECURITY.md for the numbers).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use shoal::chunking::{ChunkParams, ChunkRef};
use shoal::entry::{Entry, EntryKind, VersionVector};
use shoal::ids::{ChunkId, ContentId, NodeId, TreeHash};
use shoal::pathname::VolPath;
use shoal::protocol::{Hello, ListPart, Request, Response, WireEntry};
use shoal::store::codec;
use shoal::tree::{PageSummary, TreeNode};
use shoal::xattrs::Xattrs;

use crate::util::Rng;

/// Inputs per decoder in the short (CI) form: well under a second each, except pack
/// files (a file written per input), which get a tenth.
const SHORT_CASES: u64 = 30_000;

/// One mutated (or random) input from `seeds`.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if rng.below(16) == 0 {
        let len = rng.below(256);
        return (0..len).map(|_| rng.next() as u8).collect();
    }
    let mut bytes = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(6) {
            0 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
            1 if at < bytes.len() => bytes[at] = rng.next() as u8,
            2 => {
                let extra: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
                bytes.splice(at..at, extra);
            }
            3 if at < bytes.len() => {
                let end = (at + 1 + rng.below(8)).min(bytes.len());
                bytes.drain(at..end);
            }
            // A length or count blown up: 2 or 4 bytes of 0xff.
            4 if at + 4 <= bytes.len() => {
                let width = if rng.below(2) == 0 { 2 } else { 4 };
                bytes[at..at + width].fill(0xff);
            }
            _ => bytes.truncate(at),
        }
    }
    bytes
}

/// Runs `decode` on inputs mutated from `seeds`: `short_cases` of them, or as many as
/// `SHOAL_FUZZ_SECONDS` allow. Prints the count; a panic names the case and its bytes.
fn fuzz(name: &str, seeds: Vec<Vec<u8>>, short_cases: u64, decode: impl Fn(&[u8])) {
    let budget = std::env::var("SHOAL_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let started = Instant::now();
    let mut rng = Rng(0x5EED_0000_0000_0011 ^ name.len() as u64);
    let mut cases = 0u64;
    loop {
        let done = match budget {
            Some(budget) => started.elapsed() >= budget,
            None => cases >= short_cases,
        };
        if done {
            break;
        }
        let input = mutate(&mut rng, &seeds);
        if catch_unwind(AssertUnwindSafe(|| decode(&input))).is_err() {
            panic!(
                "{name}: decoder panicked on case {cases}: {}",
                shoal::ids::to_hex(&input)
            );
        }
        cases += 1;
    }
    println!(
        "fuzz {name}: {cases} inputs in {:.1} s, 0 crashes",
        started.elapsed().as_secs_f64()
    );
}

fn entry(kind: EntryKind) -> Entry {
    Entry {
        kind,
        mode: 0o644,
        mtime_ns: 1_700_000_000_000_000_000,
        uid: 1000,
        gid: 1000,
        xattrs: Default::default(),
        link: None,
        version: VersionVector::from_pairs([(NodeId(3), 4), (NodeId(9), 1)]),
    }
}

fn entries() -> Vec<Entry> {
    vec![
        entry(EntryKind::File {
            size: 5,
            content_id: ContentId([1; 32]),
            chunks: 1,
        }),
        entry(EntryKind::Dir),
        entry(EntryKind::Symlink {
            target: b"../x".to_vec(),
        }),
        entry(EntryKind::Tombstone { deleted_at_ns: 7 }),
        // The optional extended-attribute section.
        Entry {
            xattrs: Xattrs::try_canonical(vec![
                (b"system.posix_acl_access".to_vec(), vec![2, 0, 0, 0]),
                (b"user.origin".to_vec(), b"scanner".to_vec()),
            ])
            .unwrap(),
            ..entry(EntryKind::Dir)
        },
        // The optional hard-link section.
        Entry {
            link: Some(VolPath::parse(b"media/a.jpg").unwrap()),
            ..entry(EntryKind::File {
                size: 5,
                content_id: ContentId([1; 32]),
                chunks: 1,
            })
        },
    ]
}

fn chunks() -> Vec<ChunkRef> {
    (0..3u8)
        .map(|i| ChunkRef {
            id: ChunkId([i; 32]),
            len: 1000 + u32::from(i),
        })
        .collect()
}

fn tree_node() -> TreeNode {
    TreeNode {
        hash: TreeHash([2; 32]),
        versions: TreeHash([3; 32]),
        pages: vec![PageSummary {
            first_name: b"a".to_vec(),
            entries: 2,
            hash: TreeHash([4; 32]),
        }],
        totals: Default::default(),
    }
}

fn path(p: &[u8]) -> VolPath {
    VolPath::parse(p).unwrap()
}

/// `u8 kind || body` of every request kind.
fn request_seeds() -> Vec<Vec<u8>> {
    let volume = "media".to_string();
    let requests = [
        Request::Hello(Hello {
            version: shoal::protocol::PROTOCOL_VERSION,
            node_id: NodeId(42),
            chunk_params: ChunkParams::DEFAULT,
            volumes: vec![volume.clone(), "b".into()],
        }),
        Request::GetDir {
            volume: volume.clone(),
            dir: path(b"photos"),
        },
        Request::GetEntries {
            volume: volume.clone(),
            dir: path(b"photos"),
            start: b"a".to_vec(),
            after: true,
            end: Some(b"m".to_vec()),
        },
        Request::GetChunkList {
            volume: volume.clone(),
            path: path(b"photos/a.jpg"),
            content_id: ContentId([5; 32]),
            part: ListPart::Pages(vec![0, 3, 9]),
        },
        Request::GetChunkList {
            volume: volume.clone(),
            path: path(b"a"),
            content_id: ContentId([5; 32]),
            part: ListPart::PageHashes,
        },
        Request::GetChunks {
            ids: vec![ChunkId([6; 32]), ChunkId([7; 32])],
        },
        Request::Notify { volume },
        Request::Revocations {
            list: "shoal-revocations 1\nserial 2\nname c\nsignature 00\n".into(),
        },
    ];
    requests.iter().map(|r| framed(r.encode())).collect()
}

/// `u8 kind || body` of every response kind.
fn response_seeds() -> Vec<Vec<u8>> {
    let wire = |name: &[u8], entry: Entry, chunks: Option<Vec<ChunkRef>>| WireEntry {
        name: name.to_vec(),
        entry,
        subtree: Some(TreeHash([8; 32])),
        chunks,
    };
    let mut listed = entries().into_iter();
    let responses = [
        Response::Hello(Hello {
            version: shoal::protocol::PROTOCOL_VERSION,
            node_id: NodeId(43),
            chunk_params: ChunkParams::DEFAULT,
            volumes: vec!["media".into()],
        }),
        Response::Dir(Some(tree_node())),
        Response::Dir(None),
        Response::Entries {
            entries: vec![
                wire(b"a.jpg", listed.next().unwrap(), Some(chunks())),
                wire(b"b", listed.next().unwrap(), None),
                wire(b"c", listed.next().unwrap(), None),
                wire(b"d", listed.next().unwrap(), None),
            ],
            more: true,
        },
        Response::ChunkList(Some(chunks())),
        Response::ChunkList(None),
        Response::ChunkPages(Some(vec![(64, [9; 32]), (3, [10; 32])])),
        Response::Chunk {
            id: ChunkId([11; 32]),
            data: b"chunk bytes".to_vec().into(),
        },
        Response::ChunkMissing {
            id: ChunkId([12; 32]),
        },
        Response::Ack,
        Response::Error {
            code: 6,
            message: "no".into(),
        },
    ];
    responses.iter().map(|r| framed(r.encode())).collect()
}

fn framed((kind, body): (u8, Vec<u8>)) -> Vec<u8> {
    [vec![kind], body].concat()
}

#[test]
fn request_decoding_never_panics() {
    fuzz("requests", request_seeds(), SHORT_CASES, |input| {
        if let Some((&kind, body)) = input.split_first()
            && let Ok(request) = Request::decode(kind, body)
        {
            request.encode();
        }
    });
}

#[test]
fn response_decoding_never_panics() {
    fuzz("responses", response_seeds(), SHORT_CASES, |input| {
        if let Some((&kind, body)) = input.split_first()
            && let Ok(response) = Response::decode(kind, body)
        {
            response.encode();
        }
    });
}

#[test]
fn enrollment_decoding_never_panics() {
    use shoal::enroll::{Refusal, Request as Enroll, Response as Enrolled};
    let requests = [
        Enroll::Enroll {
            token: "SHOAL-TOKEN-1-00".into(),
            csr: vec![0x30; 200],
        },
        Enroll::Renew {
            cert: vec![0x30; 400],
            csr: vec![0x30; 200],
        },
        Enroll::GetRevocations { serial: 3 },
    ];
    fuzz(
        "enrollment requests",
        requests.iter().map(|r| framed(r.encode())).collect(),
        SHORT_CASES,
        |input| {
            if let Some((&kind, body)) = input.split_first()
                && let Ok(request) = Enroll::decode(kind, body)
            {
                request.encode();
            }
        },
    );
    let responses = [
        Enrolled::Issued {
            cert_pem: "-----BEGIN CERTIFICATE-----".into(),
            revocations: "shoal-revocations 1".into(),
        },
        Enrolled::Revocations {
            list: "shoal-revocations 1".into(),
        },
        Enrolled::Refused {
            code: Refusal::NameTaken,
            message: "taken".into(),
        },
    ];
    fuzz(
        "enrollment responses",
        responses.iter().map(|r| framed(r.encode())).collect(),
        SHORT_CASES,
        |input| {
            if let Some((&kind, body)) = input.split_first()
                && let Ok(response) = Enrolled::decode(kind, body)
            {
                response.encode();
            }
        },
    );
}

#[test]
fn entry_decoding_never_panics() {
    let seeds: Vec<Vec<u8>> = entries().iter().map(codec::encode_entry).collect();
    fuzz("entry", seeds, SHORT_CASES, |input| {
        if let Ok(entry) = codec::decode_entry(input) {
            codec::encode_entry(&entry);
        }
    });
}

#[test]
fn canonical_entry_decoding_never_panics_and_round_trips() {
    let seeds: Vec<Vec<u8>> = entries().iter().map(codec::encode_entry).collect();
    fuzz("canonical entry", seeds, SHORT_CASES, |input| {
        if let Ok(entry) = codec::decode_canonical_entry(input) {
            let again = codec::decode_canonical_entry(&codec::encode_entry(&entry));
            assert_eq!(again.unwrap(), entry);
        }
    });
}

#[test]
fn chunk_list_decoding_never_panics() {
    let seeds = vec![codec::encode_chunk_list(&chunks())];
    fuzz("chunk list", seeds, SHORT_CASES, |input| {
        if let Ok(list) = codec::decode_chunk_list(input) {
            codec::encode_chunk_list(&list);
        }
    });
}

#[test]
fn stamp_extent_and_key_decoding_never_panics() {
    let stamp = codec::ScanStamp {
        size: 5,
        mtime_ns: 1,
        ctime_ns: 2,
        ino: 3,
        dev: 4,
    };
    let extent = codec::Extent { offset: 9, len: 10 };
    let key = shoal::store::keys::entry_key(shoal::ids::VolumeId(1), &path(b"a/b"), b"c");
    let seeds = vec![
        codec::encode_stamp(&stamp).to_vec(),
        codec::encode_extent(extent).to_vec(),
        key,
    ];
    fuzz("stamp, extent, entry key", seeds, SHORT_CASES, |input| {
        let _ = codec::decode_stamp(input);
        let _ = codec::decode_extent(input);
        let _ = shoal::store::keys::parse_entry_key(input);
    });
}

#[test]
fn tree_node_decoding_never_panics() {
    let seeds = vec![codec::encode_tree_node(&tree_node())];
    fuzz("tree node", seeds, SHORT_CASES, |input| {
        if let Ok(node) = codec::decode_tree_node(input) {
            codec::encode_tree_node(&node);
        }
    });
}

#[test]
fn pack_scanning_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.pack");
    let mut writer = shoal::store::pack::PackWriter::open(&good).unwrap();
    for data in [&b"alpha"[..], b"beta", b"gamma gamma"] {
        writer.append(&ChunkId::of(data), data).unwrap();
    }
    writer.sync().unwrap();
    let seed = std::fs::read(&good).unwrap();
    let input_path = dir.path().join("input.pack");
    fuzz("pack file", vec![seed], SHORT_CASES / 10, |input| {
        std::fs::write(&input_path, input).unwrap();
        if let Ok(mut scanner) = shoal::store::pack::PackScanner::open(&input_path) {
            // A pack holds finitely many records: at most one per byte.
            for _ in 0..=input.len() {
                match scanner.next_record() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    });
}
