"""Converting a Keras 3 model into a fixed-point one.

:func:`fixed_model` rebuilds a Functional or Sequential model (nested ones
included) with every layer that has a ``nics_fix`` counterpart replaced by it:
``keras.layers.Dense`` becomes :class:`nics_fix.Dense`, and so on. The graph,
the layer names and every weight are kept, so a config written for the
original's layer names applies as it would to a model built inside
:func:`nics_fix.fixed_scope`. The original model is not changed.

>>> import keras, nics_fix as nf
>>> inputs = keras.Input((4,))
>>> float_model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(inputs))
>>> cfg = {"by_type": {"Dense": {"weight": {"data_config": {
...     "bit_width": 8, "training": "auto", "not_training": "auto"}}}}}
>>> model = nf.fixed_model(float_model, cfg)
>>> [p.name for p in nf.fixed_points(model)]
['fc/kernel', 'fc/bias', 'fc/activation']

Layers that hold weights but have no counterpart stay float, and one warning
names them (see :func:`unsupported_layers`); layers without weights are copied
unchanged. A subclassed model with its own ``call`` has no graph to rebuild:
it raises :class:`ConversionError`.
"""

from __future__ import annotations

import warnings

import keras
from keras.src.models.functional import Functional  # what keras.Model(inputs, outputs) builds

from nics_fix.layers import COUNTERPARTS
from nics_fix.layers.base import FixedLayer
from nics_fix.log import logger
from nics_fix.scope import fixed_scope

_GRAPH_MODELS = (keras.Sequential, Functional)


class ConversionError(TypeError):
    """A model (or one of its layers) that :func:`fixed_model` cannot rebuild."""


def counterpart(layer):
    """The ``nics_fix`` class that replaces ``layer``, or None.

    Only the exact Keras classes are replaced: a user's subclass of
    ``keras.layers.Dense`` may change its math, so it is left alone.
    A ``nics_fix`` fixed layer maps to its own class (its config is re-resolved).
    """
    if isinstance(layer, FixedLayer):
        return type(layer)
    return COUNTERPARTS.get(type(layer))


def _check_graph_model(model, where: str) -> None:
    if not isinstance(model, _GRAPH_MODELS) or "call" in _own_attributes(type(model)):
        raise ConversionError(
            f"fixed_model: {where} {model.name!r} is a subclassed {type(model).__name__} with its own "
            "`call`, which has no layer graph to rebuild; build it as a Functional or Sequential "
            "model, or write it with nics_fix layers (nf.Dense, nf.Conv2D, ...) inside nf.fixed_scope")


def _own_attributes(cls) -> set:
    """Attributes defined by ``cls`` and its bases below Keras' own model classes."""
    names = set()
    for base in cls.__mro__:
        if base.__module__.startswith("keras"):
            break
        names.update(vars(base))
    return names


def _graph_layers(model):
    """The layers the conversion sees: nested Functional/Sequential models are opened."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _check_graph_model(layer, "nested model")
            yield from _graph_layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            yield layer


def unsupported_layers(model) -> dict[str, str]:
    """``{layer name: class name}`` of the layers that hold weights but stay float.

    These are the layers :func:`fixed_model` leaves unquantized: they have
    weights and no ``nics_fix`` counterpart (on a converted model: they are not
    fixed layers).

    >>> import keras, nics_fix as nf
    >>> m = keras.Sequential([keras.Input((5, 3)), keras.layers.GRU(2, name="gru")])
    >>> nf.unsupported_layers(m)
    {'gru': 'GRU'}
    """
    _check_graph_model(model, "model")
    return {layer.name: type(layer).__name__ for layer in _graph_layers(model)
            if layer.weights and counterpart(layer) is None}


def _clone_layer(layer):
    config = layer.get_config()
    cls = counterpart(layer)
    if cls is None:
        cls = type(layer)
    else:  # configs come from fixed_model's arguments, through the scope
        for key in cls.config_keys:
            config.pop(key, None)
    try:
        return cls.from_config(config)
    except Exception as err:  # noqa: BLE001 - any failure: the layer cannot be rebuilt from its config
        if not layer.variables and cls is type(layer):
            # Stateless (a Lambda, say): the converted model can share it, nothing in it changes.
            return layer
        raise ConversionError(
            f"fixed_model: layer {layer.name!r} ({type(layer).__name__}) cannot be rebuilt from its "
            f"get_config(): {type(err).__name__}: {' '.join(str(err).split())}; give the layer a get_config() "
            "that holds every constructor argument, and an __init__ that takes **kwargs") from None


def _clone_model(model, cache: dict):
    """``model`` rebuilt layer by layer; ``cache`` maps ``id(original)`` to its clone.

    Shared layers are cloned once (the cache); nested models are rebuilt the
    same way, and inputs keep their names (Keras' clone_model renames them).
    """
    def clone(layer):
        if id(layer) not in cache:
            if isinstance(layer, keras.Model):
                _check_graph_model(layer, "nested model")
                cache[id(layer)] = _clone_model(layer, cache)
            else:
                cache[id(layer)] = _clone_layer(layer)
        return cache[id(layer)]

    if isinstance(model, keras.Sequential):
        return keras.models.clone_model(model, clone_function=clone)
    inputs = keras.tree.map_structure(
        lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x._keras_history.operation.name),
        model.input)
    return keras.models.clone_model(model, input_tensors=inputs, clone_function=clone)


def _state(layer) -> list:
    """The layer's own variables besides nics_fix scales, then its random-seed states."""
    own = layer._trainable_variables + layer._non_trainable_variables
    if isinstance(layer, FixedLayer):
        scales = {id(v) for v in layer._nf_scale_variables()}
        own = [v for v in own if id(v) not in scales]
    return own + [generator.state for generator in layer._seed_generators]


def _copy_state(source, target) -> None:
    """Assign every variable of ``source`` (sublayers included) to its twin in ``target``."""
    pairs = []
    for layers in (source._flatten_layers(), target._flatten_layers()):
        pairs.append([v for layer in layers for v in _state(layer)])
    src, dst = pairs
    if len(src) != len(dst) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(src, dst)):
        raise ConversionError(
            f"fixed_model: layer {source.name!r} ({type(source).__name__}) rebuilt with different "
            f"variables: {[tuple(v.shape) for v in src]} vs {[tuple(v.shape) for v in dst]}")
    for a, b in zip(src, dst):
        b.assign(a)


def fixed_model(model, fixed_config=None, strategy_config=None) -> keras.Model:
    """A fixed-point copy of a built Functional or Sequential Keras 3 model.

    Args:
        model: a built ``keras.Model`` (Functional or Sequential; nested
            models of those kinds are converted too).
        fixed_config: a fixed config (parsed, a dict, YAML text or a path);
            resolved per layer by ``by_name`` and ``by_type`` exactly as in
            :func:`nics_fix.fixed_scope`. None: every point float.
        strategy_config: a strategy config, resolved the same way, or None.

    Returns a new model of the same graph and layer names, with every weight
    copied; with no (or a float) config it computes what ``model`` computes,
    bit for bit. A layer of a ``nics_fix`` model is rebuilt with the config
    given here (not the one it had). ``by_name`` keys that match no layer are
    reported with a warning, as by ``fixed_scope``.

    Raises:
        ConversionError: ``model`` (or a nested model) is subclassed with its
            own ``call``, or a layer cannot be rebuilt from its ``get_config()``.
    """
    if not isinstance(model, keras.Model):
        raise ConversionError(f"fixed_model: expected a keras.Model, got {type(model).__name__}")
    _check_graph_model(model, "model")
    if not model.built:
        raise ConversionError(f"fixed_model: model {model.name!r} is not built; give it a keras.Input "
                              "or call it on a batch first")
    unsupported = unsupported_layers(model)
    cache: dict = {}
    with fixed_scope(model.name, fixed_config, strategy_config):
        converted = _clone_model(model, cache)
    originals = {id(layer): layer for layer in model._flatten_layers(recursive=True)}
    for key, clone in cache.items():
        original = originals[key]
        if not isinstance(original, keras.Model):
            _copy_state(original, clone)
        elif not original.trainable:  # setting True would also unfreeze every layer inside
            clone.trainable = False
    if not model.trainable:
        converted.trainable = False
    if unsupported:
        names = ", ".join(f"{name} ({cls})" for name, cls in unsupported.items())
        message = (f"fixed_model: {len(unsupported)} layer(s) hold weights but have no nics_fix "
                   f"counterpart and stay float: {names}")
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return converted
