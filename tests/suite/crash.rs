//! A scan killed with SIGKILL at any point leaves a store that the next scan completes.

use std::time::{Duration, Instant};

use crate::util::*;

#[test]
fn scan_killed_midway_then_rescanned_matches_a_fresh_scan() {
    let fx = Fixture::new();
    for i in 0..12_000u64 {
        fx.write(
            &format!("d{:03}/f{i}", i % 150),
            &random_bytes(64 + (i as usize % 7) * 300, i),
        );
    }
    for i in 0..4u64 {
        fx.write(&format!("big{i}.bin"), &random_bytes(12 << 20, 1000 + i));
    }
    let data_root = fx.data_root();
    let args = scan_args(&data_root, &fx.state());
    let mut kills = 0;
    for delay_ms in [40u64, 120, 250, 500, 900] {
        let mut child = shoal_command(&args).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        // Whatever the moment, the store opens again.
        let status = fx.shoal("status", &[]);
        assert!(
            matches!(status.status.code(), Some(0 | 2)),
            "{}",
            stderr(&status)
        );
        if status.status.code() == Some(2) {
            // Killed before the store existed: only acceptable as "no store".
            assert!(
                stderr(&status).contains("no Shoal store"),
                "{}",
                stderr(&status)
            );
        }
    }
    assert!(kills >= 2, "the scan finished too fast to be interrupted");

    // Mix in changes, as a restarted node would find.
    fx.write("d000/f0", b"changed after the crash");
    std::fs::remove_file(fx.path("d001/f1")).unwrap();

    let deadline = Instant::now() + Duration::from_secs(120);
    let resumed = shoal_command(&args).output().unwrap();
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert!(Instant::now() < deadline);

    let fresh = Fixture::new();
    let fresh_args = scan_args(&data_root, &fresh.state());
    assert_eq!(
        shoal_command(&fresh_args).output().unwrap().status.code(),
        Some(0)
    );

    let (resumed_store, fresh_store) = (fx.open(), fresh.open());
    assert_eq!(root_of(&resumed_store, "vol"), root_of(&fresh_store, "vol"));
    assert_eq!(
        index_listing(&resumed_store, "vol"),
        index_listing(&fresh_store, "vol")
    );
    drop(resumed_store);
    let verify = fx.shoal("verify", &[]);
    assert_eq!(verify.status.code(), Some(0), "{}", stdout(&verify));
}
