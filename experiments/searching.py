"""Per-layer bit allocation search: Optuna over a model's quantization points, recorded in MLflow.

The search space is read from the *built* model, not written by hand: every
fixed layer contributes its weight point (kernel and bias, if it has weights)
and its activation point, and for each point the configured quantities
(``weight.data``, ``weight.grad``, ``activation.data``, ``activation.grad``)
get one categorical Optuna parameter ``bits.<layer>.<quantity>.<data|grad>``
(``bits.<LayerType>...`` with ``share_by_type``) over the configured widths.
:func:`search_space` returns that list, pinned and excluded layers left out.

Each trial's allocation becomes a fixed config in the core format (one
``by_name`` entry per layer, over the ``fixed`` group as the base for what is
not searched) and trains through :func:`experiments.training.run_training` as
a nested MLflow run of the search's parent run. Objectives (``search.objective``):

``pareto`` (default)
    two objectives: maximize validation accuracy, minimize the cost
    (``search.cost``: ``weight_bits`` total weight bits, ``bops`` forward
    bit-operations, ``train_bops`` forward + backward) — Optuna does not prune
    multi-objective studies, so every trial trains to the end;
``budget``
    maximize accuracy subject to ``cost <= search.budget``; an allocation over
    budget is known before training and is pruned at once (a constraint the
    samplers learn from); the others are pruned on per-epoch validation
    accuracy by ``MedianPruner`` (or ``HyperbandPruner``);
``min_cost``
    minimize the cost subject to ``accuracy >= reference - accuracy_delta``
    (the reference: ``reference_accuracy``, else a float run trained once per
    study); ``ThresholdPruner`` stops trials whose validation accuracy after the
    warm-up epochs is ``prune_slack`` below that target.

The study lives in an RDB storage (default ``sqlite:///<output_dir>/optuna.db``)
under ``study_name`` with ``load_if_exists``: running the same command again
resumes it, and processes pointed at one storage share it. At the end the
parent run gets ``pareto.csv``, ``pareto/trial_<n>.yaml`` (fixed configs usable
as ``conf/fixed/`` files) and ``trials.csv``; the same files are written to the
output directory. A sampled allocation that an earlier COMPLETE trial already
trained reuses that result (``reuse_duplicates``: training is seeded, so it
would only repeat it); its child run carries ``nics_fix.duplicate_of``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import fnmatch
import os
import socket
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import optuna
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import nics_fix as nf
from experiments import checkpoint, tracking
from experiments.data import load_dataset
from experiments.training import (
    _sigterm_as_interrupt,
    build,
    check_trainer,
    interrupt_handled,
    run_training,
)
from experiments.validate import check_value

QUANTITIES = ("weight.data", "weight.grad", "activation.data", "activation.grad")
OBJECTIVES = ("pareto", "budget", "min_cost")
COSTS = {"weight_bits": "cost.total_weight_bits", "bops": "cost.bops", "train_bops": "cost.train_bops"}
SAMPLERS = ("tpe", "nsgaii", "random")
PRUNERS = ("auto", "median", "hyperband", "threshold", "none")
BASELINES = ("none", "uniform")
FLOAT_BITS = 32
#: Seconds an Optuna SQLite connection waits for another worker's lock (pysqlite's default: 5).
SQLITE_TIMEOUT = 60

#: ``search`` options and their defaults (``conf/search/default.yaml`` holds the same).
DEFAULTS: dict = {
    "study_name": None,          # null: <model>-<data>-<objective>-<cost>
    "storage": None,             # null: sqlite:///<output_dir>/optuna.db; any RDB URL
    "n_trials": 20,              # trials this process runs (plus baseline trials it enqueued)
    "timeout": None,             # seconds for this process; null: no limit
    "seed": 0,                   # sampler seed (offset by the trials already in the study)
    "sampler": "tpe",            # tpe | nsgaii | random
    "n_startup_trials": 10,      # tpe: random trials before modelling
    "population_size": 10,       # nsgaii
    "objective": "pareto",       # pareto | budget | min_cost
    "cost": "weight_bits",       # weight_bits | bops | train_bops
    "budget": None,              # objective=budget: largest allowed cost (units of `cost`)
    "accuracy_delta": 0.01,      # min_cost: accuracy >= reference - delta; also the summary's "within delta"
    "reference_accuracy": None,  # null: train a float run once per study (when one is needed)
    "float_reference": True,     # train that float run for the summary even when not needed
    "pruner": "auto",            # auto (budget: median, min_cost: threshold, pareto: none) | median | hyperband | threshold | none
    "pruner_startup_trials": 5,  # median: trials before pruning starts
    "pruner_warmup_epochs": 1,   # epochs before a trial can be pruned
    "prune_slack": 0.05,         # threshold: prune below (reference - delta - slack)
    "quantities": ["weight.data", "activation.data"],  # any of QUANTITIES
    "widths": [2, 3, 4, 5, 6, 8, 12, 16],
    "grad_widths": None,         # widths for *.grad quantities; null: `widths`
    "share_by_type": False,      # one width per layer type (Dense, ReLU, ...) instead of per layer
    "pin": None,                 # {layer: bits | float | {weight: bits, activation: bits}}
    "exclude": [],               # layer names/types (fnmatch patterns) left to the `fixed` group
    "data_config": {"training": "auto", "not_training": "fixed"},  # modes of searched data points
    "gradient_config": {"training": "auto"},                       # modes of searched gradient points
    "baseline": "none",          # none | uniform: every width on every searched quantity, enqueued
    "reuse_duplicates": True,    # an allocation already trained (COMPLETE) is not trained again
    "heartbeat_interval": 60,    # seconds; a trial whose worker died is failed after 2x this; null: off
    "hypervolume_reference": [0.0, 32.0],  # (accuracy, average weight bits)
}


class SearchConfigError(ValueError):
    """A ``search`` option is invalid (the message names the key)."""


@dataclass(frozen=True)
class Dimension:
    """One searched quantity of one layer: ``bits.<layer>.<quantity>.<direction>``.

    ``param`` is the Optuna parameter that sets it (shared by every layer of a
    type with ``share_by_type``).
    """

    layer: str
    layer_type: str
    quantity: str    # weight | activation
    direction: str   # data | grad
    choices: tuple
    param: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.layer, self.quantity, self.direction)


# --------------------------------------------------------------------------- options


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _widths(value, key: str) -> list[int]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise SearchConfigError(f"{key}: expected a non-empty list of bit widths, got {value!r}")
    for w in value:
        if not _is_int(w) or not 1 <= w <= FLOAT_BITS:
            raise SearchConfigError(f"{key}: bit widths must be integers from 1 to {FLOAT_BITS}, got {w!r}")
    return sorted({int(w) for w in value})


def _choice(opts, key, allowed):
    if opts[key] not in allowed:
        raise SearchConfigError(f"search.{key}: must be one of {', '.join(allowed)}, got {opts[key]!r}")


def search_options(search: Mapping | None = None) -> dict:
    """The ``search`` config merged over :data:`DEFAULTS` and checked."""
    search = dict(search or {})
    unknown = [k for k in search if k not in DEFAULTS]
    if unknown:
        raise SearchConfigError(f"search.{unknown[0]}: unknown key (allowed: {', '.join(DEFAULTS)})")
    opts = copy.deepcopy(DEFAULTS)
    opts.update(copy.deepcopy(search))
    for key, allowed in (("objective", OBJECTIVES), ("cost", tuple(COSTS)), ("sampler", SAMPLERS),
                         ("pruner", PRUNERS), ("baseline", BASELINES)):
        _choice(opts, key, allowed)
    opts["widths"] = _widths(opts["widths"], "search.widths")
    if opts["grad_widths"] is not None:
        opts["grad_widths"] = _widths(opts["grad_widths"], "search.grad_widths")
    quantities = opts["quantities"]
    if isinstance(quantities, str):
        quantities = [quantities]
    if not quantities or any(q not in QUANTITIES for q in quantities):
        raise SearchConfigError(f"search.quantities: expected a non-empty list of {', '.join(QUANTITIES)}, "
                                f"got {opts['quantities']!r}")
    opts["quantities"] = [q for q in QUANTITIES if q in quantities]
    if opts["n_trials"] is not None and (not _is_int(opts["n_trials"]) or opts["n_trials"] < 0):
        raise SearchConfigError(f"search.n_trials: expected a non-negative integer or null, got {opts['n_trials']!r}")
    if opts["timeout"] is not None and (not isinstance(opts["timeout"], (int, float)) or opts["timeout"] <= 0):
        raise SearchConfigError(f"search.timeout: expected a positive number of seconds or null, got {opts['timeout']!r}")
    if opts["objective"] == "budget" and not isinstance(opts["budget"], (int, float)):
        raise SearchConfigError("search.budget: objective=budget needs a cost budget "
                                f"(in units of search.cost={opts['cost']}), got {opts['budget']!r}")
    if opts["objective"] == "pareto" and opts["pruner"] not in ("auto", "none"):
        raise SearchConfigError(f"search.pruner: {opts['pruner']!r} with objective=pareto: Optuna does not prune "
                                "multi-objective studies; use objective=budget or min_cost, or pruner=none")
    if opts["pruner"] == "threshold" and opts["objective"] == "pareto":
        raise SearchConfigError("search.pruner: threshold needs a single objective")
    for key in ("data_config", "gradient_config"):
        modes = dict(opts[key] or {})
        allowed = ("training", "not_training", "rounding") if key == "data_config" else ("training", "rounding")
        bad = [k for k in modes if k not in allowed]
        if bad:
            raise SearchConfigError(f"search.{key}.{bad[0]}: unknown key (allowed: {', '.join(allowed)})")
        try:  # the modes every searched point gets: checked by the fixed-config parser itself
            nf.LayerFixedConfig.from_dict({"weight": {key: {"bit_width": 8, **modes}}})
        except nf.ConfigError as err:
            field = err.key_path.rsplit(".", 1)[-1]
            raise SearchConfigError(f"search.{key}.{field}: {err.reason}") from None
        opts[key] = modes
    opts["exclude"] = list(opts["exclude"] or [])
    for key, kind, minimum, nullable in (
            ("seed", "int", None, True), ("n_startup_trials", "int", 0, False), ("population_size", "int", 2, False),
            ("pruner_startup_trials", "int", 0, False), ("pruner_warmup_epochs", "int", 0, False),
            ("heartbeat_interval", "int", 1, True), ("accuracy_delta", "number", 0, False),
            ("prune_slack", "number", 0, False), ("reference_accuracy", "number", 0, True),
            ("budget", "number", 0, True), ("float_reference", "bool", None, False),
            ("share_by_type", "bool", None, False), ("reuse_duplicates", "bool", None, False)):
        check_value(opts[key], f"search.{key}", kind, minimum, nullable=nullable, error=SearchConfigError)
    ref = opts["hypervolume_reference"]
    if (not isinstance(ref, Sequence) or isinstance(ref, str) or len(ref) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ref)):
        raise SearchConfigError(f"search.hypervolume_reference: expected [accuracy, avg_weight_bits], got {ref!r}")
    opts["pin"] = dict(opts["pin"] or {})
    return opts


def default_study_name(cfg: Mapping, opts: Mapping) -> str:
    return f"{cfg['model']['name']}-{cfg['data']['name']}-{opts['objective']}-{opts['cost']}"


def default_storage(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'optuna.db'}"


def safe_url(url: str) -> str:
    """A storage URL without its password (for logs and MLflow params)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL: show it as is
        return url


# --------------------------------------------------------------------------- search space


def _layer_quantities(layer) -> list[str]:
    kinds = {p.kind for p in layer.fixed_points.values()}
    return [q for q in ("weight", "activation") if q in kinds]


def _layer_type(layer) -> str:
    return type(layer).__name__


def _excluded(layer, patterns) -> bool:
    return any(fnmatch.fnmatchcase(layer.name, p) or fnmatch.fnmatchcase(_layer_type(layer), p)
               for p in patterns)


def _pin_value(value, key):
    if value is None or (isinstance(value, str) and value.lower() == "float"):
        return None
    if _is_int(value) and 1 <= value <= FLOAT_BITS:
        return int(value)
    raise SearchConfigError(f"{key}: a pin is a bit width from 1 to {FLOAT_BITS} or 'float', got {value!r}")


def pinned_quantities(model, search: Mapping | None = None) -> dict[tuple[str, str], int | None]:
    """``{(layer, weight|activation): bits or None (float)}`` from ``search.pin``."""
    opts = search_options(search)
    layers = {layer.name: layer for layer in nf.introspect.fixed_layers(model)}
    pins: dict[tuple[str, str], int | None] = {}
    for name, value in opts["pin"].items():
        key = f"search.pin.{name}"
        if name not in layers:
            raise SearchConfigError(f"{key}: no fixed layer named {name!r}; layers: {', '.join(layers)}")
        quantities = _layer_quantities(layers[name])
        if isinstance(value, Mapping):
            for quantity, bits in value.items():
                if quantity not in quantities:
                    raise SearchConfigError(f"{key}.{quantity}: layer {name} has quantities "
                                            f"{', '.join(quantities)}")
                pins[(name, quantity)] = _pin_value(bits, f"{key}.{quantity}")
        else:
            for quantity in quantities:
                pins[(name, quantity)] = _pin_value(value, key)
    return pins


def search_space(model, search: Mapping | None = None) -> list[Dimension]:
    """The searched points of ``model``: one :class:`Dimension` per (layer, quantity, direction).

    Every fixed layer contributes ``weight`` (if it has weight points) and
    ``activation``, each with the directions in ``search.quantities``;
    pinned (``search.pin``) and excluded (``search.exclude``) ones are left out.
    """
    opts = search_options(search)
    pins = pinned_quantities(model, opts)
    dims = []
    for layer in nf.introspect.fixed_layers(model):
        if _excluded(layer, opts["exclude"]):
            continue
        owner = _layer_type(layer) if opts["share_by_type"] else layer.name
        for quantity in _layer_quantities(layer):
            if (layer.name, quantity) in pins:
                continue
            for direction in ("data", "grad"):
                if f"{quantity}.{direction}" not in opts["quantities"]:
                    continue
                widths = opts["grad_widths"] if direction == "grad" and opts["grad_widths"] else opts["widths"]
                dims.append(Dimension(layer.name, _layer_type(layer), quantity, direction, tuple(widths),
                                      f"bits.{owner}.{quantity}.{direction}"))
    return dims


def search_params(space: Sequence[Dimension]) -> dict[str, tuple]:
    """``{Optuna parameter: choices}``, in the order of the space."""
    params: dict[str, tuple] = {}
    for dim in space:
        params.setdefault(dim.param, dim.choices)
    return params


def allocation(model, space: Sequence[Dimension], params: Mapping[str, int], search: Mapping | None = None
               ) -> dict[tuple[str, str, str], int | None]:
    """``{(layer, quantity, direction): bits or None}``: the searched values plus the pins."""
    opts = search_options(search)
    alloc = {dim.key: int(params[dim.param]) for dim in space}
    for (layer, quantity), bits in pinned_quantities(model, opts).items():
        for direction in ("data", "grad"):
            if f"{quantity}.{direction}" in opts["quantities"]:
                alloc[(layer, quantity, direction)] = bits
    return alloc


def _prune_float(point: dict) -> dict:
    out = {}
    for key, part in point.items():
        if key == "storage_config" or any(part.get(m, "none") != "none" for m in ("training", "not_training")):
            out[key] = part
    return out


def allocation_fixed_config(model, alloc: Mapping, base_fixed=None, search: Mapping | None = None) -> dict:
    """The fixed config (core format, one ``by_name`` entry per quantized layer) of an allocation.

    What is not allocated keeps its resolution in ``base_fixed`` (the ``fixed``
    group; float by default). Allocated points take ``search.data_config`` /
    ``search.gradient_config`` modes (rounding kept from the base) and the
    allocated width; ``None`` makes a point float.
    """
    opts = search_options(search)
    base = nf.FixedConfig.from_dict(base_fixed or {})
    by_name = {}
    for layer in nf.introspect.fixed_layers(model):
        resolved = base.resolve(layer.name, _layer_type(layer)).to_dict()
        for (name, quantity, direction), bits in alloc.items():
            if name != layer.name:
                continue
            key = "data_config" if direction == "data" else "gradient_config"
            part = dict(resolved[quantity][key])
            if bits is None:
                part = {k: v for k, v in part.items() if k == "rounding"}
                part.update({"training": "none"} if direction == "grad" else
                            {"training": "none", "not_training": "none"})
            else:
                part.update(opts[key])
                part = {"bit_width": int(bits), **{k: v for k, v in part.items() if k != "bit_width"}}
            resolved[quantity][key] = part
        entry = {q: _prune_float(resolved[q]) for q in _layer_quantities(layer)}
        entry = {q: v for q, v in entry.items() if v}
        if entry:
            by_name[layer.name] = entry
    return {"by_name": by_name}


# --------------------------------------------------------------------------- cost and fronts


def allocation_cost(cfg: Mapping, data, fixed: Mapping, choices=None) -> dict[str, float]:
    """Cost metrics (``cost.*``, as a train run logs them) of the model built with ``fixed``."""
    model, _ = build(dict(cfg, fixed=fixed), data, choices)
    try:
        return tracking.cost_metrics(model)
    finally:
        del model


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated ``(accuracy ↑, cost ↓)`` points (ties all kept), by cost."""
    front = []
    for i, (acc, cost) in enumerate(points):
        dominated = any((a >= acc and c <= cost) and (a > acc or c < cost) for a, c in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][1], -points[i][0], i))


def hypervolume(points: Sequence[tuple[float, float]], reference=(0.0, 32.0)) -> float:
    """Area dominated by ``(accuracy ↑, cost ↓)`` points and bounded by ``reference`` = (acc, cost).

    >>> hypervolume([(0.9, 4.0), (0.95, 8.0)], reference=(0.0, 32.0))  # 0.9*28 + 0.05*24
    26.4
    """
    ref_acc, ref_cost = float(reference[0]), float(reference[1])
    pts = sorted((float(c), float(a)) for a, c in points if a > ref_acc and c < ref_cost)
    area, best = 0.0, ref_acc
    for i, (cost, acc) in enumerate(pts):
        best = max(best, acc)
        next_cost = pts[i + 1][0] if i + 1 < len(pts) else ref_cost
        area += (next_cost - cost) * (best - ref_acc)
    return round(area, 12)


# --------------------------------------------------------------------------- Optuna pieces


class PruningCallback(keras.callbacks.Callback):
    """Reports a per-epoch metric to an Optuna trial and raises ``TrialPruned`` when told to."""

    def __init__(self, trial: optuna.Trial, monitor: str = "val_accuracy"):
        super().__init__()
        self.trial = trial
        self.monitor = monitor

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.monitor}={float(value):.4f} at epoch {epoch + 1}")


def make_sampler(opts: Mapping, seed: int | None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if opts["sampler"] == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if opts["sampler"] == "nsgaii":
            return optuna.samplers.NSGAIISampler(population_size=int(opts["population_size"]), seed=seed)
        return optuna.samplers.TPESampler(n_startup_trials=int(opts["n_startup_trials"]), seed=seed)


def pruner_name(opts: Mapping) -> str:
    name = opts["pruner"]
    if name == "auto":
        return {"pareto": "none", "budget": "median", "min_cost": "threshold"}[opts["objective"]]
    return name


def make_pruner(opts: Mapping, epochs: int, target: float | None):
    name = pruner_name(opts)
    warmup = int(opts["pruner_warmup_epochs"])
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(opts["pruner_startup_trials"]),
                                           n_warmup_steps=warmup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup), max_resource=max(1, epochs))
    if name == "threshold":
        if target is None:
            raise SearchConfigError("search.pruner: threshold needs an accuracy target "
                                    "(search.reference_accuracy or search.float_reference=true)")
        return optuna.pruners.ThresholdPruner(lower=target - float(opts["prune_slack"]), n_warmup_steps=warmup)
    return optuna.pruners.NopPruner()


def directions(opts: Mapping) -> list[str]:
    return {"pareto": ["maximize", "minimize"], "budget": ["maximize"],
            "min_cost": ["minimize"]}[opts["objective"]]


def _engine_kwargs(storage_url: str) -> dict:
    scheme = tracking.url_scheme(storage_url)
    if scheme == "sqlite":
        # Several local workers on one file: wait for a lock instead of failing after 5 s.
        return {"connect_args": {"timeout": SQLITE_TIMEOUT}}
    return tracking.connect_timeout_args(scheme)


def open_study(opts: Mapping, study_name: str, storage_url: str, seed: int | None = None,
               pruner=None, on_stale_trial=None) -> optuna.Study:
    """Create the study, or load it when it exists (checking it is the same search).

    ``on_stale_trial(study, trial)`` is called for each trial that Optuna's
    heartbeat finds abandoned by a dead worker (and fails).
    """
    kwargs = {"engine_kwargs": _engine_kwargs(storage_url)}
    if opts["heartbeat_interval"]:
        interval = int(opts["heartbeat_interval"])
        kwargs.update(heartbeat_interval=interval, grace_period=2 * interval,
                      heartbeat_stale_trial_callback=on_stale_trial)
    try:
        # Workers starting together on a new database would race to create Optuna's tables.
        with tracking.store_lock(storage_url), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(storage_url, **kwargs)
            study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True,
                                        directions=directions(opts), sampler=make_sampler(opts, seed),
                                        pruner=pruner)
    except (SearchConfigError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - bad URL, missing driver, refused, wrong directions: one answer
        raise SearchConfigError(
            f"search.storage={safe_url(storage_url)}: cannot open Optuna study {study_name!r} there "
            f"({tracking.database_error_text(err)})\nFix: give an SQLAlchemy database URL that this machine can reach, "
            "e.g. sqlite:///path/optuna.db or postgresql+psycopg2://user:pass@host/db (null: sqlite "
            "in the run directory); a study of another search needs another search.study_name.") from None
    want = {"search.objective": opts["objective"], "search.cost": opts["cost"]}
    have = study.user_attrs
    for key, value in want.items():
        if key in have and have[key] != value:
            raise SearchConfigError(f"{key}: study {study_name!r} in {safe_url(storage_url)} "
                                    f"was run with {key}={have[key]!r}, not {value!r}; "
                                    "use another search.study_name")
        if key not in have:
            study.set_user_attr(key, value)
    return study


def check_compatible(study: optuna.Study, space: Sequence[Dimension]) -> None:
    """Fail early when the stored trials used other widths for the same parameters."""
    from optuna.distributions import CategoricalDistribution

    wanted = {p: CategoricalDistribution(list(c)) for p, c in search_params(space).items()}
    for trial in study.get_trials(deepcopy=False):
        for param, dist in trial.distributions.items():
            if param in wanted and dist != wanted[param]:
                raise SearchConfigError(
                    f"search.widths: study {study.study_name!r} searched {param} over "
                    f"{list(dist.choices)}, this run over {list(wanted[param].choices)}; "
                    "keep the widths to resume, or use another search.study_name")


def uniform_baseline_params(space: Sequence[Dimension], widths: Sequence[int]) -> list[dict]:
    """One parameter set per width: that width on every searched parameter (nearest choice if absent)."""
    out = []
    for width in widths:
        params = {}
        for param, choices in search_params(space).items():
            params[param] = width if width in choices else min(choices, key=lambda c: (abs(c - width), -c))
        if params not in out:
            out.append(params)
    return out


def enqueue_uniform_baseline(study: optuna.Study, space: Sequence[Dimension], widths: Sequence[int]) -> int:
    """Enqueue the uniform allocations not already in the study; return how many wait to run."""
    for params in uniform_baseline_params(space, widths):
        study.enqueue_trial(params, user_attrs={"baseline": "uniform"}, skip_if_exists=True)
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
               if t.user_attrs.get("baseline") == "uniform")


# --------------------------------------------------------------------------- dead workers

#: Trial user attributes naming the worker process and its parent run (see :func:`close_stale`).
WORKER_HOST, WORKER_PID, SEARCH_RUN = "nics_fix.host", "nics_fix.pid", "nics_fix.search_run_id"


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _trial_dead(trial) -> bool:
    """A RUNNING trial whose worker ran on this host under a pid that no longer exists."""
    pid = checkpoint.local_pid(trial.user_attrs)  # None: another machine's worker, Optuna's heartbeat decides
    return pid is not None and pid != os.getpid() and not checkpoint.pid_alive(pid)


def _fail_trial(study: optuna.Study, trial, reason: str) -> bool:
    """A RUNNING trial becomes FAIL with an ``error`` attribute; False if it finished meanwhile."""
    try:
        study._storage.set_trial_user_attr(trial._trial_id, "error", reason)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another worker (or the trial itself) finished it first
    return True


def _kill_run(client, run_id: str, reason: str, optuna_state: str | None = None) -> bool:
    """End a RUNNING MLflow run as KILLED, saying why; False when it was not RUNNING any more."""
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, "nics_fix.closed_as_stale", reason[:5000])
    if optuna_state:
        client.set_tag(run_id, "optuna.state", optuna_state)
    client.set_terminated(run_id, "KILLED")
    return True


def _study_runs(client, experiment_id: str, study_name: str, status: str = "RUNNING") -> list:
    runs = client.search_runs([experiment_id], filter_string=f"attributes.status = '{status}'", max_results=5000)
    return [r for r in runs if r.data.tags.get("optuna.study_name") == study_name]


def _is_child_of(run, trial) -> bool:
    """``run`` is the MLflow child run of this Optuna trial (same number, same parent search run)."""
    tags = run.data.tags
    return (tags.get("nics_fix.role") == "trial" and tags.get("optuna.trial_number") == str(trial.number)
            and tags.get("nics_fix.search_run_id") == trial.user_attrs.get(SEARCH_RUN))


def close_trial_runs(study: optuna.Study, trial, experiment_id: str, reason: str) -> list[str]:
    """End the RUNNING MLflow child run(s) of ``trial`` and its worker's search run as KILLED."""
    client = MlflowClient()
    closed = []
    for run in _study_runs(client, experiment_id, study.study_name):
        child = _is_child_of(run, trial)
        parent = run.info.run_id == trial.user_attrs.get(SEARCH_RUN)
        if (child or parent) and _kill_run(client, run.info.run_id, reason, trial.state.name if child else None):
            closed.append(run.info.run_id)
    return closed


def close_stale(study: optuna.Study, experiment_id: str) -> dict[str, list]:
    """Close what dead workers of this study left RUNNING; return the trial numbers and run ids closed.

    * Optuna: a RUNNING trial whose worker (user attrs ``nics_fix.host``,
      ``nics_fix.pid``) ran on this host under a pid that is gone becomes FAIL
      at once; on other hosts, Optuna's heartbeat fails it once it is older than
      ``2 * search.heartbeat_interval`` (``fail_stale_trials``).
    * MLflow: a RUNNING run of this study (search, trial or float reference)
      whose process is gone — its pid on this host, its heartbeat tag silent
      for ``2 * interval`` elsewhere (:func:`experiments.checkpoint.stale_reason`) —
      or a trial run whose Optuna trial is already finished, becomes KILLED
      with a ``nics_fix.closed_as_stale`` tag saying why.
    """
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _trial_dead(trial):
            continue
        reason = (f"worker pid {trial.user_attrs[WORKER_PID]} on {trial.user_attrs[WORKER_HOST]} is gone "
                  f"(killed?); closed by the search of {me}")
        if _fail_trial(study, trial, reason):
            failed.append(trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # heartbeat: other hosts' dead workers

    client = MlflowClient()
    trials = {str(t.number): t for t in study.get_trials(deepcopy=False)}
    closed = []
    for run in _study_runs(client, experiment_id, study.study_name):
        tags = run.data.tags
        trial = trials.get(tags.get("optuna.trial_number", ""))
        trial = trial if trial is not None and _is_child_of(run, trial) else None
        gone = checkpoint.stale_reason(run)
        if gone:
            reason = f"{gone}; closed by {me}"
        elif trial is not None and trial.state.is_finished():
            reason = f"its Optuna trial {trial.number} is {trial.state.name} (its worker died); closed by {me}"
        else:
            continue
        if _kill_run(client, run.info.run_id, reason, trial.state.name if trial is not None else None):
            closed.append(run.info.run_id)
    if failed or closed:
        print(f"closed what dead workers left RUNNING: Optuna trials {failed or 'none'} FAIL, "
              f"{len(closed)} MLflow run(s) KILLED", flush=True)
    return {"trials": failed, "runs": closed}


def _stale_trial_callback(experiment_name: str):
    """For Optuna's heartbeat: a trial it failed also ends its MLflow runs (child and worker's parent)."""

    def callback(study, trial):
        try:
            experiment = mlflow.get_experiment_by_name(experiment_name)
            if experiment is not None:
                close_trial_runs(study, trial, experiment.experiment_id,
                                 f"Optuna's heartbeat failed trial {trial.number}: its worker stopped "
                                 f"(closed by pid {os.getpid()} on {socket.gethostname()})")
        except Exception as err:  # noqa: BLE001 - never stop the search for this: say it
            _warn(f"trial {trial.number} was failed by Optuna's heartbeat, but its MLflow runs could not be "
                  f"closed ({type(err).__name__}: {err})")

    return callback


# --------------------------------------------------------------------------- the search


def _fmt_cost(value) -> str:
    return f"{value:,.0f}" if abs(value) < 1e9 else f"{value:.4g}"


_SHORT = {"weight.data": "w", "activation.data": "a", "weight.grad": "gw", "activation.grad": "ga"}


def bits_summary(bits: Mapping[str, int | None], quantities: Sequence[str]) -> str:
    """``w=8/4/6 a=8/5/4``: widths per quantity in layer order (``f``: float)."""
    parts = []
    for quantity in quantities:
        values = [("f" if v is None else str(v)) for k, v in bits.items() if k.endswith("." + quantity)]
        if values:
            parts.append(f"{_SHORT[quantity]}={'/'.join(values)}")
    return " ".join(parts)


class _Search:
    """State shared by the objective and the progress callback of one invocation."""

    def __init__(self, cfg, opts, data, model, space, study, parent_run_id, experiment_id, choices,
                 target, output_dir):
        self.cfg = cfg
        self.opts = opts
        self.data = data
        self.model = model
        self.space = space
        self.study = study
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.choices = choices
        self.target = target
        self.input_error: Exception | None = None  # set by the first trial that fails on bad input
        self.output_dir = output_dir
        self.client = MlflowClient()
        self.started = time.time()
        self.metric = "val_accuracy" if len(data.x_val) else "test_accuracy"  # what run_training selects on
        self.pruning = len(directions(opts)) == 1 and pruner_name(opts) != "none"

    # -- MLflow helpers -------------------------------------------------------

    def trial_tags(self, trial) -> dict:
        tags = {"nics_fix.role": "trial", "optuna.trial_number": str(trial.number),
                "optuna.study_name": self.study.study_name, "nics_fix.search_run_id": self.parent_run_id}
        baseline = trial.user_attrs.get("baseline")
        if baseline:
            tags["nics_fix.baseline"] = baseline
        return tags

    def find_child(self, trial_number: int) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and "
                           f"tags.`optuna.trial_number` = '{trial_number}'"),
            max_results=1)
        return runs[0].info.run_id if runs else None

    def standalone_child(self, trial, status: str, tags: Mapping, params: Mapping, metrics: Mapping) -> str:
        """A child run for a trial that never reached training (infeasible, or failed before)."""
        tags = {**tracking.base_tags("trial"), **self.trial_tags(trial), **tags}
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True, tags=tags) as run:
            tracking.log_batch(run.info.run_id, params=params, metrics=metrics)
        self.client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    # -- the objective --------------------------------------------------------

    def objective(self, trial: optuna.Trial):
        # Who runs the trial: a later search closes it when this process is gone (close_stale).
        trial.set_user_attr(WORKER_HOST, socket.gethostname())
        trial.set_user_attr(WORKER_PID, os.getpid())
        trial.set_user_attr(SEARCH_RUN, self.parent_run_id)
        keras.backend.clear_session()
        params = {p: trial.suggest_categorical(p, list(c)) for p, c in search_params(self.space).items()}
        alloc = allocation(self.model, self.space, params, self.opts)
        bits = {f"{layer}.{q}.{d}": v for (layer, q, d), v in alloc.items()}
        trial.set_user_attr("bits", bits)
        cfg = copy.deepcopy(self.cfg)
        cfg["fixed"] = allocation_fixed_config(self.model, alloc, self.cfg.get("fixed"), self.opts)
        trial.set_user_attr("fixed_config", cfg["fixed"])
        try:
            cost = allocation_cost(cfg, self.data, cfg["fixed"], self.choices)
        except Exception as err:
            run_id = self.standalone_child(trial, "FAILED", {"error": f"{type(err).__name__}: {err}"[:5000]},
                                           {f"bits.{k}": ("float" if v is None else v) for k, v in bits.items()}, {})
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            self.stop_on_input_error(trial, err)
            raise
        for key, value in cost.items():
            trial.set_user_attr(key, value)
        cost_value = float(cost[COSTS[self.opts["cost"]]])

        if self.opts["objective"] == "budget":
            trial.set_constraint("cost_budget", cost_value - float(self.opts["budget"]))
            if cost_value > float(self.opts["budget"]):
                trial.set_user_attr("infeasible", f"cost {cost_value:g} > budget {self.opts['budget']:g}")
                run_id = self.standalone_child(
                    trial, "KILLED", {"nics_fix.infeasible": trial.user_attrs["infeasible"]},
                    {f"bits.{k}": ("float" if v is None else v) for k, v in bits.items()}, cost)
                trial.set_user_attr("mlflow_run_id", run_id)
                raise optuna.TrialPruned(trial.user_attrs["infeasible"])

        twin = self.complete_twin(trial, params) if self.opts["reuse_duplicates"] else None
        if twin is not None:
            return self.reuse(trial, twin, bits, cost, cost_value)

        mlcfg = dict(cfg.get("mlflow") or {})
        mlcfg["run_name"] = f"trial-{trial.number}"
        cfg["mlflow"] = mlcfg
        callbacks = [PruningCallback(trial, self.metric)] if self.pruning and self.metric == "val_accuracy" else []
        choices = {**self.choices, "fixed": "searched"}  # the base `fixed` choice is a param of the parent
        try:
            results = run_training(cfg, output_dir=None, choices=choices, run_tags=self.trial_tags(trial),
                                   nested=True, callbacks=callbacks)
        except optuna.TrialPruned:
            run_id = self.find_child(trial.number)
            if run_id:
                trial.set_user_attr("mlflow_run_id", run_id)
                self.client.delete_tag(run_id, "error")
                self.client.set_terminated(run_id, "KILLED")
            raise
        except KeyboardInterrupt as err:  # SIGTERM or Ctrl-C: the run ended KILLED, Optuna makes it FAIL
            trial.set_user_attr("error", f"interrupted ({err or 'KeyboardInterrupt'})")
            run_id = self.find_child(trial.number)
            if run_id:
                trial.set_user_attr("mlflow_run_id", run_id)
                self.client.set_tag(run_id, "optuna.state", "FAIL")
            print(f"trial {trial.number:>4} interrupted ({err or 'KeyboardInterrupt'}): FAIL, its run KILLED",
                  flush=True)
            optuna.logging.set_verbosity(optuna.logging.ERROR)  # not a traceback for an interrupt (reset after)
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
            run_id = self.find_child(trial.number)
            if run_id is None:
                run_id = self.standalone_child(trial, "FAILED", {"error": f"{type(err).__name__}: {err}"[:5000]},
                                               {}, cost)
            trial.set_user_attr("mlflow_run_id", run_id)
            self.stop_on_input_error(trial, err)
            raise
        accuracy = float(results.get("val_accuracy", results["test_accuracy"]))
        trial.set_user_attr("mlflow_run_id", results["run_id"])
        trial.set_user_attr("accuracy", accuracy)
        trial.set_user_attr("test_accuracy", float(results["test_accuracy"]))
        if self.opts["objective"] == "min_cost":
            trial.set_constraint("accuracy", float(self.target) - accuracy)
        return self.values(accuracy, cost_value)

    def stop_on_input_error(self, trial, err: Exception) -> None:
        """A bad config or input fails every trial alike: stop after the first, and fail the search."""
        from experiments.cli import user_error_types

        if isinstance(err, user_error_types() + (SearchConfigError,)) and self.input_error is None:
            self.input_error = err
            trial.study.stop()
            optuna.logging.set_verbosity(optuna.logging.ERROR)  # the error is the message, not a traceback

    def values(self, accuracy: float, cost_value: float):
        if self.opts["objective"] == "pareto":
            return accuracy, cost_value
        return accuracy if self.opts["objective"] == "budget" else cost_value

    def complete_twin(self, trial, params: Mapping):
        """An earlier COMPLETE trial with the same allocation (training is deterministic per seed)."""
        for other in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if other.number != trial.number and other.params == dict(params) and "accuracy" in other.user_attrs:
                return other
        return None

    def reuse(self, trial, twin, bits, cost, cost_value):
        """Record ``twin``'s result for ``trial`` without training: a child run says where it came from."""
        accuracy = float(twin.user_attrs["accuracy"])
        test_accuracy = twin.user_attrs.get("test_accuracy")
        metrics = {**cost, self.metric: accuracy}
        if test_accuracy is not None:
            metrics["test_accuracy"] = float(test_accuracy)
        tags = {"nics_fix.duplicate_of": str(twin.number),
                "nics_fix.duplicate_run_id": str(twin.user_attrs.get("mlflow_run_id", ""))}
        run_id = self.standalone_child(trial, "FINISHED", tags,
                                       {f"bits.{k}": ("float" if v is None else v) for k, v in bits.items()},
                                       metrics)
        trial.set_user_attr("duplicate_of", twin.number)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("accuracy", accuracy)
        if test_accuracy is not None:
            trial.set_user_attr("test_accuracy", float(test_accuracy))
        if self.opts["objective"] == "min_cost":
            trial.set_constraint("accuracy", float(self.target) - accuracy)
        return self.values(accuracy, cost_value)

    # -- progress -------------------------------------------------------------

    def progress(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        attrs = trial.user_attrs
        run_id = attrs.get("mlflow_run_id")
        if run_id:
            try:
                self.client.set_tag(run_id, "optuna.state", trial.state.name)
            except Exception as err:  # noqa: BLE001 - the trial is recorded in Optuna: warn, go on
                _warn(f"trial {trial.number}: could not tag MLflow run {run_id} with its state "
                      f"({type(err).__name__}: {err})")
        acc = attrs.get("accuracy")
        avg = attrs.get("cost.avg_weight_bits")
        cost = attrs.get(COSTS[self.opts["cost"]])
        if acc is not None and cost is not None:
            try:
                tracking.log_batch(self.parent_run_id, metrics={"trial.accuracy": acc, "trial.cost": cost,
                                                                "trial.avg_weight_bits": avg}, step=trial.number)
            except Exception as err:  # noqa: BLE001 - a summary metric of the parent: warn, go on
                _warn(f"trial {trial.number}: could not log its summary metrics to the search run "
                      f"({type(err).__name__}: {err})")
        duration = trial.duration.total_seconds() if trial.duration else 0.0
        text = [f"trial {trial.number:>4} {trial.state.name:<8}",
                f"{self.metric[:3]} {acc:.4f}" if acc is not None else f"{self.metric[:3]}    -  ",
                f"avg w bits {avg:5.2f}" if avg is not None else "avg w bits   -  ",
                f"{self.opts['cost']} {_fmt_cost(cost)}" if cost is not None else f"{self.opts['cost']} -",
                f"{duration:6.1f} s (total {time.time() - self.started:6.0f} s)",
                bits_summary(attrs.get("bits", {}), self.opts["quantities"])]
        if attrs.get("baseline"):
            text.append(f"[baseline {attrs['baseline']}]")
        if "duplicate_of" in attrs:
            text.append(f"[same allocation as trial {attrs['duplicate_of']}: not trained again]")
        if trial.state == TrialState.FAIL and attrs.get("error"):
            text.append(f"error: {attrs['error'][:200]}")
        if attrs.get("infeasible"):
            text.append(f"(infeasible: {attrs['infeasible']})")
        print(" | ".join(text), flush=True)


def _float_reference(cfg, opts, study, choices) -> dict | None:
    """The float run's accuracy: from the study (trained once per study) or trained now."""
    if opts["reference_accuracy"] is not None:
        return {"accuracy": float(opts["reference_accuracy"]), "run_id": None, "source": "search.reference_accuracy"}
    needed = opts["objective"] == "min_cost" or pruner_name(opts) == "threshold"
    if not (opts["float_reference"] or needed):
        return None
    attrs = study.user_attrs
    if "float_accuracy" in attrs:
        return {"accuracy": attrs["float_accuracy"], "test_accuracy": attrs.get("float_test_accuracy"),
                "run_id": attrs.get("float_run_id"), "source": "study"}
    fcfg = copy.deepcopy(cfg)
    fcfg["fixed"] = {}
    fcfg["mlflow"] = dict(fcfg.get("mlflow") or {}, run_name="float-reference")
    print("training the float reference (once per study) ...", flush=True)
    tags = {"nics_fix.role": "reference", "nics_fix.baseline": "float",
            "optuna.study_name": study.study_name}
    choices = {k: v for k, v in choices.items() if k != "fixed"}
    try:
        results = run_training(fcfg, choices=dict(choices, fixed="float"), run_tags=tags, nested=True)
    except Exception as err:
        if needed:
            raise
        print(f"warning: the float reference failed ({type(err).__name__}: {err}); going on without it", flush=True)
        return None
    accuracy = float(results.get("val_accuracy", results["test_accuracy"]))
    print(f"float reference: accuracy {accuracy:.4f} (test {results['test_accuracy']:.4f}, run {results['run_id']})",
          flush=True)
    study.set_user_attr("float_accuracy", accuracy)
    study.set_user_attr("float_test_accuracy", float(results["test_accuracy"]))
    study.set_user_attr("float_run_id", results["run_id"])
    return {"accuracy": accuracy, "test_accuracy": float(results["test_accuracy"]),
            "run_id": results["run_id"], "source": "trained"}


# --------------------------------------------------------------------------- summary and export


def _number(value):
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return int(value)
    return value


def _trial_row(trial, metric: str, cost_key: str) -> dict:
    a = {k: _number(v) for k, v in trial.user_attrs.items()}
    row = {"trial": trial.number, "state": trial.state.name, "run_id": a.get("mlflow_run_id", ""),
           metric: a.get("accuracy", ""), "test_accuracy": a.get("test_accuracy", ""),
           "cost": a.get(COSTS[cost_key], ""),
           "avg_weight_bits": a.get("cost.avg_weight_bits", ""),
           "total_weight_bits": a.get("cost.total_weight_bits", ""),
           "bops": a.get("cost.bops", ""), "train_bops": a.get("cost.train_bops", ""),
           "baseline": a.get("baseline", ""), "duplicate_of": a.get("duplicate_of", "")}
    for key, value in (a.get("bits") or {}).items():
        row[f"bits.{key}"] = "float" if value is None else value
    return row


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]

    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    checkpoint.atomic_write(path, write)


def _yaml_text(trial, study_name: str, metric: str, cost_key: str) -> str:
    a = trial.user_attrs
    header = (f"# Bit allocation from search study {study_name!r}, trial {trial.number}: "
              f"{metric} {a.get('accuracy', float('nan')):.4f}, test_accuracy {a.get('test_accuracy', float('nan')):.4f},\n"
              f"# {cost_key} {a.get(COSTS[cost_key])}, average weight bits {a.get('cost.avg_weight_bits', 0):.3f} "
              f"(MLflow run {a.get('mlflow_run_id')}).\n"
              f"# Core nics_fix format: copy to conf/fixed/<name>.yaml and train with fixed=<name>.\n")
    return header + yaml.safe_dump(a["fixed_config"], sort_keys=False, default_flow_style=None)


def summarize(study: optuna.Study, opts: Mapping, metric: str = "val_accuracy",
              reference: Mapping | None = None) -> dict:
    """Trial counts, the Pareto front (accuracy, cost) of complete trials, hypervolume, best picks."""
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    # A reused allocation (duplicate_of) repeats its twin's point: it is counted, not listed again.
    complete = [t for t in trials if t.state == TrialState.COMPLETE and "accuracy" in t.user_attrs
                and "duplicate_of" not in t.user_attrs]
    cost_key = COSTS[opts["cost"]]
    points = [(t.user_attrs["accuracy"], t.user_attrs[cost_key]) for t in complete]
    front = [complete[i] for i in pareto_front(points)]
    hv_points = [(t.user_attrs["accuracy"], t.user_attrs["cost.avg_weight_bits"]) for t in complete]
    hv_front = [hv_points[i] for i in pareto_front(hv_points)]
    summary = {
        "study_name": study.study_name, "n_trials": len(trials), "states": dict(states),
        "metric": metric, "cost": opts["cost"], "pareto": [t.number for t in front],
        "pareto_unique": len({(t.user_attrs["accuracy"], t.user_attrs[cost_key]) for t in front}),
        "hypervolume": hypervolume(hv_front, opts["hypervolume_reference"]) if hv_front else 0.0,
        "hypervolume_reference": list(opts["hypervolume_reference"]),
        "reference": dict(reference) if reference else None,
    }
    if reference:
        target = float(reference["accuracy"]) - float(opts["accuracy_delta"])
        within = [t for t in complete if t.user_attrs["accuracy"] >= target - 1e-12]
        if within:
            best = min(within, key=lambda t: (t.user_attrs["cost.avg_weight_bits"], -t.user_attrs["accuracy"]))
            summary["fewest_bits_within_delta"] = {
                "trial": best.number, "avg_weight_bits": best.user_attrs["cost.avg_weight_bits"],
                "accuracy": best.user_attrs["accuracy"], "test_accuracy": best.user_attrs.get("test_accuracy"),
                "target": target}
    if opts["objective"] != "pareto":
        with contextlib.suppress(ValueError):
            best = study.best_trial
            summary["best_trial"] = best.number
            summary["best_value"] = best.value
    return summary


def export(study: optuna.Study, opts: Mapping, summary: Mapping, output_dir: Path) -> dict[str, Path]:
    """Write pareto.csv, pareto/trial_<n>.yaml and trials.csv to ``output_dir``."""
    metric, cost_key = summary["metric"], opts["cost"]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    output_dir.mkdir(parents=True, exist_ok=True)
    pareto_dir = output_dir / "pareto"
    if pareto_dir.exists():
        for old in pareto_dir.glob("trial_*.yaml"):
            old.unlink(missing_ok=True)  # a worker sharing the folder may have removed it first
    pareto_dir.mkdir(exist_ok=True)
    rows = [_trial_row(by_number[n], metric, cost_key) for n in summary["pareto"]]
    for row in rows:
        row.pop("state")
    _write_csv(output_dir / "pareto.csv", rows)
    for n in summary["pareto"]:
        text = _yaml_text(by_number[n], study.study_name, metric, cost_key)
        checkpoint.atomic_write(pareto_dir / f"trial_{n}.yaml", lambda tmp, text=text: tmp.write_text(text))
    _write_csv(output_dir / "trials.csv", [_trial_row(t, metric, cost_key) for t in by_number.values()])
    return {"pareto_csv": output_dir / "pareto.csv", "pareto_dir": pareto_dir,
            "trials_csv": output_dir / "trials.csv"}


def format_summary(study: optuna.Study, opts: Mapping, summary: Mapping) -> str:
    metric, cost_key = summary["metric"], COSTS[opts["cost"]]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    states = ", ".join(f"{n} {s}" for s, n in sorted(summary["states"].items()))
    lines = [f"Study {summary['study_name']}: {summary['n_trials']} trials ({states or 'none'})"]
    ref = summary.get("reference")
    if ref:
        lines.append(f"Float reference: {metric} {ref['accuracy']:.4f}"
                     + (f" (run {ref['run_id']})" if ref.get("run_id") else f" ({ref.get('source')})"))
    hv_ref = summary["hypervolume_reference"]
    lines.append(f"Pareto front ({metric} up, {opts['cost']} down): {len(summary['pareto'])} trials, "
                 f"hypervolume {summary['hypervolume']:.4f} (accuracy x avg weight bits, reference "
                 f"acc={hv_ref[0]:g}, bits={hv_ref[1]:g})")
    header = f"  {'trial':>5}  {metric:>12}  {'test_acc':>8}  {'avg_w_bits':>10}  {opts['cost']:>12}  bits"
    lines.append(header)
    for n in summary["pareto"]:
        a = by_number[n].user_attrs
        mark = f" [baseline {a['baseline']}]" if a.get("baseline") else ""
        lines.append(f"  {n:>5}  {a['accuracy']:>12.4f}  {a.get('test_accuracy', float('nan')):>8.4f}  "
                     f"{a['cost.avg_weight_bits']:>10.3f}  {_fmt_cost(a[cost_key]):>12}  "
                     f"{bits_summary(a.get('bits', {}), opts['quantities'])}{mark}")
    best = summary.get("fewest_bits_within_delta")
    if best:
        lines.append(f"Fewest average weight bits with {metric} >= float - {opts['accuracy_delta']:g} "
                     f"({best['target']:.4f}): {best['avg_weight_bits']:.3f} (trial {best['trial']}, "
                     f"{metric} {best['accuracy']:.4f}, test {best['test_accuracy']:.4f})")
    elif ref:
        lines.append(f"No complete trial reached {metric} >= float - {opts['accuracy_delta']:g}")
    if "best_trial" in summary:
        lines.append(f"Best trial ({opts['objective']}): {summary['best_trial']} (value {summary['best_value']:.6g})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry


def run_search(cfg: Mapping, output_dir: str | Path | None = None, choices: Mapping | None = None) -> dict:
    """Run (or resume) one bit allocation search; return its summary.

    ``cfg`` is the composed ``conf/search.yaml`` as a plain dict: a train
    config plus the ``search`` group. ``output_dir`` holds the default SQLite
    storage and the exported files (default ``outputs/search/<study_name>``, as under Hydra).
    """
    cfg = copy.deepcopy(dict(cfg))
    opts = search_options(cfg.pop("search", None))
    choices = dict(choices if choices is not None else tracking.hydra_choices())
    study_name = opts["study_name"] or default_study_name(cfg, opts)
    output_dir = Path(output_dir) if output_dir is not None else Path("outputs") / "search" / study_name
    output_dir.mkdir(parents=True, exist_ok=True)
    storage_url = opts["storage"] or default_storage(output_dir)
    trainer = cfg["trainer"]

    # Everything that can be checked before any run starts is checked here.
    check_trainer(trainer)
    data = load_dataset(dict(cfg["data"], seed=cfg["data"].get("seed", trainer.get("seed", 0))))
    if not len(data.x_val):
        print("warning: data.val_split is 0: trials are selected on the test set", flush=True)
    model, _ = build(cfg, data, choices)
    space = search_space(model, opts)
    if not space:
        raise SearchConfigError("search: nothing to search (every point is pinned or excluded)")

    mlcfg = cfg.get("mlflow") or {}
    experiment_name = mlcfg.get("experiment_name", "nics_fix")
    previous_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        # SIGTERM (schedulers, kill): the running trial's run ends KILLED, its trial FAIL, this search KILLED.
        with _sigterm_as_interrupt():
            study = open_study(opts, study_name, storage_url, on_stale_trial=_stale_trial_callback(experiment_name))
            check_compatible(study, space)
            # Offset by the stored trials, so a resumed search does not replay its first samples; spread
            # by a large prime, so workers with seeds i and i+1 never land on one seed (seed + n did, when
            # the second started one trial later).
            seed = None if opts["seed"] is None else int(opts["seed"]) * 1_000_003 + len(study.trials)
            study.sampler = make_sampler(opts, seed)

            tracking.setup(mlcfg.get("tracking_uri"), experiment_name)
            try:
                close_stale(study, mlflow.get_experiment_by_name(experiment_name).experiment_id)
            except Exception as err:  # noqa: BLE001 - the search itself can go on: say it
                _warn(f"could not close what dead workers left RUNNING ({type(err).__name__}: {err})")
            tags = {**tracking.base_tags("search"), **checkpoint.process_tags(), "optuna.study_name": study_name}
            parent = mlflow.start_run(run_name=f"search-{study_name}", tags=tags)
            try:
                with checkpoint.heartbeat(parent.info.run_id, opts["heartbeat_interval"]):
                    summary = _search_in_run(cfg, opts, data, model, space, study, storage_url, parent, choices,
                                             output_dir)
            except BaseException as err:
                _end_runs(parent.info.run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED",
                          f"{type(err).__name__}: {err}")
                raise
            _end_runs(parent.info.run_id, "KILLED" if summary["interrupted"] else "FINISHED")
        return summary
    finally:
        optuna.logging.set_verbosity(previous_level)


def _end_runs(parent_id: str, status: str, error: str | None = None) -> None:
    """End the active runs down to and including the search run (a nested one left open too)."""
    if error:
        MlflowClient().set_tag(parent_id, "error", error[:5000])
    while (active := mlflow.active_run()) is not None:
        mlflow.end_run(status)
        if active.info.run_id == parent_id:
            break


def _fail_own_trials(study: optuna.Study, reason: str) -> None:
    """After an interrupt: this process's trials still RUNNING become FAIL (none is left to a heartbeat)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if checkpoint.local_pid(trial.user_attrs) == os.getpid():
            _fail_trial(study, trial, reason)


def _search_in_run(cfg, opts, data, model, space, study, storage_url, parent, choices, output_dir):
    run_id = parent.info.run_id
    study_name = study.study_name
    params = tracking.flatten(opts, "search")
    params.update({"search.study_name": study_name, "search.storage": safe_url(storage_url),
                   "search.dimensions": len(space), "search.parameters": len(search_params(space)),
                   "search.pruner_used": pruner_name(opts)})
    for group in ("data", "model", "trainer", "strategy"):
        params.update(tracking.flatten(cfg.get(group) or {}, group))
    params.update({f"choice.{k}": v for k, v in choices.items()})
    tracking.log_batch(run_id, params=params)
    mlflow.log_text(yaml.safe_dump(tracking.without_passwords({**cfg, "search": opts}), sort_keys=False),
                    "config/search_config.yaml")

    metric = "val_accuracy" if len(data.x_val) else "test_accuracy"
    print(f"search {study_name}: {len(space)} points, {len(search_params(space))} parameters over widths "
          f"{opts['widths']}; {opts['objective']} ({metric}, {opts['cost']}), sampler {opts['sampler']}, "
          f"pruner {pruner_name(opts)}; storage {safe_url(storage_url)} ({len(study.trials)} trials stored); "
          f"MLflow parent run {run_id}", flush=True)
    with tracking.store_lock(storage_url):  # workers starting together: one trains it, the others read it
        reference = _float_reference(cfg, opts, study, choices)
    target = None if reference is None else float(reference["accuracy"]) - float(opts["accuracy_delta"])
    study.pruner = make_pruner(opts, int(cfg["trainer"].get("epochs", 1)), target)
    waiting = enqueue_uniform_baseline(study, space, opts["widths"]) if opts["baseline"] == "uniform" else 0

    search = _Search(cfg, opts, data, model, space, study, run_id, parent.info.experiment_id, choices,
                     target, output_dir)
    n_trials = None if opts["n_trials"] is None else int(opts["n_trials"]) + waiting
    print(f"running {n_trials if n_trials is not None else 'unlimited'} trials"
          + (f" ({waiting} of them the uniform baseline)" if waiting else "")
          + (f", timeout {opts['timeout']} s" if opts["timeout"] else ""), flush=True)
    interrupted = False
    if n_trials != 0:
        try:
            study.optimize(search.objective, n_trials=n_trials, timeout=opts["timeout"],
                           catch=(Exception,), callbacks=[search.progress])
        except KeyboardInterrupt as err:
            interrupted = True
            interrupt_handled()
            _fail_own_trials(study, f"interrupted ({err or 'KeyboardInterrupt'})")
            MlflowClient().set_tag(run_id, "error", f"KeyboardInterrupt: {err or 'interrupted'}")
            print("interrupted: exporting what is done", flush=True)

    summary = summarize(study, opts, search.metric, reference)
    with tempfile.TemporaryDirectory() as own:  # workers may share output_dir: log this process's copy
        files = export(study, opts, summary, Path(own))
        mlflow.log_artifact(str(files["pareto_csv"]))
        mlflow.log_artifact(str(files["trials_csv"]))
        if any(files["pareto_dir"].iterdir()):
            mlflow.log_artifacts(str(files["pareto_dir"]), "pareto")
    export(study, opts, summary, output_dir)
    metrics = {"search.trials": summary["n_trials"], "search.pareto_points": len(summary["pareto"]),
               "search.hypervolume": summary["hypervolume"]}
    for state in ("COMPLETE", "PRUNED", "FAIL"):
        metrics[f"search.trials_{state.lower()}"] = summary["states"].get(state, 0)
    if reference:
        metrics["search.float_accuracy"] = float(reference["accuracy"])
    if summary.get("fewest_bits_within_delta"):
        metrics["search.fewest_avg_weight_bits_within_delta"] = summary["fewest_bits_within_delta"]["avg_weight_bits"]
    tracking.log_batch(run_id, metrics=metrics)
    print(format_summary(study, opts, summary), flush=True)
    print(f"Pareto CSV and fixed configs: {output_dir}/pareto.csv, {output_dir}/pareto/ "
          f"(MLflow run {run_id}, artifacts pareto.csv and pareto/)", flush=True)
    if search.input_error is not None:  # the search fails; what it recorded and exported stays
        raise search.input_error
    summary.update({"parent_run_id": run_id, "storage": safe_url(storage_url), "output_dir": str(output_dir),
                    "interrupted": interrupted})
    return summary
