//! `shoal status` against a running daemon: finds it (`--http`, `SHOAL_HTTP`, or the
//! default address), reads its `/status`, and prints it for a person (health, each
//! volume, each peer's sync state with progress and ETA) or as JSON; `--watch` prints it
//! again every [`WATCH_INTERVAL`].

use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context;
use indicatif::HumanBytes;

use super::{Outcome, print};
use crate::http::{NodeStatus, PeerStatus};
use crate::sync::state::{PeerVolumeStatus, Verdict};

/// Where `shoal serve` answers unless told otherwise (its `--http` default).
pub const DEFAULT_HTTP: &str = "127.0.0.1:7030";

/// How often `--watch` asks again.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// The most of an answer read (a status of many peers and volumes fits easily).
const MAX_ANSWER: u64 = 16 << 20;

/// Asks the daemon at `addr` for its status.
pub fn fetch(addr: SocketAddr) -> anyhow::Result<NodeStatus> {
    let timeout = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("no shoal serve answering on {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.take(MAX_ANSWER).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    serde_json::from_str(body).with_context(|| format!("unexpected answer from {addr}/status"))
}

/// Whether a daemon listens at `addr` (a refused connection says no at once).
pub fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

/// Prints the daemon's status once, or every [`WATCH_INTERVAL`] with `watch` (until
/// interrupted).
pub fn show(addr: SocketAddr, json: bool, watch: bool) -> anyhow::Result<Outcome> {
    let terminal = std::io::stdout().is_terminal();
    loop {
        let status = fetch(addr)?;
        let text = match json {
            true => format!("{}\n", serde_json::to_string_pretty(&status)?),
            false => render(&status, terminal),
        };
        if watch && terminal {
            // Clear the screen and go home: the new status replaces the old.
            print("\x1b[2J\x1b[H")?;
        }
        print(&text)?;
        if !watch {
            return Ok(Outcome::Success);
        }
        std::thread::sleep(WATCH_INTERVAL);
    }
}

/// `name id, certificate valid until T` as the peer's certificate proved them, or `?`.
fn peer_identity(peer: &PeerStatus) -> String {
    match (&peer.node_id, &peer.name, &peer.cert_expires) {
        (Some(id), Some(name), Some(expires)) => {
            format!("{name} {id}, certificate valid until {expires}")
        }
        (Some(id), ..) => id.clone(),
        _ => "?".into(),
    }
}

/// The status for a person; `bars`: draw progress bars (a terminal).
pub fn render(status: &NodeStatus, bars: bool) -> String {
    let mut out = format!("node {}", status.node_id);
    if let (Some(name), Some(expires)) = (&status.name, &status.cert_expires) {
        let _ = write!(out, " ({name}, certificate valid until {expires})");
    }
    out.push('\n');
    match status.health.ready {
        true => out.push_str("health: ready\n"),
        false => {
            out.push_str("health: DEGRADED\n");
            for cause in &status.health.causes {
                let _ = writeln!(out, "  {}: {}", cause.kind.name(), cause.message);
            }
        }
    }
    if status.max_rate > 0 {
        let _ = writeln!(
            out,
            "chunk bytes limited to {}/s each way (--max-rate)",
            HumanBytes(status.max_rate)
        );
    }
    for v in &status.volumes {
        let _ = writeln!(
            out,
            "volume {}: {} files, {}, root {}",
            v.name,
            v.files,
            HumanBytes(v.bytes),
            v.root.as_deref().unwrap_or("(none)")
        );
        if let Some(histories) = &v.histories_root {
            // Equal on nodes that hold the same files with the same histories.
            let _ = writeln!(out, "  histories root {histories}");
        }
        if let Some(held) = &v.versions_held {
            let _ = writeln!(out, "  versions {}", super::commands::held_line(held));
        }
        if v.conflict_copies > 0 {
            let _ = writeln!(
                out,
                "  {} conflict copies (names holding .sync-conflict-; `shoal conflicts {}` lists them)",
                v.conflict_copies, v.name
            );
        }
        if v.paused {
            out.push_str("  PAUSED (shoal resume): not syncing; local changes are indexed\n");
        }
        if let Some(held) = &v.deletes_held {
            let _ = writeln!(
                out,
                "  {} (since {}): {}",
                held.message,
                held.since,
                held.sample.join(", ")
            );
        }
        if let Some(scan) = &v.scan {
            let _ = writeln!(
                out,
                "  scanning since {}: {} read",
                scan.started,
                HumanBytes(scan.bytes_read)
            );
        }
    }
    for p in &status.peers {
        let link = match p.connected {
            true => format!("connected since {}", p.since),
            false => format!("not connected since {}", p.since),
        };
        let _ = writeln!(
            out,
            "peer {} ({}): {link}, sent {}, received {}, rejected chunks {}",
            p.addr,
            peer_identity(p),
            HumanBytes(p.chunk_bytes_sent),
            HumanBytes(p.chunk_bytes_received),
            p.rejected_chunks
        );
        if p.max_rate > 0 {
            let _ = writeln!(
                out,
                "  chunk bytes limited to {}/s each way (--max-rate-peer)",
                HumanBytes(p.max_rate)
            );
        }
        if let Some(error) = &p.last_error {
            let _ = writeln!(
                out,
                "  last error ({} times since {}): {}",
                error.count, error.since, error.message
            );
        }
        for v in &p.volumes {
            render_peer_volume(&mut out, v, bars);
        }
    }
    let t = &status.totals;
    let _ = writeln!(
        out,
        "totals: sent {}, received {}, files applied {}, conflicts {}, rejected chunks {}",
        HumanBytes(t.chunk_bytes_sent),
        HumanBytes(t.chunk_bytes_received),
        t.files_applied,
        t.conflicts,
        t.rejected_chunks
    );
    out
}

fn render_peer_volume(out: &mut String, v: &PeerVolumeStatus, bars: bool) {
    let state = match v.state {
        Verdict::InSync => "in sync".to_string(),
        Verdict::Unknown => "not compared yet".to_string(),
        Verdict::Paused => "paused by the peer's operator".to_string(),
        Verdict::Behind => format!(
            "behind by {} entries ({}) since {}",
            v.pending_entries,
            HumanBytes(v.pending_bytes),
            v.behind_since.as_deref().unwrap_or("?")
        ),
    };
    let last = v.last_round.as_deref().unwrap_or("never");
    let _ = writeln!(out, "  volume {}: {state}; last round {last}", v.volume);
    if let Some(round) = &v.round {
        let total = round.bytes_done + round.pending_bytes;
        let eta = round.eta_seconds.map_or("unknown".to_string(), |s| {
            humantime::format_duration(Duration::from_secs(s)).to_string()
        });
        let bar = match bars {
            true => format!("{} ", bar(round.bytes_done, total)),
            false => String::new(),
        };
        let _ = writeln!(
            out,
            "    pulling: {bar}{} of {}, {} entries done, {}/s, ETA {eta}",
            HumanBytes(round.bytes_done),
            HumanBytes(total),
            round.entries_done,
            HumanBytes(round.bytes_per_second)
        );
    }
    if let Some(error) = &v.last_error {
        let _ = writeln!(
            out,
            "    last error ({} rounds since {}): {}",
            error.count, error.since, error.message
        );
    }
}

/// `[#####-----] 50%`.
fn bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let filled = (done.saturating_mul(WIDTH))
        .checked_div(total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    let percent = (done.saturating_mul(100)).checked_div(total).unwrap_or(100);
    format!(
        "[{}{}] {percent:>3}%",
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_bar_fills_with_what_is_done() {
        assert_eq!(super::bar(0, 10), format!("[{}]   0%", "-".repeat(30)));
        assert_eq!(
            super::bar(5, 10),
            format!("[{}{}]  50%", "#".repeat(15), "-".repeat(15))
        );
        assert_eq!(super::bar(0, 0), format!("[{}] 100%", "#".repeat(30)));
    }
}
