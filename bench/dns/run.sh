#!/usr/bin/env bash
# Cluster DNS benchmark: Strait's node agent vs NSD serving the same zone,
# each pinned to CPU 0, dnsperf on CPU 1, loopback only, bounded time.
# Writes bench/dns/results.md (and raw outputs under $WORK).
#
#   bench/dns/run.sh                  # ~3 minutes after the build
#   RUNS=1 SECS=5 bench/dns/run.sh    # quicker
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

need=()
command -v dnsperf >/dev/null 2>&1 || need+=(dnsperf)
command -v nsd >/dev/null 2>&1 || [ -x /usr/sbin/nsd ] || need+=(nsd)
command -v dig >/dev/null 2>&1 || need+=(bind9-dnsutils)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
# Debian starts nsd as a service on install; this benchmark runs its own.
if command -v systemctl >/dev/null 2>&1; then systemctl stop nsd >/dev/null 2>&1 || true; fi

STRAIT="${STRAIT:-$ROOT/target/release/strait}"
if [ -z "${SKIP_BUILD:-}" ]; then
  (cd "$ROOT" && cargo build --release --bin strait)
fi

export WORK="${WORK:-${TMPDIR:-/tmp}/strait-dns-bench}"
rm -rf "$WORK"
mkdir -p "$WORK"
exec python3 "$HERE/bench.py" --strait "$STRAIT" --work "$WORK" \
  --runs "${RUNS:-3}" --secs "${SECS:-10}" --out "${OUT:-$HERE/results.md}"
