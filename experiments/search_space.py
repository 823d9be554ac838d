"""The search space read from a built model, and the fixed config of one allocation.

Every fixed layer contributes its weight point (if it has weights) and its
activation point; each configured quantity of a point is one
:class:`Dimension`. Example::

    space = search_space(model, {"widths": [4, 8]})
    params = {p: 4 for p in search_params(space)}
    fixed = allocation_fixed_config(model, allocation(model, space, params))
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import nics_fix as nf
from experiments import tracking
from experiments.search_options import FLOAT_BITS, SearchConfigError, _is_int, search_options
from experiments.training import build


@dataclass(frozen=True)
class Dimension:
    """One searched quantity of one layer: ``bits.<layer>.<quantity>.<direction>``.

    ``param`` is the Optuna parameter that sets it (shared by every layer of a
    type with ``share_by_type``).
    """

    layer: str
    layer_type: str
    quantity: str    # weight | activation
    direction: str   # data | grad
    choices: tuple
    param: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.layer, self.quantity, self.direction)


# --------------------------------------------------------------------------- options



def _layer_quantities(layer) -> list[str]:
    kinds = {p.kind for p in layer.fixed_points.values()}
    return [q for q in ("weight", "activation") if q in kinds]


def _layer_type(layer) -> str:
    return type(layer).__name__


def _excluded(layer, patterns) -> bool:
    return any(fnmatch.fnmatchcase(layer.name, p) or fnmatch.fnmatchcase(_layer_type(layer), p)
               for p in patterns)


def _pin_value(value, key):
    if value is None or (isinstance(value, str) and value.lower() == "float"):
        return None
    if _is_int(value) and 1 <= value <= FLOAT_BITS:
        return int(value)
    raise SearchConfigError(f"{key}: a pin is a bit width from 1 to {FLOAT_BITS} or 'float', got {value!r}")


def pinned_quantities(model, search: Mapping | None = None) -> dict[tuple[str, str], int | None]:
    """``{(layer, weight|activation): bits or None (float)}`` from ``search.pin``."""
    opts = search_options(search)
    layers = {layer.name: layer for layer in nf.introspect.fixed_layers(model)}
    pins: dict[tuple[str, str], int | None] = {}
    for name, value in opts["pin"].items():
        key = f"search.pin.{name}"
        if name not in layers:
            raise SearchConfigError(f"{key}: no fixed layer named {name!r}; layers: {', '.join(layers)}")
        quantities = _layer_quantities(layers[name])
        if isinstance(value, Mapping):
            for quantity, bits in value.items():
                if quantity not in quantities:
                    raise SearchConfigError(f"{key}.{quantity}: layer {name} has quantities "
                                            f"{', '.join(quantities)}")
                pins[(name, quantity)] = _pin_value(bits, f"{key}.{quantity}")
        else:
            for quantity in quantities:
                pins[(name, quantity)] = _pin_value(value, key)
    return pins


def search_space(model, search: Mapping | None = None) -> list[Dimension]:
    """The searched points of ``model``: one :class:`Dimension` per (layer, quantity, direction).

    Every fixed layer contributes ``weight`` (if it has weight points) and
    ``activation``, each with the directions in ``search.quantities``;
    pinned (``search.pin``) and excluded (``search.exclude``) ones are left out.
    """
    opts = search_options(search)
    pins = pinned_quantities(model, opts)
    dims = []
    for layer in nf.introspect.fixed_layers(model):
        if _excluded(layer, opts["exclude"]):
            continue
        owner = _layer_type(layer) if opts["share_by_type"] else layer.name
        for quantity in _layer_quantities(layer):
            if (layer.name, quantity) in pins:
                continue
            for direction in ("data", "grad"):
                if f"{quantity}.{direction}" not in opts["quantities"]:
                    continue
                widths = opts["grad_widths"] if direction == "grad" and opts["grad_widths"] else opts["widths"]
                dims.append(Dimension(layer.name, _layer_type(layer), quantity, direction, tuple(widths),
                                      f"bits.{owner}.{quantity}.{direction}"))
    return dims


def search_params(space: Sequence[Dimension]) -> dict[str, tuple]:
    """``{Optuna parameter: choices}``, in the order of the space."""
    params: dict[str, tuple] = {}
    for dim in space:
        params.setdefault(dim.param, dim.choices)
    return params


def allocation(model, space: Sequence[Dimension], params: Mapping[str, int], search: Mapping | None = None
               ) -> dict[tuple[str, str, str], int | None]:
    """``{(layer, quantity, direction): bits or None}``: the searched values plus the pins."""
    opts = search_options(search)
    alloc = {dim.key: int(params[dim.param]) for dim in space}
    for (layer, quantity), bits in pinned_quantities(model, opts).items():
        for direction in ("data", "grad"):
            if f"{quantity}.{direction}" in opts["quantities"]:
                alloc[(layer, quantity, direction)] = bits
    return alloc


def _prune_float(point: dict) -> dict:
    out = {}
    for key, part in point.items():
        if key == "storage_config" or any(part.get(m, "none") != "none" for m in ("training", "not_training")):
            out[key] = part
    return out


def allocation_fixed_config(model, alloc: Mapping, base_fixed=None, search: Mapping | None = None) -> dict:
    """The fixed config (core format, one ``by_name`` entry per quantized layer) of an allocation.

    What is not allocated keeps its resolution in ``base_fixed`` (the ``fixed``
    group; float by default). Allocated points take ``search.data_config`` /
    ``search.gradient_config`` modes (rounding kept from the base) and the
    allocated width; ``None`` makes a point float.
    """
    opts = search_options(search)
    base = nf.FixedConfig.from_dict(base_fixed or {})
    by_name = {}
    for layer in nf.introspect.fixed_layers(model):
        resolved = base.resolve(layer.name, _layer_type(layer)).to_dict()
        for (name, quantity, direction), bits in alloc.items():
            if name != layer.name:
                continue
            key = "data_config" if direction == "data" else "gradient_config"
            part = dict(resolved[quantity][key])
            if bits is None:
                part = {k: v for k, v in part.items() if k == "rounding"}
                part.update({"training": "none"} if direction == "grad" else
                            {"training": "none", "not_training": "none"})
            else:
                part.update(opts[key])
                part = {"bit_width": int(bits), **{k: v for k, v in part.items() if k != "bit_width"}}
            resolved[quantity][key] = part
        entry = {q: _prune_float(resolved[q]) for q in _layer_quantities(layer)}
        entry = {q: v for q, v in entry.items() if v}
        if entry:
            by_name[layer.name] = entry
    return {"by_name": by_name}


# --------------------------------------------------------------------------- cost and fronts


def allocation_cost(cfg: Mapping, data, fixed: Mapping, choices=None) -> dict[str, float]:
    """Cost metrics (``cost.*``, as a train run logs them) of the model built with ``fixed``."""
    model, _ = build(dict(cfg, fixed=fixed), data, choices)
    try:
        return tracking.cost_metrics(model)
    finally:
        del model



def uniform_baseline_params(space: Sequence[Dimension], widths: Sequence[int]) -> list[dict]:
    """One parameter set per width: that width on every searched parameter (nearest choice if absent)."""
    out = []
    for width in widths:
        params = {}
        for param, choices in search_params(space).items():
            params[param] = width if width in choices else min(choices, key=lambda c: (abs(c - width), -c))
        if params not in out:
            out.append(params)
    return out
