"""Keras layers of nics_fix: fixed-point layers and pass-through layers."""

import keras

from nics_fix.layers.activation import ReLU
from nics_fix.layers.attention import MultiHeadAttention
from nics_fix.layers.base import FixedLayer, ScopedLayer
from nics_fix.layers.convolutional import Conv1D, Conv2D, Conv2DTranspose, DepthwiseConv2D, SeparableConv2D
from nics_fix.layers.core import Dense
from nics_fix.layers.einsum_dense import EinsumDense
from nics_fix.layers.embedding import Embedding
from nics_fix.layers.normalization import BatchNormalization, LayerNormalization
from nics_fix.layers.passthrough import (
    Activation,
    Add,
    AveragePooling2D,
    AvgPool2D,
    Concatenate,
    Dropout,
    Flatten,
    GlobalAveragePooling2D,
    MaxPool2D,
    MaxPooling2D,
    Reshape,
)
from nics_fix.layers.quantize import Quantize

FIXED_LAYERS = (Dense, Conv2D, DepthwiseConv2D, BatchNormalization, ReLU, Quantize,
                Conv1D, Conv2DTranspose, SeparableConv2D, EinsumDense, Embedding, LayerNormalization,
                MultiHeadAttention)

#: The Keras class each fixed layer replaces in :func:`nics_fix.fixed_model`.
COUNTERPARTS = {
    keras.layers.Dense: Dense,
    keras.layers.Conv2D: Conv2D,
    keras.layers.DepthwiseConv2D: DepthwiseConv2D,
    keras.layers.BatchNormalization: BatchNormalization,
    keras.layers.ReLU: ReLU,
    keras.layers.Conv1D: Conv1D,
    keras.layers.Conv2DTranspose: Conv2DTranspose,
    keras.layers.SeparableConv2D: SeparableConv2D,
    keras.layers.EinsumDense: EinsumDense,
    keras.layers.Embedding: Embedding,
    keras.layers.LayerNormalization: LayerNormalization,
    keras.layers.MultiHeadAttention: MultiHeadAttention,
}

__all__ = [
    "COUNTERPARTS", "Activation", "Add", "AveragePooling2D", "AvgPool2D", "BatchNormalization", "Concatenate",
    "Conv2D", "DepthwiseConv2D", "Dense", "Dropout", "FIXED_LAYERS", "FixedLayer", "Flatten",
    "GlobalAveragePooling2D", "MaxPool2D", "MaxPooling2D", "Quantize", "ReLU", "Reshape",
    "ScopedLayer", "Conv1D", "Conv2DTranspose", "SeparableConv2D", "EinsumDense", "Embedding",
    "LayerNormalization", "MultiHeadAttention",
]
