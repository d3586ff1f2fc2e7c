//! The change feed: every write of an entry is numbered, per volume, so that a peer that
//! has applied this node's changes up to number N can ask for what changed since N
//! (`GetChanges`, `schema/protocol.md`) instead of walking the Merkle tree.
//!
//! A feed is named by a random [`FeedId`], made when the feed is first used in an index:
//! an index rebuilt by `shoal repair --rebuild-index` (or a state directory started
//! afresh) has a new id, so a peer's remembered number is never read against another
//! numbering. Numbers are handed out in commit order, under one lock, inside the batch
//! that writes the entry ([`Store::write`]): a reader that sees number N sees every
//! number below it. They are never reused: blocks of [`RESERVE_BLOCK`] numbers are
//! reserved durably before any of them is written, and a store opened again starts
//! after the last reserved block, so a number a peer saw before a power loss (in a
//! write that the loss undid) is not given to another change.
//!
//! The feed keeps the last [`DEFAULT_RETENTION`] numbers of each volume (a count, not
//! an age: `shoal serve --feed-retention`); older records are cut in the batch that goes
//! past the bound, and the feed's lower bound moves with them. A peer whose number is
//! below it walks the tree instead.
//!
//! A reader is answered only the changes the volume's Merkle tree takes in: a scan or a
//! pull round writes in batches and updates the tree at its end, so its changes are
//! read whole (a large rename's new names and its deletes together, or neither).

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rocksdb::WriteBatch;

use super::batch::Changed;
use super::keys::{
    CF_META, change_key, change_origin_key, changes_range, feed_key, feed_mark_key,
    parse_change_entry,
};
use super::{Store, StoreError};
use crate::ids::{NodeId, VolumeId};
use crate::pathname::VolPath;

/// Numbers of a volume's feed kept by default: a peer that fell further behind walks the
/// tree. About 100 bytes each on disk (the key and the entry's path).
pub const DEFAULT_RETENTION: u64 = 100_000;
/// Numbers reserved durably at once (skipped, unused, when the store is opened again).
pub const RESERVE_BLOCK: u64 = 1 << 16;
/// Numbers past the retention before old records are cut (so cutting is rare).
const TRIM_SLACK: u64 = 1024;

/// The name of one numbering of a volume's changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FeedId(pub u64);

impl std::fmt::Display for FeedId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A position in a feed: every change numbered up to `seq` is included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedMark {
    pub feed: FeedId,
    pub seq: u64,
}

impl FeedMark {
    /// `u64 LE feed id || u64 LE seq`.
    fn encode(self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.feed.0.to_le_bytes());
        out[8..].copy_from_slice(&self.seq.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 16] = bytes.try_into().ok()?;
        Some(FeedMark {
            feed: FeedId(u64::from_le_bytes(bytes[..8].try_into().ok()?)),
            seq: u64::from_le_bytes(bytes[8..].try_into().ok()?),
        })
    }
}

/// What a feed holds after a mark.
#[derive(Debug, PartialEq, Eq)]
pub enum Changes {
    /// The names changed after the mark (each once, in the order of their first change
    /// in the window, with that change's number), and the mark they bring the reader
    /// to; `more` when the feed holds changes past it.
    Since {
        names: Vec<(u64, VolPath, Vec<u8>)>,
        high: FeedMark,
        more: bool,
    },
    /// The feed does not reach back to the mark (another feed id, a number below the
    /// lower bound, or past the newest): the reader walks the tree; `current` is where
    /// that walk gets it to, the newest number the volume's Merkle tree takes in
    /// ([`Store::note_tree_covers`]).
    Gone { current: FeedMark },
}

/// One volume's feed as the writer knows it.
#[derive(Clone, Copy, Debug)]
struct VolumeFeed {
    id: FeedId,
    /// The lowest number still kept.
    first: u64,
    /// The number the next change gets.
    next: u64,
    /// Numbers below this are reserved durably.
    reserved: u64,
    /// Every change numbered up to this is in the volume's Merkle tree (its last
    /// update started after they were written): the position a walk of the tree
    /// reaches. 0 until the tree is first updated by this process.
    in_tree: u64,
}

impl VolumeFeed {
    /// `u64 LE id || u64 LE first || u64 LE reserved`.
    fn encode(&self) -> [u8; 24] {
        let mut out = [0; 24];
        out[..8].copy_from_slice(&self.id.0.to_le_bytes());
        out[8..16].copy_from_slice(&self.first.to_le_bytes());
        out[16..].copy_from_slice(&self.reserved.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<(FeedId, u64, u64)> {
        let bytes: &[u8; 24] = bytes.try_into().ok()?;
        let n = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        Some((FeedId(n(0)), n(8), n(16)))
    }

    fn high(&self) -> FeedMark {
        FeedMark {
            feed: self.id,
            seq: self.next - 1,
        }
    }
}

/// The writer's state of every volume's feed (loaded on first use).
pub(super) struct Feeds {
    volumes: Mutex<HashMap<VolumeId, VolumeFeed>>,
    retention: AtomicU64,
}

impl Default for Feeds {
    fn default() -> Self {
        Feeds {
            volumes: Mutex::default(),
            retention: AtomicU64::new(DEFAULT_RETENTION),
        }
    }
}

impl Store {
    /// How many numbers of each volume's feed are kept (at least 1).
    pub fn set_feed_retention(&self, changes: u64) {
        self.feeds
            .retention
            .store(changes.max(1), Ordering::Relaxed);
    }

    /// Numbers the changed entries of `wb` and writes it with `options`, all under the
    /// feed lock so that numbers are committed in order.
    pub(super) fn write_numbered(
        &self,
        mut wb: WriteBatch,
        changed: &[Changed],
        options: &rocksdb::WriteOptions,
    ) -> Result<(), StoreError> {
        let mut volumes = self.feeds.volumes.lock().expect("feed lock");
        let retention = self.feeds.retention.load(Ordering::Relaxed);
        let mut touched: HashSet<VolumeId> = HashSet::new();
        for Changed { vol, key, sent_by } in changed {
            let feed = self.volume_feed(&mut volumes, *vol)?;
            if feed.next >= feed.reserved {
                feed.reserved = feed.next + RESERVE_BLOCK;
                let state = feed.encode();
                self.put_durably(&feed_key(*vol), &state)?;
            }
            wb.put_cf(self.cf(CF_META), change_key(*vol, feed.next), key);
            if let Some(peer) = sent_by {
                wb.put_cf(
                    self.cf(CF_META),
                    change_origin_key(*vol, feed.next),
                    peer.0.to_be_bytes(),
                );
            }
            feed.next += 1;
            touched.insert(*vol);
        }
        for vol in touched {
            let feed = volumes.get_mut(&vol).expect("numbered above");
            if feed.next - feed.first > retention + TRIM_SLACK {
                let first = feed.next - retention;
                wb.delete_range_cf(
                    self.cf(CF_META),
                    change_key(vol, feed.first),
                    change_key(vol, first),
                );
                wb.delete_range_cf(
                    self.cf(CF_META),
                    change_origin_key(vol, feed.first),
                    change_origin_key(vol, first),
                );
                feed.first = first;
                wb.put_cf(self.cf(CF_META), feed_key(vol), feed.encode());
            }
        }
        self.db.write_opt(wb, options).map_err(|e| self.rocks(e))
    }

    /// Where volume `vol`'s feed is now (its id and newest number). Every change up to
    /// it is committed.
    pub fn feed_mark(&self, vol: VolumeId) -> Result<FeedMark, StoreError> {
        let mut volumes = self.feeds.volumes.lock().expect("feed lock");
        Ok(self.volume_feed(&mut volumes, vol)?.high())
    }

    /// Records that the Merkle tree of `vol` now takes in every change up to `mark` (a
    /// [`Store::feed_mark`] read before the tree's update began).
    pub fn note_tree_covers(&self, vol: VolumeId, mark: FeedMark) -> Result<(), StoreError> {
        let mut volumes = self.feeds.volumes.lock().expect("feed lock");
        let feed = self.volume_feed(&mut volumes, vol)?;
        if feed.id == mark.feed {
            feed.in_tree = feed.in_tree.max(mark.seq);
        }
        Ok(())
    }

    /// The names of `vol` changed after `since`, at most `max` of them (see [`Changes`]),
    /// for the peer `reader`: a name whose last change up to the answer's mark wrote
    /// `reader`'s own entry, exactly as `reader` sent it, is left out (it holds that
    /// entry, or a newer one; a later change of the name has a later number and is
    /// answered then). Left out, it still counts against `max`. Only changes the
    /// volume's tree takes in ([`Store::note_tree_covers`]) are answered: a writer's
    /// changes are read whole, once it has brought the tree up to date.
    pub fn changes_since(
        &self,
        vol: VolumeId,
        since: FeedMark,
        max: usize,
        reader: Option<NodeId>,
    ) -> Result<Changes, StoreError> {
        // Every number below `next` is committed (or failed) once the lock is free.
        let feed = {
            let mut volumes = self.feeds.volumes.lock().expect("feed lock");
            *self.volume_feed(&mut volumes, vol)?
        };
        let current = feed.high();
        if since.feed != feed.id
            || since.seq.saturating_add(1) < feed.first
            || since.seq > current.seq
        {
            // What the reader's walk will see: entries written since the tree's last
            // update are in the feed but not yet in the tree, and a walk that recorded
            // the feed's newest number would skip them until some later walk.
            let in_tree = FeedMark {
                feed: feed.id,
                seq: feed.in_tree,
            };
            return Ok(Changes::Gone { current: in_tree });
        }
        // Answered only up to what the tree takes in: the changes of a scan or a pull
        // round still going on wait for its end, so that a reader never takes half of
        // one (the new names of a large rename without the deletes of the old ones).
        let mut high = FeedMark {
            feed: feed.id,
            seq: feed.in_tree.max(since.seq),
        };
        let (_, end) = changes_range(vol);
        let mut names = Vec::new();
        // Per name (its entry key) seen: its place in `names` and its last number.
        let mut seen: HashMap<Vec<u8>, (usize, u64)> = HashMap::new();
        let mut more = false;
        for item in self.range(CF_META, change_key(vol, since.seq + 1), end) {
            let (key, value) = item?;
            let seq = u64::from_be_bytes(
                key[key.len() - 8..]
                    .try_into()
                    .map_err(|_| StoreError::corrupt(CF_META, &key, "short change key"))?,
            );
            if seq > high.seq {
                break;
            }
            if let Some((_, last)) = seen.get_mut(&value[..]) {
                *last = seq;
                continue;
            }
            if names.len() >= max {
                high.seq = seq - 1;
                more = true;
                break;
            }
            let (dir, name) =
                parse_change_entry(&value).map_err(|e| StoreError::corrupt(CF_META, &key, e))?;
            seen.insert(value.to_vec(), (names.len(), seq));
            names.push((seq, dir, name));
        }
        if let Some(reader) = reader {
            let mut sent_by_reader = vec![false; names.len()];
            for (index, last) in seen.into_values() {
                sent_by_reader[index] = self.change_origin(vol, last)? == Some(reader);
            }
            let mut index = 0;
            names.retain(|_| {
                index += 1;
                !sent_by_reader[index - 1]
            });
        }
        Ok(Changes::Since { names, high, more })
    }

    /// The peer whose entry change `seq` of `vol` wrote as sent, if it was one.
    fn change_origin(&self, vol: VolumeId, seq: u64) -> Result<Option<NodeId>, StoreError> {
        let key = change_origin_key(vol, seq);
        self.get(CF_META, &key)?
            .map(|bytes| {
                let bytes: [u8; 8] = bytes[..]
                    .try_into()
                    .map_err(|_| StoreError::corrupt(CF_META, &key, "not 8 bytes"))?;
                Ok(NodeId(u64::from_be_bytes(bytes)))
            })
            .transpose()
    }

    /// The mark of `peer`'s feed of volume `vol` that this node has applied, if any.
    pub fn applied_mark(
        &self,
        vol: VolumeId,
        peer: NodeId,
    ) -> Result<Option<FeedMark>, StoreError> {
        let key = feed_mark_key(vol, peer);
        self.get(CF_META, &key)?
            .map(|bytes| {
                FeedMark::decode(&bytes)
                    .ok_or_else(|| StoreError::corrupt(CF_META, &key, "not 16 bytes"))
            })
            .transpose()
    }

    /// Records durably that this node applied `peer`'s feed of `vol` up to `mark`. The
    /// caller has made what it applied durable first ([`Store::sync`]).
    pub fn set_applied_mark(
        &self,
        vol: VolumeId,
        peer: NodeId,
        mark: FeedMark,
    ) -> Result<(), StoreError> {
        let mut batch = self.batch();
        batch.put(CF_META, &feed_mark_key(vol, peer), &mark.encode());
        self.write(batch, super::Durability::Durable)
    }

    /// The writer's state of `vol`'s feed, loaded (and a new block reserved) or made on
    /// first use.
    fn volume_feed<'v>(
        &self,
        volumes: &'v mut HashMap<VolumeId, VolumeFeed>,
        vol: VolumeId,
    ) -> Result<&'v mut VolumeFeed, StoreError> {
        let slot = match volumes.entry(vol) {
            MapEntry::Occupied(known) => return Ok(known.into_mut()),
            MapEntry::Vacant(slot) => slot,
        };
        let key = feed_key(vol);
        let feed = match self.get(CF_META, &key)? {
            Some(bytes) => {
                let (id, first, reserved) = VolumeFeed::decode(&bytes)
                    .ok_or_else(|| StoreError::corrupt(CF_META, &key, "not 24 bytes"))?;
                VolumeFeed {
                    id,
                    first,
                    next: reserved,
                    reserved: reserved + RESERVE_BLOCK,
                    in_tree: 0,
                }
            }
            None => {
                let id = NodeId::random().map_err(|e| StoreError::Io {
                    path: self.state_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                VolumeFeed {
                    // 0 names no feed (a `GetChanges` that only asks where the feed is).
                    id: FeedId(id.0.max(1)),
                    first: 1,
                    next: 1,
                    reserved: 1 + RESERVE_BLOCK,
                    in_tree: 0,
                }
            }
        };
        self.put_durably(&key, &feed.encode())?;
        Ok(slot.insert(feed))
    }

    fn put_durably(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        wb.put_cf(self.cf(CF_META), key, value);
        self.db
            .write_opt(wb, &super::batch::durable())
            .map_err(|e| self.rocks(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{Entry, EntryKind, VersionVector};
    use crate::store::Durability;

    fn file(n: u64) -> Entry {
        Entry {
            kind: EntryKind::Dir,
            mode: 0o755,
            mtime_ns: n as i64,
            uid: 0,
            gid: 0,
            xattrs: Default::default(),
            link: None,
            version: VersionVector::from_pairs([(NodeId(1), n)]),
        }
    }

    /// Writes an entry, as a scan or a pull does, without the tree update that ends one.
    fn write_entry(
        store: &Store,
        vol: VolumeId,
        dir: &str,
        name: &str,
        n: u64,
        sent_by: Option<NodeId>,
    ) {
        let mut batch = store.batch();
        batch.put_entry_sent_by(
            vol,
            &VolPath::parse(dir.as_bytes()).unwrap(),
            name.as_bytes(),
            &file(n),
            sent_by,
        );
        store.write(batch, Durability::Buffered).unwrap();
    }

    /// Writes an entry and notes the tree's update after it: the change is answered.
    fn put(store: &Store, vol: VolumeId, dir: &str, name: &str, n: u64) {
        put_sent_by(store, vol, dir, name, n, None);
    }

    fn put_sent_by(
        store: &Store,
        vol: VolumeId,
        dir: &str,
        name: &str,
        n: u64,
        sent_by: Option<NodeId>,
    ) {
        write_entry(store, vol, dir, name, n, sent_by);
        tree_updated(store, vol);
    }

    /// Notes a tree update that takes in every change written so far, as a writer's
    /// `tree::update` at its end does.
    fn tree_updated(store: &Store, vol: VolumeId) {
        let mark = store.feed_mark(vol).unwrap();
        store.note_tree_covers(vol, mark).unwrap();
    }

    fn names(changes: &Changes) -> Vec<String> {
        match changes {
            Changes::Since { names, .. } => names
                .iter()
                .map(|(_, d, n)| format!("{}|{}", d.display(), String::from_utf8_lossy(n)))
                .collect(),
            Changes::Gone { .. } => panic!("feed gone: {changes:?}"),
        }
    }

    #[test]
    fn changes_are_numbered_in_order_and_read_back_since_a_mark() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(tmp.path());
        let vol = VolumeId(1);
        let start = store.feed_mark(vol).unwrap();
        put(&store, vol, "", "a", 1);
        put(&store, vol, "d", "b", 2);
        put(&store, vol, "", "a", 3);
        let after_three = store.feed_mark(vol).unwrap();
        assert_eq!(after_three.seq, start.seq + 3);
        let all = store.changes_since(vol, start, 10, None).unwrap();
        assert_eq!(names(&all), ["/|a", "d|b"]);
        assert!(matches!(all, Changes::Since { high, more: false, .. } if high == after_three));
        // At most `max` names: the mark stops before the first name left out.
        let one = store.changes_since(vol, start, 1, None).unwrap();
        assert_eq!(names(&one), ["/|a"]);
        let Changes::Since {
            high, more: true, ..
        } = one
        else {
            panic!("{one:?}")
        };
        assert_eq!(high.seq, start.seq + 1);
        assert_eq!(
            names(&store.changes_since(vol, high, 10, None).unwrap()),
            ["d|b", "/|a"]
        );
        // Another volume has its own numbers.
        let other = store.feed_mark(VolumeId(2)).unwrap();
        assert_ne!(other.feed, start.feed);
        assert_eq!(
            names(&store.changes_since(VolumeId(2), other, 10, None).unwrap()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_name_last_written_as_a_peer_sent_it_is_left_out_of_that_peers_answers_only() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(tmp.path());
        let vol = VolumeId(1);
        let (peer, other) = (NodeId(7), NodeId(8));
        let start = store.feed_mark(vol).unwrap();
        put_sent_by(&store, vol, "", "a", 1, Some(peer));
        put(&store, vol, "d", "b", 2);
        let to = |reader| store.changes_since(vol, start, 10, reader).unwrap();
        assert_eq!(names(&to(Some(peer))), ["d|b"]);
        assert_eq!(names(&to(Some(other))), ["/|a", "d|b"]);
        assert_eq!(names(&to(None)), ["/|a", "d|b"]);
        // Left out, the name is still covered: the mark is the feed's newest.
        assert!(
            matches!(to(Some(peer)), Changes::Since { high, more: false, .. } if high == store.feed_mark(vol).unwrap())
        );
        // Changed here since: the peer gets it again, at its first number in the window.
        put(&store, vol, "", "a", 3);
        assert_eq!(names(&to(Some(peer))), ["/|a", "d|b"]);
        // Taken from the peer again: left out again.
        put_sent_by(&store, vol, "", "a", 4, Some(peer));
        assert_eq!(names(&to(Some(peer))), ["d|b"]);
        // Only the last change up to the answer's mark counts: changed here (5), then
        // `c` (6), then taken from the peer (7); an answer of two names stops before
        // `c`, where our change of `a` is the last, and sends it.
        put(&store, vol, "", "a", 5);
        put(&store, vol, "", "c", 6);
        put_sent_by(&store, vol, "", "a", 7, Some(peer));
        let cut = store.changes_since(vol, start, 2, Some(peer)).unwrap();
        assert_eq!(names(&cut), ["/|a", "d|b"]);
        let Changes::Since {
            high, more: true, ..
        } = cut
        else {
            panic!("{cut:?}")
        };
        assert_eq!(high.seq, start.seq + 5);
        assert_eq!(
            names(&store.changes_since(vol, high, 10, Some(peer)).unwrap()),
            ["/|c"]
        );
    }

    #[test]
    fn numbers_survive_a_restart_and_are_never_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = VolumeId(1);
        let (id, before) = {
            let store = Store::open_for_test(tmp.path());
            put(&store, vol, "", "a", 1);
            let mark = store.feed_mark(vol).unwrap();
            (mark.feed, mark)
        };
        let store = Store::open_for_test(tmp.path());
        let reopened = store.feed_mark(vol).unwrap();
        assert_eq!(reopened.feed, id);
        assert!(reopened.seq >= before.seq);
        put(&store, vol, "", "b", 2);
        // The change made after the restart has a number above every earlier one, and
        // a reader at the old mark gets it.
        assert!(store.feed_mark(vol).unwrap().seq > before.seq);
        assert_eq!(
            names(&store.changes_since(vol, before, 10, None).unwrap()),
            ["/|b"]
        );
    }

    #[test]
    fn the_position_a_walk_reaches_is_what_the_tree_takes_in_not_the_newest_number() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(tmp.path());
        let vol = VolumeId(1);
        let ask = FeedMark {
            feed: FeedId(0),
            seq: 0,
        };
        let position = |store: &Store| match store.changes_since(vol, ask, 0, None).unwrap() {
            Changes::Gone { current } => current,
            other => panic!("not gone: {other:?}"),
        };
        write_entry(&store, vol, "", "a", 1, None);
        // No tree update yet in this process: a walk reaches no number.
        assert_eq!(position(&store).seq, 0);
        let covered = store.feed_mark(vol).unwrap();
        store.note_tree_covers(vol, covered).unwrap();
        // Written after the tree's update began: in the feed, not yet in the tree.
        write_entry(&store, vol, "", "b", 2, None);
        assert_eq!(position(&store), covered);
        assert!(store.feed_mark(vol).unwrap().seq > covered.seq);
        // A mark of another feed, or older than one already noted, moves nothing.
        let stale = FeedMark {
            feed: covered.feed,
            seq: covered.seq - 1,
        };
        store.note_tree_covers(vol, stale).unwrap();
        let stranger = FeedMark {
            feed: FeedId(covered.feed.0 ^ 1),
            seq: covered.seq + 5,
        };
        store.note_tree_covers(vol, stranger).unwrap();
        assert_eq!(position(&store), covered);
        // A reader at the tree's position is sent what came after it once the tree
        // takes it in.
        assert_eq!(
            names(&store.changes_since(vol, covered, 10, None).unwrap()),
            Vec::<String>::new()
        );
        tree_updated(&store, vol);
        assert_eq!(
            names(&store.changes_since(vol, covered, 10, None).unwrap()),
            ["/|b"]
        );
    }

    /// A scan or a pull round writes its changes in several batches (a large rename:
    /// the new names, then the deletes of the old ones) and updates the tree at its
    /// end: a reader is answered none of them before that, and all of them after.
    #[test]
    fn changes_are_answered_once_the_tree_takes_them_in() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(tmp.path());
        let vol = VolumeId(1);
        put(&store, vol, "", "before", 1);
        let start = store.feed_mark(vol).unwrap();
        // No names, and the reader's own mark back.
        let nothing_past_start = || Changes::Since {
            names: Vec::new(),
            high: start,
            more: false,
        };
        write_entry(&store, vol, "new", "a", 2, None);
        write_entry(&store, vol, "old", "a", 3, None);
        let answer = store.changes_since(vol, start, 10, None).unwrap();
        assert_eq!(answer, nothing_past_start());
        tree_updated(&store, vol);
        assert_eq!(
            names(&store.changes_since(vol, start, 10, None).unwrap()),
            ["new|a", "old|a"]
        );
        // Opened again, before its first tree update, a store answers a reader at a
        // mark it gave out with nothing, never with a mark below the one asked.
        drop(store);
        let store = Store::open_for_test(tmp.path());
        write_entry(&store, vol, "", "after", 4, None);
        let answer = store.changes_since(vol, start, 10, None).unwrap();
        assert_eq!(answer, nothing_past_start());
    }

    #[test]
    fn a_mark_below_the_retention_or_of_another_feed_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(tmp.path());
        store.set_feed_retention(10);
        let vol = VolumeId(1);
        let start = store.feed_mark(vol).unwrap();
        for n in 0..(10 + TRIM_SLACK + 5) {
            put(&store, vol, "", &format!("f{n}"), n + 1);
        }
        let now = store.feed_mark(vol).unwrap();
        store.note_tree_covers(vol, now).unwrap();
        assert_eq!(
            store.changes_since(vol, start, 10, None).unwrap(),
            Changes::Gone { current: now }
        );
        let recent = FeedMark {
            feed: now.feed,
            seq: now.seq - 5,
        };
        assert_eq!(
            names(&store.changes_since(vol, recent, 100, None).unwrap()).len(),
            5
        );
        for stranger in [
            FeedMark {
                feed: FeedId(now.feed.0 ^ 1),
                seq: now.seq,
            },
            FeedMark {
                feed: now.feed,
                seq: now.seq + 1,
            },
        ] {
            assert_eq!(
                store.changes_since(vol, stranger, 10, None).unwrap(),
                Changes::Gone { current: now }
            );
        }
        // A new index (a rebuilt store) starts a feed of another id.
        drop(store);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            Store::open_for_test(other.path())
                .feed_mark(vol)
                .unwrap()
                .feed,
            now.feed
        );
    }

    #[test]
    fn applied_marks_are_kept_per_peer_and_volume() {
        let tmp = tempfile::tempdir().unwrap();
        let mark = FeedMark {
            feed: FeedId(7),
            seq: 42,
        };
        {
            let store = Store::open_for_test(tmp.path());
            assert_eq!(store.applied_mark(VolumeId(1), NodeId(5)).unwrap(), None);
            store
                .set_applied_mark(VolumeId(1), NodeId(5), mark)
                .unwrap();
        }
        let store = Store::open_for_test(tmp.path());
        assert_eq!(
            store.applied_mark(VolumeId(1), NodeId(5)).unwrap(),
            Some(mark)
        );
        assert_eq!(store.applied_mark(VolumeId(1), NodeId(6)).unwrap(), None);
        assert_eq!(store.applied_mark(VolumeId(2), NodeId(5)).unwrap(), None);
    }
}
