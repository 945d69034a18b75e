#!/usr/bin/env bash
# Makes a local stand-in for python:3.13-slim-trixie from Debian's own packages with
# debootstrap, for machines that cannot pull a base image: Debian trixie (minbase) with its
# python3 (3.13), venv support and the CA certificates, and nothing else.
#
#   tests/container/make_base.sh ENGINE TAG      e.g.  podman localhost/python:3.13-slim-trixie
#
# Needs root (debootstrap) and Debian's package mirror (DEBIAN_MIRROR, default deb.debian.org).
set -euo pipefail

engine=${1:?usage: make_base.sh ENGINE TAG}
tag=${2:?usage: make_base.sh ENGINE TAG}
suite=${DEBIAN_SUITE:-trixie}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "make_base: debootstrap is not installed (apt-get install debootstrap)" >&2
  exit 3
fi
if [ "$(id -u)" != 0 ]; then
  echo "make_base: debootstrap needs root" >&2
  exit 3
fi

rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/sidecar-base.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT

echo "make_base: debootstrap $suite from $mirror (a few minutes)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
  tail -20 "$rootfs.log" >&2
  echo "make_base: debootstrap failed (full log: $rootfs.log)" >&2
  exit 3
}
rm -f "$rootfs.log"

# What the official slim images leave out too: package lists, caches, documentation.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/var/log/*.log "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
# The build machine's name resolution does not belong in an image.
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"

python_version=$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
tar --numeric-owner -C "$rootfs" -c . | "$engine" import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase $suite + python3 $python_version" \
  - "$tag" >/dev/null 2>"$rootfs.log" || {
  cat "$rootfs.log" >&2
  echo "make_base: $engine import failed" >&2
  exit 3
}
rm -f "$rootfs.log"
echo "make_base: made $tag (Debian $suite, Python $python_version)"
