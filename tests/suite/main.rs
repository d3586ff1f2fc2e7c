//! Shoal's integration tests, one binary: the library on real directories and a real
//! RocksDB store, and the `shoal` binary run as a user would.

mod attacks;
mod busy;
mod cli;
mod cluster;
mod control;
mod crash;
mod docker;
mod faults;
mod feed;
mod fuzz;
mod guard;
mod hostile;
mod identity;
mod index;
mod live;
mod metadata;
mod operability;
mod page;
mod repair;
mod retention;
mod startup;
mod storm;
mod sync;
mod tree_props;
mod util;
mod verify;
mod versions;
