#!/usr/bin/env bash
# Build the local base image (Debian bookworm + Python 3.11 and its headers + g++: the C++ CPU ops are built in the
# image, and Triton and Inductor (whose kernels include Python.h) compile) with debootstrap + `docker import`,
# for machines that cannot pull images. The Debian mirror is read from this machine's own apt
# configuration at run time (nothing is hard-coded). Idempotent: skips when the tag exists.
# Usage: docker/base/make_base.sh [TAG]   (default turbo-base:bookworm-py311-gxx-pydev)
set -euo pipefail
tag="${1:-turbo-base:bookworm-py311-gxx-pydev}"
if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "[base] $tag exists"; exit 0
fi
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    mirror=$(awk '/^URIs:/{print $2; exit}' "$f"); [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "[base] no Debian mirror found in the apt configuration" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "[base] debootstrap bookworm from the configured mirror (about a minute)" >&2
debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates,g++ \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "[base] imported $tag"
