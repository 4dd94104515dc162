#!/usr/bin/env bash
# Retake the README's screenshots (docs/images/*.png): a small pipeline run, the real Airflow
# and MLflow UIs, headless Chromium. Arguments go to scripts/screenshots.py (--model, --out).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[screenshots] installing Debian's chromium" >&2
        apt-get install -y -q chromium >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
            || { echo "[screenshots] could not install chromium" >&2; exit 1; }
    else
        echo "[screenshots] needs Chromium (Debian package chromium)" >&2
        exit 1
    fi
fi
exec python "$ROOT/scripts/screenshots.py" "$@"
