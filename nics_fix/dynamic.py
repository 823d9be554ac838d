"""The ``dynamic`` scale mode: dynamic fixed point (Courbariaux, Bengio & David 2014).

``auto`` takes max|x| of the tensor it is about to quantize; hardware streaming a
tensor cannot look ahead like that. A ``dynamic`` scale is chosen from earlier
calls only: the first call starts from ``auto``; after each call, per scale
(per tensor, channel or block)::

    saturated fraction > overflow_rate                  -> scale + 1 (streak 0)
    every value would have fitted at scale - 1
    ("half the range"), for `window` calls in a row     -> scale - 1 (streak 0)

The counts are kept in int32 variables beside the scale (``<name>_overflows``:
saturated elements of the last call, ``<name>_streak``: calls in a row that fitted
in half the range, ``<name>_calls``), saved with the model, shown by
:func:`nics_fix.fixed_points` and logged with the scales.

>>> import numpy as np
>>> scale, streak, over = dynamic_update(np.float32([0.3, 3.0]), 4, 1, 0, None, 1e-4, 1)
>>> int(scale), int(streak), int(over)  # 3.0 saturates [-2, 1.75]
(2, 0, 1)
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from nics_fix.quant import (
    MAX_SCALE,
    MIN_SCALE,
    ScaleGroups,
    _as_float32,
    _Format,
    group_auto_scale,
)


def _reduce(x, groups: ScaleGroups | None, op, pad_value):
    return op(x) if groups is None else groups.reduce(x, op, pad_value)


def dynamic_update(x, bit_width: int, scale, streak, groups: ScaleGroups | None,
                   overflow_rate: float, window: int):
    """``(next scale, next streak, saturated count)`` after quantizing ``x`` with ``scale``.

    ``scale`` and ``streak`` have the scales' shape (see
    :class:`~nics_fix.quant.ScaleGroups`; scalars for ``groups=None``).
    Saturated means outside ``[-2**s, 2**s - step]``, as the straight-through
    mask counts it (Inf included); a group holding a NaN never counts as fitting.
    """
    x = _as_float32(x)
    scale = tf.cast(scale, tf.int32)
    streak = tf.cast(streak, tf.int32)
    expand = (lambda t: t) if groups is None else groups.expand
    now = _Format(bit_width, expand(scale))
    outside = tf.logical_or(x > now.high, x < now.low)
    overflows = _reduce(tf.cast(outside, tf.int32), groups, tf.reduce_sum, 0)
    sizes = _reduce(tf.ones_like(x, tf.int32), groups, tf.reduce_sum, 0)
    half = _Format(bit_width, scale - 1)
    fits = tf.logical_and(_reduce(x, groups, tf.reduce_max, -np.inf) <= half.high,
                          _reduce(x, groups, tf.reduce_min, np.inf) >= half.low)
    over = tf.cast(overflows, tf.float64) > overflow_rate * tf.cast(sizes, tf.float64)
    run = tf.where(fits, streak + 1, 0)
    down = tf.logical_and(fits, run >= window)
    next_scale = tf.where(over, scale + 1, tf.where(down, scale - 1, scale))
    next_scale = tf.clip_by_value(next_scale, MIN_SCALE, MAX_SCALE)
    return next_scale, tf.where(tf.logical_or(over, down), 0, run), overflows


class DynamicScale:
    """The state of one ``dynamic`` scale: its counters, beside the scale variable."""

    def __init__(self, layer: keras.layers.Layer, prefix: str, scale_variable, groups, config):
        self.scale = scale_variable
        self.groups = groups
        self.config = config
        shape = tuple(scale_variable.shape)
        self.overflows = layer.add_weight(name=f"{prefix}_overflows", shape=shape, dtype="int32",
                                          trainable=False, initializer="zeros")
        self.streak = layer.add_weight(name=f"{prefix}_streak", shape=shape, dtype="int32",
                                       trainable=False, initializer="zeros")
        self.calls = layer.add_weight(name=f"{prefix}_calls", shape=(), dtype="int32",
                                      trainable=False, initializer="zeros")

    @property
    def variables(self) -> list:
        return [self.overflows, self.streak, self.calls]

    def current(self, x):
        """The scale for this call: stored, or ``auto`` of ``x`` on the first call."""
        stored = tf.convert_to_tensor(self.scale)
        return tf.cond(tf.convert_to_tensor(self.calls) > 0, lambda: stored,
                       lambda: tf.reshape(group_auto_scale(x, self.groups), tf.shape(stored)))

    def update(self, x, scale) -> None:
        """Counts of this call, and the scale for the next one."""
        config = self.config
        next_scale, streak, overflows = dynamic_update(
            x, config.bit_width, scale, tf.convert_to_tensor(self.streak), self.groups,
            config.overflow_rate, config.window)
        self.scale.assign(tf.reshape(next_scale, tf.shape(scale)))
        self.streak.assign(tf.reshape(streak, tf.shape(scale)))
        self.overflows.assign(tf.reshape(overflows, tf.shape(scale)))
        self.calls.assign_add(1)

    def describe(self) -> dict:
        def value(v):
            out = keras.ops.convert_to_numpy(v)
            return int(out) if out.ndim == 0 else out.tolist()

        return {"calls": value(self.calls), "overflows": value(self.overflows), "streak": value(self.streak)}


__all__ = ["DynamicScale", "dynamic_update"]
