"""Manual quantization anywhere, and the original's chain style for functional models.

>>> import keras, nics_fix as nf
>>> cfg = {"activation": {"data_config": {"bit_width": 8, "training": "auto", "not_training": "auto"}}}
>>> inputs = keras.Input((4,))
>>> logits = (nf.wrap(inputs).Dense(units=8, name="d1").ReLU().Dense(units=2)
...           .apply(nf.quantize, cfg, name="logits").tensor)
>>> keras.Model(inputs, logits).layers[-1].name
'logits'
"""

from __future__ import annotations

from collections.abc import Mapping

from nics_fix.config import ConfigError, DataConfig, FixedConfig, LayerFixedConfig, PointConfig
from nics_fix.layer_types import lookup_layer_type
from nics_fix.scope import current_scope


def _point_config(fix_cfg, name: str | None = None):
    """Accept the forms a user naturally writes for one point's config."""
    if fix_cfg is None or isinstance(fix_cfg, LayerFixedConfig):
        return fix_cfg
    if isinstance(fix_cfg, FixedConfig):  # a whole config file: the point's entry, as a scope would find it
        return fix_cfg.resolve(name or "", "Quantize")
    if isinstance(fix_cfg, PointConfig):
        return LayerFixedConfig(activation=fix_cfg)
    if isinstance(fix_cfg, DataConfig):
        return LayerFixedConfig(activation=PointConfig(data=fix_cfg))
    if isinstance(fix_cfg, str):
        scope = current_scope()
        if scope is None:
            raise ConfigError(f"config_name {fix_cfg!r} given outside any fixed_scope", "config_name")
        return scope.fixed_config.named(fix_cfg)
    if isinstance(fix_cfg, Mapping):
        if "data_config" in fix_cfg or "gradient_config" in fix_cfg:  # a bare point config
            return LayerFixedConfig.from_dict({"activation": fix_cfg}, "fix_cfg")
        return LayerFixedConfig.from_dict(fix_cfg, "fix_cfg")
    raise ConfigError(f"cannot use {type(fix_cfg).__name__} as a fixed config", "fix_cfg")


def quantize(x, fix_cfg=None, name: str | None = None, training=None, strategy_config=None):
    """Quantize ``x`` (a tensor or a Keras symbolic tensor) at a new named point.

    ``fix_cfg`` may be a point config (``{data_config: ..., gradient_config:
    ...}``), a layer config (``{activation: ...}``), a ``config_name`` of the
    active scope, a whole :class:`FixedConfig` (its entry for ``name``, type
    ``Quantize``, as in a scope), or ``None`` to look the point up in the
    active scope by ``name``.
    """
    from nics_fix.layers.quantize import Quantize

    layer = Quantize(fixed_config=_point_config(fix_cfg, name), strategy_config=strategy_config, name=name)
    return layer(x) if training is None else layer(x, training=training)


#: The spelling the original framework documented.
quantitize = quantize


class wrap:  # noqa: N801 - lower case: it reads as a function call in the chain
    """Chain layers on a tensor: ``wrap(x).Dense(units=10).ReLU().tensor``.

    Any layer class of :mod:`nics_fix.layers` (or the original's name for it,
    ``MaxPool``, ``BN``) is available as a method that
    builds the layer with the given arguments and applies it; ``apply(fn,
    *args, **kwargs)`` applies any function ``fn(tensor, *args, **kwargs)``.
    """

    def __init__(self, tensor):
        self.tensor = tensor

    def apply(self, fn, *args, **kwargs) -> "wrap":
        return wrap(fn(self.tensor, *args, **kwargs))

    def __getattr__(self, name):
        from nics_fix import layers

        cls = getattr(layers, name, None)
        if cls is None and name[:1].isupper():  # the original's names: .MaxPool(...), .BN(...)
            try:
                cls = getattr(layers, lookup_layer_type(name)[0], None)
            except LookupError as err:
                raise AttributeError(f"nics_fix.layers has no layer {name!r}: {err}") from None
        if not (isinstance(cls, type) and name[:1].isupper()):
            raise AttributeError(f"nics_fix.layers has no layer {name!r}")

        def build_and_apply(*args, **kwargs):
            return wrap(cls(*args, **kwargs)(self.tensor))

        return build_and_apply
