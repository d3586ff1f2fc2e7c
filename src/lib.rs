//! Shoal keeps Docker volumes mirrored, master to master, across the nodes of a Swarm.
//!
//! # Layout
//!
//! Data flows one way: scan -> index -> tree -> (protocol -> transfer -> apply).
//!
//! - [`ids`]: typed identifiers (`ChunkId`, `ContentId`, `TreeHash`, `NodeId`, `VolumeId`).
//! - [`pathname`]: validated, byte-exact paths inside a volume.
//! - [`encoding`]: little-endian integers and length-prefixed byte strings, read with
//!   bounds checks (shared by the store's encodings and the wire protocol).
//! - [`chunking`]: FastCDC cut points, BLAKE3 chunk ids, content ids.
//! - [`entry`]: what the index knows of a name: kind, synced metadata, version vector.
//! - [`xattrs`]: extended attributes and POSIX ACLs: which sync, read and set by
//!   descriptor, bounded.
//! - [`store`]: the RocksDB index (`mod.rs` opening and reading, `batch.rs` atomic
//!   writes with a [`store::Durability`], `codec.rs` value encodings, `keys.rs` key
//!   layout), the pack files (`pack.rs`) and the kept versions (`versions.rs`: records
//!   of what a peer's change replaced, and the version packs holding their chunks).
//! - [`space`]: disk space as a state: room left on a file system, the reserve the
//!   store keeps so that RocksDB never meets a full disk.
//! - [`workers`]: a bounded pool of worker threads (the scanner's and verify's hashing).
//! - [`scan`]: walks a volume (or the directories that changed) and brings its index up
//!   to date: `walk.rs` merges listings with the index, `hash.rs` reads and chunks
//!   files, `rules.rs` holds the `.shoalignore` rules, `writer.rs` writes a full walk's
//!   batches on a thread of their own.
//! - [`watcher`]: file system events, debounced into narrow scans.
//! - [`guard`]: the delete guard: a scan's mass delete held back from peers until
//!   released, its threshold per volume, and what each volume holds.
//! - [`tree`]: the paged Merkle tree of each volume's namespace and its types
//!   (`TreeNode`, `PageSummary`, `SubtreeTotals`).
//! - [`verify`]: checks index, packs and live files against each other, naming each
//!   finding by a [`verify::Problem`] (`files.rs`, `locations.rs`, `packs.rs`).
//! - [`repair`]: restores what verify finds damaged, from local copies or peers
//!   (`index.rs`, `files.rs`, `packs.rs`).
//! - [`gc`]: the garbage collector: retention applied to kept versions, then packs
//!   rewritten without the chunks nothing references.
//! - [`retention`]: each volume's retention policy and the pure decision of which kept
//!   versions it drops.
//! - [`access`]: which nodes may hold which volume.
//! - [`credentials`]: the cluster CA and each node's key and certificate (`shoal cluster
//!   init`, `add-node`); [`identity`]: what a peer's certificate proves (its node id
//!   and name); [`revocation`]: the CA-signed list of revoked nodes.
//! - [`enroll`]: how a node gets its certificate from the signer (`mod.rs` the
//!   messages, `client.rs` the node's side, `signer.rs` `shoal signer`) and renews it.
//! - [`transport`]: QUIC endpoints with mutual TLS (and the signer's, server-auth only),
//!   and which peers went silent.
//! - [`protocol`]: the versioned wire protocol: limits, error codes and errors in
//!   `mod.rs`, framing in `frame.rs`, messages in `message.rs`.
//! - [`sync`]: anti-entropy. `node.rs` (a node: store, volumes, peers), `stats.rs` (its
//!   counters), `state.rs` (each peer's reachability and each volume's sync with it, as
//!   `/status` shows them), `client.rs` (connect, handshake, requests), `announce.rs`
//!   (`Notify`s of local changes, also to peers not connected or not answering),
//!   `server/` (one handler per request), `pull/` (`walk.rs` the tree walk, `decide.rs` each name,
//!   `apply.rs`, `files.rs` and `links.rs` (hard links) what was decided), `transfer.rs` (local copies and chunk fetches, for
//!   pull and repair), `conflict.rs`, `error.rs`, `faults.rs`.
//! - [`volume_fs`]: symlink-safe writes inside a volume, atomic publication.
//! - [`unsyncable`]: names that cannot be synced (a path too long, a name or type the
//!   receiving file system refuses), each logged once and listed in `/status`.
//! - [`serve`], [`http`]: the daemon and its HTTP endpoint (and the status it shows);
//!   [`page`]: the status page at `/` (HTML, CSS and JS in `src/page/`);
//!   [`health`]: whether the node is ready or degraded, and why; [`metrics`]: the
//!   Prometheus text format `/metrics` is written in.
//! - [`discovery`]: who the peers are (a static list, or found through the Docker API
//!   and Swarm DNS); [`container`]: what Shoal learns of the container it runs in.
//! - [`control`]: the local control socket the CLI commands the daemon through;
//!   [`pause`]: which volumes (or the node) an operator paused, kept across restarts;
//!   [`rate`]: the bandwidth limit on chunk bytes; [`conflicts`]: conflict copies as an
//!   operator lists and settles them; [`restore`]: kept versions as an operator lists
//!   them and puts them back.
//! - [`config`]: settings from flags, environment, TOML file and defaults.
//! - [`cli`]: the `shoal` command line.
//!
//! The on-disk formats are specified in `schema/store.md`, the wire protocol in
//! `schema/protocol.md`.

#![forbid(unsafe_code)]

pub mod access;
pub mod chunking;
pub mod cli;
pub mod config;
pub mod conflicts;
pub mod container;
pub mod control;
pub mod credentials;
pub mod discovery;
pub mod encoding;
pub mod enroll;
pub mod entry;
pub mod gc;
pub mod guard;
pub mod health;
pub mod http;
pub mod identity;
pub mod ids;
pub mod metrics;
pub mod page;
pub mod pathname;
pub mod pause;
pub mod protocol;
pub mod rate;
pub mod repair;
pub mod restore;
pub mod retention;
pub mod revocation;
pub mod scan;
pub mod serve;
pub mod space;
pub mod store;
pub mod sync;
pub mod transport;
pub mod tree;
pub mod unsyncable;
pub mod verify;
pub mod volume_fs;
pub mod watcher;
pub mod workers;
pub mod xattrs;
