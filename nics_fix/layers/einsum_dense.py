"""Fixed-point ``EinsumDense``."""

from __future__ import annotations

import keras

from nics_fix.layers.base import FixedLayer, substitutable


@keras.saving.register_keras_serializable(package="nics_fix")
class EinsumDense(FixedLayer, keras.layers.EinsumDense):
    """``keras.layers.EinsumDense`` with quantized kernel, bias and output.

    Also the query/key/value/output projections of
    :class:`nics_fix.MultiHeadAttention`.

    >>> import keras, nics_fix as nf
    >>> m = keras.Sequential([keras.Input((3, 4)), nf.EinsumDense("abc,cd->abd", (3, 2), bias_axes="d",
    ...                                                              name="proj")])
    >>> [p.name for p in nf.fixed_points(m)]
    ['proj/kernel', 'proj/bias', 'proj/activation']
    """

    fixed_weights = ("kernel", "bias")
    kernel = substitutable("kernel", keras.layers.EinsumDense)
    bias = substitutable("bias", keras.layers.EinsumDense)
