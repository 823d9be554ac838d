"""Exact sums and the accumulator width of Dense, Conv2D and DepthwiseConv2D.

The simulator computes a layer's sums in float32, which rounds once a sum
needs more than float32's 24 significant bits: input bits + kernel bits +
log2(fan-in), roughly. An integer accumulator never rounds. A layer whose
config has an ``accumulator`` entry::

    by_name:
      dense1:
        accumulator: {bit_width: 24, overflow: saturate}   # or wrap

computes its sums exactly instead (float64 operands and sums: exact while a
sum needs at most 53 bits, see :func:`sum_bits`), expresses each sum in units
of its least significant bit ``lsb = min(input step * kernel step, bias step)``
(an all-zero bias, scale ``MIN_SCALE``, does not count),
saturates or wraps it to ``bit_width`` bits (the final sum, not every partial
sum), counts the sums that overflowed, and hands the exact value to the output
point, which rounds it once. Training and evaluation alike; the gradient passes
straight through the wrap and is zero where a sum saturated.

Where a tensor's step comes from (:func:`grid_exponent`): a quantization point
gives ``2**(scale - bit_width + 1)``; Flatten, Reshape, Dropout, MaxPooling2D
and a ReLU without an active point keep their input's step; an average over a
power-of-two number of values divides it; Add takes the finer of its inputs.

>>> import keras, numpy as np, nics_fix as nf
>>> q8 = {"data_config": {"bit_width": 8, "training": "auto", "not_training": "auto"}}
>>> inputs = keras.Input((4,))
>>> x = nf.Quantize(fixed_config={"activation": q8})(inputs)
>>> layer = nf.Dense(2, fixed_config={"weight": q8, "activation": q8,
...                                   "accumulator": {"bit_width": 16, "overflow": "wrap"}})
>>> model = keras.Model(inputs, layer(x))
>>> _ = model(np.ones((1, 4), "float32"))
>>> sorted(accumulator_counters(model)["dense"])
['overflows', 'sums']
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
from keras.src.backend.common.symbolic_scope import in_symbolic_scope

from nics_fix.quant import MIN_SCALE, accumulate, pow2

#: Layers whose output lies on their input's grid (values are only moved or selected).
SAME_GRID = ("Flatten", "Reshape", "Dropout", "MaxPooling2D")
#: Layers that sum their inputs with weights: where an accumulator entry applies.
SUMMING = ("Dense", "Conv2D", "DepthwiseConv2D")


def keras_type(layer) -> str:
    """The nics_fix or Keras class a layer is (or subclasses): ``nf.MaxPool2D`` -> ``MaxPooling2D``."""
    for cls in type(layer).__mro__:
        if cls.__module__.startswith(("nics_fix.", "keras")):
            return cls.__name__
    return type(layer).__name__


def parents(layer) -> list:
    """The layers feeding ``layer`` in its (first) functional graph."""
    nodes = getattr(layer, "_inbound_nodes", None) or []
    return [node.operation for node in nodes[0].parent_nodes] if nodes else []


def pool_divisor(layer):
    """Number of values averaged by an average-pooling layer, or None where the count varies
    ('same' padding at the borders) or the input size is unknown."""
    if keras_type(layer) == "GlobalAveragePooling2D":
        shape = layer.input.shape
        return None if None in shape[1:3] else int(shape[1]) * int(shape[2])
    if getattr(layer, "padding", "valid") != "valid":
        return None
    return int(np.prod(layer.pool_size))


def power_of_two_log(n):
    """``log2(n)`` for a power of two ``n``, else None."""
    return int(math.log2(n)) if n and n & (n - 1) == 0 else None


def output_point(layer, training: bool):
    """The layer's active output point (quantizing in this mode), or None."""
    point = (getattr(layer, "_nf_points", None) or {}).get("activation")
    if point is None or point.config.data.mode(training) == "none":
        return None
    return point


def grid_exponent(layer, exponent_of, training: bool, minimum=min):
    """Step exponent of ``layer``'s output, or None when it is not on a known grid.

    ``exponent_of(point)`` gives a quantizing point's step exponent (a Python
    int for the exporter, an int32 tensor for the simulator); ``minimum`` takes
    the finer of two exponents.
    """
    point = output_point(layer, training)
    if point is not None:
        return exponent_of(point)
    kind = keras_type(layer)
    inputs = parents(layer)
    if kind in SAME_GRID or (kind == "ReLU" and getattr(layer, "_nf_points", None) is not None):
        return grid_exponent(inputs[0], exponent_of, training, minimum) if inputs else None
    if kind in ("AveragePooling2D", "GlobalAveragePooling2D"):
        shift = power_of_two_log(pool_divisor(layer))
        below = grid_exponent(inputs[0], exponent_of, training, minimum) if inputs else None
        return None if shift is None or below is None else below - shift
    if kind == "Add":
        exponents = [grid_exponent(p, exponent_of, training, minimum) for p in inputs]
        if not exponents or any(e is None for e in exponents):
            return None
        out = exponents[0]
        for e in exponents[1:]:
            out = minimum(out, e)
        return out
    return None


def _point_exponent(point, training: bool):
    """Step exponent of a quantizing point as an int32 tensor (its scale variable)."""
    return tf.convert_to_tensor(point.data_scale) - (point.config.data.bit_width - 1)


def lsb_exponent(layer, training: bool):
    """Exponent of one step of ``layer``'s sums (int32 tensor); ValueError naming the layer if
    its input, kernel or bias is not on a fixed-point grid in this mode."""
    weights = layer._nf_points
    input_layers = parents(layer)
    e_in = (grid_exponent(input_layers[0], lambda p: _point_exponent(p, training), training, tf.minimum)
            if len(input_layers) == 1 else None)
    missing = [name for name, ok in (
        ("input", e_in is not None),
        ("kernel", weights["kernel"].config.data.mode(training) != "none"),
        ("bias", "bias" not in weights or weights["bias"].config.data.mode(training) != "none"),
    ) if not ok]
    if missing:
        raise ValueError(
            f"layer {layer.name}: an accumulator needs a fixed-point {' and '.join(missing)} "
            f"({'training' if training else 'evaluation'} mode); quantize it (e.g. an nf.Quantize "
            "point before the layer) or remove the accumulator entry")
    exponent = e_in + _point_exponent(weights["kernel"], training)
    if "bias" in weights:
        bias = weights["bias"]
        # An all-zero bias (scale MIN_SCALE) adds nothing: it must not drag the lsb down to 2**-100.
        exponent = tf.where(tf.convert_to_tensor(bias.data_scale) == MIN_SCALE, exponent,
                            tf.minimum(exponent, _point_exponent(bias, training)))
    return exponent


def _input_bound(layer, training: bool):
    """An upper bound of ``|x|`` for ``layer``'s output (a Python float), or None if unknown."""
    point = output_point(layer, training)
    if point is not None:
        return math.ldexp(1.0, int(point.data_scale.numpy()))
    kind = keras_type(layer)
    bounds = [_input_bound(p, training) for p in parents(layer)]
    if not bounds or any(b is None for b in bounds):
        return None
    if kind == "Add":
        return sum(bounds)
    if kind in SAME_GRID + ("AveragePooling2D", "GlobalAveragePooling2D", "ReLU"):
        return bounds[0]
    return None


def sum_exactness(model, training: bool = False) -> dict:
    """Per summing layer: whether float32 computes its sums exactly, from its formats.

    ``{layer: {"fan_in", "sum_bits", "exact_in_float32", "accumulator", "exact"}}``: ``sum_bits``
    bounds the bits (sign included) of any partial sum in units of the layer's
    lsb: fan-in x largest input x largest kernel value, plus the largest bias.
    Float32 holds every integer up to 2**24, so ``sum_bits <= 25`` means exact.
    ``exact``: whether the simulator's sums are exact, in float32 or, with an
    accumulator entry, in float64 (``sum_bits <= 54``). Layers with a float input,
    kernel or bias get ``sum_bits: None``.
    """
    from nics_fix.introspect import fixed_layers

    out = {}
    for layer in fixed_layers(model):
        if keras_type(layer) not in SUMMING:
            continue
        weights = layer._nf_points
        kernel = weights["kernel"]
        fan_in = int(np.prod(kernel.layer.kernel.shape[:-1]))
        if keras_type(layer) == "DepthwiseConv2D":
            fan_in = int(np.prod(kernel.layer.kernel.shape[:2]))
        up = parents(layer)
        bound = _input_bound(up[0], training) if len(up) == 1 else None
        try:
            lsb = int(lsb_exponent(layer, training).numpy())
        except ValueError:
            lsb = None
        bits = None
        if bound is not None and lsb is not None:
            total = fan_in * bound * math.ldexp(1.0, int(kernel.data_scale.numpy()))
            if "bias" in weights:
                total += math.ldexp(1.0, int(weights["bias"].data_scale.numpy()))
            bits = math.ceil(math.log2(total) - lsb) + 1
        config = layer.fixed_config.accumulator
        out[layer.name] = {"fan_in": fan_in, "sum_bits": bits,
                           "exact_in_float32": bits is not None and bits <= 25,
                           "accumulator": None if config is None else config.to_dict(),
                           # the accumulator's float64 sums hold integers up to 2**53
                           "exact": bits is not None and bits <= (25 if config is None else 54)}
    return out


def create_counters(layer) -> None:
    """Overflow and sum counters of an accumulating layer (untracked: not weights, not saved)."""
    object.__setattr__(layer, "_nf_accumulator_counts",
                       tf.Variable([0, 0], dtype=tf.int64, trainable=False, name="accumulator_counts"))


def exact_sums(layer, inputs, training: bool, call):
    """``call(inputs)`` (the Keras layer's own math) on float64 operands, then the accumulator.

    Returns the exact, saturated or wrapped sums as float64 for the output point.
    """
    config = layer.fixed_config.accumulator
    substitutes = {}
    for key, point in layer._nf_points.items():
        if key != "activation":
            substitutes[key] = tf.cast(point(getattr(layer, key), training), tf.float64)
    object.__setattr__(layer, "_nf_substitutes", substitutes)
    try:
        total = call(tf.cast(inputs, tf.float64))
    finally:
        object.__setattr__(layer, "_nf_substitutes", None)
    if in_symbolic_scope():
        return total  # Keras is only inferring the output shape: the graph has no edges yet
    lsb = tf.cast(pow2(lsb_exponent(layer, training)), tf.float64)
    kept, overflowed = accumulate(total, lsb, config.bit_width, config.overflow)
    counts = getattr(layer, "_nf_accumulator_counts", None)
    if counts is not None:
        counts.assign_add(tf.stack([tf.math.count_nonzero(overflowed, dtype=tf.int64),
                                    tf.size(overflowed, out_type=tf.int64)]))
    return kept


def accumulator_counters(model) -> dict:
    """``{layer: {"overflows": n, "sums": n}}`` since the layer was built (or last reset)."""
    from nics_fix.introspect import fixed_layers

    out = {}
    for layer in fixed_layers(model):
        counts = getattr(layer, "_nf_accumulator_counts", None)
        if counts is not None:
            overflows, sums = (int(v) for v in counts.numpy())
            out[layer.name] = {"overflows": overflows, "sums": sums}
    return out


def reset_accumulator_counters(model) -> None:
    from nics_fix.introspect import fixed_layers

    for layer in fixed_layers(model):
        counts = getattr(layer, "_nf_accumulator_counts", None)
        if counts is not None:
            counts.assign([0, 0])
