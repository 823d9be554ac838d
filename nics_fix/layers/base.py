"""Mixins that turn a Keras layer into a scoped or fixed-point one.

A fixed layer subclasses its Keras counterpart and changes nothing of its
math: during ``call`` its weight attributes (``kernel``, ``bias``, ...) read
as their quantized values, and its output goes through the activation point.
Keras' own ``call`` runs unchanged, so with an all-``none`` config a fixed
layer is the Keras layer, bit for bit.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import tensorflow as tf

from nics_fix import accumulator
from nics_fix.config import LayerFixedConfig
from nics_fix.layer_types import register_layer_type
from nics_fix.point import FixedPoint
from nics_fix.scope import apply_default_kwargs, resolve_for_layer
from nics_fix.strategy import build_strategy


def _as_training_flag(training) -> bool:
    if training is None or isinstance(training, bool):
        return bool(training)
    try:
        import tensorflow as tf

        value = tf.get_static_value(training)
    except Exception:  # noqa: BLE001 - any failure means "not static"
        value = None
    if value is None:
        raise ValueError(
            "nics_fix layers need a Python bool `training` flag (Keras fit/evaluate pass one); "
            f"got a symbolic {training!r}")
    return bool(value)


class ScopedLayer:
    """Mixin: constructor defaults from :func:`nics_fix.kwargs_scope`.

    Every layer class built on it registers its name as a valid ``by_type`` key
    of fixed and strategy configs (:mod:`nics_fix.layer_types`).
    """

    #: Whether the layers have quantization points (a config's by_type entry can act on them).
    has_fixed_points = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if any(base.__module__.startswith("keras") for base in cls.__mro__):  # not a mixin
            register_layer_type(cls.__name__, cls.has_fixed_points)

    def __init__(self, *args, **kwargs):
        keras_cls = _keras_base(type(self))
        kwargs = apply_default_kwargs(type(self), keras_cls.__init__, args, kwargs)
        super().__init__(*args, **kwargs)


def _keras_base(cls):
    for base in cls.__mro__:
        if base.__module__.startswith("keras"):
            return base
    raise TypeError(f"{cls.__name__} has no Keras layer base")


def substitutable(name: str, keras_cls):
    """A property for weight attribute ``name`` that can read as its quantized value.

    Keras layers keep weights either behind a property (``Dense.kernel``) or as
    a plain attribute (``bias``); both are wrapped so that, inside
    :meth:`FixedLayer.call`, the layer's own code reads the quantized tensor.
    """
    parent = getattr(keras_cls, name, None)
    store = f"_nf_var_{name}"

    if isinstance(parent, property):
        def fget(self):
            substitutes = self.__dict__.get("_nf_substitutes")
            if substitutes and name in substitutes:
                return substitutes[name]
            return parent.fget(self)

        return property(fget, parent.fset, doc=parent.__doc__)

    def fget(self):
        substitutes = self.__dict__.get("_nf_substitutes")
        if substitutes and name in substitutes:
            return substitutes[name]
        return self.__dict__.get(store)

    def fset(self, value):
        # Layer.__setattr__ has already tracked the variable by the time the
        # property setter runs; store it without tracking it twice.
        object.__setattr__(self, store, value)

    return property(fget, fset)


class FixedLayer(ScopedLayer):
    """Mixin: weight points for ``fixed_weights`` and an output (activation) point.

    Subclasses set ``fixed_weights`` (attribute names of the quantized
    weights) and list them with :func:`substitutable` properties.
    """

    fixed_weights: tuple[str, ...] = ()
    quantize_output = True
    #: Constructor arguments that carry resolved configs (not Keras' own).
    config_keys: tuple[str, ...] = ("fixed_config", "strategy_config")
    has_fixed_points = True

    def __init__(self, *args, fixed_config=None, strategy_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        config, strategy = resolve_for_layer(self, fixed_config, strategy_config)
        self._nf_config: LayerFixedConfig = config
        self._nf_strategy_config = strategy
        self._nf_points = {}
        call_params = inspect.signature(_keras_base(type(self)).call).parameters
        self._nf_parent_takes_training = "training" in call_params

    @property
    def fixed_config(self) -> LayerFixedConfig:
        return self._nf_config

    @property
    def strategy(self):
        points = self.__dict__.get("_nf_points") or {}
        first = next(iter(points.values()), None)
        return first.strategy if first is not None else build_strategy(self._nf_strategy_config)

    @property
    def fixed_points(self) -> dict:
        """``{key: FixedPoint}``: the weight points, then ``activation``."""
        return dict(self._nf_points)

    def build(self, input_shape):
        super().build(input_shape)
        if self._nf_config.accumulator is not None:
            if accumulator.keras_type(self) not in accumulator.SUMMING:
                raise ValueError(f"layer {self.name} ({type(self).__name__}): an accumulator entry applies to "
                                 f"{', '.join(accumulator.SUMMING)} only")
            accumulator.create_counters(self)
        strategy = build_strategy(self._nf_strategy_config)
        for key in self.fixed_weights:
            variable = getattr(self, key, None)
            if variable is not None:
                self._nf_points[key] = FixedPoint(self, key, "weight", self._nf_config.weight, strategy,
                                                  shape=tuple(variable.shape),
                                                  default_axis=self._nf_channel_axis(key, variable),
                                                  variable=variable)
        if self.quantize_output:
            config = self._nf_config.activation
            shape = None
            if config.data.granularity != "tensor" or config.gradient.granularity != "tensor":
                shape = tuple(self.compute_output_shape(input_shape))
            self._nf_points["activation"] = FixedPoint(
                self, "activation", "activation", config, strategy, shape=shape)

    def evaluation_caches(self) -> list:
        """The :class:`~nics_fix.weight_cache.EvaluationCache` objects of this layer (its weights' quantized copies)."""
        return [p.eval_cache for p in self._nf_points.values() if p.eval_cache is not None]

    def _nf_channel_axis(self, key: str, variable) -> int:
        """The output-channel axis of weight ``key``: the last one, but a depthwise
        kernel ``(kh, kw, in, multiplier)`` has one output channel per input channel
        and multiplier, and the input channel is the axis that tells them apart
        (exactly so for multiplier 1)."""
        if key == "kernel" and isinstance(self, keras.layers.DepthwiseConv2D) and len(variable.shape) == 4:
            return -2
        return -1

    def call(self, inputs, training=None, **kwargs):
        training = _as_training_flag(training)
        if self._nf_parent_takes_training:
            kwargs["training"] = training
        output_point = self._nf_points.get("activation")
        if self._nf_config.accumulator is not None:
            outputs = accumulator.exact_sums(self, inputs, training, lambda x: super(FixedLayer, self).call(x, **kwargs))
            if output_point is not None:
                outputs = output_point(outputs, training)
            return tf.cast(outputs, tf.float32)
        substitutes = {
            key: point(getattr(self, key), training)
            for key, point in self._nf_points.items()
            if key != "activation" and not point.is_identity(training)
        }
        object.__setattr__(self, "_nf_substitutes", substitutes)
        try:
            outputs = super().call(inputs, **kwargs)
        finally:
            object.__setattr__(self, "_nf_substitutes", None)
        return outputs if output_point is None else output_point(outputs, training)

    # Keras layers such as Dense save only the weights they know about; the
    # scale variables travel beside them under their own keys.
    _SCALE_KEY = "nics_fix_"

    def _nf_scale_variables(self) -> list:
        return [v for p in self._nf_points.values() for v in p.state_variables]

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for variable in self._nf_scale_variables():
            store[self._SCALE_KEY + variable.name] = keras.ops.convert_to_numpy(variable)

    def _check_load_own_variables(self, store):
        # Keras' check counts every own variable, scales included, even where
        # the layer's save_own_variables writes only its weights (Dense).
        # Scale keys may be missing (saved by the plain Keras layer) or fewer than
        # ours (saved without dynamic counters): only the weights must match.
        n_weights = len(self._trainable_variables + self._non_trainable_variables) - len(self._nf_scale_variables())
        ours = [key for key in store.keys() if key.startswith(self._SCALE_KEY)]
        if len(store.keys()) - len(ours) != n_weights:
            super()._check_load_own_variables(store)

    def load_own_variables(self, store):
        keys = list(store.keys())
        ours = [k for k in keys if k.startswith(self._SCALE_KEY)]
        base = {k: store[k] for k in keys if k not in ours}
        scale_ids = {id(v) for v in self._nf_scale_variables()}
        own = [v for v in self._trainable_variables + self._non_trainable_variables if id(v) not in scale_ids]
        generic = _keras_base(type(self)).load_own_variables is keras.layers.Layer.load_own_variables
        if generic and not ours and len(base) == len(own):
            # Saved by the plain Keras layer (no scales): its weights load by position.
            for i, variable in enumerate(own):
                variable.assign(base[str(i)])
            return
        super().load_own_variables(base)
        scales = {self._SCALE_KEY + v.name: v for v in self._nf_scale_variables()}
        for key in ours:
            if key in scales:
                saved, variable = store[key], scales[key]
                if tuple(saved.shape) != tuple(variable.shape):
                    if saved.size != 1:
                        raise ValueError(f"{self.name}: saved {key[len(self._SCALE_KEY):]} has shape "
                                         f"{tuple(saved.shape)}, the layer's has {tuple(variable.shape)} "
                                         "(a different granularity or axis)")
                    saved = np.full(variable.shape, np.asarray(saved).reshape(()), np.int32)  # one scale for all
                variable.assign(saved)

    def get_config(self):
        config = super().get_config()
        config["fixed_config"] = self._nf_config.to_dict()
        if self._nf_strategy_config:
            config["strategy_config"] = [dict(s) for s in self._nf_strategy_config]
        return config
