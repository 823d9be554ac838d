"""Export a trained fixed-point model as plain integers (format ``nics_fix.integer``, version 1).

The folder holds ``model.json`` (the layer graph, every tensor's format) and
one raw little-endian, row-major binary file per integer array; a value is
``integer * 2**exponent``. ``docs/integer_format.md`` is the specification a
C or HLS programmer reads; :class:`nics_fix.IntegerModel` runs it.

The model is exported in evaluation mode (the ``not_training`` configs): every
weight and output point must be fixed point there with a known scale (``fixed``
or an integer; ``auto`` depends on the data and is refused), the model input
must reach a ``Quantize`` point before any arithmetic, and only the layers the
integer engine runs may appear. Anything else raises :class:`ExportError`
naming the layer.

>>> import keras, numpy as np, tempfile, nics_fix as nf
>>> q8 = {"data_config": {"bit_width": 8, "training": "auto", "not_training": "fixed"}}
>>> inputs = keras.Input((4,))
>>> x = nf.Quantize(fixed_config={"activation": q8}, name="q")(inputs)
>>> model = keras.Model(inputs, nf.Dense(2, fixed_config={"weight": q8, "activation": q8}, name="d")(x))
>>> _ = model(np.ones((1, 4), "float32"), training=True)   # sets the scales
>>> folder = tempfile.mkdtemp()
>>> [layer["name"] for layer in export_integer_model(model, folder)["layers"]]
['q', 'd']
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nics_fix import accumulator
from nics_fix.quant import MIN_SCALE, integer_mantissa, step_exponent

FORMAT = "nics_fix.integer"
VERSION = 1

#: Layer types the integer engine runs (their Keras class names).
SUPPORTED = ("Quantize", "Dense", "Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU",
             "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "Add", "Flatten",
             "Reshape", "Dropout")
#: Layers that only move values: they may sit between the float input and its Quantize point.
_MOVES_ONLY = ("Flatten", "Reshape", "Dropout")


class ExportError(ValueError):
    """The model cannot be written as integers; the message names the layer."""


def _eval_rounding(data_config) -> str:
    # Evaluation rounds stochastic data to nearest (see nics_fix.point).
    return "nearest" if data_config.rounding == "stochastic" else data_config.rounding


def eval_scale(point):
    """The scale a point uses in evaluation (an int, or an int array for per-channel/per-block
    scales), or ExportError if it is float or data-dependent."""
    mode = point.config.data.mode(False)
    if mode == "none":
        raise ExportError(f"layer {point.layer.name}: its {point.key} point is float in evaluation "
                          "(not_training: none); the integer engine needs every point in fixed point")
    if mode == "auto":
        raise ExportError(f"layer {point.layer.name}: its {point.key} point has not_training: auto, a scale "
                          "that depends on the data; use fixed (the scale learnt in training) or an integer")
    return int(mode) if isinstance(mode, int) else _plain(np.asarray(point.data_scale))


def point_format(point) -> dict:
    """``{bit_width, scale, exponent, rounding}`` of a point in evaluation."""
    bits, scale = point.config.data.bit_width, eval_scale(point)
    return {"bit_width": bits, "scale": scale, "exponent": _plain(step_exponent(bits, scale)),
            "rounding": _eval_rounding(point.config.data)}


#: Per summing layer type, the kernel axes that index output channels (DepthwiseConv2D: c * mult + k).
CHANNEL_AXES = {"Dense": (1,), "Conv2D": (3,), "DepthwiseConv2D": (2, 3)}


def channel_exponents(exponent, kernel_shape, kind: str):
    """A kernel's exponent as one exponent per output channel (flat), or an int if it is one.

    Where exponents differ along the summed axes (per-block scales) the finest
    is taken: the kernel integers are then shifted left to it (exactly).
    """
    exponent = np.asarray(exponent)
    if exponent.ndim == 0:
        return int(exponent)
    summed = tuple(a for a in range(len(kernel_shape)) if a not in CHANNEL_AXES[kind])
    return np.broadcast_to(exponent, kernel_shape).min(axis=summed).reshape(-1)


def _dtype(values: np.ndarray) -> str:
    for name in ("int8", "int16", "int32"):
        info = np.iinfo(name)
        if values.size == 0 or (values.min() >= info.min and values.max() <= info.max):
            return name
    return "int64"


class _Writer:
    """Writes integer arrays as raw little-endian files and describes them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.bytes = 0

    def array(self, name: str, integers: np.ndarray, bits: int, scale, exponent) -> dict:
        dtype = _dtype(integers)
        data = np.ascontiguousarray(integers.astype(np.dtype(dtype).newbyteorder("<")))
        (self.folder / name).write_bytes(data.tobytes())
        self.bytes += data.nbytes
        return {"file": name, "dtype": dtype, "shape": list(integers.shape), "bit_width": int(bits),
                "scale": _plain(scale), "exponent": _plain(exponent)}

    def weight(self, point) -> dict:
        fmt = point_format(point)
        values = np.asarray(getattr(point.layer, point.key))
        integers = integer_mantissa(values, fmt["bit_width"], fmt["scale"], fmt["rounding"])
        return self.array(f"{point.layer.name}.{point.key}.bin", integers, fmt["bit_width"],
                          fmt["scale"], fmt["exponent"])


def _plain(value):
    """An int, or a nested list of ints for a per-channel/per-block exponent array."""
    array = np.asarray(value)
    return int(array) if array.ndim == 0 else array.astype(int).tolist()


def _check_options(layer, kind: str) -> dict:
    """The layer's own options the engine needs; ExportError for options it does not run."""
    name = layer.name

    def refuse(what):
        raise ExportError(f"layer {name} ({kind}): the integer engine does not run {what}")

    options = {}
    if kind in ("Dense", "Conv2D", "DepthwiseConv2D"):
        activation = getattr(layer.activation, "__name__", str(layer.activation))
        if activation != "linear":
            refuse(f"activation={activation!r} inside the layer (use a separate ReLU layer)")
        options["activation"] = activation
    if kind in ("Conv2D", "DepthwiseConv2D", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D"):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            refuse("channels_first")
    if kind in ("Conv2D", "DepthwiseConv2D"):
        if tuple(layer.dilation_rate) != (1, 1):
            refuse(f"dilation_rate={tuple(layer.dilation_rate)}")
        if getattr(layer, "groups", 1) != 1:
            refuse(f"groups={layer.groups}")
        options.update(strides=list(layer.strides), padding=layer.padding)
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        options.update(pool_size=list(layer.pool_size), strides=list(layer.strides), padding=layer.padding)
    if kind == "ReLU" and (layer.max_value is not None or float(layer.negative_slope) != 0
                           or float(layer.threshold) != 0):
        refuse("max_value, negative_slope or threshold")
    if kind == "BatchNormalization":
        if layer.axis not in (-1, len(layer.input.shape) - 1):
            refuse(f"axis={layer.axis} (only the last axis)")
        if not layer.integer_evaluation:
            raise ExportError(f"layer {name}: its gamma/beta points are float in evaluation; the integer "
                              "engine runs batch normalization as a fixed-point scale-and-shift")
    if kind == "Reshape":
        options["target_shape"] = list(layer.target_shape)
    if kind == "GlobalAveragePooling2D" and getattr(layer, "keepdims", False):
        options["keepdims"] = True
    return options


def _layer_entry(layer, kind, inputs, exponents, float_tensors, writer) -> tuple[dict, object]:
    """``(json entry, output exponent)`` of one layer."""
    name = layer.name
    entry = {"name": name, "type": kind, "inputs": inputs}
    entry.update(_check_options(layer, kind))
    in_float = [i for i in inputs if i in float_tensors]
    if in_float and kind not in _MOVES_ONLY + ("Quantize",):
        raise ExportError(f"layer {name} ({kind}) receives the float model input {in_float[0]!r}; put an "
                          "nf.Quantize point (the model's input point) before it")
    points = getattr(layer, "_nf_points", {})
    for key in ("kernel", "bias"):
        if key in points:
            entry.setdefault("weights", {})[key] = writer.weight(points[key])
    if kind == "BatchNormalization":
        (a, a_bits, a_scale), (c, c_bits, c_scale) = layer.scale_and_shift()
        entry["weights"] = {}
        for key, values, bits, scale in (("multiplier", a, a_bits, a_scale), ("offset", c, c_bits, c_scale)):
            scale = int(np.asarray(scale))
            entry["weights"][key] = writer.array(f"{name}.{key}.bin", integer_mantissa(values, bits, scale),
                                                 bits, scale, step_exponent(bits, scale))
    in_exponent = exponents.get(inputs[0]) if inputs else None
    if kind in accumulator.SUMMING:
        kernel = entry["weights"]["kernel"]
        sum_exp = np.asarray(in_exponent) + channel_exponents(kernel["exponent"], kernel["shape"], kind)
        bias = entry["weights"].get("bias")
        if bias is not None and np.any(np.asarray(bias["scale"]) != MIN_SCALE):  # as accumulator.lsb_exponent
            sum_exp = np.minimum(sum_exp, np.asarray(bias["exponent"]))
        entry["sum_exponent"] = _plain(sum_exp)
        config = layer.fixed_config.accumulator
        entry["accumulator"] = None if config is None else config.to_dict()
    out_exponent = in_exponent
    if kind == "Add":
        out_exponent = int(min(exponents[i] for i in inputs))
    elif kind in ("AveragePooling2D", "GlobalAveragePooling2D"):
        count = accumulator.pool_divisor(layer)
        shift = accumulator.power_of_two_log(count)
        if shift is None:
            raise ExportError(f"layer {name} ({kind}): averages over {count or 'a varying number of'} values; "
                              "the integer engine divides exactly only by a power of two (valid padding)")
        entry["shift"] = shift
        out_exponent = in_exponent - shift
    elif kind == "BatchNormalization":
        out_exponent = int(min(np.min(in_exponent + entry["weights"]["multiplier"]["exponent"]),
                               np.min(entry["weights"]["offset"]["exponent"])))
    elif kind in accumulator.SUMMING:
        out_exponent = entry["sum_exponent"]
    point = points.get("activation")
    if point is not None and point.config.data.mode(False) != "none":
        entry["output"] = point_format(point)
        out_exponent = entry["output"]["exponent"]
    elif point is not None and kind != "ReLU":
        eval_scale(point)  # raises: a float output point
    return entry, out_exponent


def export_integer_model(model, path) -> dict:
    """Write ``model`` (evaluation mode) as integers to the folder ``path``; return the JSON graph.

    ``model.json`` also records ``bytes``: the size of all integer arrays.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    writer = _Writer(folder)
    layers, model_inputs, exponents, float_tensors = [], [], {}, set()
    for layer in model.operations:
        kind = accumulator.keras_type(layer)
        inputs = [parent.name for parent in accumulator.parents(layer)]
        if kind == "InputLayer":
            model_inputs.append({"name": layer.name, "shape": list(layer.output.shape[1:])})
            float_tensors.add(layer.name)
            continue
        if kind not in SUPPORTED:
            raise ExportError(f"layer {layer.name} ({kind}): the integer engine cannot run this layer type; "
                              f"it runs {', '.join(SUPPORTED)}")
        entry, exponent = _layer_entry(layer, kind, inputs, exponents, float_tensors, writer)
        if kind in _MOVES_ONLY and all(i in float_tensors for i in inputs):
            float_tensors.add(layer.name)
        entry["output_exponent"] = _plain(exponent)
        entry["output_shape"] = list(layer.output.shape[1:])
        exponents[layer.name] = exponent
        layers.append(entry)
    outputs = [tensor._keras_history.operation.name for tensor in model.outputs]
    for name in outputs:
        if name in float_tensors:
            raise ExportError(f"layer {name}: the model output is the float input; nothing to export")
    graph = {"format": FORMAT, "version": VERSION, "value": "integer * 2**exponent",
             "model": model.name, "inputs": model_inputs, "outputs": outputs, "layers": layers,
             "bytes": writer.bytes}
    (folder / "model.json").write_text(json.dumps(graph, indent=1) + "\n", encoding="utf-8")
    return graph
