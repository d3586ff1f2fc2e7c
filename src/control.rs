//! The local control channel: a Unix socket in the state directory through which the
//! `shoal` CLI acts on the running daemon (pause, resume, bandwidth limit, conflict
//! copies). Nothing on the network accepts commands.
//!
//! Only root and the daemon's own user may use it: the socket is `control/shoal.sock`
//! under the state directory, the directory mode 0700 and the socket 0600, and every
//! connection's peer uid (`SO_PEERCRED`) is checked besides. Inside a container,
//! `docker exec CONTAINER shoal pause` reaches it.
//!
//! The protocol (`schema/protocol.md`, "Local control socket") is one request line and
//! one answer line, UTF-8, each ended by `\n`: the request at most [`MAX_REQUEST`] bytes,
//! read within [`TIMEOUT`]; the answer `ok MESSAGE` or `error MESSAGE`.

use std::io::{BufRead, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::conflicts::Keep;
use crate::pause::Target;
use crate::sync::Node;

/// Largest request line, its `\n` included (a path of `PATH_MAX` bytes, hex-encoded,
/// fits).
pub const MAX_REQUEST: usize = 16 << 10;
/// Largest answer line the CLI reads (a listing of [`crate::conflicts::MAX_LISTED`]
/// conflict copies fits).
const MAX_ANSWER: u64 = 32 << 20;
/// How long either side may take to send its line.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Connections served at once; past it, new ones are closed at once.
const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot prepare the control socket directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot reach the daemon's control socket {path}: {source} (is `shoal serve` running with this --state-dir, and are you root or its user?)"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon's control socket {path} failed: {source}")]
    Exchange {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error("the daemon answered something other than `ok` or `error`: {0:?}")]
    Garbled(String),
}

/// The control socket of the node whose state directory is `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control").join("shoal.sock")
}

/// One request, as parsed from its line.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Pause(Target),
    Resume(Target),
    /// Bytes per second of chunk data each way; 0: no limit.
    SetMaxRate(u64),
    /// The same for each peer: one node's (by name or id), or every peer's.
    SetPeerMaxRate {
        node: Option<String>,
        rate: u64,
    },
    /// The conflict copies of a volume (or of all), answered as one line of JSON
    /// ([`crate::conflicts::Listing`]).
    Conflicts(Option<String>),
    /// Settle the conflict copy at a path (`VOLUME/PATH` or absolute; raw bytes, sent
    /// hex-encoded).
    Resolve {
        keep: Keep,
        path: Vec<u8>,
    },
    /// The kept versions of a path (`VOLUME/PATH` or absolute; sent hex-encoded),
    /// answered as one line of JSON ([`crate::restore::Listing`]).
    Versions(Vec<u8>),
    /// Put a path back as it was ([`crate::restore::Request`]), answered as one line of
    /// JSON ([`crate::restore::Restored`]).
    Restore(crate::restore::Request),
    /// Let the deletes the delete guard holds in a volume go to peers.
    Release(String),
}

impl Command {
    /// The request line (without its `\n`).
    pub fn line(&self) -> String {
        let (verb, target) = match self {
            Command::Pause(t) => ("pause", t),
            Command::Resume(t) => ("resume", t),
            Command::SetMaxRate(rate) => return format!("set max-rate {rate}"),
            Command::SetPeerMaxRate { node: None, rate } => {
                return format!("set max-rate-peer {rate}");
            }
            Command::SetPeerMaxRate {
                node: Some(node),
                rate,
            } => return format!("set max-rate-peer {node} {rate}"),
            Command::Conflicts(None) => return "conflicts".to_string(),
            Command::Conflicts(Some(volume)) => return format!("conflicts {volume}"),
            Command::Resolve { keep, path } => {
                return format!("resolve {} {}", keep.word(), crate::ids::to_hex(path));
            }
            Command::Versions(path) => return format!("versions {}", crate::ids::to_hex(path)),
            Command::Restore(request) => {
                let mut line = format!("restore {}", crate::ids::to_hex(&request.path));
                if let Some(at) = request.at {
                    line.push_str(&format!(" at={at}"));
                }
                if let Some(version) = request.version {
                    line.push_str(&format!(" version={}", version.to_hex()));
                }
                if let Some(to) = &request.to {
                    let to = crate::ids::to_hex(to.as_os_str().as_encoded_bytes());
                    line.push_str(&format!(" to={to}"));
                }
                return line;
            }
            Command::Release(volume) => return format!("release {volume}"),
        };
        match target {
            Target::Node => verb.to_string(),
            Target::Volume(name) => format!("{verb} {name}"),
        }
    }

    pub fn parse(line: &str) -> Result<Command, String> {
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        let target = |rest: &[&str]| match rest {
            [] => Ok(Target::Node),
            [name] => crate::config::validate_volume_name(name)
                .map(|()| Target::Volume(name.to_string()))
                .map_err(|e| e.to_string()),
            _ => Err(format!("too many words in {line:?}")),
        };
        match words.split_first() {
            Some((&"pause", rest)) => target(rest).map(Command::Pause),
            Some((&"resume", rest)) => target(rest).map(Command::Resume),
            Some((&"set", [setting, value])) if *setting == "max-rate" => {
                crate::rate::parse_rate(value).map(Command::SetMaxRate)
            }
            Some((&"set", [setting, value])) if *setting == "max-rate-peer" => {
                crate::rate::parse_rate(value)
                    .map(|rate| Command::SetPeerMaxRate { node: None, rate })
            }
            Some((&"set", [setting, node, value])) if *setting == "max-rate-peer" => {
                if !crate::identity::is_node_name(node) {
                    return Err(format!("{node:?} is not a node name or id"));
                }
                crate::rate::parse_rate(value).map(|rate| Command::SetPeerMaxRate {
                    node: Some(node.to_string()),
                    rate,
                })
            }
            Some((&"conflicts", rest)) => target(rest).map(|t| match t {
                Target::Node => Command::Conflicts(None),
                Target::Volume(name) => Command::Conflicts(Some(name)),
            }),
            Some((&"versions", [path])) => crate::ids::from_hex(path)
                .map(Command::Versions)
                .ok_or_else(|| format!("{path:?} is not a hex-encoded path")),
            Some((&"restore", [path, options @ ..])) => parse_restore(path, options),
            Some((&"release", rest)) => match target(rest)? {
                Target::Volume(name) => Ok(Command::Release(name)),
                Target::Node => Err("release needs a volume: `release VOLUME`".to_string()),
            },
            Some((&"resolve", [keep, path])) => Ok(Command::Resolve {
                keep: Keep::parse(keep)?,
                path: crate::ids::from_hex(path)
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| format!("the path in {line:?} is not hex"))?,
            }),
            _ => Err(format!(
                "unknown request {line:?} (expected `pause [VOLUME]`, `resume [VOLUME]`, `set max-rate RATE`, `set max-rate-peer [NODE] RATE`, `conflicts [VOLUME]`, `resolve mine|theirs|both HEXPATH` or `release VOLUME`)"
            )),
        }
    }
}

/// Makes the socket's directory (mode 0700), replaces a stale socket, and listens.
pub fn bind(state_dir: &Path) -> Result<UnixListener, ControlError> {
    let path = socket_path(state_dir);
    let dir = path.parent().expect("the socket is inside a directory");
    let directory = |source| ControlError::Directory {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(directory)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(directory)?;
    // What a daemon that did not stop cleanly left (only ours can be in a 0700 directory).
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(directory(e)),
        _ => {}
    }
    let bind = |source| ControlError::Bind {
        path: path.clone(),
        source,
    };
    let listener = UnixListener::bind(&path).map_err(bind)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(bind)?;
    Ok(listener)
}

/// Answers requests on `listener` until `stop` flips.
pub async fn serve(listener: UnixListener, node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let node = node.clone();
                    tokio::spawn(async move {
                        answer(stream, node).await;
                        drop(slot);
                    });
                }
                Err(_) => tracing::warn!(
                    "control socket: {MAX_CONNECTIONS} requests under way; closing another"
                ),
            },
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Whether a process of user `uid` may command this daemon: root, or the daemon's own
/// user.
fn allowed(uid: u32) -> bool {
    uid == 0 || uid == rustix::process::geteuid().as_raw()
}

/// Serves one connection: reads its line (so that a refusal reaches a client still
/// writing), checks who it is, acts, answers.
async fn answer(mut stream: UnixStream, node: Arc<Node>) {
    let request = read_request(&mut stream).await;
    let result = match stream.peer_cred() {
        Ok(cred) if allowed(cred.uid()) => match request {
            Ok(line) => {
                let outcome = match Command::parse(&line) {
                    Ok(command) => act(&node, command).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = &outcome {
                    tracing::warn!("control socket: refused {line:?}: {e}");
                }
                outcome
            }
            Err(e) => Err(e),
        },
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                "control socket: refused a user other than root or this daemon's"
            );
            Err(format!(
                "uid {} may not command this daemon (root or its own user only)",
                cred.uid()
            ))
        }
        Err(e) => Err(format!("cannot tell who is asking: {e}")),
    };
    let line = match result {
        Ok(message) => format!("ok {message}\n"),
        Err(message) => format!("error {}\n", message.replace('\n', " ")),
    };
    let _ = tokio::time::timeout(TIMEOUT, stream.write_all(line.as_bytes())).await;
}

/// The request line, without its `\n`: at most [`MAX_REQUEST`] bytes, within
/// [`TIMEOUT`].
async fn read_request(stream: &mut UnixStream) -> Result<String, String> {
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(stream.take(MAX_REQUEST as u64));
    match tokio::time::timeout(TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => return Err(format!("no request line within {} s", TIMEOUT.as_secs())),
        Ok(Err(e)) => return Err(format!("reading the request: {e}")),
        Ok(Ok(_)) => {}
    }
    if line.pop() != Some(b'\n') {
        return Err(format!(
            "the request is not one line of at most {MAX_REQUEST} bytes"
        ));
    }
    String::from_utf8(line).map_err(|_| "the request is not UTF-8".to_string())
}

/// Carries out `command` on the node; the answer's message.
async fn act(node: &Arc<Node>, command: Command) -> Result<String, String> {
    let (target, pause) = match command {
        Command::Pause(target) => (target, true),
        Command::Resume(target) => (target, false),
        Command::Conflicts(volume) => {
            let node = node.clone();
            let listing = tokio::task::spawn_blocking(move || {
                crate::conflicts::list(&node, volume.as_deref())
            })
            .await
            .map_err(|e| format!("listing conflicts failed: {e}"))??;
            return serde_json::to_string(&listing).map_err(|e| e.to_string());
        }
        Command::Resolve { keep, path } => {
            return crate::conflicts::resolve(node, &path, keep).await;
        }
        Command::Versions(path) => {
            let node = node.clone();
            let listing = tokio::task::spawn_blocking(move || crate::restore::list(&node, &path))
                .await
                .map_err(|e| format!("listing versions failed: {e}"))??;
            return serde_json::to_string(&listing).map_err(|e| e.to_string());
        }
        Command::Restore(request) => {
            let restored = crate::restore::restore(node, request).await?;
            return serde_json::to_string(&restored).map_err(|e| e.to_string());
        }
        Command::Release(name) => return release(node, &name),
        Command::SetPeerMaxRate { node: name, rate } => {
            node.rate.set_peer_rate(name.as_deref(), rate);
            let whom = name.map_or("each peer".to_string(), |n| format!("peer {n}"));
            tracing::warn!(
                bytes_per_second = rate,
                "max rate for {whom} set by the operator"
            );
            return Ok(match rate {
                0 => format!("no bandwidth limit for {whom}"),
                _ => format!(
                    "chunk bytes to and from {whom} limited to {}/s each way",
                    crate::space::Size(rate)
                ),
            });
        }
        Command::SetMaxRate(rate) => {
            node.rate.set(rate);
            tracing::warn!(bytes_per_second = rate, "max rate set by the operator");
            return Ok(match rate {
                0 => "no bandwidth limit".to_string(),
                _ => format!(
                    "chunk bytes limited to {}/s each way",
                    crate::space::Size(rate)
                ),
            });
        }
    };
    if let Target::Volume(name) = &target
        && node.volume(name).is_none()
    {
        return Err(format!("volume {name} is not synced by this node"));
    }
    let changed = node.paused.set(&target, pause).map_err(|e| e.to_string())?;
    let verb = if pause { "paused" } else { "resumed" };
    if !changed {
        return Ok(format!("{target} was already {verb}"));
    }
    tracing::warn!("{target} {verb} by the operator");
    if !pause {
        // What changed here while paused goes out now, and each peer is pulled from.
        for volume in &node.volumes {
            if !node.paused.holds(&volume.name) {
                node.notify_peers(&volume.name);
            }
        }
        for peer in node.peers() {
            peer.wake.notify_one();
        }
    }
    let still = node
        .volumes
        .iter()
        .filter(|v| node.paused.holds(&v.name))
        .map(|v| v.name.as_str())
        .collect::<Vec<_>>();
    Ok(match still.is_empty() {
        true => format!("{target} {verb}; no volume is paused"),
        false => format!("{target} {verb}; paused now: {}", still.join(" ")),
    })
}

/// `restore HEXPATH [at=NS] [version=HEX] [to=HEXPATH]`.
fn parse_restore(path: &str, options: &[&str]) -> Result<Command, String> {
    let hex = |what: &str, text: &str| {
        crate::ids::from_hex(text).ok_or_else(|| format!("{what} {text:?} is not hex-encoded"))
    };
    let mut request = crate::restore::Request {
        path: hex("path", path)?,
        at: None,
        version: None,
        to: None,
    };
    for option in options {
        match option.split_once('=') {
            Some(("at", ns)) => {
                request.at = Some(ns.parse().map_err(|_| format!("at={ns:?} is not a time"))?)
            }
            Some(("version", id)) => {
                request.version = Some(
                    crate::store::versions::VersionId::from_hex(id)
                        .ok_or_else(|| format!("version={id:?} is not a version id"))?,
                )
            }
            Some(("to", dir)) => {
                let bytes = hex("to", dir)?;
                request.to = Some(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(
                    &bytes,
                )));
            }
            _ => return Err(format!("unknown restore option {option:?}")),
        }
    }
    if request.at.is_some() && request.version.is_some() {
        return Err("give at= or version=, not both".to_string());
    }
    Ok(Command::Restore(request))
}

impl Command {
    /// How long the CLI waits for the daemon's answer: a restore takes as long as its
    /// files take to assemble and fetch.
    fn answer_timeout(&self) -> std::time::Duration {
        match self {
            Command::Restore(_) => std::time::Duration::from_secs(24 * 3600),
            Command::Versions(_) | Command::Conflicts(_) => std::time::Duration::from_secs(120),
            _ => TIMEOUT,
        }
    }
}

/// Lets the deletes the guard holds in volume `name` go: a scan of the whole volume
/// writes them as tombstones and announces them. It runs on after the answer (a large
/// volume takes longer to scan than a client waits).
fn release(node: &Arc<Node>, name: &str) -> Result<String, String> {
    let index = node
        .volumes
        .iter()
        .position(|v| v.name == name)
        .ok_or_else(|| format!("volume {name} is not synced by this node"))?;
    let Some(held) = node.volumes[index].guard.status(name) else {
        return Ok(format!("volume {name}: the delete guard holds no deletes"));
    };
    tracing::warn!(volume = %name, held = held.names, "the operator released the deletes the guard held: they go to peers");
    let node = node.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::serve::release_deletes(&node, index).await {
            tracing::error!(volume = %node.volumes[index].name, "releasing the held deletes failed: {e:#}; they stay held");
        }
    });
    Ok(format!(
        "volume {name}: releasing {} held deletes; they go to peers once the volume is scanned",
        held.names
    ))
}

/// Sends `command` to the daemon whose state directory is `state_dir`; its answer's
/// message, or why it refused.
pub fn request(state_dir: &Path, command: &Command) -> Result<String, ControlError> {
    let path = socket_path(state_dir);
    let connect = |source| ControlError::Connect {
        path: path.clone(),
        source,
    };
    let exchange = |source| ControlError::Exchange {
        path: path.clone(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(connect)?;
    stream
        .set_read_timeout(Some(command.answer_timeout()))
        .map_err(exchange)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(exchange)?;
    stream
        .write_all(format!("{}\n", command.line()).as_bytes())
        .map_err(exchange)?;
    let mut line = String::new();
    std::io::BufReader::new(std::io::Read::take(stream, MAX_ANSWER))
        .read_line(&mut line)
        .map_err(exchange)?;
    let line = line.trim_end();
    if let Some(message) = line.strip_prefix("ok ") {
        Ok(message.to_string())
    } else if let Some(message) = line.strip_prefix("error ") {
        Err(ControlError::Refused(message.to_string()))
    } else {
        Err(ControlError::Garbled(line.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_back_as_written_and_nonsense_is_refused() {
        for command in [
            Command::Pause(Target::Node),
            Command::Resume(Target::Volume("media".into())),
            Command::SetMaxRate(10 << 20),
            Command::SetPeerMaxRate {
                node: None,
                rate: 1 << 20,
            },
            Command::SetPeerMaxRate {
                node: Some("node-b".into()),
                rate: 0,
            },
            Command::Conflicts(None),
            Command::Conflicts(Some("media".into())),
            Command::Release("media".into()),
            Command::Resolve {
                keep: Keep::Theirs,
                path: b"media/a b/c.sync-conflict-20261130-120000-abc.txt".to_vec(),
            },
        ] {
            assert_eq!(Command::parse(&command.line()), Ok(command));
        }
        for bad in [
            "",
            "pause a b",
            "pause ../x",
            "stop",
            "resume -x",
            "resolve ours 6d",
            "resolve mine zz",
            "resolve mine",
        ] {
            assert!(Command::parse(bad).is_err(), "{bad:?}");
        }
    }
}
