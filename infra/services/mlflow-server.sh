#!/bin/sh
# The project's MLflow tracking server, defined once: `make up` (flows/services.py), the tests' MLflow
# fixture (tests/conftest.py) and the compose service (infra/docker-compose.yml) all start it with this.
#   sh infra/services/mlflow-server.sh --backend-store-uri URI --artifacts-destination URI \
#       --host HOST --port PORT [other mlflow server options]
# Both stores are required: without them MLflow writes ./mlflow.db and ./mlartifacts wherever it starts.
# Artifacts are proxied by the server (--serve-artifacts): clients need no access to the artifact store.
# MLFLOW_EXECUTABLE: the mlflow command (default: mlflow on PATH).
# MLFLOW_WORKERS: request-handling processes (default 1, enough for one person or a test session).
# MLflow 3 also starts background job consumers (dozens of processes) that nothing in this project uses:
# off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says otherwise.
set -eu
for required in --backend-store-uri --artifacts-destination; do
    case " $* " in
        *" $required "* | *" $required="*) ;;
        *) echo "$0: $required is required" >&2; exit 2 ;;
    esac
done
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# exec: the server replaces this shell, so a signal to this process id reaches MLflow itself
exec "${MLFLOW_EXECUTABLE:-mlflow}" server --serve-artifacts --workers "${MLFLOW_WORKERS:-1}" "$@"
