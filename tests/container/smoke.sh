#!/usr/bin/env bash
# Builds the container image and smoke-tests it for real: the container starts read-only as
# its non-root user with the configuration the Helm chart renders and the certificates
# mounted where the chart mounts them, /readyz answers, an mTLS request with a client
# certificate reaches an application in the same network namespace (as in a Kubernetes pod)
# carrying the identity headers, and SIGTERM drains and stops it with exit code 0.
#
#   tests/container/smoke.sh            from the repository root (any folder works)
#
# Exit codes: 0 passed, 1 failed, 77 skipped (no container engine could be started; the
# reason is printed). Not part of the default test run: it takes a minute or more.
#
# Runs the host-side helpers with the project's virtual environment (.venv, or $PYTHON), which
# needs the test extra (pip install -e '.[test]').
#
# Environment (all optional):
#   SMOKE_ENGINE     podman or docker (default: the first of them that works)
#   PYTHON_IMAGE     base image (default docker.io/library/python:3.13-slim-trixie); when it is
#                    neither present nor pullable, a stand-in is made with debootstrap
#                    (tests/container/make_base.sh) and tagged localhost/python:3.13-slim-trixie
#   SMOKE_IMAGE      tag to build (default localhost/mtls-identity-sidecar:smoke)
#   SMOKE_CA_BUNDLE  a CA bundle the build's pip must trust (default: $PIP_CERT when set), for
#                    machines behind a TLS-inspecting proxy; podman only, mounted for the
#                    build's RUN steps and not kept in the image
#   SMOKE_INSTALL    1 (default): as root on Debian, apt-get install podman, runc and
#                    debootstrap when missing; 0: never install anything
#   SMOKE_KEEP       1: keep the containers and the work folder for a look afterwards
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
image=${SMOKE_IMAGE:-localhost/mtls-identity-sidecar:smoke}
python_image=${PYTHON_IMAGE:-docker.io/library/python:3.13-slim-trixie}
local_base=localhost/python:3.13-slim-trixie
name=sidecar-smoke-$$

say() { printf 'smoke: %s\n' "$*"; }
skip() { say "SKIPPED: $*"; exit 77; }
fail() { say "FAILED: $*"; exit 1; }

"$python" -c 'import cryptography, helm_python, yaml' 2>/dev/null \
  || fail "$python lacks the test dependencies: pip install -e '.[test]' (or set PYTHON)"

# ---- a container engine that can start containers -------------------------------------------

maybe_install() {
  [ "${SMOKE_INSTALL:-1}" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
  say "installing $* from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; }
}

engine=${SMOKE_ENGINE:-}
if [ -z "$engine" ]; then
  for candidate in podman docker; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" info >/dev/null 2>&1; then
      engine=$candidate
      break
    fi
  done
fi
if [ -z "$engine" ]; then
  maybe_install podman runc || true
  command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1 && engine=podman
fi
[ -n "$engine" ] || skip "no container engine: neither podman nor docker is installed and answering '<engine> info' (a docker client without a running daemon does not count)"
command -v "$engine" >/dev/null 2>&1 || skip "$engine is not installed"
"$engine" info >/dev/null 2>&1 || skip "$engine is installed but '$engine info' fails: $("$engine" info 2>&1 | tail -1)"
say "engine: $engine ($("$engine" --version))"

# ---- the base image ---------------------------------------------------------------------------

has_image() { "$engine" image inspect "$1" >/dev/null 2>&1; }
if ! has_image "$python_image"; then
  if [ -z "${PYTHON_IMAGE:-}" ] && has_image "$local_base"; then
    python_image=$local_base
  elif timeout 120 "$engine" pull -q "$python_image" >/dev/null 2>&1; then
    say "pulled $python_image"
  elif [ -z "${PYTHON_IMAGE:-}" ]; then
    say "$python_image cannot be pulled here: making $local_base with debootstrap"
    command -v debootstrap >/dev/null 2>&1 || maybe_install debootstrap || true
    "$here/make_base.sh" "$engine" "$local_base" || skip "no base image: $python_image cannot be pulled and debootstrap could not make one"
    python_image=$local_base
  else
    skip "the base image $python_image is neither present nor pullable"
  fi
fi
say "base image: $python_image"

# ---- flags this machine needs to start a container --------------------------------------------
# Some sandboxes forbid raising resource limits (no CAP_SYS_RESOURCE) while the engine's
# defaults ask for more than the current hard limits, and crun cannot run on hybrid cgroups.
# Try the plain command first, then the least change that works.
hard_nofile=$(ulimit -Hn)
[ "$hard_nofile" = unlimited ] && hard_nofile=1048576
hard_nproc=$(ulimit -Hu)
[ "$hard_nproc" = unlimited ] || [ "$hard_nproc" -gt 32768 ] && hard_nproc=32768
limits="--ulimit nofile=$hard_nofile:$hard_nofile --ulimit nproc=$hard_nproc:$hard_nproc"
runc_flag=""
if [ "$engine" = podman ] && command -v runc >/dev/null 2>&1; then runc_flag="--runtime runc"; fi
run_flags=""
probe_errors=""
for flags in "" "$limits" ${runc_flag:+"$runc_flag $limits"}; do
  # shellcheck disable=SC2086
  if out=$("$engine" run --rm $flags "$python_image" python3 -c 'print("ok")' 2>&1) && [ "$out" = ok ]; then
    run_flags=$flags
    probe_errors=""
    break
  fi
  probe_errors+="  [$flags] $(printf '%s' "$out" | tail -1)"$'\n'
done
if [ -n "$probe_errors" ]; then
  if [ "$engine" = podman ] && [ -z "$runc_flag" ] && maybe_install runc; then
    exec "$0" "$@"  # try again with runc available
  fi
  skip "$engine cannot start a container here:"$'\n'"$probe_errors"
fi
say "container flags: ${run_flags:-(none needed)}"

# ---- build ------------------------------------------------------------------------------------

build_flags=()
ca_bundle=${SMOKE_CA_BUNDLE:-${PIP_CERT:-}}
if [ -n "$ca_bundle" ] && [ -f "$ca_bundle" ] && [ "$engine" = podman ]; then
  build_flags+=(--volume "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro")
  say "build trusts the CA bundle $ca_bundle (not kept in the image)"
fi
# shellcheck disable=SC2206
build_flags+=($run_flags)
revision=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
say "building $image"
start=$(date +%s)
"$engine" build "${build_flags[@]}" \
  --build-arg "PYTHON_IMAGE=$python_image" \
  --build-arg "VERSION=${version:-0.1.0}" \
  --build-arg "REVISION=$revision" \
  --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  -t "$image" -f Dockerfile . >"/tmp/$name-build.log" 2>&1 \
  || { tail -30 "/tmp/$name-build.log"; fail "the build failed (log: /tmp/$name-build.log)"; }
build_seconds=$(( $(date +%s) - start ))
rm -f "/tmp/$name-build.log"
size_bytes=$("$engine" image inspect --format '{{.Size}}' "$image")
size_mb=$(( size_bytes / 1000000 ))
say "built $image in ${build_seconds}s; image size ${size_mb} MB ($size_bytes bytes)"

# ---- what the image is ------------------------------------------------------------------------

echo "smoke: the image"
user=$("$engine" image inspect --format '{{.Config.User}}' "$image")
[ "$user" = 10001:10001 ] && echo "  ok  runs as UID:GID 10001:10001" || fail "image user is '$user', not 10001:10001"
# shellcheck disable=SC2086
inside() { "$engine" run --rm $run_flags --read-only --entrypoint /bin/sh "$image" -c "$1"; }
[ "$(inside 'id -u')" = 10001 ] && echo "  ok  id -u is 10001 inside" || fail "not UID 10001 inside"
inside 'for c in gcc cc g++ make; do command -v $c && exit 1; done; exit 0' >/dev/null \
  && echo "  ok  no compiler in the runtime image" || fail "a compiler is in the runtime image"
built=$(inside '/opt/sidecar/bin/sidecar --version')
[[ "$built" == *"(compiled)" ]] && echo "  ok  $built" || fail "the image's sidecar is not the compiled build: $built"
inside 'test ! -e /root/.cache/pip && test ! -e /opt/sidecar/bin/pip' \
  && echo "  ok  no pip cache, no pip in the virtual environment" || fail "pip or its cache is in the image"
inside 'command -v sleep >/dev/null' && echo "  ok  sleep is there (the chart's preStop hook uses it)" || fail "no sleep in the image"
entrypoint=$("$engine" image inspect --format '{{json .Config.Entrypoint}}' "$image")
[ "$entrypoint" = '["/opt/sidecar/bin/sidecar","run"]' ] && echo "  ok  entrypoint $entrypoint" || fail "entrypoint is $entrypoint"

# ---- run it -----------------------------------------------------------------------------------

work=$(mktemp -d "${TMPDIR:-/tmp}/sidecar-smoke.XXXXXX")
cleanup() {
  if [ "${SMOKE_KEEP:-0}" = 1 ]; then
    say "kept: containers $name-app, $name; folder $work"
    return
  fi
  for container in "$name" "$name-app"; do
    "$engine" rm -f "$container" >/dev/null 2>&1 || echo "smoke: could not remove container $container" >&2
  done
  rm -rf "$work"
}
trap cleanup EXIT

# The chart rendered in mode sidecar: its ConfigMap and the Secrets its pod mounts, at its paths.
"$python" -m tests.container.smoke_fixture prepare "$work" >/dev/null
mapfile -t chart_flags <"$work/run-flags"
read -r https_port admin_port < <("$python" -m tests.container.smoke_fixture free-ports 2)
# Hardening as the chart's securityContext sets it: read-only root, no capabilities, no
# privilege escalation; /tmp is the chart's in-memory emptyDir (in chart_flags).
hardening=(--read-only --cap-drop ALL --security-opt no-new-privileges)

echo "smoke: the chart's configuration, checked in the image"
# shellcheck disable=SC2086
"$engine" run --rm $run_flags "${hardening[@]}" "${chart_flags[@]}" \
  --entrypoint /opt/sidecar/bin/sidecar "$image" check-config /etc/sidecar/config/sidecar.yaml >/dev/null \
  && echo "  ok  sidecar check-config accepts what the chart renders and mounts" \
  || fail "check-config refused the chart's configuration"

# The application owns the network namespace and publishes the ports; the sidecar joins it,
# as two containers of one Kubernetes pod do (upstream http://127.0.0.1:8080).
# shellcheck disable=SC2086
"$engine" run -d --name "$name-app" $run_flags "${hardening[@]}" --tmpfs /tmp:rw,size=16m,mode=1777 \
  -p "127.0.0.1:$https_port:8443" -p "127.0.0.1:$admin_port:9090" \
  -v "$work/app:/app:ro" \
  --entrypoint /opt/sidecar/bin/python "$image" /app/echo_upstream.py 8080 >/dev/null
start=$(date +%s.%N)
# shellcheck disable=SC2086
"$engine" run -d --name "$name" $run_flags "${hardening[@]}" "${chart_flags[@]}" \
  --network "container:$name-app" "$image" >/dev/null

echo "smoke: start"
if ! "$python" -m tests.container.smoke_fixture wait-status "http://127.0.0.1:$admin_port/readyz" 200 30; then
  "$engine" logs "$name" 2>&1 | tail -20
  fail "the sidecar did not become ready"
fi
ready=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
echo "  ok  ready ${ready}s after the container was started"

echo "smoke: requests"
"$python" -m tests.container.smoke_fixture requests "$work" "$https_port" "$admin_port" \
  || { "$engine" logs "$name" 2>&1 | tail -20; fail "a request check failed"; }

echo "smoke: SIGTERM"
stop_start=$(date +%s.%N)
"$engine" kill --signal TERM "$name" >/dev/null
"$python" -m tests.container.smoke_fixture wait-status "http://127.0.0.1:$admin_port/readyz" 503 2 \
  || fail "/readyz did not turn 503 while draining"
code=$(timeout 30 "$engine" wait "$name" | tail -1) || fail "the sidecar did not stop within 30s of SIGTERM"
stopped=$(python3 -c "import time; print(f'{time.time() - $stop_start:.1f}')")
[ "$code" = 0 ] && echo "  ok  exited with code 0, ${stopped}s after SIGTERM (drain_delay 2s)" \
  || { "$engine" logs "$name" 2>&1 | tail -20; fail "exit code $code after SIGTERM"; }
# The engine may still be collecting the last lines when `wait` returns.
for _ in 1 2 3 4 5 6 7 8 9 10; do
  log=$("$engine" logs "$name" 2>&1)
  grep -q '"stopped"' <<<"$log" && break
  sleep 0.5
done
grep -q '"draining"' <<<"$log" && grep -q '"stopped"' <<<"$log" && echo "  ok  it logged draining, then stopped" \
  || { tail -5 <<<"$log"; fail "no 'draining' and 'stopped' log lines"; }
if grep -q Traceback <<<"$log"; then fail "a traceback in the log"; fi
echo "  ok  no traceback in the log"

say "PASSED (build ${build_seconds}s, image ${size_mb} MB, engine $engine, base $python_image)"
