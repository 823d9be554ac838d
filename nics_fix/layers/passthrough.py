"""Layers with nothing to quantize, re-exported so whole models use one namespace.

They take :func:`nics_fix.kwargs_scope` defaults like the fixed layers, and
are otherwise exactly their Keras counterparts (their inputs are already
quantized by the layer before them: pooling, flattening and dropout keep
values on the grid, and ``Add`` widens it by one bit, as hardware adders do).
"""

from __future__ import annotations

import keras

from nics_fix.layers.base import ScopedLayer


def _passthrough(keras_cls):
    cls = type(keras_cls.__name__, (ScopedLayer, keras_cls), {
        "__doc__": f"``keras.layers.{keras_cls.__name__}`` taking nics_fix kwargs scopes.",
        "__module__": __name__,
    })
    return keras.saving.register_keras_serializable(package="nics_fix")(cls)


MaxPool2D = MaxPooling2D = _passthrough(keras.layers.MaxPooling2D)
AveragePooling2D = AvgPool2D = _passthrough(keras.layers.AveragePooling2D)
GlobalAveragePooling2D = _passthrough(keras.layers.GlobalAveragePooling2D)
Flatten = _passthrough(keras.layers.Flatten)
Dropout = _passthrough(keras.layers.Dropout)
Add = _passthrough(keras.layers.Add)
Concatenate = _passthrough(keras.layers.Concatenate)
Reshape = _passthrough(keras.layers.Reshape)
Activation = _passthrough(keras.layers.Activation)
