"""The fused quantize kernel (nics_fix/kernels) against the plain TensorFlow ops, bit for bit,
and its clean fallback when it cannot be built."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import nics_fix as nf
from nics_fix import kernels, quant

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

op = kernels.quantize_op()
needs_kernel = pytest.mark.skipif(op is None, reason=f"fused kernel not available: {kernels.status()}")


def same_bits(a, b) -> bool:
    return kernels._same_bits(np.asarray(a), np.asarray(b))


_in_place_fns: dict = {}


def call_op(placement, t, scale, *rest, fn=None, **attrs):
    """The quantize op (or ``fn``) on a tensor that another op still holds (``new``: the output
    gets its own buffer) or on a fresh intermediate in a graph (``in-place``: TensorFlow hands the
    op the input's buffer for its output, and auto scales take their read-only pass first)."""
    fn = fn or op
    if placement == "new":
        return fn(t, *rest, scale, **attrs)
    key = (fn, len(rest), tuple(sorted(attrs.items())))
    if key not in _in_place_fns:
        _in_place_fns[key] = tf.function(lambda v, s, *r: fn(tf.raw_ops.DeepCopy(x=v), *r, s, **attrs),
                                         reduce_retracing=True)
    return _in_place_fns[key](t, tf.constant(scale, tf.int32), *(tf.constant(r) for r in rest))


PLACEMENTS = pytest.mark.parametrize("placement", ["new", "in-place"])


def awkward_tensors(rng):
    """Sizes around the 8-lane and 4096-element chunk edges, with the values that are easy to get wrong."""
    special = np.float32([0.0, -0.0, np.nan, 1e-45, -1e-45, 1e-40, 3.0e38, -3.0e38, 0.5, -0.5, 1.5, 2.5, -2.5])
    out = [np.zeros(0, np.float32), np.float32([np.nan]), np.float32([-0.0, 0.0]), special,
           np.float32([np.inf, -0.3, 0.2]), np.float32([-np.inf, np.nan, 7.0]), np.full(9, np.nan, np.float32)]
    for n in (1, 7, 8, 9, 4095, 4096, 4097, 8193, 20001):
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-20, 20)).astype(np.float32)
        x[rng.integers(0, n, max(1, n // 50))] = rng.choice(special, max(1, n // 50))
        out.append(x)
    out.append(rng.standard_normal((3, 5, 7)).astype(np.float32))
    return out


@needs_kernel
@PLACEMENTS
@pytest.mark.parametrize("portable", [False, True], ids=["simd-dispatch", "portable-4-lane"])
def test_the_kernel_matches_the_plain_ops_bit_for_bit(portable, placement):
    rng = np.random.default_rng(5)
    for x in awkward_tensors(rng):
        t = tf.constant(x)
        for bit_width in (2, 3, 4, 7, 8, 12, 16, 23, 24):
            fmt, inside = quant._auto_format(t, bit_width)
            right = int(fmt.scale)
            for guess in (0, right, right - 1, right + 1, -94):  # the guess saves work, never changes a bit
                y, scale, all_inside = call_op(placement, t, guess, bit_width=bit_width, auto_scale=True,
                                               portable=portable)
                assert int(scale) == right, (bit_width, x[:5])
                assert bool(all_inside) == bool(inside), (bit_width, guess, x[:5])
                assert same_bits(y, quant._plain_quantize(t, fmt, "nearest")), (bit_width, guess, x[:5])
            for s in (-120, -94, -5, 0, 3, 126, 300):
                fixed = quant._Format(bit_width, s)
                y, used, all_inside = call_op(placement, t, s, bit_width=bit_width, auto_scale=False,
                                              portable=portable)
                want = quant._plain_quantize(t, fixed, "nearest").numpy()
                assert int(used) == min(max(s, quant.MIN_SCALE), quant.MAX_SCALE)
                assert same_bits(y, want), (bit_width, s, x[:5])
                inside_ref = bool(np.all((x >= fixed.low) & (x <= fixed.high)))  # NaN compares false
                assert bool(all_inside) == inside_ref, (bit_width, s)


@needs_kernel
@PLACEMENTS
@pytest.mark.parametrize("portable", [False, True], ids=["simd-dispatch", "portable-4-lane"])
def test_per_channel_scales_match_the_plain_ops_bit_for_bit(portable, placement):
    """One scale per channel of the last axis: channel counts around the lane width, row
    blocks around the 4096-element chunk, channels of very different magnitudes, NaN/Inf/-0."""
    rng = np.random.default_rng(11)
    for shape in [(7, 5), (3, 16), (1, 9), (0, 4), (3, 3, 3, 32), (5, 17), (4096, 3), (2, 8200), (300, 70)]:
        x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-5, 5, size=shape[-1])).astype(np.float32)
        if x.size > 4:
            x.reshape(-1)[rng.choice(x.size, 3, replace=False)] = [np.nan, np.inf, -0.0]
        t = tf.constant(x)
        groups = quant.ScaleGroups.for_tensor(shape, -1)
        for bit_width in (2, 5, 8, 24):
            fmt, inside, scales = quant._grouped_auto_format(t, bit_width, groups)
            want = quant._plain_quantize(t, fmt, "nearest")
            right = np.reshape(scales.numpy(), -1)
            for guess in (np.zeros(shape[-1], np.int32), right, right + (np.arange(shape[-1]) % 2)):
                y, used, all_inside = call_op(placement, t, guess, bit_width=bit_width, auto_scale=True,
                                              per_channel=True, portable=portable)
                assert np.array_equal(used.numpy(), right), (shape, bit_width)
                assert bool(all_inside) == bool(inside), (shape, bit_width)
                assert same_bits(y, want), (shape, bit_width)
            given = rng.integers(-8, 8, shape[-1]).astype(np.int32)
            given[0] = 300  # clamped like every scale
            fixed = quant._Format(bit_width, tf.constant(given.reshape((1,) * (len(shape) - 1) + (-1,))))
            y, _, all_inside = call_op(placement, t, given, bit_width=bit_width, auto_scale=False,
                                       per_channel=True, portable=portable)
            assert same_bits(y, quant._plain_quantize(t, fixed, "nearest")), (shape, bit_width)
            low, high = fixed.low.numpy(), fixed.high.numpy()
            assert bool(all_inside) == bool(np.all((x >= low) & (x <= high)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one scale per channel"):
        op(tf.zeros((3, 4)), [1, 2, 3], bit_width=8, auto_scale=False, per_channel=True)


def plain_scale_shift(x, a, c, bit_width, scale):
    """BatchNormalization's plain evaluation: t = float64(x) * a + c quantized in float64, then float32."""
    t = tf.cast(x, tf.float64) * tf.cast(a, tf.float64) + tf.cast(c, tf.float64)
    if scale is None:
        scale = quant.auto_scale(t)
    return tf.cast(quant._quantize(t, quant._Format(bit_width, scale), "nearest"), tf.float32).numpy(), int(scale)


@needs_kernel
@PLACEMENTS
@pytest.mark.parametrize("portable", [False, True], ids=["simd-dispatch", "portable-2-lane"])
def test_the_scale_and_shift_kernel_matches_the_plain_float64_ops(portable, placement):
    scale_shift = kernels.scale_shift_op()
    rng = np.random.default_rng(21)
    for shape in [(4, 3), (2, 5, 5, 19), (1, 1), (0, 6), (3000, 2), (2, 9000)]:
        x = (rng.standard_normal(shape) * 4).astype(np.float32)
        if x.size > 5:
            x.reshape(-1)[rng.choice(x.size, 5, replace=False)] = [np.nan, np.inf, -np.inf, -0.0, 3.0e38]
        a = (rng.uniform(-3, 3, shape[-1]) * 2.0 ** rng.integers(-20, 20, shape[-1])).astype(np.float32)
        c = rng.standard_normal(shape[-1]).astype(np.float32)
        t = np.float64(x) * np.float64(a) + np.float64(c)
        for bit_width in (2, 8, 16, 24):
            want, right = plain_scale_shift(x, a, c, bit_width, None)
            for guess in (0, right, right + 1, right - 1):
                y, used, inside = call_op(placement, x, guess, a, c, fn=scale_shift, bit_width=bit_width,
                                          auto_scale=True, portable=portable)
                assert int(used) == right, (shape, bit_width)
                assert same_bits(y, want), (shape, bit_width, guess)
                fmt = quant._Format(bit_width, right)
                assert bool(inside) == bool(np.all((t >= fmt.low) & (t <= fmt.high))), (shape, bit_width)
            for given in (-4, 3, 130):
                y, used, inside = call_op(placement, x, given, a, c, fn=scale_shift, bit_width=bit_width,
                                          auto_scale=False, portable=portable)
                scale = min(given, quant.MAX_SCALE)
                assert same_bits(y, plain_scale_shift(x, a, c, bit_width, scale)[0])
                fmt = quant._Format(bit_width, scale)
                assert bool(inside) == bool(np.all((t >= fmt.low) & (t <= fmt.high))), (shape, bit_width)
    with pytest.raises(tf.errors.InvalidArgumentError, match="one value per channel"):
        scale_shift(tf.zeros((2, 3)), [1.0, 2.0], [0.0, 0.0], 0, bit_width=8, auto_scale=True)


@needs_kernel
@pytest.mark.parametrize("mode", ["auto", "fixed", -3])
def test_batch_normalization_evaluation_is_the_same_with_and_without_the_kernel(mode):
    cfg = {"weight": {"data_config": {"bit_width": 8, "training": "auto", "not_training": "auto"}},
           "activation": {"data_config": {"bit_width": 6, "training": "auto", "not_training": mode}}}
    rng = np.random.default_rng(3)
    bn = nf.BatchNormalization(fixed_config=cfg)
    bn.build((None, 4, 4, 7))
    for variable, value in ((bn.gamma, rng.uniform(-2, 2, 7)), (bn.beta, rng.standard_normal(7)),
                            (bn.moving_mean, rng.standard_normal(7)), (bn.moving_variance, rng.uniform(0.1, 9, 7))):
        variable.assign(value.astype(np.float32))
    x = tf.constant((rng.standard_normal((5, 4, 4, 7)) * 3).astype(np.float32))
    point = bn.fixed_points["activation"]
    results = []
    for off in (False, True):
        with kernels.disabled() if off else contextlib.nullcontext():
            point.data_scale.assign(1)
            eager = bn(x, training=False).numpy()
            stored = point.data_scale.numpy()
            point.data_scale.assign(1)
            graph = tf.function(lambda t: bn(t, training=False))(x).numpy()
            ops = {op.type for op in tf.function(lambda t: bn(t, training=False)).get_concrete_function(
                x).graph.get_operations()}
            results.append((eager, stored, graph, "NicsFixScaleShiftQuantize" in ops))
    assert results[0][3] and not results[1][3]  # the kernel ran, then the plain ops did
    for with_kernel, without in zip(results[0][:3], results[1][:3]):
        assert same_bits(with_kernel, without)


@needs_kernel
def test_the_kernel_keeps_the_shape_and_refuses_bad_arguments():
    x = tf.random.normal((4, 3, 2))
    assert op(x, 1, bit_width=8, auto_scale=False)[0].shape == (4, 3, 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="bit_width must be 2..24, got 25"):
        op(x, 1, bit_width=25, auto_scale=False)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="scale must be a scalar|rank"):
        op(x, [1, 2], bit_width=8, auto_scale=False)


@needs_kernel
def test_quantize_ste_through_the_kernel_masks_clipped_gradients():
    x = tf.constant(np.float32([-3.0, -2.0, -0.3, 0.0, 0.7, 1.75, 1.9, 5.0, np.nan]))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = nf.quantize_ste(x, 4, 1)
    grad = tape.gradient(y, x, output_gradients=tf.ones_like(x) * 3.0).numpy()
    # range [-2, 1.75]: inside passes the gradient, clipped (and NaN) elements get 0
    np.testing.assert_array_equal(grad, np.float32([0, 3, 3, 3, 3, 3, 0, 0, 0]))
    np.testing.assert_array_equal(y.numpy()[:8], np.float32([-2.0, -2.0, -0.25, 0.0, 0.75, 1.75, 1.75, 1.75]))


@needs_kernel
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_a_quantized_layer_gives_the_same_bits_and_gradients_with_and_without_the_kernel(monkeypatch, granularity):
    """Forward, stored scales and all gradients of a training step, kernel on against kernel off."""
    cfg = {"data_config": {"bit_width": 6, "training": "auto", "not_training": "fixed",
                           "granularity": granularity},
           "gradient_config": {"bit_width": 6, "training": "auto", "granularity": granularity}}
    x = np.random.default_rng(1).standard_normal((16, 12)).astype(np.float32) * 4

    def step():
        with nf.fixed_scope("k", {"by_type": {"Dense": {"weight": cfg, "activation": cfg}}}):
            layer = nf.Dense(5)
            layer.build((None, 12))
        layer.kernel.assign(np.random.default_rng(2).standard_normal((12, 5)).astype(np.float32))

        @tf.function
        def run(t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = layer(t, training=True)
                loss = tf.reduce_sum(y * y)
            return (y, *tape.gradient(loss, [t, layer.kernel, layer.bias]),
                    *[tf.convert_to_tensor(v) for v in layer.non_trainable_weights])

        return [v.numpy() for v in run(tf.constant(x))]

    with_kernel = step()
    monkeypatch.setattr(quant, "_native_op", lambda: None)
    without = step()
    assert len(with_kernel) == len(without)
    for a, b in zip(with_kernel, without):
        assert same_bits(a, b)


def test_the_self_check_catches_a_wrong_kernel():
    def off_by_one_step(x, scale, bit_width, auto_scale):
        y, s, inside = op(x, scale, bit_width=bit_width, auto_scale=auto_scale) if op else (x, scale, True)
        return y * 1.5, s, inside

    assert kernels._self_check(off_by_one_step) == "2 bits, scale -3"
    if op is not None:
        assert kernels._self_check(op) == ""


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "NICS_FIX_LOGLEVEL": "info", "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, env=full, timeout=300)


FALLBACK_CHECK = """
    import numpy as np
    import nics_fix as nf
    from nics_fix import kernels
    print("STATUS", kernels.status())
    print("VALUES", nf.fixed_point_quantize(np.float32([0.3, -1.2, 5.0, -0.0]), 4, 1).numpy().tolist())
"""


@pytest.mark.parametrize("env, says", [
    ({"NICS_FIX_NATIVE": "0"}, "off (NICS_FIX_NATIVE=0): plain TensorFlow ops"),
    ({"CXX": "/nonexistent/g++"}, "failed (/nonexistent/g++ not found): plain TensorFlow ops, same values, slower"),
    ({"CXX": "false"}, "failed (exit 1, log: "),
])
def test_without_the_kernel_everything_runs_on_the_plain_ops(tmp_path, env, says):
    done = run_python(FALLBACK_CHECK, NICS_FIX_KERNEL_CACHE=str(tmp_path), **env)
    assert done.returncode == 0, done.stderr
    status = next(line for line in done.stdout.splitlines() if line.startswith("STATUS"))
    assert says in status
    assert "VALUES [0.25, -1.25, 1.75, -0.0]" in done.stdout
    assert not list(tmp_path.glob("*.so")), "a failed build must leave no library behind"
    if env.get("CXX") == "false":
        assert "fused quantize kernel: building" in done.stderr  # the warning names the failure once


@needs_kernel
def test_the_kernel_loads_first_inside_a_distribution_strategy_scope():
    # its self-check makes variables: they must not become mirrored ones
    done = run_python("""
        import tensorflow as tf
        with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
            from nics_fix import kernels
            print("STATUS", kernels.status())
    """)
    assert f"STATUS loaded {kernels.library_path()}" in done.stdout, done.stdout + done.stderr


def test_a_fresh_cache_builds_once_and_is_reused(tmp_path):
    if kernels.quantize_op() is None:
        pytest.skip(f"fused kernel not available: {kernels.status()}")
    first = run_python(FALLBACK_CHECK, NICS_FIX_KERNEL_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert "building the fused quantize kernel" in first.stderr
    assert "STATUS loaded " + str(tmp_path) in first.stdout
    second = run_python(FALLBACK_CHECK, NICS_FIX_KERNEL_CACHE=str(tmp_path))
    assert "building" not in second.stderr and "STATUS loaded" in second.stdout
    assert len(list(tmp_path.glob("quantize_op-*.so"))) == 1


def test_a_damaged_cached_library_is_built_again(tmp_path, monkeypatch):
    """A library that does not load is removed and built again once (here with a compiler
    that fails, so the test needs no real build): then the plain ops, never a crash."""
    monkeypatch.setenv("NICS_FIX_KERNEL_CACHE", str(tmp_path))
    path = str(kernels.library_path())
    tmp_path.mkdir(exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(b"half a library")  # as a crash mid-copy, or a library built elsewhere, leaves it
    done = run_python(FALLBACK_CHECK, NICS_FIX_KERNEL_CACHE=str(tmp_path), CXX="false")
    assert done.returncode == 0, done.stderr
    assert "does not load; building it again" in done.stderr
    assert "failed (exit 1, log: " in done.stdout and "plain TensorFlow ops" in done.stdout
    assert "VALUES [0.25, -1.25, 1.75, -0.0]" in done.stdout
    assert not os.path.exists(path), "the damaged library is gone"


def test_an_empty_channel_axis_quantizes_to_an_empty_tensor():
    empty = np.zeros((2, 0), np.float32)
    assert nf.fixed_point_quantize(empty, 8, np.zeros((1, 0), np.int32)).shape == (2, 0)
    y, scales, _ = quant._auto_quantize(tf.constant(empty), 8, "nearest", groups=quant.ScaleGroups(1, 0))
    assert y.shape == (2, 0) and scales.shape == (1, 0)
