"""A search is one study: resuming with other settings is refused, impossible budgets fail up front,
pruned trials say why, workers share one float reference, allocations read in layer order."""

from __future__ import annotations

import threading

import numpy as np
import optuna
import pytest

from experiments import search_trials, searching
from experiments.search_study import PruningCallback
from experiments.search_summary import bits_summary
from tests.test_search import TINY, compose, search, store  # noqa: F401 - store is a fixture


def test_resuming_a_study_with_other_settings_is_refused_naming_the_setting(store, tmp_path):  # noqa: F811
    out = tmp_path / "search"
    first = search(store, out, "search.n_trials=1", "search.widths=[4,8]", "search.pin={dense2:8}")
    study = optuna.load_study(study_name=first["study_name"], storage=f"sqlite:///{out}/optuna.db")
    assert list(study.trials[0].user_attrs["bits"]) == [  # layer order, the pinned layer in its place
        "dense1.weight.data", "dense1.activation.data", "relu1.activation.data", "dense2.weight.data",
        "dense2.activation.data"]
    with pytest.raises(searching.SearchConfigError) as err:
        search(store, out, "search.n_trials=1", "search.widths=[4,8]", "search.pin={dense2:8}",
               "search.sampler=random")
    assert str(err.value).startswith(f"search.sampler: study {first['study_name']!r} in sqlite:///")
    assert "was run with search.sampler='tpe', this search has 'random'" in str(err.value)
    with pytest.raises(searching.SearchConfigError, match=r"search.pin: .* was run with search.pin=\{\"dense2\": 8\}, "
                                                          r"this search has \{\"dense1\": 8\}"):
        search(store, out, "search.n_trials=1", "search.widths=[4,8]", "search.pin={dense1:8}")
    assert len(optuna.load_study(study_name=first["study_name"], storage=f"sqlite:///{out}/optuna.db").trials) == 1


def test_budget_below_the_cheapest_allocation_fails_before_any_trial(store, tmp_path):  # noqa: F811
    from experiments.data import load_dataset
    from experiments.models import build_model

    cfg = compose(*TINY)
    data = load_dataset(cfg["data"])
    model, _ = build_model(cfg["model"], data.input_shape, data.num_classes)
    weights = sum(int(np.prod(w.shape)) for w in model.trainable_weights)  # kernels and biases
    cheapest = 2 * weights  # every weight at the narrowest width, 2 bits
    with pytest.raises(searching.SearchConfigError) as err:
        search(store, tmp_path / "s", "search.objective=budget", f"search.budget={cheapest - 1}",
               "search.widths=[2,8]")
    assert f"search.budget={cheapest - 1} is below the cheapest allocation: {cheapest} (weight_bits" in str(err.value)
    assert f"give search.budget >= {cheapest}" in str(err.value)
    assert not (tmp_path / "s" / "optuna.db").exists()  # refused before the study was opened


def test_a_pruned_trial_says_why():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.9))
    trial = study.ask()
    callback = PruningCallback(trial, "val_accuracy", threshold=0.9)
    callback.on_epoch_end(0, {"val_accuracy": 0.95})  # above: goes on
    with pytest.raises(optuna.TrialPruned, match=r"val_accuracy 0.5000 at epoch 2, below the accuracy target "
                                                 r"minus search.prune_slack \(0.9000\)"):
        callback.on_epoch_end(1, {"val_accuracy": 0.5})
    assert trial.user_attrs["pruned"].startswith("val_accuracy 0.5000 at epoch 2")


def test_workers_starting_together_train_one_float_reference(tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="s", storage=storage)
    trained = []

    def fake_training(cfg, **kwargs):
        trained.append(threading.get_ident())
        threading.Event().wait(1.0)  # long enough for the other worker to ask meanwhile
        return {"test_accuracy": 0.9, "val_accuracy": 0.91, "run_id": f"run{len(trained)}"}

    monkeypatch.setattr(search_trials, "run_training", fake_training)
    opts = searching.search_options({})
    found = []

    def worker():
        study = optuna.load_study(study_name="s", storage=storage)
        found.append(search_trials.float_reference({"model": {}, "data": {}}, opts, study, {}, storage))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(trained) == 1
    assert sorted(r["source"] for r in found) == ["study", "trained"]
    assert {r["run_id"] for r in found} == {"run1"} and {r["accuracy"] for r in found} == {0.91}


def test_allocation_summary_is_labelled_per_layer_in_layer_order():
    bits = {"dense1.weight.data": 8, "dense1.activation.data": 6, "relu1.activation.data": None,
            "dense2.weight.data": 4, "dense2.weight.grad": 12, "dense2.activation.data": 8}
    assert bits_summary(bits, ["weight.data", "activation.data"]) == "dense1 w8 a6, relu1 af, dense2 w4 a8"
    assert bits_summary(bits, ["weight.data", "weight.grad", "activation.data"]) == \
        "dense1 w8 a6, relu1 af, dense2 w4 gw12 a8"
