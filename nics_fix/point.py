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
uses the stored scale; an integer uses (and stores) that scale; ``none``
leaves the tensor in float.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from nics_fix.config import DataConfig, GradientConfig, PointConfig
from nics_fix.log import logger
from nics_fix.quant import _as_float32, _auto_format, _auto_scale_pow2, _Format, _quantize, _quantize_ste
from nics_fix.strategy import PointInfo, Strategy


def _initial_scale(*modes) -> int:
    for mode in modes:
        if isinstance(mode, int):
            return mode
    return 0


class FixedPoint:
    """One quantization point of a layer (a weight variable or the output)."""

    def __init__(self, layer: keras.layers.Layer, key: str, kind: str, config: PointConfig,
                 strategy: Strategy | None = None):
        self.layer = layer
        self.key = key  # "kernel", "bias", "gamma", "beta" or "activation"
        self.kind = kind  # "weight" or "activation"
        self.config = config
        self.strategy = strategy
        data, grad = config.data, config.gradient
        self.data_scale = layer.add_weight(
            name=f"{key}_data_scale", shape=(), dtype="int32", trainable=False,
            initializer=keras.initializers.Constant(_initial_scale(data.training, data.not_training)),
        )
        self.grad_scale = layer.add_weight(
            name=f"{key}_grad_scale", shape=(), dtype="int32", trainable=False,
            initializer=keras.initializers.Constant(_initial_scale(grad.training)),
        )
        self._uses_grad_hooks = strategy is not None and strategy.uses_gradients(kind)
        logger.info("point %s (%s): data %s, gradient %s%s", self.name, kind, data.to_dict(),
                    grad.to_dict(), f", strategy {strategy.get_config()}" if strategy else "")

    @property
    def name(self) -> str:
        return f"{self.layer.name}/{self.key}"

    def is_identity(self, training: bool) -> bool:
        """True when calling the point would not change the tensor or its gradient."""
        if self.strategy is not None:
            return False
        return self.config.data.mode(training) == "none" and (
            not training or self.config.gradient.is_float)

    def __call__(self, x, training: bool = False):
        if self.is_identity(training):
            return x
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
                # The scale's two reductions also tell whether any element is
                # clipped; if none is, the backward pass skips the STE mask.
                fmt, all_inside = _auto_format(x, data.bit_width)
                scale = fmt.scale
                self.data_scale.assign(scale)
                x = _quantize_ste(x, fmt, rounding, all_inside=all_inside)
            else:
                scale, fmt = self._format(x, mode, data.bit_width, self.data_scale)
                x = _quantize_ste(x, fmt, rounding)
        if strategy is not None:
            x = getattr(strategy, f"post_{self.kind}")(x, PointInfo(self.name, self.kind, data, scale, training))
        if training and (not self.config.gradient.is_float or self._uses_grad_hooks):
            x = self._quantize_gradient(x)
        return x

    @staticmethod
    def _format(x, mode, bit_width, variable):
        """``(scale, format)`` for ``fixed``, ``auto`` or an integer mode; stores the scale.

        ``auto`` hands the power ``2**scale`` it computed on to the quantizer;
        an integer mode quantizes with Python constants (no scalar ops).
        """
        if mode == "fixed":
            scale = tf.convert_to_tensor(variable)
            return scale, _Format(bit_width, scale)
        if mode == "auto":
            scale, p = _auto_scale_pow2(x)
            variable.assign(scale)
            return scale, _Format(bit_width, scale, p)
        scale = tf.constant(mode, tf.int32)
        variable.assign(scale)
        return scale, _Format(bit_width, mode)

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
                if grad.training != "none":
                    dy = _as_float32(dy)
                    scale, fmt = self._format(dy, grad.training, grad.bit_width, self.grad_scale)
                    dy = _quantize(dy, fmt, grad.rounding)
                if strategy is not None:
                    dy = getattr(strategy, f"post_{kind}_grad")(dy, PointInfo(name, kind, grad, scale, True))
                return dy

            return tf.identity(y), backward

        return gradient_point(x)

    def describe(self) -> dict:
        """Name, kind, configs and current scales (as Python values)."""
        return {
            "name": self.name,
            "layer": self.layer.name,
            "variable": self.key,
            "kind": self.kind,
            "data_config": self.config.data.to_dict(),
            "gradient_config": self.config.gradient.to_dict(),
            "data_scale": int(keras.ops.convert_to_numpy(self.data_scale)),
            "grad_scale": int(keras.ops.convert_to_numpy(self.grad_scale)),
        }
