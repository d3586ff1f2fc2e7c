//! Per-volume access: which nodes may hold which volume.
//!
//! A volume with no rule may be held by every member. A volume with a rule may be held
//! only by the nodes it lists, each by name (its certificate's common name) or by its
//! 16-hex-digit node id. Given as `--access VOLUME=NODE,NODE` (repeatable),
//! `SHOAL_ACCESS="VOLUME=NODE,NODE VOLUME2=..."` or in the config file:
//!
//! ```toml
//! [access]
//! private = ["node-a", "node-b"]
//! ```
//!
//! A node applies its rules to its peers as their certificates prove them: a peer that
//! may not hold a volume gets an error for every request on it, is served no chunk
//! that only that volume holds, and nothing it offers for the volume is pulled. Every
//! member should have the same rules; a node's rules do not stop the node itself.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::ConfigError;
use crate::identity::Proven;

/// The access rules of one node, by volume name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    rules: BTreeMap<String, BTreeSet<String>>,
}

impl Access {
    /// Rules from `VOLUME=NODE,NODE` texts, then `file`'s table for volumes the texts
    /// do not name.
    pub fn resolve(
        given: &[String],
        file: Option<BTreeMap<String, Vec<String>>>,
    ) -> Result<Self, ConfigError> {
        let mut rules: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for text in given.iter().flat_map(|t| t.split_whitespace()) {
            let (volume, nodes) = text
                .split_once('=')
                .ok_or_else(|| ConfigError::Access(format!("{text:?} is not VOLUME=NODE,NODE")))?;
            rules.insert(
                volume.to_string(),
                nodes.split(',').map(str::to_string).collect(),
            );
        }
        for (volume, nodes) in file.unwrap_or_default() {
            rules
                .entry(volume)
                .or_insert_with(|| nodes.into_iter().collect());
        }
        for (volume, nodes) in &mut rules {
            crate::config::validate_volume_name(volume)?;
            nodes.retain(|n| !n.trim().is_empty());
            if let Some(bad) = nodes.iter().find(|n| !crate::identity::is_node_name(n)) {
                return Err(ConfigError::Access(format!(
                    "volume {volume}: {bad:?} is not a node name or id"
                )));
            }
        }
        Ok(Access { rules })
    }

    /// Whether `node` may hold `volume`.
    pub fn allows(&self, volume: &str, node: &Proven) -> bool {
        self.rules.get(volume).is_none_or(|nodes| {
            nodes.contains(&node.name) || nodes.contains(&node.node_id.to_string())
        })
    }

    /// Whether any volume has a rule (if none, every check passes).
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, for the log.
    pub fn describe(&self) -> String {
        self.rules
            .iter()
            .map(|(volume, nodes)| {
                format!(
                    "{volume}: {}",
                    nodes.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::NodeId;

    fn node(name: &str, id: u64) -> Proven {
        Proven {
            node_id: NodeId(id),
            name: name.into(),
            not_after: std::time::UNIX_EPOCH,
        }
    }

    #[test]
    fn listed_nodes_by_name_or_id_may_hold_a_volume_and_others_not() {
        let file = BTreeMap::from([
            ("private".to_string(), vec!["ignored".to_string()]),
            ("team".to_string(), vec!["c".to_string()]),
        ]);
        let access =
            Access::resolve(&["private=a,00000000000000bb".to_string()], Some(file)).unwrap();
        assert!(access.allows("private", &node("a", 1)));
        assert!(access.allows("private", &node("b", 0xbb)));
        assert!(!access.allows("private", &node("c", 3)));
        assert!(!access.allows("private", &node("ignored", 4)));
        assert!(access.allows("team", &node("c", 3)));
        assert!(access.allows("public", &node("c", 3)));
        assert!(!access.is_open());
        assert!(Access::resolve(&[], None).unwrap().is_open());
    }

    #[test]
    fn malformed_rules_are_refused() {
        for bad in ["private", "../x=a", "private=-a"] {
            assert!(Access::resolve(&[bad.to_string()], None).is_err(), "{bad}");
        }
    }
}
