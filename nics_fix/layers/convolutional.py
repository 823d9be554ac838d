"""Fixed-point ``Conv2D`` and ``DepthwiseConv2D``."""

from __future__ import annotations

import keras

from nics_fix.layers.base import FixedLayer, substitutable


@keras.saving.register_keras_serializable(package="nics_fix")
class Conv2D(FixedLayer, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with quantized kernel, bias and output.

    >>> import nics_fix as nf
    >>> nf.Conv2D(8, 3, name="conv1").fixed_config.is_float
    True
    """

    fixed_weights = ("kernel", "bias")
    kernel = substitutable("kernel", keras.layers.Conv2D)
    bias = substitutable("bias", keras.layers.Conv2D)


@keras.saving.register_keras_serializable(package="nics_fix")
class DepthwiseConv2D(FixedLayer, keras.layers.DepthwiseConv2D):
    """``keras.layers.DepthwiseConv2D`` with quantized kernel, bias and output."""

    fixed_weights = ("kernel", "bias")
    kernel = substitutable("kernel", keras.layers.DepthwiseConv2D)
    bias = substitutable("bias", keras.layers.DepthwiseConv2D)
