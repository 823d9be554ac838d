"""The Gupta et al. 2015 reproduction (conf/experiment/gupta2015.yaml): its grid and one tiny run.

The paper's ⟨IL, FL⟩ 16-bit format maps to ``bit_width = IL + FL = 16`` and
``scale = IL - 1 = 15 - FL``; every quantity (stored weights, weight data,
activations, both gradients) uses it with one rounding mode.
"""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

import nics_fix as nf
from experiments.training import run_training
from tests.conftest import REPO

SCALE_OF_FL = {14: 1, 10: 5, 8: 7}
GRID = ["float"] + [f"gupta_fl{fl}_{r}" for fl in (14, 10, 8) for r in ("nearest", "stochastic")]
TINY = ["data=synthetic", "data.num_examples=160", "data.test_examples=32", "model.hidden_units=[16,16]",
        "trainer.epochs=1", "trainer.verbose=0", "trainer.batch_size=32", "trainer.checkpoint=false",
        "trainer.save_model=false"]


def compose_gupta(overrides=(), hydra_config=False):
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return compose("train", overrides=["+experiment=gupta2015", *overrides],
                       return_hydra_config=hydra_config)


def test_experiment_is_the_papers_setup_and_its_sweep_is_the_grid():
    cfg = compose_gupta(hydra_config=True)
    assert cfg.data.name == "mnist" and cfg.data.normalize == "unit"
    assert list(cfg.model.hidden_units) == [1000, 1000] and not cfg.model.batch_norm and not cfg.model.dropout
    opt = cfg.trainer.optimizer
    assert opt.name == "sgd" and opt.momentum == 0.0 and opt.weight_decay is None
    assert cfg.trainer.batch_size == 100 and cfg.trainer.lr_schedule.name == "constant"
    assert cfg.trainer.thdh.power_of_two_lr is False
    assert cfg.mlflow.experiment_name == "gupta2015"
    # `-m +experiment=gupta2015` sweeps exactly float + 3 FL x 2 roundings.
    assert cfg.hydra.sweeper.params.fixed.split(",") == GRID
    assert {p.stem for p in (REPO / "conf" / "fixed").glob("gupta_fl*.yaml")} == set(GRID[1:])


@pytest.mark.parametrize("fl", [14, 10, 8])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_grid_point_resolves_to_16_bit_integer_scales(fl, rounding):
    name = f"gupta_fl{fl}_{rounding}"
    fixed = OmegaConf.to_container(compose_gupta([f"fixed={name}"]).fixed, resolve=True)
    cfg = nf.FixedConfig.from_dict(fixed, source=name)
    s = SCALE_OF_FL[fl]
    assert s == (16 - fl) - 1  # IL - 1
    for layer, kind in (("dense1", "Dense"), ("dense3", "Dense"), ("relu1", "ReLU")):
        resolved = cfg.resolve(layer, kind)
        for quantity in ("weight", "activation"):
            point = getattr(resolved, quantity)
            assert point.data.bit_width == 16 and point.gradient.bit_width == 16
            assert point.data.training == point.data.not_training == point.gradient.training == s
            assert point.data.rounding == point.gradient.rounding == rounding
        assert resolved.weight.storage.bit_width == 16 and resolved.weight.storage.scale == s
        assert resolved.weight.storage.rounding == rounding
    assert nf.quantization_step(16, s) == 2.0 ** -fl


def test_float_point_of_the_grid_is_float():
    fixed = OmegaConf.to_container(compose_gupta(["fixed=float"]).fixed, resolve=True)
    assert nf.FixedConfig.from_dict(fixed).resolve("dense1", "Dense").is_float


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating MLflow's tables takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    yield uri
    mlflow.set_tracking_uri(None)


class _Capture(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.optimizer = self.model.optimizer
        self.before = {v.path: keras.ops.convert_to_numpy(v).copy() for v in self.model.trainable_variables}

    def on_train_end(self, logs=None):
        self.after = {v.path: keras.ops.convert_to_numpy(v).copy() for v in self.model.trainable_variables}


def test_tiny_run_stores_weights_on_the_grid_and_logs_counters(store):
    # One run (MLflow's tables and TF tracing cost most of it); the other grid points
    # differ only in the format, which the composition tests above check.
    name, fl, rounding, uri = "gupta_fl8_stochastic", 8, "stochastic", store
    cfg = OmegaConf.to_container(compose_gupta([*TINY, f"fixed={name}", f"mlflow.tracking_uri={uri}"]),
                                 resolve=True)
    capture = _Capture()
    results = run_training(cfg, choices={"experiment": "gupta2015", "fixed": name, "data": "synthetic"},
                           callbacks=[capture])
    s = SCALE_OF_FL[fl]

    # The storage optimizer is active, with this grid point's format on every weight.
    opt = capture.optimizer
    assert isinstance(opt, nf.FixedStorageOptimizer)
    formats = opt.managed_formats()
    assert set(formats) == {f"dense{i}/{v}" for i in (1, 2, 3) for v in ("kernel", "bias")}
    for fmt in formats.values():
        assert fmt["storage"] == {"bit_width": 16, "scale": s, "rounding": rounding}

    # Stored weights are exactly on the 16-bit grid of step 2^-FL after training, and moved.
    changed = 0
    for path, w in capture.after.items():
        grid = nf.fixed_point_quantize(w, 16, s).numpy()
        np.testing.assert_array_equal(grid.view(np.int32), w.view(np.int32), err_msg=path)
        assert np.all(np.abs(w) <= 2.0 ** s)
        changed += int(np.sum(w != capture.before[path]))
    assert changed > 0

    # The THDH counters reach MLflow as per-epoch metrics, one per layer variable.
    client = MlflowClient(uri)
    run = client.get_run(results["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["choice.fixed"] == name
    assert run.data.params["bits.dense1.weight.storage"] == "16"
    for layer in ("dense1", "dense2", "dense3"):
        for var in ("kernel", "bias"):
            for counter in ("update_zero_frac", "update_saturate_frac"):
                history = client.get_metric_history(run.info.run_id, f"{counter}/{layer}/{var}")
                assert [m.step for m in history] == [0], (counter, layer, var)
                assert 0.0 <= history[0].value <= 1.0
    zero = client.get_metric_history(run.info.run_id, "update_zero_frac/dense1/kernel")[0].value
    assert zero > 0.0  # at FL=8 some updates round to zero even with stochastic rounding
    assert "test_accuracy" in run.data.metrics
