//! Peer sync: the node's shared state, the request/response plumbing over QUIC, and the
//! two halves of anti-entropy.
//!
//! - [`server`] answers peers' requests from the local store (roots, tree pages, chunk
//!   lists, chunk bytes).
//! - [`pull`] compares a peer's tree with ours, descends only into what differs, decides
//!   entry by entry with version vectors, fetches the chunks we hold nowhere, and applies
//!   changes atomically.
//! - [`conflict`] is the deterministic rule for concurrent edits.
//!
//! Every node pulls from every peer; nobody pushes data. A local change only sends a
//! `Notify`, after which peers pull at once.

pub mod client;
pub mod conflict;
pub mod error;
pub mod faults;
pub mod node;
pub mod pull;
pub mod server;
pub mod stats;
pub mod transfer;

pub use client::{Responses, open_request, request};
pub use error::SyncError;
pub use faults::Faults;
pub use node::{Node, Peer, Volume};
pub use stats::Stats;
