"""``trainer.jit_compile: auto``: the rule, and a job that measures, records and keeps its choice."""

from __future__ import annotations

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from experiments import jit_choice
from experiments.training import run_training
from tests.test_platform import compose_train


def _times(plain_ms, xla_ms, plain_compile=1.0, xla_compile=3.0):
    return {"plain": {"step_s": plain_ms / 1e3, "compile_s": plain_compile},
            "xla": {"step_s": xla_ms / 1e3, "compile_s": xla_compile}}


def test_xla_is_chosen_only_when_faster_and_its_compilation_pays_off():
    assert jit_choice.decide(_times(10.0, 8.0), job_steps=10_000)[0] is True  # saves 20 s for 2 s
    slow, reason = jit_choice.decide(_times(10.0, 9.8), job_steps=10_000)  # 2 %: below MIN_GAIN
    assert slow is False and "9.80 ms vs 10.00 ms" in reason
    short, reason = jit_choice.decide(_times(10.0, 8.0), job_steps=500)  # saves 1 s, costs 2 s
    assert short is False and "compilation costs 2.0 s" in reason


def test_fixed_settings_and_short_jobs_are_not_measured():
    def build(jit):
        raise AssertionError("no measurement expected")

    assert jit_choice.choose({"jit_compile": True}, build, None, None, 10**6, lambda: None) == (True, {}, {})
    flag, params, metrics = jit_choice.choose({"jit_compile": "auto"}, build, None, None, 10, lambda: None)
    assert flag is False and params["jit_compile.choice"] is False and metrics == {}
    assert "shorter than" in params["jit_compile.reason"]


@pytest.fixture
def store(tmp_path):
    yield f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_auto_job_records_its_choice_and_trains_as_that_fixed_setting(store, tmp_path, monkeypatch):
    monkeypatch.setattr(jit_choice, "MIN_JOB_STEPS", 0)
    monkeypatch.setattr(jit_choice, "REPETITIONS", 2)
    monkeypatch.setattr(jit_choice, "STEPS", 1)
    auto = run_training(compose_train(["fixed=w8a8", "trainer.jit_compile=auto"], store),
                        output_dir=tmp_path / "auto", choices={})
    run = MlflowClient(store).get_run(auto["run_id"])
    params, metrics = run.data.params, run.data.metrics
    assert params["trainer.jit_compile"] == "auto" and params["jit_compile.choice"] in ("True", "False")
    for name in ("plain", "xla"):
        assert metrics[f"jit_compile.step_ms.{name}"] > 0 and metrics[f"jit_compile.compile_s.{name}"] > 0
    choice = params["jit_compile.choice"] == "True"
    saved = yaml.safe_load((tmp_path / "auto" / "fixed_model" / "train_config.yaml").read_text())
    assert saved["trainer"]["jit_compile"] is choice  # evaluation compiles the model as it was trained
    fixed = run_training(compose_train(["fixed=w8a8", f"trainer.jit_compile={str(choice).lower()}"], store),
                         output_dir=tmp_path / "fixed", choices={})
    assert fixed["test_accuracy"] == auto["test_accuracy"] and fixed["val_loss"] == auto["val_loss"]
