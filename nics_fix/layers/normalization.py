"""Fixed-point ``BatchNormalization``."""

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
