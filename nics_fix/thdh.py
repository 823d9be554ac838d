"""THDH helpers: the weight-gradient buffer strategy, its scale, and the update counters.

Training on the hardware itself (THDH) has three places where an update can be
lost: the weight-gradient buffer (this module's :class:`GradientBufferStrategy`),
the learning-rate shift and the fixed-point add into the stored weight (both in
:mod:`nics_fix.optimizers`). :class:`UpdateCountersCallback` reports, per epoch,
how much of the update was lost.

The gradient buffer and its scale
---------------------------------
A chip computes the weight gradient ``g`` into a wide buffer (e.g. 24 bits),
multiplies it by a learning rate that is a shift, ``lr = 2**-k``, and adds it
to the weight stored with bit width ``w_w`` and scale ``s_w`` (step
``dw = 2**(s_w - w_w + 1)``). :func:`buffer_scale` gives the buffer's scale
``s_b`` for a buffer of ``w_b`` bits::

    buffer step  db = dw * 2**(k - guard_bits)
    buffer scale s_b = log2(db) + w_b - 1 = s_w - w_w + w_b + k - guard_bits

Why: after the shift, one buffer step becomes an update of ``db * 2**-k =
dw * 2**-guard_bits``.

* ``guard_bits = 0``: one buffer step is exactly one weight step. This is the
  coarsest buffer that loses nothing the weight could keep under
  round-to-nearest: for ``w`` on its grid, ``round(g / db) * db * 2**-k ==
  round(lr * g / dw) * dw``, so buffer + shift + nearest storage gives the
  same weight as nearest storage of ``w + lr * g`` alone (tested). A coarser
  buffer (a larger step: a larger ``s_b`` at the same width) would drop or
  distort updates that the weight could represent.
* ``guard_bits > 0`` keeps that many bits *below* one weight step: useless
  with nearest storage rounding (they are rounded away anyway) but what lets
  stochastic (or floor) storage rounding see sub-step updates, so the expected
  weight change equals ``lr * g``.
* Range: the largest gradient the buffer holds is ``2**s_b``, an update of
  ``2**(s_b - k) = 2**(s_w + (w_b - w_w) - guard_bits)``. With ``guard_bits <=
  w_b - w_w`` one step can still move a weight across its whole range
  ``2**s_w``; ``guard_bits = w_b - w_w`` uses every spare bit below the weight
  step (``s_b = s_w + k``). The original TF framework's lower bound on the
  buffer scale, ``s_w - (w_w - 1) + k`` (a gradient worth one weight step must
  fit), is met whenever ``guard_bits <= w_b - 1``.

Worked example: 8-bit weights with scale 0 (``dw = 2**-7``), ``lr = 2**-4``
(``k = 4``), 24-bit buffer: ``s_b = 0 - 8 + 24 + 4 = 20``, ``db = 2**-3``; a
gradient of 0.1 is buffered as 0.125 (nearest), shifted to ``2**-7``: one
weight step, exactly what nearest storage of ``w + 0.1/16 = w + 0.00625``
gives (``0.00625 / 2**-7 = 0.8`` rounds to 1).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import keras

from nics_fix.config import ConfigError, _check_bit_width, _check_rounding, _join
from nics_fix.log import logger
from nics_fix.optimizers import FixedStorageOptimizer, lr_shift
from nics_fix.quant import auto_scale, fixed_point_quantize
from nics_fix.strategy import PointInfo, Strategy


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def buffer_scale(weight_scale: int, weight_bit_width: int, lr_shift: int,
                 buffer_bit_width: int = 24, guard_bits: int = 0) -> int:
    """Scale of a weight-gradient buffer: ``s_w - w_w + w_b + lr_shift - guard_bits``.

    ``lr = 2**-lr_shift``; the buffer's step is ``weight step * 2**(lr_shift -
    guard_bits)`` so that, after the shift, one buffer step is
    ``2**-guard_bits`` weight steps. See the module docstring for the reasoning.

    >>> buffer_scale(0, 8, 4)            # 8-bit weights at scale 0, lr = 1/16, 24-bit buffer
    20
    >>> buffer_scale(2, 16, 7, 24, 8)    # all 8 spare bits as guard bits: s_w + k
    9
    """
    for label, value in (("weight_scale", weight_scale), ("lr_shift", lr_shift), ("guard_bits", guard_bits)):
        if not _is_int(value):
            raise ValueError(f"{label} must be an integer, got {value!r}")
    for label, value in (("weight_bit_width", weight_bit_width), ("buffer_bit_width", buffer_bit_width)):
        _check_bit_width(value, label, None)
    if guard_bits < 0:
        raise ValueError(f"guard_bits must be >= 0, got {guard_bits}")
    return int(weight_scale - weight_bit_width + buffer_bit_width + lr_shift - guard_bits)


class GradientBufferStrategy(Strategy):
    """The weight-gradient buffer ("weight-gradient saver" of the original framework).

    ``post_weight_grad`` quantizes the gradient that reaches a layer's weights
    into a buffer of ``bit_width`` bits at ``scale`` (an integer; ``auto``; or
    a mapping from weight key to either, e.g. ``{kernel: -8, bias: -10}``),
    with ``rounding`` (nearest, stochastic, floor). Configured per layer in a
    strategy YAML::

        by_type:
          Dense: {name: gradient_buffer_strategy, bit_width: 24, scale: -8}
        by_name:
          conv1: {name: gradient_buffer_strategy, bit_width: 24, scale: {kernel: -6, bias: -9}}

    The buffer runs after the point's own ``gradient_config`` quantizer (if
    any). Use :func:`buffer_scale` (or :func:`buffer_strategy_config` for a
    whole model) to choose the scale from the weight format and the
    learning-rate shift.

    The original TF1 framework called it ``weightgradsaver_strategy``
    (``WeightGradSaverStrategy``: the same format, round to nearest even, one
    scale for every weight of the layer, scale 0 when not given); files using
    that name read as this strategy.
    """

    former_names = {"weightgradsaver_strategy": {"scale": 0}}

    def __init__(self, bit_width: int = 24, scale=None, rounding: str = "nearest"):
        self._config = {}
        self.bit_width = _check_bit_width(bit_width, "bit_width", None)
        self.rounding = _check_rounding(rounding, "rounding", None)
        if scale is None:
            raise ConfigError("gradient_buffer_strategy needs a scale (an integer, 'auto', or "
                              "{weight key: scale})", "scale")
        if isinstance(scale, Mapping):
            self.scale = {str(k): self._check_scale(v, _join("scale", k)) for k, v in scale.items()}
        else:
            self.scale = self._check_scale(scale, "scale")

    @staticmethod
    def _check_scale(value, path):
        if _is_int(value) or value == "auto":
            return int(value) if _is_int(value) else value
        raise ConfigError(f"buffer scale must be an integer or 'auto', got {value!r}", path)

    def scale_for(self, point_name: str):
        """The configured scale for a point ``<layer>/<key>`` (None: not buffered)."""
        if isinstance(self.scale, dict):
            return self.scale.get(point_name.rsplit("/", 1)[-1])
        return self.scale

    def post_weight_grad(self, x, point: PointInfo):
        scale = self.scale_for(point.name)
        if scale is None:
            return x
        if scale == "auto":
            scale = auto_scale(x)
        return fixed_point_quantize(x, self.bit_width, scale, self.rounding)


def _weight_format(layer, key: str, variable):
    """``(scale, bit_width)`` of a weight as the hardware stores it, or None if float."""
    config = layer.fixed_config.weight
    if not config.storage.is_float:
        fmt = config.storage
        scale = fmt.scale if isinstance(fmt.scale, int) else int(auto_scale(variable))
        return scale, fmt.bit_width
    data = config.data
    if data.is_float or data.bit_width is None:
        return None
    for mode in (data.training, data.not_training):
        if isinstance(mode, int):
            return mode, data.bit_width
    point = layer.fixed_points[key]
    scale = keras.ops.convert_to_numpy(point.data_scale)
    if scale.size != 1:
        raise ValueError(f"weight {layer.name}/{key} has {scale.size} scales ({data.granularity}): the gradient "
                         f"buffer keeps one scale per weight; give the weight a storage format with an integer "
                         f"scale, or per-tensor data scales")
    return int(scale.reshape(())), data.bit_width


def buffer_strategy_config(model, learning_rate: float, buffer_bit_width: int = 24,
                           guard_bits: int = 0, rounding: str = "nearest") -> dict:
    """A strategy config (``by_name``) giving each fixed layer a :class:`GradientBufferStrategy`.

    Each weight's scale comes from its storage format (integer scale, or
    ``auto_scale`` of the current value), else from its data format (integer
    mode, else the point's current stored data scale); float weights get no
    buffer. ``learning_rate`` is rounded down to a power of two for the shift.
    Build the model again with the result as its strategy config (strategies
    are resolved when layers are created).
    """
    from nics_fix.introspect import fixed_layers

    shift = lr_shift(learning_rate)
    by_name = {}
    for layer in fixed_layers(model):
        scales = {}
        for key, point in layer.fixed_points.items():
            if point.kind != "weight":
                continue
            fmt = _weight_format(layer, key, getattr(layer, key))
            if fmt is not None:
                scales[key] = buffer_scale(fmt[0], fmt[1], shift, buffer_bit_width, guard_bits)
        if scales:
            by_name[layer.name] = {"name": GradientBufferStrategy.name, "bit_width": buffer_bit_width,
                                   "scale": scales, "rounding": rounding}
    return {"by_name": by_name}


def _find_fixed_storage_optimizer(optimizer):
    while optimizer is not None and not isinstance(optimizer, FixedStorageOptimizer):
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return optimizer


class UpdateCountersCallback(keras.callbacks.Callback):
    """Logs the update counters of a :class:`~nics_fix.FixedStorageOptimizer` every epoch.

    At the end of each epoch it adds ``update_zero_frac/<layer>/<var>`` and
    ``update_saturate_frac/<layer>/<var>`` to the epoch ``logs`` (so History
    and any logger of epoch logs records them) and resets the counters. The
    counters are also reset when training begins, so steps taken before
    ``fit`` are not counted. ``optimizer`` defaults to the model's.
    """

    def __init__(self, optimizer=None):
        super().__init__()
        self._optimizer = optimizer
        self._warned = False

    def _fixed_optimizer(self):
        source = self._optimizer if self._optimizer is not None else getattr(self.model, "optimizer", None)
        found = _find_fixed_storage_optimizer(source)
        if found is None and not self._warned:
            self._warned = True
            logger.warning("UpdateCountersCallback: %r is not a FixedStorageOptimizer; no counters "
                           "to log", source)
        return found

    def on_train_begin(self, logs=None):
        optimizer = self._fixed_optimizer()
        if optimizer is not None:
            optimizer.reset_counters()

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self._fixed_optimizer()
        if optimizer is None:
            return
        if logs is not None:
            for name, counters in optimizer.update_counters().items():
                logs[f"update_zero_frac/{name}"] = float(counters["zero_frac"])
                logs[f"update_saturate_frac/{name}"] = float(counters["saturate_frac"])
                # Lost updates only count nonzero ones: this shows when gradients
                # already underflowed upstream (nothing left to lose).
                logs[f"update_nonzero_frac/{name}"] = float(counters["nonzero_frac"])
        optimizer.reset_counters()


__all__ = [
    "GradientBufferStrategy",
    "UpdateCountersCallback",
    "buffer_scale",
    "buffer_strategy_config",
]
