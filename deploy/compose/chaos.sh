#!/usr/bin/env bash
# Chaos on the compose cluster: faults injected with `docker kill`,
# `docker pause`, `docker network disconnect` and `docker stop` (SIGTERM), and
# membership changes with `strait cluster remove-member/add-member`, while a
# writer applies objects and clients send traffic; each scenario checks
# named invariants and prints its figures. Brings the cluster up (building
# the image), runs every scenario, tears everything down, exits non-zero on
# any violation.
#
#   deploy/compose/chaos.sh                 all scenarios
#   deploy/compose/chaos.sh leader-kill ... only these (leader-kill,
#                                           leader-pause, replica-disconnect,
#                                           node-kill, backend-kill,
#                                           restart-all, control-outage,
#                                           rolling-restart, replace-member)
#   CHAOS_KEEP=1 deploy/compose/chaos.sh    leave the cluster running after
#   CHAOS_NO_BUILD=1 ...                    use the image already built
#   CHAOS_OUTAGE_SECS=45 ...                control-outage length (default 30)
#
# replace-member replaces control-3 by a fresh replica 4 (service control-4,
# profile "replace": same address, empty volume); it runs last whatever the
# order given, and the cluster keeps replicas 1, 2, 4 until `up.sh down`.
#
# Traffic stays on the private network strait-net the compose file creates.
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")"
root="$(cd ../.. && pwd)"
all=(leader-kill leader-pause replica-disconnect node-kill backend-kill
     restart-all control-outage rolling-restart replace-member)
scenarios=("${@:-${all[@]}}")
[ $# -eq 0 ] && scenarios=("${all[@]}")
# replace-member changes the membership for good: run it last.
ordered=()
for s in "${scenarios[@]}"; do [ "$s" = replace-member ] || ordered+=("$s"); done
[ ${#ordered[@]} -eq ${#scenarios[@]} ] || ordered+=(replace-member)
scenarios=("${ordered[@]}")
outage_s=${CHAOS_OUTAGE_SECS:-30}
export STRAIT_IMAGE="${STRAIT_IMAGE:-strait:dev}"

# Build the binary and image first (as long as cargo takes); everything
# after is bounded: cluster, scenarios and teardown are cut at 10 minutes
# plus the control-plane outage.
if [ -z "${CHAOS_BOUNDED:-}" ]; then
  [ -n "${CHAOS_NO_BUILD:-}" ] || ../docker/build.sh "$STRAIT_IMAGE"
  export CHAOS_BOUNDED=1
  exec timeout --kill-after=30 $((600 + outage_s)) "$self" "$@"
fi

bin="$root/target/static/x86_64-unknown-linux-gnu/release/strait"
work="$(mktemp -d)"
servers=(10.201.0.11:7700 10.201.0.12:7700 10.201.0.13:7700)
# The replica id serving at each address (replace-member puts 4 at .13).
ids=(1 2 3)
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

compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose -p strait "$@"
  else
    docker-compose -p strait "$@"
  fi
}

# The CLI on the host against a list of replicas (comma-separated).
cli() { local s="$1"; shift; timeout 10 "$bin" --server "$s" "$@"; }
all_servers() { local IFS=,; echo "${servers[*]}"; }
others() { # replicas except id $1
  local out=() i
  for i in 0 1 2; do [ "${ids[$i]}" = "$1" ] || out+=("${servers[$i]}"); done
  local IFS=,; echo "${out[*]}"
}
addr_of() { # replica id -> its address
  local i
  for i in 0 1 2; do [ "${ids[$i]}" != "$1" ] || { echo "${servers[$i]}"; return 0; }; done
  return 1
}
ip_of() { local a; a=$(addr_of "$1") && echo "${a%:*}"; }
controls() { local i; for i in "${ids[@]}"; do echo "strait-control-$i"; done; }

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

# Invariant "every node converges to the leader's revision": the leader
# hears every node agent report its own revision (LAG 0 in `get nodes`);
# sets node_rev.
nodes_at_leader_revision() {
  local l a out
  l=$(leader); [ "$l" -gt 0 ] || return 1
  a=$(addr_of "$l") || return 1
  out=$(cli "$a" get nodes 2>/dev/null) || return 1
  node_rev=$(awk 'NR>1 { n++; if ($5 != "0") bad=1; rev=$4 }
                  END { if (n != 3 || bad) exit 1; print rev }' <<<"$out")
}

finish() { # [nodes]: also check that every node converges
  deadline_s=90
  local t0; t0=$(now_ms)
  if wait_for "convergence" converged; then
    figures+=" converge_ms=$(($(now_ms) - t0))"
  else
    violation "the cluster converges: replicas or containers did not agree/heal within 90 s"
    cli "$(all_servers)" cluster status || true
    docker ps -a --filter name=strait- --format '{{.Names}} {{.Status}}'
  fi
  if [ "${1:-}" = nodes ]; then
    t0=$(now_ms)
    if wait_for "every node at the leader's revision" nodes_at_leader_revision; then
      figures+=" nodes_at_revision=$node_rev nodes_converge_ms=$(($(now_ms) - t0))"
    else
      violation "every node converges to the leader's revision within 90 s"
      cli "$(all_servers)" get nodes || true
    fi
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
  ip=$(ip_of "$old")
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

has_leader() { [ "$(leader)" -gt 0 ]; }

# Every object of every kind, from a linearizable read (JSON). Node agents
# register their Node again when their watch reconnects, stamping its
# resourceVersion, generation and Ready times: those are left out.
state_dump() {
  local k
  for k in services endpointslices pods; do
    cli "$(all_servers)" get "$k" -A -o json 2>/dev/null || return 1
  done
  cli "$(all_servers)" get nodes -o json 2>/dev/null \
    | jq 'del(.items[]?.metadata.resourceVersion, .items[]?.metadata.generation,
              .items[]?.status.conditions[]?.lastHeartbeatTime, .items[]?.status.conditions[]?.lastTransitionTime)'
}

# Writes $1 headless Services named $2-1..$2-N, one request each.
write_services() {
  local i
  for i in $(seq "$1"); do
    printf 'apiVersion: v1\nkind: Service\nmetadata: {name: %s}\nspec:\n  clusterIP: None\n  ports: [{port: 80}]\n' "$2-$i" \
      | cli "$(all_servers)" apply -f - >/dev/null || return 1
  done
}

# Sleeps until $1 (ms since the epoch): a fault's planned length, not a
# wait for a condition.
sleep_until_ms() { local d=$(($1 - $(now_ms))); [ "$d" -le 0 ] || sleep "$((d / 1000)).$(printf %03d $((d % 1000)))"; }

# One request through $1 succeeds.
forwards() { "$bin" demo probe "$1" --count 1 --timeout 1s --quiet >/dev/null 2>&1; }

# kill -9 every control replica at once and start them again: a leader is
# back, the state is identical, the data plane never noticed, nodes converge.
scenario_restart_all() {
  local before after t0 objects
  start_probe clusterip client 10.96.0.10:80
  write_services 20 "ra" || violation "writes before the restart are acknowledged"
  wait_for "convergence before the restart" converged || violation "the cluster converges before the fault"
  before=$(state_dump) || { violation "cannot read the state before the restart"; return; }
  log "docker kill -s KILL every control replica, then docker start them"
  t0=$(now_ms)
  # shellcheck disable=SC2046
  docker kill -s KILL $(controls) >/dev/null
  # shellcheck disable=SC2046
  docker start $(controls) >/dev/null
  wait_for "a leader after the restart" has_leader || violation "a leader is elected after every replica restarted"
  figures=" leader_back_ms=$(($(now_ms) - t0))"
  wait_for "convergence after the restart" converged || true
  if after=$(state_dump); then
    objects=$(jq -s '[.[].items[]?] | length' <<<"$after")
    figures+=" objects=$objects"
    [ "$before" = "$after" ] \
      || violation "state identical after the restart: $(diff <(echo "$before") <(echo "$after") | head -20 | tr '\n' ' ')"
  else
    violation "cannot read the state after the restart"
  fi
  sleep 2
  check_probe_zero clusterip
  finish nodes
}

# The whole control plane down (docker kill) for CHAOS_OUTAGE_SECS under
# client traffic: no failed connection through the agents that stay up;
# node-3's agent, killed and started in the middle of the outage, forwards
# again from its persisted state (no failure once it does); when the
# replicas return, every node converges to the leader's revision.
scenario_control_outage() {
  local t0 t1
  wait_for "every node at the leader's revision" nodes_at_leader_revision \
    || violation "every node is at the leader's revision before the outage"
  start_probe clusterip client 10.96.0.10:80
  start_probe nodeport2 host 10.201.0.22:30080
  sleep 2
  log "docker kill -s KILL every control replica for ${outage_s} s"
  t0=$(now_ms)
  # shellcheck disable=SC2046
  docker kill -s KILL $(controls) >/dev/null
  figures=" outage_s=$outage_s"
  sleep_until_ms $((t0 + outage_s * 500))
  log "docker kill -s KILL strait-node-3, docker start it (control plane still down)"
  docker kill -s KILL strait-node-3 >/dev/null
  t1=$(now_ms); docker start strait-node-3 >/dev/null
  if wait_for "node-3 forwarding again" forwards 10.201.0.23:30080; then
    figures+=" node3_forwarding_after_ms=$(($(now_ms) - t1))"
  else
    violation "a node agent restarted during the outage forwards again"
  fi
  start_probe nodeport3 host 10.201.0.23:30080
  sleep_until_ms $((t0 + outage_s * 1000))
  log "docker start every control replica"
  t1=$(now_ms)
  # shellcheck disable=SC2046
  docker start $(controls) >/dev/null
  wait_for "a leader after the outage" has_leader || violation "a leader is elected after the outage"
  figures+=" leader_back_ms=$(($(now_ms) - t1))"
  sleep 2
  check_probe_zero clusterip
  check_probe_zero nodeport2
  check_probe_zero nodeport3
  finish nodes
}

# Restart the replicas one at a time, gracefully, the leader first:
# `docker stop` (SIGTERM; docker's SIGKILL only after 10 s) and `docker
# start`, under write and traffic load, each time waiting until the cluster
# has converged again. A stopping replica ends its leader duties, hands
# leadership to an up-to-date voter, ends its watch streams and exits on
# its own: exit code 0, well before docker's SIGKILL. Meanwhile no Node may
# turn NotReady (a stopping leader must not judge nodes by heartbeats it
# refused) and no client connection may fail.
scenario_rolling_restart() {
  local id t0 code l order
  start_writer; start_probe clusterip client 10.96.0.10:80
  start_node_sampler
  sleep 2
  figures=""
  l=$(leader)
  order=("$l")
  for id in "${ids[@]}"; do [ "$id" = "$l" ] || order+=("$id"); done
  for id in "${order[@]}"; do
    l=$(leader)
    log "docker stop strait-control-$id$([ "$id" = "$l" ] && echo ' (the leader)' || true), docker start it"
    t0=$(now_ms)
    docker stop "strait-control-$id" >/dev/null
    figures+=" control${id}_stop_ms=$(($(now_ms) - t0))$([ "$id" = "$l" ] && echo '(leader)' || true)"
    code=$(docker inspect -f '{{.State.ExitCode}}' "strait-control-$id")
    [ "$code" = 0 ] || violation "a replica stopped with SIGTERM exits on its own: control-$id exit code $code"
    docker start "strait-control-$id" >/dev/null
    if wait_for "convergence after restarting control-$id" converged; then
      figures+=" control${id}_converged_ms=$(($(now_ms) - t0))"
    else
      violation "the cluster converges after restarting control-$id"
    fi
  done
  sleep 2
  stop_writer
  check_nodes_stayed_ready
  check_probe_zero clusterip
  check_writes
  finish nodes
}

# Samples `get nodes` every 200 ms in the background (NAME STATUS per line).
# Serializable: a replica's own applied state, readable while no leader
# answers read-index requests (a linearizable read would fail exactly while
# a stopping leader misbehaves).
start_node_sampler() {
  : >"$work/node-samples"; rm -f "$work/stop-sampler"
  (
    while [ ! -e "$work/stop-sampler" ]; do
      cli "$(all_servers)" get nodes --consistency serializable 2>/dev/null \
        | awk 'NR>1 {print $1, $2}' >>"$work/node-samples"
      sleep 0.2
    done
  ) &
  sampler_pid=$!
  bg_pids+=("$sampler_pid")
}

# Invariant "no Node NotReady" over the sampler's run.
check_nodes_stayed_ready() {
  local samples bad
  touch "$work/stop-sampler"
  wait "$sampler_pid" 2>/dev/null || true
  samples=$(wc -l <"$work/node-samples")
  bad=$(grep -c ' NotReady$' "$work/node-samples" || true)
  figures+=" node_samples=$samples not_ready_samples=$bad"
  [ "$samples" -gt 0 ] || violation "Nodes were sampled during the restarts"
  [ "$bad" -eq 0 ] || violation "no Node NotReady during graceful restarts: $(grep ' NotReady$' "$work/node-samples" | sort | uniq -c | tr '\n' ' ')"
}

# The voters as the replicas report them ("1 2 3 ").
voters() {
  local st
  st=$(cli "$(all_servers)" cluster status 2>/dev/null) || return 1
  awk 'NR>2 && $NF == "true" {printf "%s ", $1}' <<<"$st"
}

voters_are() { [ "$(voters)" = "$1" ]; }

# Asks the leader to remove member $1 until it is no longer a voter
# (idempotent: a removal whose answer was lost is seen in the voters).
member_removed() {
  local l v
  l=$(leader)
  [ "$l" -gt 0 ] && cli "$(addr_of "$l")" cluster remove-member --id "$1" >/dev/null 2>&1
  v=$(voters) && [ -n "$v" ] && ! grep -qw "$1" <<<"$v"
}

# Asks the leader to add member $1 at $2 until it is a voter (add-member
# waits for the learner to catch up).
member_added() {
  local l v
  l=$(leader)
  [ "$l" -gt 0 ] && timeout 30 "$bin" --server "$(addr_of "$l")" cluster add-member --id "$1" --address "$2" >/dev/null 2>&1
  v=$(voters) && grep -qw "$1" <<<"$v"
}

# Replace a member under write and traffic load: remove replica 3 and
# delete its container, then start a fresh replica 4 (empty volume, same
# address, `--join`) and add it. No acknowledged write lost, zero failed
# client connections, voters {1, 2, 4}, all at the same log index.
scenario_replace_member() {
  local t0 v l
  [ "${ids[2]}" = 3 ] || { violation "control-3 was already replaced"; return; }
  start_writer; start_probe clusterip client 10.96.0.10:80
  sleep 2
  l=$(leader)
  log "strait cluster remove-member --id 3 (leader: $l)"
  t0=$(now_ms)
  wait_for "member 3 removed" member_removed 3 || { violation "member 3 is removed"; stop_writer; check_probe_zero clusterip; return; }
  figures=" removed=3 leader_was=$l remove_ms=$(($(now_ms) - t0))"
  docker rm -f strait-control-3 >/dev/null
  log "start control-4 (empty volume, --join) and strait cluster add-member --id 4 --address ${servers[2]}"
  compose --profile replace up -d --no-deps control-4 >/dev/null 2>&1 \
    || { violation "the replacement container control-4 starts"; stop_writer; check_probe_zero clusterip; return; }
  t0=$(now_ms)
  if wait_for "member 4 added" member_added 4 "${servers[2]}"; then
    figures+=" added=4 add_ms=$(($(now_ms) - t0))"
  else
    violation "the fresh member 4 is added as a voter"
  fi
  ids=(1 2 4)
  sleep 2
  stop_writer
  check_probe_zero clusterip
  check_writes
  if wait_for "voters {1, 2, 4}" voters_are "1 2 4 "; then
    figures+=" voters=1,2,4"
  else
    v=$(voters) || true
    violation "voters are {1, 2, 4} after the replacement: ${v:-none}"
  fi
  finish nodes
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
