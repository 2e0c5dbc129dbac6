#!/usr/bin/env bash
# PROXY_CMD for ../shared/bench: runs `strait node` in static mode so that it
# listens on exactly $LISTEN_HOST:$LISTEN_PORT and forwards to
# $UPSTREAM_HOST:$UPSTREAM_PORT (the harness exports these, and PROXY_WORKERS).
# The manifest is one ClusterIP Service whose clusterIP is the listen host and
# one operator-written EndpointSlice holding the upstream.
set -euo pipefail
: "${STRAIT_BIN:?path to the strait binary}"
: "${LISTEN_HOST:?}" "${LISTEN_PORT:?}" "${UPSTREAM_HOST:?}" "${UPSTREAM_PORT:?}"
# Kept with the results when the harness gives a RUNDIR.
dir="$(mktemp -d "${RUNDIR:-${TMPDIR:-/tmp}}/strait-manifest.XXXXXX")"
cat > "$dir/services.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: bench, namespace: default}
spec:
  clusterIP: $LISTEN_HOST
  ports:
  - {name: tcp, port: $LISTEN_PORT, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-1
  namespace: default
  labels: {kubernetes.io/service-name: bench}
addressType: IPv4
ports: [{name: tcp, port: $UPSTREAM_PORT, protocol: TCP}]
endpoints:
- addresses: ["$UPSTREAM_HOST"]
  conditions: {ready: true}
YAML
# One forwarding worker per CPU the harness lets the proxy use; the main
# runtime (static state, metrics) needs one thread.
export STRAIT_PROXY_WORKERS="${PROXY_WORKERS:-2}"
export TOKIO_WORKER_THREADS=1
export STRAIT_LOG="${STRAIT_LOG:-warn}"
# Only the forwarder is measured: no cluster DNS server.
export STRAIT_DNS_LISTEN=off
exec "$STRAIT_BIN" node --name bench --node-ip "$LISTEN_HOST" \
  --config-file "$dir/services.yaml" --data-dir "$dir"
