#!/usr/bin/env bash
# Control-plane benchmark: a 3-replica Strait cluster against a 3-member etcd
# cluster on loopback, same run, same load generator (bench/src, `ctlbench`):
# write throughput and p50/p99 (sequential, 16 conns × 1 and × 4 in flight)
# and leader failover (kill -9 → first acknowledged write). Takes ~5 minutes.
#   bench/control/run.sh                          # report → bench/control/results.md
#   bench/control/run.sh --duration 5s --kills 3  # any ctlbench flag passes through
# Installs Debian's etcd-server/etcd-client (as root) when `etcd` is missing.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"

if ! command -v etcd >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server etcd-client
fi

cargo build --release -p strait -p strait-bench
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
exec "$TARGET/release/ctlbench" --strait "$TARGET/release/strait" --etcd "$(command -v etcd)" \
  --out "$HERE/results.md" "$@"
