"""Reliability: killed jobs resume, random configs never crash the parsers, edge-case numerics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nics_fix as nf
from nics_fix.quant import MAX_SCALE, MIN_SCALE
from tests.conftest import FIX8, REPO

# ---------------------------------------------------------------------------
# Kill and resume a train job (real subprocess, real SIGKILL)
# ---------------------------------------------------------------------------


def _train_cmd(tmp_path, run_dir, *extra):
    return [sys.executable, "-m", "experiments.train", "data=synthetic", "data.num_examples=256",
            "model.hidden_units=[16]", "trainer.verbose=0", "trainer.batch_size=16", "fixed=w8a8",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={run_dir}", *extra]


@pytest.mark.slow
def test_sigkilled_train_job_resumes_in_the_same_run(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    state = tmp_path / "first" / "checkpoint" / "state.json"
    proc = subprocess.Popen(_train_cmd(tmp_path, tmp_path / "first", "trainer.epochs=200"), cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if state.is_file() and json.loads(state.read_text())["next_epoch"] >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("no checkpoint within 240 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = json.loads(state.read_text())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(killed_at["run_id"])
    assert run.info.status == "RUNNING"  # SIGKILL: nothing could close it...
    from experiments.checkpoint import is_stale

    assert is_stale(run)  # ...but its process is provably gone

    # Epochs are fast: the first job may have run several more between two polls. Two more after the kill.
    epochs = killed_at["next_epoch"] + 2
    done = subprocess.run(_train_cmd(tmp_path, tmp_path / "second", f"trainer.epochs={epochs}",
                                     "trainer.resume=true"),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = client.get_run(killed_at["run_id"])
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["nics_fix.resumed_from_epoch"]) == killed_at["next_epoch"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert sorted(steps) == list(range(epochs))  # each epoch once, whenever the kill struck
    assert "test_accuracy" in run.data.metrics
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
@pytest.mark.parametrize("logged", [False, True], ids=["before_logging", "after_logging"])
def test_resumed_run_equals_an_uninterrupted_one_and_logs_each_epoch_once(tmp_path, mlflow_template,
                                                                            monkeypatch, logged):
    """Killed right after the epoch-2 checkpoint, before or after epoch 2 reached
    MLflow (where a kill could lose or repeat an epoch), then resumed by run id."""
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from experiments import tracking
    from experiments.training import run_training
    from tests.test_platform import compose_train

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = ["fixed=w8a8", "trainer.epochs=4", "trainer.save_model=false"]
    straight = run_training(compose_train(overrides, store, "exact"), output_dir=tmp_path / "straight", choices={})

    log_epoch = tracking.MlflowEpochLogger.on_epoch_end

    def killed_at_epoch_2(self, epoch, logs=None):
        if epoch == 2 and not logged:
            raise KeyboardInterrupt
        log_epoch(self, epoch, logs)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(tracking.MlflowEpochLogger, "on_epoch_end", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_training(compose_train(overrides, store, "exact"), output_dir=tmp_path / "killed", choices={})
    monkeypatch.undo()
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert state["next_epoch"] == 3
    client = MlflowClient(store)
    assert client.get_run(state["run_id"]).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(state["run_id"], "val_loss")] == [0, 1, 2][:2 + logged]

    resumed = run_training(compose_train(overrides + [f"trainer.resume={state['run_id']}"], store, "exact"),
                           output_dir=tmp_path / "resumed", choices={})
    assert resumed["run_id"] == state["run_id"]
    # Same batches per epoch, same scales, same Adam moments: the same numbers to the bit.
    assert resumed["test_loss"] == straight["test_loss"] and resumed["val_loss"] == straight["val_loss"]
    for name in ("train_loss", "val_loss", "val_accuracy", "scale.dense1.kernel.data"):
        history = {run: sorted((m.step, m.value) for m in client.get_metric_history(run, name))
                   for run in (straight["run_id"], resumed["run_id"])}
        assert history[resumed["run_id"]] == history[straight["run_id"]], name
        assert [step for step, _ in history[resumed["run_id"]]] == [0, 1, 2, 3], name
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoint").iterdir()) == ["state-4.npz", "state.json"]
    mlflow.set_tracking_uri(None)


def test_epoch_order_depends_only_on_seed_and_epoch():
    from experiments.training import training_dataset

    x = np.arange(10, dtype=np.float32)[:, None]
    batches = [b[0].numpy()[:, 0].tolist() for b in training_dataset(x, x[:, 0], 4, seed=7).take(9)]
    epochs = [sum(batches[i:i + 3], []) for i in (0, 3, 6)]
    assert [len(b) for b in batches[:3]] == [4, 4, 2]  # the last batch of an epoch is short, never mixed
    assert all(sorted(e) == list(range(10)) for e in epochs)  # every example once per epoch
    assert epochs[0] != epochs[1] != epochs[2]
    from_epoch_1 = [b[0].numpy()[:, 0].tolist() for b in training_dataset(x, x[:, 0], 4, seed=7, first_epoch=1).take(6)]
    assert from_epoch_1 == batches[3:]  # a resumed job sees exactly the batches the killed one would have
    other_seed = [b[0].numpy()[:, 0].tolist() for b in training_dataset(x, x[:, 0], 4, seed=8).take(3)]
    assert sum(other_seed, []) != epochs[0]


def _run(status="RUNNING", **tags):
    from types import SimpleNamespace

    return SimpleNamespace(info=SimpleNamespace(status=status), data=SimpleNamespace(tags=tags))


def test_stale_by_pid_on_this_host_and_by_heartbeat_elsewhere():
    import socket

    from experiments.checkpoint import is_stale, stale_reason

    here = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    now = 1_000_000.0
    beat = {"nics_fix.heartbeat_interval": "60"}
    assert stale_reason(_run(**{"nics_fix.host": here, "nics_fix.pid": str(os.getpid())})) is None
    assert "process %d on %s is gone" % (dead.pid, here) in stale_reason(
        _run(**{"nics_fix.host": here, "nics_fix.pid": str(dead.pid)}))
    elsewhere = {"nics_fix.host": "node7", "nics_fix.pid": "4242", **beat}
    assert not is_stale(_run(**elsewhere, **{"nics_fix.heartbeat": str(now - 120)}), now)  # 2x interval: alive
    assert stale_reason(_run(**elsewhere, **{"nics_fix.heartbeat": str(now - 121)}), now) == \
        "no heartbeat from process 4242 on node7 for 121 s (interval 60 s)"
    assert not is_stale(_run(**{"nics_fix.host": "node7", "nics_fix.pid": "4242"}), now)  # no heartbeat: can't tell
    assert not is_stale(_run(**elsewhere, **{"nics_fix.heartbeat": "garbage"}), now)
    assert not is_stale(_run("KILLED", **{"nics_fix.host": here, "nics_fix.pid": str(dead.pid)}))


def test_heartbeat_stamps_the_run_while_the_body_runs(tmp_path, mlflow_template):
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from experiments.checkpoint import HEARTBEAT, HEARTBEAT_INTERVAL, heartbeat

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        client = MlflowClient()
        run_id = client.create_run("0").info.run_id
        with heartbeat(run_id, None):
            pass
        assert HEARTBEAT not in client.get_run(run_id).data.tags  # off: no tag at all
        with heartbeat(run_id, 0.2):
            first = float(client.get_run(run_id).data.tags[HEARTBEAT])
            time.sleep(1.0)
            latest = float(client.get_run(run_id).data.tags[HEARTBEAT])
        assert latest - first >= 0.6  # several beats, 0.2 s apart
        assert client.get_run(run_id).data.tags[HEARTBEAT_INTERVAL] == "0.2"
        time.sleep(0.5)
        assert float(client.get_run(run_id).data.tags[HEARTBEAT]) - latest < 0.3  # stopped with the body
    finally:
        mlflow.set_tracking_uri(None)


def test_a_run_left_running_on_another_host_is_resumable_once_its_heartbeat_stops(tmp_path, mlflow_template):
    """A preempted cluster job rescheduled on another node: its checkpoint folder on shared disk."""
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from experiments.checkpoint import ResumeError, save_checkpoint
    from experiments.training import _find_resume

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        client = MlflowClient()
        experiment = client.create_experiment("preempted")
        folder = tmp_path / "checkpoint"
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        run_id = client.create_run(experiment, tags={
            "nics_fix.host": "node7", "nics_fix.pid": "4242", "nics_fix.checkpoint_dir": str(folder),
            "nics_fix.heartbeat_interval": "60", "nics_fix.heartbeat": str(time.time() - 30)}).info.run_id
        save_checkpoint(folder, model, 3, run_id)
        with pytest.raises(ResumeError, match=r"still RUNNING in a live process \(pid 4242 on node7\); a process "
                                              r"on another host counts as dead .* \(60 s\)"):
            _find_resume(run_id, "preempted")
        with pytest.raises(ResumeError, match="has no interrupted run"):
            _find_resume(True, "preempted")  # the only run is alive: nothing to take over
        client.set_tag(run_id, "nics_fix.heartbeat", str(time.time() - 121))
        assert _find_resume(run_id, "preempted") == (folder, run_id)
        assert _find_resume(True, "preempted") == (folder, run_id)
    finally:
        mlflow.set_tracking_uri(None)


def test_finished_runs_are_not_resumed_and_a_mismatched_checkpoint_leaves_the_run_as_it_was(tmp_path,
                                                                                              mlflow_template):
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from experiments.checkpoint import ResumeError
    from experiments.training import run_training
    from tests.test_platform import compose_train

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = ["trainer.epochs=1", "trainer.save_model=false"]
    done = run_training(compose_train(overrides, store, "resume"), output_dir=tmp_path / "done", choices={})
    client = MlflowClient(store)
    for target in (done["run_id"], str(tmp_path / "done" / "checkpoint")):
        with pytest.raises(ResumeError, match="FINISHED, nothing to resume"):
            run_training(compose_train(overrides + [f"trainer.resume={target}"], store, "resume"), choices={})
    assert client.get_run(done["run_id"]).info.status == "FINISHED"  # untouched

    client.set_terminated(done["run_id"], "KILLED")  # as if interrupted: resumable, but not with another model
    with pytest.raises(ResumeError, match=r"the checkpoint's dense1/kernel has shape \(64, 8\), the model's "
                                          r"\(64, 16\): resume with the config the run started with"):
        run_training(compose_train(overrides + ["model.hidden_units=[16]", f"trainer.resume={done['run_id']}"],
                                   store, "resume"), choices={})
    run = client.get_run(done["run_id"])
    assert run.info.status == "KILLED" and "error" not in run.data.tags
    assert "shape" in run.data.tags["nics_fix.resume_error"]
    mlflow.set_tracking_uri(None)


def test_a_swallowed_sigterm_is_raised_again():
    """TensorFlow can swallow a KeyboardInterrupt raised while it runs Python from C++."""
    from experiments.training import StopOnSigterm, _sigterm_as_interrupt

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.zeros((64, 2), np.float32)
    seen = []
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        with _sigterm_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            except KeyboardInterrupt:
                seen.append("swallowed")  # what TF's C++ did with it
            with pytest.raises(KeyboardInterrupt, match="signal 15"):
                model.fit(x, x[:, :1], batch_size=8, epochs=5, verbose=0, callbacks=[StopOnSigterm()])
            seen.append("fit stopped")  # and, swallowed once more, the block raises it at its end
    assert seen == ["swallowed", "fit stopped"]
    with _sigterm_as_interrupt():  # a new job starts clean
        model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0, callbacks=[StopOnSigterm()])


def test_resume_errors_are_clear(tmp_path):
    from experiments.checkpoint import ResumeError
    from experiments.training import _find_resume

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with pytest.raises(ResumeError, match="has no interrupted run with a checkpoint"):
            _find_resume(True, "nothing_here")
        with pytest.raises(ResumeError, match="neither a checkpoint folder nor a run id"):
            _find_resume("0123456789abcdef", "nothing_here")
        empty = tmp_path / "empty"
        empty.mkdir()
        with pytest.raises(ResumeError, match="no checkpoint"):
            _find_resume(str(empty), "nothing_here")
    finally:
        mlflow.set_tracking_uri(None)


# ---------------------------------------------------------------------------
# Fuzzing the config parsers: a valid config or a ConfigError, nothing else
# ---------------------------------------------------------------------------

KEYS = ["configs", "by_type", "by_name", "weight", "activation", "data_config", "gradient_config",
        "storage_config", "bit_width", "training", "not_training", "rounding", "config_name", "scale",
        "fix8", "Dense", "dense1", "name", "pre", "post", "type", "min", "max", "noise_strategy"]
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-200, 200), st.floats(allow_nan=True),
    st.sampled_from(["auto", "fixed", "none", "nearest", "floor", "stochastic", "fix8", "uniform",
                     "uniform_ratio", "noise_strategy", "Dense", ""]),
    st.text(max_size=8),
)
TREES = st.recursive(
    LEAVES,
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children,
                                               max_size=4)),
    max_leaves=25,
)


def _mutations(base):
    """The good config with one node replaced: near-misses hit deeper code than random trees."""
    return st.builds(_replace_somewhere, st.just(base), st.integers(0, 10_000), TREES)


def _replace_somewhere(tree, index, value):
    import copy

    tree = copy.deepcopy(tree)
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])

    walk(tree, [])
    path = paths[index % len(paths)]
    if not path:
        return value
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return tree


GOOD = {"configs": {"fix8": FIX8}, "by_type": {"Dense": {"config_name": "fix8"}},
        "by_name": {"dense1": {"config_name": "fix8", "weight": {"data_config": {"bit_width": 4}}}}}
FUZZ_COUNT = {"fixed": 0, "strategy": 0, "yaml": 0}


def _parse_fixed(value):
    try:
        cfg = nf.FixedConfig.from_dict(value)
        cfg.resolve("dense1", "Dense")
        cfg.resolve("other", "Conv2D")
    except nf.ConfigError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(TREES, _mutations(GOOD)))
def test_fixed_config_parser_never_raises_anything_but_config_error(value):
    FUZZ_COUNT["fixed"] += 1
    _parse_fixed(value)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(TREES, _mutations({"by_type": {"Dense": {"name": "noise_strategy", "weight": {
    "gradient_config": {"post": {"type": "uniform_ratio", "min": -0.5, "max": 0.5}}}}}})))
def test_strategy_config_parser_never_raises_anything_but_config_error(value):
    FUZZ_COUNT["strategy"] += 1
    try:
        nf.StrategyConfig.from_dict(value)
    except nf.ConfigError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=200) | TREES.map(lambda t: yaml.safe_dump(t)))
def test_yaml_text_never_raises_anything_but_config_error(text):
    FUZZ_COUNT["yaml"] += 1
    for parse in (nf.parse_cfg_from_str, nf.parse_strategy_cfg_from_str):
        try:
            parse(text)
        except nf.ConfigError:
            pass


def test_python_yaml_tags_are_rejected_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = f"configs: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(nf.ConfigError, match="invalid YAML"):
        nf.parse_cfg_from_str(text)
    with pytest.raises(nf.ConfigError, match="invalid YAML"):
        nf.parse_strategy_cfg_from_str(text)
    assert not marker.exists()


# ---------------------------------------------------------------------------
# Numerics: NaN, Inf, zeros, huge, tiny, 1 and 32 bits, through every mode
# ---------------------------------------------------------------------------

EDGE_INPUTS = {
    "zeros": np.zeros((4, 3), np.float32),
    "nan_inf": np.array([[np.nan, np.inf, -np.inf], [1.0, -2.0, 0.5]] * 2, np.float32),
    "huge": np.full((4, 3), 3e38, np.float32),
    "tiny": np.full((4, 3), 1e-40, np.float32),  # subnormal
    "mixed": np.array([[3e38, -3e38, 1e-40], [-0.0, 1.0, -1e-30]] * 2, np.float32),
}


@pytest.mark.parametrize("rounding", ["nearest", "floor", "stochastic"])
@pytest.mark.parametrize("bits", [1, 32])
@pytest.mark.parametrize("mode", ["auto", "fixed", 0, "none"])
@pytest.mark.parametrize("case", sorted(EDGE_INPUTS))
def test_edge_numerics_through_every_mode(case, mode, bits, rounding):
    x = EDGE_INPUTS[case]
    point = {"data_config": {"bit_width": bits, "training": mode, "not_training": mode, "rounding": rounding},
             "gradient_config": {"bit_width": bits, "training": mode, "rounding": rounding}}
    layer = nf.Quantize(fixed_config={"activation": point})
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True)
        loss = tf.reduce_sum(y * tf.constant(x))
    grad = tape.gradient(loss, xt)
    assert y.shape == x.shape and grad.shape == x.shape
    scales = layer.fixed_points["activation"].describe()
    for key in ("data_scale", "grad_scale"):
        assert MIN_SCALE <= scales[key] <= MAX_SCALE
    finite = x[np.isfinite(x)]
    if mode == "auto":  # ceil(log2 max|x|) of the finite values, clamped; MIN_SCALE when none is nonzero
        peak = np.abs(finite).max() if finite.size else 0.0
        expected = MIN_SCALE if peak == 0 else int(np.clip(np.ceil(np.log2(np.float64(peak))), MIN_SCALE, MAX_SCALE))
        assert scales["data_scale"] == expected
    if mode != "none":
        # Finite inputs land on the grid inside [-2^s, 2^s - step]; NaN stays NaN; Inf saturates to the ends.
        # (Above 24 bits 2^s - step is not a float32: the top end rounds to 2^s, as documented.)
        out = y.numpy().astype(np.float64)
        scale = scales["data_scale"]
        step = 2.0 ** (scale - bits + 1)
        low, high = -(2.0 ** scale), float(np.float32(2.0 ** scale - step))
        on = out[np.isfinite(x)]
        assert np.all(np.isfinite(on)) and np.all(on >= low) and np.all(on <= high)
        assert np.array_equal(on / step, np.round(on / step))
        assert np.all(np.isnan(out[np.isnan(x)]))
        assert np.all(out[x == np.inf] == high) and np.all(out[x == -np.inf] == low)
