"""Saving fixed models: .keras round trips, fixed_model_saver / restore_fixed_model (issue 2)."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

import nics_fix as nf




FIXED_TYPES = ("Conv2D", "BatchNormalization", "ReLU", "DepthwiseConv2D", "Dense", "Quantize")


def config(fix8, with_quantize=False):
    """fix8 everywhere, plus evaluation modes of every kind on the weights."""
    cfg = {
        "configs": {"fix8": fix8},
        "by_type": {t: "fix8" for t in FIXED_TYPES},
        "by_name": {
            "dense1": {"weight": {"data_config": {"bit_width": 4, "not_training": "auto"}}},
            "conv1": {"weight": {"data_config": {"bit_width": 6, "training": 1, "not_training": 1}}},
            "logits": {"activation": {"data_config": {"bit_width": 8, "training": 3,
                                                      "not_training": 3}}},
        },
    }
    if not with_quantize:
        del cfg["by_name"]["logits"]
    return cfg


def build(cfg=None, with_quantize=False):
    """Every layer type: Dense, Conv2D, DepthwiseConv2D, BatchNormalization, ReLU,
    (Quantize), and the pass-through MaxPool2D and Flatten. All layers are named."""
    with nf.fixed_scope("net", cfg):
        inputs = keras.Input((6, 6, 2))
        x = nf.Conv2D(3, 3, padding="same", name="conv1")(inputs)
        x = nf.BatchNormalization(name="bn1")(x)
        x = nf.ReLU(name="relu1")(x)
        x = nf.DepthwiseConv2D(3, name="dw1")(x)
        x = nf.MaxPool2D(2, name="pool1")(x)
        x = nf.Flatten(name="flat")(x)
        x = nf.Dense(4, name="dense1")(x)
        if with_quantize:
            x = nf.quantize(x, None, name="logits")
    return keras.Model(inputs, x)


RNG = np.random.default_rng(3)
X = RNG.normal(size=(5, 6, 6, 2)).astype(np.float32)
Y = RNG.normal(size=(5, 4)).astype(np.float32)


def train(model, steps=2):
    """Eager SGD steps with `training=True`: sets every auto scale (data and gradient)."""
    optimizer = keras.optimizers.SGD(0.05)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(X, training=True) - Y))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return model


def predict(model):
    return model(X, training=False).numpy()


def scales(model):
    return {p.name: (p.data_scale, p.grad_scale) for p in nf.fixed_points(model)}


def trained(fix8, with_quantize=False, steps=2):
    return train(build(config(fix8, with_quantize), with_quantize), steps)


# ----------------------------------------------------------------------------
# .keras
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("with_quantize", [False, True])
def test_keras_file_round_trip(tmp_path, fix8, with_quantize):
    model = trained(fix8, with_quantize)
    before = predict(model)
    assert np.isfinite(before).all()
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)

    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    for ours, theirs in zip(model.layers, loaded.layers):
        assert theirs.get_config() == ours.get_config()
        if hasattr(ours, "fixed_config"):
            assert theirs.fixed_config == ours.fixed_config
    assert loaded.get_layer("dense1").fixed_config.weight.data == nf.DataConfig(4, "auto", "auto")
    assert loaded.get_layer("conv1").get_config()["fixed_config"]["weight"]["data_config"] == {
        "bit_width": 6, "training": 1, "not_training": 1}
    assert scales(loaded) == scales(model)
    assert any(s != (0, 0) for s in scales(model).values())  # training did set scales
    for a, b in zip(model.weights, loaded.weights):
        assert a.path == b.path and np.array_equal(a.numpy(), b.numpy())
    assert np.array_equal(predict(loaded), before)
    assert np.array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))


# ----------------------------------------------------------------------------
# fixed_model_saver / restore_fixed_model
# ----------------------------------------------------------------------------


def _fresh(fix8, with_quantize=False):
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(99)  # other initial weights than the trained model's
    return build(config(fix8, with_quantize), with_quantize)


@pytest.mark.parametrize("fixed_weight", [False, True])
def test_saver_restore_is_bit_identical(tmp_path, fix8, fixed_weight):
    model = trained(fix8)
    before = predict(model)
    saved_scales = scales(model)
    path = nf.fixed_model_saver(model, fixed_weight=fixed_weight).save(tmp_path / "fixed")
    assert sorted(p.name for p in path.iterdir()) == ["fixed_config.yaml", "manifest.json", "weights.npz"]

    fresh = _fresh(fix8)
    assert not np.array_equal(predict(fresh), before)
    assert nf.restore_fixed_model(fresh, path) is fresh
    assert np.array_equal(predict(fresh), before)

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["fixed_weight"] is fixed_weight
    assert manifest["layers"]["dense1"] == model.get_layer("dense1").fixed_config.to_dict()
    assert [p["name"] for p in manifest["points"]] == [p.name for p in nf.fixed_points(model)]
    if not fixed_weight:
        assert scales(fresh) == saved_scales


def test_fixed_weight_values_lie_on_the_grid(tmp_path, fix8):
    model = trained(fix8)
    nf.fixed_model_saver(model, fixed_weight=True).save(tmp_path / "fw")
    nf.fixed_model_saver(model, fixed_weight=False).save(tmp_path / "float")
    with np.load(tmp_path / "fw" / "weights.npz") as data:
        fw = {k: data[k] for k in data.files}
    with np.load(tmp_path / "float" / "weights.npz") as data:
        master = {k: data[k] for k in data.files}
    checked = []
    for layer in (model.get_layer(n) for n in ("conv1", "bn1", "dw1", "dense1")):
        for key, point in layer.fixed_points.items():
            if point.kind != "weight":
                continue
            name = f"{layer.name}/{key}"
            bits = point.config.data.bit_width
            scale = int(fw[f"{name}_data_scale"])
            assert np.array_equal(nf.fixed_point_quantize(fw[name], bits, scale).numpy(), fw[name]), name
            # ... and they are what evaluation feeds the layer from the float master copy.
            assert np.array_equal(fw[name], nf.fixed_point_quantize(master[name], bits, scale).numpy())
            assert np.array_equal(master[name], getattr(layer, key).numpy())
            checked.append(name)
    assert len(checked) == 8
    # `auto` evaluation (dense1) pins the scale computed from the master copy; integer: that scale.
    assert int(fw["dense1/kernel_data_scale"]) == int(nf.auto_scale(master["dense1/kernel"]))
    assert int(fw["conv1/kernel_data_scale"]) == 1
    # The float master copy is not on a 4-bit grid: fixed_weight really changed what is stored.
    assert not np.array_equal(fw["dense1/kernel"], master["dense1/kernel"])



def test_fixed_weight_pins_the_auto_evaluation_scale(tmp_path):
    # max|w| = 0.52: scale 0, 4-bit step 1/8, so 0.52 is stored as 0.5, whose own auto scale
    # is -1. Re-deriving the scale from the stored value would clip 0.5 to 0.4375.
    cfg = {"weight": {"data_config": {"bit_width": 4, "training": "auto", "not_training": "auto"}}}

    def make():
        inputs = keras.Input((8,))
        return keras.Model(inputs, nf.Dense(4, name="dense1", fixed_config=cfg)(inputs))

    model = make()
    kernel = RNG.uniform(-0.3, 0.3, size=(8, 4)).astype(np.float32)
    kernel[2, 1] = 0.52
    model.get_layer("dense1").kernel.assign(kernel)
    x = RNG.normal(size=(3, 8)).astype(np.float32)
    before = model(x).numpy()
    nf.fixed_model_saver(model, fixed_weight=True).save(tmp_path / "fw")
    with np.load(tmp_path / "fw" / "weights.npz") as data:
        assert data["dense1/kernel"][2, 1] == 0.5 and int(data["dense1/kernel_data_scale"]) == 0
    fresh = make()
    nf.restore_fixed_model(fresh, tmp_path / "fw")
    assert np.array_equal(fresh(x).numpy(), before)

def test_saver_round_trip_with_a_quantize_layer(tmp_path, fix8):
    model = trained(fix8, with_quantize=True)
    before = predict(model)
    nf.fixed_model_saver(model, fixed_weight=True).save(tmp_path / "fixed")
    fresh = _fresh(fix8, with_quantize=True)
    nf.restore_fixed_model(fresh, tmp_path / "fixed")
    assert np.array_equal(predict(fresh), before)


def test_saver_from_a_scope(tmp_path, fix8):
    with nf.fixed_scope("net", {"by_type": {"Dense": fix8}}) as scope:
        inputs = keras.Input((8,))
        model = keras.Model(inputs, nf.Dense(4, name="dense1")(inputs))
    x = RNG.normal(size=(3, 8)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True))
    tape.gradient(loss, model.trainable_variables)
    nf.fixed_model_saver(scope).save(tmp_path / "s")
    keras.backend.clear_session(free_memory=False)
    inputs = keras.Input((8,))
    fresh = keras.Model(inputs, nf.Dense(4, name="dense1", fixed_config=fix8)(inputs))
    nf.restore_fixed_model(fresh, tmp_path / "s")
    assert np.array_equal(fresh(x).numpy(), model(x).numpy())


def test_restore_into_a_model_with_another_config_names_the_layer(tmp_path, fix8):
    model = trained(fix8)
    nf.fixed_model_saver(model).save(tmp_path / "fixed")
    cfg = config(fix8)
    cfg["by_name"]["dense1"] = {"weight": {"data_config": {"bit_width": 5}}}
    keras.backend.clear_session(free_memory=False)
    other = build(cfg)
    with pytest.raises(nf.FixedModelError) as info:
        nf.restore_fixed_model(other, tmp_path / "fixed")
    assert isinstance(info.value, ValueError)
    assert "layer 'dense1' was saved with config" in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "fixed"))
    # Not strict: the weights load anyway.
    nf.restore_fixed_model(other, tmp_path / "fixed", strict=False)
    assert np.array_equal(other.get_layer("dense1").kernel.numpy(), model.get_layer("dense1").kernel.numpy())


def test_restore_into_another_architecture(tmp_path, fix8):
    model = trained(fix8)
    nf.fixed_model_saver(model).save(tmp_path / "fixed")
    keras.backend.clear_session(free_memory=False)
    inputs = keras.Input((6, 6, 2))
    x = nf.Flatten(name="flat")(nf.Conv2D(3, 3, padding="same", name="conv1")(inputs))
    small = keras.Model(inputs, nf.Dense(4, name="dense1")(x))
    with pytest.raises(nf.FixedModelError, match="does not match the saved one; saved but not in the model: "
                                                 r"\['bn1/activation_data_scale'"):
        nf.restore_fixed_model(small, tmp_path / "fixed", strict=False)


def test_missing_or_corrupt_folder_names_the_path(tmp_path, fix8):
    model = trained(fix8, steps=1)
    good = nf.fixed_model_saver(model).save(tmp_path / "good")
    fresh = _fresh(fix8)

    def error(path) -> str:
        with pytest.raises(nf.FixedModelError) as info:
            nf.restore_fixed_model(fresh, path)
        assert isinstance(info.value, ValueError)
        return str(info.value)

    missing = tmp_path / "nowhere"
    assert error(missing) == (f"{missing}: not a saved fixed model (weights.npz is missing); "
                              "save one with nics_fix.fixed_model_saver(model).save(path)")

    weights = (good / "weights.npz").read_bytes()
    cases = {
        "no_manifest": ("manifest.json", None, "not a saved fixed model (manifest.json is missing)"),
        "bad_json": ("manifest.json", b"{not json", "manifest.json: unreadable manifest"),
        "json_list": ("manifest.json", b"[1, 2]", "manifest.json: unreadable manifest: not a JSON object"),
        "old_version": ("manifest.json", b'{"format_version": 0, "layers": {}, "points": []}',
                        "manifest.json: format_version 0 is not 1"),
        "no_layers": ("manifest.json", b'{"format_version": 1, "points": []}',
                      "manifest.json: unreadable manifest: 'layers' is missing"),
        "garbage_npz": ("weights.npz", b"garbage", "weights.npz: unreadable weights"),
        "truncated_npz": ("weights.npz", weights[: len(weights) // 2], "weights.npz: unreadable weights"),
        "damaged_npz": ("weights.npz", weights[:300] + b"\0" * 64 + weights[364:],
                        "weights.npz: unreadable weights"),
    }
    for name, (file, content, expected) in cases.items():
        target = tmp_path / name
        shutil.copytree(good, target)
        if content is None:
            (target / file).unlink()
        else:
            (target / file).write_bytes(content)
        message = error(target)
        assert message.startswith(str(target)), (name, message)
        assert expected in message, (name, message)
    # Nothing was half-loaded into the model by the failed attempts... and the good copy works.
    nf.restore_fixed_model(fresh, good)
    assert np.array_equal(predict(fresh), predict(model))


def test_written_fixed_config_yaml_rebuilds_the_same_configs(tmp_path, fix8):
    model = trained(fix8, steps=1)
    path = nf.fixed_model_saver(model).save(tmp_path / "fixed")
    text = (path / "fixed_config.yaml").read_text()
    assert set(yaml.safe_load(text)) == {"by_name"}
    cfg = nf.parse_cfg_from_file(path / "fixed_config.yaml")
    assert sorted(cfg.by_name_keys) == ["bn1", "conv1", "dense1", "dw1", "relu1"]
    keras.backend.clear_session(free_memory=False)
    rebuilt = build(cfg)
    assert nf.layer_fixed_configs(rebuilt) == nf.layer_fixed_configs(model)
    assert rebuilt.get_layer("dense1").fixed_config.weight.data == nf.DataConfig(4, "auto", "auto")
    # The rebuilt model takes the saved weights strictly.
    nf.restore_fixed_model(rebuilt, path)
    assert np.array_equal(predict(rebuilt), predict(model))


# ----------------------------------------------------------------------------
# Float-trained weights into a fixed model (TSDH)
# ----------------------------------------------------------------------------


def test_float_trained_weights_load_into_a_fixed_model(tmp_path, fix8):
    float_model = train(build(None))
    assert all(layer.fixed_config.is_float for layer in float_model.layers if hasattr(layer, "fixed_config"))
    float_model.save_weights(tmp_path / "float.weights.h5")
    keras.backend.clear_session(free_memory=False)
    fixed = build(config(fix8))
    fixed.load_weights(tmp_path / "float.weights.h5")
    for a, b in zip(float_model.weights, fixed.weights):
        assert a.path == b.path and np.array_equal(a.numpy(), b.numpy())
    # The fixed model quantizes those weights: its evaluation differs from the float model's,
    # and fine-tuning it sets its scales from the loaded weights.
    assert not np.array_equal(predict(fixed), predict(float_model))
    kernel = fixed.get_layer("dense1").kernel.numpy()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(fixed(X, training=True) - Y))
    tape.gradient(loss, fixed.trainable_variables)
    assert scales(fixed)["dense1/kernel"][0] == int(nf.auto_scale(kernel))


def test_plain_keras_dense_and_conv_weights_load_into_fixed_layers(tmp_path, fix8):
    def make(ns):
        inputs = keras.Input((6, 6, 2))
        x = ns.Conv2D(3, 3, name="conv1")(inputs)
        x = ns.Flatten(name="flat")(x)
        return keras.Model(inputs, ns.Dense(4, name="dense1")(x))

    plain = make(keras.layers)
    plain.save_weights(tmp_path / "plain.weights.h5")
    keras.backend.clear_session(free_memory=False)
    with nf.fixed_scope("net", {"by_type": {"Conv2D": fix8, "Dense": fix8}}):
        fixed = make(nf)
    fixed.load_weights(tmp_path / "plain.weights.h5")
    for name in ("conv1", "dense1"):
        for key in ("kernel", "bias"):
            assert np.array_equal(getattr(fixed.get_layer(name), key).numpy(),
                                  getattr(plain.get_layer(name), key).numpy())


@pytest.mark.parametrize("layer", ["ReLU", "BatchNormalization", "DepthwiseConv2D"])
def test_plain_keras_weights_load_into_fixed_layers_without_own_saver(tmp_path, layer):
    args = {"ReLU": (), "BatchNormalization": (), "DepthwiseConv2D": (3,)}[layer]

    def make(ns):
        inputs = keras.Input((6, 6, 2))
        return keras.Model(inputs, getattr(ns, layer)(*args, name="l")(inputs))

    plain = make(keras.layers)
    plain.save_weights(tmp_path / "plain.weights.h5")
    fixed = make(nf)
    fixed.load_weights(tmp_path / "plain.weights.h5")
    for a, b in zip(plain.weights, fixed.weights):
        assert np.array_equal(a.numpy(), b.numpy())
