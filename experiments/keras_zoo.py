"""Zoo models written in plain Keras 3 (converted to fixed point by ``nf.fixed_model``).

ResNet-20 (He et al. 2016, CIFAR), MobileNetV2 (``keras.applications``,
``weights=None``) and a small vision transformer. Each builder takes the
model node of the config, the data's input shape and class count, and returns
a float ``keras.Model`` that ends in logits. Layer names are explicit and
stable (``stage2_block1_1_conv``, ``block1_attn``, ...), since per-layer bit
allocations, MLflow params (``bits.<layer>...``) and the search key on them.

>>> model = resnet20({"filters": [4, 8, 8]}, (8, 8, 1), 10)  # doctest: +SKIP
>>> model.get_layer("stage2_block1_1_conv").strides  # doctest: +SKIP
(2, 2)
"""

from __future__ import annotations

from collections.abc import Mapping

import keras

#: ResNet-20 widths per stage (3 stages of basic blocks, as in the paper's CIFAR nets).
RESNET20_FILTERS = (16, 32, 64)


def _conv_bn(x, filters: int, strides: int, prefix: str, relu: bool, kernel_size: int = 3):
    x = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                            kernel_initializer="he_normal", name=f"{prefix}conv")(x)
    x = keras.layers.BatchNormalization(name=f"{prefix}bn")(x)
    return keras.layers.ReLU(name=f"{prefix}relu")(x) if relu else x


def _basic_block(x, filters: int, strides: int, prefix: str):
    """conv-bn-relu, conv-bn, plus the shortcut, then relu (He et al. 2016, Fig. 2)."""
    shortcut = x
    y = _conv_bn(x, filters, strides, f"{prefix}_1_", relu=True)
    y = _conv_bn(y, filters, 1, f"{prefix}_2_", relu=False)
    if strides != 1 or x.shape[-1] != filters:
        # Projection shortcut (option B) where the shape changes: a 1x1 conv + BN,
        # 2.9 k of ResNet-20's 0.27 M parameters; option A's zero padding needs
        # a non-layer op that a converted model could not quantize.
        shortcut = _conv_bn(x, filters, strides, f"{prefix}_shortcut_", relu=False, kernel_size=1)
    y = keras.layers.Add(name=f"{prefix}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{prefix}_out")(y)


def resnet20(cfg: Mapping, input_shape, num_classes: int) -> keras.Model:
    """CIFAR ResNet-20: a 3x3 conv, 3 stages x ``blocks`` basic blocks, global pooling, dense.

    ``filters`` ([16, 32, 64]) are the stage widths; ``blocks`` (3) the blocks per
    stage (3 gives 6*3+2 = 20 layers). Stages 2 and 3 start with stride 2.
    """
    filters = [int(f) for f in cfg.get("filters", RESNET20_FILTERS)]
    blocks = int(cfg.get("blocks", 3))
    inputs = keras.Input(tuple(input_shape), name="inputs")
    x = _conv_bn(inputs, filters[0], 1, "stem_", relu=True)
    for stage, width in enumerate(filters, start=1):
        for block in range(1, blocks + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(x, width, strides, f"stage{stage}_block{block}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, name="fc")(x)
    return keras.Model(inputs, outputs, name="resnet20")


def mobilenet_v2(cfg: Mapping, input_shape, num_classes: int) -> keras.Model:
    """``keras.applications.MobileNetV2`` (``weights=None``) on the data's images.

    ``width`` (0.35) is MobileNetV2's ``alpha``; ``input_size`` (32) the square
    size images are resized to first (MobileNetV2 takes at least 32x32), null
    for the data's own size. Layer names are Keras' (``Conv1``, ``block_1_expand``,
    ``Logits``, ...) plus ``resize``.
    """
    inputs = keras.Input(tuple(input_shape), name="inputs")
    x = inputs
    size = cfg.get("input_size", 32)
    if size is not None and tuple(input_shape[:2]) != (int(size), int(size)):
        x = keras.layers.Resizing(int(size), int(size), name="resize")(x)
    net = keras.applications.MobileNetV2(input_tensor=x, alpha=float(cfg.get("width", 0.35)), weights=None,
                                         classes=num_classes, classifier_activation=None, name="mobilenet_v2")
    return keras.Model(inputs, net.output, name="mobilenet_v2")


def vit(cfg: Mapping, input_shape, num_classes: int) -> keras.Model:
    """A small vision transformer: patch embedding, pre-norm encoder blocks, mean pooling.

    ``patch_size`` (4) square patches are embedded by a strided conv into ``dim``
    (64) features; a 3x3 depthwise conv over the patch grid, added to it, gives
    the tokens their position (a conditional position encoding, Chu et al. 2021:
    a learned table would be a weight without a fixed counterpart). ``depth``
    (2) blocks of ``heads`` (4) -head self-attention and an MLP of ``mlp_ratio``
    (2) x ``dim`` units with GELU.
    """
    patch = int(cfg.get("patch_size", 4))
    dim, depth, heads = int(cfg.get("dim", 64)), int(cfg.get("depth", 2)), int(cfg.get("heads", 4))
    hidden = int(round(float(cfg.get("mlp_ratio", 2)) * dim))
    patch = max(1, min(patch, int(input_shape[0]), int(input_shape[1])))
    inputs = keras.Input(tuple(input_shape), name="inputs")
    grid = keras.layers.Conv2D(dim, patch, strides=patch, name="patch_embed")(inputs)
    position = keras.layers.DepthwiseConv2D(3, padding="same", name="position")(grid)
    grid = keras.layers.Add(name="position_add")([grid, position])
    x = keras.layers.Reshape((grid.shape[1] * grid.shape[2], dim), name="tokens")(grid)
    for block in range(1, depth + 1):
        prefix = f"block{block}"
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{prefix}_norm1")(x)
        y = keras.layers.MultiHeadAttention(heads, max(1, dim // heads), name=f"{prefix}_attn")(y, y)
        x = keras.layers.Add(name=f"{prefix}_add1")([x, y])
        y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{prefix}_norm2")(x)
        y = keras.layers.Dense(hidden, activation="gelu", name=f"{prefix}_mlp1")(y)
        y = keras.layers.Dense(dim, name=f"{prefix}_mlp2")(y)
        x = keras.layers.Add(name=f"{prefix}_add2")([x, y])
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, name="head")(x)
    return keras.Model(inputs, outputs, name="vit")


BUILDERS = {"resnet20": resnet20, "mobilenet_v2": mobilenet_v2, "vit": vit}
