"""Fixed-point normalization: ``BatchNormalization`` and ``LayerNormalization``."""

from __future__ import annotations

import keras
import tensorflow as tf

from nics_fix.layers.base import FixedLayer, _as_training_flag, substitutable
from nics_fix.quant import _may_compile_with_xla, auto_scale, fixed_point_quantize
from nics_fix.weight_cache import EvaluationCache

#: Bits of the evaluation-mode multiplier ``gamma / sqrt(var + eps)`` (per-tensor power-of-two scale).
MULTIPLIER_BITS = 16
#: Bits of the evaluation-mode offset ``beta - mean * multiplier``.
OFFSET_BITS = 24


@keras.saving.register_keras_serializable(package="nics_fix")
class BatchNormalization(FixedLayer, keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` with quantized ``gamma``, ``beta`` and output.

    Training uses the batch statistics in float, as Keras does. In evaluation,
    a layer whose weights are fixed point (``weight.data_config.not_training``
    not ``none``) is the integer scale-and-shift a datapath runs: the moving
    statistics and the quantized gamma and beta become one multiplier
    ``a = gamma / sqrt(var + eps)`` in :data:`MULTIPLIER_BITS` bits and one offset
    ``c = beta - mean * a`` in :data:`OFFSET_BITS` bits (each with its auto
    power-of-two scale), and ``x * a + c`` is computed exactly (float64) and
    rounded once by the output point. With float weights evaluation is Keras'.

    >>> import numpy as np, nics_fix as nf
    >>> q8 = {"data_config": {"bit_width": 8, "training": "auto", "not_training": "fixed"}}
    >>> bn = nf.BatchNormalization(fixed_config={"weight": q8})
    >>> bn(np.ones((2, 3), "float32")).shape
    TensorShape([2, 3])
    """

    fixed_weights = ("gamma", "beta")
    gamma = substitutable("gamma", keras.layers.BatchNormalization)
    beta = substitutable("beta", keras.layers.BatchNormalization)

    @property
    def integer_evaluation(self) -> bool:
        """True when evaluation runs the quantized scale-and-shift."""
        return self._nf_config.weight.data.mode(False) != "none"

    def build(self, input_shape):
        super().build(input_shape)
        # The multiplier and offset depend on the weights and moving statistics
        # only: evaluation keeps them between batches, as it keeps quantized weights.
        object.__setattr__(self, "_nf_scale_shift_cache", self._scale_shift_cache())

    def _scale_shift_cache(self):
        weights = [p for key, p in self._nf_points.items() if key != "activation"]
        if (not self.integer_evaluation or self.compute_dtype != "float32"
                or any(p.eval_cache is None for p in weights)):
            return None  # strategies, dynamic or none modes: computed at every call
        watched = [self.moving_mean, self.moving_variance]
        watched += [v for p in weights for v in (p.eval_cache.variable, p.data_scale)]
        channels = tuple(self.moving_mean.shape)
        return EvaluationCache(watched=watched, shapes=(channels, channels))

    def evaluation_caches(self) -> list:
        cache = self.__dict__.get("_nf_scale_shift_cache")
        return super().evaluation_caches() + ([cache] if cache is not None else [])

    def scale_and_shift(self):
        """``((a, a_bits, a_scale), (c, c_bits, c_scale))``: the quantized evaluation multiplier
        and offset (float32 tensors on their grids) with their formats."""
        points = self._nf_points
        gamma = points["gamma"](self.gamma, False) if self.scale else 1.0
        beta = points["beta"](self.beta, False) if self.center else 0.0
        a = gamma * tf.math.rsqrt(tf.convert_to_tensor(self.moving_variance) + self.epsilon)
        c = beta - tf.convert_to_tensor(self.moving_mean) * a
        out = []
        for value, bits in ((a, MULTIPLIER_BITS), (c, OFFSET_BITS)):
            scale = auto_scale(value)
            out.append((fixed_point_quantize(value, bits, scale), bits, scale))
        return tuple(out)

    def call(self, inputs, training=None, mask=None):
        cache = self.__dict__.get("_nf_scale_shift_cache")
        if _as_training_flag(training) or not self.integer_evaluation:
            if cache is not None and _as_training_flag(training):
                cache.invalidate()  # the moving statistics move
            return super().call(inputs, training=training, mask=mask)
        if cache is not None and not _may_compile_with_xla():
            # Not under XLA: its rsqrt and products round differently from the CPU
            # ops', so a copy made by one must not serve the other.
            a, c = cache.quantized(lambda: tuple(value for value, _, _ in self.scale_and_shift()))
        else:
            (a, _, _), (c, _, _) = self.scale_and_shift()
        point = self._nf_points.get("activation")
        rank = len(inputs.shape)
        if point is not None and self.axis % rank == rank - 1:
            fused = point.scale_shift_in_evaluation(inputs, a, c)  # the same bits in one op
            if fused is not None:
                return fused
        shape = [1] * rank
        shape[self.axis] = -1
        outputs = (tf.cast(inputs, tf.float64) * tf.cast(tf.reshape(a, shape), tf.float64)
                   + tf.cast(tf.reshape(c, shape), tf.float64))
        if point is not None:
            outputs = point(outputs, False)
        return tf.cast(outputs, tf.float32)

@keras.saving.register_keras_serializable(package="nics_fix")
class LayerNormalization(FixedLayer, keras.layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` with quantized ``gamma``, ``beta`` and output.

    >>> import keras, nics_fix as nf
    >>> m = keras.Sequential([keras.Input((3, 4)), nf.LayerNormalization(name="ln")])
    >>> [p.name for p in nf.fixed_points(m)]
    ['ln/gamma', 'ln/beta', 'ln/activation']
    """

    fixed_weights = ("gamma", "beta")
    gamma = substitutable("gamma", keras.layers.LayerNormalization)
    beta = substitutable("beta", keras.layers.LayerNormalization)
