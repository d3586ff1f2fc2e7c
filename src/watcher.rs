//! The file watcher: turns file system events in a volume into narrow scans.
//!
//! [`VolumeWatcher`] runs `notify` on the volume (recursive inotify: one watch per
//! directory, a new directory gets its watch when its creation is seen). Events cross a
//! bounded queue to the volume's task in [`crate::serve`], which feeds them to a
//! [`Debouncer`]:
//!
//! - Events are coalesced per name. A name is *ready* once it has been quiet for the
//!   debounce window, unless it is being written (data written, no `close` since): then
//!   it waits for the close, or for [`WRITER_PATIENCE`] of silence.
//! - A name that keeps changing (a log appended to, a database rewritten in place) is
//!   *busy*: it is scanned every [`BUSY_INTERVAL`] while it changes, and once more when
//!   it settles, so its peers are never more than about that far behind. The scanner
//!   reads only what an append added, keeps a consistent copy of a file rewritten in
//!   place, and leaves alone busy files larger than it snapshots (a large copy in
//!   progress is published once, complete, not shipped again and again).
//! - The directories of ready names are scanned ([`ScanScope::Dirs`]) with the names not
//!   yet ready held back. A directory new to the index is scanned whole, which also picks
//!   up files written into it before its watch existed.
//! - Lost events (the kernel's queue overflowed, ours did, or the watcher failed) mean a
//!   rescan of the whole volume. Hitting the inotify watch limit turns the watcher off
//!   with a warning; the heartbeat rescans then carry the volume alone.
//!
//! Shoal's own writes do not echo: its staging files live in `.shoal/`, which is not
//! watched (and its events dropped if it is), and sync records the stamp of each name it
//! publishes, creates or removes in the same index batch, under the volume lock. It also
//! tells the volume's [`Echoes`]: a name whose event is ready and that is still exactly
//! what sync wrote (its `lstat` stamp, which any later write moves, through the ctime)
//! is forgotten instead of scanned. Without that, every directory a pull writes into is
//! listed again after each batch it publishes there: quadratic in a directory of
//! 100,000 files received in batches of 256. What sync wrote is good for the one event
//! it causes: a name scanned for any other reason drops it, or a removal by sync would
//! later pass a local delete of the name, created again meanwhile, off as its echo.
//!
//! `notify` 9 (a release candidate, pinned exactly): 8.x, the stable line, watched
//! `IN_OPEN` with no way to leave it out, so every file a scan read or a peer fetched
//! woke the watcher. 9 also reports the directories a recursive watch could not cover:
//! one whose path is too long for the kernel is left alone (nothing under it can sync),
//! any other is taken for lost events.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind, EventKindMask, ModifyKind, RenameMode};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc};

use crate::pathname::VolPath;
use crate::scan::{Depth, IGNORE_FILE, ScanScope};
use crate::store::codec::ScanStamp;
use crate::volume_fs::{VolumeFs, lstat_at};

/// Default quiet time before a changed name is scanned.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(200);

/// How long a file being written (no `close` seen) must be quiet before it is scanned
/// anyway: a writer that keeps its file open (a database, a log) still gets synced.
pub const WRITER_PATIENCE: Duration = Duration::from_secs(10);

/// The longest a name that never goes quiet is held back (a busy name the scanner
/// leaves alone: one too large to snapshot).
pub const MAX_HOLD: Duration = Duration::from_secs(60);

/// How often a name that keeps changing is scanned while it does.
pub const BUSY_INTERVAL: Duration = Duration::from_secs(1);

/// Events queued between the watcher thread and the volume's task; beyond this they are
/// dropped and the volume is rescanned, as after a kernel queue overflow.
pub const DEFAULT_QUEUE: usize = 65_536;

/// What the watcher reports.
#[derive(Debug)]
pub enum Signal {
    Changed {
        path: VolPath,
        change: Change,
    },
    /// Both halves of a rename inside the volume (each also comes as `Changed`).
    Renamed {
        from: VolPath,
        to: VolPath,
    },
    /// Events were lost: only a rescan of the whole volume is sure to see everything.
    Lost(String),
    /// The inotify watch limit was hit; the watcher no longer covers the volume.
    WatchLimit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// File data was written (the file may still be open for writing).
    Written,
    /// A file open for writing was closed.
    Closed,
    /// Anything else: created, deleted, renamed, metadata.
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "the inotify watch limit ({setting} = {limit}) is too low to watch {root} (one watch per directory); raise it on the host, e.g. `sysctl -w {setting}={suggested}`"
    )]
    Limit {
        root: PathBuf,
        setting: &'static str,
        limit: u64,
        suggested: u64,
    },
    #[error("cannot watch {root}: {source}")]
    Other {
        root: PathBuf,
        source: notify::Error,
    },
}

/// A running watch on one volume; dropping it stops the watch.
pub struct VolumeWatcher {
    _watcher: RecommendedWatcher,
    overflow: Arc<Notify>,
}

impl VolumeWatcher {
    /// Watches `root` recursively; `queue` bounds the events waiting to be taken.
    pub fn start(root: &Path, queue: usize) -> Result<(Self, mpsc::Receiver<Signal>), WatchError> {
        // Events name absolute paths under what is watched: watch the canonical root
        // (not a relative path, not through a symlink) so they can be matched to it.
        let root = &std::fs::canonicalize(root).map_err(|e| watch_error(root, e.into()))?;
        let (tx, rx) = mpsc::channel(queue.max(1));
        let overflow = Arc::new(Notify::new());
        let handler = EventHandler {
            root: root.to_path_buf(),
            tx,
            overflow: overflow.clone(),
            gathered: Cell::new(None),
        };
        // Never through a symlink: one pointing at `/` would watch the whole machine, and
        // what happens there is not the volume's. Opening and reading change nothing:
        // without those events, a scan reading every file and peers fetching them do not
        // wake the watcher (with them, its thread took about a sixth of both nodes' CPU
        // on an initial sync of 100,000 tiny files).
        let config = notify::Config::default()
            .with_follow_symlinks(false)
            .with_event_kinds(EventKindMask::CORE | EventKindMask::ACCESS_CLOSE);
        let mut watcher = RecommendedWatcher::new(move |event| handler.handle(event), config)
            .map_err(|source| watch_error(root, source))?;
        watcher
            .watch(root, RecursiveMode::Recursive)
            .map_err(|source| watch_error(root, source))?;
        // Shoal's own directory is not the volume's content (its events are dropped
        // below), and each file a pull takes is written there first (sized, written,
        // given its attributes, closed: an event each). A `.shoal` made later (after a
        // delete) is watched again, which costs only those events.
        let internal = root.join(OsStr::from_bytes(crate::pathname::SHOAL_DIR));
        if let Err(e) = watcher.unwatch(&internal) {
            tracing::debug!("{} stays watched: {e}", internal.display());
        }
        Ok((
            VolumeWatcher {
                _watcher: watcher,
                overflow,
            },
            rx,
        ))
    }

    /// Notified when events were dropped because the queue was full (a notification
    /// sent while nobody waits is kept for the next wait).
    pub fn overflow(&self) -> Arc<Notify> {
        self.overflow.clone()
    }
}

fn watch_error(root: &Path, source: notify::Error) -> WatchError {
    if matches!(source.kind, notify::ErrorKind::MaxFilesWatch) {
        WatchError::limit(root)
    } else {
        WatchError::Other {
            root: root.to_path_buf(),
            source,
        }
    }
}

impl WatchError {
    /// The watch limit was hit watching `root`: says what the limit is and how to raise it.
    pub fn limit(root: &Path) -> Self {
        // The system-wide limit, or the user namespace's own (a container's) if lower.
        let read = |setting: &'static str| {
            let file = format!("/proc/sys/{}", setting.replace('.', "/"));
            let value = std::fs::read_to_string(file)
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()?;
            Some((value, setting))
        };
        let (limit, setting) = [
            read("fs.inotify.max_user_watches"),
            read("user.max_inotify_watches"),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or((8192, "fs.inotify.max_user_watches"));
        WatchError::Limit {
            root: root.to_path_buf(),
            setting,
            limit,
            suggested: (limit.max(8192) * 4).min(u64::from(u32::MAX)),
        }
    }
}

/// Whether `error` is the kernel refusing a path longer than it takes (`ENAMETOOLONG`).
fn path_too_long(error: &notify::Error) -> bool {
    matches!(&error.kind, notify::ErrorKind::Io(e) if e.kind() == std::io::ErrorKind::InvalidFilename)
}

/// How long the watcher's thread waits at the first event after a quiet spell before
/// it reads on, so that the rest of a burst is read together instead of waking the
/// thread (and the volume's task it sends to) a few events at a time. A pull places
/// hundreds of files a batch, an event each: those wake-ups preempted its placing
/// threads at about one `linkat` in 25 on an initial `small` (docs/BENCHMARKS.md). The
/// debounce window is 40 times as long; the kernel queues 16,384 events by default.
const GATHER: Duration = Duration::from_millis(5);

/// Runs on notify's thread: filters and translates events; blocks only to gather a
/// burst ([`GATHER`]).
struct EventHandler {
    root: PathBuf,
    tx: mpsc::Sender<Signal>,
    overflow: Arc<Notify>,
    /// When the last wait to gather a burst ended.
    gathered: Cell<Option<Instant>>,
}

impl EventHandler {
    fn handle(&self, event: notify::Result<notify::Event>) {
        self.gather();
        let event = match event {
            Ok(event) => event,
            Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                return self.send(Signal::WatchLimit);
            }
            // A directory whose path is longer than the kernel takes cannot be watched,
            // and nothing under it can be synced either (the scans list it as
            // unsyncable): no event that matters was lost.
            Err(e) if path_too_long(&e) => {
                tracing::debug!("not watched: {e}");
                return;
            }
            Err(e) => return self.send(Signal::Lost(format!("the watcher failed: {e}"))),
        };
        if event.need_rescan() {
            return self.send(Signal::Lost("the kernel's event queue overflowed".into()));
        }
        if let (EventKind::Modify(ModifyKind::Name(RenameMode::Both)), [from, to]) =
            (event.kind, event.paths.as_slice())
        {
            if let (Some(from), Some(to)) = (self.volume_path(from), self.volume_path(to)) {
                self.send(Signal::Renamed { from, to });
            }
            return;
        }
        let change = match event.kind {
            // Opening or reading changes nothing: the watch leaves those out, and any
            // other access kind is dropped here.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => Change::Closed,
            EventKind::Access(_) => return,
            EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => Change::Written,
            _ => Change::Other,
        };
        for path in &event.paths {
            if let Some(path) = self.volume_path(path) {
                self.send(Signal::Changed { path, change });
            }
        }
    }

    /// Waits [`GATHER`] at an event that comes that long or more after the last wait
    /// ended: the events of a burst queue up in the kernel meanwhile, and notify's
    /// thread then reads them in a few reads, not one wake-up each.
    fn gather(&self) {
        let quiet = |since: Instant| since.elapsed() >= GATHER;
        if self.gathered.get().is_none_or(quiet) {
            std::thread::sleep(GATHER);
            self.gathered.set(Some(Instant::now()));
        }
    }

    /// The path inside the volume; `None` for Shoal's own directory or outside.
    fn volume_path(&self, path: &Path) -> Option<VolPath> {
        let relative = path.strip_prefix(&self.root).ok()?;
        let path = VolPath::parse(relative.as_os_str().as_bytes()).ok()?;
        (!path.is_shoal_internal()).then_some(path)
    }

    fn send(&self, signal: Signal) {
        if self.tx.try_send(signal).is_err() {
            self.overflow.notify_one();
        }
    }
}

/// What sync wrote lately in one volume, to tell its echoes from local changes: each
/// name with the stamp sync indexed it with (`None`: sync removed it). Bounded: a name
/// that finds no room, or whose entry expired before its event was ready, is scanned
/// as any other.
#[derive(Default)]
pub struct Echoes {
    expected: std::sync::Mutex<HashMap<VolPath, Expected>>,
}

struct Expected {
    stamp: Option<ScanStamp>,
    since: Instant,
}

/// Names remembered at once: about 150 bytes each. A pull publishes a few thousand per
/// debounce window at most; the watcher takes them every window.
const MAX_ECHOES: usize = 16_384;

/// An entry whose event never came (lost, or merged into a rescan) is dropped after this.
const ECHO_LIFETIME: Duration = Duration::from_secs(30);

impl Echoes {
    /// Sync wrote these names, now indexed with these stamps (`None`: removed).
    pub fn expect(&self, written: impl IntoIterator<Item = (VolPath, Option<ScanStamp>)>) {
        let now = Instant::now();
        let mut expected = self.expected.lock().expect("echoes lock");
        for (path, stamp) in written {
            if expected.len() >= MAX_ECHOES {
                expected.retain(|_, e| now.duration_since(e.since) < ECHO_LIFETIME);
                if expected.len() >= MAX_ECHOES {
                    return;
                }
            }
            expected.insert(path, Expected { stamp, since: now });
        }
    }

    /// A checker of events against what sync wrote, opening each directory once.
    pub fn checker<'a>(&'a self, fs: &'a VolumeFs) -> EchoChecker<'a> {
        EchoChecker {
            echoes: self,
            fs,
            dirs: HashMap::new(),
        }
    }
}

/// Checks ready names against [`Echoes`] ([`Debouncer::forget_echoes`]).
pub struct EchoChecker<'a> {
    echoes: &'a Echoes,
    fs: &'a VolumeFs,
    dirs: HashMap<VolPath, Option<std::os::fd::OwnedFd>>,
}

impl EchoChecker<'_> {
    /// Drops what sync wrote at `path` unchecked: its event is scanned anyway. An entry
    /// must not outlive the event it was for: left behind, a removal sync made would
    /// pass a later local delete of a file created since off as its echo.
    fn scanned(&self, path: &VolPath) {
        self.echoes
            .expected
            .lock()
            .expect("echoes lock")
            .remove(path);
    }

    /// Drops everything: the whole volume is rescanned.
    fn rescanned(&self) {
        self.echoes.expected.lock().expect("echoes lock").clear();
    }

    /// Whether `path` is still exactly what sync last wrote there: same stamp, or still
    /// absent if sync removed it. Each name is checked once (its entry goes).
    pub fn is_echo(&mut self, path: &VolPath) -> bool {
        let Some(expected) = self
            .echoes
            .expected
            .lock()
            .expect("echoes lock")
            .remove(path)
        else {
            return false;
        };
        let Some((dir, name)) = path.split_last() else {
            return false;
        };
        // New ignore rules change what is synced below their directory: always scanned.
        if name == IGNORE_FILE.as_bytes() {
            return false;
        }
        let fs = self.fs;
        let dir_fd = self
            .dirs
            .entry(dir.clone())
            .or_insert_with(|| fs.open_dir(&dir, false).ok());
        let Some(dir_fd) = dir_fd else {
            return false;
        };
        match (lstat_at(&*dir_fd, name), expected.stamp) {
            (Ok(stat), Some(stamp)) => stat.stamp() == stamp,
            (Err(e), None) => e.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

/// Coalesces changes per name and says when, and what, to scan.
pub struct Debouncer {
    window: Duration,
    names: HashMap<VolPath, NameState>,
    /// Events were lost: the next scan covers everything.
    everything: bool,
    /// When to look again; `None` when nothing is waiting.
    due: Option<Instant>,
    /// Renames seen since the last scan, `(from, to)`.
    renamed: Vec<(VolPath, VolPath)>,
    /// When the last event came (of any name): the volume has been quiet since.
    last_event: Option<Instant>,
}

/// Renames remembered between two scans; more are dropped (they only save re-reading).
const MAX_RENAMES: usize = 10_000;

/// Names tracked between two scans; beyond this the next scan covers the whole volume.
const MAX_PENDING_NAMES: usize = 100_000;

struct NameState {
    first: Instant,
    last: Instant,
    writing: bool,
    /// Scanned again for the scans' own sake ([`Debouncer::again`]), with no event
    /// since: ready at once, never held.
    settled: bool,
    /// When it was last scanned while busy (still changing).
    scanned_busy: Option<Instant>,
}

impl NameState {
    /// When it is due for a scan while still busy: [`BUSY_INTERVAL`] after it began
    /// changing or was last scanned, if it changed since; `None` if it did not.
    fn busy_due(&self) -> Option<Instant> {
        match self.scanned_busy {
            Some(scanned) if self.last <= scanned => None,
            Some(scanned) => Some(scanned + BUSY_INTERVAL),
            None => Some(self.first + BUSY_INTERVAL),
        }
    }
}

/// One scan the debouncer asks for.
#[derive(Debug)]
pub struct ScanRequest {
    pub scope: ScanScope,
    /// Names not ready yet: the scan must leave them alone.
    pub hold: HashSet<VolPath>,
    /// Names scanned while they still change ([`BUSY_INTERVAL`]).
    pub busy: HashSet<VolPath>,
    /// Renames seen since the last scan, `(from, to)`.
    pub renamed: Vec<(VolPath, VolPath)>,
    /// Names asked for again by the last scan with no event since (the deletes it left):
    /// their directories are scanned at [`Depth::Left`] unless other names there changed.
    pub left: HashSet<VolPath>,
}

impl Debouncer {
    pub fn new(window: Duration) -> Self {
        Debouncer {
            window,
            names: HashMap::new(),
            everything: false,
            due: None,
            renamed: Vec::new(),
            last_event: None,
        }
    }

    pub fn renamed(&mut self, from: VolPath, to: VolPath) {
        if self.renamed.len() < MAX_RENAMES {
            self.renamed.push((from, to));
        }
    }

    pub fn record(&mut self, path: VolPath, change: Change, now: Instant) {
        self.last_event = Some(now);
        if self.names.len() >= MAX_PENDING_NAMES && !self.names.contains_key(&path) {
            // A burst this large (a restore, a million-file copy) is cheaper to rescan
            // whole than to track name by name.
            self.names.clear();
            self.lost(now);
        }
        if self.everything {
            self.due.get_or_insert(now + self.window);
            return;
        }
        let state = self.names.entry(path).or_insert(NameState {
            first: now,
            last: now,
            writing: false,
            settled: false,
            scanned_busy: None,
        });
        state.last = now;
        state.settled = false;
        match change {
            Change::Written => state.writing = true,
            Change::Closed => state.writing = false,
            Change::Other => {}
        }
        self.due.get_or_insert(now + self.window);
    }

    /// Asks for `path` to be scanned again, for no event of its own: a delete a scan left
    /// to the next one (`crate::guard::ScanGuard::defer`). A deleted name does not
    /// change, so it is ready at once and never held: held, it would look like a burst
    /// still going on and make the next scan leave it again, and the next, for as long
    /// as the guard lets deletes wait (`crate::guard::MAX_DEFER`, 10 s). It is scanned
    /// with what comes next, and at the latest once the volume has been quiet for one
    /// window since its last event (what the deferral is for: a burst seen in pieces is
    /// judged whole, once it has paused as long as a name takes to settle). A scan
    /// that took longer than that with no event meanwhile has already waited it out:
    /// the names are due at once.
    pub fn again(&mut self, path: VolPath, now: Instant) {
        if self.names.len() >= MAX_PENDING_NAMES && !self.names.contains_key(&path) {
            self.names.clear();
            self.lost(now);
        }
        if !self.everything {
            self.names.entry(path).or_insert(NameState {
                first: now,
                last: now,
                writing: false,
                settled: true,
                scanned_busy: None,
            });
        }
        let quiet = self
            .last_event
            .map_or(now, |last| (last + self.window).max(now));
        self.due = Some(self.due.map_or(quiet, |due| due.min(quiet)));
    }

    /// Events were lost: rescan everything once the current burst is quiet.
    pub fn lost(&mut self, now: Instant) {
        self.last_event = Some(now);
        self.everything = true;
        self.due.get_or_insert(now + self.window);
    }

    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Names that are not ready, for a scan that does not come from here (the heartbeat).
    pub fn held(&self, now: Instant) -> HashSet<VolPath> {
        self.names
            .iter()
            .filter(|(_, state)| !self.is_ready(state, now))
            .map(|(path, _)| path.clone())
            .collect()
    }

    fn is_ready(&self, state: &NameState, now: Instant) -> bool {
        let quiet = now.saturating_duration_since(state.last);
        let settled = quiet >= self.window && (!state.writing || quiet >= WRITER_PATIENCE);
        state.settled || settled || now.saturating_duration_since(state.first) >= MAX_HOLD
    }

    /// Forgets the names ready now that `echoes` says are sync's own writes, still as
    /// it left them: nothing to scan. Names written to (not closed), busy, or asked for
    /// again by a scan are scanned whatever sync wrote, as is everything once events
    /// were lost: their entries in `echoes` are dropped unchecked, used up with the
    /// event they were for. Returns how many names it forgot.
    pub fn forget_echoes(&mut self, now: Instant, echoes: &mut EchoChecker) -> u64 {
        if self.everything {
            echoes.rescanned();
            return 0;
        }
        let due: Vec<(VolPath, bool)> = self
            .names
            .iter()
            .filter_map(|(path, state)| {
                let ready = self.is_ready(state, now);
                let busy = state.busy_due().is_some_and(|due| due <= now);
                let may_echo =
                    ready && !state.writing && !state.settled && state.scanned_busy.is_none();
                (ready || busy).then(|| (path.clone(), may_echo))
            })
            .collect();
        let mut forgotten = 0;
        for (path, may_echo) in due {
            if !may_echo {
                echoes.scanned(&path);
            } else if echoes.is_echo(&path) {
                self.names.remove(&path);
                forgotten += 1;
            }
        }
        forgotten
    }

    /// The scan to run now, if anything is ready; forgets the names it covers, except
    /// busy ones (still changing), which it keeps watching.
    pub fn take_ready(&mut self, now: Instant) -> Option<ScanRequest> {
        let mut dirs: BTreeMap<VolPath, Depth> = BTreeMap::new();
        let mut next: Option<Instant> = None;
        let mut busy = HashSet::new();
        let window = self.window;
        let mut ready: Vec<(VolPath, bool)> = Vec::new();
        for (path, state) in &self.names {
            if self.is_ready(state, now) {
                ready.push((path.clone(), state.settled));
                continue;
            }
            let busy_due = state.busy_due();
            if busy_due.is_some_and(|due| due <= now) {
                busy.insert(path.clone());
                let when = now + BUSY_INTERVAL;
                next = Some(next.map_or(when, |n| n.min(when)));
                continue;
            }
            let settles = if state.writing {
                state.last + WRITER_PATIENCE
            } else {
                state.last + window
            };
            let when = settles.min(state.first + MAX_HOLD);
            let when = busy_due.map_or(when, |due| when.min(due));
            next = Some(next.map_or(when, |n| n.min(when)));
        }
        for path in &busy {
            if let Some(state) = self.names.get_mut(path) {
                state.scanned_busy = Some(now);
            }
        }
        for (path, _) in &ready {
            self.names.remove(path);
        }
        let mut left = HashSet::new();
        let busy_names = busy.iter().map(|path| (path.clone(), false));
        for (path, settled) in ready.into_iter().chain(busy_names) {
            let (dir, depth) = match path.split_last() {
                // New ignore rules change what is synced below their directory.
                Some((dir, name)) if name == IGNORE_FILE.as_bytes() => (dir, Depth::Subtree),
                Some((dir, _)) if settled => (dir, Depth::Left),
                Some((dir, _)) => (dir, Depth::Names),
                None => (VolPath::root(), Depth::Names),
            };
            let merged = dirs.get(&dir).map_or(depth, |d| (*d).max(depth));
            dirs.insert(dir, merged);
            if settled {
                left.insert(path);
            }
        }
        self.due = next;
        let scope = if std::mem::take(&mut self.everything) {
            ScanScope::Everything
        } else if dirs.is_empty() {
            return None;
        } else {
            ScanScope::Dirs(dirs)
        };
        // Only once a scan is certain: while a pull writes, most calls find nothing but
        // its own writes, already forgotten as echoes, and every other name held.
        let hold = self
            .names
            .keys()
            .filter(|path| !busy.contains(*path))
            .cloned()
            .collect();
        Some(ScanRequest {
            scope,
            hold,
            busy,
            renamed: std::mem::take(&mut self.renamed),
            left,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> VolPath {
        VolPath::parse(p.as_bytes()).unwrap()
    }

    fn dirs(request: &ScanRequest) -> Vec<(String, Depth)> {
        match &request.scope {
            ScanScope::Dirs(dirs) => dirs
                .iter()
                .map(|(d, depth)| (d.display().to_string(), *depth))
                .collect(),
            ScanScope::Everything => panic!("expected directories"),
        }
    }

    const WINDOW: Duration = Duration::from_millis(200);

    #[test]
    fn a_name_scanned_again_is_ready_at_once_and_holds_no_scan_back() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(WINDOW);
        // Deletes left by the last scan, while another name is still being written.
        d.record(path("b/busy"), Change::Written, t0);
        d.again(path("a/gone1"), t0 + Duration::from_millis(50));
        d.again(path("a/gone2"), t0 + Duration::from_millis(90));
        // Scanned with what comes next; only the name still settling is held.
        assert_eq!(d.due(), Some(t0 + WINDOW));
        let first = d.take_ready(t0 + WINDOW).unwrap();
        // Their directory was listed by the scan that left them: only they are looked up.
        assert_eq!(dirs(&first), [("a".into(), Depth::Left)]);
        assert_eq!(
            first.left,
            HashSet::from([path("a/gone1"), path("a/gone2")])
        );
        assert_eq!(first.hold, HashSet::from([path("b/busy")]));
        // Alone, they wait until the volume has been quiet for a window since its last
        // event (here a close that came while the scan ran), and are then neither
        // held nor left behind.
        d.record(path("b/busy"), Change::Closed, t0 + WINDOW);
        d.again(path("a/gone3"), t0 + WINDOW + WINDOW / 4);
        assert_eq!(
            d.due(),
            Some(t0 + WINDOW * 2),
            "a window after the last event"
        );
        let quiet = d.take_ready(t0 + WINDOW * 2).unwrap();
        assert_eq!(
            dirs(&quiet),
            [("a".into(), Depth::Left), ("b".into(), Depth::Names)]
        );
        assert!(quiet.hold.is_empty());
        assert_eq!(d.due(), None);
        // Left by a scan that ran longer than a window with no event meanwhile: the
        // burst has paused that long already, so they are due at once.
        let t1 = t0 + WINDOW * 4;
        d.again(path("a/gone4"), t1);
        assert_eq!(d.due(), Some(t1));
        let at_once = d.take_ready(t1).unwrap();
        assert_eq!(dirs(&at_once), [("a".into(), Depth::Left)]);
        assert!(at_once.hold.is_empty());
        // An event while it ran: a window after that event.
        d.record(path("c/new"), Change::Other, t1 + WINDOW);
        d.record(path("a/new"), Change::Other, t1 + WINDOW);
        d.again(path("a/gone5"), t1 + WINDOW + WINDOW / 2);
        assert_eq!(d.due(), Some(t1 + WINDOW * 2));
        let with_it = d.take_ready(t1 + WINDOW * 2).unwrap();
        // A directory with other news is listed.
        assert_eq!(
            dirs(&with_it),
            [("a".into(), Depth::Names), ("c".into(), Depth::Names)]
        );
        assert_eq!(d.due(), None);
        // An event of its own after that makes it an ordinary name again: held until quiet.
        let t2 = t1 + WINDOW * 4;
        d.again(path("a/back"), t2);
        d.record(path("a/back"), Change::Other, t2 + WINDOW);
        let held = d.take_ready(t2 + WINDOW + Duration::from_millis(10));
        assert!(held.is_none_or(|r| r.hold.contains(&path("a/back"))));
    }

    #[test]
    fn coalesces_a_burst_into_one_scan_of_its_directories() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(WINDOW);
        for i in 0..100 {
            let at = t0 + Duration::from_millis(i);
            d.record(path(&format!("a/f{i}")), Change::Other, at);
            d.record(path(&format!("a/f{i}")), Change::Written, at);
            d.record(path(&format!("a/f{i}")), Change::Closed, at);
        }
        d.record(path("top"), Change::Other, t0);
        assert_eq!(d.due(), Some(t0 + WINDOW));
        let first = d.take_ready(t0 + WINDOW).unwrap();
        // Only what has been quiet for the window is scanned; the rest is held.
        assert_eq!(
            dirs(&first),
            [("/".into(), Depth::Names), ("a".into(), Depth::Names)]
        );
        assert_eq!(first.hold.len(), 99);
        assert_eq!(d.due(), Some(t0 + Duration::from_millis(1) + WINDOW));
        let second = d
            .take_ready(t0 + Duration::from_millis(99) + WINDOW)
            .unwrap();
        assert_eq!(dirs(&second), [("a".into(), Depth::Names)]);
        assert!(second.hold.is_empty());
        assert_eq!(d.due(), None);
        assert!(d.take_ready(t0 + Duration::from_secs(5)).is_none());
    }

    #[test]
    fn a_file_being_written_waits_for_its_close() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(WINDOW);
        d.record(path("big"), Change::Other, t0);
        d.record(path("big"), Change::Written, t0);
        // The writer pauses longer than the window, without closing.
        let paused = t0 + WINDOW * 3;
        let request = d.take_ready(paused);
        assert!(request.is_none());
        assert_eq!(d.held(paused).len(), 1);
        d.record(path("big"), Change::Written, paused);
        d.record(path("big"), Change::Closed, paused);
        assert!(d.take_ready(paused + WINDOW / 2).is_none());
        let request = d.take_ready(paused + WINDOW).unwrap();
        assert_eq!(dirs(&request), [("/".into(), Depth::Names)]);
        // A writer that never closes: what it wrote is scanned within the busy
        // interval, and the file once more when the writer's patience runs out.
        d.record(path("db"), Change::Written, t0);
        assert!(d.take_ready(t0 + BUSY_INTERVAL / 2).is_none());
        let busy = d.take_ready(t0 + BUSY_INTERVAL).unwrap();
        assert!(busy.busy.contains(&path("db")));
        assert!(d.take_ready(t0 + WRITER_PATIENCE / 2).is_none());
        assert!(d.take_ready(t0 + WRITER_PATIENCE).unwrap().busy.is_empty());
    }

    #[test]
    fn a_name_that_never_goes_quiet_is_scanned_every_busy_interval_and_once_it_settles() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(WINDOW);
        let step = Duration::from_millis(50);
        let mut at = t0;
        let mut busy_scans = Vec::new();
        // A log appended every 50 ms for 10 s.
        while at < t0 + Duration::from_secs(10) {
            d.record(path("log"), Change::Written, at);
            if let Some(request) = d.take_ready(at) {
                assert!(request.busy.contains(&path("log")), "scanned as busy");
                assert!(request.hold.is_empty());
                assert_eq!(dirs(&request), [("/".into(), Depth::Names)]);
                busy_scans.push(at);
            }
            at += step;
        }
        assert_eq!(busy_scans.len(), 9, "{busy_scans:?}");
        for pair in busy_scans.windows(2) {
            assert!(pair[1] - pair[0] <= BUSY_INTERVAL + step);
        }
        // The writer stops (without closing): one busy scan takes the last writes, and
        // nothing more until the writer's patience runs out.
        let last_write = at - step;
        let request = d.take_ready(busy_scans[8] + BUSY_INTERVAL).unwrap();
        assert!(request.busy.contains(&path("log")));
        assert!(d.take_ready(last_write + WRITER_PATIENCE / 2).is_none());
        let settled = d.take_ready(last_write + WRITER_PATIENCE).unwrap();
        assert!(settled.busy.is_empty());
        assert_eq!(dirs(&settled), [("/".into(), Depth::Names)]);
        assert!(d.take_ready(last_write + WRITER_PATIENCE * 2).is_none());
    }

    #[test]
    fn lost_events_and_ignore_rules_widen_the_scan() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(WINDOW);
        d.record(path("a/b/.shoalignore"), Change::Other, t0);
        d.record(path("a/b/c"), Change::Other, t0);
        let request = d.take_ready(t0 + WINDOW).unwrap();
        assert_eq!(dirs(&request), [("a/b".into(), Depth::Subtree)]);
        d.lost(t0);
        let request = d.take_ready(t0 + WINDOW).unwrap();
        assert!(matches!(request.scope, ScanScope::Everything));
        // Too many names to track: the whole volume instead, in bounded memory.
        for i in 0..=MAX_PENDING_NAMES {
            d.record(path(&format!("many/f{i}")), Change::Other, t0);
        }
        assert!(d.names.len() < 10);
        let request = d.take_ready(t0 + WINDOW).unwrap();
        assert!(matches!(request.scope, ScanScope::Everything));
    }

    /// A volume holding `files` (their parent directories made).
    fn volume_with(files: &[&str]) -> (tempfile::TempDir, VolumeFs) {
        let dir = tempfile::tempdir().unwrap();
        for name in files {
            let file = dir.path().join(name);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, b"from a peer").unwrap();
        }
        let fs = VolumeFs::open(dir.path()).unwrap();
        (dir, fs)
    }

    fn stamp_in(dir: &Path, name: &str) -> ScanStamp {
        let dir = std::fs::File::open(dir).unwrap();
        lstat_at(&dir, name.as_bytes()).unwrap().stamp()
    }

    #[test]
    fn ready_names_that_are_echoes_are_forgotten_and_the_rest_scanned() {
        let (dir, fs) = volume_with(&["in/a", "in/b", "out/c", "late/e"]);
        std::fs::create_dir_all(dir.path().join("gone")).unwrap();
        let echoes = Echoes::default();
        echoes.expect(
            ["in/a", "in/b", "out/c", "late/e"]
                .map(|name| (path(name), Some(stamp_in(dir.path(), name)))),
        );
        // Sync removed these two; one is created again (still open for writing).
        echoes.expect([(path("in/open"), None), (path("gone/d"), None)]);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.path().join("out/c"), b"local").unwrap();
        std::fs::write(dir.path().join("in/open"), b"local").unwrap();

        let t0 = Instant::now();
        let mut d = Debouncer::new(WINDOW);
        d.record(path("in/a"), Change::Other, t0);
        d.record(path("in/b"), Change::Other, t0);
        d.record(path("out/c"), Change::Other, t0);
        d.record(path("in/open"), Change::Written, t0);
        d.again(path("gone/d"), t0);
        d.record(path("late/e"), Change::Other, t0 + WINDOW / 2);
        // Only ready names settled by events are checked: not the one still open for
        // writing, not one a scan asked for again, not one that is not quiet yet.
        let forgotten = d.forget_echoes(t0 + WINDOW, &mut echoes.checker(&fs));
        assert_eq!(forgotten, 2);
        let request = d.take_ready(t0 + WINDOW).unwrap();
        assert_eq!(
            dirs(&request),
            [("gone".into(), Depth::Left), ("out".into(), Depth::Names)]
        );
        assert_eq!(
            request.hold,
            HashSet::from([path("in/open"), path("late/e")])
        );
        // Scanned without being checked, the name asked for again used up its entry.
        let left: Vec<_> = echoes
            .expected
            .lock()
            .unwrap()
            .keys()
            .map(|p| p.display().to_string())
            .collect();
        assert!(!left.contains(&"gone/d".to_string()), "{left:?}");
        let late = t0 + WINDOW * 2;
        assert_eq!(d.forget_echoes(late, &mut echoes.checker(&fs)), 1, "late/e");

        // The name created again is scanned once its writer has been quiet long enough,
        // unchecked: what sync removed there is no echo of anything any more. Deleted
        // later, it is a local delete like any other, not sync's removal again.
        let patient = late + WRITER_PATIENCE;
        assert_eq!(d.forget_echoes(patient, &mut echoes.checker(&fs)), 0);
        assert_eq!(
            dirs(&d.take_ready(patient).unwrap()),
            [("in".into(), Depth::Names)]
        );
        std::fs::remove_file(dir.path().join("in/open")).unwrap();
        d.record(path("in/open"), Change::Other, patient);
        let deleted = patient + WINDOW;
        assert_eq!(d.forget_echoes(deleted, &mut echoes.checker(&fs)), 0);
        assert_eq!(
            dirs(&d.take_ready(deleted).unwrap()),
            [("in".into(), Depth::Names)]
        );

        // Once events were lost, nothing is forgotten and nothing kept: the rescan
        // covers it all.
        echoes.expect([(path("in/a"), Some(stamp_in(dir.path(), "in/a")))]);
        d.record(path("in/a"), Change::Other, deleted);
        d.lost(deleted);
        assert_eq!(
            d.forget_echoes(deleted + WINDOW * 2, &mut echoes.checker(&fs)),
            0
        );
        assert!(echoes.expected.lock().unwrap().is_empty());
    }

    #[test]
    fn an_echo_is_a_name_still_exactly_as_sync_left_it() {
        let (dir, fs) = volume_with(&["d/written", "d/rewritten", "d/replaced", IGNORE_FILE]);
        let echoes = Echoes::default();
        echoes.expect(
            [
                "d/written",
                "d/rewritten",
                "d/replaced",
                IGNORE_FILE,
                "d/removed",
            ]
            .map(|name| {
                (
                    path(name),
                    (name != "d/removed").then(|| stamp_in(dir.path(), name)),
                )
            }),
        );
        // Written again after sync indexed it: the ctime moved even if nothing else did.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.path().join("d/rewritten"), b"from a peer").unwrap();
        // Something else put under the name.
        std::fs::remove_file(dir.path().join("d/replaced")).unwrap();
        std::fs::write(dir.path().join("d/replaced"), b"from a peer").unwrap();
        let mut checker = echoes.checker(&fs);
        assert!(checker.is_echo(&path("d/written")));
        assert!(!checker.is_echo(&path("d/rewritten")));
        assert!(!checker.is_echo(&path("d/replaced")));
        assert!(checker.is_echo(&path("d/removed")));
        assert!(
            !checker.is_echo(&path(IGNORE_FILE)),
            "new rules are always scanned"
        );
        assert!(!checker.is_echo(&path("d/never-written")));
        // Each is checked once: a second event on the same name is scanned.
        assert!(!checker.is_echo(&path("d/written")));
        // Created again after sync removed it: not an echo.
        echoes.expect([(path("d/removed"), None)]);
        std::fs::write(dir.path().join("d/removed"), b"local").unwrap();
        assert!(!echoes.checker(&fs).is_echo(&path("d/removed")));
    }

    /// The inodes this process's inotify descriptors watch (from `/proc/self/fdinfo`).
    fn watched_inodes() -> HashSet<u64> {
        let mut inodes = HashSet::new();
        for fd in std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            for line in info.lines().filter(|l| l.starts_with("inotify wd:")) {
                let ino = line.split_whitespace().find_map(|f| f.strip_prefix("ino:"));
                inodes.extend(ino.and_then(|hex| u64::from_str_radix(hex, 16).ok()));
            }
        }
        inodes
    }

    #[test]
    fn shoals_own_directory_is_not_watched_and_the_volume_is() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".shoal/staging")).unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        let ino = |p: &str| std::fs::metadata(dir.path().join(p)).unwrap().ino();
        let (_watcher, _signals) = VolumeWatcher::start(dir.path(), 16).unwrap();
        let watched = watched_inodes();
        for volume_dir in [".", "a", "a/b"] {
            assert!(
                watched.contains(&ino(volume_dir)),
                "{volume_dir} is not watched"
            );
        }
        for internal in [".shoal", ".shoal/staging"] {
            assert!(!watched.contains(&ino(internal)), "{internal} is watched");
        }
    }
}
