//! Property: the root hash depends only on content and synced metadata.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use proptest::prelude::*;
use shoal::scan::{ScanOptions, scan_volume};
use shoal::store::{OpenOptions, Store};

use crate::util::*;

#[derive(Clone, Debug)]
enum Node {
    File {
        content: Vec<u8>,
        mode: u32,
        mtime: u64,
    },
    Symlink(String),
    EmptyDir,
}

/// Paths of up to three components over a small alphabet (so that directories are
/// shared), with no path both a leaf and a directory.
fn tree() -> impl Strategy<Value = BTreeMap<Vec<String>, Node>> {
    let name = prop::sample::select(vec!["a", "b", "c.txt", "d d", "é"]).prop_map(str::to_string);
    let path = prop::collection::vec(name, 1..=3);
    let node = prop_oneof![
        4 => (prop::collection::vec(any::<u8>(), 0..300), prop::sample::select(vec![0o644u32, 0o600, 0o755]), 1u64..4)
            .prop_map(|(content, mode, mtime)| Node::File { content, mode, mtime: mtime * 1_000_000 }),
        1 => prop::sample::select(vec!["a", "../x", "/abs"]).prop_map(|t| Node::Symlink(t.to_string())),
        1 => Just(Node::EmptyDir),
    ];
    prop::collection::btree_map(path, node, 1..25).prop_map(|mut map| {
        let paths: Vec<Vec<String>> = map.keys().cloned().collect();
        map.retain(|p, _| {
            !paths
                .iter()
                .any(|other| other.len() > p.len() && other.starts_with(p))
        });
        map
    })
}

fn build(root: &Path, tree: &BTreeMap<Vec<String>, Node>, reverse: bool) {
    let mut items: Vec<_> = tree.iter().collect();
    if reverse {
        items.reverse();
    }
    for (path, node) in items {
        let full = root.join(path.join("/"));
        fs::create_dir_all(full.parent().unwrap()).unwrap();
        match node {
            Node::File {
                content,
                mode,
                mtime,
            } => {
                fs::write(&full, content).unwrap();
                fs::set_permissions(&full, fs::Permissions::from_mode(*mode)).unwrap();
                set_mtime(&full, *mtime);
            }
            Node::Symlink(target) => symlink(target, &full).unwrap(),
            Node::EmptyDir => fs::create_dir(&full).unwrap(),
        }
    }
}

fn root_in_new_store(dir: &Path, threads: usize) -> String {
    let store = Store::open(
        &dir.join("state"),
        OpenOptions {
            create: true,
            ..Default::default()
        },
    )
    .unwrap();
    scan_volume(
        &store,
        "v",
        &dir.join("v"),
        &ScanOptions {
            threads,
            ..ScanOptions::default()
        },
    )
    .unwrap()
    .root
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn root_depends_only_on_content_and_synced_metadata(tree in tree()) {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        build(&a.path().join("v"), &tree, false);
        build(&b.path().join("v"), &tree, true);
        // Two stores (two node ids), two directories, opposite creation orders,
        // different scan parallelism: one root.
        let root_a = root_in_new_store(a.path(), 1);
        let root_b = root_in_new_store(b.path(), 4);
        prop_assert_eq!(&root_a, &root_b);

        // And the root does see a change of content.
        if let Some((path, _)) = tree.iter().find(|(_, n)| matches!(n, Node::File { .. })) {
            let full = b.path().join("v").join(path.join("/"));
            fs::write(&full, b"changed content").unwrap();
            set_mtime(&full, 1_000_000);
            prop_assert_ne!(root_in_new_store(b.path(), 2), root_a);
        }
    }
}

#[test]
fn two_volumes_with_identical_trees_in_one_store_have_one_root() {
    let dir = tempfile::tempdir().unwrap();
    for volume in ["one", "two"] {
        for i in 0..20u64 {
            let path = dir.path().join(format!("data/{volume}/d{}/f{i}", i % 3));
            write_file(&path, &random_bytes(i as usize * 5000, i));
            set_mtime(&path, 1_700_000_000 + i);
        }
    }
    let store = Store::open(
        &dir.path().join("state"),
        OpenOptions {
            create: true,
            ..Default::default()
        },
    )
    .unwrap();
    let one = scan_volume(
        &store,
        "one",
        &dir.path().join("data/one"),
        &ScanOptions::default(),
    )
    .unwrap();
    let two = scan_volume(
        &store,
        "two",
        &dir.path().join("data/two"),
        &ScanOptions::default(),
    )
    .unwrap();
    assert_eq!(one.root, two.root);
    assert_eq!(one.totals, two.totals);
}
