"""The eval job's work: restore a saved fixed model and evaluate it.

A saved model is found by MLflow run id (its ``fixed_model/`` artifact) or by
path (a ``fixed_model`` folder written by the train job). The folder holds
``train_config.yaml``: the data, model, fixed and strategy configs needed to
rebuild the same model and the same test split.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException

import nics_fix as nf
from experiments import tracking
from experiments.data import load_dataset
from experiments.training import build, check_trainer, compile_model, evaluate, seed_everything


class EvalInputError(ValueError):
    """Neither a usable run id nor a usable model path was given."""


def _load_train_config(folder: Path) -> dict:
    path = folder / "train_config.yaml"
    if not path.is_file():
        raise nf.FixedModelError(f"{folder}: no train_config.yaml; is this a fixed_model folder "
                                 "written by experiments.train?")
    try:
        with open(path, encoding="utf-8") as handle:
            cfg = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise nf.FixedModelError(f"{path}: not a readable YAML train config ({' '.join(str(err).split())})") from None
    sections = cfg if isinstance(cfg, dict) else {}
    missing = [k for k in ("trainer", "data", "model") if not isinstance(sections.get(k), dict)]
    if missing:
        raise nf.FixedModelError(f"{path}: expected the train job's config (a mapping with trainer, data and "
                                 f"model sections), missing or not a mapping: {', '.join(missing)}")
    return cfg


def restore(folder: Path):
    """Rebuild the trained model from a fixed_model folder: ``(model, data, train_cfg)``."""
    nf.saving.read_manifest(folder)  # clear error if the folder is not a saved model
    train_cfg = _load_train_config(folder)
    trainer = train_cfg["trainer"]
    check_trainer(trainer)
    seed_everything(trainer.get("seed", 0), trainer)
    data_cfg = dict(train_cfg["data"])
    data_cfg.setdefault("seed", trainer.get("seed", 0))
    data = load_dataset(data_cfg)
    model, _ = build(train_cfg, data)
    nf.restore_fixed_model(model, folder)
    # Same loss/metrics and the same jit_compile as in training: XLA fuses ops
    # differently, and evaluation must reproduce the training run's numbers.
    compile_model(model, trainer, steps_per_epoch=1)
    return model, data, train_cfg


def locate(cfg: Mapping, tmp) -> tuple[Path, float | None, str | None]:
    """``(fixed_model folder, recorded test accuracy, run id)`` from ``run_id=`` or ``model_path=``
    (a run's artifact is downloaded into ``tmp``); sets up tracking."""
    mlcfg = cfg.get("mlflow") or {}
    run_id, model_path = cfg.get("run_id"), cfg.get("model_path")
    run_id = None if run_id is None else str(run_id)  # an all-digit id arrives as an int from Hydra
    if bool(run_id) == bool(model_path):
        raise EvalInputError("give exactly one of run_id=<MLflow run id> or model_path=<fixed_model folder>")
    tracking.setup(mlcfg.get("tracking_uri"), mlcfg.get("experiment_name", "nics_fix"))
    if run_id:
        try:
            recorded = mlflow.get_run(run_id).data.metrics.get("test_accuracy")
            folder = Path(tracking.artifact_dir_of(run_id, "fixed_model", tmp))
        except MlflowException as err:
            raise EvalInputError(f"run_id={run_id}: cannot read the run's fixed_model artifact "
                                 f"from {mlflow.get_tracking_uri()}: {err.message}") from None
        return folder, recorded, run_id
    folder = Path(model_path)
    if not folder.is_dir():
        raise EvalInputError(f"model_path={folder}: no such folder")
    return folder, None, None


def run_eval(cfg: Mapping) -> dict:
    """Evaluate a saved model; log to its run, a new run, or nowhere (``log_to``).

    ``integer=true`` also runs the integer engine on the test split (see
    :mod:`experiments.integer`) and says whether it matches the simulator exactly.
    """
    model_path = cfg.get("model_path")
    with tempfile.TemporaryDirectory() as tmp:
        folder, recorded, run_id = locate(cfg, tmp)
        model, data, train_cfg = restore(folder)
        loss, accuracy = evaluate(model, data, int(train_cfg["trainer"].get("batch_size", 64)))
        integer = None
        if cfg.get("integer"):
            from experiments.integer import evaluate_integer

            integer = evaluate_integer(model, data, run_id, Path(tmp) / "integer_model")
    results = {"test_loss": loss, "test_accuracy": accuracy, "recorded_test_accuracy": recorded,
               "reproduced": recorded is not None and recorded == accuracy}
    if integer is not None:
        results.update(integer)
        results["integer_matches"] = integer["integer_test_accuracy"] == accuracy
    log_to = cfg.get("log_to", "same")
    metrics = {"eval.test_loss": loss, "eval.test_accuracy": accuracy}
    if integer is not None:
        metrics["eval.integer_test_accuracy"] = integer["integer_test_accuracy"]
    if log_to == "same" and run_id:  # logged without reopening it: the training run keeps its start, end, duration
        tracking.log_batch(run_id, metrics=metrics)
    elif log_to in ("new", "same"):
        tags = tracking.base_tags("eval")
        if run_id:
            tags["nics_fix.evaluated_run"] = run_id
        else:
            tags["nics_fix.model_path"] = str(Path(model_path).resolve())
        with mlflow.start_run(tags=tags) as run:
            mlflow.log_metrics(metrics)
            results["eval_run_id"] = run.info.run_id
    elif log_to != "none":
        raise EvalInputError(f"log_to must be same, new or none, got {log_to!r}")
    return results
