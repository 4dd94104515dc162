# Sourced by scripts/main.sh and scripts/test.sh: create or update the project's virtual
# environment (.venv) from requirements.lock. Idempotent: pip runs only when pyproject.toml
# or requirements.lock changed since the last successful install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TURBO_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
    echo "[env] creating virtual environment $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.turbo-install-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.lock" "$ROOT/requirements-nodeps.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[env] installing locked dependencies (first run takes a few minutes)" >&2
    log="$VENV/pip-install.log"
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check \
        -c "$ROOT/requirements.lock" -e "$ROOT[kernels,pipeline,dev]" >"$log" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 40 >&2
        echo "[env] pip install failed; full log: $log" >&2
        exit 1
    fi
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps \
        -r "$ROOT/requirements-nodeps.txt" >>"$log" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 20 >&2
        echo "[env] pip install (no-deps data packages) failed; full log: $log" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
cd "$ROOT"
# The C++ CPU ops (kernels/turbo_kernels/csrc): built here, once per change of their sources, never at run time.
if ! "$VENV/bin/python" -m turbo_kernels.cpu_ops --if-stale >"$VENV/turbo-ops-build.log" 2>&1; then
    tail -n 30 "$VENV/turbo-ops-build.log" >&2
    echo "[env] building the C++ CPU ops failed (g++ needed); CPU attention over the packed cache falls back to the pure-PyTorch reference (slow)" >&2
fi
