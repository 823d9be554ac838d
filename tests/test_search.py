"""Bit allocation search: space from the model, Optuna study, MLflow record, resume, export.

Tiny runs: synthetic 8x8 data, an MLP with 8 hidden units, one epoch per trial,
MLflow and Optuna stores in temporary directories, everything in-process.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import keras
import mlflow
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

import nics_fix as nf
from experiments import search_trials, searching
from experiments.models import build_model
from experiments.training import run_training

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = ["data=synthetic", "data.num_examples=128", "data.test_examples=32", "model.hidden_units=[8]",
        "trainer.epochs=1", "trainer.batch_size=32", "search.float_reference=false"]


@pytest.fixture
def store(tmp_path, mlflow_template, request):
    """A fresh MLflow store in tmp_path and an experiment whose artifacts stay there too."""
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    uri = f"sqlite:///{db}"
    name = request.node.name
    MlflowClient(uri).create_experiment(name, artifact_location=str(tmp_path / "artifacts"))
    mlflow.set_tracking_uri(uri)
    return {"uri": uri, "experiment": name, "overrides": [f"mlflow.tracking_uri={uri}",
                                                           f"mlflow.experiment_name={name}"]}


def compose(*overrides) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = hydra_compose("search", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def search(store, out, *overrides) -> dict:
    cfg = compose(*TINY, *store["overrides"], *overrides)
    return searching.run_search(cfg, output_dir=out, choices={})


def runs(store, role=None):
    client = MlflowClient(store["uri"])
    exp = client.get_experiment_by_name(store["experiment"])
    found = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in found if role is None or r.data.tags.get("nics_fix.role") == role]


def load_study(out, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out}/optuna.db")


# --------------------------------------------------------------------------- no training


def model_points(model):
    """(layer, quantity) of every point, read from the layers themselves."""
    points = []
    for layer in nf.introspect.fixed_layers(model):
        kinds = {p.kind for p in layer.fixed_points.values()}
        points += [(layer.name, q) for q in ("weight", "activation") if q in kinds]
    return points


@pytest.mark.parametrize("model_cfg", [{"name": "mlp", "hidden_units": [8, 8]},
                                       {"name": "lenet5", "conv_filters": [2, 3], "hidden_units": [8]}])
def test_search_space_lists_exactly_the_models_points(model_cfg):
    model, _ = build_model(model_cfg, (8, 8, 1), 10)
    points = model_points(model)
    assert any(q == "weight" for _, q in points) and any(q == "activation" for _, q in points)

    space = searching.search_space(model)  # default: weight and activation data
    assert [(d.layer, d.quantity, d.direction) for d in space] == [(l, q, "data") for l, q in points]
    assert all(d.choices == (2, 3, 4, 5, 6, 8, 12, 16) and d.param == f"bits.{d.layer}.{d.quantity}.data"
               for d in space)

    everything = searching.search_space(model, {"quantities": list(searching.QUANTITIES), "widths": [4, 8],
                                                "grad_widths": [8, 16]})
    assert sorted(d.key for d in everything) == sorted((l, q, d) for l, q in points for d in ("data", "grad"))
    assert {d.choices for d in everything if d.direction == "grad"} == {(8, 16)}

    shared = searching.search_space(model, {"share_by_type": True})
    assert [d.key for d in shared] == [d.key for d in space]
    by_type = {}
    for layer in nf.introspect.fixed_layers(model):
        by_type.setdefault(type(layer).__name__, set()).add(layer.name)
    assert set(searching.search_params(shared)) == {f"bits.{t}.{q}.data" for t, names in by_type.items()
                                                    for l, q in points if l in names}

    first, last = points[0][0], points[-1][0]
    pinned = searching.search_space(model, {"pin": {first: 8, last: {"weight": "float"}}, "exclude": ["relu*"]})
    keys = {(d.layer, d.quantity) for d in pinned}
    assert keys == {(l, q) for l, q in points
                    if l != first and (l, q) != (last, "weight") and not l.startswith("relu")}
    with pytest.raises(searching.SearchConfigError, match="search.pin.nope"):
        searching.search_space(model, {"pin": {"nope": 8}})
    with pytest.raises(searching.SearchConfigError, match="search.quantities"):
        searching.search_space(model, {"quantities": ["weight.bias"]})


def test_allocation_becomes_a_core_fixed_config_over_the_base():
    base = {"configs": {"g16": {"weight": {"gradient_config": {"bit_width": 16, "training": "auto"}}}},
            "by_type": {"Dense": "g16"}}
    model, _ = build_model({"name": "mlp", "hidden_units": [8]}, (8, 8, 1), 10)
    opts = {"pin": {"dense2": {"weight": 8}}}
    space = searching.search_space(model, opts)
    params = {p: 4 for p in searching.search_params(space)}
    alloc = searching.allocation(model, space, params, opts)
    fixed = searching.allocation_fixed_config(model, alloc, base, opts)
    cfg = nf.parse_cfg_from_str(yaml.safe_dump(fixed))
    dense1, dense2, relu1 = (cfg.resolve(n, t) for n, t in
                             (("dense1", "Dense"), ("dense2", "Dense"), ("relu1", "ReLU")))
    assert (dense1.weight.data.bit_width, dense1.weight.data.training, dense1.weight.data.not_training) == \
        (4, "auto", "fixed")
    assert dense1.weight.gradient.bit_width == 16  # not searched: kept from the base config
    assert dense2.weight.data.bit_width == 8 and relu1.activation.data.bit_width == 4
    assert relu1.activation.gradient.is_float


def test_hypervolume_and_pareto_front():
    from analysis.pareto import hypervolume_points, pareto_indices  # the one implementation the search uses

    acc, cost = [0.9, 0.95, 0.85, 0.95], [4.0, 8.0, 6.0, 8.0]
    assert pareto_indices(acc, cost) == [0, 1, 3]
    assert hypervolume_points(acc, cost, (0.0, 32.0)) == pytest.approx(0.9 * 28 + 0.05 * 24)
    assert hypervolume_points([0.5], [40.0], (0.0, 32.0)) == 0.0
    import numpy as np
    from optuna._hypervolume import compute_hypervolume  # cross-check against Optuna's own
    rng = np.random.default_rng(0)
    pts = [(float(a), float(c)) for a, c in zip(rng.uniform(0, 1, 30), rng.uniform(1, 32, 30))]
    ours = hypervolume_points([a for a, _ in pts], [c for _, c in pts], (0.0, 32.0))
    theirs = compute_hypervolume(np.array([(-a, c) for a, c in pts]), np.array([0.0, 32.0]))
    assert ours == pytest.approx(theirs)


def test_search_config_composes_the_train_config():
    cfg = compose("+experiment=mnist_mlp", "search.pin={dense1:8,dense3:8}", "search.sampler=random")
    assert cfg["data"]["name"] == "mnist" and cfg["model"]["hidden_units"] == [512, 512]
    assert cfg["search"]["pin"] == {"dense1": 8, "dense3": 8}
    assert cfg["search"]["study_name"] == "mlp-mnist-pareto-weight_bits"
    assert cfg["trainer"]["verbose"] == 0 and set(cfg) >= {"fixed", "strategy", "mlflow"}
    assert searching.search_options(cfg["search"])["sampler"] == "random"
    with pytest.raises(searching.SearchConfigError, match="search.pruner"):
        searching.search_options({"pruner": "median"})  # multi-objective studies are not pruned


# --------------------------------------------------------------------------- searches


@pytest.mark.slow
def test_search_records_study_runs_pareto_and_resumes(store, tmp_path):
    out = tmp_path / "search"
    first = search(store, out, "search.n_trials=4", "search.widths=[2,4,8]")
    study = load_study(out, first["study_name"])
    assert len(study.trials) == 4 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]

    parent = [r for r in runs(store, "search")]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    parent_id = parent[0].info.run_id
    assert parent[0].data.params["search.study_name"] == first["study_name"]
    assert parent[0].data.params["search.storage"] == f"sqlite:///{out.resolve()}/optuna.db"
    children = runs(store, "trial")
    assert len(children) == 4
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parent_id and tags["optuna.state"] == "COMPLETE"
        assert tags["optuna.study_name"] == first["study_name"] and child.info.status == "FINISHED"
        trial = study.trials[int(tags["optuna.trial_number"])]
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        # The child is a train run: same params and metrics, bits as the trial chose them.
        for param, width in trial.params.items():
            assert child.data.params[param] == str(width)
        assert child.data.metrics["cost.total_weight_bits"] == trial.values[1]
        assert child.data.metrics["val_accuracy"] == pytest.approx(trial.values[0])
        assert "test_accuracy" in child.data.metrics

    # Pareto front: CSV + one core-format YAML per point, in the run and on disk.
    with open(out / "pareto.csv") as handle:
        rows = list(csv.DictReader(handle))
    front = {t.number for t in study.best_trials}
    assert {int(r["trial"]) for r in rows} == front
    for row in rows:
        trial = study.trials[int(row["trial"])]
        assert row["run_id"] == trial.user_attrs["mlflow_run_id"]
        assert float(row["val_accuracy"]) == pytest.approx(trial.values[0])
        assert float(row["cost"]) == trial.values[1]
        assert {k: int(v) for k, v in row.items() if k.startswith("bits.")} == trial.params
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent_id)}
    assert {"pareto.csv", "pareto", "trials.csv"} <= artifacts
    yamls = {a.path for a in MlflowClient().list_artifacts(parent_id, "pareto")}
    assert yamls == {f"pareto/trial_{n}.yaml" for n in front}

    # The same command again resumes: 8 trials, the first 4 untouched, a second parent run.
    before = [(t.number, t.params, t.values) for t in study.trials]
    second = search(store, out, "search.n_trials=4", "search.widths=[2,4,8]")
    study = load_study(out, first["study_name"])
    assert len(study.trials) == 8 and second["n_trials"] == 8
    assert [(t.number, t.params, t.values) for t in study.trials[:4]] == before
    parents = runs(store, "search")
    assert len(parents) == 2 and len({r.info.experiment_id for r in parents}) == 1
    assert len(runs(store, "trial")) == 8
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) > 4  # the sampler moved on

    # An exported Pareto YAML is a fixed config: it loads and trains as a train job's `fixed`.
    exported = sorted((out / "pareto").glob("trial_*.yaml"))
    assert exported
    n = int(exported[0].stem.split("_")[1])
    fixed = nf.parse_cfg_from_file(exported[0])
    cfg = compose(*TINY, *store["overrides"])
    cfg.pop("search")
    cfg["fixed"] = yaml.safe_load(exported[0].read_text())
    results = run_training(cfg, choices={})
    run = MlflowClient().get_run(results["run_id"])
    for key, width in study.trials[n].params.items():
        layer, quantity = key.split(".")[1:3]
        assert fixed.resolve(layer, "Dense" if layer.startswith("dense") else "ReLU") \
            .__getattribute__(quantity).data.bit_width == width
        assert run.data.params[key] == str(width)
    assert run.data.metrics["cost.total_weight_bits"] == study.trials[n].values[1]


def test_failing_trial_is_fail_and_failed_and_the_search_goes_on(store, tmp_path, monkeypatch):
    real = run_training

    class Blowup(keras.callbacks.Callback):  # a failure of the trial itself, not of the input
        def on_train_begin(self, logs=None):
            raise RuntimeError("bogus: simulated blow-up")

    def flaky(cfg, **kwargs):
        if kwargs["run_tags"]["optuna.trial_number"] == "0":
            kwargs["callbacks"] = list(kwargs["callbacks"]) + [Blowup()]
        return real(cfg, **kwargs)

    monkeypatch.setattr(search_trials, "run_training", flaky)
    out = tmp_path / "search"
    summary = search(store, out, "search.n_trials=2")
    study = load_study(out, summary["study_name"])
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert "bogus" in study.trials[0].user_attrs["error"]
    children = {r.data.tags["optuna.trial_number"]: r for r in runs(store, "trial")}
    assert children["0"].info.status == "FAILED" and children["0"].data.tags["optuna.state"] == "FAIL"
    assert "RuntimeError: bogus" in children["0"].data.tags["error"]
    assert children["1"].info.status == "FINISHED" and children["1"].data.tags["optuna.state"] == "COMPLETE"
    assert runs(store, "search")[0].info.status == "FINISHED"
    assert summary["states"] == {"FAIL": 1, "COMPLETE": 1}


@pytest.mark.slow
def test_uniform_baseline_enqueues_one_trial_per_width(store, tmp_path):
    out = tmp_path / "search"
    summary = search(store, out, "search.baseline=uniform", "search.widths=[3,8]", "search.n_trials=0")
    study = load_study(out, summary["study_name"])
    assert len(study.trials) == 2
    for trial, width in zip(study.trials, (3, 8)):
        assert trial.state.name == "COMPLETE" and trial.user_attrs["baseline"] == "uniform"
        assert set(trial.params.values()) == {width}
    assert all(r.data.tags["nics_fix.baseline"] == "uniform" for r in runs(store, "trial"))

    # Resuming does not enqueue them again; an allocation already trained is reused, not retrained.
    study.enqueue_trial(study.trials[0].params)
    search(store, out, "search.baseline=uniform", "search.widths=[3,8]", "search.n_trials=1")
    study = load_study(out, summary["study_name"])
    assert len(study.trials) == 3
    again = study.trials[2]
    assert again.user_attrs["duplicate_of"] == 0 and again.values == study.trials[0].values
    child = next(r for r in runs(store, "trial") if r.data.tags["optuna.trial_number"] == "2")
    assert child.data.tags["nics_fix.duplicate_of"] == "0" and child.data.tags["optuna.state"] == "COMPLETE"
    assert child.data.metrics["val_accuracy"] == study.trials[0].values[0]


def test_single_objective_budget_and_pruning(store, tmp_path):
    # Over budget: known before training, pruned at once, recorded as a KILLED child.
    out = tmp_path / "budget"
    from experiments.data import load_dataset

    cfg = compose(*TINY)
    data = load_dataset(cfg["data"])
    model, _ = build_model(cfg["model"], data.input_shape, data.num_classes)
    cheapest = 2 * sum(math.prod(w.shape) for w in model.trainable_weights)  # all at 2 bits: the least
    summary = search(store, out, "search.objective=budget", f"search.budget={cheapest}", "search.n_trials=1")
    study = load_study(out, summary["study_name"])
    assert [d.name for d in study.directions] == ["MAXIMIZE"]
    trial = study.trials[0]
    assert trial.state.name == "PRUNED" and trial.constraints["cost_budget"] > 0
    child = runs(store, "trial")[0]
    assert child.info.status == "KILLED" and child.data.tags["optuna.state"] == "PRUNED"

    # Per-epoch pruning through the Keras callback (threshold below an unreachable target).
    out = tmp_path / "min_cost"
    summary = search(store, out, "search.objective=min_cost", "search.reference_accuracy=1.0",
                     "search.accuracy_delta=0", "search.prune_slack=0", "search.pruner_warmup_epochs=0",
                     "search.n_trials=1")
    study = load_study(out, summary["study_name"])
    assert study.trials[0].state.name == "PRUNED" and study.trials[0].intermediate_values
    child = next(r for r in runs(store, "trial") if r.data.tags["optuna.study_name"] == summary["study_name"])
    assert child.info.status == "KILLED" and child.data.tags["optuna.state"] == "PRUNED"
    assert "error" not in child.data.tags and "val_accuracy" in child.data.metrics
    assert child.data.tags["nics_fix.pruned"] == study.trials[0].user_attrs["pruned"]
    assert "below the accuracy target minus search.prune_slack (1.0000)" in child.data.tags["nics_fix.pruned"]


def test_entry_point_runs_under_hydra(store, tmp_path, monkeypatch, capsys):
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from experiments import search as entry

    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["nics-fix-search", *TINY, *store["overrides"], "search.n_trials=0",
                                      f"hydra.run.dir={out}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    try:
        entry.main()
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    printed = capsys.readouterr().out
    assert "running 0 trials" in printed and "Pareto front" in printed
    assert (out / "optuna.db").exists() and (out / "pareto.csv").exists()
    parent = runs(store, "search")[0]
    assert parent.data.params["choice.search"] == "default"


@pytest.mark.skipif(not os.environ.get("NICS_FIX_TEST_POSTGRES"),
                    reason="NICS_FIX_TEST_POSTGRES (a PostgreSQL URL, see .ci/postgres.sh) is not set")
def test_two_workers_share_one_study_in_postgresql(store, tmp_path):
    import sqlalchemy

    server = sqlalchemy.engine.make_url(os.environ["NICS_FIX_TEST_POSTGRES"])
    database = f"nics_fix_search_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {database}"))
    url = server.set(database=database).render_as_string(hide_password=False)
    try:
        command = [sys.executable, "-m", "experiments.search", *TINY, *store["overrides"],
                   f"search.storage={url}", "search.study_name=shared", "search.n_trials=1"]
        workers = [subprocess.Popen([*command, f"search.seed={i}", f"hydra.run.dir={tmp_path / f'w{i}'}"],
                                    cwd=CONF.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for i in range(2)]
        outputs = [w.communicate(timeout=600)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], outputs
        study = optuna.load_study(study_name="shared", storage=url)
        assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
        assert study.trials[0].params != study.trials[1].params  # different seeds
        parents = runs(store, "search")
        assert len(parents) == 2
        assert {p.data.params["search.storage"] for p in parents} == {server.set(database=database).render_as_string()}
        children = runs(store, "trial")
        assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1]
        assert Counter(c.data.tags["mlflow.parentRunId"] for c in children) == {p.info.run_id: 1 for p in parents}
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        admin.dispose()
