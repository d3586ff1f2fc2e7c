//! Concurrent edits: which version keeps the name, and what the other one is called.
//!
//! Both sides of a conflict run the same rule on the same two versions, so every node
//! reaches the same result without talking about it: the winner keeps the name with
//! the merged version vector (which dominates both; a live version that beats a delete
//! whose only news is the delete itself keeps its own, see
//! [`only_news_is_the_delete`]), the loser becomes a visible copy
//! `stem.sync-conflict-<UTC time>-<node>.ext` carrying the loser's own version vector.
//! No content is dropped.

use std::cmp::Ordering;

use crate::entry::{Entry, EntryKind};

/// Whether `a` wins over `b` (they are concurrent and differ).
pub fn wins(a: &Entry, b: &Entry) -> bool {
    rank(a)
        .cmp(&rank(b))
        .then_with(|| tiebreak(a).cmp(&tiebreak(b)))
        == Ordering::Greater
}

/// Whether the delete `tombstone`, concurrent with the live version `live`, knew
/// nothing that `live` does not know but the delete itself: its vector exceeds `live`'s
/// by one count of one node (the deleting node's own). `live` then already succeeds every
/// version the delete replaced, and wins without taking the delete's count into its
/// history (see `sync::pull` "conflict"): a later delete by a node that saw `live` and
/// not this delete must still dominate it.
pub fn only_news_is_the_delete(tombstone: &Entry, live: &Entry) -> bool {
    let mut ahead = tombstone
        .version
        .pairs()
        .iter()
        .filter(|(node, counter)| *counter > live.version.get(*node));
    match (ahead.next(), ahead.next()) {
        (Some((node, counter)), None) => *counter == live.version.get(*node) + 1,
        _ => false,
    }
}

/// Live beats deleted (nothing is lost), directories beat files (their contents stay
/// where they are), then the later modification.
fn rank(e: &Entry) -> (u8, i64) {
    let kind = match e.kind {
        EntryKind::Tombstone { .. } => 0,
        EntryKind::Symlink { .. } | EntryKind::Fifo => 1,
        EntryKind::File { .. } => 1,
        EntryKind::Dir => 2,
    };
    (kind, e.mtime_ns)
}

/// A total order on the rest of the state, so that equal ranks still pick one winner.
fn tiebreak(e: &Entry) -> Vec<u8> {
    let mut key = crate::store::codec::encode_entry(&Entry {
        version: Default::default(),
        ..e.clone()
    });
    key.extend(
        e.version
            .pairs()
            .iter()
            .flat_map(|(n, c)| n.0.to_be_bytes().into_iter().chain(c.to_be_bytes())),
    );
    key
}

/// What every conflict copy's name holds.
pub const MARKER: &[u8] = b".sync-conflict-";

/// Whether `name` is a conflict copy's (or looks like one: a user may name a file so).
pub fn is_conflict_copy(name: &[u8]) -> bool {
    name.windows(MARKER.len()).any(|w| w == MARKER)
}

/// The name of the conflict copy of `loser` (which lost against `winner`) at `name`.
/// `attempt` 0 is the name every node picks alike; when that name is taken (a local
/// user made a file by that name, say), attempts 1, 2, ... add `-1`, `-2`, ... to it.
pub fn conflict_name(name: &[u8], loser: &Entry, winner: &Entry, attempt: u32) -> Vec<u8> {
    // The node that made the losing change: one whose counter the winner has not seen.
    let author = loser
        .version
        .pairs()
        .iter()
        .find(|(node, counter)| winner.version.get(*node) < *counter)
        .map(|(node, _)| node.to_string())
        .unwrap_or_else(|| "unknown".into());
    let stamp = utc_stamp(loser.mtime_ns.div_euclid(1_000_000_000));
    let (stem, ext) = match name.iter().rposition(|&b| b == b'.') {
        Some(dot) if dot > 0 => (&name[..dot], &name[dot..]),
        _ => (name, &b""[..]),
    };
    let taken = match attempt {
        0 => String::new(),
        n => format!("-{n}"),
    };
    let suffix = format!(
        "{}{stamp}-{}{taken}",
        String::from_utf8_lossy(MARKER),
        &author[..author.len().min(7)]
    );
    // Keep the result a valid name (255 bytes): shorten the stem if needed.
    let room = crate::pathname::MAX_NAME_LEN.saturating_sub(suffix.len() + ext.len().min(32));
    let ext = &ext[..ext.len().min(32)];
    [&stem[..stem.len().min(room)], suffix.as_bytes(), ext].concat()
}

/// What a conflict copy's name says: the name it lost, when the losing version was
/// last modified (`YYYYMMDD-HHMMSS`, UTC) and the start of the id of the node that made
/// it (7 hex digits, or `unknown`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyName {
    pub original: Vec<u8>,
    pub stamp: String,
    pub author: String,
}

/// Reads a name [`conflict_name`] made: `stem.sync-conflict-<stamp>-<node>[-N]<ext>`.
/// `None` for any other name (a stem shortened to fit gives the shortened original).
pub fn parse_copy_name(name: &[u8]) -> Option<CopyName> {
    let at = name.windows(MARKER.len()).rposition(|w| w == MARKER)?;
    let stem = &name[..at];
    // The rest is ASCII up to the extension, which may be any bytes: split at its dot.
    let rest_bytes = &name[at + MARKER.len()..];
    let ext_at = rest_bytes
        .iter()
        .position(|&b| b == b'.')
        .unwrap_or(rest_bytes.len());
    let (tail, ext) = rest_bytes.split_at(ext_at);
    let tail = std::str::from_utf8(tail).ok()?;
    let mut parts = tail.split('-');
    let (date, time, author) = (parts.next()?, parts.next()?, parts.next()?);
    let numbered = parts.next();
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let author_ok = author == "unknown"
        || (!author.is_empty()
            && author.len() <= 7
            && author.bytes().all(|b| b.is_ascii_hexdigit()));
    let number_ok = numbered.is_none_or(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if !digits(date, 8) || !digits(time, 6) || !author_ok || !number_ok || parts.next().is_some() {
        return None;
    }
    if stem.is_empty() && ext.is_empty() {
        return None;
    }
    Some(CopyName {
        original: [stem, ext].concat(),
        stamp: format!("{date}-{time}"),
        author: author.to_string(),
    })
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn utc_stamp(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::VersionVector;
    use crate::ids::{ContentId, NodeId};

    fn file(content: u8, mtime_s: i64, node: u64) -> Entry {
        Entry {
            kind: EntryKind::File {
                size: 1,
                content_id: ContentId([content; 32]),
                chunks: 1,
            },
            mode: 0o644,
            mtime_ns: mtime_s * 1_000_000_000,
            uid: 0,
            gid: 0,
            xattrs: Default::default(),
            link: None,
            version: VersionVector::from_pairs([(NodeId(1), 1), (NodeId(node), 2)]),
        }
    }

    #[test]
    fn exactly_one_side_wins_and_the_rule_is_symmetric() {
        let a = file(1, 100, 0xaa);
        let b = file(2, 100, 0xbb);
        assert_ne!(wins(&a, &b), wins(&b, &a));
        let later = file(3, 200, 0xcc);
        assert!(wins(&later, &a) && !wins(&a, &later));
        let deleted = Entry {
            kind: EntryKind::Tombstone { deleted_at_ns: 999 },
            ..file(0, 999, 0xdd)
        };
        assert!(wins(&a, &deleted), "an edit beats a concurrent delete");
    }

    #[test]
    fn a_delete_whose_only_news_is_itself_is_told_apart_from_one_that_saw_more() {
        let live = file(1, 100, 0xaa); // {1: 1, aa: 2}
        let deleted = |pairs: &[(u64, u64)]| Entry {
            kind: EntryKind::Tombstone { deleted_at_ns: 1 },
            version: VersionVector::from_pairs(pairs.iter().map(|&(n, c)| (NodeId(n), c))),
            ..file(0, 0, 0)
        };
        // Deleted on node bb having seen version {1: 1} only: its one news is itself.
        assert!(only_news_is_the_delete(
            &deleted(&[(1, 1), (0xbb, 1)]),
            &live
        ));
        // Having seen another edit of node 1 that `live` lacks, then deleted.
        assert!(!only_news_is_the_delete(
            &deleted(&[(1, 2), (0xbb, 1)]),
            &live
        ));
        // Two deletes of node bb that `live` lacks (a re-creation between them).
        assert!(!only_news_is_the_delete(
            &deleted(&[(1, 1), (0xbb, 2)]),
            &live
        ));
    }

    #[test]
    fn conflict_names_are_deterministic_and_valid() {
        let loser = file(1, 1_764_115_200, 0xab); // 2025-11-26 00:00:00 UTC
        let winner = file(2, 1_764_115_300, 0xcd);
        let name = conflict_name(b"report.final.pdf", &loser, &winner, 0);
        let text = String::from_utf8(name).unwrap();
        assert!(
            text.starts_with("report.final.sync-conflict-20251126-000000-"),
            "{text}"
        );
        assert!(text.ends_with(".pdf"));
        assert_eq!(
            conflict_name(b"report.final.pdf", &loser, &winner, 0),
            text.as_bytes()
        );
        let long = vec![b'x'; 255];
        let name = conflict_name(&long, &loser, &winner, 0);
        assert!(name.len() <= 255);
        crate::pathname::validate_name(&name).unwrap();
        assert_eq!(utc_stamp(0), "19700101-000000");
    }

    #[test]
    fn a_conflict_name_reads_back_as_the_name_it_lost() {
        let loser = file(1, 1_764_115_200, 0xab);
        let winner = file(2, 1_764_115_300, 0xcd);
        for (original, attempt) in [
            (&b"report.final.pdf"[..], 0),
            (b"Makefile", 0),
            (b".env", 2),
            (b"dir.d", 1),
        ] {
            let copy = conflict_name(original, &loser, &winner, attempt);
            let read = parse_copy_name(&copy).unwrap_or_else(|| panic!("{copy:?}"));
            assert_eq!(
                read.original,
                original,
                "{}",
                String::from_utf8_lossy(&copy)
            );
            assert_eq!(read.stamp, "20251126-000000");
            assert_eq!(read.author, "00000000000000ab"[..7]);
        }
        for not_a_copy in [
            &b"report.pdf"[..],
            b"x.sync-conflict-.txt",
            b"x.sync-conflict-2025-000000-abc.txt",
            b"x.sync-conflict-20251126-000000-xyz.txt",
            b"x.sync-conflict-20251126-000000-abc-1-2.txt",
        ] {
            assert_eq!(parse_copy_name(not_a_copy), None, "{not_a_copy:?}");
        }
    }
}
