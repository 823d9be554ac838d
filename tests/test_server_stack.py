"""The cluster rehearsed on one machine: the real server stack, search workers over HTTP, and faults.

* ``mlflow server --app-name basic-auth`` (users and passwords) with a PostgreSQL
  backend store and proxied artifacts in a local folder (``--artifacts-destination``);
* the Optuna study in PostgreSQL;
* 4 search workers as separate processes that reach MLflow only over HTTP, with
  the credentials in ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``;
* faults: one worker SIGKILLed mid-trial (then the same command again), the
  tracking server stopped mid-search and started again, and (full rehearsal)
  the artifact destination unwritable for one trial.

Needs ``NICS_FIX_TEST_POSTGRES`` (CI sets it, see .ci/postgres.sh). CI runs a
reduced rehearsal (2 short trials per worker, a short outage); the full one
(4 trials per worker, a 20 s outage, the unwritable artifact destination) runs with

    NICS_FIX_FULL_REHEARSAL=1 python -m pytest tests/test_server_stack.py -s

and prints what was finished, lost, duplicated and left RUNNING, and how long
the workers waited.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import requests
from optuna.trial import TrialState

from experiments import tracking
from tests.conftest import REPO, postgres_role

FULL = os.environ.get("NICS_FIX_FULL_REHEARSAL") == "1"
N_TRIALS = 4 if FULL else 2      # per worker
OUTAGE_S = 20 if FULL else 3     # the tracking server is down this long, plus its restart
TINY = ["data=synthetic", "data.num_examples=480", "data.test_examples=32", "model.hidden_units=[8]",
        "trainer.batch_size=32", "trainer.epochs=3", "trainer.save_model=true"]
STUDY = "rehearsal"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TrackingServer:
    """``mlflow server`` with basic-auth, a database backend and proxied artifacts; stopped and started at will."""

    def __init__(self, folder: Path, backend_uri: str):
        self.folder = folder
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.artifacts = folder / "artifacts"
        self.admin = ("admin", f"admin-{uuid.uuid4().hex}")
        (folder / "basic_auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{folder / 'basic_auth.db'}\nadmin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 60\n")  # one password hash a minute, not one a request
        self.env = dict(os.environ, MLFLOW_AUTH_CONFIG_PATH=str(folder / "basic_auth.ini"),
                        MLFLOW_AUTH_ADMIN_PASSWORD=self.admin[1], MLFLOW_FLASK_SERVER_SECRET_KEY=uuid.uuid4().hex,
                        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                        "--backend-store-uri", backend_uri, "--artifacts-destination", str(self.artifacts),
                        "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--workers", "1"]
        self.proc = None

    def start(self, timeout: float = 400) -> float:
        """Start it and wait until it answers; return how long that took."""
        started = time.time()
        with open(self.folder / "server.log", "a") as log:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # uvicorn runs in a child: stop the group
        while time.time() - started < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.time() - started
            except requests.RequestException:
                pass
            time.sleep(0.5)
        pytest.fail(f"mlflow server did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def create_user(self, name: str, password: str) -> None:
        answer = requests.post(self.url + "/api/2.0/mlflow/users/create", auth=self.admin, timeout=30,
                               json={"username": name, "password": password})
        assert answer.status_code == 200, answer.text

    def client(self):
        """An MLflow client with the admin's credentials (MLflow reads them from the environment)."""
        from mlflow.tracking import MlflowClient

        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = self.admin
        return MlflowClient(self.url)


@pytest.fixture
def stack(tmp_path):
    """The server stack: PostgreSQL databases for MLflow and Optuna, an authenticated tracking server."""
    with postgres_role(2) as ((mlflow_db, optuna_db), db_password):
        folder = tmp_path
        server = TrackingServer(folder, mlflow_db)
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        try:
            startup = server.start()
            worker = ("worker", f"worker-{uuid.uuid4().hex}")
            server.create_user(*worker)
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO), NICS_FIX_OFFLINE="1",
                       MLFLOW_TRACKING_URI=server.url, MLFLOW_TRACKING_USERNAME=worker[0],
                       MLFLOW_TRACKING_PASSWORD=worker[1], OPTUNA_STORAGE=optuna_db)
            for key in [k for k in env if k.startswith("MLFLOW_HTTP_REQUEST_")]:
                del env[key]  # the platform's own retry settings, as a user gets them
            yield {"server": server, "folder": folder, "env": env, "optuna_db": optuna_db, "startup_s": startup,
                   "secrets": {"database": db_password, "worker": worker[1], "admin": server.admin[1]}}
        finally:
            server.stop()
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


# --------------------------------------------------------------------------- workers


def _worker_command(seed: int, run_dir: Path, experiment: str = STUDY) -> list[str]:
    """The README's command for one machine: MLflow over HTTP, the study in PostgreSQL."""
    return [sys.executable, "-m", "experiments.search", "mlflow=server", f"mlflow.experiment_name={experiment}",
            "search.storage=${oc.env:OPTUNA_STORAGE}", f"search.study_name={STUDY}", f"search.seed={seed}",
            f"search.n_trials={N_TRIALS}", *TINY, f"hydra.run.dir={run_dir}"]


def _spawn(command, folder: Path, name: str, env) -> subprocess.Popen:
    log = open(folder / f"{name}.log", "w")  # noqa: SIM115 - closed in _finish
    proc = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log, proc.log_path = log, folder / f"{name}.log"
    return proc


def _finish(proc, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.log.close()


def _runs(client, experiment=STUDY):
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=2000)


def _poll(condition, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            found = condition()
        except Exception:  # noqa: BLE001 - stores busy or not created yet: poll again
            found = None
        if found:
            return found
        if procs and all(p.poll() is not None for p in procs):
            pytest.fail(f"every worker ended before {what}")
        time.sleep(1)  # the server has one worker process: leave it to the workers
    pytest.fail(f"no {what} within {timeout} s")


def _training_trial_run(client, pids=None):
    """A trial's child run that is RUNNING and has logged an epoch (so: mid-trial), optionally of given pids."""
    for run in _runs(client):
        tags = run.data.tags
        if (tags.get("nics_fix.role") == "trial" and run.info.status == "RUNNING" and "train_loss" in run.data.metrics
                and (pids is None or tags.get("nics_fix.pid") in pids)):
            return run
    return None


def _frozen_mid_trial(client, victim):
    """``victim``'s trial run, with ``victim`` stopped (SIGSTOP) while that run is still RUNNING, or None.

    A run seen RUNNING may end before a kill sent at once lands (its last epoch, evaluation and model
    are quick); stopping the worker first, then reading the run again, leaves no such window. A run that
    ended meanwhile lets the worker go on, for a later poll."""
    run = _training_trial_run(client, {str(victim.pid)})
    if run is None:
        return None
    victim.send_signal(signal.SIGSTOP)
    still_running = False
    try:
        time.sleep(1)  # a request the worker sent before the stop reaches the server
        still_running = client.get_run(run.info.run_id).info.status == "RUNNING"
    finally:
        if not still_running:
            victim.send_signal(signal.SIGCONT)
    return run if still_running else None


_RETRY = re.compile(r"^\[(?P<time>[\d-]+ [\d:,]+)\]\[urllib3\.connectionpool\]\[WARNING\] - Retrying", re.M)


def _waits(log_text: str) -> tuple[int, float]:
    """(retries, seconds from the first retry to the last) of one worker's log."""
    times = [datetime.strptime(m["time"], "%Y-%m-%d %H:%M:%S,%f") for m in _RETRY.finditer(log_text)]
    return len(times), (times[-1] - times[0]).total_seconds() if times else 0.0


def _all_text(client, runs, dst: Path) -> str:
    """Every param, tag and artifact file of ``runs``, as one string."""
    parts = []
    for run in runs:
        parts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        folder = Path(client.download_artifacts(run.info.run_id, "", str(dst / run.info.run_id)))
        parts += [p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()]
    return "\n".join(parts)


def _artifacts(client, run_id, path=""):
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


# --------------------------------------------------------------------------- no open door


def _strangers_are_refused(stack):
    """No open door: no password or a wrong one is refused, and the platform says so in one line, exit 2.

    Starts two train jobs that must be refused and returns a function that checks them.
    """
    server, env = stack["server"], stack["env"]
    for auth in (None, ("worker", "wrong-password-123")):
        answer = requests.get(server.url + "/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                              auth=auth, timeout=30)
        assert answer.status_code == 401
    # The platform says so before any run starts, in one line, exit 2 (its probe, then the CLI).
    wrong = dict(env, MLFLOW_TRACKING_PASSWORD="wrong-password-123")
    none = {k: v for k, v in env.items() if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    expected = {
        "wrong": f"mlflow.tracking_uri={server.url}: the tracking server refused user 'worker' with the "
                 "password in MLFLOW_TRACKING_PASSWORD (HTTP 401); check both variables",
        "none": f"mlflow.tracking_uri={server.url}: the tracking server asks for a user name and password "
                "(HTTP 401); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"}
    jobs = {name: subprocess.Popen([sys.executable, "-m", "experiments.train", "mlflow=server", *TINY,
                                    f"hydra.run.dir={stack['folder'] / 'refused'}"], cwd=stack["folder"],
                                   env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, environment in (("wrong", wrong), ("none", none))}

    def check():
        for name, job in jobs.items():
            out, err = job.communicate(timeout=1200)
            assert job.returncode == 2, err[-3000:]
            assert err.strip() == f"error: {expected[name]}", err[-3000:]
            assert "wrong-password-123" not in out + err

    return check


# --------------------------------------------------------------------------- the rehearsal


@pytest.mark.slow
def test_four_workers_over_http_survive_a_killed_worker_and_a_server_outage_behind_a_password(stack):
    server, folder, env = stack["server"], stack["folder"], stack["env"]
    client = server.client()
    report: dict = {"server_startup_s": round(stack["startup_s"], 1)}
    workers = [_spawn(_worker_command(i, folder / f"machine{i}"), folder, f"worker{i}", env) for i in range(4)]
    try:
        refused = _strangers_are_refused(stack)  # while the workers start
        # Fault 1: SIGKILL worker 3 in the middle of one of its trials.
        victim = workers[3]
        killed_run = _poll(lambda: _frozen_mid_trial(client, victim), 1800, "trial of worker 3 in training", workers)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        study = optuna.load_study(study_name=STUDY, storage=stack["optuna_db"])
        in_progress = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))
                       if t.user_attrs.get("nics_fix.pid") == victim.pid]
        assert in_progress == [int(killed_run.data.tags["optuna.trial_number"])], "the kill missed the trial"
        killed_trial = in_progress[0]

        # Fault 2: stop the tracking server while a live worker is mid-trial, start it again.
        live = workers[:3]
        _poll(lambda: _training_trial_run(client, {str(w.pid) for w in live}), 1800, "a trial in training", live)
        stopped = time.time()
        server.stop()
        # Who the outage hits: the workers alive when the server goes down (with faster
        # training, all of them may end within the outage, retrying against it).
        running_during_outage = [w for w in live if w.poll() is None]
        time.sleep(OUTAGE_S)
        restart = server.start()
        report["outage_s"] = round(time.time() - stopped, 1)
        report["server_restart_s"] = round(restart, 1)

        # Fault 3 (full rehearsal): the artifact destination refuses one trial's model.
        blocked_trial = None
        if FULL:
            run = _poll(lambda: _training_trial_run(client, {str(w.pid) for w in live}), 1800,
                        "a trial in training after the restart", live)
            target = server.artifacts / run.info.experiment_id / run.info.run_id / "artifacts" / "fixed_model"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("not a folder: the model cannot be stored here")
            blocked_trial = int(run.data.tags["optuna.trial_number"])

        refused()
        codes = [_finish(w, 2400) for w in live]
        _finish(victim, 1)
        # The killed worker's machine runs the same command again: it closes what was left, then goes on.
        rerun = _spawn(_worker_command(3, folder / "machine3"), folder, "worker3_again", env)
        codes.append(_finish(rerun, 2400))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(30)
    logs = {p.stem: p.read_text() for p in sorted(folder.glob("worker*.log"))}
    assert codes == [0, 0, 0, 0], "\n\n".join(f"{k}:\n{v[-3000:]}" for k, v in logs.items())
    assert running_during_outage, "the outage came after every worker had ended"
    # The killed worker's trial is closed by its rerun (its pid is gone) or, if the others ran on for
    # more than 2 heartbeat intervals, by Optuna's heartbeat in a live worker: either way FAIL, runs KILLED.
    closed_by = ("rerun" if f"Optuna trials [{killed_trial}] FAIL" in logs["worker3_again"] else "heartbeat")

    # Optuna: nothing RUNNING; FAIL exactly the killed (and the blocked) trial; every process ran its trials.
    study = optuna.load_study(study_name=STUDY, storage=stack["optuna_db"])
    trials = study.get_trials()
    states = Counter(t.state.name for t in trials)
    failed = {t.number for t in trials if t.state == TrialState.FAIL}
    assert failed == {killed_trial} | ({blocked_trial} if blocked_trial is not None else set()), states
    if closed_by == "rerun":
        assert "is gone" in study.trials[killed_trial].user_attrs["error"]
    if blocked_trial is not None:
        assert "fixed_model" in study.trials[blocked_trial].user_attrs["error"]
    assert states["RUNNING"] == 0 and states["COMPLETE"] == len(trials) - len(failed)
    killed_worker_trials = [t for t in trials if t.user_attrs.get("nics_fix.pid") == victim.pid]
    assert len(trials) == 4 * N_TRIALS + len(killed_worker_trials)

    # MLflow: one child run per trial, in the trial's state, with its artifacts; nothing RUNNING.
    runs = _runs(client)
    by_role = {role: [r for r in runs if r.data.tags.get("nics_fix.role") == role]
               for role in ("search", "trial", "reference")}
    children = Counter(int(r.data.tags["optuna.trial_number"]) for r in by_role["trial"])
    duplicated = sorted(n for n, c in children.items() if c > 1)
    left_running = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    child = {int(r.data.tags["optuna.trial_number"]): r for r in by_role["trial"]}
    lost = []
    for trial in trials:
        run = child.get(trial.number)
        if trial.state != TrialState.COMPLETE:
            continue
        files = _artifacts(client, run.info.run_id) if run else []
        complete_record = (run is not None and run.info.status == "FINISHED"
                           and run.data.tags.get("optuna.state") == "COMPLETE"
                           and run.data.metrics.get("val_accuracy") == pytest.approx(trial.values[0])
                           and run.info.run_id == trial.user_attrs["mlflow_run_id"])
        if "duplicate_of" not in trial.user_attrs:
            complete_record = complete_record and {"config/train_config.yaml", "config/fixed_config.yaml"} <= set(
                files) and any(f.startswith("fixed_model/") for f in files)
        if not complete_record:
            lost.append(trial.number)
    assert sorted(children) == [t.number for t in trials] and not duplicated and not left_running and not lost
    assert child[killed_trial].info.status == "KILLED" and child[killed_trial].data.tags["optuna.state"] == "FAIL"
    if blocked_trial is not None:
        assert child[blocked_trial].info.status == "FAILED" and "fixed_model" in child[blocked_trial].data.tags["error"]

    # One float reference, trained once, for all five worker processes.
    assert len(by_role["reference"]) == 1 and by_role["reference"][0].info.status == "FINISHED"
    assert study.user_attrs["float_run_id"] == by_role["reference"][0].info.run_id
    assert sum("training the float reference" in text for text in logs.values()) == 1

    # Parents: the killed worker's KILLED (closed by its rerun), the others FINISHED with the Pareto files.
    parents = {r.data.tags["nics_fix.pid"]: r for r in by_role["search"]}
    assert len(parents) == 5 and parents[str(victim.pid)].info.status == "KILLED"
    last = parents[str(rerun.pid)]
    for pid, parent in parents.items():
        if pid != str(victim.pid):
            assert parent.info.status == "FINISHED"
            assert {"pareto.csv", "trials.csv"} <= set(_artifacts(client, parent.info.run_id))
    front = {f"pareto/trial_{t.number}.yaml" for t in study.best_trials if "duplicate_of" not in t.user_attrs}
    assert front <= set(_artifacts(client, last.info.run_id, "pareto"))

    # No password anywhere: the whole MLflow record, the workers' output folders and their output.
    record = _all_text(client, runs, folder / "downloaded")
    written = "\n".join(p.read_text(errors="replace") for i in range(4)
                        for p in (folder / f"machine{i}").rglob("*") if p.is_file() and p.suffix != ".db")
    for name, secret in stack["secrets"].items():
        for text, where in ((record, "the MLflow record"), (written, "an output folder"),
                            ("\n".join(logs.values()), "a worker's output")):
            assert secret not in text, f"the {name} password is in {where}"
    assert tracking.without_passwords(stack["optuna_db"]) in record  # recorded, masked

    waits = {name: _waits(text) for name, text in logs.items()}
    report.update({
        "trials": len(trials), "states": dict(states), "killed_trial": killed_trial, "killed_trial_closed_by": closed_by, "blocked_trial": blocked_trial,
        "finished_trials_lost": len(lost), "duplicated": len(duplicated), "left_running": len(left_running),
        "worker_retries_and_wait_s": {k: [n, round(s, 1)] for k, (n, s) in waits.items()},
        "longest_trial_s": round(max(t.duration.total_seconds() for t in trials if t.duration), 1),
        "median_trial_s": round(sorted(t.duration.total_seconds() for t in trials if t.duration)[len(trials) // 2], 1),
    })
    print("\nREHEARSAL " + json.dumps(report))
    # The workers did wait for the server (they retried) rather than fail their trials.
    assert sum(n for n, _ in waits.values()) > 0


