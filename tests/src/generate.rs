//! Seeded generators for differential tests and benchmarks: random policies, and
//! packets biased towards what those policies match (addresses inside their prefixes,
//! ports at the edges of their ranges), plus the awkward shapes a parser must survive.
use std::net::{Ipv4Addr, Ipv6Addr};

use proxy_common::reference::{ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6};
use proxy_user::policy::{Action, Policy, PortRange, Prefix, Rate, Rule};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

use crate::packets::{self, Ipv4Extra, L4};

pub struct Gen {
    pub rng: StdRng,
    v4: Vec<Prefix>,
    v6: Vec<Prefix>,
    ports: Vec<u16>,
}

impl Gen {
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for _ in 0..24 {
            let len = rng.random_range(8..=32u8);
            let p = Prefix::V4 {
                addr: rng.random(),
                len: 32,
            }
            .truncate(len);
            v4.push(p);
            // Nested prefixes exercise the covering-prefix folding.
            let child_len = rng.random_range(len..=32);
            v4.push(
                Prefix::V4 {
                    addr: addr_in4(&mut rng, &p),
                    len: 32,
                }
                .truncate(child_len),
            );
            let len6 = rng.random_range(16..=128u8);
            let q = Prefix::V6 {
                addr: rng.random(),
                len: 128,
            }
            .truncate(len6);
            v6.push(q);
            let child6 = rng.random_range(len6..=128);
            v6.push(
                Prefix::V6 {
                    addr: addr_in6(&mut rng, &q),
                    len: 128,
                }
                .truncate(child6),
            );
        }
        v4.push("0.0.0.0/0".parse().expect("literal"));
        Self {
            rng,
            v4,
            v6,
            ports: vec![0, 1, 53, 80, 443, 514, 5140, 65535],
        }
    }

    fn port_range(&mut self) -> PortRange {
        let lo: u16 = if self.rng.random_bool(0.5) {
            *self.ports.choose(&mut self.rng).expect("non-empty")
        } else {
            self.rng.random()
        };
        let hi = lo.saturating_add(self.rng.random_range(0..200));
        self.ports
            .extend([lo.wrapping_sub(1), lo, hi, hi.wrapping_add(1)]);
        PortRange { lo, hi }
    }

    fn ranges(&mut self, p_any: f64) -> Vec<PortRange> {
        if self.rng.random_bool(p_any) {
            return Vec::new();
        }
        let mut v: Vec<PortRange> = (0..self.rng.random_range(1..=3))
            .map(|_| self.port_range())
            .collect();
        v.sort();
        // Merge overlaps: the parser forbids them, the compiler never sees them.
        let mut merged: Vec<PortRange> = Vec::new();
        for r in v {
            match merged.last_mut() {
                Some(last) if r.lo <= last.hi => last.hi = last.hi.max(r.hi),
                _ => merged.push(r),
            }
        }
        merged
    }

    fn prefixes(&mut self) -> Vec<Prefix> {
        if self.rng.random_bool(0.5) {
            return Vec::new();
        }
        let mut v: Vec<Prefix> = (0..self.rng.random_range(1..=4))
            .map(|_| {
                if self.rng.random_bool(0.6) {
                    *self.v4.choose(&mut self.rng).expect("non-empty")
                } else {
                    *self.v6.choose(&mut self.rng).expect("non-empty")
                }
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn action(&mut self) -> Action {
        match self.rng.random_range(0..4) {
            0 => Action::Pass,
            1 => Action::Drop,
            2 => Action::Sample {
                rate: Rate::parse("1/1").expect("literal"),
                snap: self.rng.random_range(1..=256),
            },
            _ => Action::Capture {
                max: self.rng.random_range(1..=4096),
                then_drop: self.rng.random_bool(0.5),
            },
        }
    }

    pub fn policy(&mut self, max_rules: usize) -> Policy {
        let n = self.rng.random_range(1..=max_rules);
        let simple = |g: &mut Self| {
            if g.rng.random_bool(0.5) {
                Action::Pass
            } else {
                Action::Drop
            }
        };
        let rules = (0..n)
            .map(|i| {
                let protos = if self.rng.random_bool(0.5) {
                    Vec::new()
                } else {
                    let mut p: Vec<u8> = [6u8, 17, 1, 58, 47]
                        .choose_multiple(&mut self.rng, 2)
                        .copied()
                        .collect();
                    p.sort_unstable();
                    p
                };
                Rule {
                    name: format!("r{i}"),
                    src: self.prefixes(),
                    dst: self.prefixes(),
                    protos,
                    dst_ports: self.ranges(0.6),
                    src_ports: self.ranges(0.85),
                    action: self.action(),
                }
            })
            .collect();
        Policy {
            default: simple(self),
            malformed: simple(self),
            non_ip: simple(self),
            rules,
        }
    }

    fn v4_addr(&mut self) -> Ipv4Addr {
        if self.rng.random_bool(0.7) {
            let p = *self.v4.choose(&mut self.rng).expect("non-empty");
            Ipv4Addr::from(addr_in4(&mut self.rng, &p))
        } else {
            Ipv4Addr::from(self.rng.random::<u32>())
        }
    }

    fn v6_addr(&mut self) -> Ipv6Addr {
        if self.rng.random_bool(0.7) {
            let p = *self.v6.choose(&mut self.rng).expect("non-empty");
            Ipv6Addr::from(addr_in6(&mut self.rng, &p))
        } else {
            Ipv6Addr::from(self.rng.random::<u128>())
        }
    }

    fn port(&mut self) -> u16 {
        if self.rng.random_bool(0.6) {
            *self.ports.choose(&mut self.rng).expect("non-empty")
        } else {
            self.rng.random()
        }
    }

    fn l4(&mut self) -> L4 {
        match self.rng.random_range(0..10) {
            0..=3 => L4::Udp {
                sport: self.port(),
                dport: self.port(),
                payload: (0..self.rng.random_range(0..300))
                    .map(|_| self.rng.random())
                    .collect(),
            },
            4..=6 => L4::Tcp {
                sport: self.port(),
                dport: self.port(),
            },
            7 | 8 => L4::Icmp,
            _ => L4::Other {
                proto: *[47u8, 50, 132].choose(&mut self.rng).expect("non-empty"),
                body: vec![0; 8],
            },
        }
    }

    /// One frame, then possibly truncated or with bytes flipped.
    pub fn packet(&mut self) -> Vec<u8> {
        let vlans: Vec<(u16, u16)> = match self.rng.random_range(0..10) {
            0 => vec![(ETH_P_8021Q, 7)],
            1 => vec![(ETH_P_8021AD, 8), (ETH_P_8021Q, 9)],
            _ => vec![],
        };
        let l4 = self.l4();
        let mut frame = match self.rng.random_range(0..20) {
            0 => packets::arp_request(),
            1 => packets::ethernet(&vlans, 0x88cc, &[0; 40]),
            2..=11 => {
                let extra = Ipv4Extra {
                    options: if self.rng.random_bool(0.2) {
                        vec![1; self.rng.random_range(1..=40)]
                    } else {
                        vec![]
                    },
                    frag_offset: if self.rng.random_bool(0.1) {
                        self.rng.random_range(1..8000)
                    } else {
                        0
                    },
                    more_fragments: self.rng.random_bool(0.1),
                };
                let (s, d) = (self.v4_addr(), self.v4_addr());
                packets::ethernet(&vlans, ETH_P_IP, &packets::ipv4(s, d, &l4, &extra))
            }
            _ => {
                let (s, d) = (self.v6_addr(), self.v6_addr());
                let mut ip = packets::ipv6(s, d, &l4);
                if self.rng.random_bool(0.3) {
                    ip = with_ipv6_extensions(&mut self.rng, ip);
                }
                packets::ethernet(&vlans, ETH_P_IPV6, &ip)
            }
        };
        if self.rng.random_bool(0.1) {
            let cut = self.rng.random_range(14..=frame.len());
            frame.truncate(cut);
        }
        if self.rng.random_bool(0.1) {
            for _ in 0..self.rng.random_range(1..4) {
                let i = self.rng.random_range(12..frame.len());
                frame[i] = self.rng.random();
            }
        }
        if frame.len() < 14 {
            frame.resize(14, 0);
        }
        frame
    }
}

fn addr_in4(rng: &mut StdRng, p: &Prefix) -> u32 {
    match *p {
        Prefix::V4 { addr, len } => {
            let host = if len == 32 {
                0
            } else {
                rng.random::<u32>() & (u32::MAX >> len)
            };
            addr | host
        }
        Prefix::V6 { .. } => rng.random(),
    }
}

fn addr_in6(rng: &mut StdRng, p: &Prefix) -> u128 {
    match *p {
        Prefix::V6 { addr, len } => {
            let host = if len == 128 {
                0
            } else {
                rng.random::<u128>() & (u128::MAX >> len)
            };
            addr | host
        }
        Prefix::V4 { .. } => rng.random(),
    }
}

/// Inserts 1–3 extension headers (hop-by-hop first when present) after the fixed header;
/// sometimes a fragment header, sometimes for a non-first fragment.
fn with_ipv6_extensions(rng: &mut StdRng, ip: Vec<u8>) -> Vec<u8> {
    let mut next = ip[6];
    let mut exts: Vec<Vec<u8>> = Vec::new();
    for _ in 0..rng.random_range(1..=3) {
        let kind = *[0u8, 43, 60, 44].choose(rng).expect("non-empty");
        let h = if kind == 44 {
            let off: u16 = if rng.random_bool(0.3) {
                rng.random_range(1..8000)
            } else {
                0
            };
            let fo = (off << 3) | u16::from(rng.random_bool(0.5));
            let mut h = vec![next, 0];
            h.extend_from_slice(&fo.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 9]);
            h
        } else {
            let units = rng.random_range(0..3usize);
            let mut h = vec![next, units as u8];
            h.resize((units + 1) * 8, 0);
            h
        };
        next = kind;
        exts.insert(0, h);
    }
    let mut out = ip[..40].to_vec();
    out[6] = next;
    for h in &exts {
        out.extend_from_slice(h);
    }
    out.extend_from_slice(&ip[40..]);
    let payload_len = (out.len() - 40) as u16;
    out[4..6].copy_from_slice(&payload_len.to_be_bytes());
    out
}
