"""What dead search workers left behind: RUNNING Optuna trials and MLflow runs, closed with a reason.

Example::

    close_stale(study, experiment_id)  # {'trials': [3], 'runs': ['<run id>', ...]}
"""

from __future__ import annotations

import os
import socket
import sys
import warnings

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from experiments import checkpoint


#: Trial user attributes naming the worker process and its parent run (see :func:`close_stale`).
WORKER_HOST, WORKER_PID, SEARCH_RUN = "nics_fix.host", "nics_fix.pid", "nics_fix.search_run_id"


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _trial_dead(trial) -> bool:
    """A RUNNING trial whose worker ran on this host under a pid that no longer exists."""
    pid = checkpoint.local_pid(trial.user_attrs)  # None: another machine's worker, Optuna's heartbeat decides
    return pid is not None and pid != os.getpid() and not checkpoint.pid_alive(pid)


def _fail_trial(study: optuna.Study, trial, reason: str) -> bool:
    """A RUNNING trial becomes FAIL with an ``error`` attribute; False if it finished meanwhile."""
    try:
        study._storage.set_trial_user_attr(trial._trial_id, "error", reason)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another worker (or the trial itself) finished it first
    return True


def _kill_run(client, run_id: str, reason: str, optuna_state: str | None = None) -> bool:
    """End a RUNNING MLflow run as KILLED, saying why; False when it was not RUNNING any more."""
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, "nics_fix.closed_as_stale", reason[:5000])
    if optuna_state:
        client.set_tag(run_id, "optuna.state", optuna_state)
    client.set_terminated(run_id, "KILLED")
    return True


def _study_runs(client, experiment_id: str, study_name: str, status: str = "RUNNING") -> list:
    runs = client.search_runs([experiment_id], filter_string=f"attributes.status = '{status}'", max_results=5000)
    return [r for r in runs if r.data.tags.get("optuna.study_name") == study_name]


def _is_child_of(run, trial) -> bool:
    """``run`` is the MLflow child run of this Optuna trial (same number, same parent search run)."""
    tags = run.data.tags
    return (tags.get("nics_fix.role") == "trial" and tags.get("optuna.trial_number") == str(trial.number)
            and tags.get("nics_fix.search_run_id") == trial.user_attrs.get(SEARCH_RUN))


def close_trial_runs(study: optuna.Study, trial, experiment_id: str, reason: str) -> list[str]:
    """End the RUNNING MLflow child run(s) of ``trial`` and its worker's search run as KILLED."""
    client = MlflowClient()
    closed = []
    for run in _study_runs(client, experiment_id, study.study_name):
        child = _is_child_of(run, trial)
        parent = run.info.run_id == trial.user_attrs.get(SEARCH_RUN)
        if (child or parent) and _kill_run(client, run.info.run_id, reason, trial.state.name if child else None):
            closed.append(run.info.run_id)
    return closed


def close_stale(study: optuna.Study, experiment_id: str) -> dict[str, list]:
    """Close what dead workers of this study left RUNNING; return the trial numbers and run ids closed.

    * Optuna: a RUNNING trial whose worker (user attrs ``nics_fix.host``,
      ``nics_fix.pid``) ran on this host under a pid that is gone becomes FAIL
      at once; on other hosts, Optuna's heartbeat fails it once it is older than
      ``2 * search.heartbeat_interval`` (``fail_stale_trials``).
    * MLflow: a RUNNING run of this study (search, trial or float reference)
      whose process is gone — its pid on this host, its heartbeat tag silent
      for ``2 * interval`` elsewhere (:func:`experiments.checkpoint.stale_reason`) —
      or a trial run whose Optuna trial is already finished, becomes KILLED
      with a ``nics_fix.closed_as_stale`` tag saying why.
    """
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _trial_dead(trial):
            continue
        reason = (f"worker pid {trial.user_attrs[WORKER_PID]} on {trial.user_attrs[WORKER_HOST]} is gone "
                  f"(killed?); closed by the search of {me}")
        if _fail_trial(study, trial, reason):
            failed.append(trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # heartbeat: other hosts' dead workers

    client = MlflowClient()
    trials = {str(t.number): t for t in study.get_trials(deepcopy=False)}
    closed = []
    for run in _study_runs(client, experiment_id, study.study_name):
        tags = run.data.tags
        trial = trials.get(tags.get("optuna.trial_number", ""))
        trial = trial if trial is not None and _is_child_of(run, trial) else None
        gone = checkpoint.stale_reason(run)
        if gone:
            reason = f"{gone}; closed by {me}"
        elif trial is not None and trial.state.is_finished():
            reason = f"its Optuna trial {trial.number} is {trial.state.name} (its worker died); closed by {me}"
        else:
            continue
        if _kill_run(client, run.info.run_id, reason, trial.state.name if trial is not None else None):
            closed.append(run.info.run_id)
    if failed or closed:
        print(f"closed what dead workers left RUNNING: Optuna trials {failed or 'none'} FAIL, "
              f"{len(closed)} MLflow run(s) KILLED", flush=True)
    return {"trials": failed, "runs": closed}


def _stale_trial_callback(experiment_name: str):
    """For Optuna's heartbeat: a trial it failed also ends its MLflow runs (child and worker's parent)."""

    def callback(study, trial):
        try:
            experiment = mlflow.get_experiment_by_name(experiment_name)
            if experiment is not None:
                close_trial_runs(study, trial, experiment.experiment_id,
                                 f"Optuna's heartbeat failed trial {trial.number}: its worker stopped "
                                 f"(closed by pid {os.getpid()} on {socket.gethostname()})")
        except Exception as err:  # noqa: BLE001 - never stop the search for this: say it
            _warn(f"trial {trial.number} was failed by Optuna's heartbeat, but its MLflow runs could not be "
                  f"closed ({type(err).__name__}: {err})")

    return callback


# --------------------------------------------------------------------------- the search
