"""Fixed-point ``ReLU``."""

from __future__ import annotations

import keras

from nics_fix.layers.base import FixedLayer


@keras.saving.register_keras_serializable(package="nics_fix")
class ReLU(FixedLayer, keras.layers.ReLU):
    """``keras.layers.ReLU`` with a quantized output (config ``activation``)."""
