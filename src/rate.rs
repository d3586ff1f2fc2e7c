//! The node's bandwidth limits on chunk bytes: one for the node (`--max-rate`, `shoal
//! set max-rate`) and one for each peer (`--max-rate-peer`, `shoal set max-rate
//! --per-peer` or `--peer NODE`). Each is a token bucket for chunk bytes sent and one
//! for chunk bytes received, both at the same rate; a chunk passes the node's buckets,
//! then its peer's. Control messages (tree pages, entries, chunk lists) bypass them: a
//! capped node still compares trees at full speed and spends its budget on data.
//!
//! A peer's rate is the rule naming it (by its certificate's name or node id), else
//! the rule for every peer, else none.
//!
//! Each bucket holds at most one second of the rate. A chunk larger than what the
//! bucket holds is let through once its bytes are paid for: the bucket goes into debt
//! and the next chunk waits until the debt is repaid, so over any stretch the bytes
//! passed stay within one second's worth of `rate × time`. The rate can change at
//! any time; the next chunk pays at the new rate.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::identity::Proven;
use crate::ids::NodeId;

/// A rate in bytes per second, as given: `500K`, `10M`, `20MiB`, `1G`, `2000` (bytes);
/// K, M, G are powers of 1024 (`KiB`, `MiB`, `GiB` the same); a trailing `/s` is
/// allowed; `0` or `off` is no limit.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    if t.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    parse_bytes(t).map_err(|_| rate_error(text))
}

/// A number of bytes as given: `2000`, `500K`, `10M`, `20MiB`, `1G`, `2T`; K, M, G, T are
/// powers of 1024 (`KiB`, `MiB`, `GiB`, `TiB` the same).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => return Err(format!("invalid size {text:?}")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("invalid size {text:?}"))
}

fn rate_error(text: &str) -> String {
    format!(
        "invalid rate {text:?}: bytes per second, e.g. 500K, 10M, 20MiB, 1G (powers of 1024) or 0/off for no limit"
    )
}

/// The limits and their buckets.
#[derive(Debug, Default)]
pub struct RateLimit {
    /// The node's bytes per second; 0: no limit.
    rate: AtomicU64,
    node: Buckets,
    peer_rules: Mutex<PeerRates>,
    /// Each peer's buckets, by the node id its certificate proved (one entry per
    /// cluster member that exchanged chunks with this node).
    peers: Mutex<HashMap<NodeId, Arc<Buckets>>>,
}

/// The per-peer limits: one for every peer, and some for peers by name or node id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeerRates {
    /// Bytes per second for a peer no rule names; 0: no limit.
    pub every: u64,
    /// Bytes per second by node name or 16-hex-digit node id.
    pub nodes: BTreeMap<String, u64>,
}

impl PeerRates {
    /// Rules as given: `RATE` (every peer) or `NODE=RATE` (one node, by name or id),
    /// each string possibly several rules separated by spaces.
    pub fn parse(rules: &[String]) -> Result<PeerRates, String> {
        let mut rates = PeerRates::default();
        for rule in rules.iter().flat_map(|r| r.split_whitespace()) {
            match rule.split_once('=') {
                Some((node, rate)) => {
                    if !crate::identity::is_node_name(node) {
                        return Err(format!("{rule:?}: {node:?} is not a node name or id"));
                    }
                    rates.nodes.insert(node.to_string(), parse_rate(rate)?);
                }
                None => rates.every = parse_rate(rule)?,
            }
        }
        Ok(rates)
    }

    /// The rate for `peer`: the rule naming it, else the one for every peer.
    pub fn rate_for(&self, peer: &Proven) -> u64 {
        self.nodes
            .get(&peer.name)
            .or_else(|| self.nodes.get(&peer.node_id.to_string()))
            .copied()
            .unwrap_or(self.every)
    }
}

/// A sent and a received bucket.
#[derive(Debug, Default)]
struct Buckets {
    sent: Bucket,
    received: Bucket,
}

impl Buckets {
    async fn pass(&self, rate: u64, direction: Direction, bytes: usize) {
        if rate == 0 {
            return;
        }
        let bucket = match direction {
            Direction::Sent => &self.sent,
            Direction::Received => &self.received,
        };
        let wait = bucket.take(rate as f64, bytes as f64, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Which way chunk bytes go.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    Sent,
    Received,
}

#[derive(Debug, Default)]
struct Bucket {
    /// Tokens (bytes) held, negative in debt, and when they were counted.
    state: Mutex<Option<(f64, Instant)>>,
}

impl RateLimit {
    /// The rate in use, in bytes per second (0: no limit).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    pub fn set(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// The per-peer rules in use.
    pub fn peer_rates(&self) -> PeerRates {
        self.peer_rules.lock().expect("rate lock").clone()
    }

    pub fn set_peer_rates(&self, rates: PeerRates) {
        *self.peer_rules.lock().expect("rate lock") = rates;
    }

    /// Sets the rate of one node (by name or id), or with `None` of every peer no rule
    /// names.
    pub fn set_peer_rate(&self, node: Option<&str>, rate: u64) {
        let mut rules = self.peer_rules.lock().expect("rate lock");
        match node {
            Some(node) => {
                rules.nodes.insert(node.to_string(), rate);
            }
            None => rules.every = rate,
        }
    }

    /// The rate in use for chunk bytes to and from `peer` (0: no limit).
    pub fn peer_rate(&self, peer: &Proven) -> u64 {
        self.peer_rules.lock().expect("rate lock").rate_for(peer)
    }

    /// Waits until `bytes` of chunk data may go `direction`, to or from `peer` (its
    /// proven identity): the node's limit, then the peer's.
    pub async fn pass(&self, peer: Option<&Proven>, direction: Direction, bytes: usize) {
        self.node.pass(self.rate(), direction, bytes).await;
        let Some(peer) = peer else {
            return;
        };
        let rate = self.peer_rate(peer);
        if rate == 0 {
            return;
        }
        let buckets = self
            .peers
            .lock()
            .expect("rate lock")
            .entry(peer.node_id)
            .or_default()
            .clone();
        buckets.pass(rate, direction, bytes).await;
    }
}

impl Bucket {
    /// Takes `bytes` at `rate`: how long to wait before they may go.
    fn take(&self, rate: f64, bytes: f64, now: Instant) -> Duration {
        let mut state = self.state.lock().expect("rate lock");
        let (held, then) = state.unwrap_or((rate, now));
        let held = (held + now.saturating_duration_since(then).as_secs_f64() * rate).min(rate);
        let left = held - bytes;
        *state = Some((left, now));
        match left < 0.0 {
            true => Duration::from_secs_f64(-left / rate),
            false => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_powers_of_1024_and_nonsense_is_refused() {
        assert_eq!(parse_rate("500K"), Ok(500 << 10));
        assert_eq!(parse_rate("20MiB"), Ok(20 << 20));
        assert_eq!(parse_rate("10m/s"), Ok(10 << 20));
        assert_eq!(parse_rate("2000"), Ok(2000));
        assert_eq!(parse_rate("off"), Ok(0));
        for bad in ["", "fast", "10X", "-1", "99999999999999999999G"] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_peer_takes_the_rule_naming_it_else_the_one_for_every_peer() {
        let rates =
            PeerRates::parse(&["2M node-b=512K".into(), "00000000000000cc=1K".into()]).unwrap();
        let peer = |name: &str, id: u64| Proven {
            node_id: NodeId(id),
            name: name.into(),
            not_after: std::time::SystemTime::UNIX_EPOCH,
        };
        assert_eq!(rates.rate_for(&peer("node-a", 1)), 2 << 20);
        assert_eq!(rates.rate_for(&peer("node-b", 2)), 512 << 10);
        assert_eq!(rates.rate_for(&peer("node-c", 0xcc)), 1 << 10);
        assert_eq!(PeerRates::parse(&[]).unwrap().rate_for(&peer("x", 1)), 0);
        for bad in ["fast", "=1M", "../x=1M", "node=fast"] {
            assert!(PeerRates::parse(&[bad.into()]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_bucket_lends_one_second_then_charges_at_the_rate() {
        let bucket = Bucket::default();
        let start = Instant::now();
        assert_eq!(bucket.take(1000.0, 1000.0, start), Duration::ZERO);
        let wait = bucket.take(1000.0, 500.0, start);
        assert_eq!(wait, Duration::from_millis(500));
        // After the debt is repaid and one second has passed, a full second is held.
        let later = start + Duration::from_secs(2);
        assert_eq!(bucket.take(1000.0, 1000.0, later), Duration::ZERO);
    }
}
