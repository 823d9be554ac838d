"""THDH: stored weights in fixed point, the update path, the gradient buffer, counters."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import nics_fix as nf
from nics_fix.optimizers import floor_power_of_two_tensor, parse_format
from nics_fix.quant import quantization_step

STEP8 = 2.0 ** -7  # 8 bits at scale 0: grid step, range [-1, 1 - STEP8]


def storage_cfg(bit_width=8, scale=0, rounding="nearest", layer_type="Dense"):
    return {"by_type": {layer_type: {"weight": {"storage_config": {
        "bit_width": bit_width, "scale": scale, "rounding": rounding}}}}}


def one_dense(shape=(2, 5), cfg=None, name="d", use_bias=True):
    with nf.fixed_scope("t", cfg if cfg is not None else storage_cfg()):
        model = keras.Sequential([keras.Input((shape[0],)), nf.Dense(shape[1], name=name, use_bias=use_bias)])
    return model, model.layers[0]


def on_grid(w, bit_width, scale):
    w = np.asarray(w)
    return np.array_equal(nf.fixed_point_quantize(w, bit_width, scale).numpy().view(np.int32), w.view(np.int32))


# ----------------------------------------------------------------------------
# Power-of-two learning rate
# ----------------------------------------------------------------------------


def test_floor_power_of_two_and_shift():
    assert [nf.floor_power_of_two(v) for v in (0.1, 0.3, 1.0, 0.25, 3.0)] == [0.0625, 0.25, 1.0, 0.25, 2.0]
    assert [nf.lr_shift(v) for v in (0.1, 0.3, 1.0, 0.0625)] == [4, 2, 0, 4]
    got = floor_power_of_two_tensor(tf.constant([0.1, 0.3, 1.0, 0.25], tf.float32)).numpy()
    np.testing.assert_array_equal(got, [0.0625, 0.25, 1.0, 0.25])
    with pytest.raises(ValueError):
        nf.floor_power_of_two(0.0)


@pytest.mark.parametrize("lr,expected", [(0.1, 0.0625), (0.3, 0.25), (1.0, 1.0)])
def test_power_of_two_lr_rounds_down_and_warns(lr, expected, caplog):
    model, _ = one_dense()
    with caplog.at_level(logging.WARNING, logger="nics_fix"):
        opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(lr), model, power_of_two_lr=True)
    assert float(opt.learning_rate) == expected
    warnings = [r.getMessage() for r in caplog.records if "power_of_two_lr" in r.getMessage()]
    if lr == expected:
        assert not warnings
    else:
        assert len(warnings) == 1 and f"{lr:g}" in warnings[0] and f"{expected:g}" in warnings[0]
    # Later assignments (LR callbacks) are rounded too.
    opt.learning_rate = 0.3
    assert float(opt.learning_rate) == 0.25


def test_power_of_two_lr_schedule():
    model, _ = one_dense()
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(schedule), model, power_of_two_lr=True)
    assert float(opt.learning_rate) == 0.0625  # 0.1 at step 0
    opt.inner_optimizer.iterations.assign(1)
    assert float(opt.learning_rate) == 0.03125  # 0.05 at step 1


# ----------------------------------------------------------------------------
# Stored weights on the grid
# ----------------------------------------------------------------------------


def test_stored_weights_on_grid_from_step_zero_and_after_steps():
    cfg = {"by_name": {
        "a": {"weight": {"storage_config": {"bit_width": 8, "scale": 0}}},
        "b": {"weight": {"storage_config": {"bit_width": 6, "scale": "auto", "rounding": "stochastic"}}},
    }}
    with nf.fixed_scope("t", cfg):
        model = keras.Sequential([keras.Input((4,)), nf.Dense(6, name="a", activation="relu"),
                                  nf.Dense(3, name="b"), nf.Dense(2, name="c")])
    float_before = model.layers[2].kernel.numpy().copy()
    opt = nf.fixed_storage_optimizer(keras.optimizers.Adam(0.01), model, seed=3)
    scales = opt.storage_scales()
    assert set(scales) == {"a/kernel", "a/bias", "b/kernel", "b/bias"}  # c has no storage config

    def check():
        scales = opt.storage_scales()
        for layer, bits in ((model.layers[0], 8), (model.layers[1], 6)):
            for key in ("kernel", "bias"):
                assert on_grid(getattr(layer, key).numpy(), bits, scales[f"{layer.name}/{key}"]), (layer.name, key)

    check()  # initial weights snapped at construction
    np.testing.assert_array_equal(model.layers[2].kernel.numpy(), float_before)  # float master weights
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        check()
    assert scales["a/kernel"] == 0
    assert not np.array_equal(model.layers[2].kernel.numpy(), float_before)  # c still trains (in float)


def test_momentum_state_in_fixed_point():
    model, layer = one_dense()
    opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(0.25, momentum=0.9), model,
                                     state_config={"bit_width": 6, "scale": "auto"})
    g = tf.constant(np.random.default_rng(1).normal(size=(2, 5)).astype("float32"))
    opt.apply_gradients([(g, layer.kernel)])
    slots = opt._nf.slots
    assert len(slots) == 2  # kernel and bias momentum; iteration and learning rate are not state
    for slot, scale in slots:
        assert on_grid(slot.numpy(), 6, int(scale.numpy()))
    kernel_slot = next(s for s, _ in slots if s.shape == (2, 5)).numpy()
    assert np.count_nonzero(kernel_slot) > 0


# ----------------------------------------------------------------------------
# Rounding of the stored weight: nearest and stochastic
# ----------------------------------------------------------------------------


def _set_and_step(opt, layer, w0, update):
    """Set the kernel to w0 and apply SGD(lr=1) with gradient -update, so new = w0 + update."""
    layer.kernel.assign(w0)
    opt.apply_gradients([(tf.constant(-update, tf.float32), layer.kernel)])
    return layer.kernel.numpy()


def test_nearest_small_update_leaves_weight_unchanged_and_is_counted():
    model, layer = one_dense((50, 40))
    opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(1.0), model)
    rng = np.random.default_rng(2)
    w0 = nf.fixed_point_quantize(rng.uniform(-0.9, 0.9, size=(50, 40)), 8, 0).numpy()
    frac = rng.uniform(-0.49, 0.49, size=(50, 40))
    frac[0, :10] = 0.0  # no update at all: neither nonzero nor "rounded to zero"
    opt.reset_counters()
    w1 = _set_and_step(opt, layer, w0, (frac * STEP8).astype("float32"))
    np.testing.assert_array_equal(w1, w0)
    counters = opt.update_counters()["d/kernel"]
    assert counters["zero_frac"] == pytest.approx(1990 / 2000)
    assert counters["nonzero_frac"] == pytest.approx(1990 / 2000)
    assert counters["saturate_frac"] == 0.0
    # And just above half a step it moves by exactly one step.
    w2 = _set_and_step(opt, layer, w0, np.full((50, 40), 0.51 * STEP8, "float32"))
    np.testing.assert_array_equal(w2 - w0, np.full((50, 40), STEP8, "float32"))


def test_stochastic_rounding_expected_change_equals_update():
    shape = (100, 200)
    model, layer = one_dense(shape, storage_cfg(rounding="stochastic"))
    opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(1.0), model, seed=11)
    rng = np.random.default_rng(5)
    frac = rng.uniform(0.0, 1.0, size=shape)  # update = frac steps, one per element
    update = (frac * STEP8).astype("float32")
    w0 = np.zeros(shape, "float32")
    steps = 5
    total_change = 0.0
    moved = []
    for _ in range(steps):
        w1 = _set_and_step(opt, layer, w0, update)
        change = (w1 - w0) / STEP8
        assert set(np.unique(change)) <= {0.0, 1.0}  # only the two neighbours
        total_change += change.sum()
        moved.append(change)
    expected = steps * frac.sum()
    sd = np.sqrt(steps * np.sum(frac * (1 - frac)))  # sum of independent Bernoulli variances
    assert abs(total_change - expected) < 5 * sd, (total_change, expected, sd)
    assert not np.array_equal(moved[0], moved[1])  # a fresh draw every step
    # Reproducible for a given seed.
    keras.backend.clear_session()
    model2, layer2 = one_dense(shape, storage_cfg(rounding="stochastic"))
    opt2 = nf.fixed_storage_optimizer(keras.optimizers.SGD(1.0), model2, seed=11)
    np.testing.assert_array_equal((_set_and_step(opt2, layer2, w0, update) - w0) / STEP8, moved[0])


def test_stochastic_small_updates_survive_in_expectation_with_fit():
    """Many steps of an update of 1/8 step: nearest never moves, stochastic drifts by the update."""
    n = 4000
    results = {}
    for rounding in ("nearest", "stochastic"):
        keras.backend.clear_session()
        cfg = storage_cfg(rounding=rounding)
        with nf.fixed_scope("t", cfg):
            model = keras.Sequential([keras.Input((1,)), nf.Dense(n, name="d", use_bias=False,
                                                                  kernel_initializer="zeros")])
        opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(1.0), model, seed=4)
        # loss = -mean over batch of sum(y) * STEP8/8  => dL/dW = -STEP8/8 per element (x = 1)
        model.compile(optimizer=opt, loss=lambda y, p: -tf.reduce_sum(p, axis=-1) * (STEP8 / 8))
        x = np.ones((16, 1), "float32")
        model.fit(x, np.zeros((16, n), "float32"), batch_size=1, epochs=1, verbose=0)
        results[rounding] = model.layers[0].kernel.numpy() / STEP8
    assert np.all(results["nearest"] == 0)
    # 16 steps of 1/8 step: expected 2 steps per element, variance 16 * 1/8 * 7/8 per element.
    mean = results["stochastic"].mean()
    assert abs(mean - 2.0) < 5 * np.sqrt(16 * (1 / 8) * (7 / 8) / n)


# ----------------------------------------------------------------------------
# Counters
# ----------------------------------------------------------------------------


def test_counters_hand_made_case():
    model, layer = one_dense((2, 5))
    opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(1.0), model)
    s = STEP8
    w0 = np.array([[0.0, 0.0, 0.0, 1 - s, -1.0],
                   [0.5, 0.25, -0.5, 0.125, 0.0]], "float32")
    update = np.array([[0.25 * s, -0.4 * s, 0.1 * s, 4 * s, -3 * s],   # 3 underflow, 2 saturate
                       [3 * s, -2 * s, 5 * s, 1 * s, 0.0]], "float32")  # 4 move, 1 no update
    opt.reset_counters()
    w1 = _set_and_step(opt, layer, w0, update)
    expected = np.array([[0.0, 0.0, 0.0, 1 - s, -1.0],
                         [0.5 + 3 * s, 0.25 - 2 * s, -0.5 + 5 * s, 0.125 + s, 0.0]], "float32")
    np.testing.assert_array_equal(w1, expected)
    c = opt.update_counters()["d/kernel"]
    assert (c["zero_frac"], c["saturate_frac"], c["nonzero_frac"], c["elements"]) == (0.3, 0.2, 0.9, 10)
    # Accumulates across steps (here in a tf.function) until reset.
    step = tf.function(lambda: opt.apply_gradients([(tf.constant(-update), layer.kernel)]))
    layer.kernel.assign(w0)
    step()
    c = opt.update_counters()["d/kernel"]
    assert (c["zero_frac"], c["saturate_frac"], c["elements"]) == (0.3, 0.2, 20)
    assert "d/bias" in opt.update_counters()  # managed, but no gradient given: nothing counted
    assert opt.update_counters()["d/bias"]["elements"] == 0
    opt.reset_counters()
    assert opt.update_counters()["d/kernel"]["elements"] == 0


def test_update_format_underflow_and_saturation():
    """Float master weights, update quantized to 8 bits at scale -4 (step 2**-11)."""
    model, layer = one_dense((1, 4), cfg={})
    opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(1.0), model,
                                     update_config={"by_name": {"d/kernel": {"bit_width": 8, "scale": -4}}})
    assert set(opt.managed_formats()) == {"d/kernel"}
    u = 2.0 ** -11
    w0 = np.array([[0.3, 0.3, 0.3, 0.3]], "float32")
    update = np.array([[0.4 * u, 3 * u, 0.5, -1.5 * u]], "float32")
    w1 = _set_and_step(opt, layer, w0, update)
    high = 2.0 ** -4 - u
    expected = (w0.astype(np.float64) + np.array([[0.0, 3 * u, high, -2 * u]])).astype("float32")
    np.testing.assert_array_equal(w1, expected)
    c = opt.update_counters()["d/kernel"]
    assert (c["zero_frac"], c["saturate_frac"]) == (0.25, 0.25)


def test_update_config_rules_and_errors():
    fmt = parse_format({"bit_width": 12})
    assert (fmt.bit_width, fmt.scale, fmt.rounding) == (12, "auto", "nearest")
    assert parse_format({"bit_width": 12, "scale": "none"}) is None
    with pytest.raises(nf.ConfigError, match=r"update_config\.by_name\.d\.rounding"):
        nf.fixed_storage_optimizer(keras.optimizers.SGD(0.1), one_dense()[0],
                                   update_config={"by_name": {"d": {"bit_width": 8, "rounding": "up"}}})
    with pytest.raises(nf.ConfigError, match=r"update_config\.bits"):
        nf.fixed_storage_optimizer(keras.optimizers.SGD(0.1), one_dense()[0], update_config={"bits": 8})
    with pytest.raises(nf.ConfigError, match="state_config.bit_width"):
        nf.fixed_storage_optimizer(keras.optimizers.SGD(0.1), one_dense()[0], state_config={"scale": 3})


def test_counters_callback_logs_and_resets():
    model, layer = one_dense((2, 3))
    opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(1.0), model)
    callback = nf.UpdateCountersCallback()
    callback.set_model(model)
    model.compile(optimizer=opt, loss="mse")
    _set_and_step(opt, layer, np.zeros((2, 3), "float32"), np.full((2, 3), 0.1 * STEP8, "float32"))
    logs = {"loss": 1.0}
    callback.on_epoch_end(0, logs)
    assert logs["update_zero_frac/d/kernel"] == 1.0
    assert logs["update_saturate_frac/d/kernel"] == 0.0
    assert "update_zero_frac/d/bias" in logs
    assert opt.update_counters()["d/kernel"]["elements"] == 0


# ----------------------------------------------------------------------------
# model.fit: graph mode and XLA
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_graph_mode(jit_compile):
    cfg = storage_cfg(bit_width=8, scale=1, rounding="stochastic")
    with nf.fixed_scope("t", cfg):
        model = keras.Sequential([keras.Input((6,)), nf.Dense(16, name="h", activation="relu"),
                                  nf.Dense(3, name="out")])
    opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(0.3, momentum=0.5), model,
                                     update_config={"bit_width": 16, "scale": -2}, power_of_two_lr=True)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    assert model.jit_compile == jit_compile
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[nf.UpdateCountersCallback()])
    for layer in model.layers:
        for key in ("kernel", "bias"):
            assert on_grid(getattr(layer, key).numpy(), 8, 1)
    for key in ("update_zero_frac/h/kernel", "update_saturate_frac/out/bias"):
        assert len(history.history[key]) == 2
        assert all(0.0 <= v <= 1.0 for v in history.history[key])
    assert history.history["update_zero_frac/h/kernel"][0] > 0  # lr*grad often below half a step
    assert opt.update_counters()["h/kernel"]["elements"] == 0  # reset at epoch end
    assert int(opt.iterations) == 8


def test_get_config_round_trip():
    model, layer = one_dense()
    opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(0.1), model, update_config={"bit_width": 12},
                                     state_config=None, power_of_two_lr=True, seed=7)
    config = opt.get_config()
    clone = nf.FixedStorageOptimizer.from_config(config)
    clone.build(model.trainable_variables)  # matched by variable path
    assert clone.managed_formats() == opt.managed_formats()
    assert float(clone.learning_rate) == 0.0625 and clone.seed == 7


def test_keras_save_and_load_keeps_the_wrapper(tmp_path):
    model, layer = one_dense((3, 2))
    opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(0.5, momentum=0.5), model,
                                     update_config={"bit_width": 12}, state_config={"bit_width": 8})
    model.compile(optimizer=opt, loss="mse")
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, nf.FixedStorageOptimizer)
    assert loaded.optimizer.managed_formats() == opt.managed_formats()  # paths change on load: matched by name
    for a, b in zip(opt.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    loaded.fit(x, y, epochs=1, verbose=0)
    assert on_grid(loaded.layers[0].kernel.numpy(), 8, 0)


# ----------------------------------------------------------------------------
# The gradient buffer
# ----------------------------------------------------------------------------


def test_buffer_scale_hand_computed():
    # 8-bit weights, scale 0 (step 2**-7); lr = 2**-4; 24-bit buffer: step 2**-3, scale -3 + 23 = 20.
    assert nf.buffer_scale(0, 8, 4) == 20
    # 16-bit weights, scale -2 (step 2**-17), lr = 1: buffer step = weight step, scale -17 + 23 = 6.
    assert nf.buffer_scale(-2, 16, 0, 24) == 6
    # 8-bit weights, scale 3 (step 2**-4), lr = 2**-10, 16-bit buffer, 2 guard bits: step 2**4, scale 19.
    assert nf.buffer_scale(3, 8, 10, 16, 2) == 19
    # Every spare bit as guard bits: s_b = s_w + k.
    assert nf.buffer_scale(2, 16, 7, 24, 8) == 9
    for s_w in (-6, 0, 4):
        for w_w in (4, 8, 16):
            for k in (0, 3, 9):
                for guard in (0, 2):
                    s_b = nf.buffer_scale(s_w, w_w, k, 24, guard)
                    assert float(quantization_step(24, s_b)) == float(quantization_step(w_w, s_w)) * 2.0 ** (k - guard)
    with pytest.raises(ValueError):
        nf.buffer_scale(0, 40, 4)
    with pytest.raises(ValueError):
        nf.buffer_scale(0, 8, 4, guard_bits=-1)


def test_buffer_at_helper_scale_is_transparent_to_nearest_storage():
    """Buffer (nearest) + lr shift + nearest storage == nearest storage of w + lr * g."""
    rng = np.random.default_rng(9)
    k = 5
    s_b = nf.buffer_scale(0, 8, k, 24)
    w = nf.fixed_point_quantize(rng.uniform(-0.5, 0.5, 20000), 8, 0)
    g = tf.constant(rng.normal(0, 0.5, 20000).astype("float32"))
    via_buffer = nf.fixed_point_quantize(w + nf.fixed_point_quantize(g, 24, s_b) * 2.0 ** -k, 8, 0)
    direct = nf.fixed_point_quantize(w + g * 2.0 ** -k, 8, 0)
    np.testing.assert_array_equal(via_buffer.numpy(), direct.numpy())
    # One bit coarser and it is no longer transparent.
    coarse = nf.fixed_point_quantize(w + nf.fixed_point_quantize(g, 24, s_b + 1) * 2.0 ** -k, 8, 0)
    assert not np.array_equal(coarse.numpy(), direct.numpy())


def _buffer_model(strategy_cfg):
    with nf.fixed_scope("t", None, strategy_cfg):
        model = keras.Sequential([keras.Input((5,)), nf.Dense(4, name="d", activation="tanh")])
    plain = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh")])
    plain.set_weights(model.get_weights()[:2])
    return model, plain


@pytest.mark.parametrize("scale", [-3, {"kernel": -3, "bias": -1}])
def test_gradient_buffer_strategy_quantizes_weight_gradient(scale):
    yaml_scale = scale if isinstance(scale, int) else "{kernel: -3, bias: -1}"
    strategy_cfg = nf.parse_strategy_cfg_from_str(
        f"by_type:\n  Dense: {{name: gradient_buffer_strategy, bit_width: 6, scale: {yaml_scale}}}\n")
    model, plain = _buffer_model(strategy_cfg)
    x = tf.constant(np.random.default_rng(3).normal(size=(7, 5)).astype("float32"))

    def grads(m):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(m(x, training=True) * tf.range(1.0, 5.0))
        return tape.gradient(loss, m.trainable_variables)

    (gk, gb), (fk, fb) = grads(model), grads(plain)
    bias_scale = -3 if isinstance(scale, int) else -1
    np.testing.assert_array_equal(gk.numpy(), nf.fixed_point_quantize(fk, 6, -3).numpy())
    np.testing.assert_array_equal(gb.numpy(), nf.fixed_point_quantize(fb, 6, bias_scale).numpy())
    assert not np.array_equal(gk.numpy(), fk.numpy())


def test_gradient_buffer_strategy_config_errors():
    with pytest.raises(nf.ConfigError, match=r"by_type\.Dense.*scale"):
        nf.parse_strategy_cfg_from_str("by_type:\n  Dense: {name: gradient_buffer_strategy, bit_width: 24}\n")
    with pytest.raises(nf.ConfigError, match=r"by_name\.d\.bit_width"):
        nf.parse_strategy_cfg_from_str("by_name:\n  d: {name: gradient_buffer_strategy, bit_width: 40, scale: 0}\n")
    with pytest.raises(nf.ConfigError, match=r"by_name\.d\.scale\.kernel"):
        nf.parse_strategy_cfg_from_str(
            "by_name:\n  d: {name: gradient_buffer_strategy, scale: {kernel: fixed}}\n")


def test_buffer_strategy_config_from_model():
    cfg = {"by_name": {"d": {"weight": {"storage_config": {"bit_width": 8, "scale": 0}}}}}
    model, _ = one_dense((3, 2), cfg)
    strategy = nf.buffer_strategy_config(model, learning_rate=0.1)  # shift 4
    assert strategy == {"by_name": {"d": {"name": "gradient_buffer_strategy", "bit_width": 24,
                                          "scale": {"kernel": 20, "bias": 20}, "rounding": "nearest"}}}
    parsed = nf.StrategyConfig.from_dict(strategy)
    with nf.fixed_scope("t2", cfg, parsed):
        rebuilt = keras.Sequential([keras.Input((3,)), nf.Dense(2, name="d")])
    assert isinstance(rebuilt.layers[0].strategy, nf.GradientBufferStrategy)


def test_buffer_strategy_config_refuses_per_channel_weight_scales():
    data = {"bit_width": 8, "training": "auto", "not_training": "fixed", "granularity": "channel"}
    model, _ = one_dense((3, 2), {"by_name": {"d": {"weight": {"data_config": data}}}})
    model(np.ones((1, 3), np.float32), training=True)
    with pytest.raises(ValueError, match=r"weight d/kernel has 2 scales \(channel\): the gradient buffer keeps one"):
        nf.buffer_strategy_config(model, learning_rate=0.1)
