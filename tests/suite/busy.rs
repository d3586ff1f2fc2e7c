//! Issue 16, busy files: a log appended to all the time and a file rewritten in place all
//! the time reach the peer while they are written, as content that really existed (a
//! prefix of whole lines; one of the writer's versions), never torn. Real processes;
//! how far behind the peer is goes to `tools/bench-busy.py`, not here.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::cluster::*;

const CONVERGE: Duration = Duration::from_secs(90);
/// How long the writers write.
const WRITING: Duration = Duration::from_secs(20);
const PERIOD: Duration = Duration::from_millis(50);

fn log_line(i: u64) -> String {
    format!(
        "{i:08} GET /api/items/{} 200 {}\n",
        i * 7919 % 100_000,
        "x".repeat(40 + (i % 17) as usize)
    )
}

/// Checks that `text` is the first lines the writer wrote, each whole; returns how many.
fn whole_lines(text: &[u8]) -> u64 {
    let text = std::str::from_utf8(text).expect("the log is text");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "a torn last line: {:?}",
        &text[text.len().saturating_sub(80)..]
    );
    let mut count = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        assert_eq!(line, log_line(i as u64), "line {i} is not what was written");
        count += 1;
    }
    count
}

#[test]
fn a_log_appended_every_50_ms_reaches_the_peer_as_whole_lines_while_written() {
    let mut c = Cluster::new(2);
    c.start_all();
    c.wait_connected(CONVERGE);
    let (a, b) = (c.vol(0), c.vol(1));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (path, written) = (a.join("app.log"), written.clone());
        std::thread::spawn(move || {
            let mut log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            let started = Instant::now();
            let mut i = 0;
            while started.elapsed() < WRITING {
                // One write per line, as a logger does.
                log.write_all(log_line(i).as_bytes()).unwrap();
                i += 1;
                written.store(i, Ordering::SeqCst);
                std::thread::sleep(PERIOD);
            }
        })
    };
    let mut versions_while_writing = std::collections::BTreeSet::new();
    while !writer.is_finished() {
        if let Ok(text) = fs::read(b.join("app.log")) {
            let lines = whole_lines(&text);
            assert!(lines <= written.load(Ordering::SeqCst));
            versions_while_writing.insert(lines);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.join().unwrap();
    c.wait_converged(&[0, 1], CONVERGE);
    let total = whole_lines(&fs::read(b.join("app.log")).unwrap());
    assert_eq!(total, written.load(Ordering::SeqCst));
    // It arrived while it was written (it used to wait for the writer to stop), as
    // more than one version.
    assert!(
        versions_while_writing.iter().filter(|&&n| n > 0).count() >= 2,
        "the peer saw {versions_while_writing:?} of {total} lines while they were written:\n{}",
        tail(&c.log(0), 30)
    );
    assert_no_staging_left(&b);
}

/// A file's version `v`: a fixed random body with `v` written at the start of every
/// MiB, so every part of it differs from one version to the next.
fn version(base: &[u8], v: u64) -> Vec<u8> {
    let mut data = base.to_vec();
    for at in (0..data.len()).step_by(1 << 20) {
        data[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    data
}

/// The version `data` is, if it is exactly one the writer wrote (`written` of them).
fn which_version(base: &[u8], data: &[u8], written: u64) -> Option<u64> {
    if data.len() != base.len() {
        return None;
    }
    let v = u64::from_le_bytes(data[..8].try_into().unwrap());
    (v < written && data == version(base, v).as_slice()).then_some(v)
}

fn assert_no_staging_left(volume: &Path) {
    let staging = volume.join(".shoal/staging");
    let parts: Vec<String> = fs::read_dir(staging)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(parts.is_empty(), "staging keeps {parts:?}");
}

#[test]
fn a_64_mib_file_rewritten_in_place_every_50_ms_arrives_only_as_versions_that_existed() {
    const SIZE: usize = 64 << 20;
    let mut c = Cluster::new(2);
    c.start_all();
    c.wait_connected(CONVERGE);
    let (a, b) = (c.vol(0), c.vol(1));
    let base = Arc::new(crate::util::random_bytes(SIZE, 64));
    let path = a.join("db.bin");
    fs::write(&path, version(&base, 0)).unwrap();
    let written = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (base, written, stop) = (base.clone(), written.clone(), stop.clone());
        std::thread::spawn(move || {
            let file = File::options().write(true).open(path).unwrap();
            let started = Instant::now();
            let mut v = 1;
            while started.elapsed() < WRITING && !stop.load(Ordering::SeqCst) {
                let data = version(&base, v);
                // Counted before it is written: a copy of it may be taken at once.
                written.store(v + 1, Ordering::SeqCst);
                // In place, one write, then made durable, as a database does.
                file.write_all_at(&data, 0).unwrap();
                file.sync_data().unwrap();
                v += 1;
                std::thread::sleep(PERIOD);
            }
        })
    };
    let mut seen = std::collections::BTreeSet::new();
    while !writer.is_finished() {
        if let Ok(data) = fs::read(b.join("db.bin")) {
            let v = which_version(&base, &data, written.load(Ordering::SeqCst));
            if v.is_none() {
                stop.store(true, Ordering::SeqCst);
            }
            assert!(
                v.is_some(),
                "the peer holds a version that never existed:\n{}",
                tail(&c.log(1), 30)
            );
            seen.extend(v);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    writer.join().unwrap();
    c.wait_converged(&[0, 1], CONVERGE);
    let last = which_version(
        &base,
        &fs::read(b.join("db.bin")).unwrap(),
        written.load(Ordering::SeqCst),
    );
    assert_eq!(
        last,
        Some(written.load(Ordering::SeqCst) - 1),
        "the last version arrives"
    );
    // Newer versions arrived while it was written, not only the first.
    assert!(
        seen.iter().any(|&v| v > 0),
        "the peer saw only {seen:?} while the file was rewritten:\n--- A:\n{}\n--- B:\n{}",
        tail(&c.log(0), 30),
        tail(&c.log(1), 30)
    );
    assert_no_staging_left(&b);
}
