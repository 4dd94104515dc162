#!/usr/bin/env bash
# The Airflow and MLflow UIs on this machine, over the same stores as scripts/main.sh:
#   Airflow  http://127.0.0.1:${AIRFLOW_PORT:-8080}  (user admin; password printed below)
#   MLflow   http://127.0.0.1:${MLFLOW_PORT:-5000}
# Trigger turbo_nightly by hand there ("Trigger" → the parameter form). Ctrl-C stops both:
# each runs in its own process group, which is stopped as a whole (Airflow's scheduler ignores
# a plain SIGTERM to its parent).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
data="${TURBO_HOME:-$HOME/.cache/turbo-attention}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$data/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__API__PORT="${AIRFLOW_PORT:-8080}"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:${AIRFLOW__API__PORT}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin"
mkdir -p "$AIRFLOW_HOME" "$data/mlflow"
pwfile="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
tracking="${MLFLOW_TRACKING_URI:-sqlite:///$data/mlflow/mlflow.db}"

pids=()
stop() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    sleep 5
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    echo "[ui] stopped"
}
trap stop INT TERM EXIT

setsid airflow standalone >"$AIRFLOW_HOME/standalone.log" 2>&1 &
pids+=($!)
artifacts=""
case "$tracking" in sqlite:///*) artifacts="--artifacts-destination $(dirname "${tracking#sqlite:///}")/artifacts";; esac
# shellcheck disable=SC2086
setsid mlflow server --backend-store-uri "$tracking" $artifacts --host 127.0.0.1 \
    --port "${MLFLOW_PORT:-5000}" >"$data/mlflow/server.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 120); do
    curl -fsS "http://127.0.0.1:${AIRFLOW__API__PORT}/api/v2/monitor/health" >/dev/null 2>&1 && break
    sleep 1
done
echo "[ui] Airflow  http://127.0.0.1:${AIRFLOW__API__PORT}   user admin, password: $(python -c "import json,sys; print(json.load(open(sys.argv[1]))['admin'])" "$pwfile" 2>/dev/null || echo "see $AIRFLOW_HOME/standalone.log")"
echo "[ui] MLflow   http://127.0.0.1:${MLFLOW_PORT:-5000}   (store $tracking)"
echo "[ui] logs: $AIRFLOW_HOME/standalone.log, $data/mlflow/server.log — Ctrl-C stops both"
wait
