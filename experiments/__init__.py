"""The platform around nics_fix: Hydra entry points, MLflow record, Optuna search."""

import os as _os

# MLflow's HTTP defaults (7 retries with backoff factor 2, 120 s per request) wait about
# 4 minutes before a request to a tracking server that went away fails. Backoff factor 1
# halves that: 7 retries, 0+2+4+8+16+32+64 s = about 2 minutes, which rides out a server
# restart or a short outage (tests/test_server_stack.py rehearses one) and still says
# so within minutes when the server is gone for good. MLflow reads these at each request;
# values you set yourself are kept. (A server that is not there at all is caught at
# start-up by experiments.tracking.setup, within seconds.)
_os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
_os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
_os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
