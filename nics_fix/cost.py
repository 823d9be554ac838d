"""Cost model of a fixed-point model: weight bits (model size) and bit-operations.

Float values count as 32 bits. ``weight_bits`` sums, over every weight point,
(number of elements) × (its data bit width), plus :data:`SCALE_BITS` for each
scale of a per-channel or per-block point (an 8-bit exponent per block of 32
values adds 0.25 bits per weight; one scale per tensor is not counted, as
before scales had shapes); ``bops`` sums, over every
Dense/Conv layer, MACs × (weight bits) × (input activation bits) for the
forward pass, and adds the two backward GEMMs (input gradient and weight
gradient, each as many MACs as the forward) with the gradient bit widths for
``bops(..., training=True)``.

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


def _macs(layer) -> int:
    """Multiply-accumulates of one forward pass of ``layer`` for one example."""
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
        return 0
    out_shape = layer.output.shape if hasattr(layer, "_inbound_nodes") and layer._inbound_nodes else None
    if out_shape is None:
        return 0
    kernel_shape = tuple(kernel.shape)
    if len(kernel_shape) == 2:  # Dense: in x out
        return int(math.prod(kernel_shape))
    # Conv: output positions x kh x kw x cin x cout (depthwise: x multiplier).
    spatial = math.prod(d for d in out_shape[1:-1] if d is not None)
    return int(spatial * math.prod(kernel_shape))


def _input_bits(model, layer) -> int:
    """Bits of the tensor feeding ``layer``: the nearest upstream quantized output."""
    node = layer._inbound_nodes[0] if layer._inbound_nodes else None
    while node is not None and node.input_tensors:
        source = node.input_tensors[0]._keras_history.operation
        points = getattr(source, "fixed_points", None)
        if points and "activation" in points:
            return data_bits(points["activation"].config.data)
        node = source._inbound_nodes[0] if getattr(source, "_inbound_nodes", None) else None
    return FLOAT_BITS


def bops(model, training: bool = False) -> int:
    """Bit-operations of one example's forward pass (plus backward when ``training``)."""
    total = 0
    for layer in fixed_layers(model):
        macs = _macs(layer)
        if not macs:
            continue
        weight = layer.fixed_points.get("kernel")
        w_bits = data_bits(weight.config.data) if weight else FLOAT_BITS
        a_bits = _input_bits(model, layer)
        total += macs * w_bits * a_bits
        if training:
            out = layer.fixed_points.get("activation")
            g_bits = data_bits(out.config.gradient) if out else FLOAT_BITS
            total += macs * g_bits * w_bits  # input gradient: dY x W
            total += macs * g_bits * a_bits  # weight gradient: X^T x dY
    return int(total)
