"""Cost model of a fixed-point model: weight bits (model size) and bit-operations.

Float values count as 32 bits. ``weight_bits`` sums, over every weight point,
(number of elements) × (its data bit width), plus :data:`SCALE_BITS` for each
scale of a per-channel or per-block point (an 8-bit exponent per block of 32
values adds 0.25 bits per weight; one scale per tensor is not counted, as
before scales had shapes); ``bops`` sums, over every
kernel of every layer (Dense, EinsumDense, the convolutions; both kernels of
a SeparableConv2D; the projections of a MultiHeadAttention), MACs × (kernel
bits) × (input activation bits) for the forward pass, and adds the two
backward GEMMs (input gradient and weight gradient, each as many MACs as the
forward) with the gradient bit widths for ``bops(..., training=True)``.
Attention's two activation-by-activation products (scores, weighted sum) are
not counted.

>>> import keras, nics_fix as nf
>>> cfg = {"weight": {"data_config": {"bit_width": 4, "training": "auto", "not_training": "auto"}}}
>>> m = keras.Sequential([keras.Input((3,)), nf.Dense(2, use_bias=False, fixed_config=cfg)])
>>> cost_summary(m)["total_weight_bits"]
24
"""

from __future__ import annotations

import math

from nics_fix.introspect import fixed_layers

FLOAT_BITS = 32
#: Bits of one stored scale (a power-of-two exponent, as MX formats store it: E8M0).
SCALE_BITS = 8


def data_bits(config) -> int:
    """Bits a data/gradient config stores values in (32 when float)."""
    return FLOAT_BITS if config.is_float or config.bit_width is None else int(config.bit_width)


def scale_bits(point) -> int:
    """Bits of a point's stored data scales: per-channel and per-block ones only."""
    data = point.config.data
    if data.is_float or data.granularity == "tensor":
        return 0
    return SCALE_BITS * math.prod(point.data_scale.shape)


def weight_bit_table(model) -> list[dict]:
    """One row per weight point: layer, variable, elements, bits, scale_bits."""
    rows = []
    for layer in fixed_layers(model):
        for key, point in layer.fixed_points.items():
            if point.kind != "weight":
                continue
            size = math.prod(getattr(layer, key).shape)
            rows.append({"layer": layer.name, "variable": key, "elements": int(size),
                         "bits": data_bits(point.config.data), "scale_bits": scale_bits(point)})
    return rows


def cost_summary(model) -> dict:
    """Total and average weight bits (scales included), and the mean activation bit width."""
    rows = weight_bit_table(model)
    total = sum(r["elements"] * r["bits"] + r["scale_bits"] for r in rows)
    elements = sum(r["elements"] for r in rows)
    activations = [data_bits(p.config.data) for layer in fixed_layers(model)
                   for p in layer.fixed_points.values() if p.kind == "activation"]
    return {
        "total_weight_bits": int(total),
        "avg_weight_bits": total / elements if elements else 0.0,
        "weight_elements": int(elements),
        "avg_activation_bits": sum(activations) / len(activations) if activations else 0.0,
    }


def _shapes(layer, parent=None):
    """``(input shape, output shape)`` the layer was built for (sublayers have no graph node).

    An attention output projection is built for an unknown sequence length;
    its attention layer (``parent``) knows it.
    """
    shapes = getattr(layer, "_build_shapes_dict", None)
    if not shapes or len(shapes) != 1:
        return None, None
    in_shape = tuple(next(iter(shapes.values())))
    if parent is not None and layer is parent.output_dense:
        query_shape = tuple(parent._build_shapes_dict["query_shape"])
        in_shape = query_shape[:-1] + in_shape[len(query_shape) - 1:]
    return in_shape, tuple(layer.compute_output_shape(in_shape))


def _size(dims) -> int:
    return int(math.prod(d for d in dims if d is not None))


def _einsum_macs(equation: str, in_shape, kernel_shape) -> int:
    """MACs of ``input, kernel -> output`` per example: the product of every dimension but the batch."""
    in_spec, kernel_spec = equation.split("->")[0].split(",")
    sizes = dict(zip(kernel_spec, kernel_shape))
    explicit = in_spec[3:] if in_spec.startswith("...") else in_spec[1:]  # the batch is "..." or the first
    sizes.update(zip(explicit, in_shape[len(in_shape) - len(explicit):]))
    leading = in_shape[1:len(in_shape) - len(explicit)]
    return _size(leading) * _size(sizes.values())


def _weight_macs(layer, parent=None) -> dict:
    """``{weight key: multiply-accumulates}`` of one example's forward pass through ``layer``."""
    from nics_fix.layers import Conv2DTranspose, EinsumDense, SeparableConv2D

    in_shape, out_shape = _shapes(layer, parent)
    if out_shape is None:
        return {}
    if isinstance(layer, EinsumDense):
        return {"kernel": _einsum_macs(layer.equation, in_shape, tuple(layer.kernel.shape))}
    positions = _size(out_shape[1:-1])  # Dense: leading (sequence) dims; conv: output positions
    if isinstance(layer, SeparableConv2D):
        return {key: positions * _size(getattr(layer, key).shape) for key in ("depthwise_kernel", "pointwise_kernel")}
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
        return {}
    if isinstance(layer, Conv2DTranspose):  # every input position scatters a full kernel
        positions = _size(in_shape[1:-1])
    return {"kernel": positions * _size(kernel.shape)}


def _output_point(layer):
    """The point quantizing ``layer``'s output, if any (an attention layer's is its output projection's)."""
    points = getattr(layer, "fixed_points", None) or {}
    if "activation" in points:
        return points["activation"]
    output_dense = getattr(layer, "output_dense", None)
    return _output_point(output_dense) if output_dense is not None else None


_PROJECTIONS = ("query_dense", "key_dense", "value_dense", "output_dense")


def _attention_parent(model, layer):
    """The attention layer ``layer`` is a projection of, or None."""
    if layer._inbound_nodes:
        return None
    for parent in fixed_layers(model):
        if any(getattr(parent, name, None) is layer for name in _PROJECTIONS):
            return parent
    return None


def _input_bits(model, layer, parent=None) -> int:
    """Bits of the tensor feeding ``layer``: the nearest upstream quantized output.

    An attention projection is fed what feeds its attention layer (``parent``);
    the output projection is fed an unquantized product, counted as float.
    """
    if parent is not None:
        if layer is parent.output_dense:
            return FLOAT_BITS
        layer = parent
    node = layer._inbound_nodes[0] if layer._inbound_nodes else None
    while node is not None and node.input_tensors:
        source = node.input_tensors[0]._keras_history.operation
        point = _output_point(source)
        if point is not None:
            return data_bits(point.config.data)
        node = source._inbound_nodes[0] if getattr(source, "_inbound_nodes", None) else None
    return FLOAT_BITS


def bops(model, training: bool = False) -> int:
    """Bit-operations of one example's forward pass (plus backward when ``training``)."""
    total = 0
    for layer in fixed_layers(model):
        parent = _attention_parent(model, layer)
        weight_macs = _weight_macs(layer, parent)
        if not weight_macs:
            continue
        a_bits = _input_bits(model, layer, parent)
        out = layer.fixed_points.get("activation")
        g_bits = data_bits(out.config.gradient) if out else FLOAT_BITS
        for key, macs in weight_macs.items():
            weight = layer.fixed_points.get(key)
            w_bits = data_bits(weight.config.data) if weight else FLOAT_BITS
            total += macs * w_bits * a_bits
            if training:
                total += macs * g_bits * w_bits  # input gradient: dY x W
                total += macs * g_bits * a_bits  # weight gradient: X^T x dY
    return int(total)
