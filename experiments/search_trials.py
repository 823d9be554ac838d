"""One search trial as an MLflow child run of the search run, and the study's float reference run.

Example::

    search = TrialRunner(cfg, opts, data, model, space, study, parent_run_id, experiment_id, choices,
                         target, output_dir)
    study.optimize(search.objective, n_trials=4, callbacks=[search.progress])
"""

from __future__ import annotations

import copy
import os
import socket
import time
from collections.abc import Mapping

import keras
import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import nics_fix as nf

from experiments import tracking
from experiments.cli import user_error_types
from experiments.search_options import COSTS, SearchConfigError
from experiments.search_space import allocation, allocation_cost, allocation_fixed_config, search_params
from experiments.search_stale import SEARCH_RUN, WORKER_HOST, WORKER_PID, _warn
from experiments.search_study import PruningCallback, directions, pruner_name
from experiments.search_summary import _fmt_cost, bits_summary
from experiments.training import run_training


class TrialRunner:
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
        self.layer_index = {layer.name: i for i, layer in enumerate(nf.introspect.fixed_layers(model))}

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

    def layer_order(self, item) -> tuple:
        """Sort key of an allocation entry: the model's layer order, then weight before activation, data before grad."""
        (layer, quantity, direction), _ = item
        return (self.layer_index.get(layer, len(self.layer_index)), quantity != "weight", direction != "data")

    # -- the objective --------------------------------------------------------

    def objective(self, trial: optuna.Trial):
        # Who runs the trial: a later search closes it when this process is gone (close_stale).
        trial.set_user_attr(WORKER_HOST, socket.gethostname())
        trial.set_user_attr(WORKER_PID, os.getpid())
        trial.set_user_attr(SEARCH_RUN, self.parent_run_id)
        keras.backend.clear_session()
        params = {p: trial.suggest_categorical(p, list(c)) for p, c in search_params(self.space).items()}
        alloc = allocation(self.model, self.space, params, self.opts)
        bits = {f"{layer}.{q}.{d}": v for (layer, q, d), v in sorted(alloc.items(), key=self.layer_order)}
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
        threshold = (None if self.target is None or pruner_name(self.opts) != "threshold"
                     else float(self.target) - float(self.opts["prune_slack"]))
        callbacks = ([PruningCallback(trial, self.metric, threshold)] if self.pruning and self.metric == "val_accuracy"
                     else [])
        choices = {**self.choices, "fixed": "searched"}  # the base `fixed` choice is a param of the parent
        try:
            results = run_training(cfg, output_dir=None, choices=choices, run_tags=self.trial_tags(trial),
                                   nested=True, callbacks=callbacks)
        except optuna.TrialPruned:
            run_id = self.find_child(trial.number)
            if run_id:
                trial.set_user_attr("mlflow_run_id", run_id)
                self.client.delete_tag(run_id, "error")
                if trial.user_attrs.get("pruned"):
                    self.client.set_tag(run_id, "nics_fix.pruned", trial.user_attrs["pruned"])
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
        if attrs.get("pruned"):
            text.append(f"(pruned: {attrs['pruned']})")
        print(" | ".join(text), flush=True)


def float_reference(cfg, opts, study, choices, storage_url: str | None = None) -> dict | None:
    """The float run's accuracy: from the study (trained once per study) or trained now.

    Workers starting together take turns (the storage's lock): the first trains
    it, the others then find it in the study.
    """
    if opts["reference_accuracy"] is not None:
        return {"accuracy": float(opts["reference_accuracy"]), "run_id": None, "source": "search.reference_accuracy"}
    needed = opts["objective"] == "min_cost" or pruner_name(opts) == "threshold"
    if not (opts["float_reference"] or needed):
        return None
    with tracking.store_lock(storage_url or ""):
        return _float_reference(cfg, opts, study, choices, needed)


def _float_reference(cfg, opts, study, choices, needed) -> dict | None:
    attrs = study.user_attrs  # read from the storage: another worker may have trained it meanwhile
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
