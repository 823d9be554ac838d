"""Several machines: database drivers, passwords kept out of the record, Hydra's submitit launcher.

The submitit tests run real jobs as separate processes (``hydra/launcher=submitit_local``,
the code path of ``submitit_slurm``) on tiny settings; the server stack itself
(PostgreSQL, an authenticated ``mlflow server``, faults) is in test_server_stack.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
from mlflow.tracking import MlflowClient

from experiments import searching, tracking
from tests.conftest import REPO

TINY = ["data=synthetic", "data.num_examples=128", "data.test_examples=32", "model.hidden_units=[8]",
        "trainer.epochs=1", "trainer.batch_size=32"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO), NICS_FIX_OFFLINE="1")


# --------------------------------------------------------------------------- drivers and passwords


@pytest.mark.parametrize(("url", "package"), [("postgresql+psycopg://u:pw@127.0.0.1:1/db", "psycopg[binary]"),
                                              ("mysql+pymysql://u:pw@127.0.0.1:1/db", "PyMySQL")])
def test_a_missing_database_driver_names_the_package_to_install(tmp_path, url, package):
    with pytest.raises(tracking.TrackingError) as err:
        tracking.setup(url, "drivers")
    message = str(err.value)
    assert f"pip install '{package}'" in message and ":***@" in message and "pw" not in message.split("@")[0]
    with pytest.raises(searching.SearchConfigError) as err:
        searching.open_study(searching.search_options({}), "s", url)
    assert f"pip install '{package}'" in str(err.value) and ":pw@" not in str(err.value)


def test_the_postgresql_driver_hint_names_the_cluster_extra():
    err = ModuleNotFoundError("No module named 'psycopg2'", name="psycopg2")
    assert tracking.database_error_text(err) == (
        "its driver, Python module 'psycopg2', is not installed: pip install 'psycopg2-binary' "
        "or pip install -e '.[cluster]' (PostgreSQL)")
    assert tracking.database_error_text(OSError("refused\nmore")) == "OSError: refused"


def test_passwords_are_masked_in_every_url_of_a_config():
    cfg = {"mlflow": {"tracking_uri": "postgresql+psycopg2://ml:s3cr:et@db:5432/mlflow"},
           "search": {"storage": "mysql://u:p%40ss@h/optuna", "note": "see http://a:b@host:5000/x and sqlite:///x.db"},
           "list": ["https://user:tok@example.org", "http://host:5000", 3]}
    assert tracking.without_passwords(cfg) == {
        "mlflow": {"tracking_uri": "postgresql+psycopg2://ml:***@db:5432/mlflow"},
        "search": {"storage": "mysql://u:***@h/optuna", "note": "see http://a:***@host:5000/x and sqlite:///x.db"},
        "list": ["https://user:***@example.org", "http://host:5000", 3]}


def _all_text_of_runs(uri: str, experiment: str, dst) -> str:
    """Every param, tag, metric name and artifact file of an experiment's runs, as one string."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    parts = []
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        parts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        parts += list(run.data.metrics)
        folder = client.download_artifacts(run.info.run_id, "", str(dst / run.info.run_id))
        parts += [p.read_text(errors="replace") for p in _files(folder)]
    return "\n".join(parts)


def _files(folder):
    from pathlib import Path

    return [p for p in Path(folder).rglob("*") if p.is_file()]


def test_the_train_job_records_no_database_password(tmp_path, postgres_database):
    """The train job's MLflow record and output folder hold the database URL without its password."""
    url, password = postgres_database
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "experiments.train", *TINY, f"mlflow.tracking_uri={url}",
                           "mlflow.experiment_name=masked", f"hydra.run.dir={out}"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = _all_text_of_runs(url, "masked", tmp_path / "artifacts")
    assert "config/train_config.yaml" not in record  # artifacts were read as files, not listed
    assert tracking.without_passwords(url) in record  # the URL is recorded, masked
    written = "\n".join(p.read_text(errors="replace") for p in _files(out) if ".hydra" not in p.parts)
    for text, where in ((record, "the MLflow record"), (written, "the output folder"),
                        (done.stdout + done.stderr, "the job's output")):
        assert password not in text, f"the password is in {where}"


# --------------------------------------------------------------------------- submitit


def _runs(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _record(run):
    """What a sweep job records, less what differs between two runs of it (ids, times, hosts, folders)."""
    varying = ("mlflow.", "hydra.sweep_dir", "hydra.output_dir", "nics_fix.pid", "nics_fix.host",
               "nics_fix.heartbeat", "nics_fix.checkpoint_dir")
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith(varying)}
    return run.info.status, run.data.params, tags, sorted(run.data.metrics)


@pytest.mark.slow
def test_a_sweep_through_submitit_local_records_what_the_basic_launcher_records(tmp_path, mlflow_template):
    import shutil

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = ["-m", "fixed=float,w8a8,w4a4", *TINY, f"mlflow.tracking_uri={uri}"]
    records = {}
    for launcher in ("basic", "submitit_local"):
        extra = ([] if launcher == "basic" else
                 ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1"])
        done = subprocess.run([sys.executable, "-m", "experiments.train", *sweep, *extra,
                               f"mlflow.experiment_name={launcher}", f"hydra.sweep.dir={tmp_path / launcher}"],
                              cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs = _runs(uri, launcher)
        assert Counter(r.data.tags["hydra.job_num"] for r in runs) == {"0": 1, "1": 1, "2": 1}
        assert {r.data.tags["hydra.job_num"]: r.data.params["choice.fixed"] for r in runs} == \
            {"0": "float", "1": "w8a8", "2": "w4a4"}
        assert {r.info.status for r in runs} == {"FINISHED"}
        records[launcher] = {r.data.tags["hydra.job_num"]: _record(r) for r in runs}
    assert records["submitit_local"] == records["basic"]
    # Each job ran as its own process and wrote submitit's own logs.
    logs = tmp_path / "submitit_local" / ".submitit"
    pids = {r.data.tags["nics_fix.pid"] for r in _runs(uri, "submitit_local")}
    assert len(pids) == 3 and str(os.getpid()) not in pids
    assert len(list(logs.glob("*/*_log.out"))) == 3 and len(list(logs.glob("*/*_result.pkl"))) == 3


@pytest.mark.slow
def test_searches_through_submitit_local_share_one_study(tmp_path, mlflow_template):
    """Two search workers as submitit jobs (a sweep over the seed): every trial once, one float reference."""
    import shutil

    import optuna

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = f"sqlite:///{tmp_path}/optuna.db"
    done = subprocess.run([sys.executable, "-m", "experiments.search", "-m", "search.seed=0,1", *TINY,
                           "search.n_trials=2", "search.study_name=submitit", f"search.storage={storage}",
                           f"mlflow.tracking_uri={uri}", "mlflow.experiment_name=submitit",
                           "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="submitit", storage=storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    runs = _runs(uri, "submitit")
    role = Counter(r.data.tags.get("nics_fix.role") for r in runs)
    assert role == {"search": 2, "trial": 4, "reference": 1}
    assert {r.info.status for r in runs} == {"FINISHED"}
    parents = {r.info.run_id: r for r in runs if r.data.tags["nics_fix.role"] == "search"}
    assert sorted(p.data.tags["hydra.job_num"] for p in parents.values()) == ["0", "1"]
    children = [r for r in runs if r.data.tags["nics_fix.role"] == "trial"]
    assert Counter(c.data.tags["optuna.trial_number"] for c in children) == {"0": 1, "1": 1, "2": 1, "3": 1}
    assert Counter(c.data.tags["mlflow.parentRunId"] for c in children) == {p: 2 for p in parents}
