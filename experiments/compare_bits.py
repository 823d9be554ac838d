"""Fixed point at work after a train job: the trained weights evaluated at fewer bits.

The trained model is rebuilt with every weight and activation rounded to ``N``
bits (scales from ``max|x|`` of each tensor, ``not_training: auto``), its
weights copied over, and evaluated on the test set: a row per width beside the
trained model itself, the reference. Post-training rounding only: a model
*trained* at ``N`` bits (``fixed=w4a4``) usually does better than its row.

Example (``conf/train.yaml``)::

    compare_bits: [8, 4, 2]     # []: off
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from experiments.validate import TrainConfigError, check_value
from nics_fix.introspect import point_objects
from nics_fix.layer_types import layer_types


def check_compare_bits(value) -> list[int]:
    """``compare_bits`` as a list of widths 1..32 (a clear error naming the key otherwise)."""
    if value is None:
        return []
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TrainConfigError(f"compare_bits: expected a list of bit widths such as [8, 4, 2] ([] for none), "
                               f"got {value!r}")
    for width in value:
        check_value(width, "compare_bits[]", "int", 1, 32, error=TrainConfigError)
    return [int(w) for w in value]


def rounded_fixed_config(bits: int) -> dict:
    """A fixed config rounding every weight and activation to ``bits`` in training and evaluation."""
    point = {"data_config": {"bit_width": int(bits), "training": "auto", "not_training": "auto"}}
    return {"configs": {"rounded": {"weight": point, "activation": point}},
            "by_type": {name: "rounded" for name, has_points in layer_types().items() if has_points}}


def _learned_weights(model) -> list:
    """``model``'s weights without its quantization state (scales, dynamic counters).

    The state's shapes follow the config (a per-channel scale is a vector, a
    tensor scale a scalar), so it cannot be copied between configs; the rounded
    model finds its own scales from ``max|x|``.
    """
    state = {id(v) for point in point_objects(model) for v in point.state_variables}
    return [v for v in model.weights if id(v) not in state]


def compare_bits(model, rebuild, evaluate, widths: Sequence[int]) -> dict[int, float]:
    """``{bits: test accuracy}`` of ``model``'s weights rounded to each of ``widths`` (post-training).

    ``rebuild(fixed_config)`` builds the same architecture with another fixed
    config; ``evaluate(model)`` returns its test accuracy.
    """
    accuracies = {}
    for bits in widths:
        rounded = rebuild(rounded_fixed_config(bits))
        for target, source in zip(_learned_weights(rounded), _learned_weights(model), strict=True):
            target.assign(source)
        rounded.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        accuracies[int(bits)] = float(evaluate(rounded))
        del rounded
    return accuracies
