"""Strategies: hooks that run before and after every quantizer.

A :class:`Strategy` has eight methods, each ``(tensor, point) -> tensor`` and
identity by default::

    pre_weight / post_weight                  around the weight quantizer
    pre_activation / post_activation          around the activation quantizer
    pre_weight_grad / post_weight_grad        around the weight-gradient quantizer
    pre_activation_grad / post_activation_grad   (backward pass)

``pre_*`` output feeds the quantizer, the quantizer's output feeds
``post_*``. ``point`` is a :class:`PointInfo`: the point's name, kind,
config and the scale it uses (for ``pre_*`` the last stored scale, for
``post_*`` the scale just used; ``None`` where the mode is ``none``).

Subclasses register themselves under their snake-case class name
(``NoiseStrategy`` → ``noise_strategy``) so a strategy YAML can name them::

    by_type:
      Dense:
        name: noise_strategy
        weight: {gradient_config: {post: {type: uniform_ratio, min: -0.5, max: 0.5}}}
    by_name:
      conv1: [{name: noise_strategy}, {name: my_strategy}]   # a list nests

In a list the first strategy's ``pre_*`` runs first and its ``post_*`` last.
A ``by_name`` entry replaces the ``by_type`` one.

Example:

>>> class Clip(Strategy):
...     def pre_activation(self, x, point):
...         return tf.clip_by_value(x, -1.0, 1.0)
>>> get_strategy_class("clip") is Clip
True
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from nics_fix.config import (
    ConfigError,
    DataConfig,
    GradientConfig,
    _check_keys,
    _check_mapping,
    _join,
    _to_plain,
    canonical_by_type,
    load_yaml,
    read_yaml_file,
)
from nics_fix.log import logger
from nics_fix.quant import quantization_step

HOOKS = (
    "pre_weight",
    "post_weight",
    "pre_weight_grad",
    "post_weight_grad",
    "pre_activation",
    "post_activation",
    "pre_activation_grad",
    "post_activation_grad",
)

_REGISTRY: dict[str, type] = {}
#: A strategy's former name -> (its name now, the former defaults that differ from today's).
_FORMER_NAMES: dict[str, tuple[str, dict]] = {}


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclasses.dataclass(frozen=True)
class PointInfo:
    """What a strategy hook knows about the quantization point it runs at."""

    name: str  # e.g. "dense1/kernel" or "dense1/activation"
    kind: str  # "weight" or "activation"
    config: DataConfig | GradientConfig
    scale: Any = None  # int32 scalar tensor, or None where the mode is "none"
    training: bool = True

    @property
    def bit_width(self):
        return self.config.bit_width

    @property
    def quantized(self) -> bool:
        return self.scale is not None and self.config.bit_width is not None

    @property
    def step(self):
        """The quantization step ``2**(scale - bit_width + 1)``; None if float."""
        if not self.quantized:
            return None
        return quantization_step(self.config.bit_width, self.scale)


class Strategy:
    """Base class: every hook is the identity. Override the ones you need.

    Subclasses are registered by snake-case class name; give ``name = "..."``
    in the class body to register under another name. Constructor keyword
    arguments are the YAML keys of the strategy entry (besides ``name``).
    ``former_names = {old_name: {key: default}}`` makes files that use an old
    name (with that old name's defaults) read as this strategy.
    """

    name: str = "strategy"
    former_names: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = snake_case(cls.__name__)
        _REGISTRY[cls.name] = cls
        for old, defaults in cls.__dict__.get("former_names", {}).items():
            _FORMER_NAMES[old] = (cls.name, dict(defaults))

    def __init__(self, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected arguments {', '.join(kwargs)}")
        self._config: dict = {}

    @classmethod
    def from_config(cls, config: Mapping, key_path: str = "", source: str | None = None):
        """Build from a YAML entry (without ``name``); errors become ConfigError."""
        try:
            inspect.signature(cls.__init__).bind(None, **config)
        except TypeError as err:
            raise ConfigError(f"{cls.name}: {err}", key_path, source) from None
        try:
            strategy = cls(**config)
        except ConfigError as err:
            # Hooks validate with paths relative to their entry: anchor them here.
            raise ConfigError(err.reason, _join(key_path, err.key_path) if err.key_path else key_path,
                              source) from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{cls.name}: {err}", key_path, source) from None
        strategy._config = dict(config)
        return strategy

    def get_config(self) -> dict:
        return {"name": self.name, **getattr(self, "_config", {})}

    def uses_gradients(self, kind: str) -> bool:
        """Whether this strategy overrides a gradient hook of ``kind`` (weight/activation)."""
        return any(
            getattr(type(self), f"{stage}_{kind}_grad") is not getattr(Strategy, f"{stage}_{kind}_grad")
            for stage in ("pre", "post")
        )

    def pre_weight(self, x, point: PointInfo):
        return x

    def post_weight(self, x, point: PointInfo):
        return x

    def pre_weight_grad(self, x, point: PointInfo):
        return x

    def post_weight_grad(self, x, point: PointInfo):
        return x

    def pre_activation(self, x, point: PointInfo):
        return x

    def post_activation(self, x, point: PointInfo):
        return x

    def pre_activation_grad(self, x, point: PointInfo):
        return x

    def post_activation_grad(self, x, point: PointInfo):
        return x


class StrategyChain(Strategy):
    """Several strategies nested: the first's ``pre_*`` first, its ``post_*`` last."""

    name = "strategy_chain"

    def __init__(self, strategies):
        self.strategies = list(strategies)
        self._config = {}

    def get_config(self):
        return [s.get_config() for s in self.strategies]

    def uses_gradients(self, kind):
        return any(s.uses_gradients(kind) for s in self.strategies)


def _chain_hook(hook: str):
    pre = hook.startswith("pre_")

    def method(self, x, point):
        for strategy in self.strategies if pre else reversed(self.strategies):
            x = getattr(strategy, hook)(x, point)
        return x

    method.__name__ = hook
    return method


for _hook in HOOKS:
    setattr(StrategyChain, _hook, _chain_hook(_hook))


def get_strategy_class(name: str) -> type:
    return _REGISTRY[name]


def registered_strategies() -> list[str]:
    return sorted(n for n in _REGISTRY if n != StrategyChain.name)


# ----------------------------------------------------------------------------
# NoiseStrategy
# ----------------------------------------------------------------------------

_NOISE_TYPES = ("none", "uniform", "uniform_ratio")


class NoiseStrategy(Strategy):
    """Adds uniform noise before or after quantizers, e.g. to model analog error.

    Noise specs are placed by quantity, config and stage::

        name: noise_strategy
        weight:
          data_config: {pre: {type: uniform, min: -0.01, max: 0.01}}
          gradient_config: {post: {type: uniform_ratio, min: -0.5, max: 0.5}}

    ``uniform``: U(min, max) in absolute units. ``uniform_ratio``: U(min, max)
    times the point's quantization step (no effect, with a warning, where the
    point is not quantized). ``none``: nothing. ``data_config`` noise acts in
    the forward pass, ``gradient_config`` noise on the gradient in the backward
    pass. Noise is only added in training.

    >>> s = NoiseStrategy(activation={"data_config": {"post": {"type": "uniform", "min": 0, "max": 0}}})
    >>> s.name
    'noise_strategy'
    """

    def __init__(self, weight=None, activation=None):
        self._config = {}
        self.specs: dict[str, dict] = {}
        for kind, cfg in (("weight", weight), ("activation", activation)):
            cfg = _check_mapping(cfg or {}, kind, None)
            _check_keys(cfg, ("data_config", "gradient_config"), kind, None)
            for part, stages in cfg.items():
                path = _join(kind, part)
                stages = _check_mapping(stages or {}, path, None)
                _check_keys(stages, ("pre", "post"), path, None)
                for stage, spec in stages.items():
                    suffix = "_grad" if part == "gradient_config" else ""
                    hook = f"{stage}_{kind}{suffix}"
                    self.specs[hook] = self._check_spec(spec, _join(path, stage))
        self._warned: set = set()

    @staticmethod
    def _check_spec(spec, path):
        spec = _check_mapping(spec, path, None)
        _check_keys(spec, ("type", "min", "max"), path, None)
        kind = spec.get("type", "none")
        if kind not in _NOISE_TYPES:
            raise ConfigError(f"noise type must be one of {', '.join(_NOISE_TYPES)}, got {kind!r}",
                              _join(path, "type"))
        low, high = spec.get("min", 0.0), spec.get("max", 0.0)
        for key, value in (("min", low), ("max", high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"must be a number, got {value!r}", _join(path, key))
        if low > high:
            raise ConfigError(f"min ({low}) is greater than max ({high})", path)
        return {"type": kind, "min": float(low), "max": float(high)}

    def uses_gradients(self, kind):
        return any(h.endswith(f"{kind}_grad") and s["type"] != "none" for h, s in self.specs.items())

    def _noise(self, hook, x, point: PointInfo):
        spec = self.specs.get(hook)
        if spec is None or spec["type"] == "none" or not point.training:
            return x
        noise = tf.random.uniform(tf.shape(x), spec["min"], spec["max"], dtype=x.dtype)
        if spec["type"] == "uniform_ratio":
            if not point.quantized:
                if (hook, point.name) not in self._warned:
                    self._warned.add((hook, point.name))
                    logger.warning(
                        "noise_strategy: uniform_ratio noise at %s (%s) has no effect: the point is "
                        "not quantized (mode none), so it has no step", point.name, hook)
                return x
            noise = noise * point.step
        return x + noise


def _make_noise_hook(hook):
    def method(self, x, point):
        return self._noise(hook, x, point)

    method.__name__ = hook
    return method


for _hook in HOOKS:
    setattr(NoiseStrategy, _hook, _make_noise_hook(_hook))


# ----------------------------------------------------------------------------
# Strategy config files
# ----------------------------------------------------------------------------


def _build_entry(entry, path, source) -> list[dict]:
    """Validate one by_type/by_name entry; return it as a list of plain dicts."""
    entries = entry if isinstance(entry, list) else [entry]
    if not entries:
        raise ConfigError("an empty strategy list", path, source)
    out = []
    for i, item in enumerate(entries):
        ipath = f"{path}[{i}]" if isinstance(entry, list) else path
        item = _check_mapping(item, ipath, source)
        name = item.get("name")
        if name is None:
            raise ConfigError("a strategy entry needs a 'name'", ipath, source)
        if not isinstance(name, str):
            raise ConfigError(f"strategy name must be a string, got {name!r}; registered strategies: "
                              f"{', '.join(registered_strategies())}", _join(ipath, "name"), source)
        if name in _FORMER_NAMES:
            name, defaults = _FORMER_NAMES[name]
            logger.info("%s%s: strategy %r read as %s", f"{source}: " if source else "", _join(ipath, "name"),
                        item["name"], name)
            given = {k: v for k, v in item.items() if k != "name"}
            item = {"name": name, **given, **{k: v for k, v in defaults.items() if k not in given}}
        if name not in _REGISTRY or name == StrategyChain.name:
            raise ConfigError(
                f"unknown strategy {name!r}; registered strategies: {', '.join(registered_strategies())}",
                _join(ipath, "name"), source)
        _REGISTRY[name].from_config({k: v for k, v in item.items() if k != "name"}, ipath, source)
        out.append(dict(item))
    return out


def build_strategy(entries) -> Strategy | None:
    """A list of strategy dicts (as resolved) → a Strategy, a chain, or None."""
    if not entries:
        return None
    if isinstance(entries, Mapping):
        entries = [entries]
    strategies = [
        _REGISTRY[e["name"]].from_config({k: v for k, v in e.items() if k != "name"}) for e in entries
    ]
    return strategies[0] if len(strategies) == 1 else StrategyChain(strategies)


class StrategyConfig:
    """A parsed strategy-config file: ``by_type`` and ``by_name`` rules."""

    def __init__(self, by_type=None, by_name=None, source: str | None = None):
        self.source = source
        self._by_type = {
            k: _build_entry(v, _join("by_type", k), source)
            for k, v in canonical_by_type(_check_mapping(by_type or {}, "by_type", source), source).items()
        }
        self._by_name = {
            k: _build_entry(v, _join("by_name", k), source)
            for k, v in _check_mapping(by_name or {}, "by_name", source).items()
        }

    @classmethod
    def from_dict(cls, value, source: str | None = None) -> "StrategyConfig":
        if isinstance(value, StrategyConfig):
            return value
        value = _to_plain(value if value is not None else {})
        value = _check_mapping(value, "", source, "a mapping with by_type/by_name")
        _check_keys(value, ("by_type", "by_name"), "", source)
        return cls(value.get("by_type"), value.get("by_name"), source)

    @property
    def by_name_keys(self) -> list[str]:
        return list(self._by_name)

    def matches(self, layer_name: str) -> bool:
        return layer_name in self._by_name

    def resolve(self, layer_name: str, layer_type: str) -> list[dict] | None:
        """The strategy entries of a layer (by_name wins over by_type), or None."""
        if layer_name in self._by_name:
            return [dict(e) for e in self._by_name[layer_name]]
        if layer_type in self._by_type:
            return [dict(e) for e in self._by_type[layer_type]]
        return None

    def to_dict(self) -> dict:
        out = {}
        if self._by_type:
            out["by_type"] = {k: list(v) for k, v in self._by_type.items()}
        if self._by_name:
            out["by_name"] = {k: list(v) for k, v in self._by_name.items()}
        return out


def parse_strategy_cfg_from_str(text: str, source: str | None = None) -> StrategyConfig:
    return StrategyConfig.from_dict(load_yaml(text, source), source)


def parse_strategy_cfg_from_file(path) -> StrategyConfig:
    return StrategyConfig.from_dict(read_yaml_file(path), str(path))


def as_strategy_config(value) -> StrategyConfig | None:
    if value is None or isinstance(value, StrategyConfig):
        return value
    if isinstance(value, Mapping):
        return StrategyConfig.from_dict(value)
    if isinstance(value, str):
        if "\n" not in value and value.endswith((".yaml", ".yml")):
            return parse_strategy_cfg_from_file(value)
        return parse_strategy_cfg_from_str(value)
    if hasattr(value, "__fspath__"):
        return parse_strategy_cfg_from_file(value)
    raise ConfigError(f"cannot use {type(value).__name__} as a strategy config")
