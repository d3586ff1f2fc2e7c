//! The delete guard: a scan that would delete a large share of a volume at once (rsync's
//! `--max-delete`, applied to a mirror) holds those deletes back from peers until an
//! operator lets them go (`shoal release VOLUME`). An `rm -rf` in the wrong directory, a
//! wiped or swapped disk, ransomware deleting as it encrypts: none of them reaches the
//! other nodes on its own.
//!
//! A held delete is never written as a tombstone. The index keeps the names as they
//! were, live, and the store keeps a `held/` record per name instead (store.md "Held
//! deletes"). Everything a peer reads of this node comes from the index (the tree walk,
//! the entries, announcements of changes that the scan did not count), so no path carries
//! the delete. Pulls leave every name at or below a held name alone ([`Guard::covers`]):
//! a peer's newer version is not taken over the held delete and nothing is fetched back.
//! A scan that finds a held name on disk again (restored by hand or by `shoal restore`)
//! lets that hold go; the release scan ([`ScanGuard::release`]) writes the tombstones,
//! as any scan would have, and removes the records in the same batches. The watcher's
//! narrow scans defer deletes under the threshold to the next scan ([`ScanGuard::defer`])
//! so that a burst seen in pieces is judged whole.
//!
//! This module owns the policy (the threshold, per volume, from `--delete-guard` rules),
//! the decision ([`Policy::holds`]), and each volume's view of what it holds (for pulls,
//! `/status`, `/metrics` and readiness). The scan applies it (`scan/walk.rs`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ids::VolumeId;
use crate::pathname::VolPath;
use crate::store::{Store, StoreError};

/// The default threshold: a scan holds its deletes when they are more than half of the
/// volume's names and at least 10 of them. Deleting more than half of a volume at once
/// is what a mistaken `rm -rf`, an emptied or unmounted disk and ransomware look like,
/// and rarely what routine work does (a job that rewrites most of its files writes as
/// many as it deletes, and a cache trimmed by age goes a few names at a time). The
/// minimum keeps small volumes usable: a config volume of a few files can be cleaned
/// up, and the last file of a volume deleted (issue 17), without a release.
pub const DEFAULT: Policy = Policy::Share {
    percent: 50,
    min_names: 10,
};

/// Deletes already let go within this long count towards the next scan's share: an
/// `rm -rf` that the watcher sees as several scans is held once the whole of it passes
/// the threshold (what went before it has reached the peers).
pub const WINDOW: Duration = Duration::from_secs(60);

/// Longest deletes wait for a burst to end ([`ScanGuard::defer`]) before a scan judges
/// them as they are (a writer that never pauses elsewhere in the volume must not keep
/// deletes back for good).
pub const MAX_DEFER: Duration = Duration::from_secs(10);

/// How many held names `/status` and the log name.
pub const SAMPLE: usize = 5;

/// When a volume's deletes are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Never: deletes flow as they are made.
    Off,
    /// A scan's deletes (with those of the last [`WINDOW`]) are held when they are more
    /// than `percent` of the volume's names and at least `min_names`.
    Share { percent: u8, min_names: u64 },
}

impl Default for Policy {
    fn default() -> Self {
        DEFAULT
    }
}

impl Policy {
    /// `off`, `PERCENT%` or `PERCENT%/MIN` (`50%/10`); a bare `PERCENT%` keeps the
    /// default minimum.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") {
            return Ok(Policy::Off);
        }
        let bad = || {
            format!(
                "{text:?} is not a delete guard threshold (expected `off`, `PERCENT%` or `PERCENT%/MIN`, as in `50%/10`)"
            )
        };
        let (share, min) = match text.split_once('/') {
            Some((share, min)) => (share, Some(min)),
            None => (text, None),
        };
        let percent: u8 = share
            .strip_suffix('%')
            .and_then(|p| p.trim().parse().ok())
            .filter(|p| (0..100).contains(p))
            .ok_or_else(bad)?;
        let min_names = match min {
            Some(min) => min.trim().parse().map_err(|_| bad())?,
            None => match DEFAULT {
                Policy::Share { min_names, .. } => min_names,
                Policy::Off => 0,
            },
        };
        Ok(Policy::Share { percent, min_names })
    }

    /// Whether deleting `deleting` names of a volume of `total` names is held.
    pub fn holds(self, deleting: u64, total: u64) -> bool {
        match self {
            Policy::Off => false,
            Policy::Share { percent, min_names } => {
                deleting > 0
                    && deleting >= min_names
                    && u128::from(deleting) * 100 > u128::from(percent) * u128::from(total)
            }
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::Off => write!(f, "off"),
            Policy::Share { percent, min_names } => write!(f, "{percent}%/{min_names}"),
        }
    }
}

/// Each volume's threshold, from `--delete-guard` rules: `RULE` for every volume,
/// `VOLUME=RULE` for one (which wins).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    every: Policy,
    volumes: BTreeMap<String, Policy>,
}

impl Rules {
    pub fn parse(rules: &[String]) -> Result<Rules, String> {
        let mut out = Rules::default();
        for rule in rules.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
            match rule.split_once('=') {
                Some((volume, policy)) => {
                    crate::config::validate_volume_name(volume).map_err(|e| e.to_string())?;
                    out.volumes
                        .insert(volume.to_string(), Policy::parse(policy)?);
                }
                None => out.every = Policy::parse(rule)?,
            }
        }
        Ok(out)
    }

    pub fn for_volume(&self, volume: &str) -> Policy {
        self.volumes.get(volume).copied().unwrap_or(self.every)
    }
}

/// What a scan is told of the guard.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanGuard {
    pub policy: Policy,
    /// Names deleted (and let go) within the last [`WINDOW`].
    pub recent: u64,
    /// Names narrow (watcher) scans added within the last [`WINDOW`]: a rename or move
    /// adds as many names as it deletes, and may reach the scans in pieces (its new
    /// names in one, its deletes left to the next), so the guard weighs the names the
    /// volume loses, not those it deletes.
    pub recent_added: u64,
    /// The operator released the volume's held deletes: this scan writes them (and any
    /// other delete it finds) as tombstones, whatever their share.
    pub release: bool,
    /// A narrow scan of the watcher's: deletes under the threshold are not written yet
    /// but left for the next scan ([`crate::scan::ScanReport::deletes_deferred`]), which
    /// judges them with whatever else the burst deleted meanwhile. The watcher settles
    /// each name on its own, so an `rm -rf` reaches the scans in pieces, each under the
    /// threshold; waiting until the volume has been quiet for one debounce window
    /// lets the whole of it be held.
    pub defer: bool,
}

/// Whether `path` is one of the `held` names or below one.
pub fn covered(held: &BTreeSet<VolPath>, path: &VolPath) -> bool {
    if held.is_empty() {
        return false;
    }
    let mut at = Some(path.clone());
    while let Some(p) = at {
        if held.contains(&p) {
            return true;
        }
        at = p.split_last().map(|(parent, _)| parent);
    }
    false
}

/// The names whose deletes the guard holds in volume `vol`, as the store has them.
pub fn held_paths(store: &Store, vol: VolumeId) -> Result<BTreeSet<VolPath>, StoreError> {
    store
        .held(vol)
        .map(|item| item.map(|(path, _)| path))
        .collect()
}

/// When a running node's scans of one volume leave deletes to later scans.
#[derive(Debug, Default)]
pub struct Deferral {
    /// Since when deletes wait, if they do.
    since: Option<Instant>,
}

impl Deferral {
    /// Whether a scan leaves the deletes it would let go to a later one: the first
    /// watcher's scan (`watcher`) to find some does, and then every scan while other
    /// names still settle in the watcher (`settling`: the burst goes on), for at most
    /// [`MAX_DEFER`].
    pub fn defer(&self, watcher: bool, settling: bool, now: Instant) -> bool {
        match self.since {
            None => watcher,
            Some(since) => settling && now.saturating_duration_since(since) < MAX_DEFER,
        }
    }

    /// A scan that was told `deferring` ended, leaving deletes to later ones
    /// (`left_some`) or not.
    pub fn ended(&mut self, deferring: bool, left_some: bool, now: Instant) {
        match (deferring, left_some) {
            (_, true) => {
                self.since.get_or_insert(now);
            }
            (false, false) => self.since = None,
            (true, false) => {}
        }
    }
}

/// What `/status` shows of a volume's held deletes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HeldDeletes {
    /// Names held (a held directory counts with what it held).
    pub names: u64,
    /// The first held paths, in path order (at most [`SAMPLE`]).
    pub sample: Vec<String>,
    /// When the oldest hold began (RFC 3339 UTC).
    pub since: String,
    /// What to do: `delete held: N names, release with `shoal release VOLUME``.
    pub message: String,
}

/// One volume's guard in a running node: its threshold, what it holds (as last read
/// from the store), and the deletes let go lately.
#[derive(Debug, Default)]
pub struct Guard {
    pub policy: Policy,
    held: RwLock<Held>,
    /// Per scan that let deletes go or added names: when, names deleted, names added.
    recent: Mutex<VecDeque<(Instant, u64, u64)>>,
}

#[derive(Debug, Default)]
struct Held {
    paths: BTreeSet<VolPath>,
    names: u64,
    since_ns: Option<i64>,
}

impl Guard {
    pub fn new(policy: Policy) -> Guard {
        Guard {
            policy,
            ..Guard::default()
        }
    }

    /// Reads what the store holds for volume `vol` (after each scan, and at start).
    /// A name held below another held name (an `rm -rf` whose pieces were held by
    /// several scans: a file, then its directory) is counted once, in its ancestor's
    /// record, which counts every name below it.
    pub fn load(&self, store: &Store, vol: VolumeId) -> Result<(), StoreError> {
        let records = store.held(vol).collect::<Result<Vec<_>, _>>()?;
        let mut held = Held {
            paths: records.iter().map(|(path, _)| path.clone()).collect(),
            ..Held::default()
        };
        for (path, record) in &records {
            held.since_ns = Some(
                held.since_ns
                    .map_or(record.held_at_ns, |s| s.min(record.held_at_ns)),
            );
            let nested = path
                .split_last()
                .is_some_and(|(parent, _)| covered(&held.paths, &parent));
            if !nested {
                held.names = held.names.saturating_add(record.names);
            }
        }
        *self.held.write().expect("guard lock") = held;
        Ok(())
    }

    /// Whether `path` is a held name or below one: pulls leave it alone.
    pub fn covers(&self, path: &VolPath) -> bool {
        covered(&self.held.read().expect("guard lock").paths, path)
    }

    /// Whether anything is held.
    pub fn holding(&self) -> bool {
        !self.held.read().expect("guard lock").paths.is_empty()
    }

    /// What is held, for `/status`; `None` if nothing.
    pub fn status(&self, volume: &str) -> Option<HeldDeletes> {
        let held = self.held.read().expect("guard lock");
        let since_ns = held.since_ns?;
        let since = std::time::UNIX_EPOCH + Duration::from_nanos(since_ns.max(0) as u64);
        Some(HeldDeletes {
            names: held.names,
            sample: held
                .paths
                .iter()
                .take(SAMPLE)
                .map(|p| p.display().to_string())
                .collect(),
            since: crate::sync::state::rfc3339(since),
            message: format!(
                "delete held: {} names, release with `shoal release {volume}`",
                held.names
            ),
        })
    }

    /// Names deleted and let go, and names added, within the last [`WINDOW`].
    pub fn recent_changes(&self) -> (u64, u64) {
        let mut recent = self.recent.lock().expect("guard lock");
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) > WINDOW)
        {
            recent.pop_front();
        }
        recent.iter().fold((0, 0), |(deleted, added), (_, d, a)| {
            (deleted.saturating_add(*d), added.saturating_add(*a))
        })
    }

    /// Counts the `deleted` names a scan let go and the `added` names it found, now.
    pub fn note_changes(&self, deleted: u64, added: u64) {
        if deleted > 0 || added > 0 {
            let mut recent = self.recent.lock().expect("guard lock");
            recent.push_back((Instant::now(), deleted, added));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_read_back_and_nonsense_is_refused() {
        assert_eq!(Policy::parse("off"), Ok(Policy::Off));
        assert_eq!(
            Policy::parse("80%/3"),
            Ok(Policy::Share {
                percent: 80,
                min_names: 3
            })
        );
        assert_eq!(
            Policy::parse("30%"),
            Ok(Policy::Share {
                percent: 30,
                min_names: 10
            })
        );
        for bad in ["", "50", "100%", "-1%", "50%/x", "half"] {
            assert!(Policy::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Policy::parse(&DEFAULT.to_string()), Ok(DEFAULT));
    }

    #[test]
    fn a_share_over_the_threshold_is_held_once_the_minimum_is_reached() {
        assert!(DEFAULT.holds(80, 100));
        assert!(
            !DEFAULT.holds(50, 100),
            "exactly half is not more than half"
        );
        assert!(DEFAULT.holds(51, 100));
        assert!(!DEFAULT.holds(1, 1), "the last file of a volume goes");
        assert!(!DEFAULT.holds(9, 9), "under the minimum");
        assert!(DEFAULT.holds(10, 10));
        assert!(!DEFAULT.holds(0, 0));
        assert!(!Policy::Off.holds(1000, 1000));
        let zero = Policy::Share {
            percent: 0,
            min_names: 0,
        };
        assert!(zero.holds(1, 1000) && !zero.holds(0, 1000));
    }

    #[test]
    fn deletes_wait_for_a_burst_to_settle_but_not_for_ever() {
        let t0 = Instant::now();
        let mut d = Deferral::default();
        assert!(!d.defer(false, true, t0), "a heartbeat scan judges at once");
        assert!(d.defer(true, false, t0), "a watcher's scan waits once");
        d.ended(true, true, t0);
        assert!(d.defer(true, true, t0), "still settling");
        assert!(d.defer(false, true, t0), "the heartbeat too");
        assert!(!d.defer(true, false, t0), "settled: judged");
        assert!(!d.defer(true, true, t0 + MAX_DEFER), "waited long enough");
        d.ended(false, false, t0);
        assert!(d.defer(true, false, t0), "a new burst waits again");
    }

    #[test]
    fn names_held_below_a_held_directory_are_counted_once() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(tmp.path());
        let vol = VolumeId(1);
        let path = |p: &str| VolPath::parse(p.as_bytes()).unwrap();
        // An `rm -rf tree` held in three pieces: two files first, then the directory
        // (itself, the two files and two more), and a name elsewhere.
        let mut batch = store.batch();
        for (p, names, at) in [
            ("tree/a/f1", 1, 30),
            ("tree/b", 1, 20),
            ("tree", 5, 40),
            ("tree-other", 1, 50),
        ] {
            let record = crate::store::codec::Held {
                held_at_ns: at,
                names,
            };
            batch.put_held(vol, &path(p), &record);
        }
        store
            .write(batch, crate::store::Durability::Buffered)
            .unwrap();
        let guard = Guard::default();
        guard.load(&store, vol).unwrap();
        let status = guard.status("v").unwrap();
        assert_eq!(status.names, 6);
        assert!(guard.covers(&path("tree/a/f1")) && guard.covers(&path("tree/c")));
        assert!(!guard.covers(&path("tree2")));
        assert_eq!(
            status.since,
            crate::sync::state::rfc3339(std::time::UNIX_EPOCH + Duration::from_nanos(20))
        );
    }

    #[test]
    fn a_volume_rule_wins_over_the_rule_for_every_volume() {
        let rules = Rules::parse(&["90%/100".to_string(), "media=off".to_string()]).expect("rules");
        assert_eq!(rules.for_volume("media"), Policy::Off);
        assert_eq!(
            rules.for_volume("docs"),
            Policy::Share {
                percent: 90,
                min_names: 100
            }
        );
        assert_eq!(Rules::parse(&[]).expect("none").for_volume("x"), DEFAULT);
        assert!(Rules::parse(&["../x=off".to_string()]).is_err());
    }
}
