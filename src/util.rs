//! Small helpers shared by the stages.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so that
/// readers never see a half-written file and a failed write leaves the old one in place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| {
        format!(
            "{}: cannot create a file in {}",
            path.display(),
            dir.display()
        )
    })?;
    // Temporary files are created private (0600); the result should get the usual 0644.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("{}: cannot set permissions", path.display()))?;
    }
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// This machine's physical memory in bytes (`None` where the OS does not say).
pub fn physical_memory() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads system configuration values.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && size > 0 {
            return (pages as u64).checked_mul(size as u64);
        }
    }
    None
}

/// Refuses a buffer of `elements` values of `bytes_each` bytes that could not fit in this
/// machine's memory, before anything is allocated: an allocation that fails aborts the process
/// instead of returning an error. `what` names the buffer in the message.
pub fn check_alloc(what: &str, elements: u128, bytes_each: u128) -> anyhow::Result<()> {
    let bytes = elements.saturating_mul(bytes_each);
    let limit = physical_memory().map_or(u128::from(u64::MAX), u128::from);
    if bytes > limit {
        anyhow::bail!(
            "{what} would take {} of memory, more than this machine has ({})",
            human_bytes(bytes),
            human_bytes(limit)
        );
    }
    Ok(())
}

/// `1.5 GiB`-style sizes.
pub fn human_bytes(b: u128) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}
