"""Train-step and eval-step time of quantized vs float models, measured side by side.

Run from the repository root::

    python -m benchmarks.train_step                 # full run, ~10 min on 2 idle CPU cores
    python -m benchmarks.train_step --models mlp --xla off --reps 5   # quick look
    python -m benchmarks.train_step --mlflow        # also log to MLflow (sqlite:///mlflow.db)

For each model (an MLP 784-512-512-10 at batch 128, a CNN
conv32-pool-conv64-pool-dense10 on 32x32x3 at batch 64, the zoo's ResNet-20
converted by ``nf.fixed_model`` at batch 64) and each XLA setting
(``--xla off,on``), models with the same initial weights are built and
compiled: ``float`` (plain Keras layers from nics_fix with no config),
``quant`` (weights, activations and both gradients at 8 bits with ``auto``
scales) and ``channel`` (as quant, weight scales per output channel; its
``vs q`` column compares it with ``quant``); ``--variants`` adds ``wa``
(weights and activations only, float gradients) and others. Their compiled train and test functions are called on
one fixed in-memory batch through ``train_on_batch``/``test_on_batch`` (no
``fit``: ``fit`` on NumPy input stalls for seconds at random epochs on small
machines). The layers are written the standard Keras way
(``Dense(512, activation="relu")``, no separate ReLU layers).

Timing protocol, made for a noisy machine: after warm-up, each repetition
times ``--steps`` consecutive steps of every variant, one variant after the
other in a rotating order (A B C, B C A, ...), so slow phases of the machine
hit all variants alike. The ratio quantized/float is taken *within* each
repetition; the table shows the median over repetitions and the IQR of those
per-repetition ratios (``best`` compares the fastest repetitions, which
other load on the machine disturbs least; ``cpu`` is the median ratio of
process CPU time, i.e. of the work done, the steadiest column when other
jobs share the cores). The whole measurement is done ``--rounds`` times (2
by default) and the median ratio of each round is printed, so the table
says itself how reproducible it is.

Results go to ``benchmarks/results/train_step-<tag>.{csv,json}`` (gitignored),
with the TensorFlow/Keras versions, thread settings and per-repetition times.

Scale granularity: ``--variants quant,channel`` adds per-channel weight scales
(``chall``: every scale per channel, ``block32``: every scale per block of 32;
``plain``: as quant, without nics_fix's fused quantize kernel);
the ``vs q`` column is the median per-repetition time ratio against ``quant``
(per-tensor scales), e.g.::

    python -m benchmarks.train_step --models mlp,cnn --xla off --variants quant,channel,block32 --phases train
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

BITS = 8


def quant_config(gradients: bool, bits: int = BITS, not_training: str = "auto", scales: dict | None = None,
                 weight_scales: dict | None = None) -> dict:
    """The layer config: weights and activations at ``bits``, gradients too if asked.

    ``scales``: scale fields (``granularity``, ``block_size``) for every point;
    ``weight_scales``: for the weight data only.
    """
    data = {"bit_width": bits, "training": "auto", "not_training": not_training, **(scales or {})}
    point = {"data_config": dict(data)}
    if gradients:
        point["gradient_config"] = {"bit_width": bits, "training": "auto", **(scales or {})}
    config = {"weight": point, "activation": {k: dict(v) for k, v in point.items()}}
    config["weight"]["data_config"].update(weight_scales or {})
    return config


VARIANTS = {
    # name: (description, layer config or None for float)
    "float": ("plain float (nics_fix layers, no config)", None),
    "quant": ("W, A, dW, dA at 8 bits, auto scales", quant_config(True)),
    "wa": ("W and A at 8 bits (float gradients)", quant_config(False)),
    # not in the default set: quant traced without nics_fix's fused kernel (what it saves: "vs q")
    "plain": ("as quant, on plain TensorFlow ops (fused kernel off)", quant_config(True)),
    # not in the default set: evaluation with the stored (``fixed``) scales
    "qfixed": ("as quant, but evaluation uses the stored scales", quant_config(True, not_training="fixed")),
    # scale granularity (not in the default set): compare with quant in the "vs quant" column
    "channel": ("as quant, weight scales per output channel",
                quant_config(True, weight_scales={"granularity": "channel"})),
    "chall": ("as quant, every scale per channel", quant_config(True, scales={"granularity": "channel"})),
    "block32": ("as quant, every scale per block of 32 (MXINT8-like)",
                quant_config(True, scales={"granularity": "block", "block_size": 32})),
}

MODELS = {
    "mlp": "MLP 784-512-512-10, batch 128",
    "cnn": "CNN conv3x3(32)-maxpool2-conv3x3(64)-maxpool2-dense(10) on 32x32x3, batch 64",
    "resnet20": "the zoo's ResNet-20 (Keras, nf.fixed_model; Conv2D, BN, ReLU, Dense quantized) on 32x32x3, batch 64",
}


# A CNN train step is ~25x an MLP one on 2 cores: fewer, shorter repetitions keep
# a full run under ~5 minutes.
DEFAULT_REPS = {"mlp": 12, "cnn": 8, "resnet20": 5}
DEFAULT_STEPS = {"mlp": 15, "cnn": 2, "resnet20": 2}


def build_model(kind: str, variant: str, jit_compile: bool, seed: int = 0):
    import keras

    import nics_fix as nf

    keras.utils.set_random_seed(seed)  # same initial weights for every variant
    config = VARIANTS[variant][1]
    fixed = {"by_type": {"Dense": config, "Conv2D": config}} if config else None
    if kind == "resnet20":
        from experiments.models import build_model as zoo_model

        types = ("Dense", "Conv2D", "BatchNormalization", "ReLU")
        fixed = {"by_type": {t: config for t in types}} if config else None
        model, _ = zoo_model({"name": "resnet20"}, (32, 32, 3), 10, fixed)
        return _compiled(model, jit_compile)
    with nf.fixed_scope(f"bench_{variant}", fixed):
        if kind == "mlp":
            layers = [keras.Input((784,)), nf.Dense(512, activation="relu"),
                      nf.Dense(512, activation="relu"), nf.Dense(10)]
        elif kind == "cnn":
            layers = [keras.Input((32, 32, 3)), nf.Conv2D(32, 3, activation="relu"), nf.MaxPooling2D(),
                      nf.Conv2D(64, 3, activation="relu"), nf.MaxPooling2D(), nf.Flatten(),
                      nf.Dense(10)]
        else:
            raise ValueError(f"unknown model {kind!r}")
        model = keras.Sequential(layers, name=f"{kind}_{variant}")
    return _compiled(model, jit_compile)


def _compiled(model, jit_compile: bool):
    import keras

    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    return model


def batch(kind: str, seed: int = 0):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    if kind == "mlp":
        x = rng.standard_normal((128, 784)).astype(np.float32)
        y = rng.integers(0, 10, 128)
    else:
        x = rng.standard_normal((64, 32, 32, 3)).astype(np.float32)
        y = rng.integers(0, 10, 64)
    return tf.constant(x), tf.constant(y, tf.int64)


class Stepper:
    """One model trained and evaluated on a fixed batch, as users call it: ``train_on_batch``
    and ``test_on_batch`` (each returns the loss to the host, so a step's work is done)."""

    def __init__(self, model, x, y):
        self.model = model
        self.x, self.y = x, y
        model.train_on_batch(x, y)  # builds, traces and compiles the train function
        model.test_on_batch(x, y)  # ... and the test function
        self.fns = {"train": model.train_on_batch, "eval": model.test_on_batch}

    def time(self, phase: str, steps: int) -> tuple[float, float]:
        """Wall and process CPU seconds per step over ``steps`` consecutive calls."""
        fn, x, y = self.fns[phase], self.x, self.y
        cpu = time.process_time()
        start = time.perf_counter()
        for _ in range(steps):
            fn(x, y)
        return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def _quantiles(values):
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return float(q25), float(q50), float(q75)


def measure(kind: str, jit: bool, variants: list[str], phases: list[str], reps: int, steps: int,
            warmup: int, rounds: int, log=print) -> list[dict]:
    """Rows (one per variant and phase, float included) with per-repetition times."""
    x, y = batch(kind)
    t0 = time.perf_counter()
    from nics_fix import kernels

    steppers = {}
    for v in ["float"] + variants:
        with kernels.disabled() if v == "plain" else contextlib.nullcontext():
            steppers[v] = Stepper(build_model(kind, v, jit), x, y)  # traced here
    log(f"  built and compiled {len(steppers)} models in {time.perf_counter() - t0:.1f} s")
    names = list(steppers)
    rows = []
    for phase in phases:
        for _ in range(warmup):
            for name in names:
                steppers[name].time(phase, steps)
        times = {name: [[] for _ in range(rounds)] for name in names}
        cpu = {name: [] for name in names}
        for r in range(rounds):
            for rep in range(reps):
                k = rep % len(names)
                for name in names[k:] + names[:k]:  # rotating order
                    wall_s, cpu_s = steppers[name].time(phase, steps)
                    times[name][r].append(wall_s)
                    cpu[name].append(cpu_s)
        for name in names:
            flat_f = np.concatenate(times["float"])
            flat_v = np.concatenate(times[name])
            cpu_f, cpu_v = np.array(cpu["float"]), np.array(cpu[name])
            ratios = flat_v / flat_f  # per repetition: same rep, same machine state
            q25, med, q75 = _quantiles(ratios)
            round_medians = [float(np.median(np.array(times[name][r]) / np.array(times["float"][r])))
                             for r in range(rounds)]
            # per repetition against the per-tensor quantized model, where it runs too
            vs_quant = (float(np.median(flat_v / np.concatenate(times["quant"])))
                        if "quant" in times else None)
            rows.append({
                "model": kind, "variant": name, "xla": jit, "phase": phase, "ratio_vs_quant": vs_quant,
                "float_ms": float(np.median(flat_f) * 1e3), "quant_ms": float(np.median(flat_v) * 1e3),
                "ratio": med, "ratio_q25": q25, "ratio_q75": q75, "ratio_iqr": q75 - q25,
                # fastest repetition of each: less sensitive to other load on the machine
                "ratio_best": float(flat_v.min() / flat_f.min()),
                # process CPU time (all threads): the work done, whatever else runs
                "ratio_cpu": float(np.median(cpu_v / cpu_f)),
                "float_cpu_ms": float(np.median(cpu_f) * 1e3), "quant_cpu_ms": float(np.median(cpu_v) * 1e3),
                "round_ratios": round_medians,
                "round_spread": float(max(round_medians) - min(round_medians)),
                "reps": reps, "steps": steps, "rounds": rounds,
                "times_ms": [[t * 1e3 for t in rt] for rt in times[name]],
                "cpu_times_ms": [t * 1e3 for t in cpu[name]],
            })
    return rows


def environment() -> dict:
    import keras
    import tensorflow as tf

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - git is optional
            return ""

    return {
        "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "threads_note": "0 means TensorFlow's default (one pool sized to the cores)",
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--", "nics_fix")),
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
    }


COLUMNS = ["model", "variant", "xla", "phase", "float_ms", "quant_ms", "ratio", "ratio_iqr",
           "ratio_best", "ratio_cpu", "round_ratios", "round_spread", "ratio_vs_quant"]


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':5} {'variant':7} {'xla':3} {'phase':5} {'float ms':>9} {'quant ms':>9} "
            f"{'ratio':>6} {'IQR':>6} {'best':>6} {'cpu':>6} {'vs q':>6}  per-round medians")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["variant"] == "float":
            continue
        rounds = " ".join(f"{v:.3f}" for v in r["round_ratios"])
        lines.append(f"{r['model']:5} {r['variant']:7} {'on' if r['xla'] else 'off':3} {r['phase']:5} "
                     f"{r['float_ms']:9.2f} {r['quant_ms']:9.2f} {r['ratio']:6.3f} {r['ratio_iqr']:6.3f} "
                     f"{r['ratio_best']:6.3f} {r['ratio_cpu']:6.3f} "
                     f"{'' if r['ratio_vs_quant'] is None else format(r['ratio_vs_quant'], '.3f'):>6}  "
                     f"{rounds}")
    return "\n".join(lines)


def write_results(rows, env, args, out_dir: Path, tag: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"train_step-{tag}.json"
    csv_path = out_dir / f"train_step-{tag}.csv"
    json_path.write_text(json.dumps({"environment": env, "args": vars(args), "rows": rows}, indent=1))
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS + ["ratio_q25", "ratio_q75", "reps", "steps", "rounds"])
        for r in rows:
            writer.writerow([r[c] if c != "round_ratios" else " ".join(f"{v:.4f}" for v in r[c])
                             for c in COLUMNS] + [r["ratio_q25"], r["ratio_q75"], r["reps"], r["steps"],
                                                  r["rounds"]])
    return csv_path, json_path


def log_mlflow(rows, env, args, paths) -> None:
    try:
        import mlflow
    except ImportError:
        print("--mlflow: mlflow is not installed; skipped", file=sys.stderr)
        return
    if args.mlflow_uri:
        mlflow.set_tracking_uri(args.mlflow_uri)
    elif not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri("sqlite:///mlflow.db")  # as conf/mlflow/local.yaml
    mlflow.set_experiment("nics_fix-benchmarks")
    with mlflow.start_run(run_name=f"train_step-{args.tag}"):
        mlflow.log_params({**{k: v for k, v in env.items() if k != "threads_note"},
                           **{f"arg_{k}": v for k, v in vars(args).items() if not k.startswith("mlflow")}})
        for r in rows:
            if r["variant"] == "float":
                continue
            key = f"{r['model']}.{r['variant']}.{'xla' if r['xla'] else 'noxla'}.{r['phase']}"
            mlflow.log_metric(f"{key}.ratio", r["ratio"])
            mlflow.log_metric(f"{key}.ratio_iqr", r["ratio_iqr"])
            mlflow.log_metric(f"{key}.ratio_cpu", r["ratio_cpu"])
            mlflow.log_metric(f"{key}.float_ms", r["float_ms"])
            mlflow.log_metric(f"{key}.quant_ms", r["quant_ms"])
        for p in paths:
            mlflow.log_artifact(str(p))


def _csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=_csv_list, default=["mlp", "cnn", "resnet20"], help="mlp,cnn,resnet20")
    parser.add_argument("--variants", type=_csv_list, default=["quant", "channel"],
                        help="quantized variants compared with float: quant,channel (also: wa, qfixed, "
                             "channel, chall, block32, whose 'vs q' column compares them with quant)")
    parser.add_argument("--xla", type=_csv_list, default=["off"], help="off,on (off: the job default "
                        "on CPU, where trainer.jit_compile=auto keeps XLA only when it wins)")
    parser.add_argument("--phases", type=_csv_list, default=["train", "eval"], help="train,eval")
    parser.add_argument("--reps", type=int, default=0,
                        help="repetitions per round (default: 12 for the MLP, 8 for the CNN)")
    parser.add_argument("--steps", type=int, default=0,
                        help="steps per repetition (default: 15 for the MLP, 2 for the CNN)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="independent measurement rounds, to show reproducibility (default 2)")
    parser.add_argument("--intra", type=int, default=0, help="intra-op threads (0: TF default)")
    parser.add_argument("--inter", type=int, default=0, help="inter-op threads (0: TF default)")
    parser.add_argument("--out", default=str(RESULTS), help="output folder (default benchmarks/results)")
    parser.add_argument("--tag", default=_dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
                        help="name of this run in the output files (default: a timestamp)")
    parser.add_argument("--mlflow", action="store_true", help="log params, ratios and files to MLflow")
    parser.add_argument("--mlflow-uri", default="",
                        help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    args = parser.parse_args(argv)

    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    if args.intra:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra)
    if args.inter:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter)
    import keras  # noqa: F401
    import nics_fix  # noqa: F401

    env = environment()
    print(f"TensorFlow {env['tensorflow']}, Keras {env['keras']}, {env['cpu_count']} CPUs, "
          f"threads inter={env['inter_op_threads']} intra={env['intra_op_threads']} (0 = default), "
          f"commit {env['git_commit']}{' (nics_fix modified)' if env['git_dirty'] else ''}")
    rows = []
    start = time.perf_counter()
    for kind in args.models:
        steps = args.steps or DEFAULT_STEPS[kind]
        reps = args.reps or DEFAULT_REPS[kind]
        for xla in args.xla:
            jit = {"off": False, "on": True}[xla]
            print(f"{MODELS[kind]}, jit_compile={jit}: {args.rounds} rounds x {reps} reps x "
                  f"{steps} steps", flush=True)
            rows += measure(kind, jit, args.variants, args.phases, reps, steps, args.warmup,
                            args.rounds)
    elapsed = time.perf_counter() - start
    env["elapsed_s"] = elapsed
    env["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print()
    print(format_table(rows))
    print(f"\nratio: median over repetitions of (variant time / float time in the same repetition); "
          f"IQR: of those ratios; best: fastest repetition / fastest float repetition; cpu: median "
          f"ratio of process CPU time; per-round medians: run-to-run stability. {elapsed:.0f} s; load average (1 min) "
          f"{env['load_average_1_5_15min'][0]:.1f} at start, {env['load_average_at_end'][0]:.1f} at end "
          f"on {env['cpu_count']} CPUs.")
    paths = write_results(rows, env, args, Path(args.out), args.tag)
    print("wrote " + ", ".join(str(p) for p in paths))
    if args.mlflow:
        log_mlflow(rows, env, args, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
