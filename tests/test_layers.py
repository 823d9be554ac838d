"""Fixed layers: float equivalence with Keras, the four quantities, modes and gradients."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import nics_fix as nf
from tests.test_quant import ref_auto_scale, ref_quantize


def point_cfg(bits, training, not_training="fixed", grad_bits=None, grad_training="none"):
    cfg = {"data_config": {"bit_width": bits, "training": training, "not_training": not_training}}
    if grad_bits is not None:
        cfg["gradient_config"] = {"bit_width": grad_bits, "training": grad_training}
    return cfg


# ---------------------------------------------------------------------------
# All-none configs are Keras, bit for bit
# ---------------------------------------------------------------------------

LAYER_CASES = [
    ("Dense", dict(units=5, activation="relu"), (6, 7)),
    ("Conv2D", dict(filters=3, kernel_size=3, padding="same"), (2, 6, 6, 2)),
    ("DepthwiseConv2D", dict(kernel_size=3), (2, 6, 6, 3)),
    ("BatchNormalization", dict(), (8, 4)),
    ("ReLU", dict(), (4, 5)),
]


@pytest.mark.parametrize("name, kwargs, shape", LAYER_CASES)
def test_float_config_is_keras_to_the_bit(name, kwargs, shape, rng):
    x = tf.constant(rng.standard_normal(shape).astype(np.float32))
    ours = getattr(nf, name)(**kwargs)
    theirs = getattr(keras.layers, name)(**kwargs)
    ours.build(shape)
    theirs.build(shape)
    for v in theirs.weights:  # random non-trivial weights, identical in both
        v.assign(rng.standard_normal(v.shape).astype(np.float32) * 0.5 + (1.0 if "variance" in v.name else 0.0))
    by_name = {v.name: v for v in ours.weights}
    for v in theirs.weights:
        by_name[v.name].assign(v)
    for training in (True, False):
        results = []
        for layer in (ours, theirs):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=training)
                loss = tf.reduce_sum(y * y)
            grads = tape.gradient(loss, [x] + layer.trainable_weights)
            results.append((y.numpy(), [g.numpy() for g in grads]))
        np.testing.assert_array_equal(results[0][0], results[1][0])
        for a, b in zip(results[0][1], results[1][1]):
            np.testing.assert_array_equal(a, b)
    # Non-trainable state (BN moving statistics) updated identically.
    for v in theirs.non_trainable_weights:
        np.testing.assert_array_equal(by_name[v.name].numpy(), v.numpy())


def test_float_model_trains_exactly_like_keras(rng):
    x = rng.standard_normal((32, 6)).astype(np.float32)
    y = rng.integers(0, 3, 32)

    def build(ns):
        keras.utils.set_random_seed(5)
        model = keras.Sequential([keras.Input((6,)), ns.Dense(8, activation="relu"), ns.Dense(3)])
        model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    ours, theirs = build(nf), build(keras.layers)
    ours.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    theirs.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    for a, b in zip(ours.trainable_weights, theirs.trainable_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ---------------------------------------------------------------------------
# Forward: weights and activations, and the four modes
# ---------------------------------------------------------------------------


def make_dense(cfg, rng, units=4, features=6, **kwargs):
    layer = nf.Dense(units, fixed_config=cfg, name="d", **kwargs)
    layer.build((None, features))
    layer.kernel.assign(rng.standard_normal((features, units)).astype(np.float32))
    if layer.bias is not None:
        layer.bias.assign(rng.standard_normal(units).astype(np.float32) * 0.1)
    return layer


def test_weights_and_activation_quantized_with_auto_scales(rng):
    cfg = {"weight": point_cfg(5, "auto"), "activation": point_cfg(6, "auto")}
    layer = make_dense(cfg, rng)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    y = layer(x, training=True).numpy()
    w, b = layer.kernel.numpy(), layer.bias.numpy()
    sw, sb = ref_auto_scale(w), ref_auto_scale(b)
    wq, bq = ref_quantize(w, 5, sw), ref_quantize(b, 5, sb)
    pre = (tf.matmul(x, wq) + bq).numpy()
    sa = ref_auto_scale(pre)
    np.testing.assert_array_equal(y, ref_quantize(pre, 6, sa))
    points = {p.name: p for p in nf.fixed_points(keras.Sequential([layer]))}
    assert points["d/kernel"].data_scale == sw
    assert points["d/bias"].data_scale == sb
    assert points["d/activation"].data_scale == sa


def test_fixed_mode_uses_the_stored_scale_in_evaluation(rng):
    cfg = {"weight": point_cfg(4, "auto", "fixed")}
    layer = make_dense(cfg, rng)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    layer(x, training=True)
    stored = ref_auto_scale(layer.kernel.numpy())
    layer.kernel.assign(layer.kernel.numpy() * 8)  # would change an auto scale by 3
    y = layer(x, training=False).numpy()
    assert int(layer.fixed_points["kernel"].data_scale.numpy()) == stored
    wq = ref_quantize(layer.kernel.numpy(), 4, stored)
    bq = ref_quantize(layer.bias.numpy(), 4, int(layer.fixed_points["bias"].data_scale.numpy()))
    np.testing.assert_array_equal(y, (tf.matmul(x, wq) + bq).numpy())


def test_integer_mode_stores_that_scale_and_none_is_float(rng):
    cfg = {"weight": point_cfg(4, -1, "none")}
    layer = make_dense(cfg, rng)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    y_train = layer(x, training=True).numpy()
    assert int(layer.fixed_points["kernel"].data_scale.numpy()) == -1
    wq, bq = ref_quantize(layer.kernel.numpy(), 4, -1), ref_quantize(layer.bias.numpy(), 4, -1)
    np.testing.assert_array_equal(y_train, (tf.matmul(x, wq) + bq).numpy())
    y_eval = layer(x, training=False).numpy()
    np.testing.assert_array_equal(y_eval, (tf.matmul(x, layer.kernel) + layer.bias).numpy())


def test_evaluate_and_predict_use_not_training_modes(rng):
    cfg = {"activation": point_cfg(3, "none", 0)}
    model = keras.Sequential([keras.Input((6,)), make_dense(cfg, rng)])
    x = rng.standard_normal((4, 6)).astype(np.float32)
    raw = (tf.matmul(x, model.layers[0].kernel) + model.layers[0].bias).numpy()
    np.testing.assert_array_equal(model.predict(x, verbose=0), ref_quantize(raw, 3, 0))
    np.testing.assert_array_equal(model(x, training=True).numpy(), raw)


# ---------------------------------------------------------------------------
# Backward: weight gradients and activation gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "fixed", -3, "none"])
def test_weight_gradient_is_the_quantized_upstream_gradient(mode, rng):
    cfg = {"weight": {"gradient_config": {"bit_width": 4, "training": mode}}}
    layer = make_dense(cfg, rng, use_bias=False)
    layer.fixed_points["kernel"].grad_scale.assign(-2)  # what "fixed" will read
    x = tf.constant(rng.standard_normal((5, 6)).astype(np.float32))
    upstream = rng.standard_normal((5, 4)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True) * upstream)
    grad = tape.gradient(loss, layer.kernel).numpy()
    full = tf.matmul(x, upstream, transpose_a=True).numpy()  # dL/dW at the point
    scale = {"auto": ref_auto_scale(full), "fixed": -2, -3: -3}.get(mode)
    want = full if mode == "none" else ref_quantize(full, 4, scale)
    np.testing.assert_array_equal(grad, want)
    stored = int(layer.fixed_points["kernel"].grad_scale.numpy())
    assert stored == (scale if scale is not None else -2)


@pytest.mark.parametrize("mode", ["auto", 1])
def test_activation_gradient_reaching_the_input_is_quantized(mode, rng):
    cfg = {"activation": {"gradient_config": {"bit_width": 5, "training": mode}}}
    layer = make_dense(cfg, rng, use_bias=False)
    x = tf.constant(rng.standard_normal((5, 6)).astype(np.float32))
    upstream = rng.standard_normal((5, 4)).astype(np.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * upstream)
    scale = ref_auto_scale(upstream) if mode == "auto" else mode
    gq = ref_quantize(upstream, 5, scale)
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(),
                                  tf.matmul(gq, layer.kernel, transpose_b=True).numpy())
    np.testing.assert_array_equal(tape.gradient(loss, layer.kernel).numpy(),
                                  tf.matmul(x, gq, transpose_a=True).numpy())
    assert int(layer.fixed_points["activation"].grad_scale.numpy()) == scale


def test_ste_masks_gradients_of_clipped_weights(rng):
    cfg = {"weight": point_cfg(4, -1)}  # range [-0.5, 0.4375]: most N(0,1) weights clip
    layer = make_dense(cfg, rng, use_bias=False)
    x = tf.constant(rng.standard_normal((5, 6)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True))
    grad = tape.gradient(loss, layer.kernel).numpy()
    w = layer.kernel.numpy()
    inside = (w >= -0.5) & (w <= 0.4375)
    assert 0 < inside.sum() < inside.size
    full = tf.matmul(x, tf.ones((5, 4)), transpose_a=True).numpy()
    np.testing.assert_array_equal(grad, np.where(inside, full, 0.0))


def test_input_gradient_matches_finite_differences(rng):
    """The quantized-weight layer is linear in x: its gradient is checkable numerically."""
    cfg = {"weight": point_cfg(6, "auto", "auto")}
    layer = make_dense(cfg, rng)
    x0 = rng.standard_normal((1, 6)).astype(np.float64)
    r = rng.standard_normal((1, 4))

    def loss(x):
        return float(np.sum(layer(tf.constant(x, tf.float32), training=True).numpy() * r))

    x = tf.constant(x0, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = tf.reduce_sum(layer(x, training=True) * r.astype(np.float32))
    analytic = tape.gradient(value, x).numpy()
    eps = 1e-2
    numeric = np.array([[(loss(x0 + eps * e) - loss(x0 - eps * e)) / (2 * eps)
                         for e in np.eye(6)]])
    np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-3)


def test_scales_are_updated_inside_model_fit(rng, fix8):
    with nf.fixed_scope("net", {"by_type": {"Dense": fix8}}):
        model = keras.Sequential([keras.Input((6,)), nf.Dense(4, name="d1"), nf.Dense(2, name="d2")])
    model.compile("sgd", "mse")
    before = {p.name: (p.data_scale, p.grad_scale) for p in nf.fixed_points(model)}
    assert all(v == (0, 0) for v in before.values())
    x = rng.standard_normal((16, 6)).astype(np.float32) * 40
    model.fit(x, rng.standard_normal((16, 2)).astype(np.float32), epochs=1, batch_size=16, verbose=0)
    after = {p.name: (p.data_scale, p.grad_scale) for p in nf.fixed_points(model)}
    assert after["d1/activation"][0] >= 4  # inputs scaled by 40
    assert all(g != 0 for _, g in after.values())  # every gradient point stored a scale


@pytest.mark.parametrize("jit", [False, True])
def test_model_fit_with_and_without_xla_gives_same_scales(jit, rng, fix8):
    with nf.fixed_scope("net", {"by_type": {"Dense": fix8}}):
        model = keras.Sequential([keras.Input((6,)), nf.Dense(4, name="d1")])
    model.compile("sgd", "mse", jit_compile=jit)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    w0 = model.layers[0].kernel.numpy()
    model.train_on_batch(x, np.zeros((8, 4), np.float32))
    assert int(model.layers[0].fixed_points["kernel"].data_scale.numpy()) == ref_auto_scale(w0)


def test_stochastic_rounding_is_for_training_evaluation_rounds_to_nearest(rng):
    cfg = {"activation": {"data_config": {"bit_width": 4, "training": 0, "not_training": 0,
                                          "rounding": "stochastic"}}}
    layer = nf.Quantize(fixed_config=cfg)
    x = rng.uniform(-1, 1, (64, 16)).astype(np.float32)
    np.testing.assert_array_equal(layer(x, training=False).numpy(), ref_quantize(x, 4, 0))
    train = layer(x, training=True).numpy()
    floor = ref_quantize(x, 4, 0, "floor")
    assert np.all((train == floor) | (train == floor + 0.125))
    assert not np.array_equal(train, ref_quantize(x, 4, 0))
