"""A new user's first hour: the main job's closing lines and log, typos caught, interrupts told in one line."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO

TINY = ["data=synthetic", "data.num_examples=160", "data.test_examples=64", "model.hidden_units=[8]",
        "trainer.epochs=2", "trainer.batch_size=32"]


def run_cli(args, cwd, timeout=300, env=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_train_job_shows_fixed_point_where_the_record_is_and_what_next(tmp_path):
    done = run_cli(["experiments.train", *TINY, "compare_bits=[8,1]", f"hydra.run.dir={tmp_path}/out"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    run_id = re.search(r"test_accuracy=(\S+) run_id=(\w+)", out).group(2)
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)  # the default store, in the cwd
    reference = run.data.metrics["test_accuracy"]
    rows = dict(re.findall(r"^  (.+?) +test_accuracy (\d\.\d{4})", out, re.M))
    assert float(rows["fixed=float"]) == pytest.approx(reference, abs=5e-5)
    for bits in (8, 1):
        assert float(rows[f"{bits}-bit rounded"]) == pytest.approx(run.data.metrics[f"rounded.w{bits}a{bits}.test_accuracy"],
                                                                  abs=5e-5)
    # 1 bit (the sign bit) holds only -2^s and 0: every ReLU output is 0, the logits are the last bias,
    # so the model predicts one class for every example: its accuracy is that class's share of the test set.
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from experiments.data import load_dataset

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        data = load_dataset(OmegaConf.to_container(compose("train", overrides=TINY), resolve=True)["data"])
    shares = {round(float(np.mean(data.y_test == k)), 4) for k in np.unique(data.y_test)}
    assert round(run.data.metrics["rounded.w1a1.test_accuracy"], 4) in shares
    assert (f"Recorded: MLflow store sqlite:///mlflow.db, experiment 'nics_fix', run mlp/float | acc {reference:.4f} | "
            f"32.00 w bits ({run_id})") in out
    assert f"Output folder: {tmp_path}/out" in out
    assert (f"mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000, then open "
            f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}?workflowType=machine_learning") in out
    assert "Next: python -m experiments.train fixed=w4a4" in out
    log = (tmp_path / "out" / "train.log").read_text()
    assert "Epoch 2/2" in log and f"run_id={run_id}" in log and "Next: python -m experiments.train" in log


def test_compare_bits_typo_is_one_line(tmp_path):
    from experiments.compare_bits import check_compare_bits
    from experiments.validate import TrainConfigError

    assert check_compare_bits([8, 4]) == [8, 4] and check_compare_bits(None) == []
    with pytest.raises(TrainConfigError, match=r"compare_bits\[\] must be an integer from 1 to 32, got 40"):
        check_compare_bits([8, 40])
    with pytest.raises(TrainConfigError, match="compare_bits: expected a list of bit widths"):
        check_compare_bits("8")


def _composed(*overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("override, message", [
    ("+fixd=w8a8", "+fixd=w8a8: 'fixd' is not a setting of this job (did you mean the group fixed? "
                   "Choose it without '+': fixed=w8a8)"),
    ("+trainer.epoch=3", "+trainer.epoch=3: 'trainer.epoch' is not a setting of this job (did you mean "
                         "trainer.epochs? Set it without '+': trainer.epochs=3)"),
    ("++mlflow.experimnt_name=x", "did you mean mlflow.experiment_name? Set it without '+': mlflow.experiment_name=x"),
    ("+model.zzz=1", "'model.zzz' is not a setting of this job (known keys here: batch_norm, dropout, "
                     "hidden_units, input_bits, name)"),
])
def test_unknown_added_key_is_one_line_with_the_closest_name(override, message):
    from experiments.cli import UnknownKeyError, check_added_keys

    cfg = _composed(override)
    with pytest.raises(UnknownKeyError) as err:
        check_added_keys(cfg, [override], groups=("data", "model", "fixed", "strategy", "trainer", "mlflow",
                                                  "experiment"))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_legitimate_additions_stay_allowed():
    from experiments.cli import check_added_keys

    added = ["+fixed.by_name.dense1.weight.data_config.bit_width=4", "+fixed.by_name.newlayer.weight.data_config.bit_width=4",
             "+experiment=mnist_mlp", "+trainer.thdh.update_config.bit_width=8", "+hydra.job.env_set.X=1"]
    check_added_keys(_composed("fixed=w8a8", "+fixed.by_name.dense1.weight.data_config.bit_width=4"), added,
                     groups=("fixed", "experiment"))
    # The README's THDH settings are plain keys of the trainer group: no '+' needed.
    cfg = _composed("trainer.thdh.power_of_two_lr=true", "trainer.thdh.update_config={bit_width: 16, scale: auto}")
    assert cfg["trainer"]["thdh"] == {"update_config": {"bit_width": 16, "scale": "auto"}, "state_config": None,
                                      "power_of_two_lr": True}


def test_unknown_added_key_stops_the_job_before_training(tmp_path):
    done = run_cli(["experiments.train", "+trainer.epoch=3", "hydra.run.dir=" + str(tmp_path / "out")], cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: +trainer.epoch=3: 'trainer.epoch' is not a setting of this job (did you mean trainer.epochs? "
        "Set it without '+': trainer.epochs=3)"]
    assert not (tmp_path / "mlflow.db").exists()  # nothing was recorded


@pytest.mark.slow
def test_sigterm_is_one_line_with_the_resume_command_and_the_resumed_run_says_so(tmp_path):
    import signal
    import time

    args = ["experiments.train", "data=synthetic", "data.num_examples=256", "data.test_examples=32",
            "model.hidden_units=[8]", "trainer.epochs=400", "trainer.batch_size=32", "compare_bits=[]",
            f"hydra.run.dir={tmp_path}/out"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = ""
    while "Epoch 3/" not in seen:  # a checkpoint exists once epoch 2 is done
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        seen += line
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and time.monotonic() - started < 60
    lines = [line for line in err.strip().splitlines()
             if line.strip() and "INFO mlflow.store.db.utils" not in line]  # MLflow creating a new store
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    match = re.fullmatch(r"interrupted \(signal 15\): run (\w+) ended KILLED after its last checkpoint; "
                         r"resume it with: (python -m experiments\.train .*)", lines[0])
    assert match, lines[0]
    run_id, command = match.groups()
    assert command.endswith(f"trainer.resume={run_id}") and "trainer.epochs=400" in command
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.info.status == "KILLED"

    # The printed command resumes (fewer epochs here, so it ends soon): it says so and from which epoch.
    words = shlex.split(command)[2:]
    words = [w.replace("trainer.epochs=400", "trainer.epochs=3") for w in words if not w.startswith("hydra.run.dir")]
    resumed = run_cli([*words, f"hydra.run.dir={tmp_path}/again"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    next_epoch = int(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).data.tags["nics_fix.resumed_from_epoch"]) + 1
    assert f"resuming run {run_id} from its checkpoint " in resumed.stdout
    assert f"epoch {next_epoch} of 3 next" in resumed.stdout and next_epoch >= 3


def test_epoch_line_with_thdh_counters_is_compact():
    from experiments.console import epoch_line

    logs = {"accuracy": 0.88109, "loss": 0.41234, "update_zero_frac/dense1/kernel": 0.4, "update_zero_frac/dense1/bias": 0.1,
            "update_saturate_frac/dense1/kernel": 0.0, "update_saturate_frac/dense1/bias": 0.0,
            "update_nonzero_frac/dense1/kernel": 0.6, "update_nonzero_frac/dense1/bias": 0.9, "val_accuracy": 0.875}
    assert epoch_line(2, 15, 1.234, logs) == (
        "Epoch 3/15 - 1.2s - accuracy 0.8811 - loss 0.4123 - val_accuracy 0.8750\n"
        "  - updates rounded away 25.0% (most: dense1/kernel 40.0%), saturated 0.0%")
    assert epoch_line(0, 1, 0.5, {"loss": 1.0}) == "Epoch 1/1 - 0.5s - loss 1.0000"


def test_compare_bits_rounds_a_model_trained_with_per_channel_scales():
    """The rounded model's scales are its own (one per tensor): only the learned weights are copied."""
    import keras

    import nics_fix as nf
    from experiments.compare_bits import compare_bits

    def build(fixed):
        with nf.fixed_scope("net", fixed):
            inputs = keras.Input((6,))
            outputs = nf.layers.Dense(3, name="dense")(nf.layers.Dense(4, activation="relu", name="hidden")(inputs))
        return keras.Model(inputs, outputs)

    channel = {"bit_width": 8, "training": "auto", "not_training": "auto", "granularity": "channel"}
    trained = build({"by_type": {"Dense": {"weight": {"data_config": channel}}}})
    x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    trained(x)
    assert trained.get_layer("hidden").fixed_points["kernel"].data_scale.shape == (1, 4)
    seen = {}

    def evaluate(rounded):
        for name in ("hidden", "dense"):
            kernel = np.asarray(trained.get_layer(name).kernel)
            assert np.array_equal(np.asarray(rounded.get_layer(name).kernel), kernel)
            assert rounded.get_layer(name).fixed_points["kernel"].data_scale.shape == ()
        hidden = np.asarray(trained.get_layer("hidden").kernel)
        scale = int(np.ceil(np.log2(np.abs(hidden).max())))
        step = 2.0 ** (scale - 3)
        expected = np.clip(np.round(hidden / step), -16, 15) * step  # 4 bits, one scale for the tensor
        got = rounded.get_layer("hidden").fixed_points["kernel"](rounded.get_layer("hidden").kernel)
        seen["exact"] = np.array_equal(np.asarray(got), expected)
        return 0.5

    assert compare_bits(trained, build, evaluate, [4]) == {4: 0.5}
    assert seen["exact"]
