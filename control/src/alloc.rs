//! ClusterIP, NodePort and LoadBalancer-IP allocators. They hold no state of
//! their own that is not derivable from the stored Services: every replica
//! rebuilds them from its objects and picks the same values for the same
//! write, so allocation is deterministic and needs no randomness.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Why an allocation or a range description failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// The requested value lies outside the range.
    #[error("provided {what} is not in the valid range. The range of valid {what}s is {range}")]
    OutOfRange { what: &'static str, range: String },
    /// The requested value is held by another object.
    #[error("provided {what} is already allocated")]
    Taken { what: &'static str },
    /// No value is free.
    #[error("range is full")]
    Full,
    /// A range flag that does not parse.
    #[error("invalid range {input:?}: {reason}")]
    BadRange { input: String, reason: String },
}

/// The part of a range a dynamic allocation prefers first; the bottom band
/// is kept for values users request explicitly (Kubernetes' KEP-3070/3668).
fn static_band(size: u128, divisor: u128, cap: u128) -> u128 {
    (size / divisor).clamp(16, cap).min(size)
}

/// A set of values kept as 64-bit blocks: the key is `value / 64`, the word
/// says which of that block's 64 values are in the set. A range handed out
/// densely (ClusterIPs from one CIDR) takes about a bit per value instead of
/// a tree entry per value, and a search for a free value tests a block per
/// step, with a tree a 64th of the size to descend (a `BTreeSet<u128>` of a
/// few hundred thousand ClusterIPs made that search a few percent of a
/// write's CPU on every replica).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValueSet {
    blocks: BTreeMap<u128, u64>,
    len: usize,
}

impl ValueSet {
    fn split(v: u128) -> (u128, u64) {
        (v >> 6, 1 << (v & 63))
    }

    pub fn contains(&self, v: u128) -> bool {
        let (block, bit) = Self::split(v);
        self.blocks.get(&block).is_some_and(|w| w & bit != 0)
    }

    /// Adds `v`; false if it was there.
    pub fn insert(&mut self, v: u128) -> bool {
        let (block, bit) = Self::split(v);
        let w = self.blocks.entry(block).or_insert(0);
        let added = *w & bit == 0;
        *w |= bit;
        self.len += usize::from(added);
        added
    }

    /// Removes `v`; false if it was not there.
    pub fn remove(&mut self, v: u128) -> bool {
        let (block, bit) = Self::split(v);
        let Some(w) = self.blocks.get_mut(&block) else {
            return false;
        };
        let removed = *w & bit != 0;
        *w &= !bit;
        if *w == 0 {
            self.blocks.remove(&block);
        }
        self.len -= usize::from(removed);
        removed
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The lowest value in `[from, to]` that is neither in the set nor in
    /// `reserved` (a handful of values taken by the same write).
    fn first_free(&self, from: u128, to: u128, reserved: &[u128]) -> Option<u128> {
        if from > to {
            return None;
        }
        let mut blocks = self.blocks.range(from >> 6..).peekable();
        let mut v = from;
        loop {
            let block = v >> 6;
            let mut taken = blocks.next_if(|(k, _)| **k == block).map_or(0, |(_, w)| *w);
            for r in reserved.iter().filter(|r| *r >> 6 == block) {
                taken |= 1 << (r & 63);
            }
            let free = !taken & (u64::MAX << (v & 63));
            if free != 0 {
                let found = (block << 6) + u128::from(free.trailing_zeros());
                return (found <= to).then_some(found);
            }
            v = block.checked_add(1)?.checked_mul(64)?;
            if v > to {
                return None;
            }
        }
    }
}

/// Picks a free value in `[lo, hi]` for `key`: in the upper (dynamic) band
/// first, starting at an offset derived from `key` and wrapping around,
/// then likewise in the lower band of `band` values.
fn pick(
    lo: u128,
    hi: u128,
    band: u128,
    used: &ValueSet,
    reserved: &[u128],
    key: &str,
) -> Option<u128> {
    let split = lo + band;
    let seed = fnv1a(key.as_bytes()) as u128;
    for (a, b) in [(split, hi), (lo, split.saturating_sub(1))] {
        if a > b {
            continue;
        }
        let n = b - a + 1;
        let start = a + seed % n;
        let found = used.first_free(start, b, reserved).or_else(|| {
            start
                .checked_sub(1)
                .and_then(|end| used.first_free(a, end, reserved))
        });
        if found.is_some() {
            return found;
        }
    }
    None
}

/// 64-bit FNV-1a: a stable, dependency-free hash for deterministic choices.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

fn u128_to_ip(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::from((v as u32).to_be_bytes())
    } else {
        IpAddr::from(v.to_be_bytes())
    }
}

/// Addresses from one CIDR (ClusterIPs).
#[derive(Debug, Clone)]
pub struct IpRange {
    net: IpNet,
    lo: u128,
    hi: u128,
    used: ValueSet,
}

impl IpRange {
    pub fn new(net: IpNet) -> Self {
        let net = net.trunc();
        let (mut lo, mut hi) = (ip_to_u128(net.network()), ip_to_u128(net.broadcast()));
        // Network and (IPv4) broadcast addresses are never handed out.
        if hi > lo + 1 {
            lo += 1;
            if matches!(net, IpNet::V4(_)) {
                hi -= 1;
            }
        }
        Self {
            net,
            lo,
            hi,
            used: ValueSet::default(),
        }
    }

    pub fn net(&self) -> IpNet {
        self.net
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let v = ip_to_u128(ip);
        self.net.contains(&ip) && v >= self.lo && v <= self.hi
    }

    pub fn is_used(&self, ip: IpAddr) -> bool {
        self.used.contains(ip_to_u128(ip))
    }

    /// Checks that `ip` may be given to a new owner.
    pub fn check(&self, ip: IpAddr) -> Result<(), AllocError> {
        if !self.contains(ip) {
            return Err(AllocError::OutOfRange {
                what: "IP",
                range: self.net.to_string(),
            });
        }
        if self.is_used(ip) {
            return Err(AllocError::Taken { what: "IP" });
        }
        Ok(())
    }

    /// A free address for `key`, not in `also_taken`.
    pub fn next_free(&self, key: &str, also_taken: &[IpAddr]) -> Result<IpAddr, AllocError> {
        let size = self.hi - self.lo + 1;
        let band = static_band(size, 16, 256);
        let extra: Vec<u128> = also_taken.iter().map(|ip| ip_to_u128(*ip)).collect();
        pick(self.lo, self.hi, band, &self.used, &extra, key)
            .map(|v| u128_to_ip(v, matches!(self.net, IpNet::V4(_))))
            .ok_or(AllocError::Full)
    }

    pub fn reserve(&mut self, ip: IpAddr) {
        if self.contains(ip) {
            self.used.insert(ip_to_u128(ip));
        }
    }

    pub fn release(&mut self, ip: IpAddr) {
        self.used.remove(ip_to_u128(ip));
    }

    pub fn used(&self) -> usize {
        self.used.len()
    }

    pub fn size(&self) -> u128 {
        self.hi - self.lo + 1
    }
}

/// A NodePort range such as `30000-32767`.
#[derive(Debug, Clone)]
pub struct PortRange {
    lo: u16,
    hi: u16,
    used: ValueSet,
}

impl FromStr for PortRange {
    type Err = AllocError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| AllocError::BadRange {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (a, b) = s.split_once('-').ok_or_else(|| bad("expected LOW-HIGH"))?;
        let lo: u16 = a.trim().parse().map_err(|_| bad("LOW is not a port"))?;
        let hi: u16 = b.trim().parse().map_err(|_| bad("HIGH is not a port"))?;
        if lo == 0 || lo > hi {
            return Err(bad("need 1 <= LOW <= HIGH <= 65535"));
        }
        Ok(Self {
            lo,
            hi,
            used: ValueSet::default(),
        })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    pub fn check(&self, port: u16) -> Result<(), AllocError> {
        if !self.contains(port) {
            return Err(AllocError::OutOfRange {
                what: "port",
                range: self.to_string(),
            });
        }
        if self.used.contains(u128::from(port)) {
            return Err(AllocError::Taken { what: "port" });
        }
        Ok(())
    }

    pub fn next_free(&self, key: &str, also_taken: &[u16]) -> Result<u16, AllocError> {
        let (lo, hi) = (u128::from(self.lo), u128::from(self.hi));
        let band = static_band(hi - lo + 1, 32, 128);
        let extra: Vec<u128> = also_taken.iter().map(|p| u128::from(*p)).collect();
        pick(lo, hi, band, &self.used, &extra, key)
            .map(|v| v as u16)
            .ok_or(AllocError::Full)
    }

    pub fn reserve(&mut self, port: u16) {
        if self.contains(port) {
            self.used.insert(u128::from(port));
        }
    }

    pub fn release(&mut self, port: u16) {
        self.used.remove(u128::from(port));
    }

    pub fn used(&self) -> usize {
        self.used.len()
    }

    pub fn size(&self) -> usize {
        usize::from(self.hi - self.lo) + 1
    }
}

/// The LoadBalancer address pool: CIDRs and `A-B` ranges, handed out lowest
/// first (MetalLB's auto-assign), requested addresses honoured.
#[derive(Debug, Clone, Default)]
pub struct LbPool {
    ranges: Vec<(u128, u128, bool)>,
    text: String,
    used: ValueSet,
}

impl FromStr for LbPool {
    type Err = AllocError;

    /// `10.0.0.0/28,192.0.2.10-192.0.2.20`; empty means no pool.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = |reason: &str| AllocError::BadRange {
                input: part.to_string(),
                reason: reason.to_string(),
            };
            if let Some((a, b)) = part.split_once('-') {
                let a: IpAddr = a.trim().parse().map_err(|_| bad("not an IP address"))?;
                let b: IpAddr = b.trim().parse().map_err(|_| bad("not an IP address"))?;
                if a.is_ipv4() != b.is_ipv4() || ip_to_u128(a) > ip_to_u128(b) {
                    return Err(bad("need FIRST-LAST of one family, FIRST <= LAST"));
                }
                ranges.push((ip_to_u128(a), ip_to_u128(b), a.is_ipv4()));
            } else {
                let net: IpNet = part
                    .parse()
                    .map_err(|_| bad("not a CIDR or FIRST-LAST range"))?;
                let net = net.trunc();
                let (mut a, mut b) = (ip_to_u128(net.network()), ip_to_u128(net.broadcast()));
                // Like MetalLB's avoidBuggyIPs: no network or broadcast address.
                if net.network().is_ipv4() && net.prefix_len() < 31 {
                    a += 1;
                    b -= 1;
                }
                ranges.push((a, b, net.network().is_ipv4()));
            }
        }
        Ok(Self {
            ranges,
            text: s.to_string(),
            used: ValueSet::default(),
        })
    }
}

impl LbPool {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let v = ip_to_u128(ip);
        self.ranges
            .iter()
            .any(|(a, b, v4)| *v4 == ip.is_ipv4() && (*a..=*b).contains(&v))
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), AllocError> {
        if !self.contains(ip) {
            return Err(AllocError::OutOfRange {
                what: "IP",
                range: self.text.clone(),
            });
        }
        if self.used.contains(ip_to_u128(ip)) {
            return Err(AllocError::Taken { what: "IP" });
        }
        Ok(())
    }

    pub fn next_free(&self) -> Result<IpAddr, AllocError> {
        for (a, b, v4) in &self.ranges {
            if let Some(v) = self.used.first_free(*a, *b, &[]) {
                return Ok(u128_to_ip(v, *v4));
            }
        }
        Err(AllocError::Full)
    }

    pub fn reserve(&mut self, ip: IpAddr) {
        if self.contains(ip) {
            self.used.insert(ip_to_u128(ip));
        }
    }

    pub fn release(&mut self, ip: IpAddr) {
        self.used.remove(ip_to_u128(ip));
    }

    pub fn used(&self) -> usize {
        self.used.len()
    }

    /// How many addresses the pool holds.
    pub fn size(&self) -> u128 {
        self.ranges
            .iter()
            .map(|(a, b, _)| b.saturating_sub(*a).saturating_add(1))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    /// `pick` as it was first written, one lookup per candidate: the
    /// reference the walking version must agree with.
    fn pick_by_probing(
        lo: u128,
        hi: u128,
        band: u128,
        used: &BTreeSet<u128>,
        reserved: &BTreeSet<u128>,
        key: &str,
    ) -> Option<u128> {
        let free = |v: &u128| !used.contains(v) && !reserved.contains(v);
        let split = lo + band;
        let seed = fnv1a(key.as_bytes()) as u128;
        for (a, b) in [(split, hi), (lo, split.saturating_sub(1))] {
            if a > b {
                continue;
            }
            let n = b - a + 1;
            let start = a + seed % n;
            if let Some(v) = (start..=b).chain(a..start).find(free) {
                return Some(v);
            }
        }
        None
    }

    proptest::proptest! {
        #[test]
        fn pick_gives_the_answer_of_probing_every_candidate(
            // Near 0, past 2^64 and at the top of u128 (IPv6): the block
            // arithmetic must neither overflow nor lose the high bits.
            base in proptest::sample::select(vec![0u128, 1 << 64, u128::MAX - 1_000]),
            lo in 0u128..200,
            len in 0u128..400,
            band in 0u128..100,
            used in proptest::collection::btree_set(0u128..700, 0..500),
            reserved in proptest::collection::btree_set(0u128..700, 0..6),
            key in "[a-z]{0,8}",
        ) {
            let (lo, hi) = (base + lo, base + (lo + len).min(1_000));
            let band = band.min(hi - lo + 1);
            let used: BTreeSet<u128> = used.into_iter().map(|v| base + v).collect();
            let reserved: BTreeSet<u128> = reserved.into_iter().map(|v| base + v).collect();
            let mut set = ValueSet::default();
            for v in &used {
                set.insert(*v);
            }
            let list: Vec<u128> = reserved.iter().copied().collect();
            proptest::prop_assert_eq!(
                pick(lo, hi, band, &set, &list, &key),
                pick_by_probing(lo, hi, band, &used, &reserved, &key)
            );
        }

        #[test]
        fn value_set_is_a_set(ops in proptest::collection::vec((proptest::bool::ANY, 0u128..300), 0..400)) {
            let mut set = ValueSet::default();
            let mut model = BTreeSet::new();
            for (add, v) in ops {
                if add {
                    proptest::prop_assert_eq!(set.insert(v), model.insert(v));
                } else {
                    proptest::prop_assert_eq!(set.remove(v), model.remove(&v));
                }
                proptest::prop_assert_eq!(set.len(), model.len());
            }
            for v in 0..300 {
                proptest::prop_assert_eq!(set.contains(v), model.contains(&v));
            }
            // No empty block is kept: a set emptied again equals a new one.
            for v in model {
                set.remove(v);
            }
            proptest::prop_assert_eq!(set, ValueSet::default());
        }
    }

    #[test]
    fn ip_range_bands_and_exhaustion() {
        let mut r = IpRange::new(net("10.0.0.0/28")); // 14 usable, band = 14
        let mut got = Vec::new();
        for i in 0..14 {
            let ip = r.next_free(&format!("svc-{i}"), &[]).expect("free");
            r.check(ip).expect("unused");
            r.reserve(ip);
            got.push(ip);
        }
        assert_eq!(r.next_free("x", &[]), Err(AllocError::Full));
        assert!(!got.contains(&"10.0.0.0".parse().expect("ip")));
        assert!(!got.contains(&"10.0.0.15".parse().expect("ip")));
        r.release(got[3]);
        assert_eq!(r.next_free("y", &[]), Ok(got[3]));
    }

    #[test]
    fn dynamic_prefers_upper_band() {
        let r = IpRange::new(net("10.96.0.0/12"));
        let ip = r.next_free("default/web", &[]).expect("free");
        let band_end: IpAddr = "10.96.1.0".parse().expect("ip");
        assert!(ip_to_u128(ip) > ip_to_u128(band_end), "{ip} in static band");
        // Deterministic: same key, same answer.
        assert_eq!(r.next_free("default/web", &[]), Ok(ip));
    }

    #[test]
    fn request_checks() {
        let mut r = IpRange::new(net("10.96.0.0/12"));
        let ip: IpAddr = "10.96.0.10".parse().expect("ip");
        r.check(ip).expect("free");
        r.reserve(ip);
        assert_eq!(r.check(ip), Err(AllocError::Taken { what: "IP" }));
        let out = r.check("10.0.0.1".parse().expect("ip")).expect_err("out");
        assert_eq!(
            out.to_string(),
            "provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12"
        );
    }

    #[test]
    fn node_ports() {
        let mut p: PortRange = "30000-30009".parse().expect("range");
        for _ in 0..10 {
            let v = p.next_free("k", &[]).expect("free");
            p.reserve(v);
        }
        assert_eq!(p.next_free("k", &[]), Err(AllocError::Full));
        assert_eq!(
            p.check(80).expect_err("out").to_string(),
            "provided port is not in the valid range. The range of valid ports is 30000-30009"
        );
        assert!("1-0".parse::<PortRange>().is_err());
        let d: PortRange = "30000-32767".parse().expect("range");
        let v = d.next_free("default/web", &[]).expect("free");
        assert!(v > 30085, "{v} is in the static band");
    }

    #[test]
    fn lb_pool() {
        let mut p: LbPool = "192.0.2.10-192.0.2.11,198.51.100.0/31,203.0.113.0/30"
            .parse()
            .expect("pool");
        let mut got = Vec::new();
        while let Ok(ip) = p.next_free() {
            p.reserve(ip);
            got.push(ip.to_string());
        }
        assert_eq!(
            got,
            [
                "192.0.2.10",
                "192.0.2.11",
                "198.51.100.0",
                "198.51.100.1",
                "203.0.113.1",
                "203.0.113.2"
            ]
        );
        assert!("nonsense".parse::<LbPool>().is_err());
    }
}
