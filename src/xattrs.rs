//! Extended attributes and POSIX ACLs: which of a file's attributes sync, reading them
//! through a descriptor, and setting exactly them on a staged file or a directory.
//!
//! What syncs: `user.*` always; `security.*` and `trusted.*` when this node runs as root
//! (only root may set them, and only root sees `trusted.*`); and POSIX ACLs, which the
//! kernel exposes as the attributes `system.posix_acl_access` and
//! `system.posix_acl_default` and which are kept as those raw bytes (no libacl). Other
//! `system.*` attributes belong to the file system. Regular files and directories carry
//! attributes; symlinks and FIFOs sync without them (Linux allows no `user.*` there).
//!
//! Bounded (invariant 9): an entry holds at most [`MAX_XATTR_BYTES`] of names and
//! values together, names of at most [`MAX_XATTR_NAME`] bytes, sorted and unique. A file
//! with more is indexed without its attributes, and the scan says so.
//!
//! Setting is exact: what the entry lists is set and any other attribute of a synced
//! namespace is removed (a staged file inherits the staging directory's default ACL).
//! What cannot be set (a file system without ACL or xattr support, a namespace this node
//! may not write) is returned to the caller, which reports it once per volume; an
//! access ACL that cannot be set never widens access, see [`narrowed_mode`].

use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use crate::encoding::{DecodeError, Reader, put_short_bytes};

/// Most bytes of names and values one entry's attributes may take.
pub const MAX_XATTR_BYTES: usize = 64 << 10;

/// Longest attribute name (Linux's `XATTR_NAME_MAX`).
pub const MAX_XATTR_NAME: usize = 255;

/// The ACL attributes (Linux's names for what `setfacl` writes).
pub const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
pub const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";

/// Reads of a file's attributes that may race with a writer before giving up.
const READ_ATTEMPTS: usize = 3;

/// A file's synced attributes, sorted by name, names unique.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Xattrs(Vec<(Vec<u8>, Vec<u8>)>);

/// Why a set of attributes is refused (from a peer, from the store, or read from disk).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XattrError {
    #[error("extended attributes of {0} bytes (at most {MAX_XATTR_BYTES})")]
    TooLarge(usize),
    #[error("extended attribute name {0:?} is not one that syncs")]
    Name(String),
    #[error("extended attributes not sorted by name, or a name repeated")]
    NotCanonical,
    #[error("{0}")]
    Io(String),
}

/// Which namespaces this node reads and writes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Namespaces {
    /// `user.*` and ACLs.
    User,
    /// Those, and `security.*` and `trusted.*` (running as root).
    All,
}

impl Namespaces {
    /// The namespaces a process with this effective uid handles.
    pub fn for_this_process() -> Namespaces {
        match rustix::process::geteuid().is_root() {
            true => Namespaces::All,
            false => Namespaces::User,
        }
    }

    fn includes(self, name: &[u8]) -> bool {
        name.starts_with(b"user.")
            || name == ACL_ACCESS
            || name == ACL_DEFAULT
            || (self == Namespaces::All
                && (name.starts_with(b"security.") || name.starts_with(b"trusted.")))
    }
}

/// Whether `name` may appear in an entry at all (any namespace that syncs anywhere).
fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_XATTR_NAME
        && !name.contains(&0)
        && Namespaces::All.includes(name)
}

impl Xattrs {
    /// Attributes exactly as an entry must hold them: valid names, sorted, unique, and
    /// at most [`MAX_XATTR_BYTES`] in all.
    pub fn try_canonical(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<Xattrs, XattrError> {
        let bytes: usize = pairs.iter().map(|(n, v)| n.len() + v.len()).sum();
        if bytes > MAX_XATTR_BYTES {
            return Err(XattrError::TooLarge(bytes));
        }
        if let Some((name, _)) = pairs.iter().find(|(n, _)| !valid_name(n)) {
            return Err(XattrError::Name(String::from_utf8_lossy(name).into_owned()));
        }
        if pairs.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(XattrError::NotCanonical);
        }
        Ok(Xattrs(pairs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn pairs(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.0
    }

    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.0
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .ok()
            .map(|i| self.0[i].1.as_slice())
    }

    /// Appends the encoding: a u16 count, then per attribute its name (u16 length) and
    /// its value (u32 length).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.0.len() as u16).to_le_bytes());
        for (name, value) in &self.0 {
            put_short_bytes(out, name);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value);
        }
    }

    /// Reads what [`Xattrs::encode`] wrote, bounded before anything is allocated.
    pub fn decode(r: &mut Reader<'_>) -> Result<Xattrs, DecodeError> {
        let count = usize::from(r.u16("xattr count")?);
        // Every attribute takes at least 7 bytes (two lengths and a one-byte name), and
        // at least one byte of the bound.
        if count > MAX_XATTR_BYTES || count * 7 > r.remaining() {
            return Err(DecodeError(format!("{count} extended attributes")));
        }
        let mut pairs = Vec::with_capacity(count);
        let mut total = 0usize;
        for _ in 0..count {
            let name = r.short_bytes("xattr name")?.to_vec();
            let len = r.u32("xattr value length")? as usize;
            total = total.saturating_add(name.len()).saturating_add(len);
            if total > MAX_XATTR_BYTES {
                return Err(DecodeError(XattrError::TooLarge(total).to_string()));
            }
            pairs.push((name, r.take(len, "xattr value")?.to_vec()));
        }
        Xattrs::try_canonical(pairs).map_err(|e| DecodeError(e.to_string()))
    }

    /// The digest that enters the Merkle tree: names and values in order.
    pub fn digest(&self) -> [u8; 32] {
        let mut out = Vec::new();
        self.encode(&mut out);
        *blake3::hash(&out).as_bytes()
    }
}

/// The synced attributes of the open file or directory `fd`. A file system without
/// attribute support has none. A file whose attributes exceed the bounds is an error
/// (the caller indexes it without them and reports it).
pub fn read(fd: impl AsFd, namespaces: Namespaces) -> Result<Xattrs, XattrError> {
    let fd = fd.as_fd();
    let io = |what: &str, e: rustix::io::Errno| XattrError::Io(format!("{what}: {e}"));
    'attempt: for _ in 0..READ_ATTEMPTS {
        let list_len = match rustix::fs::flistxattr_query(fd) {
            Ok(0) => return Ok(Xattrs::default()),
            Ok(n) => n,
            Err(rustix::io::Errno::NOTSUP) => return Ok(Xattrs::default()),
            Err(e) => return Err(io("listing extended attributes", e)),
        };
        // The list holds every attribute's name; past the bound the values cannot fit.
        if list_len > MAX_XATTR_BYTES + 4096 {
            return Err(XattrError::TooLarge(list_len));
        }
        let mut list = vec![0u8; list_len];
        let list_len = match rustix::fs::flistxattr(fd, &mut list[..]) {
            Ok(n) => n,
            Err(rustix::io::Errno::RANGE) => continue 'attempt,
            Err(e) => return Err(io("listing extended attributes", e)),
        };
        let mut pairs = Vec::new();
        let mut total = 0usize;
        for name in list[..list_len].split(|&b| b == 0) {
            if name.is_empty() || !namespaces.includes(name) {
                continue;
            }
            let value = match read_value(fd, name) {
                Ok(Some(value)) => value,
                Ok(None) => continue,
                Err(rustix::io::Errno::RANGE) => continue 'attempt,
                Err(rustix::io::Errno::TOOBIG) => return Err(XattrError::TooLarge(total)),
                Err(e) => return Err(io("reading an extended attribute", e)),
            };
            total += name.len() + value.len();
            if total > MAX_XATTR_BYTES {
                return Err(XattrError::TooLarge(total));
            }
            pairs.push((name.to_vec(), value));
        }
        pairs.sort();
        return Xattrs::try_canonical(pairs);
    }
    Err(XattrError::Io(
        "extended attributes kept changing while being read".into(),
    ))
}

/// One attribute's value; `None` if it went away since the listing.
fn read_value(
    fd: std::os::fd::BorrowedFd<'_>,
    name: &[u8],
) -> Result<Option<Vec<u8>>, rustix::io::Errno> {
    let name = std::ffi::OsStr::from_bytes(name);
    let len = match rustix::fs::fgetxattr_query(fd, name) {
        Ok(n) => n,
        Err(rustix::io::Errno::NODATA) => return Ok(None),
        Err(e) => return Err(e),
    };
    if len > MAX_XATTR_BYTES {
        return Err(rustix::io::Errno::TOOBIG);
    }
    let mut value = vec![0u8; len];
    match rustix::fs::fgetxattr(fd, name, &mut value[..]) {
        Ok(n) => {
            value.truncate(n);
            Ok(Some(value))
        }
        Err(rustix::io::Errno::NODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

/// An attribute that could not be set (or removed), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotSet {
    pub name: String,
    pub errno: rustix::io::Errno,
}

/// Gives the open file or directory `fd` exactly the attributes `wanted` of the
/// namespaces this node handles: each one set, every other one removed. Returns what
/// could not be set; the rest is done regardless.
pub fn apply(fd: impl AsFd, wanted: &Xattrs, namespaces: Namespaces) -> Vec<NotSet> {
    let fd = fd.as_fd();
    let mut failed = Vec::new();
    let shown = |name: &[u8]| String::from_utf8_lossy(name).into_owned();
    // What is there now: removed unless wanted. A listing that fails is taken as empty.
    let present = read(fd, namespaces).unwrap_or_default();
    for (name, _) in present.pairs() {
        if wanted.get(name).is_none()
            && let Err(e) = rustix::fs::fremovexattr(fd, std::ffi::OsStr::from_bytes(name))
            && e != rustix::io::Errno::NODATA
        {
            failed.push(NotSet {
                name: shown(name),
                errno: e,
            });
        }
    }
    for (name, value) in wanted.pairs() {
        if !namespaces.includes(name) || present.get(name) == Some(value.as_slice()) {
            if !namespaces.includes(name) {
                failed.push(NotSet {
                    name: shown(name),
                    errno: rustix::io::Errno::PERM,
                });
            }
            continue;
        }
        let set = rustix::fs::fsetxattr(
            fd,
            std::ffi::OsStr::from_bytes(name),
            value,
            rustix::fs::XattrFlags::empty(),
        );
        if let Err(e) = set {
            failed.push(NotSet {
                name: shown(name),
                errno: e,
            });
        }
    }
    failed
}

/// The kinds of attributes a volume's received entries carried that this node could
/// not set: each said once in the log (with the first path it happened to) and listed
/// in `/status`, so a node that cannot hold ACLs or `trusted.*` says so instead of
/// failing quietly on every file.
#[derive(Default)]
pub struct NotApplied(std::sync::Mutex<std::collections::BTreeMap<String, String>>);

impl NotApplied {
    /// Takes note of what could not be set on `path` in `volume`.
    pub fn note(&self, volume: &str, path: &crate::pathname::VolPath, not_set: &[NotSet]) {
        let mut seen = self.0.lock().expect("not-applied lock");
        for failure in not_set {
            // One report per namespace (ACLs by name) and reason.
            let namespace = match failure.name.as_bytes() {
                ACL_ACCESS | ACL_DEFAULT => failure.name.as_str(),
                _ => failure.name.split('.').next().unwrap_or_default(),
            };
            let key = format!("{namespace}: {}", failure.errno);
            if seen.contains_key(&key) {
                continue;
            }
            let reason = match failure.errno {
                rustix::io::Errno::NOTSUP => "the file system does not support them",
                rustix::io::Errno::PERM | rustix::io::Errno::ACCESS => {
                    "this node may not set them (not running as root?)"
                }
                _ => "the file system refused them",
            };
            let message = format!(
                "{namespace} attributes not applied ({reason}: {}), first on {}; with an access ACL that cannot be set, the group bits are narrowed to the owning group's",
                failure.errno,
                path.display()
            );
            tracing::warn!(volume, "{message}");
            seen.insert(key, message);
        }
    }

    /// What was noted so far, one line per kind.
    pub fn list(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("not-applied lock")
            .values()
            .cloned()
            .collect()
    }
}

/// ACL entry tags (Linux's `ACL_GROUP_OBJ` and `ACL_MASK`) in the xattr encoding: a
/// u32 version (2), then entries of u16 tag, u16 permissions, u32 id.
const ACL_TAG_GROUP_OBJ: u16 = 0x04;
const ACL_TAG_MASK: u16 = 0x10;
const ACL_VERSION: u32 = 2;

/// The permission bits a file with `mode` and the access ACL `acl` gets where the ACL
/// cannot be set: with an ACL, `mode`'s group bits are the ACL's mask, which may give the
/// owning group more than the ACL does; they become what the owning group really has
/// (its own entry, within the mask). Named users and groups lose their access: narrower,
/// never wider. An ACL that cannot be parsed takes the group bits away entirely.
pub fn narrowed_mode(mode: u32, acl: &[u8]) -> u32 {
    let group = owning_group_bits(acl).unwrap_or(0);
    (mode & !0o070) | (group << 3)
}

/// The owning group's effective permissions (rwx as 3 bits) in an ACL's xattr bytes.
fn owning_group_bits(acl: &[u8]) -> Option<u32> {
    let mut r = Reader::new(acl);
    if r.u32("acl version").ok()? != ACL_VERSION || acl.len() % 8 != 4 {
        return None;
    }
    let (mut group, mut mask) = (None, None);
    for _ in 0..(acl.len() - 4) / 8 {
        let tag = r.u16("acl tag").ok()?;
        let perm = u32::from(r.u16("acl perm").ok()?) & 0o7;
        r.u32("acl id").ok()?;
        match tag {
            ACL_TAG_GROUP_OBJ => group = Some(perm),
            ACL_TAG_MASK => mask = Some(perm),
            _ => {}
        }
    }
    Some(group? & mask.unwrap_or(0o7))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut out = ACL_VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    #[test]
    fn an_acl_that_cannot_be_set_narrows_the_group_bits_to_the_owning_group() {
        // user::rw-, user:1000:rwx, group::r--, mask::rwx, other::---; mode 0674
        // (group bits = mask).
        let bytes = acl(&[
            (0x01, 6, u32::MAX),
            (0x02, 7, 1000),
            (ACL_TAG_GROUP_OBJ, 4, u32::MAX),
            (ACL_TAG_MASK, 7, u32::MAX),
            (0x20, 0, u32::MAX),
        ]);
        assert_eq!(narrowed_mode(0o674, &bytes), 0o644);
        // The mask limits the owning group too.
        let masked = acl(&[
            (ACL_TAG_GROUP_OBJ, 7, u32::MAX),
            (ACL_TAG_MASK, 1, u32::MAX),
        ]);
        assert_eq!(narrowed_mode(0o2775, &masked), 0o2715);
        assert_eq!(narrowed_mode(0o775, b"garbage"), 0o705);
    }

    #[test]
    fn attributes_are_canonical_and_bounded() {
        let ok = Xattrs::try_canonical(vec![
            (b"system.posix_acl_access".to_vec(), vec![2, 0, 0, 0]),
            (b"user.a".to_vec(), b"1".to_vec()),
        ])
        .unwrap();
        let mut bytes = Vec::new();
        ok.encode(&mut bytes);
        assert_eq!(Xattrs::decode(&mut Reader::new(&bytes)).unwrap(), ok);
        for cut in 0..bytes.len() {
            assert!(Xattrs::decode(&mut Reader::new(&bytes[..cut])).is_err());
        }
        assert_eq!(
            Xattrs::try_canonical(vec![
                (b"user.b".to_vec(), vec![]),
                (b"user.a".to_vec(), vec![])
            ]),
            Err(XattrError::NotCanonical)
        );
        assert!(matches!(
            Xattrs::try_canonical(vec![(b"system.other".to_vec(), vec![])]),
            Err(XattrError::Name(_))
        ));
        assert!(matches!(
            Xattrs::try_canonical(vec![(b"user.big".to_vec(), vec![0; MAX_XATTR_BYTES])]),
            Err(XattrError::TooLarge(_))
        ));
    }
}
