"""Fixed-point ``Dense``."""

from __future__ import annotations

import keras

from nics_fix.layers.base import FixedLayer, substitutable


@keras.saving.register_keras_serializable(package="nics_fix")
class Dense(FixedLayer, keras.layers.Dense):
    """``keras.layers.Dense`` with quantized kernel, bias and output.

    Points: ``kernel`` and ``bias`` (config ``weight``), ``activation`` (the
    output after the activation function; config ``activation``).

    >>> import nics_fix as nf
    >>> layer = nf.Dense(4, fixed_config={"weight": {"data_config": {
    ...     "bit_width": 8, "training": "auto", "not_training": "auto"}}})
    >>> layer.fixed_config.weight.data.bit_width
    8
    """

    fixed_weights = ("kernel", "bias")
    kernel = substitutable("kernel", keras.layers.Dense)
    bias = substitutable("bias", keras.layers.Dense)
