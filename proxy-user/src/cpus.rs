//! Which CPUs the daemon may use and pinning its workers to them.
//!
//! Data CPUs are checked against the process's affinity mask, not counted from 0: under
//! `taskset`, systemd's `CPUAffinity=` or a container's cpuset the allowed CPUs can be,
//! say, 4–7, and a worker pinned outside them would silently run unpinned.
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};

/// How many CPUs this process may keep busy at once: the affinity mask and a cgroup's
/// CPU quota (`cpu.max`), both of which `available_parallelism` honours.
pub fn quota() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPUs the calling thread may run on, ascending (call it from a thread we have not
/// pinned: the main or control thread). Falls back to `0..available_parallelism` if
/// the mask cannot be read. The mask is what `data_cpus` is checked against: a worker
/// pinned outside it would fail to pin.
pub fn allowed() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => (0..quota()).collect(),
    }
}

/// The default data CPUs: the allowed ones, no more of them than the [`quota`] lets run
/// at once — a pod limited to 2 CPUs on a 64-CPU node gets 2 workers, not 64 throttled
/// ones.
pub fn default_data_cpus() -> Vec<usize> {
    allowed().into_iter().take(quota()).collect()
}

/// Pins the calling thread to `cpu` (a warning, not an error, when it cannot).
pub fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    if set.set(cpu).is_ok()
        && let Err(e) = sched_setaffinity(Pid::from_raw(0), &set)
    {
        tracing::warn!(cpu, error = %e, "could not pin the worker");
    }
}

/// `cpus` as the kernel writes CPU lists: ranges and singles, `0-3,8`.
pub fn list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        parts.push(if sorted[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", sorted[i])
        });
        i += 1;
    }
    parts.join(",")
}

/// `n` worker CPUs taken in turn from `cpus` (several workers per CPU when `n` is larger).
pub fn cycle(cpus: &[usize], n: usize) -> Vec<usize> {
    if cpus.is_empty() {
        return Vec::new();
    }
    (0..n).map(|i| cpus[i % cpus.len()]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_read_like_the_kernels() {
        assert_eq!(list(&[0, 1, 2, 3, 8]), "0-3,8");
        assert_eq!(list(&[5]), "5");
        assert_eq!(list(&[7, 4, 5, 5, 9, 10]), "4-5,7,9-10");
        assert_eq!(list(&[]), "");
    }

    #[test]
    fn workers_cycle_through_the_data_cpus_not_from_zero() {
        assert_eq!(cycle(&[4, 6], 3), vec![4, 6, 4]);
        assert_eq!(cycle(&[2], 2), vec![2, 2]);
        assert!(cycle(&[], 2).is_empty());
    }

    #[test]
    fn the_default_is_allowed_cpus_within_the_quota() {
        let d = default_data_cpus();
        assert!(!d.is_empty() && d.len() <= quota(), "{d:?}");
        assert!(allowed().starts_with(&d), "{d:?}");
    }

    #[test]
    fn the_allowed_set_follows_the_affinity_mask() {
        // A thread restricted to one CPU that is not necessarily CPU 0 sees exactly it.
        let all = allowed();
        assert!(!all.is_empty());
        let last = *all.last().unwrap();
        std::thread::spawn(move || {
            pin(last);
            assert_eq!(allowed(), vec![last]);
        })
        .join()
        .unwrap();
    }
}
