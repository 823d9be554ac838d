"""Bit-exactness guard for performance work on ``nics_fix/quant.py`` and ``nics_fix/point.py``.

Two checks, both in eager mode, in ``tf.function`` and in ``tf.function(jit_compile=True)``
(the reference check also eager and in ``tf.function`` with nics_fix's fused kernel off, so
both CPU paths are held to the reference; the fingerprint takes the default path):

1. ``fixed_point_quantize`` against a NumPy float64 reference,
   ``clip(rint(x / step) * step, -2**s, 2**s - step)`` (``floor`` for floor
   rounding), over random tensors (plus ties, range ends, +-0, subnormals,
   NaN, +-Inf), bit widths 2..16 and scales -10..10; and ``auto_scale`` against
   ``ceil(log2(max |finite x|))`` computed from the float64 exponent; the same
   with one scale per channel of the last axis, given and auto; and
   BatchNormalization's exact scale-and-shift evaluation.
2. A fingerprint: the exact bits of quantizer outputs (all rounding modes,
   seeded stochastic included, widths 1..32, extreme scales), ``auto_scale``,
   ``quantize_ste`` gradients, and the weights and stored scales of small MLP
   and CNN models (per-tensor and per-channel weight scales) after a few
   quantized training steps, with their predictions and losses: repeated,
   after ``set_weights`` and after more training (evaluation reuses quantized
   weights until they change). ``--save FILE`` writes
   it; ``--compare FILE`` reports every entry whose bits changed.

Usage (from the repository root)::

    python -m benchmarks.quant_exactness --save benchmarks/results/fingerprint_before.npz
    # ... change the quantizer ...
    python -m benchmarks.quant_exactness --compare benchmarks/results/fingerprint_before.npz

Exit status 1 if the reference check or the comparison fails.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

MODES = ("eager", "graph", "xla")
#: The reference check also runs these: eager and graph without nics_fix's fused kernel.
PLAIN_MODES = ("eager-plain", "graph-plain")


def _runner(mode):
    """``run(key, fn, *args)``: call ``fn`` eagerly, or as a ``tf.function`` cached under ``key``;
    ``*-plain`` modes run (and trace) with the fused kernel off."""
    import contextlib

    import tensorflow as tf

    from nics_fix import kernels

    cache = {}
    plain = mode.endswith("-plain")
    mode = mode.removesuffix("-plain")

    def run(key, fn, *args):
        with kernels.disabled() if plain else contextlib.nullcontext():
            if mode == "eager":
                return fn(*args)
            if key not in cache:
                cache[key] = tf.function(fn, jit_compile=(mode == "xla"))
            return cache[key](*args)

    return run


def _test_tensors(rng) -> list[np.ndarray]:
    """Random float32 tensors with the awkward values mixed in."""
    out = []
    for exp in (-14, -6, -2, 0, 3, 8, 12):
        x = rng.standard_normal(4099).astype(np.float32) * np.float32(2.0 ** exp)
        out.append(x)
    x = rng.uniform(-2000, 2000, size=(37, 53)).astype(np.float32)
    out.append(x)
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45, 1e-40, 3.4e38, -3.4e38],
                       dtype=np.float32)
    x = rng.standard_normal(1031).astype(np.float32)
    x[rng.choice(x.size, special.size, replace=False)] = special
    out.append(x)
    return out


def _grid_values(bit_width: int, scale: int, rng) -> np.ndarray:
    """Exact ties, range ends and points just beside them, for one format."""
    step = 2.0 ** (scale - bit_width + 1)
    k = rng.integers(-(2 ** (bit_width - 1)) - 3, 2 ** (bit_width - 1) + 3, size=600)
    half = (k + 0.5) * step
    ends = np.array([-(2.0 ** scale), 2.0 ** scale - step, 2.0 ** scale, -(2.0 ** scale) - step,
                     2.0 ** scale - step / 2, -(2.0 ** scale) - step / 2])
    vals = np.concatenate([k * step, half, ends, np.nextafter(half, np.inf), np.nextafter(half, -np.inf)])
    return vals.astype(np.float32)


def reference_quantize(x: np.ndarray, bit_width: int, scale: int, rounding: str) -> np.ndarray:
    x64 = x.astype(np.float64)
    step = 2.0 ** (scale - bit_width + 1)
    q = np.rint(x64 / step) if rounding == "nearest" else np.floor(x64 / step)
    with np.errstate(invalid="ignore"):
        return np.clip(q * step, -(2.0 ** scale), 2.0 ** scale - step).astype(np.float32)


def reference_auto_scale(x: np.ndarray) -> int:
    from nics_fix.quant import MAX_SCALE, MIN_SCALE

    a = np.abs(x[np.isfinite(x)].astype(np.float64))
    m = a.max() if a.size else 0.0
    if m == 0.0:
        return MIN_SCALE
    mant, exp = np.frexp(m)  # m = mant * 2**exp, mant in [0.5, 1)
    scale = exp - 1 if mant == 0.5 else exp
    return int(np.clip(scale, MIN_SCALE, MAX_SCALE))


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def check_reference(seed: int = 0, modes=MODES + PLAIN_MODES, verbose: bool = True) -> int:
    """Return the number of failures of the NumPy reference check."""
    import tensorflow as tf

    from nics_fix.quant import auto_scale, fixed_point_quantize

    rng = np.random.default_rng(seed)
    tensors = _test_tensors(rng)
    failures = 0
    for mode in modes:
        run = _runner(mode)
        n = 0
        for bit_width in range(2, 17):
            for scale in range(-10, 11):
                xs = tensors[::3] + [_grid_values(bit_width, scale, rng)]
                x = np.concatenate([t.ravel() for t in xs])
                for rounding in ("nearest", "floor"):
                    def fn(t, s, bw=bit_width, r=rounding):
                        return fixed_point_quantize(t, bw, s, r)

                    # the scale as a tensor, as the points pass it
                    got = run((bit_width, rounding, x.size), fn, tf.constant(x),
                              tf.constant(scale, tf.int32)).numpy()
                    want = reference_quantize(x, bit_width, scale, rounding)
                    if not _same_bits(got, want):
                        failures += 1
                        bad = np.flatnonzero(got.view(np.int32) != want.view(np.int32))[:5]
                        print(f"  FAIL quantize {mode} w={bit_width} s={scale} {rounding}: "
                              f"x={x[bad]} got={got[bad]} want={want[bad]}")
                    n += 1
        for t in tensors + [np.zeros(7, np.float32), np.array([np.nan, np.inf], np.float32),
                            np.array([1e-42, -3e-41], np.float32), np.array([-0.0], np.float32),
                            np.array([0.5, -1.0], np.float32), np.array([3.0e38], np.float32)]:
            got = int(run(("auto", t.shape), auto_scale, tf.constant(t)).numpy())
            want = reference_auto_scale(t)
            if got != want:
                failures += 1
                print(f"  FAIL auto_scale {mode}: got {got} want {want}")
            n += 1
        failures += _check_channels(run, mode, rng)
        failures += _check_batch_norm(run, mode, rng)
        n += 3 * len(CHANNEL_BITS)
        if verbose:
            print(f"reference check [{mode}]: {n} cases, {failures} failures so far")
    return failures


CHANNEL_BITS = (2, 4, 8, 16, 24)


def _check_batch_norm(run, mode: str, rng) -> int:
    """BatchNormalization's evaluation (the fused scale-and-shift kernel's case) against
    NumPy: t = float64(x) * a + c, its auto scale from float32(t), quantized in float64."""
    import tensorflow as tf

    import nics_fix as nf

    x = (rng.standard_normal((9, 5, 5, 13)) * 3).astype(np.float32)
    x.reshape(-1)[rng.choice(x.size, 4, replace=False)] = [np.nan, np.inf, -0.0, 1e30]
    failures = 0
    for bit_width in CHANNEL_BITS:
        config = {"weight": {"data_config": {"bit_width": 8, "training": "auto", "not_training": "auto"}},
                  "activation": {"data_config": {"bit_width": bit_width, "training": "auto",
                                                 "not_training": "auto"}}}
        bn = nf.BatchNormalization(fixed_config=config)
        bn.build(x.shape)
        for variable, value in ((bn.gamma, rng.uniform(-2, 2, 13)), (bn.beta, rng.standard_normal(13)),
                                (bn.moving_mean, rng.standard_normal(13)),
                                (bn.moving_variance, rng.uniform(0.05, 20, 13))):
            variable.assign(value.astype(np.float32))
        (a, _, _), (c, _, _) = bn.scale_and_shift()
        t = x.astype(np.float64) * a.numpy().astype(np.float64) + c.numpy().astype(np.float64)
        want = reference_quantize(t, bit_width, reference_auto_scale(t.astype(np.float32)), "nearest")
        got = run(("bn", bit_width), lambda v, layer=bn: layer(v, training=False), tf.constant(x)).numpy()
        if not _same_bits(got, want):
            failures += 1
            print(f"  FAIL batch-normalization evaluation {mode} w={bit_width}")
    return failures


def _check_channels(run, mode: str, rng) -> int:
    """One scale per channel of the last axis (the per-channel kernel's case): given scales,
    and auto scales with the quantize, each against the NumPy reference per column."""
    import tensorflow as tf

    from nics_fix.quant import ScaleGroups, _auto_quantize, fixed_point_quantize

    x = (rng.standard_normal((67, 45)) * 2.0 ** rng.integers(-12, 12, size=45)).astype(np.float32)
    x.reshape(-1)[rng.choice(x.size, 6, replace=False)] = [np.nan, np.inf, -np.inf, -0.0, 1e-40, 3.0e38]
    given = rng.integers(-10, 11, size=(1, 45)).astype(np.int32)
    columns = np.array([[reference_auto_scale(x[:, c]) for c in range(x.shape[1])]], np.int32)
    groups = ScaleGroups.for_tensor(x.shape, -1)
    failures = 0
    for bit_width in CHANNEL_BITS:
        got = run(("channels", bit_width), lambda t, s, bw=bit_width: fixed_point_quantize(t, bw, s),
                  tf.constant(x), tf.constant(given)).numpy()
        if not _same_bits(got, reference_quantize(x, bit_width, given, "nearest")):
            failures += 1
            print(f"  FAIL per-channel quantize {mode} w={bit_width}")
        y, scales, _ = run(("channels_auto", bit_width),
                           lambda t, bw=bit_width: _auto_quantize(t, bw, "nearest", groups=groups),
                           tf.constant(x))
        if not (np.array_equal(scales.numpy(), columns)
                and _same_bits(y.numpy(), reference_quantize(x, bit_width, columns, "nearest"))):
            failures += 1
            print(f"  FAIL per-channel auto scale {mode} w={bit_width}")
    return failures


def fingerprint(seed: int = 0) -> dict[str, np.ndarray]:
    """Bits of everything the quantizer produces, keyed by a readable name."""
    import keras
    import tensorflow as tf

    import nics_fix as nf
    from nics_fix.quant import (MAX_SCALE, MIN_SCALE, auto_scale, fixed_point_quantize,
                                quantization_step, quantize_ste, representable_range)

    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    tensors = _test_tensors(rng)
    x_all = np.concatenate([t.ravel() for t in tensors])
    dy = rng.standard_normal(x_all.size).astype(np.float32)
    dy[::97] = -0.0
    dy[::101] = np.nan
    dy[::103] = -np.inf
    for mode in MODES:
        run = _runner(mode)
        for bit_width in (1, 2, 3, 4, 5, 8, 12, 16, 23, 24, 25, 31, 32):
            for scale in (MIN_SCALE - 5, MIN_SCALE, -60, -20, -3, 0, 1, 5, 17, 40, MAX_SCALE, MAX_SCALE + 3):
                for rounding in ("nearest", "floor", "stochastic"):
                    seed_arg = 7 if rounding == "stochastic" else None

                    def fn(t, s, bw=bit_width, r=rounding, sd=seed_arg):
                        return fixed_point_quantize(t, bw, s, r, sd)

                    key = f"{mode}/q/w{bit_width}/s{scale}/{rounding}"
                    out[key] = run((bit_width, rounding), fn, tf.constant(x_all),
                                   tf.constant(scale, tf.int32)).numpy()
            out[f"{mode}/step/w{bit_width}"] = np.array(
                [quantization_step(bit_width, s).numpy() for s in (-100, -3, 0, 7, 130)])
            out[f"{mode}/range/w{bit_width}"] = np.array(
                [[v.numpy() for v in representable_range(bit_width, s)] for s in (-100, -3, 0, 7, 130)])
        # a tensor seed, and a Python-int scale
        out[f"{mode}/q/stochastic_tensor_seed"] = run(
            "sts", lambda t: fixed_point_quantize(t, 8, 3, "stochastic", tf.constant([3, 4], tf.int64)),
            tf.constant(x_all)).numpy()
        out[f"{mode}/q/int_scale"] = run(
            "int_scale", lambda t: fixed_point_quantize(t, 6, -2), tf.constant(x_all)).numpy()
        out[f"{mode}/q/float64_input"] = run(
            "f64", lambda t: fixed_point_quantize(t, 8, 2), tf.constant(x_all.astype(np.float64))).numpy()
        for i, t in enumerate(tensors + [np.zeros(5, np.float32), np.full(3, np.nan, np.float32),
                                         np.array([np.inf, 2.0], np.float32)]):
            out[f"{mode}/auto_scale/{i}"] = np.array(
                run(("auto", t.shape), auto_scale, tf.constant(t)).numpy())
        out[f"{mode}/auto_scale/float64"] = np.array(
            run("auto64", auto_scale, tf.constant(x_all[:100].astype(np.float64))).numpy())
        # STE gradients (nearest and floor, tensor and int scales)
        for bit_width, scale, rounding in ((8, 2, "nearest"), (4, 0, "floor"), (16, 9, "nearest"),
                                           (1, 1, "nearest"), (32, 3, "nearest")):
            def ste(t, g, bw=bit_width, s=scale, r=rounding):
                with tf.GradientTape() as tape:
                    tape.watch(t)
                    y = quantize_ste(t, bw, tf.constant(s, tf.int32), r)
                return y, tape.gradient(y, t, output_gradients=g)

            y, g = run(("ste", bit_width, scale, rounding), ste, tf.constant(x_all), tf.constant(dy))
            out[f"{mode}/ste/w{bit_width}/s{scale}/{rounding}/y"] = y.numpy()
            out[f"{mode}/ste/w{bit_width}/s{scale}/{rounding}/grad"] = g.numpy()

    # Whole models: weights and stored scales after a few quantized steps.
    cfg = {
        "weight": {"data_config": {"bit_width": 8, "training": "auto", "not_training": "auto"},
                   "gradient_config": {"bit_width": 8, "training": "auto"}},
        "activation": {"data_config": {"bit_width": 8, "training": "auto", "not_training": "auto"},
                       "gradient_config": {"bit_width": 8, "training": "auto"}},
    }
    cfg_mixed = {
        "weight": {"data_config": {"bit_width": 6, "training": 1, "not_training": "fixed",
                                   "rounding": "floor"},
                   "gradient_config": {"bit_width": 10, "training": "auto", "rounding": "floor"}},
        "activation": {"data_config": {"bit_width": 8, "training": "auto", "not_training": "fixed"},
                       "gradient_config": {"bit_width": 8, "training": -4}},
    }
    # few bits with auto scales: the top step of the range is often hit, so
    # elements get clipped and the STE mask is not all ones
    cfg_low = {
        "weight": {"data_config": {"bit_width": 3, "training": "auto", "not_training": "auto"},
                   "gradient_config": {"bit_width": 4, "training": "auto"}},
        "activation": {"data_config": {"bit_width": 2, "training": "auto", "not_training": "auto"},
                       "gradient_config": {"bit_width": 4, "training": "auto", "rounding": "floor"}},
    }
    # per-channel weight scales, evaluation with the stored scales
    cfg_channel = {
        "weight": {"data_config": {"bit_width": 8, "training": "auto", "not_training": "fixed",
                                   "granularity": "channel"},
                   "gradient_config": {"bit_width": 8, "training": "auto"}},
        "activation": cfg["activation"],
    }
    xm = rng.standard_normal((64, 784)).astype(np.float32)
    ym = rng.integers(0, 10, 64)
    xc = rng.standard_normal((16, 32, 32, 3)).astype(np.float32)
    yc = rng.integers(0, 10, 16)
    for name, config in (("auto8", cfg), ("mixed", cfg_mixed), ("low", cfg_low), ("channel", cfg_channel)):
        for model_name in ("mlp", "cnn"):
            for jit in (False, True):
                keras.backend.clear_session()
                keras.utils.set_random_seed(seed)
                with nf.fixed_scope("fp", {"by_type": {"Dense": config, "Conv2D": config}}):
                    if model_name == "mlp":
                        model = keras.Sequential([keras.Input((784,)), nf.Dense(64, activation="relu"),
                                                  nf.Dense(10)])
                        x, y = xm, ym
                    else:
                        model = keras.Sequential([keras.Input((32, 32, 3)), nf.Conv2D(8, 3, activation="relu"),
                                                  nf.Conv2D(8, 3, activation="relu"), nf.MaxPooling2D(),
                                                  nf.Flatten(), nf.Dense(10)])
                        x, y = xc, yc
                model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                              jit_compile=jit)
                prefix = f"model/{name}/{model_name}/{'xla' if jit else 'graph'}"
                for step in range(3):
                    model.train_on_batch(x, y)
                out[f"{prefix}/pred"] = model.predict_on_batch(x)
                # evaluation again (weights unchanged), after a write, after more training
                out[f"{prefix}/pred_again"] = model.predict_on_batch(x)
                out[f"{prefix}/eval_loss"] = np.array(model.test_on_batch(x, y))
                model.set_weights([w * np.float32(0.5) if w.dtype == np.float32 else w
                                   for w in model.get_weights()])
                out[f"{prefix}/pred_after_set_weights"] = model.predict_on_batch(x)
                model.train_on_batch(x, y)
                out[f"{prefix}/pred_after_training"] = model.predict_on_batch(x)
                for v in model.weights:
                    out[f"{prefix}/{v.path}"] = keras.ops.convert_to_numpy(v)
    return out


def compare(saved: dict, now: dict) -> int:
    bad = 0
    for key in sorted(set(saved) | set(now)):
        if key not in now or key not in saved:
            print(f"  MISSING {key} ({'before' if key in saved else 'now'} only)")
            bad += 1
        elif not _same_bits(saved[key], now[key]):
            a, b = np.asarray(saved[key]), np.asarray(now[key])
            n = int(np.sum(a.view(np.uint8) != b.view(np.uint8))) if a.shape == b.shape else -1
            print(f"  CHANGED {key}: {n} differing bytes")
            bad += 1
    print(f"fingerprint: {len(now)} entries compared, {bad} differ")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", help="write the fingerprint to this .npz file")
    parser.add_argument("--compare", help="compare the fingerprint with this .npz file")
    parser.add_argument("--no-reference", action="store_true", help="skip the NumPy reference check")
    args = parser.parse_args(argv)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # the many small tf.functions retrace on purpose
    from nics_fix import kernels

    print(f"fused quantize kernel: {kernels.status()}")
    failures = 0 if args.no_reference else check_reference()
    if args.save or args.compare:
        fp = fingerprint()
        if args.save:
            os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
            np.savez_compressed(args.save, **fp)
            print(f"fingerprint: {len(fp)} entries written to {args.save}")
        if args.compare:
            with np.load(args.compare) as saved:
                failures += compare(dict(saved), fp)
    print("OK" if failures == 0 else f"FAILED ({failures})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
