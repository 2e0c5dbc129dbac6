#!/usr/bin/env bash
# The compose cluster in one command:
#   deploy/compose/up.sh           build the image if missing, create the
#                                  certificates, start everything, apply the
#                                  demo Services, wait until all is healthy
#   deploy/compose/up.sh --build   rebuild the binary and image first
#   deploy/compose/up.sh down      stop and delete containers, volumes, certificates
set -euo pipefail
cd "$(dirname "$0")"
image="${STRAIT_IMAGE:-strait:dev}"
export STRAIT_IMAGE="$image"

compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose -p strait "$@"
  else
    docker-compose -p strait "$@"
  fi
}

if [ "${1:-}" = down ]; then
  compose --profile replace down -v --remove-orphans
  docker volume rm strait-certs >/dev/null 2>&1 || true
  exit 0
fi

if [ "${1:-}" = --build ] || ! docker image inspect "$image" >/dev/null 2>&1; then
  ../docker/build.sh "$image"
fi

# Certificates: one CA (trust domain compose.strait), an identity per
# replica and node agent, and an admin for the client. Created once; the
# strait-certs volume keeps them until `up.sh down`.
docker volume create strait-certs >/dev/null
strait() { docker run --rm --network none -v strait-certs:/certs "$image" "$@"; }
if out=$(strait certs init --trust-domain compose.strait --out /certs 2>&1); then
  echo "$out"
  for id in 1 2 3 4; do strait certs issue control "$id" --out /certs; done  # 4: chaos.sh replace-member
  for n in node-1 node-2 node-3; do strait certs issue node "$n" --out /certs; done
  strait certs issue admin compose --out /certs
elif ! grep -q exists <<<"$out"; then
  echo "$out" >&2
  exit 1
fi

compose up -d

# The demo Services, applied by the admin in the client container.
deadline=$((SECONDS + 90))
until docker exec strait-client strait apply -f /etc/strait/manifests; do
  if [ $SECONDS -ge $deadline ]; then echo "up.sh: cannot apply the demo Services" >&2; exit 1; fi
  sleep 1
done

echo "waiting for every container to be healthy..."
deadline=$((SECONDS + 120))
while :; do
  unhealthy=$(docker ps --filter name=strait- --format '{{.Names}} {{.Status}}' | grep -v '(healthy)' || true)
  [ -z "$unhealthy" ] && break
  if [ $SECONDS -ge $deadline ]; then
    echo "up.sh: not healthy after 120 s:" >&2
    echo "$unhealthy" >&2
    exit 1
  fi
  sleep 1
done
docker ps --filter name=strait- --format 'table {{.Names}}\t{{.Status}}'
cat <<'TXT'

The cluster is up. Try (see README "Docker and docker-compose"):
  docker exec strait-client strait get svc
  docker exec strait-client strait cluster status
  docker exec strait-client strait demo probe 10.96.0.10:80 --count 6          # ClusterIP from a Pod on node-1
  docker exec strait-client strait demo probe backend.default.svc.cluster.local:80 --dns 10.201.0.21 --count 3
  curl http://10.201.0.22:30080/                                                # NodePort on node-2 (from the host)
  curl http://10.201.0.241/                                                     # LoadBalancer IP (from the host)
  dig @10.201.0.21 backend.default.svc.cluster.local                            # node DNS (from the host)
  deploy/compose/up.sh down                                                     # remove everything
TXT
