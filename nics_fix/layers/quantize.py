"""``Quantize``: a point on its own, for quantizing any tensor in a model."""

from __future__ import annotations

import keras

from nics_fix.layers.base import FixedLayer


@keras.saving.register_keras_serializable(package="nics_fix")
class Quantize(FixedLayer, keras.layers.Identity):
    """Identity layer whose output is quantized with the ``activation`` config.

    Usually created through :func:`nics_fix.quantize`.

    >>> import numpy as np, nics_fix as nf
    >>> q = nf.Quantize(fixed_config={"activation": {"data_config": {
    ...     "bit_width": 4, "training": 0, "not_training": 0}}})
    >>> q(np.array([0.3, 0.9], "float32")).numpy()
    array([0.25 , 0.875], dtype=float32)
    """

