"""THDH: weights *stored* in fixed point, the update path and the optimizer state.

Quantizing a weight on its way into a layer (TSDH, the ``data_config`` of the
weight point) keeps a float master copy that silently accumulates updates too
small for the hardware. :class:`FixedStorageOptimizer` wraps any Keras
optimizer and simulates a chip that keeps its weights in fixed point. On every
``apply``/``apply_gradients``, for each variable it manages::

    old        = the stored value before the step
    new        = what the inner optimizer computed (SGD, momentum, Adam, ...)
    delta      = new - old                                   (the update, lr*g for SGD)
    delta_q    = quantize(delta, update format)              if an update format is set
    stored     = quantize(old + delta_q, storage format)     if a storage format is set

Both formats are ``{bit_width, scale: auto | <int>, rounding: nearest |
stochastic | floor}`` and are applied with :func:`nics_fix.fixed_point_quantize`
(the one quantizer). ``scale: auto`` takes ``auto_scale`` of the tensor being
quantized (``delta`` or ``old + delta_q``) at every step; the scale used is kept
in the optimizer's state (:meth:`FixedStorageOptimizer.storage_scales`).

* The **storage format** of a layer's weights is its resolved
  ``weight.storage_config`` (see :mod:`nics_fix.config`)::

      by_type:
        Dense:
          weight:
            data_config: {bit_width: 16, training: auto, not_training: fixed}
            storage_config: {bit_width: 16, scale: 1, rounding: stochastic}

  Variables without a storage config stay float master weights.
* The **update (buffer) format** is the ``update_config`` argument of
  :func:`fixed_storage_optimizer`: one format for every variable, or
  ``{default: fmt, by_type: {Dense: fmt}, by_name: {dense1: fmt, "dense1/bias": fmt}}``
  (``"<layer>/<var>"`` wins over ``<layer>``, which wins over the type, which wins
  over ``default``; a format with ``scale: none`` switches it off).
* The **optimizer state** (momentum, Adam moments: every float slot of the inner
  optimizer besides its iteration counter and learning rate) is rounded to
  ``state_config`` after each step when one is given.
* ``power_of_two_lr=True`` rounds the learning rate *down* to ``2**k`` (hardware
  shifts rather than multiplies) and logs a warning naming both values. It also
  applies to a learning-rate schedule (rounded at every step) and to later
  assignments (``optimizer.learning_rate = ...``, e.g. by a Keras LR callback).

Counters of what is lost, per managed variable, accumulated until
:meth:`~FixedStorageOptimizer.reset_counters` (the
:class:`~nics_fix.thdh.UpdateCountersCallback` logs and resets them every
epoch); denominators are all update elements (variable size x steps):

* ``zero_frac``: the update was nonzero before quantization but the stored
  value did not change (it rounded to zero: in the update format, in the
  storage format, or by float absorption), not counting saturated elements;
* ``saturate_frac``: the value was clipped at the range ends of the storage
  format (or the update was clipped at the ends of the update format);
* ``nonzero_frac``: the update was nonzero before quantization (so
  ``zero_frac / nonzero_frac`` is the fraction of attempted updates lost).

Build it with :func:`fixed_storage_optimizer` from a *built* model: it maps the
model's variables (by identity, with their paths as a fall-back for
deserialization), builds itself at once and puts the initial weights on their
storage grid, so stored weights are on the grid from step 0::

    opt = nf.fixed_storage_optimizer(keras.optimizers.SGD(0.1), model,
                                     update_config={"bit_width": 16, "scale": -4},
                                     power_of_two_lr=True)
    model.compile(optimizer=opt, loss=...)
    model.fit(x, y, callbacks=[nf.UpdateCountersCallback()])

Works with ``model.fit`` (graph mode) and ``jit_compile=True`` on the TensorFlow
backend. Not supported: ``tf.distribute`` strategies with more than one replica
(the post-step rounding runs in the replica context) and sparse
(``IndexedSlices``) updates are rounded as dense tensors.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from nics_fix.config import (
    ConfigError,
    StorageConfig,
    _STORAGE_KEYS,
    _check_keys,
    _check_mapping,
    _join,
    _parse_fields,
    _to_plain,
    canonical_by_type,
)
from nics_fix.log import logger
from nics_fix.quant import (
    auto_scale,
    fixed_point_quantize,
    pow2,
    representable_range,
)

try:  # the decorator Keras' own wrapper (LossScaleOptimizer) uses in build()
    from keras.src.utils.tracking import no_automatic_dependency_tracking as _no_tracking
except ImportError:  # pragma: no cover - older/newer Keras layouts
    def _no_tracking(fn):
        return fn


# ----------------------------------------------------------------------------
# Power-of-two learning rates
# ----------------------------------------------------------------------------


def floor_power_of_two(value: float) -> float:
    """The largest power of two ``2**k <= value`` (exact), for a finite ``value > 0``.

    >>> floor_power_of_two(0.1), floor_power_of_two(0.3), floor_power_of_two(1.0)
    (0.0625, 0.25, 1.0)
    """
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"a power-of-two learning rate needs a finite value > 0, got {value!r}")
    _, exponent = math.frexp(value)  # value = m * 2**exponent, 0.5 <= m < 1
    return math.ldexp(1.0, exponent - 1)


def lr_shift(learning_rate: float) -> int:
    """The right shift ``k`` of a hardware learning rate: ``floor_power_of_two(lr) == 2**-k``.

    >>> lr_shift(0.1), lr_shift(0.25), lr_shift(1.0)
    (4, 2, 0)
    """
    return -int(math.log2(floor_power_of_two(learning_rate)))


def floor_power_of_two_tensor(value) -> tf.Tensor:
    """:func:`floor_power_of_two` in TensorFlow (float32, for values > 0), read from the exponent bits."""
    value = tf.cast(value, tf.float32)
    exponent = tf.bitwise.right_shift(tf.bitcast(value, tf.int32), 23) - 127
    return pow2(tf.clip_by_value(exponent, -126, 127))


@keras.saving.register_keras_serializable(package="nics_fix")
class PowerOfTwoSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Wraps a schedule (or a callable) and rounds every value down to a power of two."""

    def __init__(self, schedule):
        self.schedule = schedule

    def __call__(self, step):
        if isinstance(self.schedule, keras.optimizers.schedules.LearningRateSchedule):
            value = self.schedule(step)
        else:
            value = self.schedule()
        return floor_power_of_two_tensor(value)

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule)}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["schedule"]))


def _rounded_lr_value(value, what: str):
    """Round a Python/NumPy learning-rate value down to a power of two, warning if it changes."""
    value = np.asarray(value)
    # A float32 learning-rate variable prints as the value the user gave (0.1, not 0.10000000149).
    shown = str(value.astype(np.float32)) if value.dtype == np.float32 else repr(float(value))
    value = float(value)
    rounded = floor_power_of_two(value)
    if rounded != value:
        logger.warning(
            "power_of_two_lr: %s learning rate %s is not a power of two; rounded down to "
            "%r = 2**-%d (hardware shifts instead of multiplying)",
            what, shown, rounded, lr_shift(rounded))
    return rounded


# ----------------------------------------------------------------------------
# Formats (update, storage, state): {bit_width, scale, rounding}
# ----------------------------------------------------------------------------


def parse_format(value, key_path: str = "") -> StorageConfig | None:
    """A ``{bit_width, scale, rounding}`` mapping as a :class:`StorageConfig`; None = float.

    ``scale`` defaults to ``auto`` when ``bit_width`` is given; ``scale: none``
    (or ``None`` for the whole value) means float. Errors raise ConfigError
    with ``key_path``.
    """
    if value is None:
        return None
    if isinstance(value, StorageConfig):
        return None if value.is_float else value
    fields = _parse_fields(_to_plain(value), _STORAGE_KEYS, key_path, None)
    if "bit_width" in fields:
        fields.setdefault("scale", "auto")
    if fields.get("scale", "none") == "none":
        return None
    if "bit_width" not in fields:
        raise ConfigError("bit_width is required when scale is not 'none'",
                          _join(key_path, "bit_width"))
    if fields["scale"] == "fixed":
        raise ConfigError("scale must be 'auto', 'none' or an integer", _join(key_path, "scale"))
    return StorageConfig(**fields)


_UNSET = object()


class FormatRules:
    """Per-variable formats: ``default``, ``by_type`` and ``by_name`` (layer or ``layer/var``)."""

    def __init__(self, value=None, key_path: str = "update_config"):
        self.default = _UNSET
        self.by_type: dict = {}
        self.by_name: dict = {}
        if value is None:
            return
        if isinstance(value, StorageConfig):
            self.default = parse_format(value)
            return
        value = _check_mapping(_to_plain(value), key_path, None)
        if set(value) <= set(_STORAGE_KEYS):
            self.default = parse_format(value, key_path)
            return
        _check_keys(value, ("default", "by_type", "by_name"), key_path, None)
        if "default" in value:
            self.default = parse_format(value["default"], _join(key_path, "default"))
        for section in ("by_type", "by_name"):
            spath = _join(key_path, section)
            entries = _check_mapping(value.get(section) or {}, spath, None)
            if section == "by_type":
                entries = canonical_by_type(entries, label=spath)
            for key, fmt in entries.items():
                getattr(self, section)[key] = parse_format(fmt, _join(spath, key))

    def resolve(self, layer_name: str, layer_type: str, key: str) -> StorageConfig | None:
        for table, name in ((self.by_name, f"{layer_name}/{key}"), (self.by_name, layer_name),
                            (self.by_type, layer_type)):
            if name in table:
                return table[name]
        return None if self.default is _UNSET else self.default

    def unmatched(self, names) -> list[str]:
        names = set(names)
        return [k for k in self.by_name if k not in names and k.split("/")[0] not in names]


def _format_dict(fmt: StorageConfig | None):
    return None if fmt is None else fmt.to_dict()


# ----------------------------------------------------------------------------
# The optimizer wrapper
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Managed:
    """Run-time state of one variable the wrapper rounds."""

    name: str
    index: int
    storage: StorageConfig | None
    update: StorageConfig | None
    counts: object = None  # int64 [4]: elements, nonzero, zero, saturated
    storage_scale: object = None  # int32 scalar (storage formats only)
    update_scale: object = None  # int32 scalar (update formats only)


class _State:
    """Plain holder: keeps Python structures out of Keras/TF attribute tracking."""

    def __init__(self):
        self.by_id: dict = {}  # optimizer var key -> format key (identity mapping from the factory)
        self.managed: dict = {}  # optimizer var key -> _Managed
        self.managed_vars: list = []  # (variable, _Managed), in build order
        self.slots: list = []  # (slot variable, int32 scale variable)
        self.formats: dict = {}  # "<layer>/<variable name>" -> (name, storage, update)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


@keras.saving.register_keras_serializable(package="nics_fix")
class FixedStorageOptimizer(keras.optimizers.Optimizer):
    """Wraps ``inner_optimizer``; rounds updates, stored weights and state to fixed point.

    Use :func:`fixed_storage_optimizer` to build one from a model. Direct
    construction takes the resolved, serializable form.

    Args:
        inner_optimizer: any Keras optimizer (it computes the float update).
        variable_formats: ``{"<layer name>/<variable name>": {"name":
            "<layer>/<weight key>", "storage": fmt or None, "update": fmt or
            None}}`` (formats as mappings ``{bit_width, scale, rounding}``).
            A variable is matched by identity when the factory built the
            optimizer, else by the last two parts of its ``path``.
        state_config: format of the inner optimizer's float slots, or None.
        power_of_two_lr: round the learning rate down to a power of two.
        seed: int for reproducible stochastic rounding (stateless, per
            variable and step); None uses TensorFlow's stateful RNG (which
            follows the global seed).
        name: optimizer name.
    """

    def __init__(self, inner_optimizer, variable_formats=None, state_config=None,
                 power_of_two_lr: bool = False, seed: int | None = None, name=None, **kwargs):
        if kwargs:
            raise ValueError(
                f"FixedStorageOptimizer does not take {', '.join(kwargs)}: set them on the inner optimizer")
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"inner_optimizer must be a keras.optimizers.Optimizer, got {inner_optimizer!r}")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self._nf = _State()
        formats = {}
        for path, entry in _to_plain(variable_formats or {}).items():
            entry = _check_mapping(entry, _join("variable_formats", path), None)
            formats[path] = (
                entry.get("name", path),
                parse_format(entry.get("storage"), _join(_join("variable_formats", path), "storage")),
                parse_format(entry.get("update"), _join(_join("variable_formats", path), "update")),
            )
        self._nf.formats = formats
        self.state_format = parse_format(state_config, "state_config")
        self.power_of_two_lr = bool(power_of_two_lr)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        if self.power_of_two_lr:
            self._round_inner_learning_rate()

    # -- learning rate ----------------------------------------------------------

    def _round_inner_learning_rate(self):
        inner = self.inner_optimizer
        current = inner._learning_rate
        if isinstance(current, PowerOfTwoSchedule):
            return
        if isinstance(current, keras.optimizers.schedules.LearningRateSchedule) or (
                callable(current) and not isinstance(current, keras.Variable)):
            logger.warning("power_of_two_lr: every value of the learning-rate schedule %r is rounded "
                           "down to a power of two", current)
            inner.learning_rate = PowerOfTwoSchedule(current)
        else:
            inner.learning_rate = _rounded_lr_value(keras.ops.convert_to_numpy(current), "the")

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        # Called by the base constructor before the inner optimizer exists.
        if "inner_optimizer" not in self.__dict__:
            return keras.optimizers.Optimizer.learning_rate.fset(self, learning_rate)
        if self.power_of_two_lr:
            if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule) or (
                    callable(learning_rate) and not isinstance(learning_rate, keras.Variable)):
                learning_rate = PowerOfTwoSchedule(learning_rate)
            else:
                learning_rate = _rounded_lr_value(keras.ops.convert_to_numpy(learning_rate), "the new")
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def variables(self):
        return self._variables[:] + list(self.inner_optimizer.variables)

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    # -- build --------------------------------------------------------------------

    def _lookup(self, variable):
        key = self._nf.by_id.get(self._var_key(variable))
        if key is None:  # e.g. after deserialization: "<layer>/<variable name>", the end of its path
            key = "/".join(str(getattr(variable, "path", "")).split("/")[-2:])
        return self._nf.formats.get(key)

    @_no_tracking
    def build(self, var_list):
        var_list = list(var_list)
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        nf = self._nf
        for index, variable in enumerate(var_list):
            found = self._lookup(variable)
            if found is None:
                continue
            name, storage, update = found
            if storage is None and update is None:
                continue
            managed = _Managed(name, index, storage, update)
            managed.counts = self.add_variable(shape=(4,), dtype="int64", initializer="zeros",
                                               name=f"{_safe(name)}_update_counts")
            for attr, fmt in (("storage_scale", storage), ("update_scale", update)):
                if fmt is not None:
                    init = fmt.scale if isinstance(fmt.scale, int) else 0
                    setattr(managed, attr, self.add_variable(
                        shape=(), dtype="int32", initializer=keras.initializers.Constant(init),
                        name=f"{_safe(name)}_{attr}"))
            nf.managed[self._var_key(variable)] = managed
            nf.managed_vars.append((variable, managed))
        if self.state_format is not None:
            for slot in _slot_variables(self.inner_optimizer):
                init = self.state_format.scale if isinstance(self.state_format.scale, int) else 0
                scale = self.add_variable(shape=(), dtype="int32", initializer=keras.initializers.Constant(init),
                                          name=f"{_safe(slot.name)}_state_scale")
                nf.slots.append((slot, scale))
        super().build(var_list)
        self.snap_to_storage()

    def snap_to_storage(self):
        """Put every variable with a storage format on its grid now (done at build)."""
        for variable, managed in self._nf.managed_vars:
            if managed.storage is not None:
                rounded, _ = self._round(managed.storage, tf.convert_to_tensor(variable),
                                         managed.storage_scale, self._seed(managed.index, 3, -1))
                variable.assign(rounded)

    # -- apply ----------------------------------------------------------------------

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if trainable_variables is None:
            if not self.built:
                raise ValueError("FixedStorageOptimizer: pass trainable_variables or build() first")
            variables = self._trainable_variables
        else:
            variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(variables)
                self.built = True
        if len(grads) == 0:
            return
        step = tf.identity(tf.convert_to_tensor(self._iterations))
        pending = []
        for grad, variable in zip(grads, variables):
            if grad is None:
                continue
            managed = self._nf.managed.get(self._var_key(variable))
            if managed is not None:
                # Read before the inner update: TF orders reads and writes of one
                # resource as written, in eager, tf.function and XLA alike.
                pending.append((variable, managed, tf.identity(tf.convert_to_tensor(variable))))
        self.inner_optimizer.apply(grads, trainable_variables)
        with tf.name_scope("fixed_storage"):
            for variable, managed, old in pending:
                self._store(variable, managed, old, step)
            for i, (slot, scale_var) in enumerate(self._nf.slots):
                rounded, _ = self._round(self.state_format, tf.convert_to_tensor(slot), scale_var,
                                         self._seed(i, 2, step))
                slot.assign(rounded)
        self._iterations.assign_add(1)

    def _round(self, fmt: StorageConfig, value, scale_var, seed):
        """``value`` in ``fmt`` (recording an auto scale in ``scale_var``), and where it saturated."""
        if fmt.scale == "auto":
            scale = auto_scale(value)
            if scale_var is not None:
                scale_var.assign(scale)
        else:
            scale = tf.constant(fmt.scale, tf.int32)
        low, high = representable_range(fmt.bit_width, scale)
        rounded = fixed_point_quantize(value, fmt.bit_width, scale, fmt.rounding, seed)
        return rounded, tf.logical_or(value < low, value > high)

    def _seed(self, index: int, which: int, step):
        if self.seed is None:
            return None
        first = tf.constant(self.seed * 1_000_003 + 4 * index + which, tf.int64)
        return tf.stack([first, tf.cast(step, tf.int64)])

    def _store(self, variable, managed: _Managed, old, step):
        new = tf.convert_to_tensor(variable)
        delta = new - old
        saturated = tf.zeros(tf.shape(delta), tf.bool)
        value = new
        if managed.update is not None:
            delta_q, clipped = self._round(managed.update, delta, managed.update_scale,
                                           self._seed(managed.index, 0, step))
            saturated = tf.logical_or(saturated, clipped)
            value = old + delta_q
        if managed.storage is not None:
            stored, clipped = self._round(managed.storage, value, managed.storage_scale,
                                          self._seed(managed.index, 1, step))
            saturated = tf.logical_or(saturated, clipped)
        else:
            stored = value
        variable.assign(stored)
        nonzero = tf.not_equal(delta, 0.0)
        zero = tf.logical_and(tf.logical_and(nonzero, tf.equal(stored, old)), tf.logical_not(saturated))

        def count(mask):
            return tf.reduce_sum(tf.cast(mask, tf.int64))

        managed.counts.assign_add(tf.stack([
            tf.cast(tf.size(delta), tf.int64), count(nonzero), count(zero), count(saturated)]))

    # -- counters and introspection -----------------------------------------------

    def update_counters(self) -> dict:
        """``{"<layer>/<var>": {"zero_frac", "saturate_frac", "nonzero_frac", "elements"}}`` so far."""
        out = {}
        for managed in self._nf.managed.values():
            total, nonzero, zero, saturated = (int(v) for v in keras.ops.convert_to_numpy(managed.counts))
            frac = (lambda n: n / total) if total else (lambda n: 0.0)
            out[managed.name] = {"zero_frac": frac(zero), "saturate_frac": frac(saturated),
                                 "nonzero_frac": frac(nonzero), "elements": total}
        return out

    def reset_counters(self) -> None:
        for managed in self._nf.managed.values():
            managed.counts.assign(tf.zeros((4,), tf.int64))

    def storage_scales(self) -> dict:
        """``{"<layer>/<var>": scale}``: the storage scale each variable was last rounded with."""
        return {m.name: int(keras.ops.convert_to_numpy(m.storage_scale))
                for m in self._nf.managed.values() if m.storage_scale is not None}

    def managed_formats(self) -> dict:
        """``{"<layer>/<var>": {"storage": fmt, "update": fmt}}`` of the variables this optimizer rounds."""
        return {m.name: {"storage": _format_dict(m.storage), "update": _format_dict(m.update)}
                for m in self._nf.managed.values()}

    # -- serialization --------------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "variable_formats": {
                path: {"name": name, "storage": _format_dict(storage), "update": _format_dict(update)}
                for path, (name, storage, update) in self._nf.formats.items()
            },
            "state_config": _format_dict(self.state_format),
            "power_of_two_lr": self.power_of_two_lr,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"),
                                                      custom_objects=custom_objects)
        return cls(inner, **config)


def _slot_variables(optimizer) -> list:
    """The float state variables of an optimizer (momentum, moments, ...)."""
    while hasattr(optimizer, "inner_optimizer"):  # e.g. LossScaleOptimizer: its own vars are not slots
        optimizer = optimizer.inner_optimizer
    skip = {id(optimizer._iterations)}
    if isinstance(optimizer._learning_rate, keras.Variable):
        skip.add(id(optimizer._learning_rate))
    return [v for v in optimizer.variables
            if id(v) not in skip and "float" in str(v.dtype)]


# ----------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------


def _model_variables(model):
    """``(layer, key, variable)`` for every trainable variable, fixed layers by their point keys."""
    from nics_fix.layers.base import FixedLayer

    layers = model._flatten_layers(include_self=True, recursive=True)
    seen = set()
    for layer in layers:
        if isinstance(layer, FixedLayer):
            if not layer.built:
                raise ValueError(f"fixed_storage_optimizer: layer {layer.name!r} is not built; build the "
                                 "model first (give it an Input or call it on a batch)")
            items = [(key, getattr(layer, key)) for key, point in layer.fixed_points.items()
                     if point.kind == "weight"]
        else:
            items = [(v.name, v) for v in getattr(layer, "_trainable_variables", [])]
        for key, variable in items:
            if variable is None or not getattr(variable, "trainable", True) or id(variable) in seen:
                continue
            seen.add(id(variable))
            yield layer, key, variable


def fixed_storage_optimizer(inner, model, update_config=None, state_config=None,
                            power_of_two_lr: bool = False, seed: int | None = None,
                            name=None) -> FixedStorageOptimizer:
    """Wrap ``inner`` so that ``model``'s weights are stored and updated in fixed point.

    Args:
        inner: any Keras optimizer.
        model: a *built* Keras model (or layer) made of ``nics_fix`` layers; each
            fixed layer's ``weight.storage_config`` gives the storage format of
            its weights.
        update_config: update (buffer) format: ``{bit_width, scale, rounding}``
            for all trainable variables, or ``{default, by_type, by_name}`` rules
            (``by_name`` keys: ``<layer>`` or ``<layer>/<var>``). None: updates
            are not quantized.
        state_config: ``{bit_width, scale, rounding}`` for the inner
            optimizer's state (momentum, moments), or None.
        power_of_two_lr: round the learning rate down to a power of two (warns).
        seed: int for reproducible stochastic rounding, or None.

    The optimizer is built on ``model.trainable_variables`` at once, which puts
    the initial weights on their storage grid.
    """
    rules = FormatRules(update_config, "update_config")
    formats, by_id, names = {}, [], []
    for layer, key, variable in _model_variables(model):
        names.append(layer.name)
        storage = None
        fixed_config = getattr(layer, "fixed_config", None)
        if fixed_config is not None and not fixed_config.weight.storage.is_float:
            storage = fixed_config.weight.storage
        update = rules.resolve(layer.name, type(layer).__name__, key)
        if storage is None and update is None:
            continue
        match = f"{layer.name}/{variable.name}"
        formats[match] = {"name": f"{layer.name}/{key}", "storage": _format_dict(storage),
                          "update": _format_dict(update)}
        by_id.append((variable, match))
        logger.info("fixed storage: %s/%s storage %s, update %s", layer.name, key,
                    _format_dict(storage) or "float", _format_dict(update) or "float")
    for key in rules.unmatched(names):
        logger.warning("fixed_storage_optimizer: update_config.by_name.%s matches no layer or variable", key)
    optimizer = FixedStorageOptimizer(inner, formats, state_config=state_config,
                                      power_of_two_lr=power_of_two_lr, seed=seed, name=name)
    optimizer._nf.by_id = {optimizer._var_key(v): path for v, path in by_id}
    optimizer.build(list(model.trainable_variables))
    return optimizer


__all__ = [
    "FixedStorageOptimizer",
    "FormatRules",
    "PowerOfTwoSchedule",
    "fixed_storage_optimizer",
    "floor_power_of_two",
    "floor_power_of_two_tensor",
    "lr_shift",
    "parse_format",
]
