"""nf.fixed_model: converting Keras 3 models, float equivalence, configs, warnings and errors."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import nics_fix as nf
from tests.test_quant import ref_auto_scale, ref_quantize

L = keras.layers


def randomize(model, rng):
    """Non-trivial weights (BN variances positive), so equal outputs mean something."""
    for v in model.weights:
        if "int" in str(v.dtype):
            continue
        value = rng.standard_normal(v.shape).astype(np.float32) * 0.3
        if "variance" in v.name:
            value = np.abs(value) + 0.5
        v.assign(value)
    return model


def float_weights(model, trainable=None):
    """The model's weights without the nics_fix scales (int32), in order."""
    weights = {None: model.weights, False: model.non_trainable_weights}[trainable]
    return [v for v in weights if "int" not in str(v.dtype)]


def outputs_and_gradients(model, x, training):
    x = tf.constant(x)
    inputs = [x] if x.dtype.is_floating else []  # token ids have no gradient
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        y = model(x, training=training)
        loss = tf.reduce_sum(tf.square(y))
    grads = tape.gradient(loss, inputs + model.trainable_weights)
    return y.numpy(), [tf.convert_to_tensor(g).numpy() for g in grads]


def assert_same_model(original, converted, x):
    """Same outputs and gradients (input and every weight), training and inference."""
    assert len(original.trainable_weights) == len(converted.trainable_weights)
    for training in (False, True):
        y0, g0 = outputs_and_gradients(original, x, training)
        y1, g1 = outputs_and_gradients(converted, x, training)
        np.testing.assert_array_equal(y1, y0)
        for a, b in zip(g1, g0):
            np.testing.assert_array_equal(a, b)
    state = [float_weights(m, trainable=False) for m in (original, converted)]
    assert len(state[0]) == len(state[1])
    for a, b in zip(*state):  # BN moving statistics updated identically
        np.testing.assert_array_equal(b.numpy(), a.numpy())


def residual_cnn():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(max_value=6, name="relu6")(x)
    y = L.Conv2D(4, 3, padding="same", activation="relu", name="conv2")(x)
    y = L.DepthwiseConv2D(3, padding="same", name="dw")(y)
    x = L.Add(name="add")([x, y])
    x = L.Activation("relu6", name="act")(x)
    x = L.Dropout(0.25, name="drop")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x), name="residual_cnn")


def nested_model():
    inner = keras.Sequential([keras.Input((6,)), L.Dense(5, activation="tanh", name="inner_dense"),
                              L.BatchNormalization(name="inner_bn")], name="inner")
    inputs = keras.Input((6,))
    shared = L.Dense(6, name="shared")  # one layer used twice
    x = shared(shared(inputs))
    x = inner(x)
    return keras.Model(inputs, L.Dense(2, name="head")(x), name="outer")


def transformer_block():
    ids = keras.Input((6,), dtype="int32")
    x = L.Embedding(20, 8, name="emb")(ids)
    a = L.MultiHeadAttention(2, 4, dropout=0.1, name="att")(x, x)
    x = L.LayerNormalization(name="ln1")(L.Add()([x, a]))
    f = L.Dense(16, activation="gelu", name="ffn1")(x)
    f = L.EinsumDense("abc,cd->abd", (None, 8), bias_axes="d", name="ffn2")(f)
    x = L.LayerNormalization(name="ln2")(L.Add()([x, f]))
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(ids, L.Dense(3, name="head")(x), name="transformer")


def conv_zoo():
    inputs = keras.Input((8, 8, 2))
    x = L.SeparableConv2D(4, 3, padding="same", activation="relu", name="sep")(inputs)
    x = L.Conv2DTranspose(3, 3, strides=2, padding="same", name="up")(x)
    x = L.Reshape((16 * 16, 3))(x)
    x = L.Conv1D(2, 5, strides=4, name="c1d")(x)
    return keras.Model(inputs, L.Dense(2, name="out")(L.Flatten()(x)), name="conv_zoo")


def supported_weights_all_have_points(model):
    """Every trainable weight of the converted model is read through a weight point."""
    pointed = {id(getattr(layer, p.key)) for layer in nf.introspect.fixed_layers(model)
               for p in layer.fixed_points.values() if p.kind == "weight"}
    return all(id(v) in pointed for v in model.trainable_weights)


# ---------------------------------------------------------------------------
# Float: the converted model is the original, bit for bit
# ---------------------------------------------------------------------------


def test_residual_cnn_converts_to_fixed_layers_and_stays_exact(rng):
    model = randomize(residual_cnn(), rng)
    converted = nf.fixed_model(model)
    kinds = {layer.name: type(layer) for layer in converted.layers}
    assert kinds["conv1"] is nf.Conv2D and kinds["bn1"] is nf.BatchNormalization
    assert kinds["relu6"] is nf.ReLU and kinds["dw"] is nf.DepthwiseConv2D and kinds["logits"] is nf.Dense
    assert kinds["act"] is L.Activation and kinds["add"] is L.Add and kinds["drop"] is L.Dropout
    assert converted.get_layer("relu6").max_value == 6
    assert [layer.name for layer in converted.layers] == [layer.name for layer in model.layers]
    assert_same_model(model, converted, rng.standard_normal((4, 8, 8, 3)).astype(np.float32))


def test_nested_and_shared_layers(rng):
    model = randomize(nested_model(), rng)
    model.get_layer("inner").get_layer("inner_bn").trainable = False
    converted = nf.fixed_model(model)
    assert not converted.get_layer("inner").get_layer("inner_bn").trainable  # frozen stays frozen
    assert isinstance(converted.get_layer("inner"), keras.Sequential)
    assert isinstance(converted.get_layer("inner").get_layer("inner_dense"), nf.Dense)
    shared = converted.get_layer("shared")
    assert isinstance(shared, nf.Dense) and len(shared._inbound_nodes) == 2  # still one shared layer
    names = [p.name for p in nf.fixed_points(converted)]
    assert "inner_dense/kernel" in names and names.count("shared/kernel") == 1
    assert_same_model(model, converted, rng.standard_normal((5, 6)).astype(np.float32))


def test_original_model_is_not_changed(rng):
    model = randomize(nested_model(), rng)
    before = [w.numpy().copy() for w in model.weights]
    converted = nf.fixed_model(model)
    for w in converted.trainable_weights:
        w.assign(w + 1.0)
    assert all(not isinstance(layer, nf.layers.FixedLayer) for layer in model._flatten_layers())
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_float_conversion_fits_exactly_like_the_original(rng):
    model = randomize(residual_cnn(), rng)
    converted = nf.fixed_model(model)
    x = rng.standard_normal((16, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    for m in (model, converted):
        m.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    h0 = model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False).history["loss"]
    h1 = converted.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False).history["loss"]
    assert h0 == h1
    assert len(float_weights(model)) == len(float_weights(converted))
    for a, b in zip(float_weights(model), float_weights(converted)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("build, shape", [(transformer_block, None), (conv_zoo, (3, 8, 8, 2))])
def test_transformer_and_other_new_layers_convert_exactly(build, shape, rng):
    model = randomize(build(), rng)
    converted = nf.fixed_model(model)
    assert nf.unsupported_layers(model) == {} and supported_weights_all_have_points(converted)
    x = rng.integers(0, 20, (4, 6)).astype(np.int32) if shape is None else rng.standard_normal(shape).astype(np.float32)
    assert_same_model(model, converted, x)


@pytest.mark.parametrize("application", ["MobileNetV2", "ResNet50"])
def test_keras_applications_convert_exactly(application, rng):
    kwargs = {"alpha": 0.35} if application == "MobileNetV2" else {}
    model = getattr(keras.applications, application)(weights=None, input_shape=(32, 32, 3), classes=4, **kwargs)
    converted = nf.fixed_model(model)
    assert nf.unsupported_layers(model) == {} and supported_weights_all_have_points(converted)
    assert all(isinstance(layer, nf.layers.FixedLayer) for layer in converted.layers if layer.weights)
    x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    for training in (False, True):
        np.testing.assert_array_equal(converted(x, training=training).numpy(), model(x, training=training).numpy())


# ---------------------------------------------------------------------------
# Configs resolve as in fixed_scope
# ---------------------------------------------------------------------------


def test_fixed_config_quantizes_as_a_hand_computation_says(rng):
    inputs = keras.Input((6,))
    hidden = L.Dense(4, activation="relu", name="d1")(inputs)
    model = randomize(keras.Model(inputs, L.Dense(3, name="d2")(hidden)), rng)
    cfg = {"by_type": {"Dense": {"weight": {"data_config": {"bit_width": 5, "training": "auto",
                                                             "not_training": "auto"}}}},
           "by_name": {"d1": {"activation": {"data_config": {"bit_width": 4, "training": 1,
                                                              "not_training": 1}}}}}
    converted = nf.fixed_model(model, cfg)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    got = converted(x, training=False).numpy()

    def q(w):
        return ref_quantize(w, 5, ref_auto_scale(w)).astype(np.float64)

    w1, b1, w2, b2 = (model.get_layer(n).weights[i].numpy() for n in ("d1", "d2") for i in (0, 1))
    h = ref_quantize(np.maximum(x @ q(w1) + q(b1), 0), 4, 1)  # relu, then d1's activation point
    want = h.astype(np.float64) @ q(w2) + q(b2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, model(x).numpy(), atol=1e-3)
    assert converted.get_layer("d1").fixed_config.activation.data.bit_width == 4
    assert converted.get_layer("d2").fixed_config.activation.is_float


def test_unmatched_by_name_keys_are_reported(rng):
    cfg = {"by_name": {"no_such_layer": {"weight": {"data_config": {"bit_width": 8, "training": "auto"}}}}}
    with pytest.warns(UserWarning, match="by_name entries matched no layer: no_such_layer"):
        nf.fixed_model(nested_model(), cfg)


def test_converting_a_nics_fix_model_takes_the_new_config(fix8):
    with nf.fixed_scope("net", {"by_type": {"Dense": fix8}}):
        model = keras.Sequential([keras.Input((3,)), nf.Dense(2, name="d")])
    assert not nf.fixed_model(model).get_layer("d").fixed_config.weight.data.bit_width


# ---------------------------------------------------------------------------
# Unsupported layers and models
# ---------------------------------------------------------------------------


def test_weighted_layers_without_counterpart_stay_float_with_one_warning(rng):
    inputs = keras.Input((5, 3))
    x = L.GRU(4, return_sequences=True, name="gru")(inputs)
    x = L.PReLU(name="prelu")(x)
    x = L.Flatten()(x)
    model = randomize(keras.Model(inputs, L.Dense(2, name="fc")(x)), rng)
    assert nf.unsupported_layers(model) == {"gru": "GRU", "prelu": "PReLU"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = nf.fixed_model(model)
    messages = [str(w.message) for w in caught if "no nics_fix counterpart" in str(w.message)]
    assert messages == ["fixed_model: 2 layer(s) hold weights but have no nics_fix counterpart and "
                        "stay float: gru (GRU), prelu (PReLU)"]
    assert type(converted.get_layer("gru")) is L.GRU and isinstance(converted.get_layer("fc"), nf.Dense)
    assert nf.unsupported_layers(converted) == {"gru": "GRU", "prelu": "PReLU"}
    assert_same_model(model, converted, rng.standard_normal((2, 5, 3)).astype(np.float32))


class CustomCall(keras.Model):
    def __init__(self):
        super().__init__(name="custom")
        self.dense = L.Dense(2)

    def call(self, x):
        return self.dense(x) * 2


def test_subclassed_model_is_a_clear_error():
    model = CustomCall()
    model(np.zeros((1, 3), np.float32))
    with pytest.raises(nf.ConversionError, match="'custom' is a subclassed CustomCall with its own `call`.*"
                                                 "build it as a Functional or Sequential model"):
        nf.fixed_model(model)
    inputs = keras.Input((3,))
    wrapper = keras.Model(inputs, CustomCall()(inputs))
    with pytest.raises(nf.ConversionError, match="nested model 'custom' is a subclassed CustomCall"):
        nf.fixed_model(wrapper)


# ---------------------------------------------------------------------------
# Converted models in the rest of nics_fix: fit, .keras, saver, strategies, THDH
# ---------------------------------------------------------------------------

TRANSFORMER_CFG = {
    "configs": {"fix8": {"weight": {"data_config": {"bit_width": 8, "training": "auto", "not_training": "fixed"},
                                    "gradient_config": {"bit_width": 8, "training": "auto"}},
                         "activation": {"data_config": {"bit_width": 8, "training": "auto", "not_training": "fixed"},
                                        "gradient_config": {"bit_width": 12, "training": "auto"}}}},
    "by_type": {t: "fix8" for t in ("Embedding", "EinsumDense", "MultiHeadAttention", "LayerNormalization", "Dense")},
}


@pytest.fixture(scope="module")
def trained_transformer():
    """A converted transformer block with 8 bits everywhere after one epoch of fit (traced once)."""
    rng = np.random.default_rng(7)
    converted = nf.fixed_model(randomize(transformer_block(), rng), TRANSFORMER_CFG)
    converted.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.integers(0, 20, (16, 6)).astype(np.int32)
    history = converted.fit(x, rng.integers(0, 3, 16), batch_size=8, epochs=1, verbose=0)
    return converted, x, history.history["loss"][0]


def test_fixed_transformer_trains_and_every_point_stores_its_scales(trained_transformer):
    converted, x, loss = trained_transformer
    assert np.isfinite(loss)
    points = {p.name: p for p in nf.fixed_points(converted)}
    assert {"emb/embeddings", "att/scores", "att/softmax", "att_query/kernel", "att_attention_output/activation",
            "ln1/gamma", "ffn2/kernel", "head/activation"} <= set(points)
    assert all(p.grad_scale != 0 for p in points.values())  # every gradient point quantized a gradient
    assert points["att/softmax"].data_scale <= 0  # probabilities: max in (0, 1]


def test_keras_file_round_trip_predicts_the_same(trained_transformer, tmp_path):
    converted, x, _ = trained_transformer
    converted.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), converted.predict(x, verbose=0))
    assert [(p.name, p.data_config, p.data_scale) for p in nf.fixed_points(loaded)] == \
           [(p.name, p.data_config, p.data_scale) for p in nf.fixed_points(converted)]
    assert isinstance(loaded.get_layer("att").query_dense, nf.EinsumDense)


def test_fixed_model_saver_restores_into_a_fresh_conversion(trained_transformer, tmp_path):
    converted, x, _ = trained_transformer
    nf.fixed_model_saver(converted, fixed_weight=True).save(tmp_path / "fixed")
    fresh = nf.fixed_model(transformer_block(), TRANSFORMER_CFG)
    nf.restore_fixed_model(fresh, tmp_path / "fixed")
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), converted.predict(x, verbose=0))


def test_strategy_config_reaches_the_converted_layers(rng):
    c = 0.375
    strategy = {"by_name": {"d2": {"name": "noise_strategy",
                                   "activation": {"data_config": {"post": {"type": "uniform", "min": c, "max": c}}}}}}
    inputs = keras.Input((6,))
    model = randomize(keras.Model(inputs, L.Dense(3, name="d2")(L.Dense(4, name="d1")(inputs))), rng)
    converted = nf.fixed_model(model, strategy_config=strategy)
    assert isinstance(converted.get_layer("d2").strategy, nf.NoiseStrategy)
    assert converted.get_layer("d1").strategy is None
    x = rng.standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_array_equal(converted(x, training=True).numpy(), model(x).numpy() + np.float32(c))
    np.testing.assert_array_equal(converted(x, training=False).numpy(), model(x).numpy())


def test_thdh_optimizer_keeps_converted_weights_on_their_storage_grid(rng):
    storage = {"weight": {"storage_config": {"bit_width": 10, "scale": 1}}}
    cfg = {"by_type": {"EinsumDense": storage, "Dense": storage, "LayerNormalization": storage}}
    converted = nf.fixed_model(randomize(transformer_block(), rng), cfg)
    opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(0.1), converted,
                                     update_config={"bit_width": 12, "scale": -2})
    assert {"att_query/kernel", "att_attention_output/bias", "ffn2/kernel", "ln2/gamma", "head/bias"} <= \
        set(opt.storage_scales())
    assert "emb/embeddings" not in opt.storage_scales()  # no storage config: float master weights
    converted.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.integers(0, 20, (8, 6)).astype(np.int32)
    converted.fit(x, rng.integers(0, 3, 8), batch_size=4, epochs=1, verbose=0)
    for layer in (converted.get_layer("att").query_dense, converted.get_layer("ffn2"), converted.get_layer("head")):
        np.testing.assert_array_equal(layer.kernel.numpy(), ref_quantize(layer.kernel.numpy(), 10, 1))


def test_attention_projections_are_addressed_by_name_in_a_conversion():
    w5 = {"weight": {"data_config": {"bit_width": 5, "training": "auto", "not_training": "auto"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every by_name key matches
        converted = nf.fixed_model(transformer_block(), {"by_name": {"att_value": w5, "att": {"activation": w5["weight"]}}})
    configs = nf.layer_fixed_configs(converted)
    assert configs["att_value"].weight.data.bit_width == 5 and configs["att_query"].is_float
    assert configs["att"].activation.data.bit_width == 5
    assert nf.unmatched_by_name(converted, {"by_name": {"att_value": w5, "att_nope": w5}}) == ["att_nope"]


class NoConfig(keras.layers.Layer):
    def __init__(self, units):
        super().__init__(name="no_config")
        self.dense = L.Dense(units)

    def call(self, x):
        return self.dense(x)


def test_a_stateless_layer_that_cannot_be_rebuilt_is_shared(rng):
    inputs = keras.Input((3,))
    lam = L.Lambda(lambda t: t * 2, name="lam")  # Keras refuses to deserialize a Python lambda
    model = randomize(keras.Model(inputs, lam(L.Dense(4, name="d")(inputs))), rng)
    converted = nf.fixed_model(model)
    assert converted.get_layer("lam") is lam and isinstance(converted.get_layer("d"), nf.Dense)
    assert_same_model(model, converted, rng.standard_normal((2, 3)).astype(np.float32))


def test_a_layer_that_cannot_be_rebuilt_and_an_unbuilt_model_are_clear_errors():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, NoConfig(2)(inputs))
    with pytest.raises(nf.ConversionError, match=r"layer 'no_config' \(NoConfig\) cannot be rebuilt from its "
                                                 r"get_config\(\): TypeError: .*give the layer a get_config\(\)"):
        nf.fixed_model(model)
    with pytest.raises(nf.ConversionError, match="model 'seq' is not built; give it a keras.Input"):
        nf.fixed_model(keras.Sequential([L.Dense(2)], name="seq"))
