//! The scenario table: each scenario prints its row (figures and the
//! invariants it checked) and writes it to `target/tmp/chaos/<scenario>.md`,
//! so the README's table is produced by the suite itself:
//! `cat target/tmp/chaos/*.md` after a run.

use std::path::Path;
use std::time::Duration;

/// Records one scenario's row.
pub fn row(scenario: &str, figures: &str, checked: &str) {
    let line = format!("| {scenario} | {figures} | {checked} |\n");
    print!("{line}");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos");
    std::fs::create_dir_all(&dir).expect("report dir");
    std::fs::write(dir.join(format!("{scenario}.md")), line).expect("report row");
}

/// `p50 X ms, max Y ms (n)` of some durations.
pub fn spread(v: &[Duration]) -> String {
    let mut ms: Vec<u128> = v.iter().map(|d| d.as_millis()).collect();
    ms.sort_unstable();
    match (ms.get(ms.len().saturating_sub(1) / 2), ms.last()) {
        (Some(p50), Some(max)) => format!("p50 {p50} ms, max {max} ms (n={})", ms.len()),
        _ => "none".into(),
    }
}
