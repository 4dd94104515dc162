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
want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.lock" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[env] installing locked dependencies (first run takes a few minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$ROOT/requirements.lock" -e "$ROOT[kernels,pipeline,dev]"
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
cd "$ROOT"
