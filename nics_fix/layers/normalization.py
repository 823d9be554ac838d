"""Fixed-point normalization: ``BatchNormalization`` and ``LayerNormalization``."""

from __future__ import annotations

import keras

from nics_fix.layers.base import FixedLayer, substitutable


@keras.saving.register_keras_serializable(package="nics_fix")
class BatchNormalization(FixedLayer, keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` with quantized ``gamma``, ``beta`` and output.

    The moving statistics stay float: on hardware they are usually folded into
    the preceding layer's weights before deployment.
    """

    fixed_weights = ("gamma", "beta")
    gamma = substitutable("gamma", keras.layers.BatchNormalization)
    beta = substitutable("beta", keras.layers.BatchNormalization)


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
