"""Per-channel and per-block scales and the dynamic scale mode, against NumPy references.

The references below share no code with nics_fix: group maxima by explicit
slicing, formats in float64 with ``np.ldexp``, the dynamic rule written out per group.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import nics_fix as nf
from nics_fix.config import ConfigError
from nics_fix.cost import cost_summary
from nics_fix.dynamic import dynamic_update
from nics_fix.quant import MAX_SCALE, MIN_SCALE, ScaleGroups

# ---------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------


def ref_scale_of(values) -> int:
    """ceil(log2(max |finite|)) from the float64 exponent; MIN_SCALE when nothing is nonzero."""
    v = np.asarray(values, np.float64).ravel()
    v = np.abs(v[np.isfinite(v)])
    m = v.max() if v.size else 0.0
    if m == 0.0:
        return MIN_SCALE
    mantissa, exponent = np.frexp(m)
    return int(np.clip(exponent - 1 if mantissa == 0.5 else exponent, MIN_SCALE, MAX_SCALE))


def ref_channel_scales(x, axis):
    axis %= x.ndim
    out = np.array([ref_scale_of(np.take(x, i, axis=axis)) for i in range(x.shape[axis])], np.int32)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return out.reshape(shape)


def ref_block_scales(x, axis, block):
    """One scale per run of `block` elements along `axis`, for every position of the other axes."""
    axis %= x.ndim
    moved = np.moveaxis(x, axis, -1)
    n = moved.shape[-1]
    starts = list(range(0, n, block))
    out = np.empty(moved.shape[:-1] + (len(starts),), np.int32)
    for index in np.ndindex(*moved.shape[:-1]):
        for j, start in enumerate(starts):
            out[index + (j,)] = ref_scale_of(moved[index][start:start + block])
    return np.moveaxis(out, -1, axis)


def ref_expand(scales, axis, block, n):
    axis %= scales.ndim
    return np.take(np.repeat(scales, block, axis=axis), np.arange(n), axis=axis)


def ref_quantize(x, bit_width, scales, rounding="nearest", uniform=None):
    """Elementwise format in float64: clip(round(x / step) * step, -2**s, 2**s - step)."""
    x = np.asarray(x, np.float32).astype(np.float64)
    s = np.broadcast_to(np.clip(scales, MIN_SCALE, MAX_SCALE), x.shape).astype(np.int64)
    step = np.ldexp(1.0, s - bit_width + 1)
    v = x / step
    if rounding == "nearest":
        q = np.rint(v)
    elif rounding == "floor":
        q = np.floor(v)
    else:
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, as in float32
            low = np.floor(v)
            q = low + (uniform < (v - low))
    with np.errstate(invalid="ignore"):
        return np.clip(q * step, -np.ldexp(1.0, s), np.ldexp(1.0, s) - step).astype(np.float32)


def tensor_with_spread(rng, shape):
    """Values whose magnitude differs by channel along every axis, plus ties, zeros and specials."""
    x = rng.standard_normal(shape)
    for axis, n in enumerate(shape):
        spread = np.ldexp(1.0, rng.integers(-6, 7, n)).reshape([n if i == axis else 1 for i in range(len(shape))])
        x = x * spread
    x = x.astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, 8, replace=False)] = [0.0, -0.0, np.nan, np.inf, -np.inf, 0.375, -0.125, 4.0]
    return x


SHAPE = (5, 7, 9)
AXES = [0, 1, 2, -1]

# ---------------------------------------------------------------------------
# auto_scale and fixed_point_quantize with scale tensors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("axis", AXES)
def test_auto_scale_per_channel_and_per_block_match_reference(axis, rng):
    x = tensor_with_spread(rng, SHAPE)
    x[(slice(None),) * (axis % 3) + (0,)] = 0.0  # an all-zero channel: MIN_SCALE
    np.testing.assert_array_equal(nf.auto_scale(x, axis=axis).numpy(), ref_channel_scales(x, axis))
    for block in (1, 2, 4, 32):  # 5, 7 and 9 leave ragged last blocks; 32 is one short block
        got = nf.auto_scale(x, axis=axis, block_size=block).numpy()
        np.testing.assert_array_equal(got, ref_block_scales(x, axis, block), err_msg=f"block {block}")


@pytest.mark.parametrize("rounding", ["nearest", "floor", "stochastic"])
@pytest.mark.parametrize("axis", AXES)
def test_channel_and_block_quantize_match_reference(axis, rounding, rng):
    x = tensor_with_spread(rng, SHAPE)
    seed = tf.constant([7, 11], tf.int64)
    # stochastic: the reference takes the same seeded draws the quantizer makes
    uniform = tf.random.stateless_uniform(SHAPE, seed=seed).numpy().astype(np.float64)
    for bit_width in (1, 2, 4, 8, 16, 24, 25):
        channel = nf.auto_scale(x, axis=axis)
        got = nf.fixed_point_quantize(x, bit_width, channel, rounding, seed=seed).numpy()
        want = ref_quantize(x, bit_width, ref_channel_scales(x, axis), rounding, uniform)
        np.testing.assert_array_equal(got, want, err_msg=f"channel w={bit_width}")
        for block in (3, 4):
            scales = nf.auto_scale(x, axis=axis, block_size=block)
            got = nf.fixed_point_quantize(x, bit_width, scales, rounding, seed=seed, axis=axis,
                                          block_size=block).numpy()
            expanded = ref_expand(ref_block_scales(x, axis, block), axis, block, SHAPE[axis])
            want = ref_quantize(x, bit_width, expanded, rounding, uniform)
            np.testing.assert_array_equal(got, want, err_msg=f"block {block} w={bit_width}")


def test_given_scale_tensors_broadcast_and_extremes_clamp(rng):
    x = rng.standard_normal((6, 4)).astype(np.float32) * 3
    scales = np.array([[-200, -3, 0, 200]], np.int32)  # clamped to MIN_SCALE / MAX_SCALE
    got = nf.fixed_point_quantize(x, 8, scales).numpy()
    np.testing.assert_array_equal(got, ref_quantize(x, 8, scales))
    column = np.array([[1], [2], [0], [-1], [3], [5]], np.int32)  # per row: axis 0
    np.testing.assert_array_equal(nf.fixed_point_quantize(x, 5, column).numpy(), ref_quantize(x, 5, column))


@pytest.mark.parametrize("jit", [False, True])
def test_graph_and_xla_give_the_same_bits(jit, rng):
    x = tensor_with_spread(rng, SHAPE)

    @tf.function(jit_compile=jit)
    def run(t):
        channel = nf.auto_scale(t, axis=1)
        block = nf.auto_scale(t, axis=2, block_size=4)
        return (channel, block, nf.fixed_point_quantize(t, 6, channel),
                nf.fixed_point_quantize(t, 6, block, axis=2, block_size=4))

    channel, block, qc, qb = (v.numpy() for v in run(tf.constant(x)))
    np.testing.assert_array_equal(channel, ref_channel_scales(x, 1))
    np.testing.assert_array_equal(block, ref_block_scales(x, 2, 4))
    np.testing.assert_array_equal(qc, ref_quantize(x, 6, ref_channel_scales(x, 1)))
    np.testing.assert_array_equal(qb, ref_quantize(x, 6, ref_expand(ref_block_scales(x, 2, 4), 2, 4, 9)))


@pytest.mark.parametrize("call, message", [
    (lambda x: nf.fixed_point_quantize(x, 8, np.zeros((3, 1), np.int32)), "does not broadcast"),
    (lambda x: nf.fixed_point_quantize(x, 8, np.zeros((2, 2), np.int32), axis=1, block_size=2),
     r"need shape \(2, 3\)"),
    (lambda x: nf.auto_scale(x, block_size=2), "block_size needs an axis"),
    (lambda x: nf.auto_scale(x, axis=2), "axis must be an integer from -2 to 1"),
    (lambda x: nf.auto_scale(x, axis=0, block_size=0), "block_size must be a positive integer"),
])
def test_bad_scale_arguments_are_one_line_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.ones((2, 5), np.float32))


def test_ste_gradient_is_masked_per_element_by_its_own_channel_range(rng):
    x = rng.standard_normal((4, 3)).astype(np.float32) * 2
    cfg = {"activation": {"data_config": {"bit_width": 4, "training": "fixed", "not_training": "fixed",
                                          "granularity": "channel"}}}
    layer = nf.Quantize(fixed_config=cfg)
    layer.build((None, 3))
    scales = np.array([[-1, 0, 1]], np.int32)
    layer.fixed_points["activation"].data_scale.assign(scales)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True)
    grad = tape.gradient(y, xt).numpy()
    np.testing.assert_array_equal(y.numpy(), ref_quantize(x, 4, scales))
    high = np.ldexp(1.0, scales) - np.ldexp(1.0, scales - 3)
    inside = (x >= -np.ldexp(1.0, scales)) & (x <= high)
    assert 0 < inside.sum() < inside.size
    np.testing.assert_array_equal(grad, inside.astype(np.float32))


# ---------------------------------------------------------------------------
# layers: shapes of the scale variables, modes, saving
# ---------------------------------------------------------------------------


def point_cfg(granularity, mode="auto", bits=8, **extra):
    data = {"bit_width": bits, "training": mode, "not_training": mode, "granularity": granularity, **extra}
    return data


def test_scale_variable_shapes_follow_granularity_and_axis():
    cfg = {"weight": {"data_config": point_cfg("channel"),
                      "gradient_config": {"bit_width": 8, "training": "auto", "granularity": "block",
                                          "block_size": 4}},
           "activation": {"data_config": point_cfg("block", block_size=3),
                          "gradient_config": {"bit_width": 8, "training": "auto", "granularity": "channel"}}}
    model = keras.Sequential([keras.Input((6, 6, 2)), nf.Conv2D(5, 3, fixed_config=cfg, name="c"),
                              nf.DepthwiseConv2D(3, fixed_config=cfg, name="dw")])
    c, dw = model.get_layer("c").fixed_points, model.get_layer("dw").fixed_points
    assert tuple(c["kernel"].data_scale.shape) == (1, 1, 1, 5)      # output channels
    assert tuple(c["kernel"].grad_scale.shape) == (3, 3, 2, 2)      # blocks of 4 along 5 channels
    assert tuple(c["bias"].data_scale.shape) == (5,)
    assert tuple(c["activation"].data_scale.shape) == (1, 4, 4, 2)  # batch shared, 5 channels in blocks of 3
    assert tuple(c["activation"].grad_scale.shape) == (1, 1, 1, 5)
    assert tuple(dw["kernel"].data_scale.shape) == (1, 1, 5, 1)     # depthwise: the channel axis


@pytest.mark.parametrize("field, value, message", [
    ("granularity", "row", "granularity must be one of tensor, channel, block, got 'row'"),
    ("block_size", 0, "block_size must be a positive integer, got 0"),
    ("axis", "last", "axis must be an integer, got 'last'"),
    ("overflow_rate", 1.5, "overflow_rate must be a number in [0, 1), got 1.5"),
    ("window", 0, "window must be a positive integer, got 0"),
])
def test_bad_scale_fields_name_the_key(field, value, message):
    text = f"by_type:\n  Dense:\n    weight:\n      data_config: {{bit_width: 8, training: auto, {field}: {value!r}}}\n"
    with pytest.raises(ConfigError) as info:
        nf.parse_cfg_from_str(text, "f.yaml")
    assert str(info.value) == f"f.yaml: by_type.Dense.weight.data_config.{field}: {message}"


def test_block_without_size_and_dynamic_storage_are_config_errors():
    with pytest.raises(ConfigError, match=r"activation\.gradient_config\.block_size: granularity block needs"):
        nf.LayerFixedConfig.from_dict({"activation": {"gradient_config": {
            "bit_width": 8, "training": "auto", "granularity": "block"}}})
    with pytest.raises(ConfigError, match="storage_config.scale: storage scale must be"):
        nf.LayerFixedConfig.from_dict({"weight": {"storage_config": {"bit_width": 8, "scale": "dynamic"}}})


def test_axis_that_does_not_fit_a_tensor_names_the_point():
    cfg = {"weight": {"data_config": point_cfg("channel", axis=-3)}}
    with pytest.raises(ValueError, match=r"^d/kernel: data_config: axis must be an integer from -2 to 1"):
        keras.Sequential([keras.Input((3,)), nf.Dense(2, fixed_config=cfg, name="d")])


@pytest.mark.parametrize("mode", ["fixed", -2])
def test_fixed_and_integer_modes_use_the_stored_shaped_scales(mode, rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    layer = nf.Quantize(fixed_config={"activation": {"data_config": point_cfg("block", mode, 6, block_size=3)}})
    layer.build((None, 4))
    point = layer.fixed_points["activation"]
    if mode == "fixed":
        point.data_scale.assign([[1, -3]])
    want_scales = np.array([[1, -3]] if mode == "fixed" else [[-2, -2]])
    got = layer(x, training=False).numpy()
    np.testing.assert_array_equal(got, ref_quantize(x, 6, ref_expand(want_scales, 1, 3, 4)))
    np.testing.assert_array_equal(point.data_scale.numpy(), want_scales)


def small_model(cfg, name="m"):
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((6,)), nf.Dense(8, activation="relu", fixed_config=cfg, name="d1"),
                             nf.Dense(3, fixed_config=cfg, name="d2")], name=name)


SAVE_CFG = {"weight": {"data_config": {"bit_width": 6, "training": "auto", "not_training": "fixed",
                                       "granularity": "channel"},
                       "gradient_config": {"bit_width": 8, "training": "dynamic", "granularity": "block",
                                           "block_size": 4}},
            "activation": {"data_config": {"bit_width": 8, "training": "dynamic", "not_training": "fixed",
                                           "granularity": "block", "block_size": 3},
                           "gradient_config": {"bit_width": 8, "training": "auto", "granularity": "channel"}}}


def fit_some(model, steps=3):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 6)).astype(np.float32), rng.standard_normal((16, 3)).astype(np.float32)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(x, y, batch_size=16, epochs=steps, verbose=0)  # one step an epoch, in a tf.function
    return x


def test_shaped_scales_and_dynamic_counters_save_and_restore(tmp_path):
    model = small_model(SAVE_CFG)
    x = fit_some(model)
    before = {p.name: (p.data_scale, p.grad_scale, p.dynamic) for p in nf.fixed_points(model)}
    assert before["d1/activation"][2]["data"]["calls"] == 3
    assert np.array(before["d1/kernel"][0]).shape == (1, 8)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    after = {p.name: (p.data_scale, p.grad_scale, p.dynamic) for p in nf.fixed_points(loaded)}
    assert after == before
    np.testing.assert_array_equal(loaded(x, training=False).numpy(), model(x, training=False).numpy())

    for fixed_weight in (False, True):
        nf.fixed_model_saver(model, fixed_weight=fixed_weight).save(tmp_path / f"fm{fixed_weight}")
        fresh = small_model(SAVE_CFG, name="fresh")
        nf.restore_fixed_model(fresh, tmp_path / f"fm{fixed_weight}")
        np.testing.assert_array_equal(fresh(x, training=False).numpy(), model(x, training=False).numpy())


def test_per_tensor_weights_load_into_a_per_channel_model_and_wrong_shapes_fail(tmp_path):
    plain = {"weight": {"data_config": {"bit_width": 8, "training": 2, "not_training": 2}}}
    src = small_model(plain)
    src.save_weights(tmp_path / "w.weights.h5")
    channel = small_model({"weight": {"data_config": point_cfg("channel", "fixed")}}, name="c")
    channel.load_weights(tmp_path / "w.weights.h5")  # one scale becomes every channel's
    np.testing.assert_array_equal(channel.get_layer("d1").fixed_points["kernel"].data_scale.numpy(), [[2] * 8])
    channel.save_weights(tmp_path / "c.weights.h5")
    blocks = small_model({"weight": {"data_config": point_cfg("block", "fixed", block_size=4)}}, name="b")
    with pytest.raises(ValueError, match=r"d1: saved (kernel|bias)_data_scale has shape"):
        blocks.load_weights(tmp_path / "c.weights.h5")


# ---------------------------------------------------------------------------
# dynamic
# ---------------------------------------------------------------------------


def dynamic_layer(granularity="tensor", **fields):
    data = {"bit_width": 4, "training": "dynamic", "not_training": "dynamic", "granularity": granularity,
            **fields}
    layer = nf.Quantize(fixed_config={"activation": {"data_config": data}})
    layer.build((None, 4 if granularity == "tensor" else 2))
    return layer, layer.fixed_points["activation"]


def test_dynamic_scale_sequence_on_a_scripted_stream():
    # 4 bits: range at scale s is [-2**s, 2**s * 7/8]. window 2; up when more than 1 in 4 saturate.
    layer, point = dynamic_layer(overflow_rate=0.25, window=2)
    stream = [[0.3, -0.2, 0.1, 0.05],  # first call: auto -> -1; 0.3 does not fit [-0.25, 0.21875]
              [1.0, 0.9, 0.1, 0.0],    # 2 of 4 saturate [-0.5, 0.4375] -> 0
              [1.0, 0.1, 0.1, 0.1],    # 1 of 4 saturates: not more than 0.25 -> stays 0
              [0.2, -0.3, 0.1, 0.0],   # fits in half ([-0.5, 0.4375]): streak 1
              [0.2, 0.1, 0.0, 0.0],    # fits again: streak 2 = window -> -1
              [0.2, 0.1, 0.0, 0.0],    # fits at -2 ([-0.25, 0.21875]): streak 1
              [0.6, 0.0, 0.0, 0.0]]    # saturates 1 of 4, does not fit: streak 0
    used, stored, streaks, overflows, outputs = [], [], [], [], []
    for i, values in enumerate(stream):
        x = np.float32([values])
        outputs.append(layer(x, training=i % 2 == 0).numpy()[0].tolist())  # both modes are dynamic
        state = point.describe()
        stored.append(state["data_scale"])
        streaks.append(state["dynamic"]["data"]["streak"])
        overflows.append(state["dynamic"]["data"]["overflows"])
        assert state["dynamic"]["data"]["calls"] == i + 1
    used = [-1] + stored[:-1]  # each call quantizes with the scale the calls before it left
    assert used == [-1, -1, 0, 0, 0, -1, -1]
    assert stored == [-1, 0, 0, 0, -1, -1, -1]
    assert streaks == [0, 0, 0, 1, 0, 1, 0]
    assert overflows == [0, 2, 1, 0, 0, 0, 1]
    assert outputs[1] == [0.4375, 0.4375, 0.125, 0.0]  # call 2 saturates at the old scale -1
    assert outputs[2] == [0.875, 0.125, 0.125, 0.125]


def test_dynamic_per_channel_in_a_graph():
    layer, point = dynamic_layer("channel", overflow_rate=0.4, window=1)
    call = tf.function(lambda t: layer(t, training=False))
    stream = [[[0.3, 3.0], [0.1, 1.0]],   # auto per channel: -1, 2; neither fits its half range
              [[0.2, 5.0], [0.1, 0.0]],   # ch0 fits [-0.25, 0.21875] -> -2; ch1: 5 > 3.5, 1 of 2 -> 3
              [[0.2, 0.5], [0.1, 0.5]]]   # ch0 does not fit [-0.125, 0.109375]; ch1 fits [-4, 3.5] -> 2
    stored = []
    for values in stream:
        call(tf.constant(values, tf.float32))
        stored.append(point.data_scale.numpy().tolist())
    assert stored == [[[-1, 2]], [[-2, 3]], [[-2, 2]]]
    assert point.data_dynamic.overflows.numpy().tolist() == [[0, 0]]


def ref_dynamic_update(x, bit_width, scales, streak, axis, block, rate, window):
    """The rule per block, by explicit slicing (blocks along `axis`, nothing shared)."""
    axis %= x.ndim
    moved, s_moved, k_moved = (np.moveaxis(a, axis, -1) for a in (x.astype(np.float64), scales, streak))
    new_s, new_k, counts = s_moved.copy(), k_moved.copy(), np.zeros_like(s_moved)
    for index in np.ndindex(*moved.shape[:-1]):
        for j in range(s_moved.shape[-1]):
            values = moved[index][j * block:(j + 1) * block]
            s = int(s_moved[index + (j,)])
            high, low = math.ldexp(1.0, s) - math.ldexp(1.0, s - bit_width + 1), -math.ldexp(1.0, s)
            over = int(np.sum((values > high) | (values < low)))
            half_high, half_low = math.ldexp(1.0, s - 1) - math.ldexp(1.0, s - bit_width), -math.ldexp(1.0, s - 1)
            fits = bool(np.all((values <= half_high) & (values >= half_low)))
            run = k_moved[index + (j,)] + 1 if fits else 0
            counts[index + (j,)] = over
            if over > rate * values.size:
                new_s[index + (j,)], new_k[index + (j,)] = s + 1, 0
            elif fits and run >= window:
                new_s[index + (j,)], new_k[index + (j,)] = s - 1, 0
            else:
                new_k[index + (j,)] = run
    return tuple(np.moveaxis(a, -1, axis) for a in (new_s, new_k, counts))


def test_dynamic_update_per_block_matches_reference(rng):
    x = (rng.standard_normal((4, 11)) * np.ldexp(1.0, rng.integers(-3, 4, (4, 1)))).astype(np.float32)
    groups = ScaleGroups.for_tensor(x.shape, 1, 4)
    scales = rng.integers(-3, 4, (4, 3)).astype(np.int32)
    streak = rng.integers(0, 3, (4, 3)).astype(np.int32)
    got = dynamic_update(x, 5, scales, streak, groups, 0.3, 2)
    want = ref_dynamic_update(x, 5, scales, streak, 1, 4, 0.3, 2)
    for g, w, what in zip(got, want, ("scale", "streak", "overflows")):
        np.testing.assert_array_equal(g.numpy(), w, err_msg=what)
    assert len({int(v) for v in (got[0].numpy() - scales).ravel()}) > 1  # up, down and unchanged all seen


def test_dynamic_gradient_scales_move_in_training():
    cfg = {"activation": {"gradient_config": {"bit_width": 8, "training": "dynamic", "granularity": "channel"}}}
    model = small_model(cfg)
    fit_some(model, steps=2)
    state = model.get_layer("d2").fixed_points["activation"].describe()["dynamic"]["grad"]
    assert state["calls"] == 2 and np.array(state["overflows"]).shape == (1, 3)


# ---------------------------------------------------------------------------
# cost model, shipped configs, search
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("granularity, extra, avg", [
    ("tensor", {}, 8.0),
    ("channel", {}, 8 + 32 * 8 / 2048),                       # 32 output channels
    ("block", {"block_size": 32, "axis": 0}, 8.25),           # 8-bit exponent per 32 weights
    ("block", {"block_size": 24, "axis": 0}, 8 + 3 * 32 * 8 / 2048),  # 64 = 24 + 24 + 16: 3 blocks
])
def test_cost_model_counts_scale_bits(granularity, extra, avg):
    cfg = {"weight": {"data_config": point_cfg(granularity, **extra)}}
    model = keras.Sequential([keras.Input((64,)), nf.Dense(32, use_bias=False, fixed_config=cfg)])
    summary = cost_summary(model)
    assert summary["avg_weight_bits"] == avg
    assert summary["total_weight_bits"] == round(avg * 2048)


def test_shipped_configs(tmp_path):
    from tests.conftest import REPO

    channel = nf.parse_cfg_from_file(REPO / "conf/fixed/w8a8_channel.yaml").resolve("c", "Conv2D")
    assert channel.weight.data.granularity == "channel" and channel.activation.data.granularity == "tensor"
    mx = nf.parse_cfg_from_file(REPO / "conf/fixed/mxint8.yaml").resolve("d", "Dense")
    for point in (mx.weight, mx.activation):
        for part in (point.data, point.gradient):
            assert (part.bit_width, part.granularity, part.block_size) == (8, "block", 32)
    dfxp = nf.parse_cfg_from_file(REPO / "conf/fixed/dfxp16.yaml").resolve("d", "Dense")
    assert dfxp.weight.data.training == dfxp.activation.gradient.training == "dynamic"
    assert dfxp.weight.data.bit_width == 16 and dfxp.weight.data.overflow_rate == 1e-4


def test_search_allocations_keep_the_base_granularity():
    from experiments.searching import allocation_fixed_config

    from tests.conftest import REPO

    model = small_model(None)
    base = nf.parse_cfg_from_file(REPO / "conf/fixed/w8a8_channel.yaml").to_dict()
    fixed = allocation_fixed_config(model, {("d1", "weight", "data"): 4}, base)
    part = fixed["by_name"]["d1"]["weight"]["data_config"]
    assert part["bit_width"] == 4 and part["granularity"] == "channel"
    built = small_model(fixed["by_name"]["d1"], name="alloc").get_layer("d1").fixed_points["kernel"]
    assert tuple(built.data_scale.shape) == (1, 8)


def test_search_modes_can_set_the_granularity_of_searched_points():
    from experiments.searching import allocation_fixed_config, search_options

    opts = search_options({"data_config": {"training": "auto", "not_training": "fixed",
                                           "granularity": "block", "block_size": 4}})
    model = small_model(None)
    fixed = allocation_fixed_config(model, {("d1", "weight", "data"): 6}, None, opts)
    part = fixed["by_name"]["d1"]["weight"]["data_config"]
    assert (part["bit_width"], part["granularity"], part["block_size"]) == (6, "block", 4)
    with pytest.raises(Exception, match=r"search.data_config.granularity: .*'row'"):
        search_options({"data_config": {"granularity": "row"}})


def test_mlflow_metrics_and_params_carry_shaped_scales_and_dynamic_counters():
    from experiments import tracking

    model = small_model(SAVE_CFG)
    fit_some(model, steps=2)
    metrics = tracking.scale_metrics(model)
    kernel = model.get_layer("d1").fixed_points["kernel"].data_scale.numpy()
    assert metrics["scale.d1.kernel.data"] == kernel.max() and metrics["scale_min.d1.kernel.data"] == kernel.min()
    assert metrics["dynamic.d1.activation.data.calls"] == 2.0
    assert metrics["dynamic.d1.kernel.grad.calls"] == 2.0
    assert {"dynamic.d2.kernel.grad.overflows", "dynamic.d2.kernel.grad.streak"} <= set(metrics)
    params = tracking.point_params(model)
    assert params["granularity.d1.weight.data"] == "channel"
    assert params["granularity.d1.activation.data"] == "block/3"
    assert params["mode.d1.activation.data"] == "dynamic/fixed"


def test_float_weights_load_into_a_dynamic_model_whose_counters_start_fresh(tmp_path):
    small_model(None).save_weights(tmp_path / "f.weights.h5")
    dynamic = {"weight": {"data_config": {"bit_width": 8, "training": "dynamic", "not_training": "dynamic"}}}
    model = small_model(dynamic, name="dyn")
    model.load_weights(tmp_path / "f.weights.h5")
    assert model.get_layer("d1").fixed_points["kernel"].describe()["dynamic"]["data"]["calls"] == 0
