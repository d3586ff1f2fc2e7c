//! Settings, resolved in one place: flags > environment > TOML file > defaults.
//!
//! Flags and environment variables are read by `clap` (each flag names its variable in
//! `--help`); this module adds the optional TOML file (`--config FILE` or
//! `SHOAL_CONFIG`) and the defaults, and validates what it resolves.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::chunking::ChunkParams;

pub const DEFAULT_DATA_ROOT: &str = "/srv/shoal/volumes";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/shoal";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "invalid volume name {0:?}: a volume name starts with a letter or digit and holds only letters, digits, '_', '.' and '-' (as Docker's)"
    )]
    VolumeName(String),
    #[error(
        "no volumes given: name them with --volume NAME (repeatable), SYNC_VOLUMES=\"a b\" or `volumes = [...]` in the config file"
    )]
    NoVolumes,
    #[error("invalid chunk sizes: {0}")]
    ChunkSizes(String),
    #[error("invalid access rule: {0}")]
    Access(String),
    #[error("invalid delete guard rule: {0}")]
    DeleteGuard(String),
}

/// The TOML config file. Every key is optional; the same names as the long flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub data_root: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub volumes: Option<Vec<String>>,
    pub chunk_sizes: Option<String>,
    /// `shoal serve` only, like the flags of the same names.
    pub mode: Option<String>,
    pub peers: Option<Vec<String>>,
    pub heartbeat: Option<u64>,
    pub docker_socket: Option<String>,
    pub require_mounts: Option<bool>,
    /// Which nodes may hold each volume (`crate::access`).
    pub access: Option<std::collections::BTreeMap<String, Vec<String>>>,
    pub keep_setid: Option<Vec<String>>,
    /// `--delete-guard` rules: `THRESHOLD` or `VOLUME=THRESHOLD` (`crate::guard`).
    pub delete_guard: Option<Vec<String>>,
    /// `shoal serve --max-rate`.
    pub max_rate: Option<String>,
    /// `shoal serve --max-rate-peer`: `RATE` or `NODE=RATE` rules.
    pub max_rate_peer: Option<Vec<String>>,
    /// `--keep-versions`, `--thin-versions`, `--versions-budget`: `VALUE` or
    /// `VOLUME=VALUE` rules (`crate::retention`).
    pub keep_versions: Option<Vec<String>>,
    pub thin_versions: Option<Vec<String>>,
    pub versions_budget: Option<Vec<String>>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// Docker's volume name rule: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
pub fn validate_volume_name(name: &str) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name.len() <= 255;
    if ok {
        Ok(())
    } else {
        Err(ConfigError::VolumeName(name.to_string()))
    }
}

/// Where volumes and the store are, and which volumes to work on.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_root: PathBuf,
    pub state_dir: PathBuf,
    /// Validated and de-duplicated, in the order given; may be empty.
    pub volumes: Vec<String>,
    pub chunk_params: Option<ChunkParams>,
    /// Volumes whose files received from peers keep their setuid and setgid bits (by
    /// default they are cleared: one stolen node key must not plant setuid binaries).
    pub keep_setid: Vec<String>,
    /// Each volume's delete guard threshold (`crate::guard`).
    pub delete_guard: crate::guard::Rules,
}

impl Settings {
    /// Merges flag/environment values (`None`/empty when not given) over the file.
    pub fn resolve(
        file: FileConfig,
        data_root: Option<PathBuf>,
        state_dir: Option<PathBuf>,
        volumes: Vec<String>,
        chunk_sizes: Option<String>,
    ) -> Result<Self, ConfigError> {
        // SYNC_VOLUMES="" or stray spaces give empty names: they name nothing.
        let given: Vec<String> = volumes
            .into_iter()
            .filter(|v| !v.trim().is_empty())
            .collect();
        let mut names = Vec::new();
        for name in if given.is_empty() {
            file.volumes.unwrap_or_default()
        } else {
            given
        } {
            validate_volume_name(&name)?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let keep_setid = file.keep_setid.clone().unwrap_or_default();
        for name in &keep_setid {
            validate_volume_name(name)?;
        }
        let delete_guard = crate::guard::Rules::parse(&file.delete_guard.unwrap_or_default())
            .map_err(ConfigError::DeleteGuard)?;
        let chunk_params = chunk_sizes
            .or(file.chunk_sizes)
            .map(|text| ChunkParams::parse(&text).map_err(ConfigError::ChunkSizes))
            .transpose()?;
        Ok(Settings {
            data_root: data_root
                .or(file.data_root)
                .unwrap_or_else(|| DEFAULT_DATA_ROOT.into()),
            state_dir: state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            volumes: names,
            chunk_params,
            keep_setid,
            delete_guard,
        })
    }

    pub fn volume_dir(&self, name: &str) -> PathBuf {
        self.data_root.join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file: FileConfig = toml::from_str(
            "data-root = \"/file\"\nvolumes = [\"a\", \"b\"]\nchunk-sizes = \"16K/64K/256K\"",
        )
        .unwrap();
        let s = Settings::resolve(file, Some("/flag".into()), None, vec![], None).unwrap();
        assert_eq!(s.data_root, PathBuf::from("/flag"));
        assert_eq!(s.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(s.volumes, ["a", "b"]);
        assert_eq!(s.chunk_params, Some(ChunkParams::DEFAULT));
        let s = Settings::resolve(
            FileConfig::default(),
            None,
            None,
            vec!["x".into(), "".into(), "x".into()],
            None,
        )
        .unwrap();
        assert_eq!(s.volumes, ["x"]);
    }

    #[test]
    fn bad_names_and_keys_are_refused() {
        for bad in ["", "../etc", "a/b", "-x", "with space"] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_volume_name("media_2.v-1").is_ok());
        assert!(toml::from_str::<FileConfig>("data_rot = \"/x\"").is_err());
        let serve: FileConfig = toml::from_str(
            "mode = \"docker\"\nheartbeat = 5\npeers = [\"a:7029\"]\nrequire-mounts = true",
        )
        .unwrap();
        assert_eq!(serve.mode.as_deref(), Some("docker"));
        assert_eq!(serve.heartbeat, Some(5));
        let retention: FileConfig = toml::from_str(
            "keep-versions = [\"30d\", \"media=7d\"]\nthin-versions = [\"off\"]\nversions-budget = [\"10%\"]",
        )
        .unwrap();
        assert_eq!(
            retention.keep_versions,
            Some(vec!["30d".to_string(), "media=7d".to_string()])
        );
        let guarded: FileConfig =
            toml::from_str("volumes = [\"a\"]\ndelete-guard = [\"80%/5\", \"a=off\"]").unwrap();
        let s = Settings::resolve(guarded, None, None, vec![], None).unwrap();
        assert_eq!(s.delete_guard.for_volume("a"), crate::guard::Policy::Off);
        let bad: FileConfig = toml::from_str("delete-guard = [\"lots\"]").unwrap();
        assert!(Settings::resolve(bad, None, None, vec![], None).is_err());
    }
}
