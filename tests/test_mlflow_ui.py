"""What a person sees in ``mlflow ui``: the runs table first, with the result in it; eval keeps the run's times.

The UI check opens the page in headless Chromium (Debian ``chromium``) and
reads the rendered page; it is skipped where Chromium is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from experiments.evaluation import run_eval
from experiments.training import run_training
from tests.test_platform import compose_train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{folder}/mlflow.db"
    from experiments import tracking

    tracking.setup(uri, "nics_fix")
    results = run_training(compose_train(["fixed=w8a8", "compare_bits=[]"], uri), output_dir=folder / "out",
                           choices={"fixed": "w8a8", "model": "mlp", "data": "synthetic"})
    yield folder, uri, results
    mlflow.set_tracking_uri(None)


def test_run_carries_its_result_where_the_runs_table_shows_it(trained):
    _, uri, results = trained
    client = MlflowClient(uri)
    run = client.get_run(results["run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # runs first, not GenAI
    acc, bits = run.data.metrics["test_accuracy"], run.data.metrics["cost.avg_weight_bits"]
    assert bits == 8.0  # every weight of the MLP at 8 bits
    assert run.info.run_name == f"mlp/w8a8 | acc {acc:.4f} | 8.00 w bits"
    assert run.data.tags["mlflow.note.content"] == \
        f"fixed=w8a8, model=mlp, data=synthetic: test accuracy {acc:.4f}, average weight bits 8.00"
    assert run.data.params["summary.fixed"] == "w8a8"
    assert run.data.metrics["summary.test_accuracy"] == acc and run.data.metrics["summary.avg_weight_bits"] == 8.0


def test_eval_records_without_stretching_the_training_run(trained):
    _, uri, results = trained
    client = MlflowClient(uri)
    before = client.get_run(results["run_id"]).info
    evaluated = run_eval({"run_id": results["run_id"], "log_to": "same",
                          "mlflow": {"tracking_uri": uri, "experiment_name": "nics_fix"}})
    after = client.get_run(results["run_id"])
    assert (after.info.start_time, after.info.end_time, after.info.status) == \
        (before.start_time, before.end_time, "FINISHED")
    assert after.data.metrics["eval.test_accuracy"] == evaluated["test_accuracy"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium)")
def test_mlflow_ui_opens_on_the_runs_table_with_the_result(trained):
    folder, uri, results = trained
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port", str(port)],
                              cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow ui did not start"
                time.sleep(1)
        experiment = MlflowClient(uri).get_run(results["run_id"]).info.experiment_id
        # The address the train job prints.
        page = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               "--virtual-time-budget=30000", "--dump-dom",
                               f"http://127.0.0.1:{port}/#/experiments/{experiment}?workflowType=machine_learning"],
                              capture_output=True, text=True, timeout=240).stdout
    finally:  # the server and its workers: their own process group
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
    name = MlflowClient(uri).get_run(results["run_id"]).info.run_name
    assert name in page  # the runs table (the GenAI overview lists no runs), the result in the run's name
    assert "Detect Issues" not in page  # not the GenAI overview
