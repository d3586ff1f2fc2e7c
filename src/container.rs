//! What Shoal learns about the container it runs in, from the kernel's view of its mounts
//! (`/proc/self/mountinfo`): its own container id, and whether a volume directory really
//! is a mount (a Docker volume) rather than a directory of the container's own
//! throw-away layer.

use std::path::Path;

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The mount points of this process's mount namespace, unescaped.
fn mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape)
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\NNN` (octal).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `dir` is the mount point of a file system (a Docker volume or bind mount).
pub fn is_mount_point(dir: &Path) -> std::io::Result<bool> {
    let dir = dir.canonicalize()?;
    let mountinfo = std::fs::read_to_string(MOUNTINFO)?;
    Ok(mount_points(&mountinfo).iter().any(|m| Path::new(m) == dir))
}

/// This container's id: Docker bind-mounts `/etc/hostname`, `/etc/hosts` and
/// `/etc/resolv.conf` from `.../containers/<id>/`, whatever the hostname was set to.
pub fn own_container_id() -> Option<String> {
    let mountinfo = std::fs::read_to_string(MOUNTINFO).ok()?;
    container_id_in(&mountinfo)
}

fn container_id_in(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let root = line.split(' ').nth(3)?;
        let rest = &root[root.find("/containers/")? + "/containers/".len()..];
        let id = rest.split('/').next()?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
812 700 0:51 / / rw,relatime master:300 - overlay overlay rw,lowerdir=/x
830 812 8:1 /var/lib/docker/volumes/media/_data /srv/shoal/volumes/media rw,relatime - ext4 /dev/sda1 rw
831 812 8:1 /var/lib/docker/containers/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/hostname /etc/hostname rw,relatime - ext4 /dev/sda1 rw
832 812 8:1 /home/a\\040b /srv/with\\040space rw - ext4 /dev/sda1 rw
";

    #[test]
    fn mount_points_and_container_id_are_read_from_mountinfo() {
        let points = mount_points(SAMPLE);
        assert!(points.contains(&"/srv/shoal/volumes/media".to_string()));
        assert!(points.contains(&"/srv/with space".to_string()));
        assert_eq!(
            container_id_in(SAMPLE).as_deref(),
            Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        );
        assert_eq!(container_id_in("1 2 3:4 / / rw - ext4 x rw\n"), None);
    }
}
