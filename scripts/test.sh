#!/usr/bin/env bash
# The test suite, slow tests included. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# The image tests need a Docker engine, debootstrap and a local registry, the screenshot test
# Chromium (Debian packages).
# Install them when this machine can (root + apt-get); otherwise those tests fail and say why.
need=()
for pair in dockerd:docker.io debootstrap:debootstrap docker-registry:docker-registry chromium:chromium; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing ${need[*]} for the image tests" >&2
    apt-get install -y -q "${need[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${need[@]}" >/dev/null 2>&1; } \
        || echo "[test] could not install ${need[*]}; the image tests will fail" >&2
fi
ruff check .
exec python -m pytest "$@"
