//! A linearizability check for one register written with unique values
//! (Gibbons & Korach's zone test): each value's write and reads form a
//! cluster; the history is linearizable iff no two forward zones overlap and
//! no backward zone lies inside a forward zone, and no read precedes its write.

use std::collections::BTreeMap;

/// One completed (or possibly completed) operation; times in µs.
#[derive(Debug, Clone)]
pub struct Op {
    pub start: u64,
    /// `u64::MAX` for a write whose outcome is unknown.
    pub end: u64,
    pub write: bool,
    /// The value written or read; 0 is the initial (absent) value.
    pub value: u64,
}

/// Returns the first violation found, or None when linearizable.
pub fn check(ops: &[Op]) -> Option<String> {
    let mut clusters: BTreeMap<u64, (Option<&Op>, Vec<&Op>)> = BTreeMap::new();
    for op in ops {
        let c = clusters.entry(op.value).or_default();
        if op.write {
            c.0 = Some(op);
        } else {
            c.1.push(op);
        }
    }
    let mut forward = Vec::new();
    let mut backward = Vec::new();
    for (value, (write, reads)) in &clusters {
        // A value nobody read still has its zone when its write was
        // acknowledged (an acknowledged write that a later read does not see
        // was lost); a write of unknown outcome may never have happened.
        if reads.is_empty() && write.is_none_or(|w| w.end == u64::MAX) {
            continue;
        }
        // The initial value behaves as written at time 0.
        let w = match (write, *value) {
            (Some(w), _) => (w.start, w.end),
            (None, 0) => (0, 0),
            (None, v) => return Some(format!("value {v} was read but never written")),
        };
        if let Some(r) = reads.iter().find(|r| r.end < w.0) {
            return Some(format!(
                "read of {value} ended at {} before its write started at {}",
                r.end, w.0
            ));
        }
        let low = reads.iter().map(|r| r.end).chain([w.1]).min().unwrap_or(0);
        let high = reads
            .iter()
            .map(|r| r.start)
            .chain([w.0])
            .max()
            .unwrap_or(0);
        if low < high {
            forward.push((low, high, *value));
        } else {
            backward.push((high, low, *value));
        }
    }
    for (i, a) in forward.iter().enumerate() {
        for b in &forward[i + 1..] {
            if a.0 < b.1 && b.0 < a.1 {
                return Some(format!(
                    "values {} and {} have overlapping forward zones",
                    a.2, b.2
                ));
            }
        }
        for b in &backward {
            if a.0 < b.0 && b.1 < a.1 {
                return Some(format!(
                    "value {} (backward zone) lies inside value {}'s forward zone",
                    b.2, a.2
                ));
            }
        }
    }
    None
}

#[test]
fn checker_accepts_and_rejects() {
    let w = |s, e, v| Op {
        start: s,
        end: e,
        write: true,
        value: v,
    };
    let r = |s, e, v| Op {
        start: s,
        end: e,
        write: false,
        value: v,
    };
    assert!(check(&[w(0, 10, 1), r(11, 12, 1), w(13, 20, 2), r(21, 22, 2)]).is_none());
    // Reading the old value after the new one was read is stale.
    let stale = [w(0, 10, 1), w(11, 20, 2), r(21, 22, 2), r(23, 24, 1)];
    assert!(check(&stale).is_some());
    // Concurrent write and reads may go either way.
    assert!(check(&[w(0, 100, 1), r(10, 20, 0), r(30, 40, 1)]).is_none());
    // An acknowledged write nobody read, then a read of the value before
    // it: the write was lost (or the read is stale).
    let lost = [w(0, 10, 1), w(11, 20, 2), r(21, 22, 1)];
    assert!(check(&lost).is_some());
    // The same with the second write's outcome unknown: it may not have
    // happened.
    let unknown = [w(0, 10, 1), w(11, u64::MAX, 2), r(21, 22, 1)];
    assert!(check(&unknown).is_none());
}
