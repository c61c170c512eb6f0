//! Least privilege for the daemons: `no_new_privs` from the start, and, once every
//! listener is bound and every file opened, a drop to the configured user — uid, gid and
//! supplementary groups of every thread (glibc applies set*id to all of a process's
//! threads), which also clears every capability, as the kernel does when all uids leave 0.
use std::io;

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("no user named {0:?} on this host (create it, or set [daemon] user to another)")]
    NoUser(String),
    #[error("no group named {0:?} on this host")]
    NoGroup(String),
    #[error("looking up {what} {name:?}: {source}")]
    Lookup {
        what: &'static str,
        name: String,
        source: nix::Error,
    },
    #[error("dropping to {user} (uid {uid}, gid {gid}): {step}: {source}")]
    Drop {
        user: String,
        uid: u32,
        gid: u32,
        step: &'static str,
        source: nix::Error,
    },
    #[error("after the drop to {user}, {what}")]
    Verify { user: String, what: String },
    #[error(
        "cannot drop to {user}: {why} is read through bpf(), which needs CAP_BPF; run this daemon as root (--user root)"
    )]
    NeedsRoot { user: String, why: String },
    #[error(
        "after the drop to {user}, {dir} is not writable ({source}): give it to {user} (chown), or choose another user with [daemon] user / --user (\"root\" keeps root)"
    )]
    NotWritable {
        user: String,
        dir: String,
        source: io::Error,
    },
}

/// The user `logs` and `proxy` drop to when started as root without `[daemon] user`
/// or `--user`: root is kept only when asked for.
pub const DEFAULT_USER: &str = "nobody";

/// What a daemon started now will do about its privileges.
#[derive(Debug)]
pub enum Plan {
    /// Stay as started, and why (logged).
    Keep(String),
    /// Become this user once started.
    Drop(Target),
}

/// Chooses from `--user` (`cli`), then `[daemon] user`, then the default; `needs_bpf`
/// names what this daemon reads through bpf() (which needs CAP_BPF) when it does.
pub fn plan(
    cli: Option<&str>,
    configured: Option<&str>,
    group: Option<&str>,
    needs_bpf: Option<&str>,
) -> Result<Plan, PrivilegeError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let asked = cli.or(configured);
    match (asked, root) {
        (Some("root"), _) => Ok(Plan::Keep("root, as asked (--user / [daemon] user)".into())),
        (_, false) => Ok(Plan::Keep("not started as root: nothing to drop".into())),
        (Some(user), true) if needs_bpf.is_some() => Err(PrivilegeError::NeedsRoot {
            user: user.to_owned(),
            why: needs_bpf.unwrap_or_default().to_owned(),
        }),
        (None, true) if needs_bpf.is_some() => Ok(Plan::Keep(format!(
            "root kept: {} is read through bpf(), which needs CAP_BPF",
            needs_bpf.unwrap_or_default()
        ))),
        (Some(user), true) => resolve(user, group).map(Plan::Drop),
        (None, true) => match resolve(DEFAULT_USER, group) {
            Ok(t) => Ok(Plan::Drop(t)),
            Err(e) => Ok(Plan::Keep(format!(
                "root kept: the default user cannot be used ({e}); set [daemon] user"
            ))),
        },
    }
}

/// The drop itself, run once the daemon's sockets are bound: then every directory in
/// `writable` is checked to be writable by the new user (the stats file's, a file sink's
/// for rotation), so a start fails at once rather than at the first rotation.
pub fn on_started(target: Target, writable: Vec<std::path::PathBuf>) -> OnStarted {
    Box::new(move || {
        drop_to(&target)?;
        for dir in &writable {
            let probe = dir.join(format!(".edgeproxy-write-check-{}", std::process::id()));
            let made = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
                .and_then(|f| {
                    drop(f);
                    std::fs::remove_file(&probe)
                });
            if let Err(source) = made {
                return Err(PrivilegeError::NotWritable {
                    user: target.user.clone(),
                    dir: dir.display().to_string(),
                    source,
                }
                .into());
            }
        }
        tracing::info!(
            user = %target.user,
            uid = target.uid,
            gid = target.gid,
            "dropped privileges: every thread runs as this user, with no capability"
        );
        Ok(())
    })
}

/// Run once a daemon has bound its sockets and started its workers (the drop, for
/// `logs` and `proxy`); an error stops it.
pub type OnStarted = Box<dyn FnOnce() -> anyhow::Result<()> + Send>;

/// Who the daemon becomes after start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// Resolves `user` (and `group`, else the user's primary group).
pub fn resolve(user: &str, group: Option<&str>) -> Result<Target, PrivilegeError> {
    let u = nix::unistd::User::from_name(user)
        .map_err(|source| PrivilegeError::Lookup {
            what: "user",
            name: user.to_owned(),
            source,
        })?
        .ok_or_else(|| PrivilegeError::NoUser(user.to_owned()))?;
    let gid = match group {
        None => u.gid.as_raw(),
        Some(g) => nix::unistd::Group::from_name(g)
            .map_err(|source| PrivilegeError::Lookup {
                what: "group",
                name: g.to_owned(),
                source,
            })?
            .ok_or_else(|| PrivilegeError::NoGroup(g.to_owned()))?
            .gid
            .as_raw(),
    };
    Ok(Target {
        user: user.to_owned(),
        uid: u.uid.as_raw(),
        gid,
    })
}

/// Linux capability numbers (linux/capability.h) the daemons keep.
pub mod cap {
    pub const CHOWN: u32 = 0;
    pub const DAC_OVERRIDE: u32 = 1;
    pub const FOWNER: u32 = 3;
    pub const SETGID: u32 = 6;
    pub const SETUID: u32 = 7;
    pub const NET_BIND_SERVICE: u32 = 10;
    pub const NET_ADMIN: u32 = 12;
    pub const IPC_LOCK: u32 = 14;
    pub const SYS_ADMIN: u32 = 21;
    pub const PERFMON: u32 = 38;
    pub const BPF: u32 = 39;
}

/// The daemon modes (`edgeproxy run`, `logs`, `proxy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Daemon {
    Run,
    Logs,
    Proxy,
}

/// The capabilities each daemon mode needs, and why (docs/security.md lists them):
/// binding ports below 1024, `SO_RCVBUFFORCE` and XDP/TC attach and detach, io_uring
/// buffers without the memlock limit; `run` (and `logs` reading captured rings) its BPF
/// maps; `logs` and `proxy` the drop itself (set*id, and giving what they make before it
/// to the user while still writing there, which is what the file-permission overrides
/// are for: they are gone with everything else at the drop).
pub fn needed(mode: Daemon) -> Vec<u32> {
    let mut caps = vec![cap::NET_BIND_SERVICE, cap::NET_ADMIN, cap::IPC_LOCK];
    if matches!(mode, Daemon::Run | Daemon::Logs) {
        // A pinned data plane's per-CPU rings are inner maps opened by id
        // (BPF_MAP_GET_FD_BY_ID), which the kernel allows only to CAP_SYS_ADMIN: `run`
        // adopting one and `logs --capture-from` need it; so does BPF_ENABLE_STATS.
        caps.extend([cap::BPF, cap::PERFMON, cap::SYS_ADMIN]);
    }
    if matches!(mode, Daemon::Logs | Daemon::Proxy) {
        caps.extend([
            cap::SETUID,
            cap::SETGID,
            cap::CHOWN,
            cap::DAC_OVERRIDE,
            cap::FOWNER,
        ]);
    }
    caps
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Keeps only `keep` of this process's capabilities, for good: every other one leaves
/// the effective, permitted and bounding sets, and the ambient set is cleared. Linux
/// keeps capabilities per thread, so this runs before any other thread starts (checked),
/// and every thread started after inherits the narrowed sets. A process without
/// capabilities (not root) has nothing to narrow.
pub fn keep_only(keep: &[u32]) -> io::Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!(
            "capabilities must be narrowed before any thread starts ({threads} threads)"
        )));
    }
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData through a valid pointer for version 3.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if data.iter().all(|d| d.permitted == 0) {
        return Ok(());
    }
    for c in 0..=last {
        if keep.contains(&c) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = io::Error::last_os_error();
            // EINVAL: a capability this kernel does not know.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    let mut mask = [0u32; 2];
    for &c in keep {
        mask[(c / 32) as usize] |= 1 << (c % 32);
    }
    let new = [0, 1].map(|i| CapData {
        effective: mask[i] & data[i].permitted,
        permitted: mask[i] & data[i].permitted,
        inheritable: 0,
    });
    // SAFETY: capset reads a header and two CapData through valid pointers.
    if unsafe { libc::syscall(libc::SYS_capset, &header, new.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// `PR_SET_NO_NEW_PRIVS`: nothing this process executes can gain privileges. Set before
/// any thread starts, so every thread inherits it.
pub fn forbid_new_privileges() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Becomes `t` for good (real, effective and saved ids), then checks that no thread kept
/// uid 0 or a capability.
pub fn drop_to(t: &Target) -> Result<(), PrivilegeError> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let fail = |step: &'static str| {
        let t = t.clone();
        move |source| PrivilegeError::Drop {
            user: t.user,
            uid: t.uid,
            gid: t.gid,
            step,
            source,
        }
    };
    let gid = Gid::from_raw(t.gid);
    let uid = Uid::from_raw(t.uid);
    setgroups(&[gid]).map_err(fail("setgroups"))?;
    setresgid(gid, gid, gid).map_err(fail("setresgid"))?;
    setresuid(uid, uid, uid).map_err(fail("setresuid"))?;
    let now = status();
    let verify = |what: String| PrivilegeError::Verify {
        user: t.user.clone(),
        what,
    };
    for th in &now.threads {
        if th.uids.iter().any(|&u| u != t.uid) || th.gids.iter().any(|&g| g != t.gid) {
            return Err(verify(format!(
                "thread {} still has uids {:?} gids {:?}",
                th.tid, th.uids, th.gids
            )));
        }
        if th.cap_effective != 0 || th.cap_permitted != 0 {
            return Err(verify(format!(
                "thread {} still has capabilities (effective {:x})",
                th.tid, th.cap_effective
            )));
        }
    }
    Ok(())
}

/// What every thread of this process runs as, read from `/proc/self/task/*/status`:
/// what the report shows and the drop verifies.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub uid: u32,
    pub gid: u32,
    /// Effective capabilities of the main thread, as a hex mask (0: none).
    pub capabilities: String,
    pub no_new_privs: bool,
    #[serde(skip)]
    pub threads: Vec<ThreadStatus>,
}

#[derive(Clone, Debug, Default)]
pub struct ThreadStatus {
    pub tid: u32,
    /// Real, effective, saved, filesystem.
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub cap_effective: u64,
    pub cap_permitted: u64,
    pub no_new_privs: bool,
}

/// Parses the fields of one `/proc/…/status` the report needs.
pub fn parse_status(tid: u32, text: &str) -> ThreadStatus {
    let mut t = ThreadStatus {
        tid,
        ..ThreadStatus::default()
    };
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let ids = || -> Vec<u32> {
            value
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        };
        let hex = || u64::from_str_radix(value.trim(), 16).unwrap_or(u64::MAX);
        match key {
            "Uid" => t.uids = ids(),
            "Gid" => t.gids = ids(),
            "CapEff" => t.cap_effective = hex(),
            "CapPrm" => t.cap_permitted = hex(),
            "NoNewPrivs" => t.no_new_privs = value.trim() == "1",
            _ => {}
        }
    }
    t
}

pub fn status() -> Status {
    let mut threads: Vec<ThreadStatus> = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(e.path().join("status")).ok()?;
            Some(parse_status(tid, &text))
        })
        .collect();
    threads.sort_by_key(|t| t.tid);
    let main = std::fs::read_to_string("/proc/self/status")
        .map(|s| parse_status(std::process::id(), &s))
        .unwrap_or_default();
    Status {
        uid: main.uids.get(1).copied().unwrap_or(u32::MAX),
        gid: main.gids.get(1).copied().unwrap_or(u32::MAX),
        capabilities: format!("{:x}", main.cap_effective),
        no_new_privs: main.no_new_privs,
        threads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ids_capabilities_and_no_new_privs() {
        let t = parse_status(
            7,
            "Name:\tx\nUid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n\
             CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nNoNewPrivs:\t1\n",
        );
        assert_eq!(t.uids, vec![65534; 4]);
        assert_eq!(t.gids, vec![65534; 4]);
        assert_eq!(
            (t.cap_effective, t.cap_permitted, t.no_new_privs),
            (0, 0, true)
        );
        let root = parse_status(
            1,
            "Uid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\nNoNewPrivs:\t0\n",
        );
        assert_eq!(root.cap_effective, 0x1ff_ffff_ffff);
        assert!(!root.no_new_privs);
    }

    #[test]
    fn the_plan_drops_by_default_and_keeps_root_only_when_asked_or_needed() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED the_plan_drops_by_default…: decides for root only");
            return;
        }
        let rings = Some("the data plane's record rings in /sys/fs/bpf/x");
        assert!(
            matches!(plan(None, None, None, None), Ok(Plan::Drop(t)) if t.user == DEFAULT_USER)
        );
        assert!(matches!(
            plan(Some("root"), Some("nobody"), None, None),
            Ok(Plan::Keep(_))
        ));
        assert!(
            matches!(plan(None, Some("nobody"), None, None), Ok(Plan::Drop(t)) if t.uid == 65534)
        );
        assert!(
            matches!(plan(None, None, None, rings), Ok(Plan::Keep(w)) if w.contains("CAP_BPF"))
        );
        let e = plan(Some("nobody"), None, None, rings).unwrap_err();
        assert!(e.to_string().contains("needs CAP_BPF"), "{e}");
    }

    #[test]
    fn unknown_users_and_groups_are_named() {
        let e = resolve("no-such-user-edgeproxy", None).unwrap_err();
        assert!(e.to_string().contains("no-such-user-edgeproxy"), "{e}");
        let e = resolve("root", Some("no-such-group-edgeproxy")).unwrap_err();
        assert!(e.to_string().contains("no-such-group-edgeproxy"), "{e}");
        assert_eq!(resolve("root", None).unwrap().uid, 0);
    }
}
