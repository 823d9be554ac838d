"""The numeric core: the fixed-point format and its rounding, in one place.

A fixed-point number has a bit width ``w`` (sign bit included) and an integer
power-of-two scale ``s``::

    step  = 2 ** (s - w + 1)
    range = [-2 ** s, 2 ** s - step]
    quantize(x) = clip(round(x / step) * step, -2 ** s, 2 ** s - step)

Every layer, strategy, optimizer wrapper and exporter in ``nics_fix`` calls
:func:`fixed_point_quantize` (forward values) and :func:`auto_scale` (scale from
data); nothing else rounds. The functions are pure: they read no variables and
write none, so they can be tested against a NumPy reference bit for bit.

Scales are clamped to ``[MIN_SCALE, MAX_SCALE]`` so that ``step``, ``1/step``
and ``2**s`` are all *normal* float32 numbers for every bit width 1..32; this is
what keeps ``x * (1/step)`` and ``q * step`` exact (multiplying by a power of
two never rounds while the result stays normal).

Example:

>>> import numpy as np
>>> fixed_point_quantize(np.array([0.3, -1.2, 5.0]), bit_width=4, scale=1).numpy()
array([ 0.25, -1.25,  1.75], dtype=float32)
>>> int(auto_scale(np.array([0.3, -1.2])))
1
"""

from __future__ import annotations

import numbers

import numpy as np  # noqa: F401  (the doctest examples use it)
import tensorflow as tf

#: Rounding modes understood by :func:`fixed_point_quantize`.
ROUNDING_MODES = ("nearest", "floor", "stochastic")

#: Smallest scale ever used. 2**(MIN_SCALE - 32 + 1) is still a normal float32,
#: so every bit width keeps an exact step. :func:`auto_scale` returns this for an
#: all-zero (or all non-finite) tensor: such a tensor quantizes to zeros anyway.
MIN_SCALE = -94
#: Largest scale ever used: 2**126 and, for 1 bit, 1/step = 2**-126 stay normal.
#: Inf saturates to the ends of this range.
MAX_SCALE = 126
MIN_BIT_WIDTH = 1
MAX_BIT_WIDTH = 32


def check_bit_width(bit_width) -> int:
    """Return ``bit_width`` as an int, or raise ``ValueError`` if it is not 1..32."""
    if isinstance(bit_width, bool) or not isinstance(bit_width, numbers.Integral):
        raise ValueError(
            f"bit_width must be an integer from {MIN_BIT_WIDTH} to {MAX_BIT_WIDTH}, "
            f"got {bit_width!r}"
        )
    if not MIN_BIT_WIDTH <= int(bit_width) <= MAX_BIT_WIDTH:
        raise ValueError(
            f"bit_width must be from {MIN_BIT_WIDTH} to {MAX_BIT_WIDTH}, got {bit_width}"
        )
    return int(bit_width)


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDING_MODES)}, got {rounding!r}")
    return rounding


def pow2(exponent) -> tf.Tensor:
    """Exact ``2.0 ** exponent`` as float32 for integer exponents in [-126, 127].

    Built from the IEEE-754 bit pattern instead of ``tf.pow`` because ``pow``
    is not guaranteed exact, and one ulp off would move every grid point.
    """
    exponent = tf.cast(exponent, tf.int32)
    return tf.bitcast(tf.bitwise.left_shift(exponent + 127, 23), tf.float32)


def clamp_scale(scale) -> tf.Tensor:
    """Scale as an int32 tensor clamped to ``[MIN_SCALE, MAX_SCALE]``."""
    return tf.clip_by_value(tf.cast(scale, tf.int32), MIN_SCALE, MAX_SCALE)


def auto_scale(x) -> tf.Tensor:
    """``ceil(log2(max|x|))`` over the finite values of ``x``, as an int32 scalar.

    Computed from the float32 exponent bits, so it is exact (``log(m)/log(2)``
    in float32 can land one above an exact power of two). Inf and NaN are
    ignored; an all-zero tensor (or one with no finite value) gets
    :data:`MIN_SCALE`; the result is always clamped to
    ``[MIN_SCALE, MAX_SCALE]``, so it is never NaN or infinite.
    """
    x = tf.convert_to_tensor(x)
    if x.dtype != tf.float32:
        x = tf.cast(x, tf.float32)
    m = tf.reduce_max(tf.abs(x))

    def finite_max():
        # Only taken when an Inf/NaN is present: keeps the common path at one
        # reduction instead of three elementwise passes.
        return tf.reduce_max(tf.where(tf.math.is_finite(x), tf.abs(x), tf.zeros_like(x)))

    m = tf.cond(tf.math.is_finite(m), lambda: m, finite_max)
    bits = tf.bitcast(m, tf.int32)
    exponent = tf.bitwise.right_shift(bits, 23) - 127
    mantissa = tf.bitwise.bitwise_and(bits, 0x7FFFFF)
    scale = exponent + tf.cast(mantissa != 0, tf.int32)
    # m == 0 and subnormal m give a tiny exponent: the clamp maps them to MIN_SCALE.
    return clamp_scale(scale)


def quantization_step(bit_width: int, scale) -> tf.Tensor:
    """``2 ** (scale - bit_width + 1)``, the distance between grid points."""
    return pow2(clamp_scale(scale) - (bit_width - 1))


def _uniform(shape, seed):
    if seed is None:
        return tf.random.uniform(shape, dtype=tf.float32)
    if isinstance(seed, numbers.Integral):
        seed = tf.constant([int(seed), 0], dtype=tf.int64)
    return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)


def fixed_point_quantize(x, bit_width, scale, rounding: str = "nearest", seed=None) -> tf.Tensor:
    """Quantize ``x`` to ``bit_width``-bit fixed point with power-of-two ``scale``.

    Args:
        x: tensor or NumPy array; computed in float32.
        bit_width: 1..32, sign bit included (a Python int).
        scale: integer scale ``s`` (Python int or int tensor); range is
            ``[-2**s, 2**s - step]``.
        rounding: ``"nearest"`` (ties to even, as ``tf.round``/``np.rint``),
            ``"floor"`` (toward -inf, i.e. dropping low bits) or
            ``"stochastic"`` (up with probability equal to the fraction).
        seed: for stochastic rounding only: ``None`` (stateful RNG, follows the
            global seed), an int, or a shape-[2] int tensor (stateless,
            reproducible).

    Returns:
        float32 tensor of the same shape. NaN stays NaN; Inf saturates.

    This function has no custom gradient: use :func:`quantize_ste` inside
    models.
    """
    bit_width = check_bit_width(bit_width)
    check_rounding(rounding)
    x = tf.convert_to_tensor(x)
    if x.dtype != tf.float32:
        x = tf.cast(x, tf.float32)
    scale = clamp_scale(scale)
    step_exp = scale - (bit_width - 1)
    step = pow2(step_exp)
    inv_step = pow2(-step_exp)
    v = x * inv_step  # exact: multiplying by a power of two
    if rounding == "nearest":
        q = tf.round(v)
    elif rounding == "floor":
        q = tf.floor(v)
    else:
        # floor(v) + [u < frac(v)] instead of floor(v + u): adding u to a large
        # v would round in float32 and move values that are already on the grid.
        lower = tf.floor(v)
        up = _uniform(tf.shape(v), seed) < (v - lower)
        q = lower + tf.cast(up, tf.float32)
    high = pow2(scale) - step
    return tf.clip_by_value(q * step, -pow2(scale), high)


def representable_range(bit_width: int, scale):
    """``(low, high)`` float32 ends of the representable range."""
    scale = clamp_scale(scale)
    return -pow2(scale), pow2(scale) - quantization_step(bit_width, scale)


def quantize_ste(x, bit_width, scale, rounding: str = "nearest", seed=None) -> tf.Tensor:
    """:func:`fixed_point_quantize` with the straight-through gradient.

    The gradient passes unchanged where ``x`` lies inside the representable
    range ``[-2**s, 2**s - step]`` and is zero where ``x`` was clipped.
    """
    x = tf.convert_to_tensor(x)
    scale = clamp_scale(scale)

    @tf.custom_gradient
    def _quantize(x):
        y = fixed_point_quantize(x, bit_width, scale, rounding, seed)

        def grad(dy):
            low, high = representable_range(bit_width, scale)
            inside = tf.logical_and(x >= low, x <= high)
            return tf.where(inside, dy, tf.zeros_like(dy))

        return y, grad

    return _quantize(x)


__all__ = [
    "MAX_BIT_WIDTH",
    "MAX_SCALE",
    "MIN_BIT_WIDTH",
    "MIN_SCALE",
    "ROUNDING_MODES",
    "auto_scale",
    "fixed_point_quantize",
    "quantization_step",
    "quantize_ste",
    "representable_range",
]
