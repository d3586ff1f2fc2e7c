//! `verify` finds damage and names it.

use std::fs;

use crate::util::*;

#[test]
fn verify_names_a_flipped_byte_a_truncated_file_and_a_deleted_file() {
    let fx = Fixture::new();
    fx.write("rot.bin", &random_bytes(2 << 20, 1));
    fx.write("short.bin", &random_bytes(500_000, 2));
    fx.write("gone.bin", &random_bytes(1000, 3));
    fx.write("fine.bin", &random_bytes(700_000, 4));
    write_file(
        &fx.volume().join(os(b"bad\xffname")),
        &random_bytes(300_000, 5),
    );
    fx.scan();

    let clean = fx.shoal("verify", &[]);
    assert_eq!(clean.status.code(), Some(0), "{}", stderr(&clean));
    assert!(stdout(&clean).contains("no damage"));

    flip_byte_keeping_mtime(&fx.path("rot.bin"), 1_000_000);
    flip_byte_keeping_mtime(&fx.volume().join(os(b"bad\xffname")), 10);
    truncate_keeping_mtime(&fx.path("short.bin"), 100_000);
    fs::remove_file(fx.path("gone.bin")).unwrap();

    let damaged = fx.shoal("verify", &[]);
    assert_eq!(damaged.status.code(), Some(1));
    let text = stdout(&damaged);
    for expected in [
        "vol:rot.bin",
        "vol:short.bin",
        "vol:gone.bin",
        "vol:bad\\xffname",
        "(content-mismatch)",
        "(truncated)",
        "(missing)",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    assert!(!text.contains("fine.bin"), "{text}");

    let json = fx.shoal("verify", &["--json"]);
    assert_eq!(json.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let findings = report["findings"].as_array().unwrap();
    let find = |path: &str| {
        findings
            .iter()
            .find(|f| f["path"] == path)
            .unwrap_or_else(|| panic!("{path} not reported"))
    };
    assert_eq!(find("rot.bin")["problem"], "content-mismatch");
    let range = find("rot.bin")["range"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect::<Vec<_>>();
    assert!(
        range[0] <= 1_000_000 && 1_000_000 < range[1] && range[1] - range[0] <= 256 * 1024,
        "{range:?}"
    );
    assert_eq!(find("short.bin")["problem"], "truncated");
    assert_eq!(find("gone.bin")["problem"], "missing");
    assert_eq!(findings.len(), 4, "{findings:#?}");
}

#[test]
fn an_edit_since_the_last_scan_is_a_warning_not_damage() {
    let fx = Fixture::new();
    fx.write("doc.txt", b"version one");
    fx.scan();
    fx.write("doc.txt", b"version two, longer");
    let output = fx.shoal("verify", &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert!(stdout(&output).contains("modified since the last scan"));
}
