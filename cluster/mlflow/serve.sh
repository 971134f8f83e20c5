#!/usr/bin/env bash
# The one recipe for dualssl's MLflow tracking server: the launcher head, the MLflow container beside
# every KubeRay head, and the tests' `mlflow_server` fixture (tests/conftest.py) all run this file.
#
#   MLFLOW_ARTIFACTS=/mnt/shared/mlflow/artifacts MLFLOW_DB_HOST=mlflow-db \
#   MLFLOW_DB_PASSWORD_FILE=/etc/mlflow-db/password bash cluster/mlflow/serve.sh
#
# Environment (nothing secret is ever a process argument: `ps` shows arguments to every user):
#   MLFLOW_ARTIFACTS          required: --artifacts-destination (shared storage on clusters)
#   MLFLOW_PORT               port on 127.0.0.1 (default 5000); users tunnel to it (cluster/README.md)
#   MLFLOW_WORKERS            server worker processes (default 4)
#   MLFLOW_WORKER_HEALTHCHECK_S  seconds a worker may take to answer uvicorn's health check (default
#                             60; uvicorn's 5 s kills and restarts workers forever on a busy head)
#   MLFLOW_BACKEND_STORE_URI  a store without credentials (e.g. sqlite:////home/ray/mlflow/mlflow.db); or:
#   MLFLOW_DB_HOST, MLFLOW_DB_PORT (5432), MLFLOW_DB_NAME (mlflow), MLFLOW_DB_USER (mlflow) and
#   MLFLOW_DB_PASSWORD_FILE   PostgreSQL; the password is read from the file (a Kubernetes Secret
#                             volume, or a 0600 file) into PGPASSWORD, which libpq reads.
set -euo pipefail

fail() { echo "cluster/mlflow/serve.sh: error: $*" >&2; exit 2; }

[[ -n "${MLFLOW_ARTIFACTS:-}" ]] || fail "set MLFLOW_ARTIFACTS to the artifacts folder (shared storage)"
if [[ -n "${MLFLOW_BACKEND_STORE_URI:-}" ]]; then
  # user:password@ in a URI would land in the server's arguments and logs
  [[ ! "$MLFLOW_BACKEND_STORE_URI" =~ ://[^/@]*:[^/@]*@ ]] \
    || fail "MLFLOW_BACKEND_STORE_URI holds a password; put it in a file named by MLFLOW_DB_PASSWORD_FILE"
  store="$MLFLOW_BACKEND_STORE_URI"
else
  [[ -n "${MLFLOW_DB_HOST:-}" ]] || fail "set MLFLOW_DB_HOST (PostgreSQL) or MLFLOW_BACKEND_STORE_URI"
  [[ -r "${MLFLOW_DB_PASSWORD_FILE:-}" ]] \
    || fail "MLFLOW_DB_PASSWORD_FILE=${MLFLOW_DB_PASSWORD_FILE:-} is not a readable file; mount the database Secret there"
  PGPASSWORD="$(< "$MLFLOW_DB_PASSWORD_FILE")"
  export PGPASSWORD
  store="postgresql+psycopg2://${MLFLOW_DB_USER:-mlflow}@${MLFLOW_DB_HOST}:${MLFLOW_DB_PORT:-5432}/${MLFLOW_DB_NAME:-mlflow}"
fi
mkdir -p "$MLFLOW_ARTIFACTS"

exec mlflow server --host 127.0.0.1 --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}" \
  --uvicorn-opts "--timeout-worker-healthcheck ${MLFLOW_WORKER_HEALTHCHECK_S:-60}" \
  --backend-store-uri "$store" --artifacts-destination "$MLFLOW_ARTIFACTS" --serve-artifacts
