//! The markdown report: both systems side by side, ratios Strait/etcd, the
//! per-kill failover rows, and which of issue 3's goals were met.

use std::fmt::Write as _;
use std::time::Duration;

use crate::failover::FailoverResult;
use crate::load::LoadResult;

/// Everything one system measured.
#[derive(Debug, Clone, Default)]
pub struct SystemResult {
    pub loads: Vec<LoadResult>,
    pub failover: FailoverResult,
}

/// Issue 3's targets.
const THROUGHPUT_GOAL: f64 = 1.5;
const FAILOVER_P50_GOAL: Duration = Duration::from_millis(500);
const FAILOVER_MAX_GOAL: Duration = Duration::from_millis(1500);

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "—".into()
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.3}", d.as_secs_f64()))
        .unwrap_or_else(|| "—".into())
}

fn secs_ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => ratio(a.as_secs_f64(), b.as_secs_f64()),
        _ => "—".into(),
    }
}

/// Renders the report; `header` describes the machine and the run.
pub fn markdown(header: &str, replicas: u16, strait: &SystemResult, etcd: &SystemResult) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{header}\n");
    let _ = writeln!(
        s,
        "### Writes ({replicas} replicas, fsync, closed loop, to the leader)\n"
    );
    let _ = writeln!(
        s,
        "| workload | Strait writes/s | p50 ms | p99 ms | etcd writes/s | p50 ms | p99 ms | throughput Strait/etcd | p50 Strait/etcd | p99 Strait/etcd |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for (a, b) in strait.loads.iter().zip(&etcd.loads) {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {} | {} | {} |",
            a.workload.name,
            a.throughput(),
            a.ms(0.5),
            a.ms(0.99),
            b.throughput(),
            b.ms(0.5),
            b.ms(0.99),
            ratio(a.throughput(), b.throughput()),
            ratio(a.ms(0.5), b.ms(0.5)),
            ratio(a.ms(0.99), b.ms(0.99)),
        );
    }
    let _ = writeln!(
        s,
        "\n| workload | system | writes | errors | max ms | server CPU µs/write (all members) | server cores | client cores |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for (name, r) in [("Strait", strait), ("etcd", etcd)] {
        for l in &r.loads {
            let _ = writeln!(
                s,
                "| {} | {name} | {} | {} | {:.1} | {} | {:.2} | {:.2} |",
                l.workload.name,
                l.ops,
                l.errors,
                l.hist.max() as f64 / 1000.0,
                l.server_cpu_per_op.as_micros(),
                l.server_cores,
                l.client_cores,
            );
        }
    }

    let (fa, fb) = (&strait.failover, &etcd.failover);
    let _ = writeln!(
        s,
        "\n### Leader failover (kill -9 of the leader → first acknowledged write)\n"
    );
    let _ = writeln!(
        s,
        "| system | kills | not recovered in 15 s | p50 s | max s | min s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for (name, f) in [("Strait", fa), ("etcd", fb)] {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} |",
            f.kills.len(),
            f.failed(),
            secs(f.p50()),
            secs(f.max()),
            secs(f.min()),
        );
    }
    let _ = writeln!(
        s,
        "| Strait/etcd | | | {} | {} | {} |",
        secs_ratio(fa.p50(), fb.p50()),
        secs_ratio(fa.max(), fb.max()),
        secs_ratio(fa.min(), fb.min()),
    );
    let _ = writeln!(
        s,
        "\n| kill | Strait: killed | s | via | term + | etcd: killed | s | via | term + |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    let n = fa.kills.len().max(fb.kills.len());
    for i in 0..n {
        let cell = |f: &FailoverResult| match f.kills.get(i) {
            Some(k) => format!(
                "{} | {} | {} | {}",
                k.killed,
                secs(k.recovery),
                k.via.map(|v| v.to_string()).unwrap_or_else(|| "—".into()),
                k.term_delta
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "—".into())
            ),
            None => " | | | ".into(),
        };
        let _ = writeln!(s, "| {} | {} | {} |", i + 1, cell(fa), cell(fb));
    }

    let _ = writeln!(s, "\n### Goals (issue 3)\n");
    let heavy = strait.loads.last().zip(etcd.loads.last());
    if let Some((a, b)) = heavy {
        let tp = a.throughput() / b.throughput().max(1e-9);
        let met = tp >= THROUGHPUT_GOAL && a.ms(0.99) <= b.ms(0.99);
        let _ = writeln!(
            s,
            "- ≥ {THROUGHPUT_GOAL}× etcd's throughput at equal or lower p99 ({}): {:.2}×, p99 {:.2} ms vs {:.2} ms — **{}**",
            a.workload.name,
            tp,
            a.ms(0.99),
            b.ms(0.99),
            if met { "met" } else { "missed" }
        );
    }
    let p50_met = fa.failed() == 0 && fa.p50().is_some_and(|d| d <= FAILOVER_P50_GOAL);
    let max_met = fa.failed() == 0 && fa.max().is_some_and(|d| d <= FAILOVER_MAX_GOAL);
    let _ = writeln!(
        s,
        "- failover p50 ≤ 0.5 s: {} s — **{}**",
        secs(fa.p50()),
        if p50_met { "met" } else { "missed" }
    );
    let _ = writeln!(
        s,
        "- failover max ≤ 1.5 s: {} s — **{}**",
        secs(fa.max()),
        if max_met { "met" } else { "missed" }
    );
    s
}
