//! Config drives as OpenStack Nova makes them: an ISO 9660 image built by
//! `genisoimage -r -J -V config-2` (from `scripts/deps --tests`), and where a
//! file of its root directory starts, for the dirtier's `cdrom=LBA`.

use std::path::Path;

/// Bytes per ISO 9660 sector.
pub const SECTOR: usize = 2048;

/// Writes `files` (name, bytes) into a directory beside `iso`, builds the
/// ISO from it, and returns the first sector of each file, in order.
pub fn config_drive(iso: &Path, files: &[(&str, &[u8])]) -> Result<Vec<u32>, String> {
    let dir = iso.with_extension("d");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).map_err(|e| format!("write {name}: {e}"))?;
    }
    let out = std::process::Command::new("genisoimage")
        .args(["-quiet", "-r", "-J", "-V", "config-2", "-o"])
        .arg(iso)
        .arg(&dir)
        .output()
        .map_err(|e| format!("run genisoimage ({e}): scripts/deps --tests installs it"))?;
    if !out.status.success() {
        return Err(format!(
            "genisoimage: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let image = std::fs::read(iso).map_err(|e| format!("read {}: {e}", iso.display()))?;
    files
        .iter()
        .map(|(name, _)| {
            file_sector(&image, name)
                .ok_or_else(|| format!("{name} is not in the root directory of {}", iso.display()))
        })
        .collect()
}

/// The first sector of file `name` in the root directory of ISO 9660
/// `image` (an 8.3 name, which ISO 9660 keeps in upper case; the `;1`
/// version is ignored), as a driver finds it: the primary volume descriptor
/// at sector 16, the root directory record in it, then the directory's
/// records.
pub fn file_sector(image: &[u8], name: &str) -> Option<u32> {
    let u32_at = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let pvd = image.get(16 * SECTOR..17 * SECTOR)?;
    if &pvd[..6] != b"\x01CD001" {
        return None;
    }
    let root = &pvd[156..156 + 34];
    let (extent, len) = (u32_at(root, 2)? as usize, u32_at(root, 10)? as usize);
    let records = image.get(extent * SECTOR..extent * SECTOR + len)?;
    let want = name.to_ascii_uppercase();
    let mut at = 0;
    while at < records.len() {
        let record_len = usize::from(records[at]);
        if record_len == 0 {
            // Records do not cross sectors: the rest of this one is padding.
            at = (at / SECTOR + 1) * SECTOR;
            continue;
        }
        let name_len = usize::from(*records.get(at + 32)?);
        let found = records.get(at + 33..at + 33 + name_len)?;
        let found = found.split(|b| *b == b';').next().unwrap_or(found);
        if found == want.as_bytes() {
            return u32_at(records, at + 2);
        }
        at += record_len;
    }
    None
}
