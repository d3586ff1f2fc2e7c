//! The command line on bad input: one clear sentence, the right exit code, and the
//! store left as it was.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use shoal::store::{OpenOptions, Store, StoreError};

use crate::util::*;

fn assert_clean_error(output: &std::process::Output, code: i32, needle: &str) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "{needle:?} not in stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn scan_summary_names_the_numbers_and_status_shows_them() {
    let fx = Fixture::new();
    fx.write("a/b.bin", &random_bytes(200_000, 1));
    fx.write("copy.bin", &random_bytes(200_000, 1));
    let output = fx.shoal("scan", &["--volume", "vol"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    for word in [
        "files",
        "dirs",
        "chunks",
        "unique",
        "dedup ratio 2.00",
        "root",
        "/s",
    ] {
        assert!(text.contains(word), "{word:?} not in {text}");
    }
    let status = fx.shoal("status", &["--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["volumes"][0]["name"], "vol");
    assert_eq!(json["volumes"][0]["files"], 2);
    assert!(json["volumes"][0]["root"].as_str().unwrap().len() == 64);
    assert!(json["volumes"][0]["last_scan_unix"].as_i64().unwrap() > 1_700_000_000);
    assert!(stdout(&fx.shoal("status", &[])).contains("volume vol"));
}

#[test]
fn sync_volumes_and_the_config_file_name_volumes() {
    let fx = Fixture::new();
    fs::create_dir_all(fx.data_root().join("other")).unwrap();
    fx.write("x", b"x");
    let output = shoal_command(&[
        "scan",
        "--data-root",
        fx.data_root().to_str().unwrap(),
        "--state-dir",
        fx.state().to_str().unwrap(),
    ])
    .env("SYNC_VOLUMES", "vol other")
    .output()
    .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).contains("volume vol") && stdout(&output).contains("volume other"));

    let config = fx.dir.path().join("shoal.toml");
    fs::write(
        &config,
        format!(
            "data-root = {:?}\nstate-dir = {:?}\nvolumes = [\"vol\"]\n",
            fx.data_root(),
            fx.state()
        ),
    )
    .unwrap();
    let output = shoal(&["scan", "--config", config.to_str().unwrap(), "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json[0]["volume"], "vol");

    fs::write(&config, "data-rot = \"/typo\"\n").unwrap();
    assert_clean_error(
        &shoal(&["scan", "--config", config.to_str().unwrap()]),
        2,
        "unknown field `data-rot`",
    );
}

#[test]
fn usage_errors_exit_2() {
    assert_clean_error(&shoal(&["scan", "--bogus"]), 2, "--bogus");
    assert_clean_error(&shoal(&["verify", "--volume"]), 2, "a value is required");
    let fx = Fixture::new();
    assert_clean_error(&fx.shoal("scan", &[]), 2, "no volumes given");
    assert_clean_error(
        &fx.shoal("scan", &["--volume", "../etc"]),
        2,
        "invalid volume name",
    );
    assert_clean_error(
        &fx.shoal("scan", &["--volume", "vol", "--chunk-sizes", "1/2/3"]),
        2,
        "invalid chunk sizes",
    );
    let help = shoal(&["scan", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(stdout(&help).contains("SYNC_VOLUMES"));
}

#[test]
fn a_missing_data_root_or_volume_is_a_clear_error_and_creates_nothing() {
    let fx = Fixture::new();
    let output = shoal(&[
        "scan",
        "--data-root",
        "/nonexistent/shoal-data",
        "--state-dir",
        fx.state().to_str().unwrap(),
        "--volume",
        "vol",
    ]);
    assert_clean_error(&output, 2, "/nonexistent/shoal-data/vol is not a directory");
    assert!(
        !fx.state().exists(),
        "a failed scan created the state directory"
    );
    assert_clean_error(
        &fx.shoal("scan", &["--volume", "nope"]),
        2,
        "nope is not a directory",
    );
    assert_clean_error(&fx.shoal("status", &[]), 2, "no Shoal store in");
    assert_clean_error(&fx.shoal("verify", &[]), 2, "no Shoal store in");
}

#[test]
fn a_locked_state_dir_is_refused_and_left_alone() {
    let fx = Fixture::new();
    fx.write("a", b"a");
    fx.scan();
    let holder = fx.open();
    assert_clean_error(
        &fx.shoal("scan", &["--volume", "vol"]),
        2,
        "in use by another shoal process",
    );
    // Read-only commands work beside the writer.
    assert_eq!(fx.shoal("status", &[]).status.code(), Some(0));
    assert_eq!(fx.shoal("verify", &[]).status.code(), Some(0));
    match Store::open(
        &fx.state(),
        OpenOptions {
            create: true,
            ..Default::default()
        },
    ) {
        Err(StoreError::Locked(_)) => {}
        other => panic!("second writer not refused: {:?}", other.err()),
    }
    drop(holder);
    assert_eq!(
        fx.shoal("scan", &["--volume", "vol"]).status.code(),
        Some(0)
    );
}

#[test]
fn other_chunk_sizes_or_store_format_are_refused_without_touching_the_store() {
    let fx = Fixture::new();
    fx.write("a", &random_bytes(100_000, 1));
    assert_eq!(
        fx.shoal("scan", &["--volume", "vol", "--chunk-sizes", "8K/32K/128K"])
            .status
            .code(),
        Some(0)
    );
    let root = root_of(&fx.open(), "vol");
    fx.write("b", b"new file that must not be indexed");
    assert_clean_error(
        &fx.shoal(
            "scan",
            &["--volume", "vol", "--chunk-sizes", "16K/64K/256K"],
        ),
        2,
        "created with chunk sizes 8K/32K/128K; refusing to use it with 16K/64K/256K",
    );
    assert_eq!(
        root_of(&fx.open(), "vol"),
        root,
        "the refused scan changed the store"
    );

    // A store written by a future version.
    {
        let index = fx.state().join("index");
        let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &index).unwrap();
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &index, &cfs).unwrap();
        db.put_cf(
            db.cf_handle("meta-v1").unwrap(),
            b"format",
            99u32.to_le_bytes(),
        )
        .unwrap();
    }
    assert_clean_error(
        &fx.shoal("scan", &["--volume", "vol"]),
        2,
        "holds a store of format 99",
    );
    assert_clean_error(&fx.shoal("verify", &[]), 2, "holds a store of format 99");
    let index = fx.state().join("index");
    let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &index).unwrap();
    let db = rocksdb::DB::open_cf_for_read_only(&rocksdb::Options::default(), &index, &cfs, false)
        .unwrap();
    assert_eq!(
        db.get_cf(db.cf_handle("meta-v1").unwrap(), b"format")
            .unwrap()
            .unwrap(),
        99u32.to_le_bytes()
    );
}

/// Runs the binary as an unprivileged user when we are root (root reads any file).
fn as_unprivileged<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    if unsafe { libc::geteuid() } != 0 {
        return shoal(args);
    }
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_shoal"),
        ])
        .args(args);
    command.output().expect("setpriv (util-linux) runs")
}

#[test]
fn an_unreadable_file_is_named_and_its_entry_kept() {
    let fx = Fixture::new();
    fx.write("open.txt", b"readable");
    fx.write("secret.txt", b"first version");
    fs::create_dir_all(fx.state()).unwrap();
    for path in [
        fx.dir.path().to_path_buf(),
        fx.data_root(),
        fx.volume(),
        fx.state(),
    ] {
        fs::set_permissions(&path, fs::Permissions::from_mode(0o777)).unwrap();
    }
    for file in ["open.txt", "secret.txt"] {
        fs::set_permissions(fx.path(file), fs::Permissions::from_mode(0o666)).unwrap();
    }
    let args = scan_args(&fx.data_root(), &fx.state());
    let first = as_unprivileged(&args);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let root = stdout(&first)
        .lines()
        .find(|l| l.contains("root"))
        .unwrap()
        .to_string();

    fs::write(fx.path("secret.txt"), b"second version, unreadable").unwrap();
    fs::set_permissions(fx.path("secret.txt"), fs::Permissions::from_mode(0o000)).unwrap();
    let second = as_unprivileged(&args);
    assert_clean_error(&second, 1, "secret.txt");
    assert!(
        stderr(&second).contains("Permission denied"),
        "{}",
        stderr(&second)
    );
    assert!(
        stdout(&second).contains(&root),
        "the old entry was not kept:\n{}",
        stdout(&second)
    );
}
