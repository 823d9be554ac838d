"""Evaluation reuses each quantized weight until the weight or its scale changes.

The reference quantizes the layer's current float weights with the scale the
mode gives (ceil(log2(max|w|)) computed here from the float64 exponent for
``auto``, the stored variable for ``fixed``) and multiplies in NumPy float64:
predictions must equal it bit for bit after every kind of write.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import nics_fix as nf
from nics_fix import kernels
from nics_fix.weight_cache import clear_weight_caches


def _scale_of(w) -> int:
    m = float(np.max(np.abs(w)))
    mantissa, exponent = np.frexp(m)
    return int(exponent - 1 if mantissa == 0.5 else exponent)


def _q(w, bits, scale):
    step = 2.0 ** (scale - bits + 1)
    return np.clip(np.rint(np.float64(w) / step) * step, -2.0 ** scale, 2.0 ** scale - step)


def _model(not_training="auto", jit=False):
    weight = {"data_config": {"bit_width": 6, "training": "auto", "not_training": not_training}}
    model = keras.Sequential([keras.Input((5,)), nf.Dense(3, fixed_config={"weight": weight})])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", jit_compile=jit)
    return model


def _reference(model, x):
    layer = model.layers[0]
    kernel, bias = (np.asarray(v) for v in (layer.kernel, layer.bias))
    if layer.fixed_config.weight.data.not_training == "auto":
        sk, sb = _scale_of(kernel), _scale_of(bias)
    else:
        sk, sb = (int(layer.fixed_points[k].data_scale.numpy()) for k in ("kernel", "bias"))
    out = np.float64(x) @ _q(kernel, 6, sk) + _q(bias, 6, sb)
    return out.astype(np.float32)


def _current(model):
    return bool(model.layers[0].fixed_points["kernel"].eval_cache.current.numpy())


@pytest.fixture(params=["fused", "cond"])
def cache_kind(request):
    """The two ways a copy is kept: one fused op (nics_fix's kernel), or a tf.cond."""
    if request.param == "fused" and kernels.cached_quantize_op() is None:
        pytest.skip(f"no fused kernel here: {kernels.status()}")
    with kernels.disabled() if request.param == "cond" else contextlib.nullcontext():
        yield request.param


@pytest.fixture
def data(rng):
    # few inputs, small integers: every product and sum is exact in float32
    x = rng.integers(-2, 3, (4, 5)).astype(np.float32)
    y = rng.standard_normal((4, 3)).astype(np.float32)
    return x, y


@pytest.mark.parametrize("jit", [False, True])
def test_cached_predictions_equal_fresh_quantization_after_every_kind_of_write(data, tmp_path, jit, cache_kind):
    x, y = data
    model = _model(jit=jit)
    model.layers[0].bias.assign(np.float32([0.3, -0.2, 0.05]))
    first = model.predict_on_batch(x)
    assert _current(model)
    np.testing.assert_array_equal(first, _reference(model, x))
    np.testing.assert_array_equal(model.predict_on_batch(x), first)  # from the copy

    model.train_on_batch(x, y)  # the optimizer moves the weights
    assert not _current(model)
    trained = model.predict_on_batch(x)
    assert not np.array_equal(trained, first)
    np.testing.assert_array_equal(trained, _reference(model, x))

    model.set_weights([w * 3 for w in model.get_weights()])
    assert not _current(model)
    np.testing.assert_array_equal(model.predict_on_batch(x), _reference(model, x))

    model.layers[0].kernel.assign(np.full((5, 3), 0.75, np.float32))
    np.testing.assert_array_equal(model.predict_on_batch(x), _reference(model, x))

    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    model.layers[0].kernel.assign(np.zeros((5, 3), np.float32))
    model.predict_on_batch(x)
    model.load_weights(path)
    np.testing.assert_array_equal(model.predict_on_batch(x), _reference(model, x))
    assert float(np.max(np.abs(model.predict_on_batch(x)))) > 0


def test_fixed_scale_change_drops_the_copy(data, cache_kind):
    x, _ = data
    model = _model(not_training="fixed")
    layer = model.layers[0]
    layer.fixed_points["kernel"].data_scale.assign(0)
    layer.fixed_points["bias"].data_scale.assign(0)
    model.predict_on_batch(x)
    layer.fixed_points["kernel"].data_scale.assign(-2)  # a coarser range: many weights saturate
    np.testing.assert_array_equal(model.predict_on_batch(x), _reference(model, x))


def test_writes_around_keras_need_clear_weight_caches(data, cache_kind):
    x, _ = data
    model = _model()
    model.predict_on_batch(x)
    model.layers[0].kernel.value.assign(np.full((5, 3), 0.5, np.float32))  # the raw tf.Variable
    assert _current(model)
    clear_weight_caches(model)
    np.testing.assert_array_equal(model.predict_on_batch(x), _reference(model, x))


def test_evaluation_under_a_tape_keeps_gradients_and_drops_the_copy(data, cache_kind):
    x, _ = data
    model = _model()
    model.predict_on_batch(x)
    kernel = model.layers[0].kernel
    with tf.GradientTape() as tape:
        out = model(x, training=False)
    grad = tape.gradient(out, kernel)
    assert not _current(model)
    # every kernel element is inside its auto range: the straight-through gradient is x^T 1
    np.testing.assert_array_equal(grad.numpy(), np.repeat(x.sum(0)[:, None], 3, axis=1))


def test_float_training_still_drops_the_copy_of_quantized_evaluation(data, cache_kind):
    x, y = data
    weight = {"data_config": {"bit_width": 6, "training": "none", "not_training": 1}}
    model = keras.Sequential([keras.Input((5,)), nf.Dense(3, fixed_config={"weight": weight})])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    before = model.predict_on_batch(x)
    model.train_on_batch(x, y)
    after = model.predict_on_batch(x)
    layer = model.layers[0]
    kernel, bias = np.asarray(layer.kernel), np.asarray(layer.bias)
    np.testing.assert_array_equal(after, (np.float64(x) @ _q(kernel, 6, 1) + _q(bias, 6, 1)).astype(np.float32))
    assert not np.array_equal(before, after)


def test_dynamic_and_strategy_points_are_not_cached():
    dynamic = {"data_config": {"bit_width": 8, "training": "auto", "not_training": "dynamic"}}
    layer = nf.Dense(2, fixed_config={"weight": dynamic})
    layer.build((None, 3))
    assert layer.fixed_points["kernel"].eval_cache is None
    assert layer.fixed_points["activation"].eval_cache is None


def _op_types(model, x) -> set:
    graph = tf.function(lambda v: model(v, training=False)).get_concrete_function(
        tf.TensorSpec(x.shape, tf.float32)).graph
    return {op.type for op in graph.get_operations()}


LAYERS = {  # name: (bit width, input shape, layer builder); 12 channels: the 8 lanes and a tail
    "dense-5bit": (5, (7,), lambda cfg: nf.Dense(12, fixed_config=cfg)),
    "dense-2bit": (2, (7,), lambda cfg: nf.Dense(12, fixed_config=cfg)),
    "conv-24bit": (24, (6, 6, 3), lambda cfg: nf.Conv2D(12, 3, fixed_config=cfg)),
}


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("not_training", ["auto", "fixed", -1])
def test_fused_copy_equals_the_cond_copy_in_values_scales_and_refreshes(rng, not_training, granularity, layer):
    if kernels.cached_quantize_op() is None:
        pytest.skip(f"no fused kernel here: {kernels.status()}")
    bits, input_shape, make = LAYERS[layer]
    weight = {"data_config": {"bit_width": bits, "training": "auto", "not_training": not_training,
                              "granularity": granularity}}
    x = rng.standard_normal((6, *input_shape)).astype(np.float32)
    weights = None
    models = {}
    for kind in ("fused", "cond"):
        with kernels.disabled() if kind == "cond" else contextlib.nullcontext():
            model = keras.Sequential([keras.Input(input_shape), make({"weight": weight})])
            if weights is None:
                weights = [(rng.standard_normal(w.shape) * 2.0 ** rng.integers(-6, 6, w.shape[-1])).astype(np.float32)
                           if w.dtype == np.float32 and w.ndim else w for w in model.get_weights()]
                weights[0].reshape(-1)[3] = np.inf  # an Inf weight: its channel's auto scale ignores it
            model.set_weights(weights)
            for key in ("kernel", "bias"):
                point = model.layers[0].fixed_points[key]
                point.data_scale.assign(np.arange(point.data_scale.shape.num_elements() or 1, dtype=np.int32)
                                        .reshape(point.data_scale.shape) % 3 - 1)
            ops = _op_types(model, x)
            assert ("NicsFixCachedQuantize" in ops) == (kind == "fused")
            assert ("If" in ops or "StatelessIf" in ops) == (kind == "cond")
            models[kind] = model

    def state(model):
        points = model.layers[0].fixed_points
        return [model.predict_on_batch(x)] + [points[k].data_scale.numpy() for k in ("kernel", "bias")]

    for step in range(3):
        for kind in ("fused", "cond"):
            with kernels.disabled() if kind == "cond" else contextlib.nullcontext():
                if step == 2:  # a write drops both copies
                    models[kind].layers[0].kernel.assign(models[kind].layers[0].kernel * -3.0)
                got = state(models[kind])
            if kind == "fused":
                fused = got
            else:
                for a, b in zip(fused, got):
                    np.testing.assert_array_equal(a, b)
    assert bool(models["fused"].layers[0].fixed_points["kernel"].eval_cache.current.numpy())


@pytest.mark.parametrize("scale, center", [(True, True), (False, False)])
def test_batch_normalization_without_gamma_or_beta_caches_its_multiplier_and_offset(rng, scale, center):
    q8 = {"data_config": {"bit_width": 8, "training": "auto", "not_training": "fixed"}}
    bn = nf.BatchNormalization(scale=scale, center=center, fixed_config={"weight": q8, "activation": q8})
    x = (rng.standard_normal((5, 6)) * 3 + 1).astype(np.float32)
    bn(x, training=True)
    bn.moving_variance.assign(rng.uniform(0.5, 4.0, 6).astype(np.float32))
    with tf.GradientTape():
        want = bn(x, training=False).numpy()
    assert not bool(bn._nf_scale_shift_cache.current.numpy())
    np.testing.assert_array_equal(bn(x, training=False).numpy(), want)
    assert bool(bn._nf_scale_shift_cache.current.numpy())
    np.testing.assert_array_equal(bn(x, training=False).numpy(), want)


def test_a_batch_normalization_copy_made_under_xla_never_serves_the_cpu_ops(rng):
    """XLA's rsqrt and products round differently: each path computes its own multiplier and offset."""
    q8 = {"data_config": {"bit_width": 8, "training": "auto", "not_training": "auto"}}
    model = keras.Sequential([keras.Input((256,)), nf.BatchNormalization(fixed_config={"weight": q8, "activation": q8})])
    model.compile(loss="mse", jit_compile=True)
    bn = model.layers[0]
    bn.moving_variance.assign(rng.uniform(0.1, 9.0, 256).astype(np.float32))
    bn.moving_mean.assign(rng.standard_normal(256).astype(np.float32))
    bn.gamma.assign(rng.uniform(0.3, 3.0, 256).astype(np.float32))
    x = (rng.standard_normal((4, 256)) * 3).astype(np.float32)
    model.predict_on_batch(x)  # XLA: does not fill the copy
    assert not bool(bn._nf_scale_shift_cache.current.numpy())
    with tf.GradientTape():
        want = bn(x, training=False).numpy()  # the CPU ops, afresh
    np.testing.assert_array_equal(bn(x, training=False).numpy(), want)  # fills the copy on the CPU path
    np.testing.assert_array_equal(bn(x, training=False).numpy(), want)


def test_batch_normalization_keeps_its_multiplier_and_offset_until_weights_or_statistics_move(rng, cache_kind):
    q8 = {"data_config": {"bit_width": 8, "training": "auto", "not_training": "auto"}}
    model = keras.Sequential([keras.Input((3, 4)), nf.BatchNormalization(fixed_config={"weight": q8, "activation": q8})])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    bn = model.layers[0]
    cache = bn._nf_scale_shift_cache
    x = (rng.standard_normal((8, 3, 4)) * 3 + 1).astype(np.float32)
    y = rng.standard_normal((8, 3, 4)).astype(np.float32)

    def uncached():
        with tf.GradientTape():  # a recording tape: computed afresh, through the plain ops
            return bn(x, training=False).numpy()

    first = model.predict_on_batch(x)
    assert bool(cache.current.numpy())
    np.testing.assert_array_equal(first, uncached())
    np.testing.assert_array_equal(model.predict_on_batch(x), first)  # from the copies

    writes = [  # (write, whether the output changes)
        (lambda: model.train_on_batch(x, y), True),  # moving statistics, gamma and beta move
        (lambda: bn.moving_variance.assign(bn.moving_variance * 4.0), True),
        (lambda: bn.moving_mean.assign(bn.moving_mean - 0.5), True),
        (lambda: bn.gamma.assign(bn.gamma * -2.0), True),
        (lambda: bn.fixed_points["beta"].data_scale.assign(-3), False),  # auto: recomputed, same value
        (lambda: model.set_weights([w * 0.5 for w in model.get_weights()]), True),
    ]
    before = first
    for write, changes in writes:
        model.predict_on_batch(x)
        write()
        assert not bool(cache.current.numpy())
        got = model.predict_on_batch(x)
        assert bool(cache.current.numpy())
        np.testing.assert_array_equal(got, uncached())
        assert np.array_equal(got, before) != changes
        before = got
