"""The numeric core against an independent NumPy (float64) reference, bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

import nics_fix as nf
from nics_fix.quant import MAX_SCALE, MIN_SCALE, quantize_ste, representable_range


def ref_quantize(x, bit_width, scale, rounding="nearest"):
    """The format written out in float64 with NumPy; shares no code with nics_fix."""
    x = np.asarray(x, np.float32).astype(np.float64)
    step = math.ldexp(1.0, scale - bit_width + 1)
    v = x / step
    q = np.rint(v) if rounding == "nearest" else np.floor(v)
    return np.clip(q * step, -math.ldexp(1.0, scale), math.ldexp(1.0, scale) - step).astype(np.float32)


def ref_auto_scale(x):
    x = np.asarray(x, np.float32).astype(np.float64)
    finite = np.abs(x[np.isfinite(x)])
    m = finite.max() if finite.size else 0.0
    if m == 0.0:
        return MIN_SCALE
    mantissa, exponent = np.frexp(m)  # m = mantissa * 2**exponent, mantissa in [0.5, 1)
    scale = int(exponent) - 1 if mantissa == 0.5 else int(exponent)
    return int(np.clip(scale, MIN_SCALE, MAX_SCALE))


@pytest.mark.parametrize("rounding", ["nearest", "floor"])
def test_matches_reference_for_all_widths_and_scales(rounding, rng):
    checked = 0
    for bit_width in range(2, 17):
        for scale in range(-10, 11):
            step = 2.0 ** (scale - bit_width + 1)
            # Random values over and beyond the range (to exercise clipping),
            # plus exact ties and exact grid points.
            x = rng.standard_normal(200) * 2.0 ** scale * rng.uniform(0.1, 2.5)
            ties = (rng.integers(-2 ** (bit_width - 1), 2 ** (bit_width - 1), 50) + 0.5) * step
            grid = rng.integers(-2 ** (bit_width - 1), 2 ** (bit_width - 1), 50) * step
            x = np.concatenate([x, ties, grid]).astype(np.float32)
            got = nf.fixed_point_quantize(x, bit_width, scale, rounding).numpy()
            want = ref_quantize(x, bit_width, scale, rounding)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want, err_msg=f"w={bit_width} s={scale}")
            checked += 1
    assert checked == 15 * 21


def test_ties_round_to_even():
    # step 0.25: 0.125 -> 0, 0.375 -> 0.5, -0.125 -> -0
    got = nf.fixed_point_quantize(np.array([0.125, 0.375, 0.625, -0.125]), 4, 1).numpy()
    np.testing.assert_array_equal(got, [0.0, 0.5, 0.5, 0.0])


def test_floor_truncates_toward_minus_infinity():
    got = nf.fixed_point_quantize(np.array([0.49, -0.01, -0.26]), 4, 1, "floor").numpy()
    np.testing.assert_array_equal(got, [0.25, -0.25, -0.5])


def test_range_ends_and_saturation():
    low, high = representable_range(4, 1)
    assert float(low) == -2.0 and float(high) == 1.75
    got = nf.fixed_point_quantize(np.array([5.0, -5.0, np.inf, -np.inf, 1.75, -2.0]), 4, 1).numpy()
    np.testing.assert_array_equal(got, [1.75, -2.0, 1.75, -2.0, 1.75, -2.0])


def test_nan_stays_nan_and_other_values_are_unaffected():
    got = nf.fixed_point_quantize(np.array([np.nan, 0.3]), 8, 0).numpy()
    assert np.isnan(got[0]) and got[1] == ref_quantize([0.3], 8, 0)[0]


def test_accepts_tensors_scale_tensors_and_float64():
    x64 = np.array([0.1, 0.2, -0.7])
    a = nf.fixed_point_quantize(tf.constant(x64), 6, tf.constant(0)).numpy()
    np.testing.assert_array_equal(a, ref_quantize(x64, 6, 0))


def test_one_and_thirty_two_bits():
    # 1 bit (sign only): the grid is {-2**s, 0}.
    got = nf.fixed_point_quantize(np.array([-3.0, -0.6, 0.2, 0.9]), 1, 0).numpy()
    np.testing.assert_array_equal(got, [-1.0, -1.0, 0.0, 0.0])
    x = np.float32([0.123456789, -0.5])
    np.testing.assert_array_equal(nf.fixed_point_quantize(x, 32, 0).numpy(), x)


@pytest.mark.parametrize("bad", [0, 33, -1, 2.5, True, "8", None])
def test_bad_bit_width_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="bit_width"):
        nf.fixed_point_quantize([1.0], bad, 0)


def test_bad_rounding_is_a_clear_error():
    with pytest.raises(ValueError, match="rounding must be one of nearest, floor, stochastic"):
        nf.fixed_point_quantize([1.0], 8, 0, rounding="up")


def test_scale_beyond_limits_is_clamped_not_broken():
    x = np.float32([1e30, 1e-30])
    big = nf.fixed_point_quantize(x, 8, 500).numpy()
    assert np.all(np.isfinite(big))
    tiny = nf.fixed_point_quantize(x, 32, -500).numpy()
    assert np.all(np.isfinite(tiny))


# ---------------------------------------------------------------------------
# auto_scale
# ---------------------------------------------------------------------------


def test_auto_scale_matches_reference(rng):
    for exponent in range(-30, 31):
        x = rng.standard_normal(64).astype(np.float32) * np.float32(2.0 ** exponent)
        assert int(nf.auto_scale(x)) == ref_auto_scale(x)


@pytest.mark.parametrize(
    "value, scale",
    [(1.0, 0), (8.0, 3), (8.000001, 4), (7.99, 3), (0.5, -1), (0.3, -1), (0.25, -2), (3e38, MAX_SCALE)],
)
def test_auto_scale_exact_at_powers_of_two(value, scale):
    assert int(nf.auto_scale(np.float32([value, -value / 2]))) == scale


def test_auto_scale_is_finite_for_zero_inf_and_nan():
    assert int(nf.auto_scale(np.zeros(5, np.float32))) == MIN_SCALE
    assert int(nf.auto_scale(np.float32([np.inf, -2.0, np.nan]))) == 1
    assert int(nf.auto_scale(np.float32([np.inf, np.nan]))) == MIN_SCALE
    assert int(nf.auto_scale(np.float32([1e-45]))) == MIN_SCALE  # subnormal


# ---------------------------------------------------------------------------
# Stochastic rounding
# ---------------------------------------------------------------------------


def test_stochastic_only_neighbours_and_unbiased(rng):
    bit_width, scale = 6, 0
    step = 2.0 ** (scale - bit_width + 1)
    x = rng.uniform(-0.9, 0.9, 200_000).astype(np.float32)
    q = nf.fixed_point_quantize(x, bit_width, scale, "stochastic", seed=7).numpy()
    lower = ref_quantize(x, bit_width, scale, "floor")
    upper = lower + np.float32(step)
    assert np.all((q == lower) | (q == upper))
    err = q.astype(np.float64) - x
    # Each error has variance <= step**2 / 4: the mean is within 5 sigma of 0.
    assert abs(err.mean()) < 5 * (step / 2) / math.sqrt(x.size)


def test_stochastic_probability_equals_fraction():
    x = np.full(100_000, 0.3, np.float32)  # step 1/4 at (w=3, s=0): 0.3 = 1.2 steps
    q = nf.fixed_point_quantize(x, 3, 0, "stochastic", seed=3).numpy()
    frac_up = np.mean(q == 0.5)
    p = (0.3 - 0.25) / 0.25
    assert abs(frac_up - p) < 5 * math.sqrt(p * (1 - p) / x.size)


def test_stochastic_seed_reproducible_and_grid_values_fixed(rng):
    x = rng.standard_normal(1000).astype(np.float32)
    a = nf.fixed_point_quantize(x, 8, 2, "stochastic", seed=11).numpy()
    b = nf.fixed_point_quantize(x, 8, 2, "stochastic", seed=11).numpy()
    c = nf.fixed_point_quantize(x, 8, 2, "stochastic", seed=12).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    on_grid = ref_quantize(x, 8, 2)
    np.testing.assert_array_equal(nf.fixed_point_quantize(on_grid, 8, 2, "stochastic").numpy(), on_grid)


# ---------------------------------------------------------------------------
# Straight-through gradient
# ---------------------------------------------------------------------------


def test_ste_passes_inside_and_masks_clipped(rng):
    x = tf.constant(np.float32([-3.0, -2.0, -0.3, 0.0, 1.7, 1.75, 1.76, 4.0]))
    upstream = tf.constant(rng.standard_normal(8).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = quantize_ste(x, 4, 1)  # range [-2, 1.75]
        loss = tf.reduce_sum(y * upstream)
    grad = tape.gradient(loss, x).numpy()
    inside = np.array([False, True, True, True, True, True, False, False])
    np.testing.assert_array_equal(grad, np.where(inside, upstream.numpy(), 0.0))
    np.testing.assert_array_equal(y.numpy(), ref_quantize(x.numpy(), 4, 1))
