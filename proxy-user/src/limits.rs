//! The file-descriptor limit: raised at start to what the system allows, and the number
//! of proxied connections that fits in it, so that running out of descriptors is a
//! counted refusal at accept rather than failures scattered over sockets and pipes.
use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

/// Descriptors one proxied connection can hold: two sockets and, with splice, a pipe
/// (two fds) per direction.
pub const FDS_PER_CONNECTION: u64 = 6;
/// Descriptors kept for everything else: listeners, io_uring rings and epoll sets,
/// health checks, the stats file, the admin endpoint, the configuration watch, sinks.
pub const RESERVED_FDS: u64 = 256;

/// `RLIMIT_NOFILE` before and after [`raise_nofile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Nofile {
    /// The soft limit the process started with.
    pub started_with: u64,
    pub soft: u64,
    pub hard: u64,
}

fn getrlimit() -> io::Result<libc::rlimit> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// The limits now, without changing them.
pub fn nofile() -> io::Result<Nofile> {
    let r = getrlimit()?;
    Ok(Nofile {
        started_with: r.rlim_cur,
        soft: r.rlim_cur,
        hard: r.rlim_max,
    })
}

/// The soft limit a process with hard limit `hard` can raise itself to: `hard`, or for an
/// unlimited one the kernel's `fs.nr_open`, which is what setrlimit accepts.
pub fn reachable_soft_limit(hard: u64) -> u64 {
    if hard != libc::RLIM_INFINITY {
        return hard;
    }
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// Raises the soft limit to [`reachable_soft_limit`].
pub fn raise_nofile() -> io::Result<Nofile> {
    let r = getrlimit()?;
    let target = reachable_soft_limit(r.rlim_max);
    if r.rlim_cur < target {
        let new = libc::rlimit {
            rlim_cur: target,
            rlim_max: r.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(Nofile {
        started_with: r.rlim_cur,
        soft: r.rlim_cur.max(target),
        hard: r.rlim_max,
    })
}

/// Descriptors this process has open now.
pub fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// Proxied connections that fit in `soft` descriptors with `open` already in use.
pub fn connection_capacity(soft: u64, open: u64) -> u64 {
    soft.saturating_sub(open + RESERVED_FDS) / FDS_PER_CONNECTION
}

/// Connections open across every worker against the capacity the descriptor limit
/// allows; a connection that does not fit is refused at accept (`fd_limit`).
#[derive(Debug)]
pub struct ConnectionBudget {
    capacity: AtomicU64,
    open: AtomicU64,
}

impl ConnectionBudget {
    /// `capacity` 0: no limit.
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity: AtomicU64::new(capacity),
            open: AtomicU64::new(0),
        }
    }

    pub fn set_capacity(&self, capacity: u64) {
        self.capacity.store(capacity, Ordering::Relaxed);
    }

    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Takes a place for one connection; false when none is left.
    pub fn try_take(&self) -> bool {
        let cap = self.capacity();
        let n = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        if cap != 0 && n > cap {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    pub fn release(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Lets one log line through per `every`, and says how many were held back since, so a
/// failure repeated thousands of times a second (EMFILE on every accept) is one line a
/// few seconds, not a flood.
#[derive(Debug)]
pub struct Throttle {
    every: std::time::Duration,
    next: Option<std::time::Instant>,
    held: u64,
}

impl Throttle {
    pub const fn new(every: std::time::Duration) -> Self {
        Self {
            every,
            next: None,
            held: 0,
        }
    }

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub fn allow(&mut self, now: std::time::Instant) -> Option<u64> {
        if self.next.is_some_and(|n| now < n) {
            self.held += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn capacity_leaves_the_reserve_and_counts_six_per_connection() {
        assert_eq!(connection_capacity(1024, 20), (1024 - 20 - 256) / 6);
        assert_eq!(connection_capacity(100, 20), 0);
    }

    #[test]
    fn the_budget_refuses_past_capacity_and_frees_on_release() {
        let b = ConnectionBudget::new(2);
        assert!(b.try_take() && b.try_take());
        assert!(!b.try_take());
        assert_eq!(b.open(), 2);
        b.release();
        assert!(b.try_take());
        let unlimited = ConnectionBudget::new(0);
        assert!((0..1000).all(|_| unlimited.try_take()));
    }

    #[test]
    fn the_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let mut t = Throttle::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(t.allow(t0), Some(0));
        for _ in 0..999 {
            assert_eq!(t.allow(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(t.allow(t0 + Duration::from_secs(5)), Some(999));
    }

    #[test]
    fn raising_reaches_the_hard_limit() {
        let n = raise_nofile().expect("raise");
        assert!(n.soft >= n.started_with);
        let now = nofile().expect("read");
        assert_eq!(now.soft, n.soft);
        if n.hard != libc::RLIM_INFINITY {
            assert_eq!(now.soft, n.hard);
        }
    }
}
