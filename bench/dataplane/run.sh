#!/usr/bin/env bash
# Data-plane benchmark: direct vs Strait vs HAProxy and nginx in one
# interleaved run on loopback, with the measuring tool in ../shared/bench
# (read-only; results go under $BENCH_WORKDIR, default ~/.cache/strait-bench).
#   bench/dataplane/run.sh                 # direct haproxy nginx strait
#   ROUNDS=5 OUT=/tmp/r.md bench/dataplane/run.sh
# Any knob of the tool (ROUNDS, TESTS, THRU_SECS, ...) passes through;
# STRAIT_BIN=path skips the build and measures that binary.
# Run ../shared/bench/install.sh once first (apt: haproxy, nginx, iperf3, sockperf).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
TOOL="${BENCH_TOOL:-$ROOT/../shared/bench}"
[ -x "$TOOL/run.sh" ] || { echo "error: measuring tool not found at $TOOL (set BENCH_TOOL)" >&2; exit 2; }

if [ -z "${STRAIT_BIN:-}" ]; then
  cargo build --release --manifest-path "$ROOT/Cargo.toml" --bin strait
  # A private copy, so a rebuild during the run can't swap the binary.
  mkdir -p "${BENCH_WORKDIR:-$HOME/.cache/strait-bench}"
  cp "$ROOT/target/release/strait" "${BENCH_WORKDIR:-$HOME/.cache/strait-bench}/strait"
  export STRAIT_BIN="${BENCH_WORKDIR:-$HOME/.cache/strait-bench}/strait"
fi
export PROXY_NAME=strait
export PROXY_CMD="$HERE/strait-proxy.sh"
exec "$TOOL/run.sh" haproxy nginx custom
