"""Integer export and engine: bit-exact against the simulator; the accumulator entry."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import nics_fix as nf
from experiments.models import build_model

SUMMING = ("Dense", "Conv2D", "DepthwiseConv2D")


def fixed_cfg(bits, accumulator=None):
    data = {"bit_width": bits, "training": "auto", "not_training": "fixed"}
    cfg = {"configs": {"q": {"weight": {"data_config": data}, "activation": {"data_config": data}}},
           "by_type": {t: {"config_name": "q"} for t in SUMMING + ("ReLU", "BatchNormalization")}}
    if accumulator:
        for t in SUMMING:
            cfg["by_type"][t]["accumulator"] = accumulator
    return cfg


def calibrate(model, x, rng):
    """What training leaves behind, cheaply: spread weights, moving statistics, every scale set."""
    for layer in model.layers:
        if isinstance(layer, nf.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.3, channels).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 2.0, channels).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, channels).astype("float32"))
        elif getattr(layer, "bias", None) is not None and isinstance(layer, (nf.Dense, nf.Conv2D)):
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape).astype("float32"))
    model(x, training=True)


def assert_bit_exact(model, x, tmp_path):
    graph = nf.export_integer_model(model, tmp_path / "int")
    out = nf.IntegerModel.load(tmp_path / "int").predict(x)
    expected = model.predict(x, verbose=0)
    np.testing.assert_array_equal(out.floats, expected)
    assert np.array_equal(np.ldexp(out.integers.astype(np.float64), out.exponent), expected)
    assert out.integers.dtype == np.int64
    assert np.unique(expected).size > 3  # not a degenerate all-zero or saturated output
    return graph


def residual_model(cfg):
    with nf.fixed_scope("res", cfg):
        inputs = keras.Input((8, 8, 3))
        x = nf.Quantize(name="input_quant", fixed_config=cfg["configs"]["q"])(inputs)
        x = nf.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(x)
        x = nf.ReLU(name="relu1")(nf.BatchNormalization(name="bn1")(x))
        y = nf.DepthwiseConv2D(3, padding="same", name="dw1")(x)
        y = nf.Conv2D(8, 1, name="conv2")(nf.ReLU(name="relu2")(y))
        y = nf.BatchNormalization(name="bn2")(y)
        x = nf.ReLU(name="relu3")(nf.Add(name="add")([x, y]))
        x = nf.AveragePooling2D(2, name="avg")(x)
        x = nf.GlobalAveragePooling2D(name="gap")(x)
        outputs = nf.Dense(5, name="dense1")(x)
        return keras.Model(inputs, outputs)


ZOO = {
    "mlp": {"name": "mlp", "hidden_units": [16, 12]},
    "lenet5": {"name": "lenet5", "conv_filters": [4, 6], "hidden_units": [12]},
    "vgg": {"name": "vgg11", "layers": [6, "M", 8, 8, "M"], "hidden_units": [12], "batch_norm": True},
}
WIDTHS = [(4, None), (8, None), (16, {"bit_width": 48, "overflow": "saturate"})]


@pytest.mark.parametrize("bits,acc", WIDTHS, ids=["4bit", "8bit", "16bit_accumulator"])
@pytest.mark.parametrize("name", list(ZOO) + ["residual"])
def test_integer_engine_equals_simulator_bit_for_bit(name, bits, acc, tmp_path, rng):
    cfg = fixed_cfg(bits, acc)
    if name == "residual":
        cfg["configs"]["q"]["accumulator"] = None
        model, x = residual_model(cfg), rng.uniform(-1, 1, (24, 8, 8, 3)).astype("float32")
    else:
        model, _ = build_model(dict(ZOO[name], input_bits=bits), (8, 8, 1), 10, fixed_cfg=cfg)
        x = rng.uniform(0, 1, (24, 8, 8, 1)).astype("float32")
    calibrate(model, x, rng)
    graph = assert_bit_exact(model, x, tmp_path)
    summing = [layer for layer in graph["layers"] if layer["type"] in SUMMING]
    assert all((layer["accumulator"] is not None) == (acc is not None) for layer in summing)
    report = nf.sum_exactness(model)
    assert set(report) == {layer["name"] for layer in summing} and all(r["exact"] for r in report.values())
    if acc is None:  # without an accumulator, exactness rests on float32 holding the sums
        assert all(r["exact_in_float32"] for r in report.values())


def test_16_bit_sums_round_in_float32_and_the_accumulator_makes_them_exact(tmp_path, rng):
    """Fan-in 256 at 16 bits: sums need ~38 bits; float32 rounds them, the accumulator does not."""
    x = rng.uniform(-1, 1, (64, 256)).astype("float32")
    models = {}
    for acc in (None, {"bit_width": 48, "overflow": "wrap"}):
        cfg = fixed_cfg(16, acc)
        keras.utils.set_random_seed(0)
        with nf.fixed_scope("m", cfg):
            inputs = keras.Input((256,))
            q = nf.Quantize(name="input_quant", fixed_config=cfg["configs"]["q"])(inputs)
            models[acc is None] = keras.Model(inputs, nf.Dense(64, name="dense1")(q))
        models[acc is None](x, training=True)
    report = nf.sum_exactness(models[True])["dense1"]
    assert report["sum_bits"] > 25 and not report["exact_in_float32"]
    assert_bit_exact(models[False], x, tmp_path / "acc")
    graph = nf.export_integer_model(models[True], tmp_path / "plain")
    out = nf.IntegerModel.load(tmp_path / "plain").predict(x)
    assert graph["layers"][1]["accumulator"] is None
    assert not np.array_equal(out.floats, models[True].predict(x, verbose=0))  # float32 rounded some sums


def hand_model(overflow):
    """Two inputs of 127 steps (2**-4) times two weights of 127 steps (2**-7): sum 32258 lsb of 2**-11."""
    def point(bits, scale):
        return {"data_config": {"bit_width": bits, "training": scale, "not_training": scale}}

    inputs = keras.Input((2,))
    x = nf.Quantize(fixed_config={"activation": point(8, 3)}, name="input_quant")(inputs)
    dense = nf.Dense(1, use_bias=False, name="dense1", fixed_config={
        "weight": point(8, 0), "activation": point(16, 4),
        "accumulator": {"bit_width": 8, "overflow": overflow}})
    model = keras.Model(inputs, dense(x))
    dense.kernel.assign(np.full((2, 1), 127 / 128, "float32"))
    return model


@pytest.mark.parametrize("overflow,units", [("saturate", 127), ("wrap", 32258 - 126 * 256)])
def test_accumulator_saturates_and_wraps_a_hand_computed_sum(overflow, units, tmp_path):
    x = np.array([[127 / 16, 127 / 16], [1 / 16, -2 / 16], [-8.0, 127 / 16]], "float32")
    # row 2: 127*(1 - 2) = -127 fits; row 3: 127*(-128 + 127) = -127 fits
    expected = np.array([[units], [-127], [-127]], np.float64) * 2.0 ** -11
    model = hand_model(overflow)
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected.astype("float32"))
    assert nf.accumulator_counters(model)["dense1"] == {"overflows": 1, "sums": 3}
    nf.export_integer_model(model, tmp_path)
    engine = nf.IntegerModel.load(tmp_path)
    out = engine.predict(x)
    np.testing.assert_array_equal(out.integers, [[units], [-127], [-127]])
    assert out.exponent == -11 and engine.overflows == {"dense1": [1, 3]}


@pytest.mark.parametrize("overflow,units,grad", [("saturate", 127, 0.0), ("wrap", 2, 127 / 16)])
def test_accumulator_in_training_applies_the_width_and_its_gradient(overflow, units, grad):
    import tensorflow as tf

    model = hand_model(overflow)
    x = np.array([[127 / 16, 127 / 16]], "float32")
    with tf.GradientTape() as tape:
        y = model(x, training=True)
    np.testing.assert_array_equal(y.numpy(), [[units * 2.0 ** -11]])
    # saturated: no gradient; wrapped: straight through (d sum / d kernel = input)
    np.testing.assert_array_equal(tape.gradient(y, model.get_layer("dense1").kernel).numpy(), [[grad], [grad]])


def test_accumulator_needs_a_fixed_point_input():
    dense = nf.Dense(2, fixed_config={**fixed_cfg(8)["configs"]["q"], "accumulator": {"bit_width": 16}},
                     name="dense9")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, dense(inputs))
    with pytest.raises(ValueError, match="layer dense9: an accumulator needs a fixed-point input"):
        model(np.ones((1, 3), "float32"))


def test_accumulator_config_errors_name_the_key():
    with pytest.raises(nf.ConfigError, match=r"by_type\.Dense\.accumulator\.overflow: overflow must be one of"):
        nf.FixedConfig.from_dict({"by_type": {"Dense": {"accumulator": {"overflow": "clip"}}}})
    with pytest.raises(nf.ConfigError, match=r"accumulator\.bit_width: accumulator bit_width must be"):
        nf.FixedConfig.from_dict({"by_name": {"d": {"accumulator": {"bit_width": 99}}}})
    cfg = nf.FixedConfig.from_dict({"by_type": {"Dense": {"accumulator": {"bit_width": 24}}}})
    assert cfg.resolve("d", "Dense").accumulator == nf.AccumulatorConfig(24, "saturate")


def test_unsupported_layer_and_float_point_errors_name_the_layer(tmp_path, rng):
    cfg = fixed_cfg(8)
    with nf.fixed_scope("m", cfg):
        inputs = keras.Input((4,))
        x = nf.Quantize(name="input_quant", fixed_config=cfg["configs"]["q"])(inputs)
        x = nf.Dense(4, name="dense1")(x)
        model = keras.Model(inputs, keras.layers.LayerNormalization(name="norm7")(x))
    model(rng.normal(size=(4, 4)).astype("float32"), training=True)
    with pytest.raises(nf.ExportError, match=r"layer norm7 \(LayerNormalization\): the integer engine cannot run"):
        nf.export_integer_model(model, tmp_path)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, nf.Dense(3, name="dense5", fixed_config={
        "weight": cfg["configs"]["q"]["weight"]})(inputs))
    with pytest.raises(nf.ExportError, match="layer dense5 .* receives the float model input"):
        nf.export_integer_model(model, tmp_path)
    x = nf.Quantize(name="input_quant", fixed_config=cfg["configs"]["q"])(inputs)
    model = keras.Model(inputs, nf.Dense(3, name="dense6", fixed_config={
        "weight": cfg["configs"]["q"]["weight"]})(x))
    with pytest.raises(nf.ExportError, match="layer dense6: its activation point is float in evaluation"):
        nf.export_integer_model(model, tmp_path)


def test_export_format_is_plain_json_and_raw_little_endian_integers(tmp_path, rng):
    model, _ = build_model(dict(ZOO["mlp"], input_bits=8), (8, 8, 1), 10, fixed_cfg=fixed_cfg(8))
    calibrate(model, rng.uniform(0, 1, (8, 8, 8, 1)).astype("float32"), rng)
    graph = nf.export_integer_model(model, tmp_path)
    on_disk = json.loads((tmp_path / "model.json").read_text())
    assert on_disk == graph and graph["format"] == "nics_fix.integer" and graph["version"] == 1
    dense = next(layer for layer in graph["layers"] if layer["name"] == "dense1")
    spec = dense["weights"]["kernel"]
    assert spec["dtype"] == "int8" and spec["shape"] == [64, 16]
    raw = np.frombuffer((tmp_path / spec["file"]).read_bytes(), "<i1").reshape(spec["shape"])
    kernel = model.get_layer("dense1").kernel.numpy()
    quantized = nf.fixed_point_quantize(kernel, 8, spec["scale"]).numpy()
    np.testing.assert_array_equal(np.ldexp(raw.astype(np.float64), spec["exponent"]), quantized)
    assert graph["bytes"] == sum((tmp_path / w["file"]).stat().st_size
                                 for layer in graph["layers"] for w in layer.get("weights", {}).values())


@pytest.mark.slow
def test_export_and_integer_eval_commands_end_to_end_on_digits(tmp_path, mlflow_template):
    import shutil

    from mlflow.tracking import MlflowClient

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from experiments.training import run_training
    from tests.conftest import REPO
    from tests.test_platform import run_cli

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = OmegaConf.to_container(compose("train", overrides=[
            "fixed=w8a8", "model.input_bits=8", "model.hidden_units=[16]", "trainer.epochs=1",
            "trainer.verbose=0", "+fixed.by_name.dense1.accumulator.bit_width=12",
            f"mlflow.tracking_uri={uri}"]), resolve=True)
    run_id = run_training(cfg, output_dir=tmp_path / "out")["run_id"]
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["accumulator.dense1.sums"] > 0 and metrics["accumulator.dense1.overflows"] >= 0

    done = run_cli(["experiments.export", f"run_id={run_id}", f"mlflow.tracking_uri={uri}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"-> artifact integer_model/ of run {run_id}" in done.stdout
    assert "integer_model/model.json" in {a.path for a in client.list_artifacts(run_id, "integer_model")}
    done = run_cli(["experiments.eval", f"run_id={run_id}", "integer=true", f"mlflow.tracking_uri={uri}"],
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(matches the simulator exactly; 360 of 360 outputs bit-identical)" in done.stdout
    run = client.get_run(run_id).data.metrics
    assert run["eval.integer_test_accuracy"] == run["test_accuracy"]


def test_engine_reads_per_channel_and_per_block_kernel_exponents(tmp_path, rng):
    """The same kernel values written with per-output-channel and per-block exponents run identically."""
    cfg = fixed_cfg(8)
    with nf.fixed_scope("m", cfg):
        inputs = keras.Input((6, 6, 2))
        x = nf.Quantize(name="input_quant", fixed_config=cfg["configs"]["q"])(inputs)
        x = nf.Conv2D(3, 3, name="conv1")(x)
        x = nf.DepthwiseConv2D(3, depth_multiplier=2, name="dw1")(x)
        model = keras.Model(inputs, nf.Dense(4, name="dense1")(nf.Flatten(name="flatten")(x)))
    x = rng.uniform(-1, 1, (6, 6, 6, 2)).astype("float32")
    calibrate(model, x, rng)
    graph = assert_bit_exact(model, x, tmp_path)  # exports to tmp_path / "int"
    reference = nf.IntegerModel.load(tmp_path / "int").predict(x).integers
    for layer in graph["layers"]:
        spec = layer.get("weights", {}).get("kernel")
        if spec is None:
            continue
        path = tmp_path / "int" / spec["file"]
        ints = np.fromfile(path, spec["dtype"]).astype(np.int64).reshape(spec["shape"])
        # Values are kept: integers with a trailing zero bit move to exponent + 1, per element.
        even = ints % 2 == 0
        exponent = spec["exponent"] + even.astype(np.int64)
        (ints // np.where(even, 2, 1)).astype(np.int16).tofile(path)
        spec["dtype"], spec["exponent"] = "int16", exponent.tolist()
    (tmp_path / "int" / "model.json").write_text(json.dumps(graph))
    np.testing.assert_array_equal(nf.IntegerModel.load(tmp_path / "int").predict(x).integers, reference)
