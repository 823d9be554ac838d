"""Run an exported integer model (:func:`nics_fix.export_integer_model`) with integers only.

Every tensor is an int64 NumPy array ``m`` with a power-of-two exponent ``e``
(value ``m * 2**e``). Sums accumulate in int64 and never round; moving a value
to a coarser step is :func:`nics_fix.quant.requantize_integer` (a right shift
with the configured rounding, then saturation); an accumulator entry saturates
or wraps the sum; average pooling over ``2**k`` values lowers the exponent by
``k``; ``Add`` aligns its inputs to the finer step with left shifts. The only
float operations are the input's quantization (by the model's input point, the
same quantizer as the simulator) and the final ``m * 2**e`` to float32.

>>> import keras, numpy as np, tempfile, nics_fix as nf
>>> q8 = {"data_config": {"bit_width": 8, "training": "auto", "not_training": "fixed"}}
>>> inputs = keras.Input((4,))
>>> x = nf.Quantize(fixed_config={"activation": q8})(inputs)
>>> model = keras.Model(inputs, nf.Dense(2, fixed_config={"weight": q8, "activation": q8})(x))
>>> x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
>>> _ = model(x, training=True)
>>> folder = tempfile.mkdtemp(); _ = nf.export_integer_model(model, folder)
>>> out = IntegerModel.load(folder).predict(x)
>>> bool(np.array_equal(out.floats, model.predict(x, verbose=0)))
True
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from nics_fix.export import CHANNEL_AXES, FORMAT, VERSION, channel_exponents
from nics_fix.quant import integer_mantissa, requantize_integer, saturate_integer, wrap_integer


class IntegerModelError(ValueError):
    """The folder is not a readable integer model of a supported version."""


@dataclasses.dataclass
class IntegerOutput:
    """One model output: ``integers * 2**exponent == floats`` (float32)."""

    integers: np.ndarray
    exponent: object  # int, or an int array broadcastable over ``integers``
    floats: np.ndarray


def _to_float(m, e) -> np.ndarray:
    return np.ldexp(m.astype(np.float64), np.asarray(e)).astype(np.float32)


def _align(tensors):
    """Integers of several ``(m, e)`` on the finest of their steps (exact left shifts)."""
    exponent = tensors[0][1]
    for _, e in tensors[1:]:
        exponent = np.minimum(exponent, e)
    return [np.left_shift(m, np.asarray(e) - exponent) for m, e in tensors], exponent


def _pad_same(size: int, k: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def _windows(x, size, strides, padding, fill=0):
    """``[N, H', W', C, kh, kw]`` windows of an NHWC array (TensorFlow's padding rule)."""
    (kh, kw), (sh, sw) = size, strides
    if padding == "same":
        pads = [(0, 0), _pad_same(x.shape[1], kh, sh), _pad_same(x.shape[2], kw, sw), (0, 0)]
        x = np.pad(x, pads, constant_values=fill)
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    return windows[:, ::sh, ::sw]


class IntegerModel:
    """An exported integer model; :meth:`predict` runs it with NumPy integer arithmetic."""

    def __init__(self, graph: dict, arrays: dict):
        self.graph = graph
        self.arrays = arrays
        #: ``{layer: [overflowed sums, sums]}`` of the accumulators, over every predict call.
        self.overflows = {layer["name"]: [0, 0] for layer in graph["layers"] if layer.get("accumulator")}

    @classmethod
    def load(cls, path) -> "IntegerModel":
        folder = Path(path)
        try:
            graph = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise IntegerModelError(f"{folder / 'model.json'}: not a readable integer model ({err})") from None
        if not isinstance(graph, dict) or graph.get("format") != FORMAT:
            raise IntegerModelError(f"{folder / 'model.json'}: format is not {FORMAT!r}")
        if graph.get("version") != VERSION:
            raise IntegerModelError(f"{folder / 'model.json'}: version {graph.get('version')!r}; this engine "
                                    f"reads version {VERSION}")
        arrays = {}
        for layer in graph["layers"]:
            for key, spec in (layer.get("weights") or {}).items():
                data = np.fromfile(folder / spec["file"], dtype=np.dtype(spec["dtype"]).newbyteorder("<"))
                arrays[(layer["name"], key)] = data.astype(np.int64).reshape(spec["shape"])
        return cls(graph, arrays)

    # -- layers -------------------------------------------------------------

    def _weight(self, layer, key):
        return self.arrays[(layer["name"], key)], np.asarray(layer["weights"][key]["exponent"])

    def _kernel(self, layer):
        """The kernel and one exponent per output channel (:func:`~nics_fix.export.channel_exponents`):
        finer exponents along the summed axes are reached by exact left shifts."""
        kernel, exponent = self._weight(layer, "kernel")
        per_channel = channel_exponents(exponent, kernel.shape, layer["type"])
        if exponent.ndim:
            channels = np.reshape(per_channel, [kernel.shape[a] if a in CHANNEL_AXES[layer["type"]] else 1
                                                for a in range(kernel.ndim)])
            kernel = np.left_shift(kernel, np.broadcast_to(exponent, kernel.shape) - channels)
        return kernel, per_channel

    def _sum(self, layer, products, exponent, channel_axis_shape=None):
        """Bias, accumulator and activation of a summing layer's integer products."""
        lsb = np.asarray(layer["sum_exponent"])
        total = np.left_shift(products, exponent - lsb)
        if "bias" in layer.get("weights", {}):
            bias, bias_exp = self._weight(layer, "bias")
            # A bias finer than the lsb is all zeros (see nics_fix.accumulator.lsb_exponent).
            total = total + np.left_shift(bias, np.maximum(bias_exp - lsb, 0)) * (bias_exp >= lsb)
        acc = layer.get("accumulator")
        if acc:
            top = 1 << (acc["bit_width"] - 1)
            counts = self.overflows[layer["name"]]
            counts[0] += int(np.count_nonzero((total < -top) | (total > top - 1)))
            counts[1] += int(total.size)
            limit = saturate_integer if acc["overflow"] == "saturate" else wrap_integer
            total = limit(total, acc["bit_width"])
        if layer.get("activation") == "relu":
            total = np.maximum(total, 0)
        return total, lsb

    def _dense(self, layer, m, e):
        kernel, k_exp = self._kernel(layer)
        return self._sum(layer, m @ kernel, e + k_exp)

    def _conv2d(self, layer, m, e):
        kernel, k_exp = self._kernel(layer)
        kh, kw, cin, cout = kernel.shape
        windows = _windows(m, (kh, kw), layer["strides"], layer["padding"])  # N H W C kh kw
        n, h, w = windows.shape[:3]
        patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(n * h * w, kh * kw * cin)
        products = (patches @ kernel.reshape(kh * kw * cin, cout)).reshape(n, h, w, cout)
        return self._sum(layer, products, e + k_exp)

    def _depthwiseconv2d(self, layer, m, e):
        kernel, k_exp = self._kernel(layer)  # output channel c * mult + k
        kh, kw, cin, mult = kernel.shape
        windows = _windows(m, (kh, kw), layer["strides"], layer["padding"])
        products = np.einsum("nhwcij,ijcm->nhwcm", windows, kernel)
        n, h, w = products.shape[:3]
        return self._sum(layer, products.reshape(n, h, w, cin * mult), e + k_exp)

    def _batchnormalization(self, layer, m, e):
        a, a_exp = self._weight(layer, "multiplier")
        c, c_exp = self._weight(layer, "offset")
        (product, offset), exponent = _align([(m * a, e + a_exp), (c, c_exp)])
        return product + offset, exponent

    def _maxpooling2d(self, layer, m, e):
        fill = np.iinfo(np.int64).min
        return _windows(m, layer["pool_size"], layer["strides"], layer["padding"], fill).max(axis=(4, 5)), e

    def _averagepooling2d(self, layer, m, e):
        return _windows(m, layer["pool_size"], layer["strides"], "valid").sum(axis=(4, 5)), e - layer["shift"]

    def _globalaveragepooling2d(self, layer, m, e):
        return m.sum(axis=(1, 2), keepdims=bool(layer.get("keepdims"))), e - layer["shift"]

    def _relu(self, layer, m, e):
        return np.maximum(m, 0), e

    def _flatten(self, layer, m, e):
        return m.reshape(m.shape[0], -1), e

    def _reshape(self, layer, m, e):
        return m.reshape((m.shape[0], *layer["target_shape"])), e

    def _dropout(self, layer, m, e):
        return m, e

    def _quantize(self, layer, m, e):
        return m, e

    # -- running ------------------------------------------------------------

    def _run_layer(self, layer, values):
        inputs = [values[name] for name in layer["inputs"]]
        kind = layer["type"]
        out = layer.get("output")
        if isinstance(inputs[0], np.ndarray):  # still the float model input
            if kind == "Quantize":
                m = integer_mantissa(inputs[0], out["bit_width"], out["scale"], out["rounding"])
                return m, out["exponent"]
            return getattr(self, "_" + kind.lower())(layer, inputs[0], 0)[0]
        if kind == "Add":
            aligned, e = _align(inputs)
            m = sum(aligned[1:], aligned[0])
        else:
            m, e = getattr(self, "_" + kind.lower())(layer, *inputs[0])
        if out is not None:
            m = requantize_integer(m, e, out["bit_width"], out["exponent"], out["rounding"])
            e = out["exponent"]
        return m, e

    def predict_integers(self, x) -> list:
        """``[(integers, exponent)]`` per model output for a float input batch ``x``."""
        (spec,) = self.graph["inputs"]
        x = np.asarray(x, np.float32)
        if list(x.shape[1:]) != list(spec["shape"]):
            raise ValueError(f"input {spec['name']}: expected shape (batch, {', '.join(map(str, spec['shape']))}), "
                             f"got {x.shape}")
        values = {spec["name"]: x}
        for layer in self.graph["layers"]:
            values[layer["name"]] = self._run_layer(layer, values)
        return [values[name] for name in self.graph["outputs"]]

    def predict(self, x, batch_size: int = 256):
        """Quantize ``x`` with the input point and run the model: an :class:`IntegerOutput`
        (a list of them for a model with several outputs)."""
        x = np.asarray(x, np.float32)
        parts = [self.predict_integers(x[i:i + batch_size]) for i in range(0, max(len(x), 1), batch_size)]
        outputs = []
        for k in range(len(self.graph["outputs"])):
            integers = np.concatenate([p[k][0] for p in parts])
            exponent = parts[0][k][1]
            outputs.append(IntegerOutput(integers, exponent, _to_float(integers, exponent)))
        return outputs[0] if len(outputs) == 1 else outputs
