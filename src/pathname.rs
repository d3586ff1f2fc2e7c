//! Paths inside a volume: relative, `/`-separated, raw bytes.
//!
//! Linux file names are bytes, not text, so a [`VolPath`] keeps them exactly (a name
//! that is not UTF-8 is indexed and synced as is) and only [`VolPath::display`] escapes
//! them for people. Every path is validated when it is built: no empty, `.` or `..`
//! component, no NUL, no leading or doubled `/`. That keeps a path from the index or
//! from a peer from ever naming anything outside its volume.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The hidden directory at a volume's root that holds Shoal's own files; never synced.
pub const SHOAL_DIR: &[u8] = b".shoal";

/// Longest name Linux file systems accept.
pub const MAX_NAME_LEN: usize = 255;

/// Longest relative path we accept (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidPath {
    #[error("a file name may not be empty")]
    Empty,
    #[error("{0:?} is not allowed as a file name")]
    DotName(String),
    #[error("file name {0} contains a '/' or NUL byte")]
    BadByte(String),
    #[error("file name {0} is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong(String),
    #[error("path {0} is longer than {MAX_PATH_LEN} bytes")]
    PathTooLong(String),
}

/// Checks one path component.
pub fn validate_name(name: &[u8]) -> Result<(), InvalidPath> {
    match name {
        b"" => Err(InvalidPath::Empty),
        b"." | b".." => Err(InvalidPath::DotName(escape(name))),
        _ if name.len() > MAX_NAME_LEN => Err(InvalidPath::NameTooLong(escape(name))),
        _ if name.iter().any(|&b| b == b'/' || b == 0) => Err(InvalidPath::BadByte(escape(name))),
        _ => Ok(()),
    }
}

/// A validated path relative to a volume root; the root itself is the empty path.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VolPath(Vec<u8>);

impl VolPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// Parses `a/b/c`; rejects absolute paths, `..`, `.`, NUL and empty components.
    pub fn parse(bytes: &[u8]) -> Result<Self, InvalidPath> {
        if bytes.is_empty() {
            return Ok(Self::root());
        }
        if bytes.len() > MAX_PATH_LEN {
            return Err(InvalidPath::PathTooLong(escape(bytes)));
        }
        for name in bytes.split(|&b| b == b'/') {
            validate_name(name)?;
        }
        Ok(Self(bytes.to_vec()))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// This path with one more component.
    pub fn join(&self, name: &[u8]) -> Result<Self, InvalidPath> {
        validate_name(name)?;
        let mut bytes = Vec::with_capacity(self.0.len() + 1 + name.len());
        bytes.extend_from_slice(&self.0);
        if !bytes.is_empty() {
            bytes.push(b'/');
        }
        bytes.extend_from_slice(name);
        if bytes.len() > MAX_PATH_LEN {
            return Err(InvalidPath::PathTooLong(escape(&bytes)));
        }
        Ok(Self(bytes))
    }

    /// The parent directory and the last component; `None` for the root.
    pub fn split_last(&self) -> Option<(VolPath, &[u8])> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.iter().rposition(|&b| b == b'/') {
            Some(slash) => (VolPath(self.0[..slash].to_vec()), &self.0[slash + 1..]),
            None => (VolPath::root(), &self.0[..]),
        })
    }

    pub fn parent(&self) -> Option<VolPath> {
        self.split_last().map(|(parent, _)| parent)
    }

    /// Number of components (0 for the root).
    pub fn depth(&self) -> usize {
        if self.is_root() {
            0
        } else {
            1 + self.0.iter().filter(|&&b| b == b'/').count()
        }
    }

    /// Whether this path is strictly inside directory `dir`.
    pub fn is_below(&self, dir: &VolPath) -> bool {
        if dir.is_root() {
            return !self.is_root();
        }
        self.0.len() > dir.0.len() && self.0.starts_with(&dir.0) && self.0[dir.0.len()] == b'/'
    }

    /// The names from the root down, for example `a`, `b`, `c` for `a/b/c`.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|name| !name.is_empty())
    }

    /// Whether this path is Shoal's own directory or inside it.
    pub fn is_shoal_internal(&self) -> bool {
        self.0.split(|&b| b == b'/').next() == Some(SHOAL_DIR)
    }

    /// The file system path of this entry under `volume_root`.
    pub fn under(&self, volume_root: &Path) -> PathBuf {
        if self.is_root() {
            volume_root.to_path_buf()
        } else {
            volume_root.join(OsStr::from_bytes(&self.0))
        }
    }

    /// A printable form: UTF-8 as is, other bytes and control characters escaped.
    pub fn display(&self) -> Escaped<'_> {
        Escaped(&self.0)
    }
}

impl fmt::Debug for VolPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.display().to_string())
    }
}

/// Displays bytes as text, escaping what is not printable UTF-8 (`\xff`, `\n`).
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("/");
        }
        for piece in self.0.utf8_chunks() {
            for c in piece.valid().chars() {
                if c.is_control() || c == '\\' {
                    write!(f, "{}", c.escape_default())?;
                } else {
                    write!(f, "{c}")?;
                }
            }
            for byte in piece.invalid() {
                write!(f, "\\x{byte:02x}")?;
            }
        }
        Ok(())
    }
}

/// The escaped form of a byte string, for messages.
pub fn escape(bytes: &[u8]) -> String {
    Escaped(bytes).to_string()
}

/// The escaped form of `dir/name`, for messages; the name alone if the two do not make
/// a valid path (a message still says which name it is about).
pub fn escape_in(dir: &VolPath, name: &[u8]) -> String {
    dir.join(name)
        .map_or_else(|_| escape(name), |path| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_in_a_directory_is_shown_with_its_whole_path_escaped() {
        let dir = VolPath::parse(b"a/b").unwrap();
        assert_eq!(escape_in(&dir, b"c\n.txt"), "a/b/c\\n.txt");
        assert_eq!(escape_in(&VolPath::root(), b"f.txt"), "f.txt");
        // A name that would not make a path is still shown, alone.
        assert_eq!(escape_in(&dir, b".."), "..");
    }

    #[test]
    fn parses_and_splits() {
        let path = VolPath::parse(b"a/b/c.txt").unwrap();
        let (parent, name) = path.split_last().unwrap();
        assert_eq!(parent, VolPath::parse(b"a/b").unwrap());
        assert_eq!(name, b"c.txt");
        assert_eq!(path.depth(), 3);
        assert_eq!(VolPath::root().depth(), 0);
        assert_eq!(VolPath::root().join(b"x").unwrap().as_bytes(), b"x");
        assert_eq!(
            VolPath::parse(b"x").unwrap().split_last().unwrap().0,
            VolPath::root()
        );
    }

    #[test]
    fn rejects_escapes() {
        for bad in [
            &b"/abs"[..],
            b"../../etc/passwd",
            b"a/../b",
            b"a//b",
            b"a/./b",
            b"a/",
            b"nul\0byte",
        ] {
            assert!(VolPath::parse(bad).is_err(), "{:?} accepted", escape(bad));
        }
        assert!(VolPath::root().join(b"a/b").is_err());
        assert!(VolPath::root().join(b"..").is_err());
        assert!(VolPath::parse(&vec![b'a'; 256]).is_err());
    }

    #[test]
    fn displays_non_utf8_escaped() {
        let path = VolPath::parse(b"caf\xe9/new\nline").unwrap();
        assert_eq!(path.display().to_string(), "caf\\xe9/new\\nline");
        assert_eq!(
            VolPath::parse("été".as_bytes())
                .unwrap()
                .display()
                .to_string(),
            "été"
        );
    }

    #[test]
    fn knows_what_is_below_a_directory() {
        let path = |p: &str| VolPath::parse(p.as_bytes()).unwrap();
        assert!(path("a/b").is_below(&path("a")));
        assert!(path("a").is_below(&VolPath::root()));
        assert!(!path("ab/c").is_below(&path("a")));
        assert!(!path("a").is_below(&path("a")));
        assert!(!VolPath::root().is_below(&VolPath::root()));
        let abc = path("a/b/c");
        let names: Vec<&[u8]> = abc.components().collect();
        assert_eq!(names, [b"a", b"b", b"c"]);
        assert_eq!(VolPath::root().components().count(), 0);
    }

    #[test]
    fn knows_its_own_directory() {
        assert!(
            VolPath::parse(b".shoal/staging/x")
                .unwrap()
                .is_shoal_internal()
        );
        assert!(!VolPath::parse(b"data/.shoal").unwrap().is_shoal_internal());
    }
}
