"""Fixed-point ``Embedding``."""

from __future__ import annotations

import keras

from nics_fix.layers.base import FixedLayer, substitutable


@keras.saving.register_keras_serializable(package="nics_fix")
class Embedding(FixedLayer, keras.layers.Embedding):
    """``keras.layers.Embedding``: the table is a weight point, the looked-up vectors an activation point.

    >>> import keras, nics_fix as nf
    >>> m = keras.Sequential([keras.Input((4,), dtype="int32"), nf.Embedding(10, 3, name="emb")])
    >>> [p.name for p in nf.fixed_points(m)]
    ['emb/embeddings', 'emb/activation']
    """

    fixed_weights = ("embeddings",)
    embeddings = substitutable("embeddings", keras.layers.Embedding)
