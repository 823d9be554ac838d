"""Listing a model's quantization points."""

from __future__ import annotations

import dataclasses

from nics_fix.layers.base import FixedLayer


@dataclasses.dataclass(frozen=True)
class PointSummary:
    """One quantization point as plain values (see :func:`fixed_points`)."""

    name: str  # "<layer>/<variable>" or "<layer>/activation"
    layer: str
    variable: str
    kind: str  # "weight" or "activation"
    data_config: dict
    gradient_config: dict
    data_scale: int | list  # a nested list for per-channel and per-block scales
    grad_scale: int | list
    dynamic: dict | None = None  # {"data"/"grad": {"calls", "overflows", "streak"}} of dynamic directions


def fixed_layers(model) -> list:
    """Every nics_fix fixed layer in ``model`` (nested models included), in order."""
    layers = model._flatten_layers(include_self=True, recursive=True)
    return [layer for layer in layers if isinstance(layer, FixedLayer)]


def point_objects(model) -> list:
    """The live :class:`~nics_fix.point.FixedPoint` objects of a built model."""
    return [p for layer in fixed_layers(model) for p in layer.fixed_points.values()]


def fixed_points(model) -> list[PointSummary]:
    """Every quantization point: name, kind, configs and current scales.

    >>> import keras, nics_fix as nf
    >>> m = keras.Sequential([keras.Input((3,)), nf.Dense(2, name="d")])
    >>> [p.name for p in nf.fixed_points(m)]
    ['d/kernel', 'd/bias', 'd/activation']
    """
    return [PointSummary(**p.describe()) for p in point_objects(model)]


def layer_fixed_configs(model) -> dict:
    """``{layer name: LayerFixedConfig}`` for every fixed layer of the model."""
    return {layer.name: layer.fixed_config for layer in fixed_layers(model)}


def unmatched_by_name(model, fixed_cfgs) -> list[str]:
    """``by_name`` keys of a fixed config that name no layer of ``model``."""
    from nics_fix.config import as_fixed_config

    names = {layer.name for layer in model._flatten_layers(include_self=False, recursive=True)}
    return [key for key in as_fixed_config(fixed_cfgs).by_name_keys if key not in names]
