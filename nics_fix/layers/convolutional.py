"""Fixed-point convolutions: ``Conv1D``, ``Conv2D``, ``DepthwiseConv2D``, ``SeparableConv2D``, ``Conv2DTranspose``."""

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


@keras.saving.register_keras_serializable(package="nics_fix")
class Conv1D(FixedLayer, keras.layers.Conv1D):
    """``keras.layers.Conv1D`` with quantized kernel, bias and output.

    >>> import keras, nics_fix as nf
    >>> [p.name for p in nf.fixed_points(keras.Sequential([keras.Input((6, 2)), nf.Conv1D(3, 2, name="c")]))]
    ['c/kernel', 'c/bias', 'c/activation']
    """

    fixed_weights = ("kernel", "bias")
    kernel = substitutable("kernel", keras.layers.Conv1D)
    bias = substitutable("bias", keras.layers.Conv1D)


@keras.saving.register_keras_serializable(package="nics_fix")
class Conv2DTranspose(FixedLayer, keras.layers.Conv2DTranspose):
    """``keras.layers.Conv2DTranspose`` with quantized kernel, bias and output.

    >>> import nics_fix as nf
    >>> nf.Conv2DTranspose(4, 3, strides=2, name="up").fixed_weights
    ('kernel', 'bias')
    """

    fixed_weights = ("kernel", "bias")
    kernel = substitutable("kernel", keras.layers.Conv2DTranspose)
    bias = substitutable("bias", keras.layers.Conv2DTranspose)


@keras.saving.register_keras_serializable(package="nics_fix")
class SeparableConv2D(FixedLayer, keras.layers.SeparableConv2D):
    """``keras.layers.SeparableConv2D``: both kernels, the bias and the output quantized.

    The depthwise and the pointwise kernel are two weight points, each with
    its own scale (both take the layer's ``weight`` config).

    >>> import keras, nics_fix as nf
    >>> m = keras.Sequential([keras.Input((5, 5, 2)), nf.SeparableConv2D(3, 3, name="sep")])
    >>> [p.name for p in nf.fixed_points(m)]
    ['sep/depthwise_kernel', 'sep/pointwise_kernel', 'sep/bias', 'sep/activation']
    """

    fixed_weights = ("depthwise_kernel", "pointwise_kernel", "bias")
    depthwise_kernel = substitutable("depthwise_kernel", keras.layers.SeparableConv2D)
    pointwise_kernel = substitutable("pointwise_kernel", keras.layers.SeparableConv2D)
    bias = substitutable("bias", keras.layers.SeparableConv2D)
