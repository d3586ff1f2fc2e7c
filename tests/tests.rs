//! Shoal's integration tests, one binary: the library on real directories and a real
//! RocksDB store, and the `shoal` binary run as a user would.

#[path = "suite/util.rs"]
mod util;

#[path = "suite/index.rs"]
mod index;

#[path = "suite/tree_props.rs"]
mod tree_props;

#[path = "suite/verify.rs"]
mod verify;

#[path = "suite/cli.rs"]
mod cli;

#[path = "suite/crash.rs"]
mod crash;

#[path = "suite/cluster.rs"]
mod cluster;

#[path = "suite/sync.rs"]
mod sync;

#[path = "suite/live.rs"]
mod live;

#[path = "suite/repair.rs"]
mod repair;

#[path = "suite/docker.rs"]
mod docker;
