"""The platform end to end: Hydra composition, train/eval jobs, the MLflow record."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

import nics_fix as nf
from experiments.evaluation import run_eval
from experiments.models import build_model
from experiments.training import run_training
from tests.conftest import REPO

TINY = ["data=synthetic", "data.num_examples=160", "data.test_examples=64", "model.hidden_units=[8]",
        "trainer.epochs=2", "trainer.verbose=0", "trainer.batch_size=32"]


def compose_train(overrides, tracking_uri, experiment="nics_fix"):
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=TINY + list(overrides) + [
            f"mlflow.tracking_uri={tracking_uri}", f"mlflow.experiment_name={experiment}"])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating MLflow's tables takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, store):
    cfg = compose_train(["fixed=w8a8"], store)
    results = run_training(cfg, output_dir=tmp_path_factory.mktemp("out"),
                           choices={"fixed": "w8a8", "model": "mlp"})
    return cfg, results


def test_train_job_records_params_metrics_and_artifacts(trained, store, tmp_path):
    cfg, results = trained
    client = MlflowClient(store)
    run = client.get_run(results["run_id"])
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["choice.fixed"] == "w8a8" and params["data.name"] == "synthetic"
    assert params["trainer.epochs"] == "2" and params["model.hidden_units"] == "[8]"
    assert params["model.layers"] == '["dense1", "relu1", "dense2"]'
    assert params["bits.dense1.weight.data"] == "8" and params["bits.dense1.weight.grad"] == "float"
    assert params["bits.relu1.activation.data"] == "8" and params["mode.dense1.weight.data"] == "auto/fixed"
    # MLP 64-8-10 at 8 bits: (64*8 + 8 + 8*10 + 10) weights x 8 bits.
    assert metrics["cost.total_weight_bits"] == (64 * 8 + 8 + 8 * 10 + 10) * 8
    assert metrics["cost.avg_weight_bits"] == 8.0
    assert metrics["test_accuracy"] == pytest.approx(results["test_accuracy"])
    assert "scale.dense1.kernel.grad" not in metrics  # float gradients: no scale to speak of
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "scale.dense1.kernel.data",
                 "scale.relu1.activation.data"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [0, 1], name
    assert tags["nics_fix.role"] == "train" and "mlflow.source.git.commit" in tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert artifacts == {"config/train_config.yaml", "config/fixed_config.yaml", "config/strategy_config.yaml"}
    folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config",
                                                 dst_path=str(tmp_path / "dl"))
    resolved = nf.parse_cfg_from_file(os.path.join(folder, "fixed_config.yaml"))
    assert resolved.resolve("dense1", "Dense").weight.data.bit_width == 8
    composed = yaml.safe_load(open(os.path.join(folder, "train_config.yaml")))
    assert composed["fixed"] == cfg["fixed"]
    fixed_model = {a.path for a in client.list_artifacts(run.info.run_id, "fixed_model")}
    assert "fixed_model/weights.npz" in fixed_model and "fixed_model/train_config.yaml" in fixed_model


def test_eval_reproduces_the_training_accuracy_exactly(trained, store):
    _, results = trained
    evaluated = run_eval({"run_id": results["run_id"], "mlflow": {"tracking_uri": store}, "log_to": "same"})
    assert evaluated["test_accuracy"] == results["test_accuracy"]
    assert evaluated["reproduced"] is True
    metrics = MlflowClient(store).get_run(results["run_id"]).data.metrics
    assert metrics["eval.test_accuracy"] == metrics["test_accuracy"]


@pytest.mark.slow
def test_same_seed_same_accuracies(store):
    cfg = compose_train(["fixed=uniform8", "trainer.save_model=false"], store, experiment="seeds")
    first = run_training(cfg, choices={})
    second = run_training(cfg, choices={})
    assert first["test_accuracy"] == second["test_accuracy"]
    assert first["val_loss"] == second["val_loss"]


def test_config_error_names_key_path_and_marks_run_failed(store):
    cfg = compose_train(["fixed=w8a8", "+fixed.by_name.dense1.weight.data_config.bit_width=40"], store,
                        experiment="config_error")
    with pytest.raises(nf.ConfigError) as info:
        run_training(cfg, choices={"fixed": "w8a8"})
    assert info.value.key_path == "by_name.dense1.weight.data_config.bit_width"
    assert "conf/fixed/w8a8.yaml" in str(info.value)
    runs = MlflowClient(store).search_runs(
        [mlflow.get_experiment_by_name("config_error").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "bit_width must be from 1 to 32, got 40" in runs[0].data.tags["error"]


def run_cli(args, cwd, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_cli_multirun_logs_one_run_per_job_and_cli_errors_are_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = run_cli(["experiments.train", "-m", "fixed=float,w8a8", *TINY, f"mlflow.tracking_uri={uri}",
                    f"hydra.sweep.dir={tmp_path}/multirun"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("nics_fix").experiment_id])
    assert sorted(r.data.params["choice.fixed"] for r in runs) == ["float", "w8a8"]
    assert sorted(r.data.tags["hydra.job_num"] for r in runs) == ["0", "1"]
    assert {r.data.tags["hydra.sweep_dir"] for r in runs} == {f"{tmp_path}/multirun"}
    assert all(r.info.status == "FINISHED" for r in runs)

    bad = run_cli(["experiments.train", *TINY, "fixed=w8a8", f"mlflow.tracking_uri={uri}",
                   "+fixed.by_name.dense1.weight.data_config.training=sometimes",
                   f"hydra.run.dir={tmp_path}/bad"], cwd=tmp_path)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert ("error: fixed=w8a8 (conf/fixed/w8a8.yaml) with +fixed.by_name.dense1.weight.data_config.training="
            "sometimes: by_name.dense1.weight.data_config.training: "
            "mode must be one of auto, fixed, dynamic, none or an integer scale, got 'sometimes'") in bad.stderr


@pytest.mark.parametrize("name, shape, first, last", [
    ("mlp", (8, 8, 1), "dense1", "dense3"),
    ("lenet5", (8, 8, 1), "conv1", "dense3"),
    ("lenet5", (32, 32, 3), "conv1", "dense3"),
    ("vgg11", (32, 32, 3), "conv1", "dense2"),
])
def test_models_build_with_stable_layer_names(name, shape, first, last):
    cfg = {"name": name, "width": 0.125} if name == "vgg11" else {"name": name}
    model, scope = build_model(cfg, shape, 10, {"by_type": {"Dense": "q", "Conv2D": "q"},
                                                "configs": {"q": {"weight": {"data_config": {
                                                    "bit_width": 8, "training": "auto",
                                                    "not_training": "auto"}}}}})
    fixed = [layer.name for layer in nf.introspect.fixed_layers(model)]
    assert fixed[0] == first and fixed[-1] == last
    assert model.output.shape[-1] == 10
    assert scope.layer_configs[first].weight.data.bit_width == 8
    out = model.predict(np.zeros((2,) + shape, np.float32), verbose=0)
    assert out.shape == (2, 10)
    if name == "vgg11":
        assert sum(n.startswith("conv") for n in fixed) == 8


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet'; available: mlp, lenet5, vgg11"):
        build_model({"name": "resnet"}, (8, 8, 1), 10)
