"""Scopes: where layers find their fixed configs and their default arguments.

>>> import nics_fix as nf
>>> cfg = {"by_name": {"dense1": {"weight": {"data_config": {"bit_width": 8, "training": "auto",
...                                                        "not_training": "fixed"}}}}}
>>> with nf.fixed_scope("net", cfg) as scope:
...     layer = nf.Dense(4, name="dense1")
>>> layer.fixed_config.weight.data.bit_width
8
>>> with nf.kwargs_scope(**{"Dense.use_bias": False}):
...     nf.Dense(3).use_bias
False
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Mapping

from nics_fix.config import FLOAT, ConfigError, FixedConfig, LayerFixedConfig, as_fixed_config
from nics_fix.layer_types import lookup_layer_type
from nics_fix.log import logger
from nics_fix.strategy import StrategyConfig, _build_entry, as_strategy_config

_state = threading.local()


def _stack(name: str) -> list:
    if not hasattr(_state, name):
        setattr(_state, name, [])
    return getattr(_state, name)


class FixedScope:
    """The active fixed and strategy configs, and what layers took from them.

    Returned by :func:`fixed_scope`. After the ``with`` block,
    :meth:`unmatched_names` lists ``by_name`` entries that matched no layer
    (they are also reported with a warning on exit).
    """

    def __init__(self, name: str, fixed_cfgs=None, strategy_cfgs=None):
        self.name = name
        self.fixed_config: FixedConfig = as_fixed_config(fixed_cfgs)
        self.strategy_config: StrategyConfig | None = as_strategy_config(strategy_cfgs)
        self.layer_configs: dict[str, LayerFixedConfig] = {}
        self.layer_strategies: dict[str, list | None] = {}
        self.layers: list = []

    def resolve(self, layer) -> tuple[LayerFixedConfig, list | None]:
        config, strategy = self.resolve_name(layer.name, type(layer).__name__)
        self.layers.append(layer)
        return config, strategy

    def resolve_name(self, name: str, layer_type: str) -> tuple[LayerFixedConfig, list | None]:
        """Resolve and record the configs of a layer that does not exist yet (a sublayer built later)."""
        config = self.fixed_config.resolve(name, layer_type)
        strategy = self.strategy_config.resolve(name, layer_type) if self.strategy_config else None
        self.layer_configs[name] = config
        self.layer_strategies[name] = strategy
        return config, strategy

    def unmatched_names(self) -> list[str]:
        """``by_name`` keys (fixed and strategy configs) that matched no layer."""
        keys = list(self.fixed_config.by_name_keys)
        if self.strategy_config is not None:
            keys += [k for k in self.strategy_config.by_name_keys if k not in keys]
        return [k for k in keys if k not in self.layer_configs]

    def fixed_config_dict(self) -> dict:
        """The resolved per-layer configs in the core YAML format (``by_name``)."""
        return {"by_name": {n: c.to_dict() for n, c in self.layer_configs.items() if not c.is_float}}


def current_scope() -> FixedScope | None:
    stack = _stack("fixed")
    return stack[-1] if stack else None


@contextlib.contextmanager
def fixed_scope(name: str, fixed_cfgs=None, strategy_cfgs=None):
    """Layers from ``nics_fix`` created inside take their configs from here.

    ``fixed_cfgs`` / ``strategy_cfgs``: a parsed config, a dict, YAML text or
    a path to a YAML file. A layer looks its config up by name, then by type;
    anything unspecified is float.
    """
    scope = FixedScope(name, fixed_cfgs, strategy_cfgs)
    stack = _stack("fixed")
    stack.append(scope)
    try:
        yield scope
    finally:
        stack.pop()
    unmatched = scope.unmatched_names()
    if unmatched:
        message = (f"fixed_scope {name!r}: by_name entries matched no layer: {', '.join(unmatched)}; "
                   f"layers built: {', '.join(scope.layer_configs) or '(none)'}")
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def resolve_for_layer(layer, fixed_config=None, strategy_config=None):
    """Config for a new layer: explicit arguments, else the active scope, else float."""
    scope = current_scope()
    scoped_config, scoped_strategy = scope.resolve(layer) if scope is not None else (FLOAT, None)
    config = scoped_config if fixed_config is None else LayerFixedConfig.from_dict(
        fixed_config, f"{layer.name}.fixed_config")
    if strategy_config is None:
        strategy = scoped_strategy
    else:  # validated like a strategy file, so a typo is a ConfigError, not a KeyError at build
        entries = list(strategy_config) if isinstance(strategy_config, tuple) else strategy_config
        strategy = _build_entry(entries, f"{layer.name}.strategy_config", None)
    return config, strategy


# ----------------------------------------------------------------------------
# kwargs scopes
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def kwargs_scope(**defaults):
    """Default keyword arguments for ``nics_fix`` layers created inside.

    A plain key (``kernel_regularizer=...``) applies to every layer whose
    constructor takes that argument; ``"Conv2D.kernel_size"`` applies to
    ``Conv2D`` only. Explicit arguments always win; inner scopes win over outer
    ones; everything is restored on exit.
    """
    general = {k: v for k, v in defaults.items() if "." not in k}
    by_type: dict[str, dict] = {}
    for key, value in defaults.items():
        if "." in key:
            type_name, arg = key.split(".", 1)
            by_type.setdefault(_layer_class_name(type_name, key), {})[arg] = value
    stack = _stack("kwargs")
    stack.append((general, by_type))
    try:
        yield
    finally:
        stack.pop()


def _layer_class_name(type_name: str, key: str) -> str:
    """The class a kwargs-scope key names (the original's ``MaxPool`` too); a typo is a ConfigError."""
    try:
        name, renamed = lookup_layer_type(type_name)
    except LookupError as err:
        raise ConfigError(str(err), f"kwargs_scope.{key}") from None
    if renamed:
        logger.info("kwargs_scope.%s: read as %s (%s)", key, name, renamed)
    return name


def kwargs_scope_by_type(**by_type):
    """``kwargs_scope_by_type(Conv2D={...}, Dense={...})``: per-type defaults."""
    flat = {}
    for type_name, kwargs in by_type.items():
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs_scope_by_type({type_name}=...) needs a dict, got {kwargs!r}")
        flat.update({f"{type_name}.{k}": v for k, v in kwargs.items()})
    return kwargs_scope(**flat)


def apply_default_kwargs(cls, init, args: tuple, kwargs: dict) -> dict:
    """Merge the active kwargs scopes into ``kwargs`` for ``cls.__init__`` = ``init``."""
    stack = _stack("kwargs")
    if not stack:
        return kwargs
    signature = inspect.signature(init)
    accepted = {n for n, p in signature.parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    explicit = set(signature.bind_partial(None, *args, **kwargs).arguments) | set(kwargs)
    names = [c.__name__ for c in cls.__mro__]
    merged: dict = {}
    for general, by_type in stack:  # outer first, inner overrides
        merged.update({k: v for k, v in general.items() if k in accepted})
        for type_name in reversed(names):  # the most specific class wins
            merged.update(by_type.get(type_name, {}))
    out = dict(kwargs)
    for key, value in merged.items():
        if key not in explicit:
            out[key] = value
    return out
