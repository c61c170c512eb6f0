//! The XDP data plane as seen from userspace.
mod attach;
mod counters;
mod ebpf_log;
mod object;
mod rawbpf;
mod records;
mod testrun;

use std::{
    ffi::CString,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, links::FdLink},
};
use proxy_common::{
    DATAPLANE_STATS_MAP, EDGE_TC_PROGRAM, EDGE_XDP_PROGRAM, FLOOR_XDP_PROGRAM, PROTO_COUNTERS_MAP,
    RECORD_RING_PER_CPU_BYTES, RECORD_RINGS_MAP, RECORD_RINGS_MAX_CPUS, RECORDS_MAP,
    policy::{
        DPORT_RULES_MAP, DST_V4_MAP, DST_V6_MAP, POLICY_STATE_MAP, PROTO_RULES_MAP,
        RULE_ACTIONS_MAP, RULE_COUNTERS_MAP, SLOT_COUNTERS_MAP, SPORT_RULES_MAP, SRC_V4_MAP,
        SRC_V6_MAP, VERDICT_COUNTERS_MAP,
    },
};

/// Pinned maps that hold only counts, so one of another layout can be replaced by a
/// fresh one (its counts reset) rather than stop an upgrade.
const RESETTABLE_MAPS: [&str; 5] = [
    PROTO_COUNTERS_MAP,
    DATAPLANE_STATS_MAP,
    VERDICT_COUNTERS_MAP,
    SLOT_COUNTERS_MAP,
    RULE_COUNTERS_MAP,
];

/// Maps that live in the pin directory and so survive the daemon: policy, counters and
/// the record ring. (aya-log's ring is per process and is not pinned.)
pub const PINNED_MAPS: [&str; 16] = [
    RECORD_RINGS_MAP,
    PROTO_COUNTERS_MAP,
    DATAPLANE_STATS_MAP,
    VERDICT_COUNTERS_MAP,
    SLOT_COUNTERS_MAP,
    RULE_COUNTERS_MAP,
    RECORDS_MAP,
    POLICY_STATE_MAP,
    SRC_V4_MAP,
    DST_V4_MAP,
    SRC_V6_MAP,
    DST_V6_MAP,
    PROTO_RULES_MAP,
    DPORT_RULES_MAP,
    SPORT_RULES_MAP,
    RULE_ACTIONS_MAP,
];

pub use attach::{AttachedMode, HookChoice, error_chain};

/// The embedded eBPF object (for probes that load their own copy).
pub fn object_bytes() -> &'static [u8] {
    object::EBPF_OBJECT
}
pub use counters::{CounterSnapshot, DataplaneCounters};
pub use ebpf_log::EbpfLogDrain;
pub use rawbpf::{
    MmapArray, all_keys, delete_batch, into_map_data, link_detach, link_update, obj_get,
    update_batch,
};
pub use records::{
    RING_LOCK_PATIENCE, RecordTally, RecordView, Records, RingReaderLock, parse_record,
};
pub use testrun::{TestRunOutcome, XdpTestRunner, XdpVerdict};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "loading the eBPF object into the kernel failed (edgeproxy needs root and a kernel with BTF and XDP)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no program {0:?} (was it built from another version?)")]
    ProgramMissing(&'static str),
    #[error("the eBPF object has no map {0:?} (or it was already taken)")]
    MapMissing(&'static str),
    #[error("program {name:?}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name:?}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("interface name {0:?} contains a NUL byte")]
    BadInterfaceName(String),
    #[error("attaching XDP to {iface} failed: {reasons}")]
    Attach { iface: String, reasons: String },
    #[error("enabling BPF run-time statistics")]
    Stats(#[source] aya::sys::SyscallError),
    #[error("pin directory {dir}")]
    PinDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinned link {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("per-CPU record rings")]
    Rings(#[source] std::io::Error),
    #[error(
        "the maps pinned in {dir} were made by an edgeproxy with another map layout ({detail}): `edgeproxy detach IFACE` removes them and the stored policy (filtering stops until a start with --policy)"
    )]
    IncompatiblePins { dir: PathBuf, detail: String },
    #[error("mapping the record ring")]
    RecordRing(#[source] std::io::Error),
    #[error("locking the record rings under {dir}")]
    RingLock {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the record rings under {dir} are read by another process (another `logs --capture-from`, or an `edgeproxy run`, which reads them unless started with --leave-records): a ring has one reader"
    )]
    RingsTaken { dir: PathBuf },
    #[error("aya-log")]
    Log(#[source] aya_log::Error),
}

/// Cumulative run count and run time of a program, as the kernel measures them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl ProgramStats {
    pub fn since(&self, earlier: &ProgramStats) -> ProgramStats {
        ProgramStats {
            run_count: self.run_count.saturating_sub(earlier.run_count),
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
        }
    }

    pub fn ns_per_run(&self) -> Option<f64> {
        (self.run_count > 0).then(|| self.run_time_ns as f64 / self.run_count as f64)
    }
}

/// Turns on the kernel's per-program run-time accounting (BPF_ENABLE_STATS) for as long
/// as the returned fd is open; unlike the `kernel.bpf_stats_enabled` sysctl, nothing is
/// left switched on if the process dies.
pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd, DataplaneError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(DataplaneError::Stats)
}

/// Where records go: a ring per CPU (no cross-CPU contention, one consumer per CPU) or
/// one shared ring. The kernel must allow ring buffers as inner maps for per-CPU rings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RingMode {
    /// Per-CPU rings when the probe succeeds, else the shared ring (the reason logged).
    #[default]
    Auto,
    PerCpu,
    Shared,
}

impl std::str::FromStr for RingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "per-cpu" | "percpu" => Ok(Self::PerCpu),
            "shared" => Ok(Self::Shared),
            other => Err(format!(
                "unknown ring mode {other:?}: expected auto, per-cpu or shared"
            )),
        }
    }
}

/// How to load the object.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Highest aya-log level the eBPF side emits (lower levels are skipped in the kernel).
    pub ebpf_log_level: log::LevelFilter,
    /// Pin maps (and, on attach, the XDP link) here, reusing what is already pinned.
    /// `None`: everything is private to this process and goes away with it.
    pub pin_dir: Option<PathBuf>,
    pub rings: RingMode,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            ebpf_log_level: log::LevelFilter::Warn,
            pin_dir: None,
            rings: RingMode::Auto,
        }
    }
}

/// The loaded eBPF object: programs, maps, and the XDP attachment if any.
pub struct Dataplane {
    ebpf: Ebpf,
    attached: Option<AttachedMode>,
    pin_dir: Option<PathBuf>,
    /// Per-CPU record rings installed in RECORD_RINGS (empty: the shared ring is used).
    per_cpu_rings: Vec<aya::maps::MapData>,
}

impl Dataplane {
    /// Loads the embedded object and both programs into the kernel (not attached yet).
    pub fn load(opts: LoadOptions) -> Result<Self, DataplaneError> {
        let level = ebpf_log::aya_level(opts.ebpf_log_level);
        let mut loader = EbpfLoader::new();
        loader.override_global(ebpf_log::LEVEL_GLOBAL, &level, false);
        if let Some(dir) = &opts.pin_dir {
            // 0700 whatever the umask: whoever can write here can unlink the pinned link
            // and so detach the filter.
            crate::fsmode::create_private_subdir(dir).map_err(|source| DataplaneError::PinDir {
                dir: dir.clone(),
                source,
            })?;
            for name in PINNED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        // A pinned map of another layout (from another edgeproxy version): a counters
        // map is started afresh (its counts reset; the running program keeps its own
        // until the link is updated, so filtering never stops); any other is an error.
        let mut restarted = Vec::new();
        let ebpf = loop {
            match (loader.load(object::EBPF_OBJECT), &opts.pin_dir) {
                (Ok(ebpf), _) => break ebpf,
                (
                    Err(aya::EbpfError::MapError(aya::maps::MapError::IncompatiblePinnedMap {
                        name,
                        property,
                        expected,
                        actual,
                    })),
                    Some(dir),
                ) => {
                    let detail =
                        format!("{name}: {property} is {actual}, this edgeproxy needs {expected}");
                    if !RESETTABLE_MAPS.contains(&name.as_str()) || restarted.contains(&name) {
                        return Err(DataplaneError::IncompatiblePins {
                            dir: dir.clone(),
                            detail,
                        });
                    }
                    tracing::warn!(%detail, "a pinned counters map has another layout: starting it afresh (its counts reset)");
                    let pin = dir.join(&name);
                    std::fs::remove_file(&pin)
                        .map_err(|source| DataplaneError::PinDir { dir: pin, source })?;
                    restarted.push(name);
                }
                (Err(e), _) => return Err(DataplaneError::Load(e)),
            }
        };
        if let Some(dir) = &opts.pin_dir {
            for name in PINNED_MAPS {
                narrow_pin(&dir.join(name))?;
            }
        }
        let mut dp = Self {
            ebpf,
            attached: None,
            pin_dir: opts.pin_dir,
            per_cpu_rings: Vec::new(),
        };
        for name in [EDGE_XDP_PROGRAM, FLOOR_XDP_PROGRAM] {
            dp.xdp_mut(name)?
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        dp.tc_mut()?
            .load()
            .map_err(|source| DataplaneError::Program {
                name: EDGE_TC_PROGRAM,
                source,
            })?;
        match opts.rings {
            RingMode::Shared => {
                dp.clear_per_cpu_rings()?;
                tracing::info!("records: one shared ring (as configured)");
            }
            RingMode::PerCpu => {
                let n = dp.install_per_cpu_rings()?;
                tracing::info!(rings = n, "records: one ring per CPU");
            }
            RingMode::Auto => match dp.install_per_cpu_rings() {
                Ok(n) => tracing::info!(rings = n, "records: one ring per CPU"),
                Err(e) => {
                    dp.per_cpu_rings.clear();
                    tracing::warn!(
                        reason = %attach::error_chain(&e),
                        "records: per-CPU rings unavailable, using one shared ring"
                    );
                }
            },
        }
        Ok(dp)
    }

    fn xdp_mut(&mut self, name: &'static str) -> Result<&mut Xdp, DataplaneError> {
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::ProgramMissing(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    fn tc_mut(&mut self) -> Result<&mut SchedClassifier, DataplaneError> {
        let name = EDGE_TC_PROGRAM;
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::ProgramMissing(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    fn tc(&self) -> Result<&SchedClassifier, DataplaneError> {
        let name = EDGE_TC_PROGRAM;
        self.ebpf
            .program(name)
            .ok_or(DataplaneError::ProgramMissing(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    fn xdp(&self, name: &'static str) -> Result<&Xdp, DataplaneError> {
        self.ebpf
            .program(name)
            .ok_or(DataplaneError::ProgramMissing(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Where the maps are pinned (`None`: ephemeral).
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        self.pin_dir.as_deref()
    }

    /// Attaches to `iface` (resolved in the calling thread's network namespace) on the
    /// first hook of `choice` the kernel accepts; failures before it are logged with
    /// their reason. Without a pin directory the attachment lives as long as this
    /// `Dataplane`; with one, the link is pinned, or an existing pinned link adopted
    /// (its program swapped atomically), and outlives the process.
    pub fn attach(
        &mut self,
        iface: &str,
        choice: HookChoice,
    ) -> Result<AttachedMode, DataplaneError> {
        let name =
            CString::new(iface).map_err(|_| DataplaneError::BadInterfaceName(iface.into()))?;
        if let Some(dir) = self.pin_dir.clone()
            && let Some(mode) = self.adopt(iface, &dir)?
        {
            self.attached = Some(mode);
            return Ok(mode);
        }
        let mut reasons = Vec::new();
        for &mode in choice.order() {
            match self.attach_one(&name, mode) {
                Ok(()) => {
                    if reasons.is_empty() {
                        tracing::info!(iface, mode = mode.name(), "XDP attached");
                    } else {
                        tracing::warn!(iface, mode = mode.name(), fallback_reason = %reasons.join("; "), "XDP attached in fallback mode");
                    }
                    self.attached = Some(mode);
                    return Ok(mode);
                }
                Err(e) => {
                    let reason = format!("{}: {}", mode.name(), attach::error_chain(&e));
                    tracing::debug!(iface, %reason, "attach attempt failed");
                    reasons.push(reason);
                }
            }
        }
        Err(DataplaneError::Attach {
            iface: iface.to_owned(),
            reasons: reasons.join("; "),
        })
    }

    /// One hook; pins the link when this data plane is pinned.
    fn attach_one(
        &mut self,
        name: &std::ffi::CStr,
        mode: AttachedMode,
    ) -> Result<(), DataplaneError> {
        let pin = self.pin_dir.as_ref().map(|d| d.join(mode.link_pin()));
        let prog_err = |name, source| DataplaneError::Program { name, source };
        let fd_link: Option<FdLink> = match mode {
            AttachedMode::Native | AttachedMode::Generic => {
                let flags = if mode == AttachedMode::Native {
                    XdpMode::Driver
                } else {
                    XdpMode::Skb
                };
                let prog = self.xdp_mut(EDGE_XDP_PROGRAM)?;
                let id = prog
                    .attach(name, flags)
                    .map_err(|e| prog_err(EDGE_XDP_PROGRAM, e))?;
                match &pin {
                    None => None,
                    Some(_) => {
                        let link = prog
                            .take_link(id)
                            .map_err(|e| prog_err(EDGE_XDP_PROGRAM, e))?;
                        Some(FdLink::try_from(link).map_err(|e| pin_err(&pin, e))?)
                    }
                }
            }
            AttachedMode::Tc => {
                // tcx (kernel >= 6.6) needs no qdisc; the netlink path needs clsact.
                if let Err(e) = aya::programs::tc::qdisc_add_clsact(name) {
                    tracing::debug!(error = %e, "clsact qdisc not added (exists already, or tcx is used)");
                }
                let prog = self.tc_mut()?;
                let id = prog
                    .attach(name, TcAttachType::Ingress)
                    .map_err(|e| prog_err(EDGE_TC_PROGRAM, e))?;
                match &pin {
                    None => None,
                    Some(_) => {
                        let link = prog
                            .take_link(id)
                            .map_err(|e| prog_err(EDGE_TC_PROGRAM, e))?;
                        Some(FdLink::try_from(link).map_err(|e| pin_err(&pin, e))?)
                    }
                }
            }
            AttachedMode::Adopted => unreachable!("adoption is not an attach order entry"),
        };
        if let (Some(link), Some(path)) = (fd_link, &pin) {
            link.pin(path).map_err(|e| pin_err(&pin, e))?;
            narrow_pin(path)?;
        }
        Ok(())
    }

    /// Re-uses a link pinned by an earlier run: swaps this process's program in
    /// atomically (BPF_LINK_UPDATE), so filtering never stops and pinned maps carry on.
    fn adopt(&mut self, iface: &str, dir: &Path) -> Result<Option<AttachedMode>, DataplaneError> {
        for hook in [AttachedMode::Native, AttachedMode::Tc] {
            let path = dir.join(hook.link_pin());
            if !path.exists() {
                continue;
            }
            let link_err = |source| DataplaneError::Link {
                path: path.clone(),
                source,
            };
            let link = rawbpf::obj_get(&path).map_err(link_err)?;
            let prog_fd = match hook {
                AttachedMode::Tc => self.tc()?.fd(),
                _ => self.xdp(EDGE_XDP_PROGRAM)?.fd(),
            }
            .map_err(|source| DataplaneError::Program {
                name: EDGE_XDP_PROGRAM,
                source,
            })?;
            rawbpf::link_update(link.as_fd(), prog_fd.as_fd()).map_err(link_err)?;
            tracing::info!(iface, link = %path.display(), "XDP attached: adopted the pinned link, program replaced atomically");
            return Ok(Some(AttachedMode::Adopted));
        }
        Ok(None)
    }

    pub fn attached_mode(&self) -> Option<AttachedMode> {
        self.attached
    }

    /// Handle for reading the per-CPU counters (summed over CPUs).
    pub fn counters(&self) -> Result<DataplaneCounters<'_>, DataplaneError> {
        DataplaneCounters::new(&self.ebpf)
    }

    /// Fills RECORD_RINGS with one ring per possible CPU, re-using rings already there
    /// (a pinned array from an earlier run). Returns how many rings are in use.
    fn install_per_cpu_rings(&mut self) -> Result<usize, DataplaneError> {
        use aya::maps::{ArrayOfMaps, MapData};
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, source)| DataplaneError::Rings(source))?
            .get() as u32;
        if cpus > RECORD_RINGS_MAX_CPUS {
            return Err(DataplaneError::Rings(std::io::Error::other(format!(
                "{cpus} possible CPUs, the ring array holds {RECORD_RINGS_MAX_CPUS}"
            ))));
        }
        let map = self
            .ebpf
            .map_mut(RECORD_RINGS_MAP)
            .ok_or(DataplaneError::MapMissing(RECORD_RINGS_MAP))?;
        let mut outer: ArrayOfMaps<&mut MapData, MapData> =
            ArrayOfMaps::try_from(map).map_err(|source| DataplaneError::Map {
                name: RECORD_RINGS_MAP,
                source,
            })?;
        let mut rings = Vec::with_capacity(cpus as usize);
        for cpu in 0..cpus {
            let ring = match outer.get(&cpu, 0) {
                Ok(existing) => existing,
                Err(_) => {
                    let fd = rawbpf::create_ringbuf(RECORD_RING_PER_CPU_BYTES, "ep_rec_cpu")
                        .map_err(DataplaneError::Rings)?;
                    let ring = MapData::from_fd(fd).map_err(|source| DataplaneError::Map {
                        name: RECORD_RINGS_MAP,
                        source,
                    })?;
                    outer
                        .set(cpu, &ring, 0)
                        .map_err(|source| DataplaneError::Map {
                            name: RECORD_RINGS_MAP,
                            source,
                        })?;
                    ring
                }
            };
            rings.push(ring);
        }
        self.per_cpu_rings = rings;
        Ok(self.per_cpu_rings.len())
    }

    /// Empties RECORD_RINGS so every CPU uses the shared ring.
    fn clear_per_cpu_rings(&mut self) -> Result<(), DataplaneError> {
        self.per_cpu_rings.clear();
        let map = self
            .ebpf
            .map(RECORD_RINGS_MAP)
            .ok_or(DataplaneError::MapMissing(RECORD_RINGS_MAP))?;
        let aya::maps::Map::ArrayOfMaps(data) = map else {
            return Err(DataplaneError::MapMissing(RECORD_RINGS_MAP));
        };
        for cpu in 0..RECORD_RINGS_MAX_CPUS {
            match rawbpf::delete_elem(data, &cpu.to_ne_bytes()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(DataplaneError::Rings(e)),
            }
        }
        Ok(())
    }

    /// Whether records go to per-CPU rings (else the shared ring).
    pub fn ring_mode(&self) -> RingMode {
        if self.per_cpu_rings.is_empty() {
            RingMode::Shared
        } else {
            RingMode::PerCpu
        }
    }

    /// Takes the record rings (samples and captures): the per-CPU rings when installed,
    /// else the shared ring. There is one consumer per ring.
    pub fn take_records(&mut self) -> Result<Records, DataplaneError> {
        let shared = self
            .ebpf
            .take_map(RECORDS_MAP)
            .ok_or(DataplaneError::MapMissing(RECORDS_MAP))?;
        if self.per_cpu_rings.is_empty() {
            return Records::new(vec![shared], None);
        }
        // The shared ring is still drained: a CPU beyond the array would use it.
        let mut maps = vec![shared];
        maps.extend(self.per_cpu_rings.drain(..).map(aya::maps::Map::RingBuf));
        Records::new(maps, None)
    }

    /// Takes the policy maps out of this object for a [`crate::policy::loader::PolicyLoader`].
    pub fn take_policy_maps(
        &mut self,
    ) -> Result<crate::policy::loader::PolicyMaps, crate::policy::loader::LoaderError> {
        use crate::policy::loader::LoaderError;
        crate::policy::loader::PolicyMaps::open(|name| {
            self.ebpf
                .take_map(name)
                .and_then(rawbpf::into_map_data)
                .ok_or(LoaderError::Missing(name))
        })
    }

    /// Takes the aya-log ring buffer; its lines go to `log` and from there to `tracing`.
    pub fn take_logger(&mut self) -> Result<EbpfLogDrain, DataplaneError> {
        EbpfLogDrain::new(&mut self.ebpf)
    }

    /// Kernel run-time statistics of `edge_xdp` (zero unless BPF stats are enabled, see
    /// [`enable_run_time_stats`]).
    pub fn program_stats(&self) -> Result<ProgramStats, DataplaneError> {
        let info =
            self.xdp(EDGE_XDP_PROGRAM)?
                .info()
                .map_err(|source| DataplaneError::Program {
                    name: EDGE_XDP_PROGRAM,
                    source,
                })?;
        Ok(ProgramStats {
            run_count: info.run_count(),
            run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
        })
    }

    /// Runs `edge_xdp`, `edge_tc` or the floor program on crafted packets through
    /// BPF_PROG_TEST_RUN.
    pub fn test_runner(&self, program: &'static str) -> Result<XdpTestRunner<'_>, DataplaneError> {
        let prog = if program == EDGE_TC_PROGRAM {
            testrun::Prog::Tc(self.tc()?)
        } else {
            testrun::Prog::Xdp(self.xdp(program)?)
        };
        Ok(XdpTestRunner::new(prog, program))
    }
}

/// A pin is opened for writing by whoever its mode allows: 0600, in case the kernel's
/// default (0600 less the umask) or an earlier run left it wider.
fn narrow_pin(path: &Path) -> Result<(), DataplaneError> {
    match crate::fsmode::narrow_path(path, crate::fsmode::FILE_MODE) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DataplaneError::PinDir {
            dir: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn pin_err(path: &Option<PathBuf>, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Link {
        path: path.clone().unwrap_or_default(),
        source: std::io::Error::other(format!(
            "cannot pin the link (a netlink attachment cannot be pinned): {e}"
        )),
    }
}

/// The record rings of a pinned data plane: per-CPU rings by CPU (when installed), and
/// the shared ring. For a consumer in another process (`edgeproxy logs --capture-from`).
pub fn open_pinned_rings(
    pin_dir: &Path,
) -> Result<(Vec<(u32, aya::maps::MapData)>, aya::maps::MapData), DataplaneError> {
    use aya::maps::{ArrayOfMaps, Map, MapData};
    let open = |name: &'static str| {
        MapData::from_pin(pin_dir.join(name)).map_err(|source| DataplaneError::Map { name, source })
    };
    let shared = open(RECORDS_MAP)?;
    let outer = open(RECORD_RINGS_MAP)?;
    let outer: ArrayOfMaps<MapData, MapData> = ArrayOfMaps::try_from(Map::ArrayOfMaps(outer))
        .map_err(|source| DataplaneError::Map {
            name: RECORD_RINGS_MAP,
            source,
        })?;
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, e)| DataplaneError::Rings(e))?
        .get() as u32;
    let per_cpu = (0..cpus.min(RECORD_RINGS_MAX_CPUS))
        .filter_map(|c| outer.get(&c, 0).ok().map(|m| (c, m)))
        .collect();
    Ok((per_cpu, shared))
}

/// What `edgeproxy detach` removed.
#[derive(Clone, Debug, Default)]
pub struct DetachReport {
    pub link_detached: bool,
    pub pins_removed: usize,
}

/// Detaches the pinned link in `pin_dir` (even while a daemon still holds it) and removes
/// every pin and the directory.
pub fn detach_pinned(pin_dir: &Path) -> Result<DetachReport, DataplaneError> {
    let mut report = DetachReport::default();
    for hook in [AttachedMode::Native, AttachedMode::Tc] {
        let link_path = pin_dir.join(hook.link_pin());
        if !link_path.exists() {
            continue;
        }
        let link_err = |source| DataplaneError::Link {
            path: link_path.clone(),
            source,
        };
        let link = rawbpf::obj_get(&link_path).map_err(link_err)?;
        rawbpf::link_detach(link.as_fd()).map_err(link_err)?;
        report.link_detached = true;
    }
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(source) => {
            return Err(DataplaneError::PinDir {
                dir: pin_dir.to_owned(),
                source,
            });
        }
    };
    for entry in entries.flatten() {
        std::fs::remove_file(entry.path()).map_err(|source| DataplaneError::PinDir {
            dir: pin_dir.to_owned(),
            source,
        })?;
        report.pins_removed += 1;
    }
    std::fs::remove_dir(pin_dir).map_err(|source| DataplaneError::PinDir {
        dir: pin_dir.to_owned(),
        source,
    })?;
    Ok(report)
}
