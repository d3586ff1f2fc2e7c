//! Names that cannot be synced, and why: nothing diverges silently.
//!
//! Two places find them. The scanner finds paths longer than Linux's `PATH_MAX`
//! ([`crate::pathname::MAX_PATH_LEN`]), which no node could name either; a pull finds
//! names the receiving file system refuses: too long for it, not valid in its encoding,
//! a type it cannot make, a directory this node may not write. Each such name is logged
//! once with its whole path, listed per volume in `/status` (the first [`MAX_SHOWN`] by
//! path, with the total) and counted in `/metrics` by [`Cause`].
//!
//! What each finder noted is kept apart ([`Origin`]: the scanner, or the pulls from one
//! peer) and replaced whenever that finder has looked at everything again (a
//! whole-volume scan, a complete pull round), so a name that syncs after all, or is
//! gone, leaves the list; a narrow scan or a round that failed half-way only adds. A
//! name that cannot be placed keeps its directory's tree hash different from the peer's,
//! so every round walks to it again and notes it again (it is logged only when new).
//!
//! Memory is bounded: each finder keeps at most [`MAX_KEPT`] names; past that only a
//! count.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Names each finder keeps (with their reasons); past this, only counted.
pub const MAX_KEPT: usize = 256;
/// Names `/status` lists per volume.
pub const MAX_SHOWN: usize = 100;

/// Why a name cannot be synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The path is longer than Linux allows, or the name longer than this file system
    /// takes (`ENAMETOOLONG`).
    PathTooLong,
    /// The file system refuses the name itself (`EINVAL`, `EILSEQ`: an encoding or
    /// characters it does not take).
    NameRefused,
    /// The file system cannot make this kind of item (a FIFO, a symlink, a hard link).
    TypeNotSupported,
    /// This node may not write there (`EACCES`, `EPERM`: permissions, an immutable
    /// directory; `EROFS`: mounted read-only).
    NotPermitted,
}

impl Cause {
    pub const ALL: [Cause; 4] = [
        Cause::PathTooLong,
        Cause::NameRefused,
        Cause::TypeNotSupported,
        Cause::NotPermitted,
    ];

    /// The label `/status` and `/metrics` use.
    pub fn label(self) -> &'static str {
        match self {
            Cause::PathTooLong => "path_too_long",
            Cause::NameRefused => "name_refused",
            Cause::TypeNotSupported => "type_not_supported",
            Cause::NotPermitted => "not_permitted",
        }
    }

    /// The cause of an error the file system gave while placing one name, if it is a
    /// refusal of that name (and not, say, a full disk or an I/O error, which are the
    /// node's trouble, not the name's).
    pub fn of_errno(errno: i32) -> Option<Cause> {
        match errno {
            libc::ENAMETOOLONG => Some(Cause::PathTooLong),
            libc::EINVAL | libc::EILSEQ => Some(Cause::NameRefused),
            libc::EOPNOTSUPP | libc::ENOSYS => Some(Cause::TypeNotSupported),
            libc::EACCES | libc::EPERM | libc::EROFS => Some(Cause::NotPermitted),
            _ => None,
        }
    }
}

/// Who noted a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// This node's scanner: the name is on this node's disk and goes nowhere.
    Scan,
    /// Pulls from this peer: the peer has the name and this node cannot make it.
    Peer(SocketAddr),
}

/// One name that cannot be synced, as `/status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Name {
    /// The whole path inside the volume (non-UTF-8 bytes escaped).
    pub path: String,
    pub cause: Cause,
    /// What exactly was refused, and what to fix.
    pub reason: String,
}

/// What one finder noted in one pass (bounded by [`MAX_KEPT`]).
#[derive(Clone, Debug, Default)]
pub struct Noted {
    names: BTreeMap<String, (Cause, String)>,
    /// Names noted past [`MAX_KEPT`]: counted, not kept.
    beyond: u64,
}

impl Noted {
    /// Notes `path` (escaped, the whole path inside the volume).
    pub fn note(&mut self, path: String, cause: Cause, reason: String) {
        if self.names.len() < MAX_KEPT || self.names.contains_key(&path) {
            self.names.insert(path, (cause, reason));
        } else {
            self.beyond += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.beyond == 0
    }

    /// How many names were noted.
    pub fn total(&self) -> u64 {
        self.names.len() as u64 + self.beyond
    }

    /// The names kept, by path.
    pub fn names(&self) -> impl Iterator<Item = Name> + '_ {
        self.names.iter().map(|(path, (cause, reason))| Name {
            path: path.clone(),
            cause: *cause,
            reason: reason.clone(),
        })
    }
}

impl Serialize for Noted {
    /// As `{"total": N, "names": [..]}` (what `shoal scan --json` shows).
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shown {
            total: u64,
            names: Vec<Name>,
        }
        let shown = Shown {
            total: self.total(),
            names: self.names().collect(),
        };
        shown.serialize(serializer)
    }
}

/// A volume's names that cannot be synced, as `/status` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// How many names cannot be synced (a name two peers offer counts once while both
    /// are listed; past [`MAX_KEPT`] per finder, each finder's extra names are added).
    pub total: u64,
    /// By cause label, summing to `total`.
    pub by_cause: BTreeMap<String, u64>,
    /// The first [`MAX_SHOWN`] by path.
    pub names: Vec<Name>,
}

/// A volume's names that cannot be synced, by finder.
#[derive(Default)]
pub struct Unsyncable(Mutex<BTreeMap<Origin, Noted>>);

impl Unsyncable {
    /// Replaces what `origin` noted before with `noted` (it looked at everything again);
    /// logs the names new to the list. `root` is the volume's directory, for the log.
    pub fn replace(&self, volume: &str, root: &std::path::Path, origin: Origin, noted: Noted) {
        let mut all = self.0.lock().expect("unsyncable lock");
        let before = all.remove(&origin).unwrap_or_default();
        log_new(volume, root, origin, &all, &before, &noted);
        if !noted.is_empty() {
            all.insert(origin, noted);
        }
    }

    /// Adds what `origin` noted in a partial look (a narrow scan, a round that ended
    /// early) to what it noted before; logs the names new to the list.
    pub fn add(&self, volume: &str, root: &std::path::Path, origin: Origin, noted: Noted) {
        if noted.is_empty() {
            return;
        }
        let mut all = self.0.lock().expect("unsyncable lock");
        let mut merged = all.remove(&origin).unwrap_or_default();
        log_new(volume, root, origin, &all, &merged, &noted);
        for (path, (cause, reason)) in noted.names {
            merged.note(path, cause, reason);
        }
        merged.beyond += noted.beyond;
        all.insert(origin, merged);
    }

    /// What `/status` shows.
    pub fn listing(&self) -> Listing {
        let all = self.0.lock().expect("unsyncable lock");
        let mut names: BTreeMap<&String, &(Cause, String)> = BTreeMap::new();
        let mut listing = Listing::default();
        for noted in all.values() {
            names.extend(noted.names.iter());
            listing.total += noted.beyond;
        }
        listing.total += names.len() as u64;
        for (cause, _) in names.values() {
            *listing
                .by_cause
                .entry(cause.label().to_string())
                .or_default() += 1;
        }
        if let Some(beyond) = all.values().map(|n| n.beyond).reduce(|a, b| a + b)
            && beyond > 0
        {
            // Names past the bound are counted without their causes: said as such.
            *listing.by_cause.entry("unknown".to_string()).or_default() += beyond;
        }
        listing.names = names
            .into_iter()
            .take(MAX_SHOWN)
            .map(|(path, (cause, reason))| Name {
                path: path.clone(),
                cause: *cause,
                reason: reason.clone(),
            })
            .collect();
        listing
    }
}

/// Logs each name of `noted` that neither `before` (the same finder's last list) nor
/// another finder (`others`) holds: once per name, with its whole path.
fn log_new(
    volume: &str,
    root: &std::path::Path,
    origin: Origin,
    others: &BTreeMap<Origin, Noted>,
    before: &Noted,
    noted: &Noted,
) {
    let known = |path: &String| {
        before.names.contains_key(path) || others.values().any(|n| n.names.contains_key(path))
    };
    let whence = match origin {
        Origin::Scan => "it stays on this node".to_string(),
        Origin::Peer(peer) => format!("offered by {peer}"),
    };
    for (path, (cause, reason)) in &noted.names {
        if !known(path) {
            tracing::warn!(
                volume,
                cause = cause.label(),
                "cannot sync {}: {reason}; {whence}",
                root.join(path).display()
            );
        }
    }
    if noted.beyond > before.beyond {
        tracing::warn!(
            volume,
            "{} more names cannot be synced ({whence}); only the first {MAX_KEPT} are listed",
            noted.beyond
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noted(paths: &[&str]) -> Noted {
        let mut noted = Noted::default();
        for path in paths {
            noted.note(path.to_string(), Cause::NotPermitted, "denied".into());
        }
        noted
    }

    #[test]
    fn a_complete_look_replaces_a_finders_names_and_a_partial_one_adds() {
        let list = Unsyncable::default();
        let root = std::path::Path::new("/v");
        let peer = Origin::Peer("127.0.0.1:7029".parse().unwrap());
        list.replace("v", root, peer, noted(&["a", "b"]));
        list.add("v", root, Origin::Scan, noted(&["c"]));
        list.add("v", root, Origin::Scan, noted(&["d"]));
        assert_eq!(list.listing().total, 4);
        list.replace("v", root, peer, noted(&["b"]));
        let listing = list.listing();
        let paths: Vec<_> = listing.names.iter().map(|n| n.path.as_str()).collect();
        assert_eq!(paths, ["b", "c", "d"]);
        assert_eq!(listing.by_cause["not_permitted"], 3);
        list.replace("v", root, Origin::Scan, Noted::default());
        list.replace("v", root, peer, Noted::default());
        assert_eq!(list.listing(), Listing::default());
    }

    #[test]
    fn a_name_two_finders_noted_counts_once() {
        let list = Unsyncable::default();
        let root = std::path::Path::new("/v");
        for port in [1, 2] {
            let origin = Origin::Peer(format!("127.0.0.1:{port}").parse().unwrap());
            list.replace("v", root, origin, noted(&["same"]));
        }
        assert_eq!(list.listing().total, 1);
    }

    #[test]
    fn names_past_the_bound_are_counted_not_kept() {
        let mut many = Noted::default();
        for i in 0..MAX_KEPT + 10 {
            many.note(format!("n{i:04}"), Cause::NameRefused, String::new());
        }
        assert_eq!(many.total(), MAX_KEPT as u64 + 10);
        let list = Unsyncable::default();
        list.replace("v", std::path::Path::new("/v"), Origin::Scan, many);
        let listing = list.listing();
        assert_eq!(listing.total, MAX_KEPT as u64 + 10);
        assert_eq!(listing.names.len(), MAX_SHOWN);
        assert_eq!(listing.by_cause["unknown"], 10);
    }

    #[test]
    fn only_refusals_of_a_name_are_causes() {
        assert_eq!(Cause::of_errno(libc::EACCES), Some(Cause::NotPermitted));
        assert_eq!(Cause::of_errno(libc::EILSEQ), Some(Cause::NameRefused));
        assert_eq!(Cause::of_errno(libc::ENOSPC), None);
        assert_eq!(Cause::of_errno(libc::EIO), None);
    }
}
