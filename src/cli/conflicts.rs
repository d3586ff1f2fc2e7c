//! `shoal conflicts` and `shoal conflicts resolve`: the daemon lists and settles conflict
//! copies ([`crate::conflicts`]) through its control socket; this prints its answer.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::Context;
use indicatif::HumanBytes;

use super::{Outcome, print};
use crate::conflicts::{Keep, Listing, Version};
use crate::control::{Command, request};

/// Lists the conflict copies of `volume` (or of every volume), as text or JSON.
pub fn list(state_dir: &Path, volume: Option<String>, json: bool) -> anyhow::Result<Outcome> {
    let answer = request(state_dir, &Command::Conflicts(volume))?;
    let listing: Listing =
        serde_json::from_str(&answer).context("the daemon's conflict listing is not JSON")?;
    if json {
        print(&format!("{}\n", serde_json::to_string_pretty(&listing)?))?;
        return Ok(Outcome::Success);
    }
    let mut text = String::new();
    for copy in &listing.copies {
        text.push_str(&format!(
            "{}/{}\n  lost the name {}/{}\n  theirs (the copy):  {}\n  mine (the name):    {}\n",
            copy.volume,
            copy.path,
            copy.volume,
            copy.original,
            describe(Some(&copy.copy)),
            describe(copy.current.as_ref()),
        ));
    }
    let count = listing.copies.len() as u64 + listing.more;
    text.push_str(&match count {
        0 => "no conflict copies\n".to_string(),
        _ => format!(
            "{count} conflict cop{}{}; settle one with `shoal conflicts resolve VOLUME/PATH --keep mine|theirs|both`\n",
            if count == 1 { "y" } else { "ies" },
            match listing.more {
                0 => String::new(),
                more => format!(" ({more} not listed)"),
            }
        ),
    });
    print(&text)?;
    Ok(Outcome::Success)
}

fn describe(version: Option<&Version>) -> String {
    let Some(v) = version else {
        return "nothing (the name was deleted since)".to_string();
    };
    let size = match v.kind.as_str() {
        "file" => format!("file of {}", HumanBytes(v.size)),
        kind => kind.to_string(),
    };
    let node = match (&v.node_name, &v.node) {
        (Some(name), Some(id)) => format!(" by {name} ({id})"),
        (None, Some(id)) => format!(" by node {id}"),
        _ => String::new(),
    };
    format!("{size}, modified {}{node}", v.modified)
}

/// Settles the conflict copy at `path`: a path on disk (made absolute, for the daemon to
/// find in its volumes' directories) or `VOLUME/PATH`.
pub fn resolve(state_dir: &Path, path: &Path, keep: Keep) -> anyhow::Result<Outcome> {
    let on_disk = path.symlink_metadata().is_ok();
    let sent = match (on_disk, path.parent(), path.file_name()) {
        // The directory made absolute, the name itself left as it is (never followed).
        (true, Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            std::fs::canonicalize(parent)
                .with_context(|| format!("cannot resolve {}", parent.display()))?
                .join(name)
        }
        _ => path.to_path_buf(),
    };
    let command = Command::Resolve {
        keep,
        path: sent.as_os_str().as_bytes().to_vec(),
    };
    let answer = request(state_dir, &command)?;
    print(&format!("{answer}\n"))?;
    Ok(Outcome::Success)
}
