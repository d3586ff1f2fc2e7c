//! The node's bandwidth limit (`--max-rate`, `shoal set max-rate`): a token bucket for
//! chunk bytes sent and one for chunk bytes received, both at the same rate. Control
//! messages (tree pages, entries, chunk lists) bypass it: a capped node still compares
//! trees at full speed and spends its budget on data.
//!
//! Each bucket holds at most one second of the rate. A chunk larger than what the
//! bucket holds is let through once its bytes are paid for: the bucket goes into debt
//! and the next chunk waits until the debt is repaid, so over any stretch the bytes
//! passed stay within one second's worth of `rate × time`. The rate can change at
//! any time; the next chunk pays at the new rate.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A rate in bytes per second, as given: `500K`, `10M`, `20MiB`, `1G`, `2000` (bytes);
/// K, M, G are powers of 1024 (`KiB`, `MiB`, `GiB` the same); a trailing `/s` is
/// allowed; `0` or `off` is no limit.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    if t.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        _ => return Err(rate_error(text)),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| rate_error(text))
}

fn rate_error(text: &str) -> String {
    format!(
        "invalid rate {text:?}: bytes per second, e.g. 500K, 10M, 20MiB, 1G (powers of 1024) or 0/off for no limit"
    )
}

/// The limit and its two buckets.
#[derive(Debug, Default)]
pub struct RateLimit {
    /// Bytes per second; 0: no limit.
    rate: AtomicU64,
    sent: Bucket,
    received: Bucket,
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

    /// Waits until `bytes` of chunk data may go `direction`.
    pub async fn pass(&self, direction: Direction, bytes: usize) {
        let rate = self.rate();
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
