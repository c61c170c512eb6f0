//! Loads a compiled policy into the inactive slot, then flips the active slot with a
//! single map update. A failure before the flip leaves the data plane exactly as it
//! was (the inactive slot is never read); validation happens before any map is touched.
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{Array, MapData, MapError, PerCpuArray, PerCpuValues};
use nix::fcntl::{Flock, FlockArg};
use proxy_common::{
    Counter,
    policy::{
        ACTIONS_PER_SLOT, DPORT_RULES_MAP, DST_V4_MAP, DST_V6_MAP, POLICY_STATE_MAP, PORT_ENTRIES,
        PROTO_ENTRIES, PROTO_RULES_MAP, PolicyState, RULE_ACTIONS_MAP, RULE_COUNTERS_MAP,
        RuleAction, RuleSet, SLOTS, SPORT_RULES_MAP, SRC_V4_MAP, SRC_V6_MAP,
    },
};

use super::{
    compile::{CompiledPolicy, compile},
    model::Policy,
    prefix::Prefix,
};
use crate::dataplane::{MmapArray, all_keys, delete_batch, update_batch};

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {name}")]
    Io {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {0} is missing from the data plane (mismatched eBPF object?)")]
    Missing(&'static str),
    #[error("policy store {path}")]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no previous policy to roll back to (the other slot was never loaded)")]
    NothingToRollBack,
}

const LPM_MAPS: [&str; 4] = [SRC_V4_MAP, DST_V4_MAP, SRC_V6_MAP, DST_V6_MAP];
const KEY_V4: usize = 4 + 5;
const KEY_V6: usize = 4 + 17;
const SET_LEN: usize = size_of::<RuleSet>();

/// Handles on every map a policy lives in.
pub struct PolicyMaps {
    state: Array<MapData, PolicyState>,
    lpm: [MapData; 4],
    proto: MmapArray<RuleSet>,
    dport: MmapArray<RuleSet>,
    sport: MmapArray<RuleSet>,
    actions: MmapArray<RuleAction>,
    rule_counters: PerCpuArray<MapData, Counter>,
}

impl PolicyMaps {
    /// Builds the handles from a function that yields each map by name (taken out of a
    /// loaded object, or opened from its pin).
    pub fn open(
        mut get: impl FnMut(&'static str) -> Result<MapData, LoaderError>,
    ) -> Result<Self, LoaderError> {
        fn mmap<T: Copy>(name: &'static str, m: MapData) -> Result<MmapArray<T>, LoaderError> {
            MmapArray::new(m).map_err(|source| LoaderError::Io { name, source })
        }
        let state = get(POLICY_STATE_MAP)?;
        let lpm = [
            get(LPM_MAPS[0])?,
            get(LPM_MAPS[1])?,
            get(LPM_MAPS[2])?,
            get(LPM_MAPS[3])?,
        ];
        Ok(Self {
            state: Array::try_from(aya::maps::Map::Array(state)).map_err(|source| {
                LoaderError::Map {
                    name: POLICY_STATE_MAP,
                    source,
                }
            })?,
            lpm,
            proto: mmap(PROTO_RULES_MAP, get(PROTO_RULES_MAP)?)?,
            dport: mmap(DPORT_RULES_MAP, get(DPORT_RULES_MAP)?)?,
            sport: mmap(SPORT_RULES_MAP, get(SPORT_RULES_MAP)?)?,
            actions: mmap(RULE_ACTIONS_MAP, get(RULE_ACTIONS_MAP)?)?,
            rule_counters: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(get(
                RULE_COUNTERS_MAP,
            )?))
            .map_err(|source| LoaderError::Map {
                name: RULE_COUNTERS_MAP,
                source,
            })?,
        })
    }

    /// Opens the maps pinned in `dir` (by `edgeproxy run`).
    pub fn open_pinned(dir: &Path) -> Result<Self, LoaderError> {
        Self::open(|name| {
            MapData::from_pin(dir.join(name)).map_err(|source| LoaderError::Map { name, source })
        })
    }
}

/// What one load did, with its timings.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub slot: u32,
    pub generation: u64,
    pub lpm_entries: usize,
    pub compile: Duration,
    /// Writing the inactive slot, then the flip: when the policy is in force.
    pub apply: Duration,
    /// Deleting the LPM entries of the retired tag, after the flip.
    pub cleanup: Duration,
}

pub struct PolicyLoader {
    maps: PolicyMaps,
    /// Where each slot's policy source is kept for `show`, `diff` and `rollback`.
    store: Option<PathBuf>,
}

impl PolicyLoader {
    pub fn new(maps: PolicyMaps, store: Option<PathBuf>) -> Self {
        Self { maps, store }
    }

    pub fn state(&self) -> Result<PolicyState, LoaderError> {
        self.maps
            .state
            .get(&0, 0)
            .map_err(|source| LoaderError::Map {
                name: POLICY_STATE_MAP,
                source,
            })
    }

    /// Serialises loaders across processes (CLI invocations) through the store's lock.
    fn lock(&self) -> Result<Option<Flock<fs::File>>, LoaderError> {
        let Some(dir) = &self.store else {
            return Ok(None);
        };
        let path = dir.join("lock");
        let store_err = |source| LoaderError::Store {
            path: path.clone(),
            source,
        };
        // 0700 / 0600 whatever the umask: the stored sources are what `policy show`,
        // `diff` and `rollback` trust.
        crate::fsmode::create_private_subdir(dir).map_err(|source| LoaderError::Store {
            path: dir.clone(),
            source,
        })?;
        let f = crate::fsmode::open_private_append(&path, false).map_err(store_err)?;
        Flock::lock(f, FlockArg::LockExclusive)
            .map(Some)
            .map_err(|(_, e)| store_err(e.into()))
    }

    /// Compiles `policy`, writes it into the inactive slot and makes it active.
    pub fn load(&mut self, policy: &Policy, source: &str) -> Result<LoadReport, LoaderError> {
        let _lock = self.lock()?;
        let t0 = Instant::now();
        let compiled = compile(policy);
        let compile_time = t0.elapsed();
        let t1 = Instant::now();
        let mut state = self.state()?;
        if state.cleanup_pending != 0 {
            // An earlier clean-up was interrupted: the fresh tag may still hold entries.
            self.cleanup(&state)?;
            state.cleanup_pending = 0;
            self.set_state(&state)?;
        }
        let target = 1 - (state.active_slot & 1);
        let tag = (1..=u8::MAX)
            .find(|t| !state.lpm_tag.contains(t))
            .expect("two tags in use leave 253 free");
        let lpm_entries = self.write_slot(target, tag, &compiled)?;
        let generation = state.generation.iter().copied().max().unwrap_or(0) + 1;
        let mut next = state;
        next.generation[target as usize] = generation;
        next.lpm_tag[target as usize] = tag;
        next.active_slot = target;
        next.cleanup_pending = 1;
        // The flip: one update of one entry. Everything above went to the inactive slot.
        self.set_state(&next)?;
        let apply = t1.elapsed();
        self.store_source(target, source)?;
        let t2 = Instant::now();
        self.cleanup(&next)?;
        next.cleanup_pending = 0;
        self.set_state(&next)?;
        Ok(LoadReport {
            slot: target,
            generation,
            lpm_entries,
            compile: compile_time,
            apply,
            cleanup: t2.elapsed(),
        })
    }

    fn set_state(&mut self, s: &PolicyState) -> Result<(), LoaderError> {
        self.maps
            .state
            .set(0, s, 0)
            .map_err(|source| LoaderError::Map {
                name: POLICY_STATE_MAP,
                source,
            })
    }

    /// Deletes every LPM entry whose tag is not one of the two slots' tags.
    fn cleanup(&mut self, state: &PolicyState) -> Result<(), LoaderError> {
        for (i, map) in self.maps.lpm.iter().enumerate() {
            let key_size = if i < 2 { KEY_V4 } else { KEY_V6 };
            let name = LPM_MAPS[i];
            let io = |source| LoaderError::Io { name, source };
            let retired: Vec<u8> = all_keys(map, key_size, SET_LEN)
                .map_err(io)?
                .chunks_exact(key_size)
                .filter(|k| !state.lpm_tag.contains(&k[4]))
                .flatten()
                .copied()
                .collect();
            delete_batch(map, &retired, key_size).map_err(io)?;
        }
        Ok(())
    }

    /// Makes the other slot active again. Its contents are untouched since its own load.
    pub fn rollback(&mut self) -> Result<PolicyState, LoaderError> {
        let _lock = self.lock()?;
        let state = self.state()?;
        let other = 1 - (state.active_slot & 1);
        if state.generation[other as usize] == 0 {
            return Err(LoaderError::NothingToRollBack);
        }
        let mut next = state;
        next.active_slot = other;
        self.set_state(&next)?;
        Ok(next)
    }

    /// Hits per action entry of `slot` (rules, then default, malformed, non-IP).
    pub fn rule_counters(&self, slot: u32) -> Result<Vec<Counter>, LoaderError> {
        (0..ACTIONS_PER_SLOT)
            .map(|i| {
                let v = self
                    .maps
                    .rule_counters
                    .get(&(slot * ACTIONS_PER_SLOT + i), 0)
                    .map_err(|source| LoaderError::Map {
                        name: RULE_COUNTERS_MAP,
                        source,
                    })?;
                Ok(v.iter().fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                }))
            })
            .collect()
    }

    /// The policy source stored with `slot`, if there is a store and it was loaded.
    pub fn stored_source(&self, slot: u32) -> Option<String> {
        let dir = self.store.as_ref()?;
        fs::read_to_string(dir.join(format!("slot{slot}.toml"))).ok()
    }

    fn store_source(&self, slot: u32, source: &str) -> Result<(), LoaderError> {
        let Some(dir) = &self.store else {
            return Ok(());
        };
        let path = dir.join(format!("slot{slot}.toml"));
        crate::fsmode::replace_file(&path, source.as_bytes(), crate::fsmode::FILE_MODE)
            .map_err(|source| LoaderError::Store { path, source })
    }

    /// Writes everything of `c` into `slot`, its LPM entries under `tag` (which holds no
    /// entries: [`Self::cleanup`] removed every tag not in use).
    fn write_slot(&mut self, slot: u32, tag: u8, c: &CompiledPolicy) -> Result<usize, LoaderError> {
        let mut entries = 0;
        for (i, list) in [&c.src_v4, &c.dst_v4, &c.src_v6, &c.dst_v6]
            .into_iter()
            .enumerate()
        {
            let key_size = if i < 2 { KEY_V4 } else { KEY_V6 };
            let map = &self.maps.lpm[i];
            let name = LPM_MAPS[i];
            let io = |source| LoaderError::Io { name, source };
            let (keys, values) = encode_lpm(tag, list, key_size);
            update_batch(map, &keys, &values, key_size, SET_LEN).map_err(io)?;
            entries += list.len();
        }
        for (i, set) in c.proto.iter().enumerate() {
            self.maps.proto.set(slot * PROTO_ENTRIES + i as u32, *set);
        }
        for (i, set) in c.dport.iter().enumerate() {
            self.maps.dport.set(slot * PORT_ENTRIES + i as u32, *set);
        }
        for (i, set) in c.sport.iter().enumerate() {
            self.maps.sport.set(slot * PORT_ENTRIES + i as u32, *set);
        }
        for (i, a) in c.actions.iter().enumerate() {
            self.maps
                .actions
                .set(slot * ACTIONS_PER_SLOT + i as u32, *a);
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| LoaderError::Io {
            name: RULE_COUNTERS_MAP,
            source,
        })?;
        for i in 0..ACTIONS_PER_SLOT {
            let zeros = PerCpuValues::try_from(vec![Counter::default(); cpus.get() as usize])
                .map_err(|source| LoaderError::Io {
                    name: RULE_COUNTERS_MAP,
                    source,
                })?;
            self.maps
                .rule_counters
                .set(slot * ACTIONS_PER_SLOT + i, zeros, 0)
                .map_err(|source| LoaderError::Map {
                    name: RULE_COUNTERS_MAP,
                    source,
                })?;
        }
        Ok(entries)
    }
}

/// LPM keys (`u32` prefix length incl. the tag byte, tag, address) and rule-set values.
fn encode_lpm(tag: u8, list: &[(Prefix, RuleSet)], key_size: usize) -> (Vec<u8>, Vec<u8>) {
    let mut keys = Vec::with_capacity(list.len() * key_size);
    let mut values = Vec::with_capacity(list.len() * SET_LEN);
    for (p, set) in list {
        keys.extend_from_slice(&(8 + u32::from(p.prefix_len())).to_ne_bytes());
        keys.push(tag);
        match *p {
            Prefix::V4 { addr, .. } => keys.extend_from_slice(&addr.to_be_bytes()),
            Prefix::V6 { addr, .. } => keys.extend_from_slice(&addr.to_be_bytes()),
        }
        for w in set.words {
            values.extend_from_slice(&w.to_ne_bytes());
        }
    }
    debug_assert_eq!(keys.len(), list.len() * key_size);
    (keys, values)
}

const _: () = assert!(SLOTS == 2, "tags are chosen outside the two in use");
