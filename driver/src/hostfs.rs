//! Filesystem facts about paths on this host.

use std::path::Path;

/// Filesystems libvirt 9.0 treats as shared for migration (`virFileIsSharedFS`
/// plus `virFileIsClusterFS`): NFS, GFS2, OCFS2, AFS, SMB, CIFS, Ceph, GPFS, ACFS.
const SHARED_MAGICS: &[(i64, &str)] = &[
    (0x6969, "nfs"),
    (0x0116_1970, "gfs2"),
    (0x7461_636f, "ocfs2"),
    (0x6B41_4653, "afs"),
    (0x517B, "smb"),
    (0xFF53_4D42, "cifs"),
    (0xFE53_4D42, "smb2"),
    (0x00C3_6400, "ceph"),
    (0x4750_4653, "gpfs"),
    (0x6163_6673, "acfs"),
];
const FUSE_MAGIC: i64 = 0x6573_5546;
/// FUSE filesystems libvirt accepts as shared.
const SHARED_FUSE: &[&str] = &["fuse.glusterfs", "fuse.quobyte"];

/// The nearest existing ancestor of `path` (libvirt checks a disk's directory
/// when the image itself does not exist yet).
fn existing(path: &Path) -> Option<&Path> {
    path.ancestors().find(|p| p.exists())
}

/// The filesystem type of the mount holding `path`, from /proc/self/mounts.
fn mount_type(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let real = std::fs::canonicalize(path).ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, ty) = (f.next()?, f.next()?, f.next()?);
            let dir = dir.replace("\\040", " ");
            real.starts_with(&dir).then(|| (dir.len(), ty.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, ty)| ty)
}

/// Whether `path` is on a filesystem libvirt considers shared storage.
pub fn is_shared_fs(path: &str) -> Result<bool, String> {
    let p = existing(Path::new(path)).ok_or_else(|| format!("{path} has no existing parent"))?;
    let st = nix::sys::statfs::statfs(p).map_err(|e| format!("statfs {}: {e}", p.display()))?;
    #[allow(clippy::unnecessary_cast)] // __fsword_t is i64 on x86_64, i32 elsewhere
    let magic = st.filesystem_type().0 as i64;
    if SHARED_MAGICS.iter().any(|(m, _)| *m == magic) {
        return Ok(true);
    }
    if magic == FUSE_MAGIC {
        return Ok(mount_type(p).is_some_and(|t| SHARED_FUSE.contains(&t.as_str())));
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_temp_dir_is_not_shared() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("not-yet").join("disk.raw");
        // /tmp is ext4/overlay/tmpfs on build machines, never NFS in CI.
        assert_eq!(is_shared_fs(missing.to_str().unwrap()), Ok(false));
    }
}
