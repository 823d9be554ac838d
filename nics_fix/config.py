"""Fixed-point configs: the YAML format, its validation and per-layer resolution.

The format is the original TF1 framework's, so old configs keep working::

    configs:                 # named, reusable blocks
      fix8:
        weight:
          data_config: {bit_width: 8, training: auto, not_training: fixed}
          gradient_config: {bit_width: 8, training: auto}
        activation:
          data_config: {bit_width: 8, training: auto, not_training: fixed}
          gradient_config: {bit_width: 16, training: auto}
    by_type:                 # per layer type (Dense, Conv2D, ReLU, ...)
      Conv2D: {config_name: fix8}
    by_name:                 # per layer name; wins over by_type
      dense1:
        config_name: fix8
        weight: {data_config: {bit_width: 4}}

A layer's config is resolved in layers: float (everything ``none``), then its
``by_type`` entry, then its ``by_name`` entry. An entry with ``config_name``
starts from that named block (replacing what came before); its own
``weight``/``activation`` fields are then merged over it field by field.

Fields of ``data_config``: ``bit_width`` (1..32), ``training`` and
``not_training`` (``auto`` | ``fixed`` | ``none`` | an integer scale),
``rounding`` (``nearest`` | ``floor`` | ``stochastic``, default ``nearest``;
evaluation rounds ``stochastic`` data to nearest, so predictions are deterministic).
``gradient_config`` has ``bit_width``, ``training`` and ``rounding``
(``not_training`` is accepted and ignored: no gradient flows in evaluation).
Both also take the scale fields: ``granularity`` (``tensor`` | ``channel`` |
``block``, default ``tensor``), ``block_size`` (for ``block``) and ``axis``
(default: a kernel's output-channel axis, the last axis of anything else),
and, for the ``dynamic`` mode, ``overflow_rate`` (default 1e-4) and
``window`` (default 1): see :mod:`nics_fix.dynamic`.
``weight`` may also hold ``storage_config`` (``bit_width``, ``scale``,
``rounding``) for THDH simulation: see :mod:`nics_fix.optimizers`.

Every mistake raises :class:`ConfigError` naming the file and the key path.

Example:

>>> cfg = parse_cfg_from_str('''
... by_type:
...   Dense:
...     weight: {data_config: {bit_width: 8, training: auto, not_training: fixed}}
... ''')
>>> cfg.resolve("dense", "Dense").weight.data.bit_width
8
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any, Union

import yaml

from nics_fix.layer_types import layer_types, lookup_layer_type
from nics_fix.log import logger
from nics_fix.quant import (
    MAX_BIT_WIDTH,
    MAX_SCALE,
    MIN_BIT_WIDTH,
    MIN_SCALE,
    ROUNDING_MODES,
)

#: A scale mode: "auto", "fixed", "dynamic", "none" or an integer scale.
Mode = Union[str, int]
MODES = ("auto", "fixed", "none", "dynamic")
#: Which elements share one scale: all, those of one channel, those of one block.
GRANULARITIES = ("tensor", "channel", "block")
#: Defaults of the scale fields; ``to_dict`` writes a field only when it differs.
SCALE_DEFAULTS = {"granularity": "tensor", "block_size": None, "axis": None,
                  "overflow_rate": 1e-4, "window": 1}
QUANTITIES = ("weight", "activation")
#: Keys of a layer entry: its two quantities and the optional accumulator of its sums.
LAYER_KEYS = QUANTITIES + ("accumulator",)
OVERFLOW_MODES = ("saturate", "wrap")


class ConfigError(ValueError):
    """A fixed or strategy config is malformed.

    ``str(err)`` reads ``<file>: <key.path>: <what is wrong>``; the parts are
    also available as ``err.source``, ``err.key_path`` and ``err.reason``.
    """

    def __init__(self, reason: str, key_path: str = "", source: str | None = None):
        self.reason = reason
        self.key_path = key_path
        self.source = source
        parts = [p for p in (source, key_path) if p]
        super().__init__(": ".join(parts + [reason]))


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_mode(value, path: str, source) -> Mode:
    if value is None:  # YAML `null` / `~`: same as "none"
        return "none"
    if _is_int(value):
        if not MIN_SCALE <= int(value) <= MAX_SCALE:
            raise ConfigError(
                f"integer scale must be from {MIN_SCALE} to {MAX_SCALE}, got {value}", path, source
            )
        return int(value)
    if isinstance(value, str) and value.strip().lower() in MODES:
        return value.strip().lower()
    raise ConfigError(
        f"mode must be one of auto, fixed, dynamic, none or an integer scale, got {value!r}", path, source
    )


def _check_bit_width(value, path: str, source) -> int:
    if not _is_int(value):
        raise ConfigError(f"bit_width must be an integer, got {value!r}", path, source)
    if not MIN_BIT_WIDTH <= int(value) <= MAX_BIT_WIDTH:
        raise ConfigError(
            f"bit_width must be from {MIN_BIT_WIDTH} to {MAX_BIT_WIDTH}, got {value}", path, source
        )
    return int(value)


def _check_rounding(value, path: str, source) -> str:
    if value not in ROUNDING_MODES:
        raise ConfigError(
            f"rounding must be one of {', '.join(ROUNDING_MODES)}, got {value!r}", path, source
        )
    return value


def _check_mapping(value, path: str, source, what: str = "a mapping") -> Mapping:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected {what}, got {type(value).__name__} {value!r}", path, source)
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {key!r}", path, source)
    return value


def _check_keys(value: Mapping, allowed, path: str, source) -> None:
    for key in value:
        if key not in allowed:
            raise ConfigError(
                f"unknown key {key!r} (allowed: {', '.join(allowed)})", _join(path, key), source
            )


# ----------------------------------------------------------------------------
# Resolved, immutable configs
# ----------------------------------------------------------------------------


def _fields_dict(bit_width, modes: dict, rounding: str, config=None) -> dict:
    """The YAML form of a config: bit_width first, rounding and scale fields only when not the default."""
    out = {"bit_width": bit_width} if bit_width is not None else {}
    out.update(modes)
    if rounding != "nearest":
        out["rounding"] = rounding
    for key, default in SCALE_DEFAULTS.items():
        value = getattr(config, key, default)
        if value != default:
            out[key] = value
    return out


class _ScaleFields:
    """The scale fields shared by data and gradient configs."""

    @property
    def is_dynamic(self) -> bool:
        return "dynamic" in (self.training, getattr(self, "not_training", None))


@dataclasses.dataclass(frozen=True)
class DataConfig(_ScaleFields):
    """How a forward value (weight or activation) is quantized."""

    bit_width: int | None = None
    training: Mode = "none"
    not_training: Mode = "none"
    rounding: str = "nearest"
    granularity: str = "tensor"
    block_size: int | None = None
    axis: int | None = None
    overflow_rate: float = 1e-4
    window: int = 1

    def mode(self, training: bool) -> Mode:
        return self.training if training else self.not_training

    @property
    def is_float(self) -> bool:
        return self.training == "none" and self.not_training == "none"

    def to_dict(self) -> dict:
        return _fields_dict(self.bit_width, {"training": self.training, "not_training": self.not_training},
                            self.rounding, self)


@dataclasses.dataclass(frozen=True)
class GradientConfig(_ScaleFields):
    """How the gradient arriving at a point is quantized in the backward pass."""

    bit_width: int | None = None
    training: Mode = "none"
    rounding: str = "nearest"
    granularity: str = "tensor"
    block_size: int | None = None
    axis: int | None = None
    overflow_rate: float = 1e-4
    window: int = 1

    def mode(self, training: bool = True) -> Mode:
        return self.training

    @property
    def is_float(self) -> bool:
        return self.training == "none"

    def to_dict(self) -> dict:
        return _fields_dict(self.bit_width, {"training": self.training}, self.rounding, self)


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """THDH: the format weights are *stored* in after every optimizer update.

    ``scale`` is ``auto`` (from the variable after each update) or an integer;
    ``None`` (the default, no ``storage_config``) keeps float master weights.
    """

    bit_width: int | None = None
    scale: Mode = "none"
    rounding: str = "nearest"

    @property
    def is_float(self) -> bool:
        return self.scale == "none"

    def to_dict(self) -> dict:
        out = {"scale": self.scale, "rounding": self.rounding}
        if self.bit_width is not None:
            out = {"bit_width": self.bit_width, **out}
        return out


@dataclasses.dataclass(frozen=True)
class PointConfig:
    """Data and gradient configs of one quantity (weight or activation)."""

    data: DataConfig = DataConfig()
    gradient: GradientConfig = GradientConfig()
    storage: StorageConfig = StorageConfig()

    @property
    def is_float(self) -> bool:
        return self.data.is_float and self.gradient.is_float and self.storage.is_float

    def to_dict(self) -> dict:
        out = {"data_config": self.data.to_dict(), "gradient_config": self.gradient.to_dict()}
        if self.storage != StorageConfig():  # not `is_float`: keep a bit width given with scale none
            out["storage_config"] = self.storage.to_dict()
        return out


@dataclasses.dataclass(frozen=True)
class AccumulatorConfig:
    """The accumulator of a layer's sums (Dense, Conv2D, DepthwiseConv2D):
    ``bit_width`` bits (sign included) whose least significant bit is the
    finest step among ``input step * kernel step`` and the bias step;
    ``overflow`` is ``saturate`` (clip) or ``wrap`` (two's complement).
    With one, the layer's sums are computed exactly (see :mod:`nics_fix.accumulator`)."""

    bit_width: int = 32
    overflow: str = "saturate"

    def to_dict(self) -> dict:
        return {"bit_width": self.bit_width, "overflow": self.overflow}


@dataclasses.dataclass(frozen=True)
class LayerFixedConfig:
    """The resolved config of one layer: its weight and activation points."""

    weight: PointConfig = PointConfig()
    activation: PointConfig = PointConfig()
    accumulator: Union[AccumulatorConfig, None] = None

    @property
    def is_float(self) -> bool:
        return self.weight.is_float and self.activation.is_float

    def to_dict(self) -> dict:
        out = {"weight": self.weight.to_dict(), "activation": self.activation.to_dict()}
        if self.accumulator is not None:
            out["accumulator"] = self.accumulator.to_dict()
        return out

    @classmethod
    def from_dict(cls, value, key_path: str = "", source: str | None = None) -> "LayerFixedConfig":
        """Build from a ``{weight: ..., activation: ..., accumulator: ...}`` mapping (no config_name)."""
        if isinstance(value, LayerFixedConfig):
            return value
        value = _check_mapping(value if value is not None else {}, key_path, source)
        _check_keys(value, LAYER_KEYS, key_path, source)
        return _complete(_parse_layer_fields(value, key_path, source), key_path, source)


FLOAT = LayerFixedConfig()

# ----------------------------------------------------------------------------
# Parsing: raw mappings are validated into nested dicts of checked fields, then
# merged and completed into the frozen dataclasses above.
# ----------------------------------------------------------------------------

_DATA_KEYS = ("bit_width", "training", "not_training", "rounding") + tuple(SCALE_DEFAULTS)
_GRAD_KEYS = ("bit_width", "training", "not_training", "rounding") + tuple(SCALE_DEFAULTS)
_STORAGE_KEYS = ("bit_width", "scale", "rounding")
_POINT_KEYS = ("data_config", "gradient_config", "storage_config")


def _parse_fields(value, keys, path, source) -> dict:
    value = _check_mapping(value, path, source)
    _check_keys(value, keys, path, source)
    out = {}
    for key, item in value.items():
        sub = _join(path, key)
        if key == "bit_width":
            out[key] = _check_bit_width(item, sub, source)
        elif key in ("training", "not_training", "scale"):
            out[key] = _check_mode(item, sub, source)
        elif key == "rounding":
            out[key] = _check_rounding(item, sub, source)
        elif key in SCALE_DEFAULTS:
            out[key] = _check_scale_field(key, item, sub, source)
    return out


def _check_scale_field(key, value, path, source):
    if key == "granularity":
        if value not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {value!r}",
                              path, source)
        return value
    if value is None and key in ("block_size", "axis"):
        return None
    if key == "overflow_rate":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
            raise ConfigError(f"overflow_rate must be a number in [0, 1), got {value!r}", path, source)
        return float(value)
    if not _is_int(value) or (key != "axis" and value < 1):
        what = "an integer" if key == "axis" else "a positive integer"
        raise ConfigError(f"{key} must be {what}, got {value!r}", path, source)
    return int(value)


def _parse_point(value, path, source, quantity) -> dict:
    value = _check_mapping(value, path, source)
    allowed = _POINT_KEYS if quantity == "weight" else _POINT_KEYS[:2]
    _check_keys(value, allowed, path, source)
    out = {}
    for key, item in value.items():
        fields = {"data_config": _DATA_KEYS, "gradient_config": _GRAD_KEYS}.get(key, _STORAGE_KEYS)
        out[key] = _parse_fields(item, fields, _join(path, key), source)
    return out


def _parse_accumulator(value, path, source) -> dict:
    value = _check_mapping(value, path, source)
    _check_keys(value, ("bit_width", "overflow"), path, source)
    out = {}
    if "bit_width" in value:
        bits = value["bit_width"]
        if not _is_int(bits) or not 2 <= int(bits) <= 62:
            raise ConfigError(f"accumulator bit_width must be an integer from 2 to 62, got {bits!r}",
                              _join(path, "bit_width"), source)
        out["bit_width"] = int(bits)
    if "overflow" in value:
        if value["overflow"] not in OVERFLOW_MODES:
            raise ConfigError(f"overflow must be one of {', '.join(OVERFLOW_MODES)}, got {value['overflow']!r}",
                              _join(path, "overflow"), source)
        out["overflow"] = value["overflow"]
    return out


def _parse_layer_fields(value: Mapping, path, source) -> dict:
    out = {q: _parse_point(value[q], _join(path, q), source, q) for q in QUANTITIES if q in value}
    if value.get("accumulator") is not None:
        out["accumulator"] = _parse_accumulator(value["accumulator"], _join(path, "accumulator"), source)
    return out


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, item in override.items():
        if isinstance(item, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], item)
        else:
            out[key] = copy.deepcopy(item)
    return out


def _complete(fields: dict, path: str, source) -> LayerFixedConfig:
    """Turn merged field dicts into a LayerFixedConfig, checking completeness."""
    points = {}
    for quantity in QUANTITIES:
        point = fields.get(quantity, {})
        qpath = _join(path, quantity)
        data = dict(point.get("data_config", {}))
        grad = dict(point.get("gradient_config", {}))
        grad.pop("not_training", None)  # accepted for old configs; meaningless for gradients
        storage = dict(point.get("storage_config", {}))
        if "bit_width" in storage:
            storage.setdefault("scale", "auto")  # a storage format given without scale: auto
        for name, part, modes in (
            ("data_config", data, ("training", "not_training")),
            ("gradient_config", grad, ("training",)),
            ("storage_config", storage, ("scale",)),
        ):
            needs_bits = any(part.get(m, "none") != "none" for m in modes)
            if needs_bits and "bit_width" not in part:
                raise ConfigError(
                    "bit_width is required when a mode is not 'none'",
                    _join(_join(qpath, name), "bit_width"),
                    source,
                )
        for name, part in (("data_config", data), ("gradient_config", grad)):
            if part.get("granularity") == "block" and part.get("block_size") is None:
                raise ConfigError("granularity block needs a block_size",
                                  _join(_join(qpath, name), "block_size"), source)
        if storage.get("scale") in ("fixed", "dynamic"):
            raise ConfigError(
                "storage scale must be 'auto', 'none' or an integer",
                _join(_join(qpath, "storage_config"), "scale"),
                source,
            )
        points[quantity] = PointConfig(
            data=DataConfig(**data), gradient=GradientConfig(**grad), storage=StorageConfig(**storage)
        )
    if "accumulator" in fields:
        points["accumulator"] = AccumulatorConfig(**fields["accumulator"])
    return LayerFixedConfig(**points)


def _layer_config_to_fields(cfg: LayerFixedConfig) -> dict:
    out = {q: getattr(cfg, q).to_dict() for q in QUANTITIES}
    if cfg.accumulator is not None:
        out["accumulator"] = cfg.accumulator.to_dict()
    return out


class FixedConfig:
    """A parsed fixed-config file: named blocks plus ``by_type`` and ``by_name`` rules.

    Use :meth:`resolve` to get one layer's :class:`LayerFixedConfig`. Parse with
    :func:`parse_cfg_from_str`, :func:`parse_cfg_from_file` or
    :meth:`from_dict`.
    """

    def __init__(self, configs=None, by_type=None, by_name=None, source: str | None = None):
        self.source = source
        self._configs: dict[str, dict] = {}
        self._by_type: dict[str, tuple[str | None, dict]] = {}
        self._by_name: dict[str, tuple[str | None, dict]] = {}
        for name, block in _check_mapping(configs or {}, "configs", source).items():
            path = _join("configs", name)
            block = _check_mapping(block if block is not None else {}, path, source)
            _check_keys(block, LAYER_KEYS, path, source)
            self._configs[name] = _parse_layer_fields(block, path, source)
        by_type = canonical_by_type(_check_mapping(by_type or {}, "by_type", source), source)
        for attr, section in (("_by_type", by_type), ("_by_name", by_name)):
            label = attr[1:]
            for key, entry in _check_mapping(section or {}, label, source).items():
                getattr(self, attr)[key] = self._parse_entry(entry, _join(label, key))
        # Completeness of everything that has no further base is checked now,
        # so a broken file fails at parse time, not at the 40th layer.
        for name, fields in self._configs.items():
            _complete(fields, _join("configs", name), source)
        for key, (base, fields) in self._by_type.items():
            self._entry_fields(base, fields, {}, _join("by_type", key))
        for key, (base, fields) in self._by_name.items():
            if base is not None:
                self._entry_fields(base, fields, {}, _join("by_name", key))

    def _parse_entry(self, entry, path) -> tuple[str | None, dict]:
        if isinstance(entry, str):  # shorthand: `Conv2D: fix8`
            entry = {"config_name": entry}
        entry = _check_mapping(entry if entry is not None else {}, path, self.source)
        _check_keys(entry, ("config_name",) + LAYER_KEYS, path, self.source)
        base = entry.get("config_name")
        if base is not None:
            if not isinstance(base, str):
                raise ConfigError(
                    f"config_name must be a string, got {base!r}", _join(path, "config_name"), self.source
                )
            if base not in self._configs:
                known = ", ".join(sorted(self._configs)) or "(none defined)"
                raise ConfigError(
                    f"unknown config_name {base!r}; defined configs: {known}",
                    _join(path, "config_name"),
                    self.source,
                )
        return base, _parse_layer_fields(entry, path, self.source)

    def _entry_fields(self, base, fields, start: dict, path) -> dict:
        merged = _merge(self._configs[base] if base is not None else start, fields)
        _complete(merged, path, self.source)
        return merged

    # -- public ---------------------------------------------------------------

    @classmethod
    def from_dict(cls, value, source: str | None = None) -> "FixedConfig":
        """Build from a mapping (e.g. what Hydra/OmegaConf hands over)."""
        if isinstance(value, FixedConfig):
            return value
        if value is None:
            value = {}
        value = _to_plain(value)
        value = _check_mapping(value, "", source, "a mapping with configs/by_type/by_name")
        _check_keys(value, ("configs", "by_type", "by_name"), "", source)
        return cls(value.get("configs"), value.get("by_type"), value.get("by_name"), source)

    @property
    def config_names(self) -> list[str]:
        return list(self._configs)

    @property
    def by_name_keys(self) -> list[str]:
        return list(self._by_name)

    def named(self, config_name: str) -> LayerFixedConfig:
        """The named block ``configs.<config_name>`` as a resolved config."""
        if config_name not in self._configs:
            known = ", ".join(sorted(self._configs)) or "(none defined)"
            raise ConfigError(f"unknown config_name {config_name!r}; defined configs: {known}",
                              "config_name", self.source)
        return _complete(self._configs[config_name], _join("configs", config_name), self.source)

    def resolve(self, layer_name: str, layer_type: str) -> LayerFixedConfig:
        """The config of layer ``layer_name`` of class ``layer_type``."""
        fields: dict = {}
        path = ""
        if layer_type in self._by_type:
            base, own = self._by_type[layer_type]
            path = _join("by_type", layer_type)
            fields = self._entry_fields(base, own, fields, path)
        if layer_name in self._by_name:
            base, own = self._by_name[layer_name]
            path = _join("by_name", layer_name)
            fields = self._entry_fields(base, own, fields, path)
        return _complete(fields, path, self.source)

    def matches(self, layer_name: str) -> bool:
        return layer_name in self._by_name

    def to_dict(self) -> dict:
        """The config in the YAML format (round-trips through :meth:`from_dict`)."""
        out: dict[str, Any] = {}
        if self._configs:
            out["configs"] = copy.deepcopy(self._configs)
        for label, section in (("by_type", self._by_type), ("by_name", self._by_name)):
            if section:
                out[label] = {
                    key: ({"config_name": base} if base else {}) | copy.deepcopy(fields)
                    for key, (base, fields) in section.items()
                }
        return out

    def __repr__(self) -> str:
        src = f" from {self.source}" if self.source else ""
        return (f"FixedConfig({len(self._configs)} configs, {len(self._by_type)} by_type, "
                f"{len(self._by_name)} by_name{src})")


def _to_plain(value):
    """Mappings/sequences (OmegaConf containers included) to plain dicts/lists."""
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_to_plain(v) for v in value]
    return value


def canonical_by_type(section: Mapping, source: str | None = None, label: str = "by_type") -> dict:
    """A ``by_type`` section (at key path ``label``) with every key as the layer class it names.

    A key spelled as the original framework did (``Conv2d``, ``BN``) is renamed,
    with one info line; a key that names no layer class, or two keys that name
    one class, is a ConfigError; a class without quantization points gets a
    warning (its entry cannot act on anything).
    """
    out: dict = {}
    given: dict[str, str] = {}
    for key, entry in section.items():
        path = _join(label, key)
        try:
            name, renamed = lookup_layer_type(key)
        except LookupError as err:
            raise ConfigError(str(err), path, source) from None
        if renamed:
            logger.info("%s%s: read as %s (%s)", f"{source}: " if source else "", path, name, renamed)
        if name in out:
            raise ConfigError(f"{_join(label, given[name])} and {path} both name the layer class {name}",
                              path, source)
        if layer_types().get(name) is False:
            logger.warning("%s%s: %s layers have no quantization points; this entry changes nothing",
                           f"{source}: " if source else "", path, name)
        out[name], given[name] = entry, key
    return out


class _ConfigLoader(yaml.SafeLoader):
    """The safe loader, reading Python 2 PyYAML's string tags as the plain strings they are.

    The original framework's generated files carry ``!!python/unicode 'conv1'``
    keys. Only ``python/unicode`` and ``python/str`` are added, and they can only
    yield a ``str``; every other Python tag is still refused, never executed.
    """


def _plain_string(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    return loader.construct_scalar(node)  # a non-scalar under the tag: ConstructorError


for _tag in ("python/unicode", "python/str"):
    _ConfigLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _plain_string)


def load_yaml(text: str, source: str | None = None):
    """Safe-load YAML; a syntax error or a Python tag becomes a ConfigError.

    ``!!python/unicode`` and ``!!python/str`` (Python 2's PyYAML) read as strings.
    """
    try:
        loader = _ConfigLoader(text)  # SafeLoader plus the two string tags: no Python object is built
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if "tag:yaml.org,2002:python/" in problem:
            problem += " (Python tags are refused; only !!python/unicode and !!python/str are read, as strings)"
        raise ConfigError(f"invalid YAML: {where}{problem}", "", source) from None


def read_yaml_file(path) -> Any:
    path = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise ConfigError(f"cannot read file: {err.strerror or err}", "", path) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text (byte {err.start})", "", path) from None
    return load_yaml(text, path)


def parse_cfg_from_str(text: str, source: str | None = None) -> FixedConfig:
    """Parse a fixed config from YAML text."""
    return FixedConfig.from_dict(load_yaml(text, source), source)


def parse_cfg_from_file(path) -> FixedConfig:
    """Parse a fixed config from a YAML file; errors name the file."""
    return FixedConfig.from_dict(read_yaml_file(path), str(path))


def as_fixed_config(value) -> FixedConfig:
    """Accept a FixedConfig, a mapping, YAML text or a path to a YAML file."""
    if isinstance(value, FixedConfig):
        return value
    if value is None or isinstance(value, Mapping):
        return FixedConfig.from_dict(value)
    if isinstance(value, str):
        if "\n" not in value and value.endswith((".yaml", ".yml")):
            return parse_cfg_from_file(value)
        return parse_cfg_from_str(value)
    if hasattr(value, "__fspath__"):
        return parse_cfg_from_file(value)
    raise ConfigError(f"cannot use {type(value).__name__} as a fixed config")


def layer_configs_to_fixed_config(layer_configs: Mapping[str, LayerFixedConfig]) -> dict:
    """``{layer name: LayerFixedConfig}`` → a core-format dict using ``by_name``.

    This is how resolved per-layer configs are exported: the result is a valid
    fixed config (e.g. a Hydra ``fixed/`` node) that reproduces those layers.
    """
    return {"by_name": {name: cfg.to_dict() for name, cfg in layer_configs.items() if not cfg.is_float}}
