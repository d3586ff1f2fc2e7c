//! `shoal versions` and `shoal restore` ([`crate::restore`]): through the running
//! daemon's control socket when `shoal serve` holds the store, else on a node opened
//! for the command alone (the store locked meanwhile; no peers to fetch from).

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use indicatif::HumanBytes;

use super::{Outcome, print};
use crate::config::Settings;
use crate::control::{Command, request};
use crate::restore::{Listing, Request, Restored};
use crate::store::{OpenOptions, Store};
use crate::sync::{Faults, Node, Volume};

/// What a path argument is sent as: `VOLUME/PATH` as given, or a path on disk made
/// absolute (its directory resolved, the name itself never followed).
fn path_arg(path: &Path) -> anyhow::Result<Vec<u8>> {
    let on_disk = path.is_absolute() || path.symlink_metadata().is_ok();
    if !on_disk {
        return Ok(path.as_os_str().as_bytes().to_vec());
    }
    let absolute = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            match std::fs::canonicalize(parent) {
                Ok(parent) => parent.join(name),
                // A directory deleted since: the path as given, made absolute.
                Err(_) => std::path::absolute(path)?,
            }
        }
        _ => std::path::absolute(path)?,
    };
    Ok(absolute.as_os_str().as_bytes().to_vec())
}

/// Runs `work` on a node opened for it alone, with the volumes `settings` names (or
/// every volume the store knows).
fn offline<T>(
    settings: &Settings,
    work: impl AsyncFnOnce(Arc<Node>) -> Result<T, String>,
) -> anyhow::Result<T> {
    let store = Store::open(
        &settings.state_dir,
        OpenOptions {
            create: false,
            read_only: false,
            chunk_params: settings.chunk_params,
        },
    )?;
    let names: Vec<String> = match settings.volumes.is_empty() {
        true => store.volumes()?.into_iter().map(|(name, _)| name).collect(),
        false => settings.volumes.clone(),
    };
    for name in &names {
        let dir = settings.volume_dir(name);
        if !dir.is_dir() {
            anyhow::bail!(
                "no daemon runs with --state-dir {}, and volume {name}'s directory {} is not there: give the --data-root (and --volume) it syncs",
                settings.state_dir.display(),
                dir.display()
            );
        }
    }
    let volumes = names
        .iter()
        .map(|name| {
            let keep = settings.keep_setid.iter().any(|k| k == name);
            Volume::open(&store, name, &settings.volume_dir(name)).map(|v| v.keeping_setid(keep))
        })
        .collect::<Result<_, _>>()?;
    let node = Arc::new(Node::new(store, volumes, [], Faults::default()));
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(work(node)).map_err(|e| anyhow::anyhow!(e))
}

/// `shoal versions PATH`.
pub fn versions(settings: &Settings, path: &Path, json: bool) -> anyhow::Result<Outcome> {
    let path = path_arg(path)?;
    let listing: Listing = if Store::in_use(&settings.state_dir) {
        let answer = request(&settings.state_dir, &Command::Versions(path))?;
        serde_json::from_str(&answer).context("the daemon's version listing is not JSON")?
    } else {
        offline(settings, async |node| crate::restore::list(&node, &path))?
    };
    if json {
        print(&format!("{}\n", serde_json::to_string_pretty(&listing)?))?;
        return Ok(Outcome::Success);
    }
    let mut text = String::new();
    for v in &listing.versions {
        let what = match v.kind.as_str() {
            "file" => format!("file of {}", HumanBytes(v.size)),
            kind => kind.to_string(),
        };
        let by = v.replaced_by_name.as_deref().unwrap_or(&v.replaced_by);
        text.push_str(&format!(
            "{}/{}  {}  {} by {by} at {}; was a {what}, mode {:o}, modified {}; held {}\n",
            v.volume, v.path, v.id, v.why, v.replaced_at, v.mode, v.mtime, v.held
        ));
    }
    let count = listing.versions.len() as u64 + listing.more;
    text.push_str(&match count {
        0 => "no kept versions\n".to_string(),
        _ => format!(
            "{count} kept version{}{}; put one back with `shoal restore PATH --version ID` (or a directory with --at TIME)\n",
            if count == 1 { "" } else { "s" },
            match listing.more {
                0 => String::new(),
                more => format!(" ({more} not listed)"),
            }
        ),
    });
    print(&text)?;
    Ok(Outcome::Success)
}

/// `shoal restore PATH [--at TIME | --version ID] [--to DIR]`.
pub fn restore(
    settings: &Settings,
    path: &Path,
    at: Option<String>,
    version: Option<String>,
    to: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<Outcome> {
    let at = at
        .map(|t| crate::restore::parse_time(&t))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--at {e}"))?;
    let version = version
        .map(|id| {
            crate::store::versions::VersionId::from_hex(&id)
                .with_context(|| format!("--version {id:?} is not a version id (24 hex digits, as `shoal versions` prints)"))
        })
        .transpose()?;
    let to = to.map(|to| std::path::absolute(&to)).transpose()?;
    let request_ = Request {
        path: path_arg(path)?,
        at,
        version,
        to,
    };
    let restored: Restored = if Store::in_use(&settings.state_dir) {
        let answer = request(&settings.state_dir, &Command::Restore(request_))?;
        serde_json::from_str(&answer).context("the daemon's restore report is not JSON")?
    } else {
        offline(settings, async |node| {
            crate::restore::restore(&node, request_).await
        })?
    };
    if json {
        print(&format!("{}\n", serde_json::to_string_pretty(&restored)?))?;
    } else {
        let mut text = format!(
            "restored {} files ({}), {} directories, {} symlinks and FIFOs; {} already as they were; {} chunks fetched from peers\n",
            restored.files,
            HumanBytes(restored.bytes),
            restored.dirs,
            restored.others,
            restored.unchanged,
            restored.fetched_chunks
        );
        for failed in &restored.failed {
            text.push_str(&format!("not restored: {failed}\n"));
        }
        print(&text)?;
    }
    Ok(match restored.failed.is_empty() {
        true => Outcome::Success,
        false => Outcome::ProblemsFound,
    })
}
