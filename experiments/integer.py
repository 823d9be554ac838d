"""Integer deployment on the platform: a run's model exported as integers, and evaluated so.

``python -m experiments.export run_id=<id>`` writes the run's model with
:func:`nics_fix.export_integer_model` and logs it as the run's
``integer_model/`` artifact; ``python -m experiments.eval run_id=<id>
integer=true`` runs it with :class:`nics_fix.IntegerModel` on the test split.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

import nics_fix as nf
from experiments import tracking
from experiments.evaluation import EvalInputError, locate, restore

ARTIFACT = "integer_model"


def float_model_bytes(model) -> int:
    """Bytes of the model's weights as the float32 (or their own dtype) arrays Keras keeps."""
    return int(sum(np.asarray(v).nbytes for v in model.weights if "scale" not in v.name))


def run_export(cfg: Mapping) -> dict:
    """Export the model of ``run_id`` (or ``model_path``) as integers; log it to the run."""
    with tempfile.TemporaryDirectory() as tmp:
        folder, _, run_id = locate(cfg, tmp)
        if not run_id and not cfg.get("output"):
            raise EvalInputError("model_path= has no run to log the export to: give output=<folder> as well")
        model, _, _ = restore(folder)
        out = Path(cfg.get("output") or Path(tmp) / ARTIFACT)
        graph = nf.export_integer_model(model, out)
        results = {"integer_bytes": graph["bytes"], "float_bytes": float_model_bytes(model),
                   "path": str(out), "run_id": run_id}
        if run_id:
            with mlflow.start_run(run_id=run_id):
                mlflow.log_artifacts(str(out), ARTIFACT)
                mlflow.log_metrics({"integer_model.bytes": graph["bytes"],
                                    "integer_model.float_bytes": results["float_bytes"]})
    return results


def _run_artifact(run_id: str | None, dst: Path) -> Path | None:
    if not run_id:
        return None
    try:
        names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, ARTIFACT)}
        if f"{ARTIFACT}/model.json" not in names:
            return None
        return Path(tracking.artifact_dir_of(run_id, ARTIFACT, dst))
    except MlflowException:
        return None


def evaluate_integer(model, data, run_id: str | None, folder: Path) -> dict:
    """Test accuracy with the integer engine, from the run's artifact or an export made here,
    and how many outputs equal the simulator's bit for bit."""
    found = _run_artifact(run_id, folder.parent / "downloaded")
    if found is None:
        nf.export_integer_model(model, folder)
        found = folder
    engine = nf.IntegerModel.load(found)
    floats = engine.predict(data.x_test).floats
    simulated = model.predict(data.x_test, batch_size=256, verbose=0)
    correct = np.sum(np.argmax(floats, axis=-1) == data.y_test)
    accuracy = float(np.float32(correct) / np.float32(len(floats)))  # as Keras' float32 accuracy metric
    identical = int(np.sum(np.all(floats.reshape(len(floats), -1) == simulated.reshape(len(simulated), -1),
                                  axis=1)))
    return {"integer_test_accuracy": accuracy, "integer_identical_outputs": identical,
            "integer_outputs": len(floats), "integer_overflows": engine.overflows}
