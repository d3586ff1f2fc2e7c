//! Walking the peer's tree: only the directories and pages that differ from ours.

use std::collections::{HashMap, HashSet};

use s2n_quic::connection::Handle;

use super::{Pull, Spawned, Until};
use crate::pathname::VolPath;
use crate::protocol::{ProtocolError, Request, Response, WireEntry};
use crate::sync::{SyncError, request};
use crate::tree::{PageSummary, TreeNode};

impl Pull {
    pub(super) async fn get_dir(&mut self, dir: &VolPath) -> Result<Option<TreeNode>, SyncError> {
        let volume = self.volume().name.clone();
        match request(
            &mut self.handle,
            &Request::GetDir {
                volume,
                dir: dir.clone(),
            },
        )
        .await?
        {
            Response::Dir(node) => Ok(node),
            other => Err(SyncError::unexpected("GetDir", &other)),
        }
    }

    /// The next answer of the peer's children of `dir` in `cursor`'s name range, or
    /// `None` once the range is done. The answer is checked before it is believed
    /// (invariant 9): names strictly increasing and inside the range, and `more` only
    /// with at least one name, so that a peer cannot hold this pull in a loop.
    async fn next_entries(
        &mut self,
        dir: &VolPath,
        cursor: &mut EntriesCursor,
        asked: Option<Asked>,
    ) -> Result<Option<Vec<WireEntry>>, SyncError> {
        if cursor.done {
            return Ok(None);
        }
        let req = Request::GetEntries {
            volume: self.volume().name.clone(),
            dir: dir.clone(),
            start: cursor.start.clone(),
            after: cursor.after,
            end: cursor.end.clone(),
        };
        let answer = match asked {
            Some(asked) => asked.result().await?,
            None => request(&mut self.handle, &req).await?,
        };
        let (entries, more) = match answer {
            Response::Entries { entries, more } => (entries, more),
            other => return Err(SyncError::unexpected("GetEntries", &other)),
        };
        cursor.check(&entries, more)?;
        match entries.last() {
            Some(last) if more => {
                cursor.start = last.name.clone();
                cursor.after = true;
            }
            _ => cursor.done = true,
        }
        Ok(Some(entries))
    }

    /// Reconciles one directory with the peer's. `remote` is the peer's tree node for
    /// it, or `None` when the peer deleted it or this node has no tree node of it yet
    /// (then all its entries are compared).
    /// `asked`: the answer to [`whole_listing`] of `dir`, asked for ahead.
    pub(super) async fn sync_dir(
        &mut self,
        dir: &VolPath,
        remote: Option<TreeNode>,
        mut asked: Option<Asked>,
    ) -> Result<(), SyncError> {
        let vol = self.volume().id;
        let local = self.node.store.tree_node(vol, dir)?;
        let mut ranges: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        match &remote {
            // Same content but different histories, or nothing live left on the peer's
            // side (deletes): only the entries, tombstones included, can tell.
            Some(remote)
                if remote.pages.is_empty()
                    || local.as_ref().is_some_and(|l| l.hash == remote.hash) =>
            {
                ranges.push((Vec::new(), None))
            }
            Some(remote) => {
                // A name range differs if either side has a page there the other lacks;
                // the peer's tombstones may sit in a range only our pages mark.
                let local_pages = local.as_ref().map_or(&[][..], |n| &n.pages[..]);
                ranges.extend(differing_ranges(&remote.pages, local_pages));
                ranges.extend(differing_ranges(local_pages, &remote.pages));
                ranges = merge_ranges(ranges);
            }
            None => ranges.push((Vec::new(), None)),
        }
        if ranges != [(Vec::new(), None)] {
            // Asked ahead for the whole listing, which is not what is compared now.
            asked = None;
        }
        // One answer at a time, each decided before the next is asked for: memory holds
        // one answer and one publish batch, however large the directory.
        for (start, end) in ranges {
            let mut cursor = EntriesCursor {
                start,
                after: false,
                end,
                done: false,
            };
            while let Some(entries) = self.next_entries(dir, &mut cursor, asked.take()).await? {
                // Decided under the volume lock, taken only now that the answer is here.
                let guard = self.lock_volume().await;
                let decided = entries
                    .into_iter()
                    .try_for_each(|remote_entry| self.reconcile(dir, remote_entry));
                // Before the lock goes: a scan must not take the moves of applying for
                // local changes.
                self.restore_moved_dir_mtimes()?;
                decided?;
                drop(guard);
                // Files of many small directories travel together: one batch for all.
                if self.files.len() >= self.batching.files {
                    self.take_files(Until::Batches).await?;
                }
            }
        }
        Ok(())
    }
}

/// Directories whose first entries were asked for ahead, at most this many at a time
/// (each answer holds up to [`crate::protocol::MAX_ENTRIES_BYTES`] until its turn).
pub(super) const LOOKAHEAD: usize = 4;

/// The request for the first entries of all of `dir`'s names.
pub(super) fn whole_listing(volume: &str, dir: &VolPath) -> Request {
    Request::GetEntries {
        volume: volume.to_string(),
        dir: dir.clone(),
        start: Vec::new(),
        after: false,
        end: None,
    }
}

/// A [`whole_listing`] asked for ahead of its directory's turn, in a task of its own
/// (aborted if the round ends before its turn comes).
pub(super) type Asked = Spawned<Response>;

/// The directories asked for ahead ([`Pull::ask_ahead`]), by path.
#[derive(Default)]
pub(super) struct Lookahead(HashMap<VolPath, Asked>);

impl Lookahead {
    pub(super) fn is_full(&self) -> bool {
        self.0.len() >= LOOKAHEAD
    }

    pub(super) fn has(&self, dir: &VolPath) -> bool {
        self.0.contains_key(dir)
    }

    pub(super) fn ask(&mut self, dir: VolPath, mut handle: Handle, listing: Request) {
        let task = Spawned::spawn(
            "listing",
            async move { request(&mut handle, &listing).await },
        );
        self.0.insert(dir, task);
    }

    pub(super) fn take(&mut self, dir: &VolPath) -> Option<Asked> {
        self.0.remove(dir)
    }
}

/// Where the next `GetEntries` of a name range starts (`start`, or just after it), and
/// where the range ends.
struct EntriesCursor {
    start: Vec<u8>,
    after: bool,
    end: Option<Vec<u8>>,
    done: bool,
}

impl EntriesCursor {
    /// Whether an answer keeps the rules: names strictly increasing, none before the
    /// start (or at it, when asking for what follows it), none at or past the end, and
    /// `more` only with some names.
    fn check(&self, entries: &[WireEntry], more: bool) -> Result<(), ProtocolError> {
        let bad = |why: &str| {
            Err(ProtocolError::Malformed(format!(
                "GetEntries answer: {why}"
            )))
        };
        if more && entries.is_empty() {
            return bad("more without any entry (no progress)");
        }
        if entries.windows(2).any(|w| w[0].name >= w[1].name) {
            return bad("names not strictly increasing");
        }
        if let Some(first) = entries.first()
            && (first.name < self.start || (self.after && first.name == self.start))
        {
            return bad("a name before the range asked for");
        }
        if let (Some(last), Some(end)) = (entries.last(), &self.end)
            && last.name >= *end
        {
            return bad("a name past the end of the range asked for");
        }
        Ok(())
    }
}

/// The name ranges of the pages of `ours` that `theirs` does not have (same first name
/// and hash). The first page's range starts at the empty name.
fn differing_ranges(
    ours: &[PageSummary],
    theirs: &[PageSummary],
) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let have: HashSet<(&[u8], crate::ids::TreeHash)> =
        theirs.iter().map(|p| (&p.first_name[..], p.hash)).collect();
    (0..ours.len())
        .filter(|&i| !have.contains(&(&ours[i].first_name[..], ours[i].hash)))
        .map(|i| {
            let start = if i == 0 {
                Vec::new()
            } else {
                ours[i].first_name.clone()
            };
            (start, ours.get(i + 1).map(|p| p.first_name.clone()))
        })
        .collect()
}

/// Sorts name ranges and merges those that overlap or touch (`None` ends at the end).
fn merge_ranges(mut ranges: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    ranges.sort();
    let mut merged: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some((_, last_end)) if last_end.as_ref().is_none_or(|e| *e >= start) => {
                *last_end = match (last_end.take(), end) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
            _ => merged.push((start, end)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_pages_missing_on_either_side_and_merge() {
        let page = |first: &str, h: u8| PageSummary {
            first_name: first.as_bytes().to_vec(),
            entries: 1,
            hash: crate::ids::TreeHash([h; 32]),
        };
        // We have an extra first page (a name the peer deleted was a boundary).
        let ours = [page("a", 1), page("m", 2)];
        let theirs = [page("m", 2)];
        assert_eq!(differing_ranges(&theirs, &ours), vec![]);
        assert_eq!(
            differing_ranges(&ours, &theirs),
            vec![(vec![], Some(b"m".to_vec()))]
        );
        let merged = merge_ranges(vec![
            (b"k".to_vec(), None),
            (vec![], Some(b"c".to_vec())),
            (b"b".to_vec(), Some(b"d".to_vec())),
        ]);
        assert_eq!(
            merged,
            vec![(vec![], Some(b"d".to_vec())), (b"k".to_vec(), None)]
        );
    }
}
