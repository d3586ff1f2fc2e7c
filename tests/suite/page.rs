//! The status page in a real browser: Debian's headless Chromium loads `/` from a live
//! three-node cluster (real `shoal serve` processes), runs the page's script, and the
//! test reads the DOM it rendered.
//!
//! Chromium is installed by `tools/setup.sh chromium` when this test runs (about 20 s
//! on Debian 12 when missing). The screenshot goes to the test's target directory, and
//! to `docs/status-page.png` with `SHOAL_SCREENSHOT=1` (the one the README shows).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::Cluster;

/// Chromium, installed through the project's package mechanism if it is missing.
fn chromium() -> PathBuf {
    let path = PathBuf::from("/usr/bin/chromium");
    if !path.exists() {
        let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/setup.sh");
        let out = Command::new("bash")
            .arg(setup)
            .arg("chromium")
            .output()
            .unwrap();
        assert!(
            out.status.success() && path.exists(),
            "this test needs Debian's chromium; `tools/setup.sh chromium` failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    path
}

/// Runs headless Chromium on `url` with `args` (its own profile in `profile`), at most
/// two minutes; its stdout.
fn headless(profile: &Path, url: &str, args: &[&str]) -> String {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            // The page's script fetches /status, renders, and waits for its next refresh.
            "--virtual-time-budget=6000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .env("HOME", profile)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 2 minutes on {url}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    out
}

fn control(c: &Cluster, i: usize, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .arg("--state-dir")
        .arg(c.dir.path().join(format!("node{i}/state")))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The start tag of the first element holding all of `attributes` (`name="value"`).
fn element<'a>(dom: &'a str, attributes: &[&str]) -> Option<&'a str> {
    dom.match_indices('<').find_map(|(at, _)| {
        let tag = &dom[at..at + dom[at..].find('>')?];
        attributes.iter().all(|a| tag.contains(a)).then_some(tag)
    })
}

#[test]
fn the_status_page_renders_the_nodes_a_paused_volume_and_a_conflict_in_chromium() {
    let mut c = Cluster::new(3);
    c.more_volumes.push("media".into());
    fs::write(c.vol(0).join("report.txt"), b"first draft").unwrap();
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1, 2], Duration::from_secs(60));

    // A conflict: nodes 0 and 1 edit report.txt while cut off from each other.
    c.stop(1);
    c.stop(2);
    fs::write(c.vol(0).join("report.txt"), b"edited on node 0").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    c.stop(0);
    fs::write(c.vol(1).join("report.txt"), b"edited on node 1, later").unwrap();
    c.start(1);
    std::thread::sleep(Duration::from_secs(2));
    c.stop(1);
    c.start_all();
    c.wait_connected(Duration::from_secs(30));
    c.wait_converged(&[0, 1, 2], Duration::from_secs(60));
    let media = c.dir.path().join("node0/data/media");
    fs::write(
        media.join("clip.bin"),
        crate::util::random_bytes(300_000, 7),
    )
    .unwrap();
    c.wait_converged(&[0, 1, 2], Duration::from_secs(60));
    control(&c, 0, &["pause", "media"]);
    // The page reads /status: wait until it lists what the page must show (a
    // whole-volume scan names the conflict copy; every heartbeat).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.status(0).is_some_and(|s| {
        s["volumes"][0]["conflicts"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    }) {
        assert!(Instant::now() < deadline, "{:?}", c.status(0));
        std::thread::sleep(Duration::from_millis(200));
    }

    let url = format!("http://{}:7030/", c.ip(0));
    let profile = c.dir.path().join("chromium");
    fs::create_dir_all(&profile).unwrap();
    let dom = headless(&profile, &url, &["--dump-dom"]);
    assert!(
        element(&dom, &["data-loaded=\"true\""]).is_some(),
        "the page's script did not render /status:\n{dom}"
    );
    // This node and its two peers, connected, with their volumes' state.
    assert!(
        element(&dom, &["data-node=\"node0\"", "data-role=\"self\""]).is_some(),
        "{dom}"
    );
    for peer in ["node1", "node2"] {
        assert!(
            element(
                &dom,
                &[
                    &format!("data-node=\"{peer}\""),
                    "data-role=\"peer\"",
                    "data-state=\"connected\""
                ]
            )
            .is_some(),
            "{peer} not shown connected:\n{dom}"
        );
    }
    assert!(
        element(&dom, &["data-volume=\"vol\"", "data-state=\"in_sync\""]).is_some(),
        "no peer shown in sync on vol:\n{dom}"
    );
    assert!(dom.contains(&format!("{}:7029", c.ip(1))), "{dom}");
    // The paused volume, and the other one not paused.
    assert!(
        element(&dom, &["data-volume=\"media\"", "data-paused=\"true\""]).is_some(),
        "{dom}"
    );
    assert!(
        element(&dom, &["data-volume=\"vol\"", "data-paused=\"false\""]).is_some(),
        "{dom}"
    );
    // The conflict copy, with the name it lost.
    let conflict = element(&dom, &["data-path=\"vol/report.sync-conflict-"])
        .unwrap_or_else(|| panic!("no conflict row:\n{dom}"));
    assert!(conflict.contains(".txt\""), "{conflict}");
    assert!(dom.contains(">report.txt<"), "{dom}");
    // The page is served with its assets, from this origin only.
    let page = c.http(0, "/", Duration::from_secs(5)).unwrap();
    assert_eq!(page.code, 200);
    assert!(
        page.head
            .contains("content-security-policy: default-src 'none'")
    );
    for asset in ["/page/app.js", "/page/style.css"] {
        assert_eq!(c.http(0, asset, Duration::from_secs(5)).unwrap().code, 200);
    }

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    headless(
        &profile,
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1000",
        ],
    );
    let png = fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        shot.display()
    );
    if std::env::var_os("SHOAL_SCREENSHOT").is_some() {
        fs::write(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png"),
            &png,
        )
        .unwrap();
    }
}
