"""Model zoo of the platform, and users' own models.

MLP, LeNet-5 and VGG11 are built from ``nics_fix`` layers inside a
``fixed_scope``; ResNet-20, MobileNetV2 and a small ViT are plain Keras
(:mod:`experiments.keras_zoo`), and so is a user's model named by
``model._target_`` (:mod:`experiments.user_models`): those are converted
with ``nf.fixed_model``.

Layer names are stable and predictable (``dense1``, ``conv1``, ``bn1``,
``relu1``, ...; ``input_quant``, the input point, when ``input_bits`` is set), because per-layer bit allocations (``fixed.by_name``),
MLflow params (``bits.dense1.weight.data``) and the search all key on them.

>>> model, scope = build_model({"name": "mlp", "hidden_units": [16]}, (8, 8, 1), 10)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping

import keras

import nics_fix as nf
from experiments import keras_zoo

MODELS = ("mlp", "lenet5", "vgg11", "resnet20", "mobilenet_v2", "vit", "custom")


class ModelConfigError(ValueError):
    """A model config names an unknown model or has a bad field."""


class _Names:
    """Counts layers per kind: dense1, dense2, relu1, ..."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str) -> str:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return f"{kind}{self.counts[kind]}"


def _activation(x, names, cfg):
    x = nf.ReLU(name=names("relu"))(x)
    return x


def _mlp(inputs, num_classes, cfg, names):
    x = nf.Flatten(name="flatten")(inputs) if len(inputs.shape) > 2 else inputs
    for units in cfg.get("hidden_units", [128, 128]):
        x = nf.Dense(int(units), name=names("dense"))(x)
        if cfg.get("batch_norm", False):
            x = nf.BatchNormalization(name=names("bn"))(x)
        x = _activation(x, names, cfg)
        if cfg.get("dropout", 0.0):
            x = nf.Dropout(float(cfg["dropout"]), name=names("dropout"))(x)
    return nf.Dense(num_classes, name=names("dense"))(x)


def _pool_if_possible(x, names):
    # Small inputs (8x8 digits) cannot take every pooling of a 32x32 design.
    if min(x.shape[1], x.shape[2]) >= 2:
        return nf.MaxPool2D(2, name=names("pool"))(x)
    return x


def _lenet5(inputs, num_classes, cfg, names):
    x = inputs
    for filters in cfg.get("conv_filters", [6, 16]):
        x = nf.Conv2D(int(filters), 5, padding="same", name=names("conv"))(x)
        x = _activation(x, names, cfg)
        x = _pool_if_possible(x, names)
    x = nf.Flatten(name="flatten")(x)
    for units in cfg.get("hidden_units", [120, 84]):
        x = nf.Dense(int(units), name=names("dense"))(x)
        x = _activation(x, names, cfg)
    return nf.Dense(num_classes, name=names("dense"))(x)


VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def _vgg11(inputs, num_classes, cfg, names):
    width = float(cfg.get("width", 1.0))
    x = inputs
    for item in cfg.get("layers", VGG11):
        if item == "M":
            x = _pool_if_possible(x, names)
            continue
        x = nf.Conv2D(max(1, int(round(int(item) * width))), 3, padding="same",
                      use_bias=not cfg.get("batch_norm", True), name=names("conv"))(x)
        if cfg.get("batch_norm", True):
            x = nf.BatchNormalization(name=names("bn"))(x)
        x = _activation(x, names, cfg)
    x = nf.Flatten(name="flatten")(x)
    for units in cfg.get("hidden_units", [512]):
        x = nf.Dense(max(1, int(round(int(units) * width))), name=names("dense"))(x)
        x = _activation(x, names, cfg)
        if cfg.get("dropout", 0.0):
            x = nf.Dropout(float(cfg["dropout"]), name=names("dropout"))(x)
    return nf.Dense(num_classes, name=names("dense"))(x)


_BUILDERS = {"mlp": _mlp, "lenet5": _lenet5, "vgg11": _vgg11}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_model_config(model_cfg: Mapping) -> None:
    """Layer sizes are lists of positive integers, width > 0, dropout in [0, 1): else ModelConfigError."""
    for key in ("hidden_units", "conv_filters", "layers", "filters"):
        if key not in model_cfg:
            continue
        value = model_cfg[key]
        allowed = ("M",) if key == "layers" else ()
        if (not isinstance(value, (list, tuple))
                or any(v not in allowed and (not isinstance(v, int) or isinstance(v, bool) or v < 1)
                       for v in value)):
            extra = " or 'M' (max pooling)" if allowed else ""
            raise ModelConfigError(f"model.{key}: expected a list of positive integers{extra}, got {value!r} "
                                   f"(e.g. model.{key}=[128,64])")
    if "width" in model_cfg and not (_is_number(model_cfg["width"]) and model_cfg["width"] > 0):
        raise ModelConfigError(f"model.width: expected a positive number, got {model_cfg['width']!r}")
    input_bits = model_cfg.get("input_bits")
    if input_bits is not None and (not isinstance(input_bits, int) or isinstance(input_bits, bool)
                                   or not 1 <= input_bits <= 32):
        raise ModelConfigError(f"model.input_bits: expected null or an integer from 1 to 32, got {input_bits!r}")
    dropout = model_cfg.get("dropout") or 0.0
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise ModelConfigError(f"model.dropout: expected a number in [0, 1), got {model_cfg.get('dropout')!r}")
    for key in ("blocks", "patch_size", "dim", "depth", "heads", "input_size"):
        value = model_cfg.get(key)
        if key in model_cfg and not (value is None and key == "input_size") and not (
                isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ModelConfigError(f"model.{key}: expected a positive integer, got {value!r}")
    if "mlp_ratio" in model_cfg and not (_is_number(model_cfg["mlp_ratio"]) and model_cfg["mlp_ratio"] > 0):
        raise ModelConfigError(f"model.mlp_ratio: expected a positive number, got {model_cfg['mlp_ratio']!r}")


def _input_point(bits: int) -> dict:
    """The model's input point: the integer export and engine need the input in fixed point."""
    return {"activation": {"data_config": {"bit_width": bits, "training": "auto", "not_training": "fixed"}}}


def build_model(model_cfg: Mapping, input_shape, num_classes: int, fixed_cfg=None, strategy_cfg=None):
    """Build the configured model with its fixed config; return ``(model, scope)``.

    A node with ``_target_`` is a user's model (whatever its ``name``); the
    scope records the per-layer configs either way.
    """
    name = model_cfg.get("name")
    if "_target_" in model_cfg or name == "custom":
        from experiments.user_models import call_target

        return _converted(call_target(model_cfg, input_shape, num_classes), name, fixed_cfg, strategy_cfg)
    if name not in _BUILDERS and name not in keras_zoo.BUILDERS:
        raise ModelConfigError(f"model.name: unknown model {name!r}; available: {', '.join(MODELS)}")
    check_model_config(model_cfg)
    if name in keras_zoo.BUILDERS:
        float_model = keras_zoo.BUILDERS[name](model_cfg, input_shape, num_classes)
        return _converted(float_model, name, fixed_cfg, strategy_cfg)
    names = _Names()
    with nf.fixed_scope(name, fixed_cfg, strategy_cfg) as scope:
        inputs = keras.Input(tuple(input_shape), name="inputs")
        x = inputs
        if model_cfg.get("input_bits") is not None:
            x = nf.Quantize(name="input_quant", fixed_config=_input_point(model_cfg["input_bits"]))(x)
        outputs = _BUILDERS[name](x, num_classes, model_cfg, names)
        model = keras.Model(inputs, outputs, name=name)
    return model, scope


def _converted(float_model, name, fixed_cfg, strategy_cfg):
    """``nf.fixed_model`` of a float Keras model, and a scope recording what each layer took."""
    try:
        model = nf.fixed_model(float_model, fixed_cfg, strategy_cfg)
    except nf.ConversionError as err:
        raise ModelConfigError(f"model {name!r}: {err}") from None
    scope = nf.scope.FixedScope(str(name), fixed_cfg, strategy_cfg)
    for layer in nf.introspect.fixed_layers(model):
        scope.resolve(layer)
    return model, scope
