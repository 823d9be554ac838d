"""Per-epoch checkpoints of a train job, and finding the run to resume.

A checkpoint folder holds ``state-<epoch>.npz`` (every model variable —
weights, scales, BN statistics — and every optimizer variable, in creation
order) and ``state.json`` (the next epoch, the name of that arrays file, the
MLflow run id and the last epoch's logs). Each file is written to a temporary
name and renamed, the arrays first and ``state.json`` last, and an arrays file
is deleted only once ``state.json`` no longer names it: a SIGKILL at any
instant leaves a complete, matching pair, never a torn or mixed one.

The run records its checkpoint folder in the tag ``nics_fix.checkpoint_dir``,
its host and process id in ``nics_fix.host`` / ``nics_fix.pid``, and a
heartbeat (``nics_fix.heartbeat``): that is how a RUNNING run whose process
died (SIGKILL, power loss, a preempted node) is told apart from one still
training, on this host or another (see :func:`stale_reason`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
from mlflow.tracking import MlflowClient

from experiments import tracking
from nics_fix.saving import atomic_savez, atomic_write

STATE_JSON = "state.json"


class ResumeError(ValueError):
    """Nothing to resume from where the user pointed."""


def save_checkpoint(folder: Path, model, next_epoch: int, run_id: str, logs=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"model_{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.variables)}
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        arrays.update({f"optimizer_{i}": keras.ops.convert_to_numpy(v)
                       for i, v in enumerate(optimizer.variables)})

    arrays_name = f"state-{int(next_epoch)}.npz"
    atomic_savez(folder / arrays_name, arrays)
    state = {"next_epoch": int(next_epoch), "arrays": arrays_name, "run_id": run_id,
             "logs": {str(k): float(v) for k, v in (logs or {}).items()}}
    atomic_write(folder / STATE_JSON, lambda tmp: tmp.write_text(json.dumps(state)))
    for old in folder.glob("state-*.npz"):
        if old.name != arrays_name:
            old.unlink(missing_ok=True)


def read_state(folder: Path) -> dict:
    path = Path(folder) / STATE_JSON
    state = json.loads(path.read_text()) if path.is_file() else {}
    if "arrays" not in state or not (Path(folder) / state["arrays"]).is_file():
        raise ResumeError(f"{folder}: no checkpoint (state.json and the arrays it names) to resume from")
    return state


def load_checkpoint(folder: Path, model) -> int:
    """Restore model and optimizer variables; return the epoch to continue from."""
    state = read_state(folder)
    with np.load(Path(folder) / state["arrays"]) as data:
        arrays = {k: data[k] for k in data.files}
    variables = list(model.variables)
    n_model = sum(k.startswith("model_") for k in arrays)
    if n_model != len(variables):
        raise ResumeError(f"{folder}: checkpoint has {n_model} model variables, the model {len(variables)}: "
                          "was the config changed since the run started?")
    for i, variable in enumerate(variables):
        if tuple(variable.shape) != arrays[f"model_{i}"].shape:
            raise ResumeError(f"{folder}: the checkpoint's {variable.path} has shape {arrays[f'model_{i}'].shape}, "
                              f"the model's {tuple(variable.shape)}: resume with the config the run started with")
        variable.assign(arrays[f"model_{i}"])
    opt_keys = [k for k in arrays if k.startswith("optimizer_")]
    if opt_keys:
        optimizer = model.optimizer
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        opt_vars = list(optimizer.variables)
        if len(opt_vars) != len(opt_keys):
            raise ResumeError(f"{folder}: checkpoint has {len(opt_keys)} optimizer variables, "
                              f"the optimizer {len(opt_vars)}")
        for i, variable in enumerate(opt_vars):
            variable.assign(arrays[f"optimizer_{i}"])
    return int(state["next_epoch"])


class CheckpointCallback(keras.callbacks.Callback):
    """Saves a checkpoint, with the epoch's logs, at the end of every epoch."""

    def __init__(self, folder: Path, run_id: str):
        super().__init__()
        self.folder = Path(folder)
        self.run_id = run_id

    def on_epoch_end(self, epoch, logs=None):
        save_checkpoint(self.folder, self.model, epoch + 1, self.run_id, logs)


def process_tags() -> dict[str, str]:
    return {"nics_fix.host": socket.gethostname(), "nics_fix.pid": str(os.getpid())}


def local_pid(tags) -> int | None:
    """The pid of :func:`process_tags` (run tags or trial attributes) if it ran on this host."""
    if tags.get("nics_fix.host") != socket.gethostname() or "nics_fix.pid" not in tags:
        return None
    return int(tags["nics_fix.pid"])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


HEARTBEAT = "nics_fix.heartbeat"  # tag: Unix time of the run's process's last beat
HEARTBEAT_INTERVAL = "nics_fix.heartbeat_interval"  # tag: seconds between beats


@contextlib.contextmanager
def heartbeat(run_id: str, interval: float | None):
    """While the body runs, stamp the run's :data:`HEARTBEAT` tag every ``interval`` s.

    A pid can only be checked on its own host; the heartbeat is how a RUNNING
    run of a process that died on *another* machine (a preempted cluster job
    rescheduled elsewhere) is told from a live one. ``None`` or 0: no beats.
    """
    if not interval:
        yield
        return
    client = MlflowClient()  # the tracking URI of the caller, fixed now
    tracking.log_batch(run_id, tags={HEARTBEAT_INTERVAL: interval, HEARTBEAT: time.time()})
    stop = threading.Event()

    def beat():
        failed = False
        while not stop.wait(interval):
            try:
                client.set_tag(run_id, HEARTBEAT, str(time.time()))
                failed = False
            except Exception as err:  # noqa: BLE001 - a missed beat must not stop training
                if not failed:
                    print(f"warning: heartbeat of run {run_id} not recorded ({type(err).__name__}: {err})",
                          file=sys.stderr, flush=True)
                failed = True

    thread = threading.Thread(target=beat, name=f"nics_fix-heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def stale_reason(run, now: float | None = None) -> str | None:
    """Why a RUNNING run's process is provably gone, or ``None`` if it may be alive.

    On the run's own host (tag ``nics_fix.host``): its pid no longer exists.
    Elsewhere: its heartbeat is older than twice its interval (clocks of the
    two machines must agree to well within that margin).
    """
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    pid = local_pid(tags)
    if pid is not None:
        return None if pid_alive(pid) else f"process {pid} on {tags['nics_fix.host']} is gone (killed?)"
    try:
        last, interval = float(tags[HEARTBEAT]), float(tags[HEARTBEAT_INTERVAL])
    except (KeyError, ValueError):
        return None  # no heartbeat recorded: only its own host can tell
    silent = (time.time() if now is None else now) - last
    if silent <= 2 * interval:
        return None
    return (f"no heartbeat from process {tags.get('nics_fix.pid', '?')} on {tags.get('nics_fix.host', '?')} "
            f"for {silent:.0f} s (interval {interval:g} s)")


def is_stale(run, now: float | None = None) -> bool:
    """A RUNNING run whose process is gone (see :func:`stale_reason`)."""
    return stale_reason(run, now) is not None
