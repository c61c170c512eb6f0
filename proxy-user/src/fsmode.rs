//! Directories and files with explicit modes, whatever the umask: what edgeproxy
//! creates is its own (0700 / 0600; log output 0750 / 0640 and the stats file 0640, for
//! a reader in the group), and an existing directory that another user could write into
//! is refused rather than trusted.
use std::{
    fs::{DirBuilder, File, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// Mode of directories edgeproxy creates for itself (state, spool, pins).
pub const DIR_MODE: u32 = 0o700;
/// Mode of files edgeproxy creates for itself (stored policies, spool, locks, pins).
pub const FILE_MODE: u32 = 0o600;
/// Mode of a file sink's directory: a log shipper or operator in its group may list it.
pub const LOG_DIR_MODE: u32 = 0o750;
/// Mode of a file sink's output: readable by its group (as /var/log files are by adm),
/// never by everyone, since log lines carry what hosts sent.
pub const LOG_FILE_MODE: u32 = 0o640;

/// The user a daemon drops to (`[daemon] user`): what it creates before the drop is
/// given to that user, so it can still write there after.
static OWNER: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();

/// Sets the owner of what edgeproxy creates from now on (once, before sinks open).
pub fn set_owner(uid: u32, gid: u32) {
    let _ = OWNER.set((uid, gid));
}

/// Gives `path` to the daemon user when one is set and this process may (root).
fn give_to_owner(path: &Path) -> io::Result<()> {
    if let Some(&(uid, gid)) = OWNER.get() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// Creates `dir` and any missing parents with mode 0700 (a umask only removes bits, so
/// the mode holds under umask 000), gives it to the daemon user if one is set, then
/// checks that `dir` is safe to use. An existing directory keeps its mode: it may be a
/// shared one the operator pointed at.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    create_dir_with(dir, DIR_MODE)?;
    // edgeproxy's own (spool, state): the daemon user's even when an earlier run made it.
    give_to_owner(dir)
}

/// [`create_private_dir`] with `mode` (at most 0777) for `dir` and missing parents.
pub fn create_dir_with(dir: &Path, mode: u32) -> io::Result<()> {
    let existed = dir.exists();
    DirBuilder::new().recursive(true).mode(mode).create(dir)?;
    if !existed {
        give_to_owner(dir)?;
    }
    check_dir(dir)
}

/// [`create_private_dir`] for a directory under a root edgeproxy is configured to use
/// (`--state-dir/IFACE`, `--pin-root/IFACE`): the root is checked too, before anything
/// is created in it, since whoever can write into it can replace `dir` itself. `dir` is
/// edgeproxy's alone, so one an earlier run left readable by others is narrowed to 0700.
pub fn create_private_subdir(dir: &Path) -> io::Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(p) = parent.filter(|p| p.exists()) {
        check_dir(p)?;
    }
    create_private_dir(dir)?;
    if std::fs::metadata(dir)?.mode() & 0o1000 == 0 {
        narrow_path(dir, DIR_MODE)?;
    }
    parent.map_or(Ok(()), check_dir)
}

/// Refuses a directory that a user other than its owner could write into (group- or
/// world-writable without the sticky bit), or that another non-root user owns: a file
/// edgeproxy reads back from it (spool, stored policy) could have been planted.
pub fn check_dir(dir: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(dir)?;
    let mode = meta.mode();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let daemon_user = OWNER.get().map(|&(uid, _)| uid);
    if meta.uid() != me && meta.uid() != 0 && Some(meta.uid()) != daemon_user {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is owned by uid {}, not by this process (uid {me}) or root: refusing to use it",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is writable by {} (mode {:04o}): refusing to use it; `chmod go-w {}` if that is not meant",
                dir.display(),
                if mode & 0o002 != 0 {
                    "every user"
                } else {
                    "its group"
                },
                mode & 0o7777,
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Opens `path` for appending, creating it with mode 0600; an existing file that others
/// could read or write is narrowed to 0600 (it is edgeproxy's own output).
pub fn open_private_append(path: &Path, read: bool) -> io::Result<File> {
    open_append_with(path, read, FILE_MODE)
}

/// [`open_private_append`] with `mode`.
pub fn open_append_with(path: &Path, read: bool, mode: u32) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(read)
        .mode(mode)
        .open(path)?;
    narrow(&file, mode)?;
    give_to_owner(path)?;
    Ok(file)
}

/// Creates (or truncates) `path` with mode 0600.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    create_file_with(path, FILE_MODE)
}

/// [`create_private_file`] with `mode`; a symbolic link at `path` is refused (ELOOP)
/// rather than followed, for files written next to others' (the stats file's directory
/// is the operator's choice, not edgeproxy's own).
pub fn create_file_with(path: &Path, mode: u32) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    narrow(&file, mode)?;
    give_to_owner(path)?;
    Ok(file)
}

/// Writes `bytes` to a sibling `.tmp` file created with `mode` and renames it over
/// `path`, so readers see the old or the new contents, never a part, with `mode`.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = create_file_with(Path::new(&tmp), mode)?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Removes the permission bits outside `allowed` from a file that has them (created
/// before, or by another umask-following program); setgid and sticky bits are kept.
fn narrow(file: &File, allowed: u32) -> io::Result<()> {
    if let Some(mode) = narrowed(file.metadata()?.mode(), allowed) {
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// `mode` without its permission bits outside `allowed` (setgid and sticky kept), or
/// `None` when it has none.
fn narrowed(mode: u32, allowed: u32) -> Option<u32> {
    let mode = mode & 0o7777;
    let extra = mode & 0o777 & !allowed;
    (extra != 0).then_some(mode & !extra)
}

/// [`narrow`] by path, for directories and for pins in bpffs (which honours chmod but
/// cannot be opened as plain files); a symbolic link is left alone.
pub fn narrow_path(path: &Path, allowed: u32) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if let Some(mode) = narrowed(meta.mode(), allowed).filter(|_| !meta.file_type().is_symlink()) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The process umask, set for the duration of a closure. Tests only: the mask is the
/// whole process's, so tests that call this create paths only under their own scratch
/// directories, which they make with explicit modes.
#[cfg(test)]
pub(crate) fn with_umask<T>(mask: libc::mode_t, f: impl FnOnce() -> T) -> T {
    // SAFETY: umask only swaps the process's mask.
    let old = unsafe { libc::umask(mask) };
    let out = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ep-fsmode-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn modes_hold_under_umask_000() {
        let d = scratch("umask");
        let (dir_mode, file_mode) = with_umask(0, || {
            create_private_dir(&d.join("a/b")).unwrap();
            let f = open_private_append(&d.join("a/b/f"), false).unwrap();
            (
                std::fs::metadata(d.join("a/b")).unwrap().mode() & 0o7777,
                f.metadata().unwrap().mode() & 0o7777,
            )
        });
        assert_eq!((dir_mode, file_mode), (0o700, 0o600));
        assert_eq!(
            std::fs::metadata(d.join("a")).unwrap().mode() & 0o7777,
            0o700
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn world_writable_dir_is_refused_and_a_loose_file_narrowed() {
        let d = scratch("loose");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = create_private_dir(&d).unwrap_err();
        assert!(e.to_string().contains("every user"), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_dir(&d).expect("sticky: others cannot remove or replace our files");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let p = d.join("f");
        std::fs::write(&p, b"x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        drop(open_private_append(&p, false).unwrap());
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        std::fs::remove_dir_all(d).unwrap();
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_subdir_is_refused_under_a_writable_root_and_narrowed_when_loose() {
        let d = scratch("subdir");
        DirBuilder::new().mode(0o700).create(&d).unwrap();
        let root = d.join("state");
        DirBuilder::new().mode(0o700).create(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = create_private_subdir(&root.join("eth0")).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "{} is writable by every user (mode 0777)",
                root.display()
            )),
            "{e}"
        );
        assert!(!root.join("eth0").exists(), "nothing created in it");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Left 0755 by an earlier run under umask 022: narrowed, it is edgeproxy's alone.
        DirBuilder::new()
            .mode(0o755)
            .create(root.join("eth0"))
            .unwrap();
        std::fs::set_permissions(root.join("eth0"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        create_private_subdir(&root.join("eth0")).unwrap();
        assert_eq!(mode(&root.join("eth0")), 0o700);
        assert_eq!(mode(&root), 0o755, "the root is only checked");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn replaced_files_have_their_mode_under_umask_000() {
        let d = scratch("replace");
        DirBuilder::new().mode(0o700).create(&d).unwrap();
        let p = d.join("stats.json");
        // A leftover temporary file with a loose mode is narrowed, not trusted.
        std::fs::write(d.join("stats.json.tmp"), b"old").unwrap();
        std::fs::set_permissions(
            d.join("stats.json.tmp"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        with_umask(0, || replace_file(&p, b"{}", 0o640)).unwrap();
        assert_eq!(mode(&p), 0o640);
        assert_eq!(std::fs::read(&p).unwrap(), b"{}");
        with_umask(0, || replace_file(&p, b"{}", FILE_MODE)).unwrap();
        assert_eq!(mode(&p), 0o600);
        // A symbolic link in its place is refused, not followed.
        std::os::unix::fs::symlink(d.join("elsewhere"), d.join("stats.json.tmp")).unwrap();
        assert!(replace_file(&p, b"{}", 0o640).is_err());
        assert!(!d.join("elsewhere").exists());
        std::fs::remove_dir_all(d).unwrap();
    }
}
