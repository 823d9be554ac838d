"""The zoo's Keras models (ResNet-20, MobileNetV2, ViT) and users' own models (``model._target_``).

Every model here is plain Keras converted with ``nf.fixed_model``: built on
digits-shaped (8x8x1) and CIFAR-shaped (32x32x3) input, trained a step in
fixed point, and searched; a user's function and a ``keras.applications``
constructor enter through ``model=custom model._target_=...``. Small widths
keep it fast.
"""

from __future__ import annotations

import shutil
import sys
import textwrap

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import nics_fix as nf
from experiments import keras_zoo, searching
from experiments.models import ModelConfigError, build_model
from experiments.training import run_training
from tests.conftest import FIX8
from tests.test_bad_input import one_error, run_main
from tests.test_search import compose

ALL8 = {"configs": {"q": FIX8}, "by_type": {t: {"config_name": "q"} for t in (
    "Dense", "Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU", "EinsumDense", "LayerNormalization",
    "MultiHeadAttention")}}

SMALL = {
    "resnet20": {"name": "resnet20", "filters": [4, 8, 8], "blocks": 1},
    "mobilenet_v2": {"name": "mobilenet_v2", "width": 0.1},
    "vit": {"name": "vit", "dim": 8, "depth": 1, "heads": 2},
}


@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
@pytest.mark.parametrize("name, first, last", [
    ("resnet20", "stem_conv", "fc"),
    ("mobilenet_v2", "Conv1", "predictions"),
    ("vit", "patch_embed", "head"),
])
def test_zoo_model_builds_converts_and_trains_a_step(name, first, last, shape):
    # 8 bits on all four quantities on digits-shaped input; float (still the converted
    # model) on CIFAR-shaped input, since tracing quantizers is what takes time. MobileNetV2's
    # 150 quantized layers take minutes to trace: its 8-bit step is in the search test below.
    fixed_config = ALL8 if shape[0] == 8 else None
    model, scope = build_model(SMALL[name], shape, 10, fixed_config)
    if name == "mobilenet_v2" and fixed_config:
        assert all(layer.fixed_config.activation.data.bit_width == 8 for layer in nf.introspect.fixed_layers(model))
        fixed_config = None
        model, scope = build_model(SMALL[name], shape, 10)
    fixed = nf.introspect.fixed_layers(model)
    assert fixed[0].name == first and fixed[-1].name == last
    assert model.output.shape == (None, 10)
    assert nf.unsupported_layers(model) == {}
    assert scope.unmatched_names() == []
    # Every fixed layer took the config, and the record (scope) says so under the original names.
    recorded = scope.fixed_config_dict()["by_name"]
    if fixed_config:
        assert set(recorded) == {layer.name for layer in fixed}
        assert all(layer.fixed_config.activation.data.bit_width == 8 for layer in fixed)
    else:
        assert recorded == {}

    x = np.random.default_rng(0).uniform(0, 1, (4,) + shape).astype("float32")
    y = np.arange(4) % 10
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    kernels = [w for w in model.trainable_weights if w.path.endswith("kernel")]
    before = [w.numpy().copy() for w in kernels]
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert all(not np.array_equal(a, w.numpy()) for a, w in zip(before, kernels))


def _resnet20_parameters(channels: int, classes: int, filters=(16, 32, 64), blocks=3) -> int:
    """He et al.'s CIFAR ResNet-20 counted by hand: convs without bias, 4 numbers per BN channel."""
    count = 3 * 3 * channels * filters[0] + 4 * filters[0]  # stem conv + BN
    width = filters[0]
    for stage, out in enumerate(filters):
        for block in range(blocks):
            count += 3 * 3 * width * out + 4 * out + 3 * 3 * out * out + 4 * out
            if width != out:  # projection shortcut: 1x1 conv + BN
                count += width * out + 4 * out
            width = out
    return count + width * classes + classes


def test_resnet20_is_the_papers_020_m_parameter_net():
    model = keras_zoo.resnet20({}, (32, 32, 3), 10)
    assert model.count_params() == _resnet20_parameters(3, 10) == 274_042
    converted, _ = build_model({"name": "resnet20"}, (32, 32, 3), 10)  # plus its scales, not trainable
    assert sum(int(np.prod(w.shape)) for w in converted.trainable_weights) == \
        sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 274_042 - 2 * (16 * 7 + 32 * 7 + 64 * 7)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len([c for c in convs if "shortcut" not in c.name]) + 1 == 20  # 19 convs + the dense layer
    assert [model.get_layer(f"stage{s}_block1_1_conv").strides for s in (1, 2, 3)] == [(1, 1), (2, 2), (2, 2)]
    assert model.get_layer("stage3_block3_out").output.shape == (None, 8, 8, 64)


def test_zoo_model_configs_are_checked():
    with pytest.raises(ModelConfigError, match=r"unknown model 'resnet'; available: .*resnet20, mobilenet_v2, vit"):
        build_model({"name": "resnet"}, (8, 8, 1), 10)
    with pytest.raises(ModelConfigError, match=r"model.width: expected a positive number, got -1"):
        build_model({"name": "mobilenet_v2", "width": -1}, (8, 8, 1), 10)
    with pytest.raises(ModelConfigError, match=r"model.filters: expected a list of positive integers, got \[16, 0\]"):
        build_model({"name": "resnet20", "filters": [16, 0]}, (8, 8, 1), 10)
    with pytest.raises(ModelConfigError, match=r"model.heads: expected a positive integer, got 2.5"):
        build_model({"name": "vit", "heads": 2.5}, (8, 8, 1), 10)


# --------------------------------------------------------------------------- users' own models

USER_MODULE = '''
import keras


def make_net(input_shape, num_classes, width):
    inputs = keras.Input(input_shape)
    x = keras.layers.Flatten(name="flat")(inputs)
    x = keras.layers.Dense(width, activation="relu", name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(x))


def unnamed(input_shape, num_classes):
    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(), keras.layers.Dense(num_classes)])


def not_a_model(input_shape, num_classes):
    return "a model"


def subclassed(input_shape, num_classes):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(num_classes)

        def call(self, x):
            return self.dense(keras.ops.reshape(x, (-1, 64)))

    net = Net()
    net(keras.ops.zeros((1,) + tuple(input_shape)))
    return net


def wrong_output(input_shape, num_classes):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """``my_nets.models`` importable, as a user's package in the current folder would be."""
    package = tmp_path / "pkg" / "my_nets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    yield "my_nets.models"
    for name in [m for m in sys.modules if m.startswith("my_nets")]:
        del sys.modules[name]


def test_custom_target_is_called_with_the_datas_shape_and_classes(user_package):
    node = {"name": "custom", "_target_": f"{user_package}.make_net", "width": 8}
    model, scope = build_model(node, (8, 8, 1), 10, ALL8)
    assert [layer.name for layer in nf.introspect.fixed_layers(model)] == ["hidden", "logits"]
    assert model.get_layer("hidden").units == 8 and model.input.shape == (None, 8, 8, 1)
    assert scope.layer_configs["hidden"].weight.data.bit_width == 8
    # Unnamed layers get the same Keras names in every build of the process (by_name and the search key on them).
    first = [layer.name for layer in build_model({"_target_": f"{user_package}.unnamed"}, (8, 8, 1), 10)[0].layers]
    keras.layers.Dense(3)  # takes the next auto name "dense_1"
    again = [layer.name for layer in build_model({"_target_": f"{user_package}.unnamed"}, (8, 8, 1), 10)[0].layers]
    assert first == again == ["flatten", "dense"]


def test_keras_applications_constructor_gets_classes_and_gives_logits():
    node = {"name": "custom", "_target_": "keras.applications.MobileNetV2", "weights": None, "alpha": 0.1}
    model, _ = build_model(node, (32, 32, 3), 7)
    logits = model.get_layer("predictions")
    assert logits.units == 7 and logits.activation is keras.activations.linear
    assert isinstance(logits, nf.Dense)


@pytest.mark.parametrize("target, needles", [
    ("no_such_package.models.net", ["model._target_=no_such_package.models.net: cannot import it"]),
    ("{pkg}.make_net", ["missing a required argument 'width'", "+model.KEY=VALUE"]),
    ("{pkg}.not_a_model", ["returned str, not a keras.Model"]),
    ("{pkg}.wrong_output", ["one tensor of 10 logits", "(None, 3)"]),
    ("{pkg}.subclassed", ["subclassed", "Functional or Sequential"]),
    ("keras.applications.MobileNetV2", ["calling it failed", "weights"]),
])
def test_custom_model_errors_are_one_line(target, needles, user_package, tmp_path, capsys, mlflow_template):
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    code, err = run_main("experiments.train", "model=custom", f"model._target_={target.format(pkg=user_package)}",
                         "data=synthetic", "data.num_examples=32", "data.test_examples=8", "trainer.epochs=1",
                         "trainer.verbose=0", "trainer.save_model=false", "trainer.checkpoint=false",
                         f"mlflow.tracking_uri=sqlite:///{db}", tmp_path=tmp_path, capsys=capsys)
    one_error(code, err, *needles)
    mlflow.set_tracking_uri(None)


def test_custom_model_trains_with_its_layer_names_in_the_record(user_package, tmp_path, mlflow_template):
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    cfg = compose("model=custom", f"model._target_={user_package}.make_net", "+model.width=8", "fixed=w8a8",
                  "data=synthetic", "data.num_examples=64", "data.test_examples=16", "trainer.epochs=1",
                  "trainer.verbose=0", "trainer.save_model=false", "trainer.checkpoint=false",
                  f"mlflow.tracking_uri=sqlite:///{db}")
    cfg.pop("search")
    results = run_training(cfg, output_dir=tmp_path / "out", choices={"model": "custom"})
    params = MlflowClient(f"sqlite:///{db}").get_run(results["run_id"]).data.params
    mlflow.set_tracking_uri(None)
    assert params["model._target_"] == f"{user_package}.make_net" and params["model.width"] == "8"
    assert params["bits.hidden.weight.data"] == "8" and params["bits.logits.activation.data"] == "8"
    assert params["model.layers"] == '["hidden", "logits"]'


@pytest.mark.slow
def test_search_over_a_converted_keras_applications_model(tmp_path, mlflow_template):
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    uri = f"sqlite:///{db}"
    cfg = compose("model=custom", "model._target_=keras.applications.MobileNetV2", "+model.weights=null",
                  "+model.alpha=0.1", "data=synthetic", "data.shape=[32,32,3]", "data.num_examples=20",
                  "data.test_examples=4", "trainer.epochs=1", "trainer.batch_size=16", "search.n_trials=2",
                  "search.widths=[4,8]", "search.float_reference=false", "search.share_by_type=true",
                  "search.exclude=[block_*]",  # 7 searched layers of 150: quick to trace
                  f"mlflow.tracking_uri={uri}", "mlflow.experiment_name=zoo_search")
    summary = searching.run_search(cfg, output_dir=tmp_path / "search", choices={})
    assert summary["n_trials"] == 2
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("zoo_search")
    trials = [r for r in client.search_runs([experiment.experiment_id])
              if r.data.tags.get("nics_fix.role") == "trial"]
    mlflow.set_tracking_uri(None)
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}
    for run in trials:
        # Per-layer bits under MobileNetV2's own layer names: the searched Conv2D layers share the
        # trial's one Conv2D width (share_by_type); excluded ones keep the base config (float).
        params = run.data.params
        assert params["bits.Conv1.weight.data"] == params["bits.Conv_1.weight.data"] in {"4", "8"}
        assert params["bits.Conv1.weight.data"] == params["bits.expanded_conv_project.weight.data"]
        assert params["bits.block_16_project.weight.data"] == "float"
