//! Directories and files with explicit modes, whatever the umask: what edgeproxy
//! creates is its own (0700 / 0600), and an existing directory that another user could
//! write into is refused rather than trusted.
use std::{
    fs::{DirBuilder, File, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// Mode of directories edgeproxy creates (state, spool, pins, logs).
pub const DIR_MODE: u32 = 0o700;
/// Mode of files edgeproxy creates.
pub const FILE_MODE: u32 = 0o600;

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
/// checks that `dir` is safe to use.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    give_to_owner(dir)?;
    check_dir(dir)
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
/// could write is narrowed to 0600 (it is edgeproxy's own output).
pub fn open_private_append(path: &Path, read: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(read)
        .mode(FILE_MODE)
        .open(path)?;
    narrow(&file)?;
    give_to_owner(path)?;
    Ok(file)
}

/// Creates (or truncates) `path` with mode 0600.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    narrow(&file)?;
    give_to_owner(path)?;
    Ok(file)
}

/// Removes group and world bits from a file that has them (created before, or by
/// another umask-following program).
fn narrow(file: &File) -> io::Result<()> {
    let mode = file.metadata()?.mode();
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ep-fsmode-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// The process umask, set for the duration of a closure (tests in this module only
    /// create paths under their own scratch directory).
    fn with_umask<T>(mask: libc::mode_t, f: impl FnOnce() -> T) -> T {
        // SAFETY: umask only swaps the process's mask.
        let old = unsafe { libc::umask(mask) };
        let out = f();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        out
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
}
