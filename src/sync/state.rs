//! Sync state as an operator reads it: per peer, whether it can be reached (and since
//! when it cannot, with the error); per peer and volume, whether this node holds what the
//! peer has (in sync, or behind by how many entries and bytes, since when), the round
//! under way (progress, rate, ETA), the last completed round and the last error.
//!
//! The peer's task writes it as things happen; `/status`, `/readyz` and `/metrics` read
//! it. Each peer's state sits behind one std mutex held only to copy a few fields, never
//! across an await: a reader never waits on a volume lock, a scan, the store or the
//! network, so the HTTP endpoint answers at once during a start-up scan or a big pull.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::tree::SubtreeTotals;

/// How often an error that persists unchanged is logged again (besides the first time
/// and whenever its text changes): at most once per this many heartbeats.
pub const RELOG_HEARTBEATS: u32 = 10;

/// An error that keeps happening: what it says, since when, how often in a row. Said in
/// the log the first time, whenever its text changes, and again at most every
/// [`RELOG_HEARTBEATS`] heartbeats while it lasts, so a lasting failure stays visible
/// in recent logs without flooding them.
#[derive(Debug, Clone)]
pub struct Repeated {
    message: String,
    since: SystemTime,
    last: SystemTime,
    count: u64,
    logged_at: Instant,
}

impl Repeated {
    /// Records one more occurrence of `message` in `slot`; returns whether to log it now
    /// (`every`: the re-log interval).
    pub fn record(slot: &mut Option<Repeated>, message: &str, every: Duration) -> bool {
        let now = (SystemTime::now(), Instant::now());
        match slot {
            Some(seen) if seen.message == message => {
                seen.count += 1;
                seen.last = now.0;
                if now.1.duration_since(seen.logged_at) >= every {
                    seen.logged_at = now.1;
                    return true;
                }
                false
            }
            _ => {
                *slot = Some(Repeated {
                    message: message.to_string(),
                    since: now.0,
                    last: now.0,
                    count: 1,
                    logged_at: now.1,
                });
                true
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn since(&self) -> SystemTime {
        self.since
    }

    /// `(N times since T)`, for a line that logs it again.
    pub fn describe_repeats(&self) -> String {
        if self.count <= 1 {
            return String::new();
        }
        format!(" ({} times since {})", self.count, rfc3339(self.since))
    }

    fn status(&self) -> Failure {
        Failure {
            message: self.message.clone(),
            since: rfc3339(self.since),
            last: rfc3339(self.last),
            count: self.count,
        }
    }
}

/// An error as `/status` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    /// When it first happened in this run of failures (RFC 3339 UTC).
    pub since: String,
    /// When it last happened.
    pub last: String,
    /// How many times in a row.
    pub count: u64,
}

/// Whether this node holds what a peer has of a volume.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Not compared yet (the peer was not reached, or the first round is under way).
    #[default]
    Unknown,
    /// The last round found nothing to take, or took all of it.
    InSync,
    /// The peer has changes this node has not taken yet.
    Behind,
    /// The peer's operator paused the volume there (`shoal pause`): it neither gives
    /// nor takes changes until resumed. Not an error.
    Paused,
}

/// A pull round under way.
#[derive(Debug, Clone)]
struct Round {
    started: SystemTime,
    clock: Instant,
    /// The peer's and our totals when the round began (its root's and ours).
    peer: SubtreeTotals,
    local: SubtreeTotals,
    /// Files decided on (to fetch) so far, and their bytes.
    found: (u64, u64),
    /// Entries applied so far (files, directories, links, deletes), and file bytes.
    done: (u64, u64),
}

impl Round {
    /// Entries and bytes still to take: what the round has decided on and not applied
    /// yet, or, while the walk has not got that far, what the peer holds beyond us (a
    /// first sync: its totals less ours less what arrived).
    fn pending(&self) -> (u64, u64) {
        let estimate = (
            self.peer
                .files
                .saturating_sub(self.local.files)
                .saturating_sub(self.done.0),
            self.peer
                .bytes
                .saturating_sub(self.local.bytes)
                .saturating_sub(self.done.1),
        );
        let decided = (
            self.found.0.saturating_sub(self.done.0),
            self.found.1.saturating_sub(self.done.1),
        );
        (estimate.0.max(decided.0), estimate.1.max(decided.1))
    }

    fn status(&self) -> RoundProgress {
        let elapsed = self.clock.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            (self.done.1 as f64 / elapsed) as u64
        } else {
            0
        };
        let (pending_entries, pending_bytes) = self.pending();
        RoundProgress {
            started: rfc3339(self.started),
            peer_files: self.peer.files,
            peer_bytes: self.peer.bytes,
            entries_done: self.done.0,
            bytes_done: self.done.1,
            pending_entries,
            pending_bytes,
            bytes_per_second: rate,
            eta_seconds: (rate > 0).then(|| pending_bytes.div_ceil(rate)),
        }
    }
}

/// The round under way, as `/status` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RoundProgress {
    pub started: String,
    /// What the peer's volume holds (files, bytes), as its root said at the start.
    pub peer_files: u64,
    pub peer_bytes: u64,
    /// Entries applied so far, and the bytes of the files among them.
    pub entries_done: u64,
    pub bytes_done: u64,
    /// Entries and bytes still to take (see [`Verdict::Behind`]).
    pub pending_entries: u64,
    pub pending_bytes: u64,
    /// File bytes applied per second since the round began.
    pub bytes_per_second: u64,
    /// `pending_bytes` at that rate; `null` before anything arrived.
    pub eta_seconds: Option<u64>,
}

#[derive(Debug, Default)]
struct VolumeSync {
    verdict: Verdict,
    /// Since when this node has been behind (the oldest change not taken yet was seen).
    behind_since: Option<SystemTime>,
    /// What the last round that ended left to take (entries, bytes).
    left: (u64, u64),
    last_round: Option<SystemTime>,
    round: Option<Round>,
    failure: Option<Repeated>,
}

#[derive(Debug)]
struct Link {
    connected: bool,
    /// The address reached this node itself: not a peer to wait for.
    itself: bool,
    /// When the peer became known, or the connection last came up or went down.
    since: SystemTime,
    failure: Option<Repeated>,
}

/// What this node knows of its sync with one peer.
#[derive(Debug)]
pub struct PeerSync(Mutex<PeerInner>);

#[derive(Debug)]
struct PeerInner {
    link: Link,
    volumes: BTreeMap<String, VolumeSync>,
}

impl Default for PeerSync {
    fn default() -> Self {
        PeerSync(Mutex::new(PeerInner {
            link: Link {
                connected: false,
                itself: false,
                since: SystemTime::now(),
                failure: None,
            },
            volumes: BTreeMap::new(),
        }))
    }
}

impl PeerSync {
    fn inner(&self) -> std::sync::MutexGuard<'_, PeerInner> {
        // Only plain fields are changed under this lock: a panic elsewhere leaves them
        // whole, so a poisoned lock is still good to use.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn connected(&self) {
        let mut inner = self.inner();
        inner.link = Link {
            connected: true,
            itself: false,
            since: SystemTime::now(),
            failure: None,
        };
    }

    /// The connection went down (`reason`), or could not be made: returns whether to
    /// log it now (see [`Repeated`]).
    pub fn unreachable(&self, reason: &str, relog: Duration) -> bool {
        let mut inner = self.inner();
        if inner.link.connected {
            inner.link.connected = false;
            inner.link.since = SystemTime::now();
        }
        Repeated::record(&mut inner.link.failure, reason, relog)
    }

    /// The address turned out to be this node's own.
    pub fn mark_self(&self) {
        let mut inner = self.inner();
        inner.link.itself = true;
        inner.link.failure = None;
    }

    pub fn is_self(&self) -> bool {
        self.inner().link.itself
    }

    /// How many connection attempts in a row failed, and the last error.
    pub fn link_failure(&self) -> Option<Repeated> {
        self.inner().link.failure.clone()
    }

    /// Whether connected, and since when connected or not.
    pub fn link(&self) -> (bool, SystemTime) {
        let inner = self.inner();
        (inner.link.connected, inner.link.since)
    }

    /// A round of `volume` begins: the peer's root totals and ours.
    pub fn round_started(&self, volume: &str, peer: SubtreeTotals, local: SubtreeTotals) {
        let mut inner = self.inner();
        let state = inner.volumes.entry(volume.to_string()).or_default();
        state.round = Some(Round {
            started: SystemTime::now(),
            clock: Instant::now(),
            peer,
            local,
            found: (0, 0),
            done: (0, 0),
        });
        state.verdict = Verdict::Behind;
        state.behind_since.get_or_insert_with(SystemTime::now);
    }

    /// The round decided to fetch `files` files of `bytes` bytes more.
    pub fn found(&self, volume: &str, files: u64, bytes: u64) {
        if let Some(round) = self.round_mut(volume).as_mut() {
            round.found.0 += files;
            round.found.1 += bytes;
        }
    }

    /// The round applied `entries` more entries, `bytes` file bytes among them.
    pub fn applied(&self, volume: &str, entries: u64, bytes: u64) {
        if let Some(round) = self.round_mut(volume).as_mut() {
            round.done.0 += entries;
            round.done.1 += bytes;
        }
    }

    fn round_mut<'a>(&'a self, volume: &'a str) -> RoundGuard<'a> {
        RoundGuard {
            inner: self.inner(),
            volume,
        }
    }

    /// A round ended without error; `left` files (of `left_bytes` bytes) it could not
    /// take (a chunk no peer had, no room) keep the volume behind.
    pub fn round_done(&self, volume: &str, left: u64, left_bytes: u64) {
        let mut inner = self.inner();
        let state = inner.volumes.entry(volume.to_string()).or_default();
        state.round = None;
        state.last_round = Some(SystemTime::now());
        state.failure = None;
        state.left = (left, left_bytes);
        if left == 0 {
            state.verdict = Verdict::InSync;
            state.behind_since = None;
        } else {
            state.verdict = Verdict::Behind;
            state.behind_since.get_or_insert_with(SystemTime::now);
        }
    }

    /// A round failed with `error`: returns whether to log it now (see [`Repeated`]).
    pub fn round_failed(&self, volume: &str, error: &str, relog: Duration) -> bool {
        let mut inner = self.inner();
        let state = inner.volumes.entry(volume.to_string()).or_default();
        if let Some(round) = state.round.take() {
            state.left = round.pending();
        }
        Repeated::record(&mut state.failure, error, relog)
    }

    /// The peer answered that its operator paused the volume: no failure is counted;
    /// returns whether it was not known paused before (to say so once).
    pub fn round_paused(&self, volume: &str) -> bool {
        let mut inner = self.inner();
        let state = inner.volumes.entry(volume.to_string()).or_default();
        if let Some(round) = state.round.take() {
            state.left = round.pending();
        }
        state.failure = None;
        let newly = state.verdict != Verdict::Paused;
        state.verdict = Verdict::Paused;
        newly
    }

    /// Rounds of each volume that failed in a row, with the last error.
    pub fn failing_volumes(&self) -> Vec<(String, Repeated)> {
        self.inner()
            .volumes
            .iter()
            .filter_map(|(name, v)| Some((name.clone(), v.failure.clone()?)))
            .collect()
    }

    /// The round under way for `volume`, if any (for a progress log line).
    pub fn progress(&self, volume: &str) -> Option<RoundProgress> {
        self.inner()
            .volumes
            .get(volume)
            .and_then(|v| v.round.as_ref().map(Round::status))
    }

    /// Each volume's state with this peer, as `/status` shows it.
    pub fn volumes(&self) -> Vec<PeerVolumeStatus> {
        self.inner()
            .volumes
            .iter()
            .map(|(name, v)| {
                let round = v.round.as_ref().map(Round::status);
                let (pending_entries, pending_bytes) = round
                    .as_ref()
                    .map_or(v.left, |r| (r.pending_entries, r.pending_bytes));
                PeerVolumeStatus {
                    volume: name.clone(),
                    state: v.verdict,
                    pending_entries,
                    pending_bytes,
                    behind_since: v.behind_since.map(rfc3339),
                    lag_seconds: v.behind_since.map_or(0, |t| {
                        SystemTime::now()
                            .duration_since(t)
                            .map_or(0, |d| d.as_secs())
                    }),
                    last_round: v.last_round.map(rfc3339),
                    last_round_unix: v.last_round.map(unix_seconds),
                    round,
                    last_error: v.failure.as_ref().map(Repeated::status),
                }
            })
            .collect()
    }

    /// The connection's last error, as `/status` shows it.
    pub fn link_status(&self) -> (String, Option<Failure>) {
        let inner = self.inner();
        (
            rfc3339(inner.link.since),
            inner.link.failure.as_ref().map(Repeated::status),
        )
    }
}

/// The lock on a peer's state, at one volume's round.
struct RoundGuard<'a> {
    inner: std::sync::MutexGuard<'a, PeerInner>,
    volume: &'a str,
}

impl RoundGuard<'_> {
    fn as_mut(&mut self) -> Option<&mut Round> {
        self.inner
            .volumes
            .get_mut(self.volume)
            .and_then(|v| v.round.as_mut())
    }
}

/// One volume's sync with one peer, as `/status` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PeerVolumeStatus {
    pub volume: String,
    pub state: Verdict,
    /// Entries and bytes still to take from the peer (0 when in sync).
    pub pending_entries: u64,
    pub pending_bytes: u64,
    /// Since when this node has been behind the peer: the oldest change not taken yet
    /// was seen then. `null` when in sync.
    pub behind_since: Option<String>,
    /// Seconds since then (0 when in sync).
    pub lag_seconds: u64,
    /// When the last round that ended without error ended.
    pub last_round: Option<String>,
    pub last_round_unix: Option<u64>,
    /// The round under way, if any.
    pub round: Option<RoundProgress>,
    /// The error of the last rounds, while they keep failing.
    pub last_error: Option<Failure>,
}

/// A volume's scan under way, if any: since when, and the bytes it has read so far
/// (counted by the scan's progress bar, hidden).
#[derive(Default)]
pub struct ScanActivity(Mutex<Option<(SystemTime, indicatif::ProgressBar)>>);

impl ScanActivity {
    /// A scan begins: the progress bar to give it.
    pub fn start(&self) -> indicatif::ProgressBar {
        let bar = indicatif::ProgressBar::hidden();
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((SystemTime::now(), bar.clone()));
        bar
    }

    pub fn end(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn status(&self) -> Option<ScanProgress> {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref().map(|(started, bar)| ScanProgress {
            started: rfc3339(*started),
            bytes_read: bar.position(),
        })
    }
}

/// How many of the changes applied from peers `/status` shows (the newest).
pub const RECENT_CHANGES: usize = 20;

/// A change applied from a peer, as `/status` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AppliedChange {
    /// When (RFC 3339 UTC).
    pub time: String,
    pub volume: String,
    /// The peer it came from (its address).
    pub peer: String,
    /// `file`, `dir`, `symlink`, `deleted`...: what the log line says.
    pub what: String,
    pub path: String,
    /// Bytes of file content.
    pub bytes: u64,
}

/// The last [`RECENT_CHANGES`] changes applied from peers.
#[derive(Default)]
pub struct RecentChanges(Mutex<VecDeque<AppliedChange>>);

impl RecentChanges {
    pub fn note(&self, change: AppliedChange) {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if held.len() == RECENT_CHANGES {
            held.pop_front();
        }
        held.push_back(change);
    }

    /// The changes held, newest first.
    pub fn newest_first(&self) -> Vec<AppliedChange> {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.iter().rev().cloned().collect()
    }
}

/// A scan under way, as `/status` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ScanProgress {
    pub started: String,
    /// Bytes of new and changed files read so far (unchanged files are not read).
    pub bytes_read: u64,
}

/// A time as RFC 3339 UTC, to the second.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(files: u64, bytes: u64) -> SubtreeTotals {
        SubtreeTotals {
            files,
            bytes,
            ..SubtreeTotals::default()
        }
    }

    #[test]
    fn a_first_sync_is_behind_by_what_the_peer_holds_until_the_round_ends() {
        let peer = PeerSync::default();
        peer.round_started("media", totals(10, 1000), totals(0, 0));
        let status = &peer.volumes()[0];
        assert_eq!(status.state, Verdict::Behind);
        assert_eq!((status.pending_entries, status.pending_bytes), (10, 1000));
        peer.found("media", 4, 400);
        peer.applied("media", 4, 400);
        let status = &peer.volumes()[0];
        assert_eq!((status.pending_entries, status.pending_bytes), (6, 600));
        assert_eq!(status.round.as_ref().unwrap().bytes_done, 400);
        peer.round_done("media", 0, 0);
        let status = &peer.volumes()[0];
        assert_eq!(status.state, Verdict::InSync);
        assert_eq!((status.pending_entries, status.pending_bytes), (0, 0));
        assert!(status.round.is_none() && status.last_round.is_some());
    }

    #[test]
    fn a_repeated_error_is_logged_first_on_change_and_after_the_interval() {
        let mut slot = None;
        let hour = Duration::from_secs(3600);
        assert!(Repeated::record(&mut slot, "refused", hour));
        assert!(!Repeated::record(&mut slot, "refused", hour));
        assert!(Repeated::record(&mut slot, "timed out", hour));
        assert!(Repeated::record(&mut slot, "timed out", Duration::ZERO));
        assert_eq!(slot.as_ref().unwrap().count(), 2);
    }

    #[test]
    fn a_peer_that_paused_the_volume_is_paused_here_not_failing() {
        let peer = PeerSync::default();
        peer.round_started("docs", totals(1, 1), totals(0, 0));
        assert!(peer.round_paused("docs"));
        assert!(!peer.round_paused("docs"), "said once");
        assert!(peer.failing_volumes().is_empty());
        assert_eq!(peer.volumes()[0].state, Verdict::Paused);
        peer.round_started("docs", totals(1, 1), totals(0, 0));
        peer.round_done("docs", 0, 0);
        assert_eq!(peer.volumes()[0].state, Verdict::InSync);
    }

    #[test]
    fn failing_rounds_are_counted_until_one_succeeds() {
        let peer = PeerSync::default();
        let hour = Duration::from_secs(3600);
        for _ in 0..3 {
            peer.round_started("docs", totals(1, 1), totals(0, 0));
            peer.round_failed("docs", "disk error", hour);
        }
        assert_eq!(peer.failing_volumes()[0].1.count(), 3);
        peer.round_done("docs", 0, 0);
        assert!(peer.failing_volumes().is_empty());
    }
}
