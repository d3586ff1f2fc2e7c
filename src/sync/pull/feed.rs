//! Following the peer's change feed (`GetChanges`, protocol version 3): the names the
//! peer changed since the mark this node applied last, each decided by the same
//! [`Pull::reconcile`] as the walk's entries, so that a change reached through the feed
//! ends exactly as it would through the walk. The feed brings no directory's tree hash,
//! so nothing is descended into; a directory the peer deleted, or replaced by a file,
//! still has its children compared as the walk does ([`super::RemoteDir::Deleted`]).

use std::sync::atomic::Ordering;

use super::{Pull, Until};
use crate::ids::NodeId;
use crate::pathname::VolPath;
use crate::protocol::{
    CHANGES_VERSION, MAX_ENTRIES_PER_RESPONSE, ProtocolError, Request, Response,
};
use crate::store::{FeedId, FeedMark};
use crate::sync::{SyncError, request};

/// Names asked for in one `GetChanges`.
const CHANGES_PER_REQUEST: u32 = MAX_ENTRIES_PER_RESPONSE as u32;

/// How following the feed ended.
pub(super) enum FeedOutcome {
    /// Every change up to this mark is applied (or queued in this round).
    Followed(FeedMark),
    /// The feed no longer reaches back to the mark asked for: the round walks the tree.
    Gone,
}

impl Pull {
    /// The peer whose feed this round can follow: its node id, if the connection speaks
    /// a version with `GetChanges` (a node of an earlier release is walked, as before).
    pub(super) fn feed_peer(&self) -> Option<NodeId> {
        let version = crate::protocol::negotiated_version(&self.handle).ok()?;
        (version >= CHANGES_VERSION)
            .then(|| self.peer.node_id())
            .flatten()
    }

    /// Where the peer's feed of the volume is now (asked with feed id 0, which no feed
    /// has): what a complete walk that starts after this question brings this node to.
    pub(super) async fn feed_position(&mut self) -> Result<FeedMark, SyncError> {
        let ask = FeedMark {
            feed: FeedId(0),
            seq: 0,
        };
        match self.get_changes(ask, 0).await? {
            Response::ChangesGone { current } => Ok(current),
            other => Err(SyncError::unexpected("GetChanges", &other)),
        }
    }

    /// Applies the peer's changes after `since`, one answer at a time, each decided
    /// under the volume lock as the walk decides a page of entries.
    pub(super) async fn follow_feed(&mut self, since: FeedMark) -> Result<FeedOutcome, SyncError> {
        let mut mark = since;
        loop {
            let (high, more, entries) = match self.get_changes(mark, CHANGES_PER_REQUEST).await? {
                Response::Changes {
                    high,
                    more,
                    entries,
                } => (high, more, entries),
                Response::ChangesGone { .. } => return Ok(FeedOutcome::Gone),
                other => return Err(SyncError::unexpected("GetChanges", &other)),
            };
            check_changes(mark, high, more, &entries)?;
            self.node
                .stats
                .feed_changes
                .fetch_add(entries.len() as u64, Ordering::Relaxed);
            if !entries.is_empty() {
                tracing::debug!(peer = %self.peer.addr, volume = %self.volume().name, "{} changes from feed", entries.len());
            }
            let guard = self.lock_volume().await;
            let decided = entries.into_iter().try_for_each(|(dir, mut wire)| {
                // Nothing to descend into: the change itself is what this round takes.
                wire.subtree = None;
                self.reconcile(&dir, wire)
            });
            self.restore_moved_dir_mtimes()?;
            decided?;
            drop(guard);
            if self.files.len() >= self.batching.files {
                self.take_files(Until::Batches).await?;
            }
            mark = high;
            if !more {
                break;
            }
        }
        // Directories the peer deleted (or replaced by a file): their children too.
        self.drain_pending().await?;
        self.take_files(Until::All).await?;
        self.link_names().await?;
        Ok(FeedOutcome::Followed(mark))
    }

    async fn get_changes(&mut self, since: FeedMark, max: u32) -> Result<Response, SyncError> {
        let req = Request::GetChanges {
            volume: self.volume().name.clone(),
            since,
            max,
        };
        request(&mut self.handle, &req).await
    }
}

/// Whether a `Changes` answer to a question from `since` keeps the rules before it is
/// believed (invariant 9): the same feed, a mark that does not go back, progress when
/// there is more (so that a peer cannot hold the round in a loop), at most the names
/// asked for, each once, in entry-key order.
fn check_changes(
    since: FeedMark,
    high: FeedMark,
    more: bool,
    entries: &[(VolPath, crate::protocol::WireEntry)],
) -> Result<(), ProtocolError> {
    let bad = |why: String| Err(ProtocolError::Malformed(format!("Changes answer: {why}")));
    if high.feed != since.feed {
        return bad(format!("feed {} instead of {}", high.feed, since.feed));
    }
    if high.seq < since.seq || (more && high.seq == since.seq) {
        return bad(format!(
            "mark {} after a question from {} (more: {more})",
            high.seq, since.seq
        ));
    }
    if entries.len() > CHANGES_PER_REQUEST as usize {
        return bad(format!("{} names, more than asked", entries.len()));
    }
    let key = |(dir, wire): &(VolPath, crate::protocol::WireEntry)| {
        (dir.as_bytes().to_vec(), wire.name.clone())
    };
    if entries.windows(2).any(|w| key(&w[0]) >= key(&w[1])) {
        return bad("names not strictly in entry-key order".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{Entry, EntryKind, VersionVector};
    use crate::protocol::WireEntry;

    fn change(dir: &str, name: &str) -> (VolPath, WireEntry) {
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
        (
            VolPath::parse(dir.as_bytes()).unwrap(),
            WireEntry {
                name: name.as_bytes().to_vec(),
                entry,
                subtree: None,
                chunks: None,
            },
        )
    }

    #[test]
    fn an_answer_that_goes_back_stalls_or_repeats_a_name_is_refused() {
        let mark = |feed, seq| FeedMark {
            feed: FeedId(feed),
            seq,
        };
        let ok = [change("", "a"), change("a", "b"), change("a", "c")];
        assert!(check_changes(mark(1, 5), mark(1, 9), true, &ok).is_ok());
        assert!(check_changes(mark(1, 5), mark(1, 5), false, &[]).is_ok());
        assert!(check_changes(mark(1, 5), mark(2, 9), false, &ok).is_err());
        assert!(check_changes(mark(1, 5), mark(1, 4), false, &ok).is_err());
        assert!(check_changes(mark(1, 5), mark(1, 5), true, &[]).is_err());
        let repeated = [change("a", "b"), change("a", "b")];
        assert!(check_changes(mark(1, 5), mark(1, 9), false, &repeated).is_err());
        let unordered = [change("a", "b"), change("", "a")];
        assert!(check_changes(mark(1, 5), mark(1, 9), false, &unordered).is_err());
    }
}
