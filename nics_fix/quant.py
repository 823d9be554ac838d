"""The numeric core: the fixed-point format and its rounding, in one place.

A fixed-point number has a bit width ``w`` (sign bit included) and an integer
power-of-two scale ``s``::

    step  = 2 ** (s - w + 1)
    range = [-2 ** s, 2 ** s - step]
    quantize(x) = clip(round(x / step) * step, -2 ** s, 2 ** s - step)

Every layer, strategy, optimizer wrapper and exporter in ``nics_fix`` calls
:func:`fixed_point_quantize` (forward values) and :func:`auto_scale` (scale from
data), or (the quantization points) the private building blocks they are made
of; nothing else rounds. The functions are pure: they read no variables and
write none, so they can be tested against a NumPy reference bit for bit.

Speed, never at the cost of a value (``benchmarks/quant_exactness.py`` and
``tests/test_kernels.py`` check every path bit for bit): round-to-nearest with
one scale per tensor (2..24 bits, CPU, outside XLA) runs as nics_fix's own
fused kernel (:mod:`nics_fix.kernels`, built on first use), which computes an
auto scale, the quantize and the clip test in one op; where it cannot be
built, TensorFlow's fused QuantizeAndDequantizeV2 kernel quantizes and an auto
scale costs two read-only reductions, which also tell the backward pass when
the straight-through mask is all ones. nics_fix's kernel also takes one scale
per channel of the last axis, and BatchNormalization's exact evaluation;
per-block scales and other axes take the plain ops; under XLA
(``jit_compile=True``) plain ops are used and XLA fuses them. :func:`_plain_quantize` is the definition every fused path matches.

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

import functools
import math
import numbers
import os

import numpy as np
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


def _abs_max_finite(x):
    """``(m, extremes)``: ``m = max |x|`` over the finite values of float32 ``x``
    (0 if there are none, -inf if ``x`` is empty) and ``extremes = (max(x),
    min(x))``, or None under XLA."""
    def finite_max():
        return tf.reduce_max(tf.where(tf.math.is_finite(x), tf.abs(x), tf.zeros([], x.dtype)))

    if _in_xla_context():
        return finite_max(), None  # XLA fuses the mask into the reduction: one pass, no branch
    # max|x| = max(max(x), -min(x)): two read-only reductions, no |x| temporary.
    # Both reductions propagate NaN and an Inf shows up in one of them, so a
    # non-finite m means "an Inf or NaN is present": only then the masked pass.
    hi, lo = tf.reduce_max(x), tf.reduce_min(x)
    m = tf.maximum(hi, -lo)
    return tf.cond(tf.math.is_finite(m), lambda: m, finite_max), (hi, lo)


def _pow2_ceil(m):
    """``(s, 2.0**s)`` with ``s = ceil(log2(m))`` clamped to ``[MIN_SCALE, MAX_SCALE]``.

    Clamping ``m`` to ``[2**MIN_SCALE, 2**MAX_SCALE]`` first is the same as
    clamping ``s`` (``ceil(log2(.))`` is monotonic and exact at powers of two)
    and also maps 0, subnormals and -inf to MIN_SCALE. Adding ``0x7FFFFF`` to
    the bits of a positive normal float carries into the exponent exactly when
    the mantissa is not zero, so the exponent field becomes ``ceil(log2(m))``.
    """
    m = tf.clip_by_value(m, 2.0 ** MIN_SCALE, 2.0 ** MAX_SCALE)
    p_bits = tf.bitwise.bitwise_and(tf.bitcast(m, tf.int32) + 0x7FFFFF, 0x7F800000)
    return tf.bitwise.right_shift(p_bits, 23) - 127, tf.bitcast(p_bits, tf.float32)


def _as_float32(x) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
    return x if x.dtype == tf.float32 else tf.cast(x, tf.float32)


def _as_float(x) -> tf.Tensor:
    """float64 stays float64 (exact sums of an accumulator); anything else becomes float32."""
    x = tf.convert_to_tensor(x)
    return x if x.dtype in (tf.float32, tf.float64) else tf.cast(x, tf.float32)


def _auto_scale_pow2(x):
    """:func:`auto_scale` and ``2.0 ** scale`` (float32), without recomputing the power."""
    return _pow2_ceil(_abs_max_finite(_as_float32(x))[0])


def _auto_format(x, bit_width: int):
    """For float32 ``x``: ``(format with the auto scale, all_inside)``.

    ``all_inside`` is a bool scalar, true when every element of ``x`` lies in
    the representable range (then the STE mask is all ones and the backward
    pass can skip it), read off the same two reductions; None under XLA.
    """
    m, extremes = _abs_max_finite(x)
    scale, p = _pow2_ceil(m)
    fmt = _Format(bit_width, scale, p)
    if extremes is None:
        return fmt, None
    # NaN makes max(x) NaN and an Inf sits at one of the ends: both compare false.
    x_max, x_min = extremes
    return fmt, tf.logical_and(x_max <= fmt.high, x_min >= fmt.low)


class ScaleGroups:
    """Which elements of a tensor share one scale: per slice or per block along ``axis``.

    * ``block_size=None`` (per channel): one scale per index along ``axis``,
      shared by all the other axes; the scales have ``x``'s rank with 1
      everywhere but ``axis``, so they broadcast against ``x``.
    * ``block_size=k``: one scale per run of ``k`` consecutive elements along
      ``axis`` (the last run may be shorter), separately for every position of
      the other axes except ``shared_axes`` (their positions share the scale:
      the batch axis of activations and gradients, whose size changes from
      call to call). The scales have ``x``'s shape with ``ceil(n/k)`` along
      ``axis`` and 1 along ``shared_axes``; :meth:`expand` repeats them to
      broadcast against ``x``.

    ``axis`` is non-negative and ``n`` is ``x.shape[axis]`` (static).
    """

    def __init__(self, axis: int, n: int, block_size: int | None = None, shared_axes=()):
        self.axis, self.n = int(axis), int(n)
        self.block_size = None if block_size is None else int(block_size)
        self.shared_axes = tuple(int(a) for a in shared_axes)
        self.blocks = self.n if self.block_size is None else -(-self.n // self.block_size)

    @classmethod
    def for_tensor(cls, shape, axis, block_size=None, shared_axes=()) -> "ScaleGroups":
        """Groups for tensors of ``shape``; ``ValueError`` on an axis or block size that cannot work."""
        shape = tuple(shape)
        rank = len(shape)
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -rank <= axis < rank:
            raise ValueError(f"axis must be an integer from {-rank} to {rank - 1} for a tensor of "
                             f"shape {shape}, got {axis!r}")
        axis = int(axis) % rank
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral)
                                       or block_size < 1):
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if shape[axis] is None:
            raise ValueError(f"axis {axis} of shape {shape} has no static size: scales along it need one")
        if axis in shared_axes:
            raise ValueError(f"axis {axis} is the batch axis: scales cannot run along it")
        return cls(axis, shape[axis], block_size, shared_axes)

    def scale_shape(self, shape) -> tuple:
        """Shape of the scales of a tensor of ``shape`` (its shared axes as 1)."""
        if self.block_size is None:
            return tuple(self.n if i == self.axis else 1 for i in range(len(shape)))
        return tuple(self.blocks if i == self.axis else 1 if i in self.shared_axes else d
                     for i, d in enumerate(shape))

    def reduce(self, x, op, pad_value):
        """``op`` (``tf.reduce_max``/``min``/``sum``) over each group, in the scales' shape.

        A ragged last block is padded with ``pad_value`` (neutral for ``op``).
        """
        rank = x.shape.rank
        if self.block_size is None:
            return op(x, axis=[i for i in range(rank) if i != self.axis], keepdims=True)
        b, axis = self.block_size, self.axis
        padded = self.blocks * b
        if padded != self.n:
            pads = [[0, 0]] * rank
            pads[axis] = [0, padded - self.n]
            x = tf.pad(x, pads, constant_values=pad_value)
        shape = tf.shape(x)
        x = tf.reshape(x, tf.concat([shape[:axis], [self.blocks, b], shape[axis + 1:]], 0))
        out = op(x, axis=axis + 1)
        return op(out, axis=list(self.shared_axes), keepdims=True) if self.shared_axes else out

    def expand(self, scales):
        """Scales (or anything of their shape) repeated so that they broadcast against ``x``."""
        if self.block_size is None or self.block_size == 1:
            return scales
        return tf.gather(scales, np.arange(self.n) // self.block_size, axis=self.axis)

    def __repr__(self) -> str:
        return (f"ScaleGroups(axis={self.axis}, n={self.n}, block_size={self.block_size}, "
                f"shared_axes={self.shared_axes})")


def _group_abs_max_finite(x, groups: ScaleGroups):
    """Per group: ``(m, (max(x), min(x)))`` as :func:`_abs_max_finite` computes them per tensor."""
    hi = groups.reduce(x, tf.reduce_max, -np.inf)
    lo = groups.reduce(x, tf.reduce_min, np.inf)
    m = tf.maximum(hi, -lo)

    def finite_max():
        return groups.reduce(tf.where(tf.math.is_finite(x), tf.abs(x), tf.zeros([], x.dtype)),
                             tf.reduce_max, 0.0)

    if _in_xla_context():
        return finite_max(), (hi, lo)
    return tf.cond(tf.reduce_all(tf.math.is_finite(m)), lambda: m, finite_max), (hi, lo)


def _grouped_auto_format(x, bit_width: int, groups: ScaleGroups):
    """For float32 ``x``: ``(format with the per-group auto scales expanded, all_inside, scales)``."""
    m, (x_max, x_min) = _group_abs_max_finite(x, groups)
    scale, p = _pow2_ceil(m)
    own = _Format(bit_width, scale, p)
    all_inside = tf.reduce_all(tf.logical_and(x_max <= own.high, x_min >= own.low))
    return _Format(bit_width, groups.expand(scale), groups.expand(p)), all_inside, scale


def _groups_for(x, axis, block_size) -> ScaleGroups | None:
    if axis is None:
        if block_size is not None:
            raise ValueError("block_size needs an axis: blocks run along one axis")
        return None
    return ScaleGroups.for_tensor(x.shape, axis, block_size)


def auto_scale(x, axis=None, block_size=None) -> tf.Tensor:
    """``ceil(log2(max|x|))`` over the finite values of ``x`` (int32): per tensor,
    per slice along ``axis`` or per block of ``block_size`` elements along ``axis``.

    Computed from the float32 exponent bits, so it is exact (``log(m)/log(2)``
    in float32 can land one above an exact power of two). Inf and NaN are
    ignored; an all-zero tensor (or one with no finite value) gets
    :data:`MIN_SCALE`; the result is always clamped to
    ``[MIN_SCALE, MAX_SCALE]``, so it is never NaN or infinite.

    Shapes (see :class:`ScaleGroups`): a scalar by default; with ``axis`` only,
    ``x``'s rank with 1 everywhere but ``axis`` (one scale per slice); with
    ``block_size`` too, ``x``'s shape with ``ceil(n / block_size)`` along
    ``axis``. Pass the same ``axis``/``block_size`` to
    :func:`fixed_point_quantize` to quantize with block scales.

    >>> auto_scale(np.float32([[0.3, 5.0], [-1.2, 0.1]]), axis=1).numpy().tolist()
    [[1, 3]]
    >>> auto_scale(np.float32([0.3, 5.0, -1.2]), axis=0, block_size=2).numpy().tolist()
    [3, 1]
    """
    if axis is None and block_size is None:
        return _auto_scale_pow2(x)[0]
    x = _as_float32(x)
    return group_auto_scale(x, _groups_for(x, axis, block_size))


def group_auto_scale(x, groups: ScaleGroups | None) -> tf.Tensor:
    """:func:`auto_scale` per group of ``groups`` (one scale for ``None``), in the scales' shape."""
    if groups is None:
        return _auto_scale_pow2(x)[0]
    return _pow2_ceil(_group_abs_max_finite(_as_float32(x), groups)[0])[0]


def quantization_step(bit_width: int, scale) -> tf.Tensor:
    """``2 ** (scale - bit_width + 1)``, the distance between grid points."""
    return pow2(clamp_scale(scale) - (bit_width - 1))


def _uniform(shape, seed):
    if seed is None:
        return tf.random.uniform(shape, dtype=tf.float32)
    if isinstance(seed, numbers.Integral):
        seed = tf.constant([int(seed), 0], dtype=tf.int64)
    return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)


#: Formats quantized by TensorFlow's fused QuantizeAndDequantizeV2 CPU kernel
#: (clamp, scale, round half to even, unscale: one pass instead of five). Up to
#: 24 bits the kernel's float copies of ``2**(w-1) - 1`` and of the range end
#: ``2**s - step = step * (2**(w-1) - 1)`` are exact, so it computes
#: ``clip(x, lo, hi) * (1/step)``, rounds and multiplies by ``step`` with exactly
#: our powers of two; clipping before rounding to the integer grid equals
#: rounding then clipping. One bit is left out: its upper end is +0 and the
#: kernel keeps a -0 that ``clip_by_value`` turns into +0.
_FUSED_BITS = range(2, 25)


@functools.lru_cache(maxsize=None)
def _only_cpu_devices() -> bool:
    return all(d.device_type == "CPU" for d in tf.config.list_physical_devices())


def _fused_kernel_allowed() -> bool:
    """True where the fused kernel is TensorFlow's CPU kernel, which keeps NaN.

    Its XLA lowering clamps NaN to the low end and its GPU kernel uses
    ``fminf``/``fmaxf``, so it is avoided when tracing for XLA
    (``jit_compile=True``), under XLA auto-clustering and where any
    accelerator is visible. There the plain ops are used; XLA fuses them anyway.
    """
    return not _may_compile_with_xla() and _only_cpu_devices()


def _may_compile_with_xla() -> bool:
    """True while tracing for XLA (``jit_compile=True``), under XLA auto-clustering, or
    where TensorFlow cannot tell."""
    return (_in_xla_context() is not False or bool(tf.config.optimizer.get_jit())
            or "auto_jit" in os.environ.get("TF_XLA_FLAGS", ""))


def _in_xla_context():
    """True while tracing for XLA (``jit_compile=True``); None if TensorFlow can't tell us."""
    try:
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - internal layout changed
        return None
    return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))


class _Format:
    """The constants of one ``(bit_width, scale)`` format: scale ``s``, ``p = 2**s``,
    the range ends and the step, as Python floats for a Python-int scale (no ops
    at all) or as float32 scalar tensors."""

    def __init__(self, bit_width: int, scale, p=None):
        self.bit_width = bit_width = check_bit_width(bit_width)
        if p is None and isinstance(scale, numbers.Integral):
            s = min(max(int(scale), MIN_SCALE), MAX_SCALE)
            self.scale, self.p = s, math.ldexp(1.0, s)
            self.step = math.ldexp(1.0, s - bit_width + 1)
            self.inv_step = math.ldexp(1.0, bit_width - 1 - s)
            self.low = -self.p
            # 2**s - step, rounded to float32 once, as the float32 subtraction does.
            self.high = float(np.float32(self.p - self.step))
            return
        if p is None:
            scale = clamp_scale(scale)
            p = pow2(scale)
        self.scale, self.p = scale, p
        self.low = -p
        if bit_width <= 24:
            # 2**s - step == 2**s * (1 - 2**(1-w)): exact, one op.
            self.high = p * np.float32(1.0 - math.ldexp(1.0, 1 - bit_width))
        else:
            self.high = p - pow2(scale - (bit_width - 1))

    def steps(self):
        """``(step, 1/step)``, built only where needed."""
        if isinstance(self.p, float):
            return self.step, self.inv_step
        step_exp = self.scale - (self.bit_width - 1)
        return pow2(step_exp), pow2(-step_exp)


def _one_range(fmt: _Format) -> bool:
    """True when ``fmt`` has one range for the whole tensor (its ends hold one value)."""
    return isinstance(fmt.low, float) or fmt.low.shape.num_elements() == 1


def _quantize(x, fmt: _Format, rounding: str, seed=None):
    """:func:`fixed_point_quantize` of float32 ``x`` in the format ``fmt``.

    A float64 ``x`` (an exact sum, see :mod:`nics_fix.accumulator`) is rounded
    in float64, with the same plain ops, so a value with more significant bits
    than float32 holds is rounded once, onto the grid, never twice.
    """
    return _quantize_checked(x, fmt, rounding, seed)[0]


def _fused(bit_width: int, rounding: str) -> bool:
    """True when the fused CPU kernels compute this quantize (one scale per tensor;
    nics_fix's own kernel also one per channel of the last axis)."""
    return rounding == "nearest" and bit_width in _FUSED_BITS and _fused_kernel_allowed()


def _native_op():
    """nics_fix's own fused kernel (:mod:`nics_fix.kernels`), or None where it is not built."""
    from nics_fix.kernels import quantize_op

    return quantize_op()


def _quantize_checked(x, fmt: _Format, rounding: str, seed=None):
    """``(quantized x, all_inside)``: as :func:`_quantize`; ``all_inside`` (bool
    scalar: no element NaN or clipped) where the fused kernel tells it for free, else None."""
    if x.dtype == tf.float64:
        return _quantize_float64(x, fmt, rounding, seed), None
    # Per-block formats take the plain ops, and per-channel ones do too where
    # nics_fix's kernel cannot run: TensorFlow's per-channel fused kernel
    # (QuantizeAndDequantizeV3 with an axis) measured slower than them in a training step.
    if _one_range(fmt) and _fused(fmt.bit_width, rounding):
        op = _native_op()
        if op is not None:
            scale = fmt.scale
            if not isinstance(scale, numbers.Integral) and scale.shape.rank:
                scale = tf.reshape(scale, [])
            y, _, all_inside = op(x, scale, bit_width=fmt.bit_width, auto_scale=False)
            return y, all_inside
        low, high = fmt.low, fmt.high
        if not isinstance(low, float) and low.shape.rank:
            low, high = tf.reshape(low, []), tf.reshape(high, [])
        y = tf.raw_ops.QuantizeAndDequantizeV2(
            input=x, input_min=low, input_max=high, signed_input=True,
            num_bits=fmt.bit_width, range_given=True, round_mode="HALF_TO_EVEN", narrow_range=False)
        # Like tf.round, the fused kernel must not pass gradients (its registered
        # gradient is the identity): use quantize_ste for the straight-through one.
        return tf.stop_gradient(y), None
    if _fused(fmt.bit_width, rounding) and _last_axis_scales(fmt, x):
        op = _native_op()
        if op is not None:
            y, _, all_inside = op(x, tf.reshape(fmt.scale, [-1]), bit_width=fmt.bit_width, auto_scale=False,
                                  per_channel=True)
            return y, all_inside
    return _plain_quantize(x, fmt, rounding, seed), None


def _plain_quantize(x, fmt: _Format, rounding: str, seed=None):
    """The quantize in plain TensorFlow ops (the definition the fused kernels must match)."""
    step, inv_step = fmt.steps()
    q = _round_steps(x * inv_step, rounding, seed)  # exact: multiplying by a power of two
    return tf.clip_by_value(q * step, fmt.low, fmt.high)


def _auto_quantize(x, bit_width: int, rounding: str, seed=None, guess=None, groups: "ScaleGroups | None" = None):
    """Float32 ``x`` quantized with its auto scales: ``(y, scales, all_inside)``.

    One scale per tensor, or per group of ``groups`` (``scales`` then in the
    groups' scale shape). ``y`` carries no gradient (wrap it with
    :func:`_straight_through`); ``all_inside`` is None under XLA. Where
    nics_fix's fused kernel runs (per tensor, or per channel of the last
    axis), the scales, the quantize and the clip test are one op, and
    ``guess`` (int32 scales in the same shape, e.g. those stored by the last
    call) saves it a pass over memory when it is right; the result never
    depends on it.
    """
    op = _native_op() if _fused(bit_width, rounding) else None
    if groups is None:
        if op is not None:
            return op(x, 0 if guess is None else guess, bit_width=bit_width, auto_scale=True)
        fmt, all_inside = _auto_format(x, bit_width)
        return _quantize(x, fmt, rounding, seed), fmt.scale, all_inside
    if op is not None and groups.block_size is None and groups.axis == x.shape.rank - 1 and groups.n > 0:
        guess = tf.zeros([groups.n], tf.int32) if guess is None else tf.reshape(guess, [-1])
        y, scales, all_inside = op(x, guess, bit_width=bit_width, auto_scale=True, per_channel=True)
        return y, tf.reshape(scales, groups.scale_shape(x.shape)), all_inside
    fmt, all_inside, scales = _grouped_auto_format(x, bit_width, groups)
    return _quantize(x, fmt, rounding, seed), scales, all_inside


def _scale_shift_quantize(x, a, c, bit_width: int, scale, auto: bool):
    """Float32 ``x * a + c`` (``a``, ``c``: one float32 value per channel of ``x``'s
    last axis; the products and sums in float64, as BatchNormalization's exact
    evaluation computes them) quantized to nearest in one fused op:
    ``(y float32, scale, all_inside)``; ``scale`` is the guess in ``auto`` mode.
    None where nics_fix's fused kernel is not available (the caller then takes the plain ops).

    The values are those of ``_quantize(t, _Format(bit_width, auto_scale(t) or
    scale))`` on ``t = float64(x) * a + c``, cast to float32 (exact on the grid).
    """
    if not _fused(bit_width, "nearest") or x.dtype != tf.float32 or not x.shape.rank:
        return None
    from nics_fix.kernels import scale_shift_op

    op = scale_shift_op()
    if op is None:
        return None
    return op(x, tf.reshape(a, [-1]), tf.reshape(c, [-1]), scale, bit_width=bit_width, auto_scale=auto)


def _cached_quantize(weight, copy, current, scale, bit_width: int, mode, rounding: str, groups=None):
    """A weight's evaluation quantize with its cached copy, as one op: ``copy`` (a
    float32 variable) where ``current`` (a bool variable) holds true; otherwise
    ``weight`` quantized in ``mode`` (``auto``, ``fixed`` or an integer scale,
    with the scales stored in ``scale`` as the points store them), kept in ``copy``
    and ``current`` set. The values are those of the point's own quantize.

    None where nics_fix's fused kernel cannot compute it (other rounding, block
    scales, per-channel scales not on the last axis, under XLA, no kernel): the
    caller then keeps the copy with a ``tf.cond``. No gradient passes.
    """
    if not _fused(bit_width, rounding):
        return None
    from nics_fix.kernels import cached_quantize_op

    op = cached_quantize_op()
    if op is None:
        return None
    if mode in ("auto", "fixed"):
        per_channel = groups is not None
        if per_channel and not (groups.block_size is None and groups.axis == len(weight.shape) - 1 and groups.n > 0):
            return None
        kwargs = {"auto_scale": mode == "auto", "per_channel": per_channel}
    else:  # an integer scale: one format for the whole tensor, stored in every scale entry
        kwargs = {"auto_scale": False, "use_constant": True, "constant_scale": int(mode)}
    y = op(weight.handle, copy.handle, current.handle, scale.handle, bit_width=bit_width, **kwargs)
    y.set_shape(weight.shape)
    return y


def _last_axis_scales(fmt: _Format, x) -> bool:
    """True when ``fmt``'s scales are one per index of ``x``'s last axis (shape ``(1, ..., 1, C)``)."""
    shape = getattr(fmt.scale, "shape", None)
    if shape is None or shape.rank != x.shape.rank or not shape.rank or not x.shape[-1]:
        return False  # also a last axis of size 0: nothing to quantize, the plain ops return it
    return shape[-1] == x.shape[-1] and all(d == 1 for d in shape[:-1])


def _round_steps(v, rounding: str, seed=None):
    """``v`` (in steps) rounded to an integer value, in ``v``'s float dtype."""
    if rounding == "nearest":
        return tf.round(v)
    if rounding == "floor":
        return tf.floor(v)
    # floor(v) + [u < frac(v)] instead of floor(v + u): adding u to a large
    # v would round in float and move values that are already on the grid.
    lower = tf.floor(v)
    up = tf.cast(_uniform(tf.shape(v), seed), v.dtype) < (v - lower)
    return lower + tf.cast(up, v.dtype)


def _quantize_float64(x, fmt: _Format, rounding: str, seed=None):
    step, inv_step = (tf.cast(v, tf.float64) for v in fmt.steps())
    p = tf.cast(fmt.p, tf.float64)
    q = _round_steps(x * inv_step, rounding, seed)
    return tf.clip_by_value(q * step, -p, p - step)


def fixed_point_quantize(x, bit_width, scale, rounding: str = "nearest", seed=None,
                         axis=None, block_size=None) -> tf.Tensor:
    """Quantize ``x`` to ``bit_width``-bit fixed point with power-of-two ``scale``.

    Args:
        x: tensor or NumPy array; computed in float32.
        bit_width: 1..32, sign bit included (a Python int).
        scale: integer scale ``s`` (Python int or int tensor); range is
            ``[-2**s, 2**s - step]``. A tensor of scales that broadcasts
            against ``x`` gives each element its own format (per channel:
            what ``auto_scale(x, axis)`` returns).
        axis, block_size: given together, ``scale`` holds one scale per block
            of ``block_size`` elements along ``axis``, as
            ``auto_scale(x, axis, block_size)`` returns them.
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
    check_rounding(rounding)
    x = _as_float32(x)
    return _quantize(x, _Format(bit_width, _scale_against(x, scale, axis, block_size)), rounding, seed)


def _scale_against(x, scale, axis, block_size):
    """``scale`` ready to broadcast against ``x`` (block scales expanded); checks the shapes."""
    if isinstance(scale, numbers.Integral) and block_size is None:
        return scale
    scale = tf.convert_to_tensor(scale)
    if block_size is not None:
        groups = _groups_for(x, axis, block_size)
        want = groups.scale_shape(x.shape)
        if scale.shape.rank != len(want) or scale.shape[groups.axis] != groups.blocks:
            raise ValueError(f"block scales for shape {tuple(x.shape)} along axis {groups.axis} in "
                             f"blocks of {block_size} need shape {want}, got {tuple(scale.shape)}")
        return groups.expand(scale)
    if axis is not None:
        raise ValueError("axis is only needed with block_size; per-channel scales broadcast as they are")
    try:
        if tf.broadcast_static_shape(x.shape, scale.shape) != x.shape:
            raise ValueError
    except ValueError:
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not broadcast against x of "
                         f"shape {tuple(x.shape)}") from None
    return scale


def representable_range(bit_width: int, scale):
    """``(low, high)`` float32 ends of the representable range."""
    scale = clamp_scale(scale)
    return -pow2(scale), pow2(scale) - quantization_step(bit_width, scale)


def _quantize_ste(x, fmt: _Format, rounding: str, seed=None, all_inside=None):
    """:func:`quantize_ste` in a prepared format (the points reuse their auto scale's power).

    ``all_inside``: optional bool scalar, true when no element of ``x`` is clipped;
    the backward pass then returns the gradient as it is (what the mask would).
    """
    y, checked = _quantize_checked(_as_float(x), fmt, rounding, seed)
    return _straight_through(x, y, lambda: fmt, checked if all_inside is None else all_inside)


def _straight_through(x, y, format_fn, all_inside=None):
    """``y`` (``x`` quantized, computed without gradient) with the straight-through
    gradient of ``x``: passed where ``x`` lies in the range of ``format_fn()``
    (a :class:`_Format`, built only when the mask is needed), zero where it was clipped.

    ``all_inside``: optional bool scalar, true when no element is clipped; the
    backward pass then returns the gradient as it is (what the mask would).
    """
    @tf.custom_gradient
    def _quantize_fn(x):
        def grad(dy):
            def masked():
                fmt = format_fn()
                lo, hi = fmt.low, fmt.high
                if x.dtype == tf.float64:
                    step = tf.cast(fmt.steps()[0], tf.float64)
                    lo, hi = tf.cast(lo, tf.float64), tf.cast(fmt.p, tf.float64) - step
                elif x.dtype != tf.float32:
                    lo, hi = tf.cast(lo, x.dtype), tf.cast(hi, x.dtype)
                inside = tf.logical_and(x >= lo, x <= hi)
                return tf.where(inside, dy, tf.zeros([], dy.dtype))

            if all_inside is None:
                return masked()
            return tf.cond(all_inside, lambda: tf.identity(dy), masked)

        return tf.identity(y), grad

    return _quantize_fn(x)


def quantize_ste(x, bit_width, scale, rounding: str = "nearest", seed=None) -> tf.Tensor:
    """:func:`fixed_point_quantize` with the straight-through gradient.

    The gradient passes unchanged where ``x`` lies inside the representable
    range ``[-2**s, 2**s - step]`` and is zero where ``x`` was clipped.
    """
    check_rounding(rounding)
    x = tf.convert_to_tensor(x)
    return _quantize_ste(x, _Format(bit_width, scale), rounding, seed)


# ----------------------------------------------------------------------------
# The same format on integers. A value on the grid of (bit_width, scale) is
# ``m * 2**e`` with the integer mantissa ``m`` in [-2**(w-1), 2**(w-1) - 1] and
# the step exponent ``e = scale - bit_width + 1``. An integer datapath keeps
# ``m`` and knows ``e``; moving a value to a coarser step is a right shift, and
# the rounding of that shift is the integer realisation of the rounding above:
# ``floor`` is the arithmetic right shift, ``nearest`` adds the ties-to-even
# correction from the bits shifted out. Both equal fixed_point_quantize of the
# exact value m * 2**e (then clipping), which is what the tests check.
# ----------------------------------------------------------------------------


def step_exponent(bit_width: int, scale):
    """``scale - bit_width + 1``: the power of two of one step (scale clamped as everywhere)."""
    return np.clip(np.asarray(scale, np.int64), MIN_SCALE, MAX_SCALE) - (check_bit_width(bit_width) - 1)


def integer_mantissa(x, bit_width: int, scale, rounding: str = "nearest") -> np.ndarray:
    """``fixed_point_quantize(x, bit_width, scale, rounding) / step`` as int64 (exact).

    ``scale`` may be an integer array broadcastable over ``x`` (one scale per
    channel or block).
    """
    q = np.asarray(fixed_point_quantize(x, bit_width, scale, rounding), np.float64)
    m = np.ldexp(q, -step_exponent(bit_width, scale))  # a power-of-two multiply: exact
    return m.astype(np.int64)


def shift_round(m, shift, rounding: str = "nearest") -> np.ndarray:
    """``m * 2**-shift`` rounded to an integer (int64; ``shift`` may be negative: exact left shift).

    ``nearest`` rounds ties to even and ``floor`` toward -inf, exactly as
    :func:`fixed_point_quantize` rounds ``m * 2**e`` to a grid ``shift`` steps coarser.
    Stochastic rounding is a training device; evaluation rounds to nearest.
    """
    check_rounding(rounding)
    m = np.asarray(m, np.int64)
    shift = np.asarray(shift, np.int64)
    right = np.maximum(shift, 0)
    m = np.left_shift(m, np.maximum(-shift, 0))
    floor = np.right_shift(m, right)  # arithmetic shift: floor for negative m too
    if rounding == "floor":
        return floor
    remainder = m - np.left_shift(floor, right)  # in [0, 2**right)
    half = np.left_shift(np.int64(1), np.maximum(right - 1, 0))
    up = (right > 0) & ((remainder > half) | ((remainder == half) & (floor % 2 == 1)))
    return floor + up


def saturate_integer(m, bit_width: int) -> np.ndarray:
    """Clip int64 ``m`` to the ``bit_width``-bit two's-complement range."""
    top = np.int64(1) << np.int64(bit_width - 1)
    return np.clip(np.asarray(m, np.int64), -top, top - 1)


def wrap_integer(m, bit_width: int) -> np.ndarray:
    """Keep the low ``bit_width`` bits of int64 ``m`` as a two's-complement number."""
    top = np.int64(1) << np.int64(bit_width - 1)
    return ((np.asarray(m, np.int64) + top) & (2 * top - 1)) - top


def requantize_integer(m, exponent, bit_width: int, out_exponent, rounding: str = "nearest") -> np.ndarray:
    """``m * 2**exponent`` in the format with step ``2**out_exponent`` and ``bit_width`` bits:
    the integer form of :func:`fixed_point_quantize` (round, then saturate)."""
    return saturate_integer(shift_round(m, np.asarray(out_exponent) - np.asarray(exponent), rounding), bit_width)


def accumulate(total, lsb, bit_width: int, overflow: str):
    """The accumulator on an exact float64 sum ``total`` whose step is ``lsb``:
    ``(kept, overflowed)``, ``kept`` saturated or wrapped to ``bit_width`` bits
    (the same as :func:`saturate_integer` / :func:`wrap_integer` on ``total / lsb``)."""
    units = total / lsb  # exact: a power of two
    top = float(2 ** (bit_width - 1))
    overflowed = tf.logical_or(units < -top, units > top - 1)
    if overflow == "saturate":
        kept = tf.clip_by_value(units, -top, top - 1)
    else:
        # units - 2**N * floor((units + 2**(N-1)) / 2**N); floor has no gradient: straight through
        kept = units - 2 * top * tf.stop_gradient(tf.floor((units + top) / (2 * top)))
    return kept * lsb, overflowed


__all__ = [
    "MAX_BIT_WIDTH",
    "MAX_SCALE",
    "MIN_BIT_WIDTH",
    "MIN_SCALE",
    "ROUNDING_MODES",
    "ScaleGroups",
    "auto_scale",
    "accumulate",
    "fixed_point_quantize",
    "integer_mantissa",
    "requantize_integer",
    "saturate_integer",
    "shift_round",
    "step_exponent",
    "wrap_integer",
    "quantization_step",
    "quantize_ste",
    "representable_range",
]
