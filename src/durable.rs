//! Small files made durable in one step (maps, identities, tokens, layouts): the one way
//! this crate replaces a file that must survive a crash. A bottom-layer module: it knows
//! nothing but the file system.

use std::io::Write;
use std::path::Path;

/// Replaces `<dir>/<name>` with `bytes` so that a reader, or a restart after a crash or
/// a power loss, finds either the old contents or all of the new ones, and once this
/// returns, the new ones: written to `<name>.tmp`, fsync'd, renamed over `<name>`, then
/// the directory fsync'd (so the rename itself is durable). The error says which step
/// failed (`create`, `write`, `fsync`, `rename`, `fsync directory`); the caller names
/// the path.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let step = |step: &'static str| move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{step}: {e}"));
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(step("create"))?;
    file.write_all(bytes).map_err(step("write"))?;
    file.sync_all().map_err(step("fsync"))?;
    drop(file);
    std::fs::rename(&tmp, dir.join(name)).map_err(step("rename"))?;
    sync_dir(dir).map_err(step("fsync directory"))
}

/// fsyncs the directory `dir`, so a rename, creation or unlink in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn write_file_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        super::write_file(dir.path(), "a.json", b"one").unwrap();
        super::write_file(dir.path(), "a.json", b"two").unwrap();
        assert_eq!(std::fs::read(dir.path().join("a.json")).unwrap(), b"two");
        assert!(!dir.path().join("a.json.tmp").exists());
    }

    #[test]
    fn write_file_names_the_failed_step() {
        let dir = tempfile::tempdir().unwrap();
        let err = super::write_file(&dir.path().join("missing"), "a.json", b"x").unwrap_err();
        assert!(err.to_string().starts_with("create: "), "{err}");
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
