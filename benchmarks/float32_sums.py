"""Does the fast simulation misstate the hardware? Float32 sums against exact integer sums.

For a saved model (an MLflow run's ``fixed_model`` or a folder), on its test
split, in evaluation mode: per summing layer (Dense, Conv2D, DepthwiseConv2D)
the fraction of pre-activation sums that float32 rounds (the simulator's sum
differs from the exact one computed in float64 from the same quantized
operands), and the fraction of the layer's *outputs* (after its output point)
that change. Then the model's test accuracy in the simulator against the
integer engine, which never rounds a sum, and how many of the model's outputs
differ. ``--speed`` times the ways to make a sum exact (float64, integer,
split operands) against float32.

Usage (from the repository root)::

    python -m benchmarks.float32_sums --run-id <id>          # or --model-path outputs/.../fixed_model
    python -m benchmarks.float32_sums --speed                # exact-sum candidates, timed

Needs the platform extra (it restores the model with ``experiments.evaluation``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import nics_fix as nf  # noqa: E402
from nics_fix.accumulator import SUMMING, keras_type  # noqa: E402
from nics_fix.layers.base import _keras_base  # noqa: E402


def _sums(layer, x, dtype):
    """The layer's pre-activation sums with its quantized weights, computed in ``dtype``."""
    substitutes = {key: tf.cast(point(getattr(layer, key), False), dtype)
                   for key, point in layer.fixed_points.items() if key != "activation"}
    object.__setattr__(layer, "_nf_substitutes", substitutes)
    try:
        return _keras_base(type(layer)).call(layer, tf.cast(x, dtype)).numpy()
    finally:
        object.__setattr__(layer, "_nf_substitutes", None)


def layer_report(model, x, batch_size=500) -> dict:
    out = {}
    for layer in model.layers:
        if keras_type(layer) not in SUMMING:
            continue
        feeder = keras.Model(model.inputs, layer.input)
        point = layer.fixed_points.get("activation")
        rounded = changed = total = 0
        for i in range(0, len(x), batch_size):
            inputs = feeder.predict(x[i:i + batch_size], verbose=0)
            single, exact = _sums(layer, inputs, tf.float32), _sums(layer, inputs, tf.float64)
            rounded += int(np.sum(single.astype(np.float64) != exact))
            total += single.size
            if point is not None:
                changed += int(np.sum(np.asarray(point(single, False)) != np.asarray(point(exact, False))))
        out[layer.name] = {"sums": total, "rounded_in_float32": rounded / total,
                           "outputs_changed": changed / total,
                           **{k: v for k, v in nf.sum_exactness(model)[layer.name].items()
                              if k in ("fan_in", "sum_bits")}}
    return out


def matmul_speed(rounds=15, batch=256, fan_in=784, units=512) -> dict:
    """Median time of one Dense-sized product, interleaved: float32 (rounds), float64 (the
    accumulator's exact path), int64 and int32 (TensorFlow's integer matmul; int32 is not
    exact past 31 bits) and two float32 products of a split kernel (exact only while each
    half's sums fit 24 bits; 16-bit operands need more splits). Conv2D has no CPU integer kernel."""
    rng = np.random.default_rng(0)
    xi, wi = rng.integers(-128, 128, (batch, fan_in)), rng.integers(-128, 128, (fan_in, units))
    floats = (tf.constant(xi / 128, tf.float32), tf.constant(wi / 128, tf.float32))
    split = lambda x, w: (tf.cast(tf.matmul(x, tf.floor(w * 8) / 8), tf.float64)  # noqa: E731
                          + tf.cast(tf.matmul(x, w - tf.floor(w * 8) / 8), tf.float64))
    candidates = {  # operands are arguments, so nothing is constant-folded
        "float32": (tf.matmul, floats),
        "float64": (lambda x, w: tf.matmul(tf.cast(x, tf.float64), tf.cast(w, tf.float64)), floats),
        "int64": (tf.matmul, (tf.constant(xi, tf.int64), tf.constant(wi, tf.int64))),
        "int32": (tf.matmul, (tf.constant(xi, tf.int32), tf.constant(wi, tf.int32))),
        "split 2 x float32": (split, floats),
    }
    functions = {name: (tf.function(fn), args) for name, (fn, args) in candidates.items()}
    timings = {name: [] for name in functions}
    for fn, args in functions.values():
        fn(*args)  # trace
    for _ in range(rounds):
        for name, (fn, args) in functions.items():
            start = time.perf_counter()
            fn(*args).numpy()
            timings[name].append(time.perf_counter() - start)
    return {name: float(np.median(v)) for name, v in timings.items()}


def report(cfg) -> None:
    from experiments.evaluation import locate, restore
    from experiments.integer import evaluate_integer, float_model_bytes

    with tempfile.TemporaryDirectory() as tmp:
        folder, _, _ = locate(cfg, tmp)
        model, data, _ = restore(folder)
        for name, row in layer_report(model, data.x_test).items():
            print(f"{name}: fan-in {row['fan_in']}, sum bound {row['sum_bits']} bits, "
                  f"{100 * row['rounded_in_float32']:.2f}% of {row['sums']} sums rounded in float32, "
                  f"{100 * row['outputs_changed']:.3f}% of its outputs changed")
        simulated = model.predict(data.x_test, batch_size=500, verbose=0)
        sim_acc = float(np.mean(np.argmax(simulated, -1) == data.y_test))
        integer = evaluate_integer(model, data, None, Path(tmp) / "integer_model")
        graph_bytes = sum(f.stat().st_size for f in (Path(tmp) / "integer_model").glob("*.bin"))
        print(f"test accuracy: simulator {sim_acc:.4f}, integer engine {integer['integer_test_accuracy']:.4f}; "
              f"{integer['integer_outputs'] - integer['integer_identical_outputs']} of "
              f"{integer['integer_outputs']} outputs differ")
        print(f"size: integer arrays {graph_bytes} bytes, float weights {float_model_bytes(model)} bytes")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-id")
    parser.add_argument("--model-path")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--speed", action="store_true")
    args = parser.parse_args(argv)

    if args.run_id or args.model_path:
        report({"run_id": args.run_id, "model_path": args.model_path,
                "mlflow": {"tracking_uri": args.tracking_uri}})
    if args.speed:
        times = matmul_speed()
        print("256 x 784 @ 784 x 512, median ms: " + ", ".join(
            f"{name} {1e3 * t:.1f} ({t / times['float32']:.2f}x)" for name, t in times.items()))


if __name__ == "__main__":
    main()
