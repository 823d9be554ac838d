"""The Optuna side of a search: sampler, pruner, directions and the stored study.

Example::

    study = open_study(search_options({}), "my-study", "sqlite:///optuna.db")
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence

import keras
import optuna
from optuna.trial import TrialState

from experiments import tracking
from experiments.search_options import SQLITE_TIMEOUT, SearchConfigError
from experiments.tracking import without_passwords
from experiments.search_space import Dimension, search_params, uniform_baseline_params


class PruningCallback(keras.callbacks.Callback):
    """Reports a per-epoch metric to an Optuna trial and raises ``TrialPruned`` when told to."""

    def __init__(self, trial: optuna.Trial, monitor: str = "val_accuracy", threshold: float | None = None):
        super().__init__()
        self.trial = trial
        self.monitor = monitor
        self.threshold = threshold  # ThresholdPruner's lower bound, to say why a trial stopped

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            if self.threshold is not None:
                why = f"below the accuracy target minus search.prune_slack ({self.threshold:.4f})"
            else:
                why = "below the median of earlier trials at this epoch"
            reason = f"{self.monitor} {float(value):.4f} at epoch {epoch + 1}, {why}"
            self.trial.set_user_attr("pruned", reason)
            raise optuna.TrialPruned(reason)


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


#: The options that make a study what it is: resuming with another value is refused (one study, one search).
SIGNATURE_KEYS = ("objective", "cost", "budget", "accuracy_delta", "sampler", "quantities", "widths", "grad_widths",
                  "share_by_type", "pin", "exclude", "data_config", "gradient_config")


def study_signature(opts: Mapping, model_cfg: Mapping | None = None) -> dict:
    """``{search.<key>: value}`` (and ``model``) as stored with the study, JSON-normalised."""
    signature = {f"search.{key}": opts[key] for key in SIGNATURE_KEYS}
    if model_cfg is not None:
        signature["model"] = dict(model_cfg)
    return json.loads(json.dumps(signature, sort_keys=True, default=str))


def _shown(value) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)


def open_study(opts: Mapping, study_name: str, storage_url: str, seed: int | None = None,
               pruner=None, on_stale_trial=None, model_cfg: Mapping | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (refused when it is another search: see :data:`SIGNATURE_KEYS`).

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
            f"search.storage={without_passwords(storage_url)}: cannot open Optuna study {study_name!r} there "
            f"({tracking.database_error_text(err)})\nFix: give an SQLAlchemy database URL that this machine can reach, "
            "e.g. sqlite:///path/optuna.db or postgresql+psycopg2://user:pass@host/db (null: sqlite "
            "in the run directory); a study of another search needs another search.study_name.") from None
    have = study.user_attrs
    for key, value in study_signature(opts, model_cfg).items():
        if key in have and have[key] != value:
            raise SearchConfigError(f"{key}: study {study_name!r} in {without_passwords(storage_url)} was run with "
                                    f"{key}={_shown(have[key])}, this search has {_shown(value)}; resume it with "
                                    f"the same settings, or start another study (search.study_name=...)")
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



def enqueue_uniform_baseline(study: optuna.Study, space: Sequence[Dimension], widths: Sequence[int]) -> int:
    """Enqueue the uniform allocations not already in the study; return how many wait to run."""
    for params in uniform_baseline_params(space, widths):
        study.enqueue_trial(params, user_attrs={"baseline": "uniform"}, skip_if_exists=True)
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
               if t.user_attrs.get("baseline") == "uniform")
