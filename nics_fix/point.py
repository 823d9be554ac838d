"""A quantization point: where one tensor (and its gradient) is quantized.

A :class:`FixedPoint` belongs to a layer and owns two non-trainable int32
variables of that layer, ``<name>_data_scale`` (data) and ``<name>_grad_scale``
(gradient). They always exist, whatever the config, so weights saved from a
float model load into a fixed one and back.

Forward (data), per the ``training``/``not_training`` mode::

    x -> strategy.pre_<kind> -> quantize (STE) -> strategy.post_<kind> -> y

Backward (gradient, training only), on the gradient arriving at ``y``::

    dy -> strategy.pre_<kind>_grad -> quantize -> strategy.post_<kind>_grad -> (to x)

Modes: ``auto`` computes the scale from the tensor and stores it; ``fixed``
uses the stored scale; an integer uses (and stores) that scale; ``dynamic``
uses the stored scale and moves it after each call from that call's overflow
counts (:mod:`nics_fix.dynamic`); ``none`` leaves the tensor in float.

With ``granularity: channel`` or ``block`` the scale variables hold one scale
per channel or per block (shapes as :class:`~nics_fix.quant.ScaleGroups`
gives them); every mode works the same way on each of them.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from nics_fix.config import DataConfig, GradientConfig, PointConfig
from nics_fix.dynamic import DynamicScale
from nics_fix.log import logger
from nics_fix.quant import (
    ScaleGroups,
    _as_float32,
    _auto_quantize,
    _auto_scale_pow2,
    _cached_quantize,
    _Format,
    _quantize,
    _quantize_ste,
    _scale_shift_quantize,
    _straight_through,
    group_auto_scale,
)
from nics_fix.strategy import PointInfo, Strategy
from nics_fix.weight_cache import EvaluationCache, _tape_may_record


def _initial_scale(*modes) -> int:
    for mode in modes:
        if isinstance(mode, int):
            return mode
    return 0


def _scale_groups(name: str, direction: str, config, shape, kind: str, default_axis: int):
    """The :class:`ScaleGroups` of one direction of a point (None: one scale per tensor)."""
    if config.granularity == "tensor":
        return None
    where = f"{name}: {direction}_config"
    if shape is None:
        raise ValueError(f"{where}: granularity {config.granularity} needs the tensor's shape, "
                         "which this layer cannot tell")
    axis = default_axis if config.axis is None else config.axis
    block = config.block_size if config.granularity == "block" else None
    try:
        groups = ScaleGroups.for_tensor(shape, axis, block, shared_axes=(0,) if kind == "activation" else ())
        scale_shape = groups.scale_shape(shape)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if None in scale_shape:
        raise ValueError(f"{where}: block scales of shape {tuple(shape)} need static sizes "
                         "of every axis but the batch axis")
    return groups


class FixedPoint:
    """One quantization point of a layer (a weight variable or the output).

    ``shape``: the shape of the quantized tensor (batch axis None for an
    activation), needed only for per-channel and per-block scales;
    ``default_axis``: their axis when the config gives none (a kernel's
    output-channel axis, else the last axis).
    """

    def __init__(self, layer: keras.layers.Layer, key: str, kind: str, config: PointConfig,
                 strategy: Strategy | None = None, shape=None, default_axis: int = -1, variable=None):
        self.layer = layer
        self.key = key  # "kernel", "bias", "gamma", "beta" or "activation"
        self.kind = kind  # "weight" or "activation"
        self.config = config
        self.strategy = strategy
        data, grad = config.data, config.gradient
        self.data_groups = _scale_groups(self.name, "data", data, shape, kind, default_axis)
        self.grad_groups = _scale_groups(self.name, "gradient", grad, shape, kind, default_axis)
        self.data_scale = layer.add_weight(
            name=f"{key}_data_scale", shape=self._scale_shape(self.data_groups, shape), dtype="int32",
            trainable=False,
            initializer=keras.initializers.Constant(_initial_scale(data.training, data.not_training)),
        )
        self.grad_scale = layer.add_weight(
            name=f"{key}_grad_scale", shape=self._scale_shape(self.grad_groups, shape), dtype="int32",
            trainable=False,
            initializer=keras.initializers.Constant(_initial_scale(grad.training)),
        )
        # Counters of the dynamic mode, only where it is used: other models keep their variables.
        self.data_dynamic = (DynamicScale(layer, f"{key}_data", self.data_scale, self.data_groups, data)
                             if data.is_dynamic else None)
        self.grad_dynamic = (DynamicScale(layer, f"{key}_grad", self.grad_scale, self.grad_groups, grad)
                             if grad.is_dynamic else None)
        self._uses_grad_hooks = strategy is not None and strategy.uses_gradients(kind)
        # Evaluation quantizes ``variable`` (the weight) the same way batch after batch: keep the result.
        self.eval_cache = (EvaluationCache(variable, watched=(self.data_scale,))
                           if variable is not None and self._caches_evaluation(variable) else None)
        logger.info("point %s (%s): data %s, gradient %s%s", self.name, kind, data.to_dict(),
                    grad.to_dict(), f", strategy {strategy.get_config()}" if strategy else "")

    @property
    def name(self) -> str:
        return f"{self.layer.name}/{self.key}"

    @staticmethod
    def _scale_shape(groups, shape) -> tuple:
        return () if groups is None else groups.scale_shape(shape)

    @property
    def state_variables(self) -> list:
        """Scales and dynamic counters: saved beside the layer's weights."""
        out = [self.data_scale, self.grad_scale]
        for dynamic in (self.data_dynamic, self.grad_dynamic):
            if dynamic is not None:
                out += dynamic.variables
        return out

    def is_identity(self, training: bool) -> bool:
        """True when calling the point would not change the tensor or its gradient."""
        if self.strategy is not None or (training and self.eval_cache is not None):
            return False  # a training call drops the evaluation copy (the optimizer moves the weight next)
        return self.config.data.mode(training) == "none" and (
            not training or self.config.gradient.is_float)

    def _caches_evaluation(self, variable) -> bool:
        mode = self.config.data.not_training
        return (self.kind == "weight" and self.strategy is None and mode not in ("none", "dynamic")
                and variable.dtype == "float32")

    def __call__(self, x, training: bool = False):
        if self.is_identity(training):
            return x
        cache = self.eval_cache
        if cache is not None:
            if not training and x is cache.variable:
                return cache.quantized(lambda: self._quantize_data_and_gradient(x, False), self._fused_cache)
            if training:
                cache.invalidate()
        return self._quantize_data_and_gradient(x, training)

    def _fused_cache(self, copy, current):
        """The evaluation cache of this weight as one fused op (:func:`quant._cached_quantize`), or None."""
        data = self.config.data
        if self.layer.compute_dtype != "float32":  # a float16 read of the weight (mixed precision)
            return None
        rounding = "nearest" if data.rounding == "stochastic" else data.rounding
        return _cached_quantize(self.eval_cache.variable, copy, current, self.data_scale, data.bit_width,
                                data.not_training, rounding, self.data_groups)

    def _quantize_data_and_gradient(self, x, training: bool):
        # Read variables here: tf.custom_gradient must never see a variable read
        # inside the function it wraps.
        x = tf.convert_to_tensor(x)
        data: DataConfig = self.config.data
        mode = data.mode(training)
        strategy = self.strategy
        if strategy is not None:
            stored = None if mode == "none" else tf.convert_to_tensor(self.data_scale)
            x = getattr(strategy, f"pre_{self.kind}")(x, PointInfo(self.name, self.kind, data, stored, training))
        scale = None
        if mode != "none":
            # Stochastic rounding is a training device: evaluation rounds to
            # nearest, so a model's predictions (and their reproduction) are deterministic.
            rounding = "nearest" if not training and data.rounding == "stochastic" else data.rounding
            if mode == "auto" and x.dtype == tf.float32:
                # The scales' reductions also tell whether any element is
                # clipped; if none is, the backward pass skips the STE mask.
                quantized, stored, all_inside = _auto_quantize(
                    x, data.bit_width, rounding, guess=tf.convert_to_tensor(self.data_scale), groups=self.data_groups)
                self.data_scale.assign(stored)
                scale = self._expanded(stored, self.data_groups)
                bit_width = data.bit_width
                x = _straight_through(x, quantized, lambda: _Format(bit_width, scale), all_inside)
            else:
                stored, fmt = self._format(x, mode, data.bit_width, self.data_scale, self.data_groups,
                                           self.data_dynamic)
                scale = self._expanded(stored, self.data_groups)
                quantized = _quantize_ste(x, fmt, rounding)
                if mode == "dynamic":
                    self.data_dynamic.update(x, stored)
                x = quantized
        if strategy is not None:
            x = getattr(strategy, f"post_{self.kind}")(x, PointInfo(self.name, self.kind, data, scale, training))
        if training and (not self.config.gradient.is_float or self._uses_grad_hooks):
            x = self._quantize_gradient(x)
        return x

    @staticmethod
    def _expanded(scale, groups):
        return scale if groups is None else groups.expand(scale)

    @classmethod
    def _format(cls, x, mode, bit_width, variable, groups=None, dynamic=None):
        """``(scales, format)`` for ``fixed``, ``auto``, ``dynamic`` or an integer mode;
        stores the scales (``dynamic`` stores them after its update instead).

        ``scales`` have the variable's shape; the format's are expanded to
        broadcast against ``x``. Per tensor, ``auto`` hands the power
        ``2**scale`` it computed on to the quantizer and an integer mode
        quantizes with Python constants (no scalar ops).
        """
        if mode == "fixed":
            scale = tf.convert_to_tensor(variable)
            return scale, _Format(bit_width, cls._expanded(scale, groups))
        if mode == "dynamic":
            scale = dynamic.current(x)
            return scale, _Format(bit_width, cls._expanded(scale, groups))
        if mode == "auto":
            if groups is None:
                scale, p = _auto_scale_pow2(x)
                variable.assign(scale)
                return scale, _Format(bit_width, scale, p)
            scale = group_auto_scale(x, groups)
            variable.assign(scale)
            return scale, _Format(bit_width, groups.expand(scale))
        scale = tf.fill(tf.shape(variable), tf.constant(mode, tf.int32))
        variable.assign(scale)
        return scale, _Format(bit_width, mode)

    def scale_shift_in_evaluation(self, x, a, c):
        """This point's evaluation output for ``x * a + c`` (``a``, ``c`` per channel of
        ``x``'s last axis, exact in float64), as one fused op: what
        ``self(float64(x) * a + c, training=False)`` cast to float32 gives, bit for bit.

        None where the fused kernel cannot run it (a strategy, per-channel or block
        scales, ``none``/``dynamic`` modes, floor rounding, float16 input, a tape
        recording, no kernel): the caller computes it the plain way. The fused op
        passes no gradient: like the weight cache, the choice is made when the
        call is traced, so a ``tf.function`` traced without a tape and later
        called under one gives no gradient through this output.
        """
        data = self.config.data
        mode = data.not_training
        if (self.strategy is not None or self.data_groups is not None or mode in ("none", "dynamic")
                or data.rounding == "floor" or _tape_may_record()):
            return None
        if mode in ("auto", "fixed"):
            stored = tf.convert_to_tensor(self.data_scale)  # auto: the guess; fixed: the scale
        else:
            stored = tf.constant(mode, tf.int32)
        out = _scale_shift_quantize(x, a, c, data.bit_width, stored, mode == "auto")
        if out is None:
            return None
        y, scale, _ = out
        if mode == "auto":
            self.data_scale.assign(scale)
        elif mode != "fixed":
            self.data_scale.assign(tf.fill(tf.shape(self.data_scale), tf.constant(mode, tf.int32)))
        return y

    def evaluation_scale(self, value):
        """The (unexpanded) scales evaluation quantizes weight ``value`` with, without storing any."""
        data = self.config.data
        mode = data.not_training
        if mode == "auto":
            return group_auto_scale(value, self.data_groups)
        if mode == "dynamic":
            return self.data_dynamic.current(value)
        if mode == "fixed":
            return tf.convert_to_tensor(self.data_scale)
        return tf.fill(tf.shape(self.data_scale), tf.constant(mode, tf.int32))

    def _quantize_gradient(self, x):
        grad: GradientConfig = self.config.gradient
        strategy, kind, name = self.strategy, self.kind, self.name

        @tf.custom_gradient
        def gradient_point(y):
            def backward(dy):
                if strategy is not None:
                    stored = None if grad.training == "none" else tf.convert_to_tensor(self.grad_scale)
                    dy = getattr(strategy, f"pre_{kind}_grad")(dy, PointInfo(name, kind, grad, stored, True))
                scale = None
                if grad.training == "auto":
                    dy, stored, _ = _auto_quantize(_as_float32(dy), grad.bit_width, grad.rounding,
                                                  guess=tf.convert_to_tensor(self.grad_scale), groups=self.grad_groups)
                    self.grad_scale.assign(stored)
                    scale = self._expanded(stored, self.grad_groups)
                elif grad.training != "none":
                    dy = _as_float32(dy)
                    stored, fmt = self._format(dy, grad.training, grad.bit_width, self.grad_scale,
                                               self.grad_groups, self.grad_dynamic)
                    scale = self._expanded(stored, self.grad_groups)
                    quantized = _quantize(dy, fmt, grad.rounding)
                    if grad.training == "dynamic":
                        self.grad_dynamic.update(dy, stored)
                    dy = quantized
                if strategy is not None:
                    dy = getattr(strategy, f"post_{kind}_grad")(dy, PointInfo(name, kind, grad, scale, True))
                return dy

            return tf.identity(y), backward

        return gradient_point(x)

    def describe(self) -> dict:
        """Name, kind, configs and current scales (as Python values: lists when shaped),
        and the counters of ``dynamic`` directions."""
        def value(variable):
            out = keras.ops.convert_to_numpy(variable)
            return int(out) if out.ndim == 0 else out.tolist()

        dynamic = {direction: state.describe() for direction, state in
                   (("data", self.data_dynamic), ("grad", self.grad_dynamic)) if state is not None}
        return {
            "name": self.name,
            "layer": self.layer.name,
            "variable": self.key,
            "kind": self.kind,
            "data_config": self.config.data.to_dict(),
            "gradient_config": self.config.gradient.to_dict(),
            "data_scale": value(self.data_scale),
            "grad_scale": value(self.grad_scale),
            "dynamic": dynamic or None,
        }
