//! Retention: which kept versions a volume drops, given the time, the versions and the
//! volume's policy. [`decide`] is a pure function (no clock, no store, no file system):
//! the garbage collector (`crate::gc`) feeds it a volume's version records and removes
//! the records it names, and the chunks no record or live file references then go.
//!
//! A policy has three parts, applied in this order (README "Versions", docs/OPERATIONS.md
//! "Retention"):
//!
//! 1. **Keep for** a duration: a version replaced longer ago than that is dropped.
//! 2. **Staggered thinning** (like Syncthing's "staggered" versioning): each version's
//!    age puts it in a class, and each class cuts time into buckets aligned to the Unix
//!    epoch (UTC). Per path and per bucket, only the newest version is kept:
//!
//!    | age (now - replaced at) | bucket width | kept                        |
//!    |-------------------------|--------------|-----------------------------|
//!    | under 1 hour            | none         | every version               |
//!    | 1 hour to 1 day         | 1 hour       | the newest of each hour     |
//!    | 1 day to 30 days        | 1 day        | the newest of each UTC day  |
//!    | 30 days and more        | 1 week       | the newest of each week     |
//!
//!    A path's newest version is always the newest of its bucket: thinning never drops it.
//! 3. **A byte budget** (absolute, or a percent of the file system's size): while the
//!    versions left after 1 and 2 hold more bytes than the budget, the oldest goes first
//!    (by replaced-at time, then path, then record sequence, so the choice is
//!    deterministic), whatever its path.
//!
//! The same inputs give the same decision whatever their order.

use std::collections::BTreeMap;
use std::time::Duration;

/// Nanoseconds in one hour, one day, one week.
const HOUR_NS: i64 = 3_600 * 1_000_000_000;
const DAY_NS: i64 = 24 * HOUR_NS;
const WEEK_NS: i64 = 7 * DAY_NS;
/// Versions younger than this are all kept by thinning.
const KEEP_ALL_NS: i64 = HOUR_NS;
/// Age at which thinning goes from one per hour to one per day.
const HOURLY_UNTIL_NS: i64 = DAY_NS;
/// Age at which thinning goes from one per day to one per week.
const DAILY_UNTIL_NS: i64 = 30 * DAY_NS;

/// The default keep-for duration (as `--tombstone-days`' default: a month).
pub const DEFAULT_KEEP_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// The default byte budget: a tenth of the file system.
pub const DEFAULT_BUDGET: Budget = Budget::Percent(10);

/// How much room a volume's versions may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// No limit but keep-for and thinning.
    Unlimited,
    Bytes(u64),
    /// A percent (1 to 100) of the size of the file system the volume is on.
    Percent(u8),
}

impl Budget {
    /// `off`, a size (`50GiB`, `500M`, `1T`, `2048`: powers of 1024) or a percent of the
    /// file system (`10%`).
    pub fn parse(text: &str) -> Result<Budget, String> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("off") {
            return Ok(Budget::Unlimited);
        }
        if let Some(percent) = t.strip_suffix('%') {
            return match percent.trim().parse::<u8>() {
                Ok(p @ 1..=100) => Ok(Budget::Percent(p)),
                _ => Err(format!(
                    "invalid budget {text:?}: a percent is 1% to 100% of the file system"
                )),
            };
        }
        crate::rate::parse_bytes(t).map(Budget::Bytes).map_err(|_| {
            format!("invalid budget {text:?}: a size (50GiB, 500M: powers of 1024), a percent of the file system (10%) or off")
        })
    }

    /// The budget in bytes on a file system of `fs_bytes`; `None`: no limit.
    pub fn limit(self, fs_bytes: u64) -> Option<u64> {
        match self {
            Budget::Unlimited => None,
            Budget::Bytes(n) => Some(n),
            Budget::Percent(p) => Some((u128::from(fs_bytes) * u128::from(p) / 100) as u64),
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Unlimited => write!(f, "off"),
            Budget::Bytes(n) => write!(f, "{n}"),
            Budget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A volume's retention policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Versions replaced longer ago than this are dropped; zero keeps none.
    pub keep_for: Duration,
    /// Staggered thinning on or off (off: every version is kept until keep-for ends).
    pub thin: bool,
    pub budget: Budget,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            keep_for: DEFAULT_KEEP_FOR,
            thin: true,
            budget: DEFAULT_BUDGET,
        }
    }
}

/// A duration as given: a number and a unit, `s`, `m`, `h`, `d` or `w` (`90s`, `15m`,
/// `12h`, `30d`, `4w`); `0` keeps nothing.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let error = || {
        format!("invalid duration {text:?}: a number and a unit s, m, h, d or w (90s, 12h, 30d)")
    };
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let scale: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(error()),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        // Beyond what a nanosecond i64 time can hold, a duration means "for ever".
        .map(|secs| Duration::from_secs(secs.min(i64::MAX as u64 / 1_000_000_000)))
        .ok_or_else(error)
}

/// One kept version, as [`decide`] needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// The volume-relative path it was a version of.
    pub path: Vec<u8>,
    /// When it was replaced (or deleted), ns since the Unix epoch, local time.
    pub replaced_at: i64,
    /// Tells apart versions of one path replaced at the same time (the record's own
    /// sequence number).
    pub seq: u64,
    /// The bytes it holds in packs (chunks shared with other versions counted in each).
    pub bytes: u64,
}

/// Why a version is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// Replaced longer ago than keep-for.
    Expired,
    /// Not the newest of its thinning bucket.
    Thinned,
    /// Among the oldest while the versions held more bytes than the budget.
    OverBudget,
}

/// Which of `versions` to drop at `now` (ns since the Unix epoch) under `policy` on a
/// file system of `fs_bytes`: indexes into `versions`, in increasing order, each with
/// its reason. Every other version is kept.
pub fn decide(
    now: i64,
    versions: &[Version],
    policy: &Policy,
    fs_bytes: u64,
) -> Vec<(usize, Reason)> {
    let keep_for = i64::try_from(policy.keep_for.as_nanos()).unwrap_or(i64::MAX);
    let age = |v: &Version| now.saturating_sub(v.replaced_at).max(0);
    let mut dropped: BTreeMap<usize, Reason> = BTreeMap::new();
    // Newest first within a path, so the first version seen in a bucket is its newest.
    let mut order: Vec<usize> = (0..versions.len()).collect();
    order.sort_by(|&a, &b| {
        let (va, vb) = (&versions[a], &versions[b]);
        (&va.path, vb.replaced_at, vb.seq, vb.bytes).cmp(&(
            &vb.path,
            va.replaced_at,
            va.seq,
            va.bytes,
        ))
    });
    let mut seen_buckets: std::collections::HashSet<(&[u8], u8, i64)> = Default::default();
    for &i in &order {
        let v = &versions[i];
        let age = age(v);
        if age > keep_for || keep_for == 0 {
            dropped.insert(i, Reason::Expired);
            continue;
        }
        if !policy.thin || age < KEEP_ALL_NS {
            continue;
        }
        let (class, width) = if age < HOURLY_UNTIL_NS {
            (1, HOUR_NS)
        } else if age < DAILY_UNTIL_NS {
            (2, DAY_NS)
        } else {
            (3, WEEK_NS)
        };
        if !seen_buckets.insert((&v.path, class, v.replaced_at.div_euclid(width))) {
            dropped.insert(i, Reason::Thinned);
        }
    }
    if let Some(limit) = policy.budget.limit(fs_bytes) {
        let mut kept: Vec<usize> = (0..versions.len())
            .filter(|i| !dropped.contains_key(i))
            .collect();
        let mut total: u128 = kept.iter().map(|&i| u128::from(versions[i].bytes)).sum();
        // Oldest first.
        kept.sort_by(|&a, &b| {
            let (va, vb) = (&versions[a], &versions[b]);
            (va.replaced_at, &va.path, va.seq, va.bytes).cmp(&(
                vb.replaced_at,
                &vb.path,
                vb.seq,
                vb.bytes,
            ))
        });
        for i in kept {
            if total <= u128::from(limit) {
                break;
            }
            total -= u128::from(versions[i].bytes);
            dropped.insert(i, Reason::OverBudget);
        }
    }
    dropped.into_iter().collect()
}

/// One policy setting per volume: a rule for every volume, and rules naming one.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rules<T> {
    every: Option<T>,
    volumes: BTreeMap<String, T>,
}

impl<T> Default for Rules<T> {
    fn default() -> Self {
        Rules {
            every: None,
            volumes: BTreeMap::new(),
        }
    }
}

impl<T: Copy> Rules<T> {
    /// `VALUE` (every volume) or `VOLUME=VALUE`, each string possibly several rules
    /// separated by spaces.
    fn parse(rules: &[String], value: fn(&str) -> Result<T, String>) -> Result<Self, String> {
        let mut out = Rules::default();
        for rule in rules.iter().flat_map(|r| r.split_whitespace()) {
            match rule.split_once('=') {
                Some((volume, v)) => {
                    crate::config::validate_volume_name(volume).map_err(|e| e.to_string())?;
                    out.volumes.insert(volume.to_string(), value(v)?);
                }
                None => out.every = Some(value(rule)?),
            }
        }
        Ok(out)
    }

    fn get(&self, volume: &str) -> Option<T> {
        self.volumes.get(volume).copied().or(self.every)
    }
}

/// The retention settings of every volume (`--keep-versions`, `--thin-versions`,
/// `--versions-budget`, their environment variables and config file keys).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    keep_for: Rules<Duration>,
    thin: Rules<bool>,
    budget: Rules<Budget>,
}

/// The rules as given, one list per setting (each list from the flags or environment if
/// given there, else from the config file).
#[derive(Clone, Debug, Default)]
pub struct RetentionRules {
    pub keep_versions: Vec<String>,
    pub thin_versions: Vec<String>,
    pub versions_budget: Vec<String>,
}

impl Retention {
    pub fn parse(rules: &RetentionRules) -> Result<Retention, String> {
        let on_off = |t: &str| match t.to_ascii_lowercase().as_str() {
            "on" | "true" | "yes" | "1" => Ok(true),
            "off" | "false" | "no" | "0" => Ok(false),
            _ => Err(format!("invalid thinning {t:?}: on or off")),
        };
        Ok(Retention {
            keep_for: Rules::parse(&rules.keep_versions, parse_duration)
                .map_err(|e| format!("--keep-versions: {e}"))?,
            thin: Rules::parse(&rules.thin_versions, on_off)
                .map_err(|e| format!("--thin-versions: {e}"))?,
            budget: Rules::parse(&rules.versions_budget, Budget::parse)
                .map_err(|e| format!("--versions-budget: {e}"))?,
        })
    }

    /// The policy of `volume`: per setting, the rule naming it, else the rule for every
    /// volume, else the default.
    pub fn policy(&self, volume: &str) -> Policy {
        let default = Policy::default();
        Policy {
            keep_for: self.keep_for.get(volume).unwrap_or(default.keep_for),
            thin: self.thin.get(volume).unwrap_or(default.thin),
            budget: self.budget.get(volume).unwrap_or(default.budget),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN_NS: i64 = 60 * 1_000_000_000;
    /// A "now" well past the epoch, at the start of a UTC day and week boundary-free.
    const NOW: i64 = 1_764_547_200 * 1_000_000_000;

    fn version(path: &str, ago: i64, seq: u64, bytes: u64) -> Version {
        Version {
            path: path.as_bytes().to_vec(),
            replaced_at: NOW - ago,
            seq,
            bytes,
        }
    }

    fn policy(keep_for: Duration, thin: bool, budget: Budget) -> Policy {
        Policy {
            keep_for,
            thin,
            budget,
        }
    }

    #[test]
    fn parses_durations_budgets_and_per_volume_rules() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(14 * 86_400)
        );
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "5", "3y", "-1d", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Budget::parse("50GiB").unwrap(), Budget::Bytes(50 << 30));
        assert_eq!(Budget::parse("10%").unwrap(), Budget::Percent(10));
        assert_eq!(Budget::parse("off").unwrap(), Budget::Unlimited);
        for bad in ["0%", "101%", "lots", "-5M"] {
            assert!(Budget::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Budget::Percent(10).limit(1000), Some(100));
        let retention = Retention::parse(&RetentionRules {
            keep_versions: vec!["7d media=1h".into()],
            thin_versions: vec!["small=off".into()],
            versions_budget: vec!["media=1G".into()],
        })
        .unwrap();
        let media = retention.policy("media");
        assert_eq!(
            media,
            policy(Duration::from_secs(3600), true, Budget::Bytes(1 << 30))
        );
        let small = retention.policy("small");
        assert_eq!(
            small,
            policy(Duration::from_secs(7 * 86_400), false, DEFAULT_BUDGET)
        );
        assert_eq!(Retention::default().policy("x"), Policy::default());
        assert!(
            Retention::parse(&RetentionRules {
                keep_versions: vec!["../x=1d".into()],
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn versions_older_than_keep_for_expire() {
        let versions = [
            version("a", 30 * MIN_NS, 1, 10),
            version("a", 3 * HOUR_NS, 2, 10),
        ];
        let p = policy(Duration::from_secs(2 * 3600), false, Budget::Unlimited);
        assert_eq!(decide(NOW, &versions, &p, 0), [(1, Reason::Expired)]);
        let none = policy(Duration::ZERO, true, Budget::Unlimited);
        assert_eq!(
            decide(NOW, &versions, &none, 0),
            [(0, Reason::Expired), (1, Reason::Expired)]
        );
    }

    #[test]
    fn thinning_keeps_every_version_of_the_last_hour_then_one_per_bucket() {
        // Every 10 minutes for three days on one path: the first hour keeps all six,
        // each older hour of the first day one, each older day one.
        let versions: Vec<Version> = (0..3 * 24 * 6)
            .map(|i| version("f", (i + 1) * 10 * MIN_NS - 1, i as u64, 1))
            .collect();
        let p = policy(DEFAULT_KEEP_FOR, true, Budget::Unlimited);
        let dropped = decide(NOW, &versions, &p, 0);
        assert!(dropped.iter().all(|(_, r)| *r == Reason::Thinned));
        let kept: Vec<i64> = (0..versions.len())
            .filter(|i| !dropped.iter().any(|(d, _)| d == i))
            .map(|i| NOW - versions[i].replaced_at)
            .collect();
        let under = |limit: i64| kept.iter().filter(|&&age| age < limit).count();
        assert_eq!(under(HOUR_NS), 6);
        // NOW is at a UTC midnight: hours 1..24 ago are 23 whole hour buckets.
        assert_eq!(under(DAY_NS) - under(HOUR_NS), 23);
        // Two whole UTC days before that (the third's last version is past the end).
        assert_eq!(kept.len() - under(DAY_NS), 2);
        // The newest version is kept.
        assert_eq!(kept.iter().min(), Some(&(10 * MIN_NS - 1)));
    }

    #[test]
    fn over_budget_the_oldest_go_first_whatever_their_path() {
        let versions = [
            version("a", 5 * MIN_NS, 1, 100),
            version("b", 4 * MIN_NS, 2, 100),
            version("a", 3 * MIN_NS, 3, 100),
            version("c", MIN_NS, 4, 100),
        ];
        let p = policy(DEFAULT_KEEP_FOR, true, Budget::Bytes(250));
        assert_eq!(
            decide(NOW, &versions, &p, 0),
            [(0, Reason::OverBudget), (1, Reason::OverBudget)]
        );
        let p = policy(DEFAULT_KEEP_FOR, true, Budget::Percent(10));
        assert_eq!(decide(NOW, &versions, &p, 4000).len(), 0);
        assert_eq!(decide(NOW, &versions, &p, 3000).len(), 1);
    }

    fn arb_versions() -> impl Strategy<Value = Vec<Version>> {
        prop::collection::vec((0u8..4, 0i64..(60 * DAY_NS), 0u64..4, 0u64..1000), 0..60).prop_map(
            |raw| {
                raw.into_iter()
                    .map(|(p, ago, seq, bytes)| version(&format!("p{p}"), ago, seq, bytes))
                    .collect()
            },
        )
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (
            0u64..(70 * 86_400),
            any::<bool>(),
            prop_oneof![
                Just(Budget::Unlimited),
                (0u64..20_000).prop_map(Budget::Bytes),
                (1u8..=100).prop_map(Budget::Percent)
            ],
        )
            .prop_map(|(secs, thin, budget)| policy(Duration::from_secs(secs), thin, budget))
    }

    proptest! {
        #[test]
        fn decisions_are_deterministic_bounded_and_keep_each_newest_version(
            versions in arb_versions(),
            p in arb_policy(),
            fs in 0u64..100_000,
            rotate in 0usize..60,
        ) {
            let dropped = decide(NOW, &versions, &p, fs);
            let is_dropped = |i: usize| dropped.iter().any(|(d, _)| *d == i);
            // Deterministic whatever the order of the input.
            let mut shuffled: Vec<(usize, Version)> = versions.iter().cloned().enumerate().collect();
            if !shuffled.is_empty() {
                let n = rotate % shuffled.len();
                shuffled.rotate_left(n);
                shuffled.reverse();
            }
            let plain: Vec<Version> = shuffled.iter().map(|(_, v)| v.clone()).collect();
            let mut again: Vec<(usize, Reason)> = decide(NOW, &plain, &p, fs)
                .into_iter()
                .map(|(i, r)| (shuffled[i].0, r))
                .collect();
            again.sort();
            // Versions equal in every field may swap which one goes: compare as multisets.
            let key = |i: usize, r: Reason| (versions[i].clone().path, versions[i].replaced_at, versions[i].seq, versions[i].bytes, r);
            let mut a: Vec<_> = dropped.iter().map(|&(i, r)| key(i, r)).collect();
            let mut b: Vec<_> = again.iter().map(|&(i, r)| key(i, r)).collect();
            a.sort();
            b.sort();
            prop_assert_eq!(a, b);
            // The budget is respected.
            let kept_bytes: u64 = (0..versions.len()).filter(|&i| !is_dropped(i)).map(|i| versions[i].bytes).sum();
            if let Some(limit) = p.budget.limit(fs) {
                prop_assert!(kept_bytes <= limit);
            }
            // Within keep-for and budget, the newest version of each path is kept.
            let keep_for = p.keep_for.as_nanos() as i64;
            let in_time: u64 = versions.iter().filter(|v| NOW - v.replaced_at <= keep_for).map(|v| v.bytes).sum();
            let within_budget = p.budget.limit(fs).is_none_or(|l| in_time <= l);
            for (i, v) in versions.iter().enumerate() {
                let newest = versions.iter().all(|w| w.path != v.path || (w.replaced_at, w.seq) <= (v.replaced_at, v.seq));
                if newest && keep_for > 0 && NOW - v.replaced_at <= keep_for && within_budget {
                    prop_assert!(!is_dropped(i), "newest version {:?} dropped", v);
                }
            }
            // What the budget drops is older than everything it keeps.
            for &(i, r) in &dropped {
                if r == Reason::OverBudget {
                    for k in (0..versions.len()).filter(|&k| !is_dropped(k)) {
                        prop_assert!(versions[i].replaced_at <= versions[k].replaced_at);
                    }
                }
            }
        }
    }
}
