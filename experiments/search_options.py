"""The ``search`` config group: its options, defaults and checks, the study name and storage URL.

Example::

    opts = search_options({"objective": "budget", "budget": 40_000})
    opts["sampler"]  # 'tpe' (the default)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import nics_fix as nf
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
        allowed = (("training", "not_training", "rounding") if key == "data_config" else ("training", "rounding"))
        allowed += tuple(nf.config.SCALE_DEFAULTS)  # granularity, block_size, axis, overflow_rate, window
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


# --------------------------------------------------------------------------- search space
