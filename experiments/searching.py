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

import copy
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import mlflow
import optuna
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from experiments import checkpoint, config_files, tracking
from experiments.data import load_dataset
from experiments.search_export import export
from experiments.search_options import (  # noqa: F401 - the search's public names, in one place
    COSTS, DEFAULTS, QUANTITIES, SQLITE_TIMEOUT, SearchConfigError, default_storage, default_study_name,
    search_options)
from experiments.search_space import (  # noqa: F401
    Dimension, allocation, allocation_cost, allocation_fixed_config, search_params, search_space)
from experiments.search_stale import (  # noqa: F401
    SEARCH_RUN, WORKER_HOST, WORKER_PID, _fail_trial, _stale_trial_callback, _warn, close_stale)
from experiments.search_study import (  # noqa: F401
    check_compatible, enqueue_uniform_baseline, make_pruner, make_sampler, open_study, pruner_name)
from experiments.search_summary import bits_summary, format_summary, summarize  # noqa: F401
from experiments.search_trials import TrialRunner, float_reference
from experiments.training import _sigterm_as_interrupt, build, check_trainer, interrupt_handled


def run_search(cfg: Mapping, output_dir: str | Path | None = None, choices: Mapping | None = None) -> dict:
    """Run (or resume) one bit allocation search; return its summary.

    ``cfg`` is the composed ``conf/search.yaml`` as a plain dict: a train
    config plus the ``search`` group. ``output_dir`` holds the default SQLite
    storage and the exported files (default ``outputs/search/<study_name>``, as under Hydra).
    """
    cfg = copy.deepcopy(dict(cfg))
    opts = search_options(cfg.pop("search", None))
    choices = config_files.file_choices(cfg, choices if choices is not None else tracking.hydra_choices())
    cfg = config_files.load_config_files(cfg)  # the base fixed/strategy from the user's own files
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
    if opts["objective"] == "budget":
        check_budget(cfg, opts, data, model, space, choices)

    mlcfg = cfg.get("mlflow") or {}
    experiment_name = mlcfg.get("experiment_name", "nics_fix")
    previous_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        # SIGTERM (schedulers, kill): the running trial's run ends KILLED, its trial FAIL, this search KILLED.
        with _sigterm_as_interrupt():
            study = open_study(opts, study_name, storage_url, on_stale_trial=_stale_trial_callback(experiment_name),
                               model_cfg=cfg.get("model"))
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


def check_budget(cfg, opts, data, model, space, choices) -> None:
    """``search.budget`` below the cheapest allocation (every searched point at its narrowest width) fails now."""
    narrowest = {param: min(choices_) for param, choices_ in search_params(space).items()}
    fixed = allocation_fixed_config(model, allocation(model, space, narrowest, opts), cfg.get("fixed"), opts)
    cheapest = float(allocation_cost(cfg, data, fixed, choices)[COSTS[opts["cost"]]])
    if float(opts["budget"]) < cheapest:
        raise SearchConfigError(
            f"search.budget={opts['budget']:g} is below the cheapest allocation: {cheapest:g} ({opts['cost']}, every "
            f"searched point at {min(opts['widths'])} bits, pins as pinned), so every trial would be pruned; "
            f"give search.budget >= {cheapest:g}")


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
    params.update({"search.study_name": study_name, "search.storage": tracking.without_passwords(storage_url),
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
          f"pruner {pruner_name(opts)}; storage {tracking.without_passwords(storage_url)} ({len(study.trials)} trials stored); "
          f"MLflow parent run {run_id}", flush=True)
    reference = float_reference(cfg, opts, study, choices, storage_url)
    target = None if reference is None else float(reference["accuracy"]) - float(opts["accuracy_delta"])
    study.pruner = make_pruner(opts, int(cfg["trainer"].get("epochs", 1)), target)
    waiting = enqueue_uniform_baseline(study, space, opts["widths"]) if opts["baseline"] == "uniform" else 0

    search = TrialRunner(cfg, opts, data, model, space, study, run_id, parent.info.experiment_id, choices,
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
    summary.update({"parent_run_id": run_id, "storage": tracking.without_passwords(storage_url), "output_dir": str(output_dir),
                    "interrupted": interrupted})
    return summary
