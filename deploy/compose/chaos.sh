#!/usr/bin/env bash
# Chaos on the compose cluster: faults injected with `docker kill`,
# `docker pause` and `docker network disconnect` while a writer applies
# objects and clients send traffic; each scenario checks named invariants
# and prints its figures. Brings the cluster up (building the image), runs
# every scenario, tears everything down, exits non-zero on any violation.
#
#   deploy/compose/chaos.sh                 all scenarios
#   deploy/compose/chaos.sh leader-kill ... only these (leader-kill,
#                                           leader-pause, replica-disconnect,
#                                           node-kill, backend-kill)
#   CHAOS_KEEP=1 deploy/compose/chaos.sh    leave the cluster running after
#   CHAOS_NO_BUILD=1 ...                    use the image already built
#
# Traffic stays on the private network strait-net the compose file creates.
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")"
root="$(cd ../.. && pwd)"
all=(leader-kill leader-pause replica-disconnect node-kill backend-kill)
scenarios=("${@:-${all[@]}}")
[ $# -eq 0 ] && scenarios=("${all[@]}")

# Build the binary and image first (as long as cargo takes); everything
# after is bounded: cluster, scenarios and teardown are cut at 8 minutes.
if [ -z "${CHAOS_BOUNDED:-}" ]; then
  [ -n "${CHAOS_NO_BUILD:-}" ] || ../docker/build.sh "${STRAIT_IMAGE:-strait:dev}"
  export CHAOS_BOUNDED=1
  exec timeout --kill-after=30 480 "$self" "$@"
fi

bin="$root/target/static/x86_64-unknown-linux-gnu/release/strait"
work="$(mktemp -d)"
servers=(10.201.0.11:7700 10.201.0.12:7700 10.201.0.13:7700)
violations=()
summary=()
bg_pids=()

log() { printf '%s %s\n' "$(date +%H:%M:%S.%3N)" "$*"; }
now_ms() { date +%s%3N; }

cleanup() {
  local pid
  for pid in "${bg_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -z "${CHAOS_KEEP:-}" ]; then
    ./up.sh down >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# ---- the cluster --------------------------------------------------------
./up.sh down >/dev/null 2>&1 || true
./up.sh
for f in admin-compose.crt admin-compose.key ca.crt; do
  docker cp "strait-client:/etc/strait/certs/$f" "$work/$f" >/dev/null
done
export STRAIT_TLS_CERT="$work/admin-compose.crt" STRAIT_TLS_KEY="$work/admin-compose.key" \
  STRAIT_TLS_CA="$work/ca.crt" STRAIT_LOG=error

# The CLI on the host against a list of replicas (comma-separated).
cli() { local s="$1"; shift; timeout 10 "$bin" --server "$s" "$@"; }
all_servers() { local IFS=,; echo "${servers[*]}"; }
others() { # replicas except id $1
  local out=() i
  for i in 1 2 3; do [ "$i" = "$1" ] || out+=("${servers[$((i - 1))]}"); done
  local IFS=,; echo "${out[*]}"
}

# The leader id as replicas other than $1 (or any) see it; 0 if none.
# `cluster status` prints the leader line first, then asks every member
# (a frozen one answers late): read the line as soon as it is there.
leader() {
  local s f pid l="" i
  s=$([ -n "${1:-}" ] && others "$1" || all_servers)
  f=$(mktemp -p "$work")
  "$bin" --server "$s" cluster status >"$f" 2>/dev/null &
  pid=$!
  for i in $(seq 200); do
    l=$(awk '/^leader:/ {print $2; exit}' "$f")
    [ -n "$l" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$f"
  echo "${l:-0}"
}

# A leader other than $1, as the other replicas see it.
new_leader_besides() { local l; l=$(leader "$1"); [ "${l:-0}" -gt 0 ] && [ "$l" != "$1" ]; }

# Polls "$@" every 100 ms until it succeeds; fails after $deadline_s.
deadline_s=60
wait_for() {
  local what="$1"; shift
  local end=$((SECONDS + deadline_s))
  until "$@"; do
    if [ $SECONDS -ge $end ]; then log "timed out waiting for $what"; return 1; fi
    sleep 0.1
  done
}

violation() { log "VIOLATION [$scenario] $*"; violations+=("$scenario: $*"); }

# Invariant "converged": every replica answers, exactly one leader, and all
# report the same last log and applied index; every container healthy.
converged() {
  local st
  st=$(cli "$(all_servers)" cluster status 2>/dev/null) || return 1
  awk 'NR>2 {
         if ($3 == "unreachable") bad=1
         if ($3 == "leader") leaders++
         last[$5]=1; applied[$6]=1; n++
       }
       END { if (bad || n != 3 || leaders != 1 || length(last) != 1 || length(applied) != 1) exit 1 }' <<<"$st" || return 1
  ! docker ps -a --filter name=strait- --format '{{.Names}} {{.Status}}' | grep -qv '(healthy)'
}

# ---- load ----------------------------------------------------------------
# A writer applying one headless Service per request, rotating the replica
# it calls first; names it got an answer for are "acknowledged".
start_writer() {
  : >"$work/acked"; : >"$work/unacked"; rm -f "$work/stop-writer"
  (
    n=0
    while [ ! -e "$work/stop-writer" ]; do
      n=$((n + 1)); name="w-$scenario-$n"
      a=${servers[$((n % 3))]}; b=${servers[$(((n + 1) % 3))]}; c=${servers[$(((n + 2) % 3))]}
      if printf 'apiVersion: v1\nkind: Service\nmetadata: {name: %s}\nspec:\n  clusterIP: None\n  ports: [{port: 80}]\n' "$name" \
        | cli "$a,$b,$c" apply -f - >/dev/null 2>&1; then
        echo "$name" >>"$work/acked"
      else
        echo "$name" >>"$work/unacked"
      fi
    done
  ) &
  writer_pid=$!
  bg_pids+=("$writer_pid")
}

stop_writer() {
  touch "$work/stop-writer"
  wait "$writer_pid" 2>/dev/null || true
}

# Invariant "no acknowledged write lost": every acknowledged name is in a
# linearizable list after the fault.
check_writes() {
  local have lost acked unacked
  have=$(cli "$(all_servers)" get svc 2>/dev/null | awk 'NR>1 {print $1}') \
    || { violation "cannot list Services after the fault"; return; }
  acked=$(wc -l <"$work/acked"); unacked=$(wc -l <"$work/unacked")
  lost=$(comm -23 <(sort "$work/acked") <(sort <<<"$have") | wc -l)
  [ "$acked" -gt 0 ] || violation "no write was acknowledged at all"
  [ "$lost" -eq 0 ] || violation "no acknowledged write lost: $lost of $acked acknowledged writes missing"
  figures+=" writes_acked=$acked writes_unacked=$unacked writes_lost=$lost"
}

# Client traffic: `strait demo probe` from the client Pod (on node-1, to the
# ClusterIP) or from the host (NodePorts, LB IP) in the background.
start_probe() { # name where target [extra...]
  local name="$1" where="$2" target="$3"; shift 3
  local cmd=(demo probe "$target" --count 0 --concurrency 2 --interval 20ms --timeout 5s --quiet "$@")
  if [ "$where" = client ]; then
    docker exec strait-client strait "${cmd[@]}" >"$work/probe-$name" 2>&1 &
  else
    "$bin" "${cmd[@]}" >"$work/probe-$name" 2>&1 &
  fi
  bg_pids+=($!)
  eval "probe_pid_$name=$! probe_where_$name=$where"
}

# Stops probe $1 (SIGTERM: it prints its figures and exits) and sets
# p_ok, p_failed, p_p99, p_max from its last figures line.
stop_probe() {
  local name="$1" pid line i
  pid=$(eval echo "\$probe_pid_$name")
  if [ "$(eval echo "\$probe_where_$name")" = client ]; then pkill_in_client; else kill -TERM "$pid" 2>/dev/null || true; fi
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  line=$(grep '^probe ' "$work/probe-$name" | tail -1)
  p_ok=$(sed -n 's/.* ok=\([0-9]*\).*/\1/p' <<<"$line"); p_failed=$(sed -n 's/.* failed=\([0-9]*\).*/\1/p' <<<"$line")
  p_p99=$(sed -n 's/.* p99_ms=\([0-9.]*\).*/\1/p' <<<"$line"); p_max=$(sed -n 's/.* max_ms=\([0-9.]*\).*/\1/p' <<<"$line")
  p_ok=${p_ok:-0} p_failed=${p_failed:-missing} p_p99=${p_p99:-0} p_max=${p_max:-0}
  if [ "$p_failed" = missing ]; then log "probe $name printed no figures:"; tail -5 "$work/probe-$name"; fi
}

# `docker exec` does not forward signals to the process it started; the
# probe in the client is found by its arguments (strait is PID 1 there, the
# probe is the only other `demo probe` with --count 0 and concurrency 2).
pkill_in_client() {
  local pid
  for pid in $(docker top strait-client -eo pid,args 2>/dev/null | awk '/demo probe .*--concurrency 2/ {print $1}'); do
    kill -TERM "$pid" 2>/dev/null || true
  done
}

# Invariant "zero failed client connections" for probe $1.
check_probe_zero() {
  local name="$1"
  stop_probe "$name"
  figures+=" ${name}_ok=$p_ok ${name}_failed=$p_failed ${name}_p99_ms=$p_p99 ${name}_max_ms=$p_max"
  [ "$p_failed" = 0 ] || violation "zero failed client connections ($name): $p_failed failed, $p_ok ok"
  [ "$p_ok" -gt 0 ] || violation "client traffic flowed ($name): no successful request"
}

finish() { # scenario figures
  deadline_s=90
  local t0; t0=$(now_ms)
  if wait_for "convergence" converged; then
    figures+=" converge_ms=$(($(now_ms) - t0))"
  else
    violation "the cluster converges: replicas or containers did not agree/heal within 90 s"
    cli "$(all_servers)" cluster status || true
    docker ps -a --filter name=strait- --format '{{.Names}} {{.Status}}'
  fi
  deadline_s=60
  log "FIGURES $scenario:$figures"
  summary+=("$scenario:$figures")
}

# ---- scenarios -------------------------------------------------------------

# kill -9 the leader under write and traffic load, restart it.
scenario_leader_kill() {
  local old new t0
  old=$(leader); [ "$old" -gt 0 ] || { violation "no leader before the fault"; return; }
  start_writer; start_probe clusterip client 10.96.0.10:80
  sleep 3
  log "docker kill -s KILL strait-control-$old (the leader)"
  t0=$(now_ms); docker kill -s KILL "strait-control-$old" >/dev/null
  wait_for "a new leader" new_leader_besides "$old" \
    || violation "a new leader is elected after the leader is killed"
  new=$(leader "$old")
  figures=" killed=control-$old new_leader=control-$new failover_ms=$(($(now_ms) - t0))"
  sleep 3
  docker start "strait-control-$old" >/dev/null
  sleep 2
  stop_writer
  check_probe_zero clusterip
  check_writes
  finish
}

# Freeze the leader well beyond the election timeout (300-400 ms of silence), resume it.
scenario_leader_pause() {
  local old new t0
  old=$(leader); [ "$old" -gt 0 ] || { violation "no leader before the fault"; return; }
  start_writer; start_probe clusterip client 10.96.0.10:80
  sleep 3
  log "docker pause strait-control-$old (the leader) for 5 s"
  t0=$(now_ms); docker pause "strait-control-$old" >/dev/null
  wait_for "a new leader" new_leader_besides "$old" \
    || violation "a new leader is elected while the leader is paused"
  new=$(leader "$old")
  figures=" paused=control-$old new_leader=control-$new failover_ms=$(($(now_ms) - t0))"
  sleep $((5 - ($(now_ms) - t0) / 1000 > 0 ? 5 - ($(now_ms) - t0) / 1000 : 0))
  docker unpause "strait-control-$old" >/dev/null
  log "docker unpause strait-control-$old"
  sleep 2
  stop_writer
  check_probe_zero clusterip
  check_writes
  finish
  local l; l=$(leader)
  [ "$l" != "$old" ] || [ "$new" = "$old" ] || violation "the resumed old leader does not take over by itself (stale leader $old)"
}

# Cut the leader off the network (the worst replica to lose), reconnect it.
scenario_replica_disconnect() {
  local old new t0 ip
  old=$(leader); [ "$old" -gt 0 ] || { violation "no leader before the fault"; return; }
  ip="10.201.0.1$old"
  start_writer; start_probe clusterip client 10.96.0.10:80
  sleep 3
  log "docker network disconnect strait-net strait-control-$old (the leader)"
  t0=$(now_ms); docker network disconnect strait-net "strait-control-$old"
  wait_for "a new leader" new_leader_besides "$old" \
    || violation "the majority elects a new leader when the leader is cut off"
  new=$(leader "$old")
  figures=" disconnected=control-$old new_leader=control-$new failover_ms=$(($(now_ms) - t0))"
  sleep 5
  docker network connect --ip "$ip" strait-net "strait-control-$old"
  log "docker network connect strait-net strait-control-$old"
  sleep 2
  stop_writer
  check_probe_zero clusterip
  check_writes
  finish
}

node_ready() { # name -> 0 if Ready=True
  cli "$(all_servers)" get nodes 2>/dev/null | awk -v n="$1" '$1 == n {print $2}' | grep -qx Ready
}
node_not_ready() { cli "$(all_servers)" get nodes 2>/dev/null | awk -v n="$1" '$1 == n {print $2}' | grep -qx NotReady; }

# kill -9 a node agent: its Node turns NotReady within the grace period (5 s),
# traffic through the other nodes never fails; restarted, it is Ready again.
scenario_node_kill() {
  local t0
  wait_for "node-3 Ready" node_ready node-3 || violation "node-3 Ready before the fault"
  start_probe clusterip client 10.96.0.10:80
  start_probe nodeport2 host 10.201.0.22:30080
  sleep 2
  log "docker kill -s KILL strait-node-3"
  t0=$(now_ms); docker kill -s KILL strait-node-3 >/dev/null
  wait_for "node-3 NotReady" node_not_ready node-3 || violation "a killed node agent's Node turns NotReady"
  figures=" killed=node-3 not_ready_ms=$(($(now_ms) - t0))"
  sleep 2
  t0=$(now_ms); docker start strait-node-3 >/dev/null
  wait_for "node-3 Ready" node_ready node-3 || violation "a restarted node agent's Node turns Ready"
  figures+=" ready_again_ms=$(($(now_ms) - t0))"
  check_probe_zero clusterip
  check_probe_zero nodeport2
  finish
}

backend_ready() { # ip -> 0 when it is a ready endpoint of Service backend
  cli "$(all_servers)" get endpointslices -o json 2>/dev/null \
    | jq -e --arg ip "$1" '[.items[]?.endpoints[]? | select((.addresses // []) | any(. == $ip)) | (.conditions.ready != false)] | any' >/dev/null
}
backend_gone() { ! backend_ready "$1"; }
backends_ready() { local ip; for ip in "$@"; do backend_ready "$ip" || return 1; done; }

# kill -9 two of the three backends one after the other. Requests in flight
# on a killed backend may fail (at most one per probe worker); once its
# endpoint is unready no request may fail; restarted, it serves again.
scenario_backend_kill() {
  local t0 b p
  start_probe clusterip client 10.96.0.10:80
  start_probe lb host 10.201.0.241:80
  sleep 2
  figures=""
  for b in 2 3; do
    log "docker kill -s KILL strait-backend-$b"
    t0=$(now_ms); docker kill -s KILL "strait-backend-$b" >/dev/null
    wait_for "backend-$b unready" backend_gone "10.201.0.3$b" || violation "a killed backend's endpoint turns unready"
    figures+=" backend${b}_unready_ms=$(($(now_ms) - t0))"
  done
  # During the kills: failures only for connections in flight (2 workers x 2 probes x 2 kills).
  for p in clusterip lb; do
    stop_probe "$p"
    figures+=" during_${p}_ok=$p_ok during_${p}_failed=$p_failed during_${p}_max_ms=$p_max"
    [ "$p_failed" != missing ] && [ "$p_failed" -le 4 ] \
      || violation "no failure beyond the requests in flight on killed backends ($p): $p_failed"
  done
  # With backend-2 and -3 unready, everything goes to backend-1.
  start_probe clusterip client 10.96.0.10:80
  start_probe lb host 10.201.0.241:80
  sleep 4
  check_probe_zero clusterip
  check_probe_zero lb
  grep -q 'responders=backend-1:[0-9]*$' "$work/probe-lb" \
    || violation "only ready endpoints receive traffic: $(grep '^probe ' "$work/probe-lb" | tail -1)"
  docker start strait-backend-2 strait-backend-3 >/dev/null
  t0=$(now_ms)
  wait_for "backends ready again" backends_ready 10.201.0.32 10.201.0.33 \
    || violation "restarted backends become ready endpoints again"
  figures+=" backends_ready_again_ms=$(($(now_ms) - t0))"
  finish
}

# ---- run -------------------------------------------------------------------
for scenario in "${scenarios[@]}"; do
  fn="scenario_${scenario//-/_}"
  declare -F "$fn" >/dev/null || { echo "unknown scenario $scenario (have: ${all[*]})" >&2; exit 2; }
  log "=== $scenario"
  figures=""
  wait_for "a converged cluster before $scenario" converged || violation "the cluster converges before the fault"
  "$fn"
done

echo
echo "Chaos on compose: figures"
for s in "${summary[@]}"; do echo "  $s"; done
if [ ${#violations[@]} -gt 0 ]; then
  echo "VIOLATIONS:"
  for v in "${violations[@]}"; do echo "  $v"; done
  exit 1
fi
echo "every invariant held"
