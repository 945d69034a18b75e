#!/usr/bin/env bash
# Two sidecars and one Valkey (or Redis) on this machine, sharing one verdict cache; no
# containers. Needs: sidecar on PATH (pip install -e ../..), valkey-server or redis-server,
# openssl, curl and python3 (a static page stands in for the application).
#
#   examples/fleet/run.sh            start everything, print what to try, stop on Ctrl-C
#   examples/fleet/run.sh --check    start, try it, say whether it worked, stop
#
# Ports (environment): REDIS_PORT 6390, UPSTREAM_PORT 8090, replica A: A_PORT 8443 and
# A_ADMIN 9091, replica B: B_PORT 8444 and B_ADMIN 9092. Everything listens on 127.0.0.1 and
# is stopped by the process ids it started.
set -euo pipefail
cd "$(dirname "$0")"
REDIS_PORT=${REDIS_PORT:-6390}
UPSTREAM_PORT=${UPSTREAM_PORT:-8090}
A_PORT=${A_PORT:-8443}
A_ADMIN=${A_ADMIN:-9091}
B_PORT=${B_PORT:-8444}
B_ADMIN=${B_ADMIN:-9092}
SIDECAR=${SIDECAR:-sidecar}

server=$(command -v valkey-server || command -v redis-server || true)
[ -n "$server" ] || { echo "needs valkey-server or redis-server (Debian: apt-get install valkey-server or redis-server)" >&2; exit 1; }
command -v "$SIDECAR" >/dev/null || { echo "needs the sidecar command on PATH (pip install -e ../..)" >&2; exit 1; }
./pki.sh

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$server" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
  >.fleet/redis.log 2>&1 &
pids+=($!)
python3 -m http.server "$UPSTREAM_PORT" --bind 127.0.0.1 --directory .fleet/www \
  >.fleet/upstream.log 2>&1 &
pids+=($!)
replica() {  # name, TLS port, admin port
  LISTEN_PORT=$2 ADMIN_PORT=$3 REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
  UPSTREAM_URL="http://127.0.0.1:$UPSTREAM_PORT" \
    "$SIDECAR" run --config sidecar.yaml >".fleet/$1.log" 2>&1 &
  pids+=($!)
}
replica sidecar-a "$A_PORT" "$A_ADMIN"
replica sidecar-b "$B_PORT" "$B_ADMIN"
for admin in "$A_ADMIN" "$B_ADMIN"; do
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
    sleep 0.2
  done
  curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null || { echo "a replica did not start: see .fleet/*.log" >&2; exit 1; }
done

client="--cacert .fleet/server-ca.pem --cert .fleet/alice.pem --key .fleet/alice.key"
metric() {  # admin port, metric line prefix
  curl -fsS "http://127.0.0.1:$1/metrics" | grep "^$2 " | awk '{print $2}'
}

if [ "${1:-}" != "--check" ]; then
  cat <<TRY
Two replicas share one cache (Valkey/Redis on 127.0.0.1:$REDIS_PORT). Try, from $(pwd):

  curl $client https://localhost:$A_PORT/     # replica A asks its backend
  curl $client https://localhost:$B_PORT/     # replica B finds A's verdict in Redis
  curl -s http://127.0.0.1:$B_ADMIN/metrics | grep sidecar_cache_shared_hits_total
  curl -X POST -H 'X-Sidecar-Admin: 1' http://127.0.0.1:$A_ADMIN/cache/purge   # reaches B too
  curl -s http://127.0.0.1:$B_ADMIN/metrics | grep sidecar_cache_shared_purges_total

Ctrl-C stops everything.
TRY
  wait
  exit 0
fi

fail() { echo "FAILED: $*" >&2; exit 1; }
# shellcheck disable=SC2086  # $client is several options
[ "$(curl -s -o /dev/null -w '%{http_code}' $client "https://localhost:$A_PORT/")" = 200 ] || fail "replica A did not forward"
# shellcheck disable=SC2086
[ "$(curl -s -o /dev/null -w '%{http_code}' $client "https://localhost:$B_PORT/")" = 200 ] || fail "replica B did not forward"
[ "$(metric "$B_ADMIN" sidecar_cache_shared_hits_total)" = 1.0 ] || fail "replica B did not find A's verdict in Redis"
purge=$(curl -fsS -X POST -H 'X-Sidecar-Admin: 1' "http://127.0.0.1:$A_ADMIN/cache/purge")
case "$purge" in *'"fleet": true'*) ;; *) fail "the purge did not reach the fleet: $purge" ;; esac
for _ in $(seq 50); do
  [ "$(metric "$B_ADMIN" 'sidecar_cache_shared_purges_total{direction="received"}')" = 1.0 ] && break
  sleep 0.1
done
[ "$(metric "$B_ADMIN" 'sidecar_cache_shared_purges_total{direction="received"}')" = 1.0 ] || fail "replica B did not hear the purge"
echo "fleet example: OK (a shared hit on B, a purge on A heard by B)"
