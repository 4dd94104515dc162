#!/usr/bin/env bash
# The main job on embedded defaults: the nightly pipeline (Airflow DAG turbo_nightly) run once
# here — Airflow on SQLite, MLflow's local store, SmolLM2-135M-Instruct, deploy target docker
# when a Docker engine answers (else none). Extra arguments go to `turbo pipeline run`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
mkdir -p runs/pipeline
exec turbo pipeline run --deploy-target auto --json runs/pipeline/last-run.json "$@"
