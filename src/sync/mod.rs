//! Peer sync: a node and its peers, and the two halves of anti-entropy.
//!
//! - [`node`]: a running node (store, volumes, peers), built once for `serve` and
//!   `repair`; [`stats`] its counters; [`state`] each peer's reachability and each
//!   volume's sync with it (in sync or behind, progress, errors), read by `/status`.
//! - [`announce`]: telling peers of local changes (`Notify`), also those made while a
//!   peer was not connected or not answering.
//! - [`client`]: connecting to a peer (the `Hello` exchange) and sending requests.
//! - [`server`] answers peers' requests from the local store (roots, tree pages, chunk
//!   lists, chunk bytes), one handler per request.
//! - [`pull`] compares a peer's tree with ours, descends only into what differs, decides
//!   entry by entry with version vectors, and applies changes atomically.
//! - [`room`] how much of a volume's file system pulls may stage at once, and whether
//!   it is short of room.
//! - [`transfer`] fills staging files from local copies and fetches the chunks this
//!   node holds nowhere (for pull and for repair).
//! - [`conflict`] is the deterministic rule for concurrent edits.
//! - [`error`] what can go wrong; [`faults`] a node that misbehaves on purpose (tests).
//!
//! Every node pulls from every peer; nobody pushes data. A local change only sends a
//! `Notify`, after which peers pull at once.

pub mod announce;
pub mod client;
pub mod conflict;
pub mod error;
pub mod faults;
pub mod node;
pub mod pull;
pub mod room;
pub mod server;
pub mod state;
pub mod stats;
pub mod transfer;

pub use client::{Responses, open_request, request};
pub use error::SyncError;
pub use faults::Faults;
pub use node::{Node, Peer, Volume};
pub use stats::Stats;
