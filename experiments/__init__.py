"""The platform around nics_fix: Hydra entry points, MLflow record, Optuna search."""

import os as _os

# MLflow's HTTP defaults (7 retries with backoff factor 2, 120 s per request) make a
# job whose tracking server went away hang for minutes before it says so. A few quick
# retries (about 7 s in all) still ride out a server restart. MLflow reads these at
# each request; values you set yourself are kept. (A server that is not there at all
# is caught at start-up by experiments.tracking.setup, within seconds.)
_os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
_os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
_os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
