//! Shoal keeps Docker volumes mirrored, master to master, across the nodes of a Swarm.
//!
//! # Layout
//!
//! Data flows one way: scan -> index -> tree -> (protocol -> transfer -> apply).
//!
//! - [`ids`]: typed identifiers (`ChunkId`, `ContentId`, `TreeHash`, `NodeId`, `VolumeId`).
//! - [`pathname`]: validated, byte-exact paths inside a volume.
//! - [`chunking`]: FastCDC cut points, BLAKE3 chunk ids, content ids.
//! - [`entry`]: what the index knows of a name: kind, synced metadata, version vector.
//! - [`store`]: the RocksDB index and the pack files; atomic batches.
//! - [`scan`]: walks a volume (or the directories that changed) and brings its index up
//!   to date.
//! - [`watcher`]: file system events, debounced into narrow scans.
//! - [`tree`]: the paged Merkle tree of each volume's namespace.
//! - [`verify`]: checks index, packs and live files against each other.
//! - [`repair`]: restores what verify finds damaged, from local copies or peers.
//! - [`credentials`]: the cluster CA and node certificates (`shoal cluster init`).
//! - [`transport`]: QUIC endpoints with mutual TLS.
//! - [`protocol`]: the versioned wire messages and their framing.
//! - [`sync`]: anti-entropy: serving peers, pulling from them, conflicts.
//! - [`volume_fs`]: symlink-safe writes inside a volume, atomic publication.
//! - [`serve`], [`http`]: the daemon and its local status endpoint.
//! - [`discovery`]: who the peers are (a static list, or found through the Docker API
//!   and Swarm DNS); [`container`]: what Shoal learns of the container it runs in.
//! - [`config`]: settings from flags, environment, TOML file and defaults.
//! - [`cli`]: the `shoal` command line.
//!
//! The on-disk formats are specified in `schema/store.md`, the wire protocol in
//! `schema/protocol.md`.

#![forbid(unsafe_code)]

pub mod chunking;
pub mod cli;
pub mod config;
pub mod container;
pub mod credentials;
pub mod discovery;
pub mod encoding;
pub mod entry;
pub mod http;
pub mod ids;
pub mod pathname;
pub mod protocol;
pub mod repair;
pub mod scan;
pub mod serve;
pub mod store;
pub mod sync;
pub mod transport;
pub mod tree;
pub mod verify;
pub mod volume_fs;
pub mod watcher;
pub mod workers;
