"""``trainer.jit_compile: auto``: XLA or not, decided per job from a short measurement.

XLA speeds up some models (a quantized MLP on CPU) and slows others (CNNs), and
its compilation costs seconds. With ``auto``, before the job's model is built,
two throw-away copies of it (same config) are compiled without and with XLA
and trained on one batch of the job's data, interleaved, a few steps at a time.
XLA is chosen only if its median step is at least :data:`MIN_GAIN` faster and
the time it saves over the whole job is more than its extra compile time.
A job too short to repay any compilation (under :data:`MIN_JOB_STEPS` steps)
is not measured and runs without XLA.

The copies change no state the job sees: Keras' name counters are reset and
the seeds set again afterwards, so the job's model is the one a fixed
``jit_compile`` would build. The choice, the reason and the measured times go
to MLflow (params ``jit_compile.choice``, ``jit_compile.reason``; metrics
``jit_compile.step_ms.plain``/``.xla`` and ``jit_compile.compile_s.plain``/``.xla``),
and the job's saved ``train_config.yaml`` holds the chosen value, so
evaluation later compiles the model the way it was trained.

>>> resolve_flag({"jit_compile": True}), resolve_flag({"jit_compile": "auto"})
(True, False)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

#: XLA must make a step at least this much faster (fraction) to be chosen.
MIN_GAIN = 0.05
#: Jobs with fewer training steps than this run without XLA, unmeasured.
MIN_JOB_STEPS = 200
#: Interleaved repetitions, and steps per repetition, of the measurement.
REPETITIONS = 5
STEPS = 3


def resolve_flag(trainer: Mapping) -> bool:
    """``trainer.jit_compile`` as Keras takes it: an unresolved ``auto`` compiles without XLA."""
    return trainer.get("jit_compile", False) is True


def measure(build_compiled: Callable[[bool], object], x, y, repetitions: int | None = None,
            steps: int | None = None) -> dict:
    """Median train-step and first-call (compile) seconds of the models ``build_compiled(jit)`` returns.

    ``{"plain": {"step_s", "compile_s"}, "xla": {...}}``; the two models are
    timed in alternating order, so a slow phase of the machine hits both.
    """
    repetitions = REPETITIONS if repetitions is None else repetitions
    steps = STEPS if steps is None else steps
    models, out = {}, {}
    for name, jit in (("plain", False), ("xla", True)):
        models[name] = build_compiled(jit)
        start = time.perf_counter()
        models[name].train_on_batch(x, y)  # traces and compiles
        out[name] = {"compile_s": time.perf_counter() - start}
    times = {name: [] for name in models}
    order = list(models)
    for rep in range(repetitions):
        for name in order if rep % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for _ in range(steps):
                models[name].train_on_batch(x, y)
            times[name].append((time.perf_counter() - start) / steps)
    for name in models:
        out[name]["step_s"] = float(np.median(times[name]))
    return out


def decide(times: Mapping, job_steps: int) -> tuple[bool, str]:
    """``(use XLA, reason)`` from :func:`measure`'s times for a job of ``job_steps`` steps."""
    plain, xla = times["plain"], times["xla"]
    gain = 1.0 - xla["step_s"] / plain["step_s"]
    saved = job_steps * (plain["step_s"] - xla["step_s"])
    extra_compile = xla["compile_s"] - plain["compile_s"]
    if gain < MIN_GAIN:
        return False, f"XLA step {xla['step_s'] * 1e3:.2f} ms vs {plain['step_s'] * 1e3:.2f} ms without"
    if saved <= extra_compile:
        return False, f"XLA would save {saved:.1f} s over {job_steps} steps, its compilation costs {extra_compile:.1f} s"
    return True, f"XLA step {xla['step_s'] * 1e3:.2f} ms vs {plain['step_s'] * 1e3:.2f} ms without"


def choose(trainer: Mapping, build_compiled: Callable[[bool], object], x, y, job_steps: int,
           reset: Callable[[], None]) -> tuple[bool, dict, dict]:
    """Resolve ``trainer.jit_compile``: ``(flag, params, metrics)`` for MLflow.

    A boolean setting is returned as it is (no params). For ``auto``, the job
    is measured unless it is shorter than :data:`MIN_JOB_STEPS`; ``reset()``
    runs after the measurement (clear Keras' session, seed again).
    """
    setting = trainer.get("jit_compile", False)
    if setting != "auto":
        return bool(setting), {}, {}
    if job_steps < MIN_JOB_STEPS:
        reason = f"job of {job_steps} steps is shorter than {MIN_JOB_STEPS}: not measured, no XLA"
        return False, {"jit_compile.choice": False, "jit_compile.reason": reason}, {}
    try:
        times = measure(build_compiled, x, y)
    finally:
        reset()
    flag, reason = decide(times, job_steps)
    metrics = {f"jit_compile.{key}.{name}": value * (1e3 if key == "step_s" else 1.0)
               for name, entry in times.items() for key, value in entry.items()}
    metrics = {k.replace("step_s", "step_ms"): v for k, v in metrics.items()}
    print(f"jit_compile=auto: {'XLA' if flag else 'no XLA'} ({reason})", flush=True)
    return flag, {"jit_compile.choice": flag, "jit_compile.reason": reason}, metrics


__all__ = ["MIN_GAIN", "MIN_JOB_STEPS", "choose", "decide", "measure", "resolve_flag"]
