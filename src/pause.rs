//! Which volumes an operator paused (`shoal pause [VOLUME]`), or the whole node, kept in
//! the state directory's `paused` file so that a pause survives a restart until resumed.
//!
//! A paused volume neither pulls from peers, nor answers their requests for it (they get
//! error code `Paused`), nor announces its local changes; its scans go on, so that what
//! changed while paused is indexed and announced on resume. A paused node does so for
//! every volume and also serves no chunk bytes.
//!
//! The file holds one name a line: a volume name, or `*` for the node. It is replaced
//! atomically (written beside, fsynced, renamed, the directory fsynced), so a crash
//! leaves the old list or the new one.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The file in the state directory.
pub const PAUSED_FILE: &str = "paused";

/// The line that pauses the whole node.
const NODE: &str = "*";

/// Largest `paused` file read: a line per configured volume fits many times over.
const MAX_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {len} bytes, more than the {MAX_FILE} a list of paused volumes can be")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What is paused: a node-wide pause and the volumes paused one by one.
#[derive(Debug, Default)]
pub struct Paused {
    /// Where the list is kept; `None`: not kept (a node outside `serve`).
    file: Option<PathBuf>,
    held: Mutex<BTreeSet<String>>,
}

/// What a pause or resume names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Node,
    Volume(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Node => write!(f, "the node"),
            Target::Volume(name) => write!(f, "volume {name}"),
        }
    }
}

impl Paused {
    /// The list kept in `state_dir` (nothing paused if the file is missing).
    pub fn load(state_dir: &Path) -> Result<Paused, PauseError> {
        let path = state_dir.join(PAUSED_FILE);
        let held = match std::fs::File::open(&path) {
            Ok(file) => {
                let read = |source| PauseError::Read {
                    path: path.clone(),
                    source,
                };
                let len = file.metadata().map_err(read)?.len();
                if len > MAX_FILE {
                    return Err(PauseError::TooLarge { path, len });
                }
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_FILE), &mut text)
                    .map_err(read)?;
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(source) => return Err(PauseError::Read { path, source }),
        };
        Ok(Paused {
            file: Some(path),
            held: Mutex::new(held),
        })
    }

    /// Whether `volume` is paused, by itself or with the node.
    pub fn holds(&self, volume: &str) -> bool {
        let held = self.held.lock().expect("pause lock");
        held.contains(NODE) || held.contains(volume)
    }

    /// Whether the whole node is paused.
    pub fn node(&self) -> bool {
        self.held.lock().expect("pause lock").contains(NODE)
    }

    /// Pauses (`pause = true`) or resumes `target`, and keeps the list. Returns whether
    /// anything changed.
    pub fn set(&self, target: &Target, pause: bool) -> Result<bool, PauseError> {
        let mut held = self.held.lock().expect("pause lock");
        let name = match target {
            Target::Node => NODE,
            Target::Volume(name) => name.as_str(),
        };
        let mut next = held.clone();
        let changed = match pause {
            true => next.insert(name.to_string()),
            false => next.remove(name),
        };
        if changed {
            if let Some(path) = &self.file {
                keep(path, &next)?;
            }
            *held = next;
        }
        Ok(changed)
    }
}

/// Replaces the file at `path` with `held`, atomically and durably.
fn keep(path: &Path, held: &BTreeSet<String>) -> Result<(), PauseError> {
    let write = |source| PauseError::Write {
        path: path.to_path_buf(),
        source,
    };
    let staged = path.with_extension("new");
    let mut file = std::fs::File::create(&staged).map_err(write)?;
    for name in held {
        writeln!(file, "{name}").map_err(write)?;
    }
    file.sync_all().map_err(write)?;
    std::fs::rename(&staged, path).map_err(write)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_is_kept_until_resumed_and_the_node_pause_covers_every_volume() {
        let dir = tempfile::tempdir().unwrap();
        let paused = Paused::load(dir.path()).unwrap();
        assert!(!paused.holds("a"));
        assert!(paused.set(&Target::Volume("a".into()), true).unwrap());
        assert!(!paused.set(&Target::Volume("a".into()), true).unwrap());
        let again = Paused::load(dir.path()).unwrap();
        assert!(again.holds("a") && !again.holds("b") && !again.node());
        assert!(again.set(&Target::Node, true).unwrap());
        assert!(Paused::load(dir.path()).unwrap().holds("b"));
        again.set(&Target::Node, false).unwrap();
        again.set(&Target::Volume("a".into()), false).unwrap();
        assert!(!Paused::load(dir.path()).unwrap().holds("a"));
    }
}
