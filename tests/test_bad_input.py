"""Bad input: every user-facing input fails with one clear message and a non-zero exit, not a traceback.

Config files (``--config-dir``), Hydra overrides, dataset paths, saved-model
paths, MLflow and Optuna URIs. Most checks call the Hydra entry points
in-process (``main()`` with ``sys.argv``; exit code from ``SystemExit``, message
from captured stderr); one test runs the real commands as subprocesses.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from experiments import data as data_module
from tests.conftest import REPO

CHEAP = ["data=synthetic", "data.num_examples=64", "data.test_examples=16", "model.hidden_units=[4]",
         "trainer.epochs=1", "trainer.verbose=0", "trainer.save_model=false", "trainer.checkpoint=false"]


@pytest.fixture
def store(tmp_path, mlflow_template):
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    yield f"sqlite:///{db}"
    mlflow.set_tracking_uri(None)


def run_main(module: str, *args: str, tmp_path: Path, capsys) -> tuple[int, str]:
    """Run an entry point's Hydra ``main()`` in-process: (exit code, stderr)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    entry = importlib.import_module(module)
    flags = [a for a in args if a.startswith("--")]  # Hydra wants its flags before the overrides
    overrides = [a for a in args if not a.startswith("--")]
    argv = [module, *flags, *overrides, f"hydra.run.dir={tmp_path / 'hydra'}", "hydra/job_logging=none",
            "hydra/hydra_logging=none"]
    capsys.readouterr()
    old_argv, sys.argv = sys.argv, argv
    code = 0
    try:
        entry.main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = old_argv
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    return code, capsys.readouterr().err


def one_error(code: int, err: str, *needles: str) -> str:
    """Our user errors: exit 2, exactly one ``error: ...`` message, no traceback; return its text."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    message = err[err.index("error:"):]
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    return message


def hydra_error(code: int, err: str, *needles: str) -> None:
    """Hydra's own errors (unknown group/key): exit 1, its one message, no traceback."""
    assert code == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"


# --------------------------------------------------------------------------- config files and overrides


BROKEN_FILES = {
    "fixed/too_wide.yaml": ("configs:\n  q: {weight: {data_config: {bit_width: 40, training: auto}}}\n"
                            "by_type: {Dense: q}\n"),
    "fixed/typo_key.yaml": "by_type:\n  Dense: {wieght: {data_config: {bit_width: 8, training: auto}}}\n",
    "fixed/bad_mode.yaml": "by_name:\n  dense1: {weight: {data_config: {bit_width: 8, training: sometimes}}}\n",
    "fixed/unknown_name.yaml": "by_type: {Dense: fix8}\n",
    "fixed/not_yaml.yaml": "by_type: {Dense: [\n",
    "fixed/python_tag.yaml": "configs: !!python/object/apply:os.system ['touch {marker}']\n",
    "strategy/bad_noise.yaml": ("by_type:\n  Dense: {name: noise_strategy, weight: {gradient_config: "
                                "{post: {type: gaussian}}}}\n"),
    "strategy/no_such_strategy.yaml": "by_name:\n  dense1: [{name: nosie_strategy}]\n",
}


def test_broken_fixed_and_strategy_files_in_a_config_dir(tmp_path, store, capsys):
    conf = tmp_path / "myconf"
    marker = tmp_path / "pwned"
    for name, text in BROKEN_FILES.items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(text.replace("{marker}", str(marker)))

    def train(choice):
        return run_main("experiments.train", f"--config-dir={conf}", choice, *CHEAP,
                        f"mlflow.tracking_uri={store}", tmp_path=tmp_path, capsys=capsys)

    where = f"{conf}/fixed/too_wide.yaml"
    one_error(*train("fixed=too_wide"), f"fixed=too_wide ({where})", "configs.q.weight.data_config.bit_width",
              "bit_width must be from 1 to 32, got 40")
    one_error(*train("fixed=typo_key"), "typo_key.yaml", "by_type.Dense.wieght", "unknown key")
    one_error(*train("fixed=bad_mode"), "by_name.dense1.weight.data_config.training", "sometimes",
              "auto, fixed, dynamic, none or an integer scale")
    one_error(*train("fixed=unknown_name"), "by_type.Dense", "fix8")
    one_error(*train("strategy=bad_noise"), f"strategy=bad_noise ({conf}/strategy/bad_noise.yaml)",
              "by_type.Dense.weight.gradient_config.post.type", "none, uniform, uniform_ratio", "'gaussian'")
    one_error(*train("strategy=no_such_strategy"), "by_name.dense1", "nosie_strategy", "noise_strategy")
    # Not YAML at all, or a Python tag: Hydra reads these files itself; one line with file and position.
    one_error(*train("fixed=not_yaml"), "not valid YAML", f"{conf}/fixed/not_yaml.yaml", "line 2")
    one_error(*train("fixed=python_tag"), "not valid YAML", "python/object/apply", "python_tag.yaml")
    assert not marker.exists()

    # Errors found inside a train job still end its MLflow run FAILED, with the same message.
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("nics_fix").experiment_id], max_results=100)
    assert len(runs) == 6 and {r.info.status for r in runs} == {"FAILED"}
    assert any("got 40" in r.data.tags["error"] for r in runs)


@pytest.mark.slow
def test_bad_overrides_of_fixed_strategy_trainer_model_and_search(tmp_path, store, capsys):
    def main(module, *overrides):
        cheap = CHEAP if module != "experiments.eval" else []
        return run_main(module, *cheap, f"mlflow.tracking_uri={store}", *overrides, tmp_path=tmp_path,
                        capsys=capsys)

    # Values inside the core YAML format: the message names the override and the key path.
    one_error(*main("experiments.train", "+fixed.by_name.dense1.weight.data_config.bit_width=40"),
              "with +fixed.by_name.dense1.weight.data_config.bit_width=40",
              "by_name.dense1.weight.data_config.bit_width", "got 40")
    one_error(*main("experiments.train", "fixed=w8a8", "fixed.configs.w8a8.weight.data_config.training=often"),
              "fixed=w8a8", "configs.w8a8.weight.data_config.training", "'often'")
    one_error(*main("experiments.train", "strategy=noise", "strategy.by_type.Dense.name=nope"),
              "unknown strategy 'nope'", "noise_strategy")
    # Trainer and model settings of the wrong type or range.
    one_error(*main("experiments.train", "trainer.epochs=abc"), "trainer.epochs must be an integer >= 1", "'abc'")
    one_error(*main("experiments.train", "trainer.batch_size=0"), "trainer.batch_size", "got 0")
    one_error(*main("experiments.train", "trainer.seed=x1"), "trainer.seed must be an integer")
    one_error(*main("experiments.train", "trainer.optimizer.name=adagrad"), "trainer.optimizer.name", "adagrad")
    one_error(*main("experiments.train", "model.hidden_units=abc"), "model.hidden_units", "positive integers")
    one_error(*main("experiments.train", "model.hidden_units=[8,-1]"), "model.hidden_units")
    one_error(*main("experiments.train", "model.name=resnet"), "model.name", "resnet", "mlp")
    one_error(*main("experiments.train", "data.val_split=2"), "data.val_split", "[0, 1)")
    one_error(*main("experiments.train", "data.name=imagenet"), "imagenet")
    one_error(*main("experiments.search", "search.widths=[0,4]"), "search.widths", "1 to 32")
    one_error(*main("experiments.search", "search.objective=fastest"), "search.objective", "pareto")
    # Every plain trainer and search value is type- and range-checked before anything runs.
    for override, needle in (
            ("trainer.seed=null", "trainer.seed must be an integer, got None"),
            ("trainer.optimizer.momentum=abc", "trainer.optimizer.momentum must be a number from 0 to 1 or null"),
            ("trainer.optimizer.momentum=-5", "got -5"),
            ("trainer.optimizer.weight_decay=abc", "trainer.optimizer.weight_decay must be a number >= 0"),
            ("trainer.optimizer.learning_rate=1e400", "trainer.optimizer.learning_rate must be a number > 0, got inf"),
            ("trainer.optimizer=adam", "trainer.optimizer must be a mapping"),
            ("trainer.lr_schedule.step_epochs=0", "trainer.lr_schedule.step_epochs must be an integer >= 1, got 0"),
            ("trainer.lr_schedule.gamma=abc", "trainer.lr_schedule.gamma must be a number"),
            ("trainer.lr_schedule.name=exp", "trainer.lr_schedule.name must be one of constant, cosine, step"),
            ("trainer.jit_compile=maybe", "trainer.jit_compile must be true, false or auto, got 'maybe'"),
            ("trainer.heartbeat_interval=0", "trainer.heartbeat_interval must be an integer >= 1 or null"),
            ("trainer.epochs=${nope}", "Interpolation key 'nope' not found"),
            ("mlflow.experiment_name=null", "mlflow.experiment_name must be a non-empty name, got None"),
            ("mlflow.experiment_name=''", "mlflow.experiment_name must be a non-empty name, got ''")):
        one_error(*main("experiments.train", override), needle)
    for override, needle in (
            ("search.seed=abc", "search.seed must be an integer or null, got 'abc'"),
            ("search.n_startup_trials=abc", "search.n_startup_trials must be an integer >= 0"),
            ("search.population_size=-1", "search.population_size must be an integer >= 2, got -1"),
            ("search.heartbeat_interval=abc", "search.heartbeat_interval must be an integer >= 1 or null"),
            ("search.hypervolume_reference=[a,b]", "search.hypervolume_reference: expected [accuracy"),
            ("search.share_by_type=abc", "search.share_by_type must be true or false"),
            ("search.accuracy_delta=abc", "search.accuracy_delta must be a number >= 0"),
            ("search.data_config={training:autoo}", "search.data_config.training: mode must be one of"),
            ("search.gradient_config={training:sometimes}", "search.gradient_config.training: mode must be one of")):
        one_error(*main("experiments.search", override), needle)

    # Unknown groups, options and keys: Hydra's own one message, exit 1.
    hydra_error(*main("experiments.train", "fixed=nonexistent"), "Could not find 'fixed/nonexistent'",
                "Available options in 'fixed'", "w8a8")
    hydra_error(*main("experiments.train", "trainer.epochz=3"), "Could not override 'trainer.epochz'",
                "Key 'epochz' is not in struct")
    hydra_error(*main("experiments.train", "nosuchgroup=x"), "Could not override 'nosuchgroup'")
    hydra_error(*main("experiments.search", "search.nope=1"), "Key 'nope' is not in struct")
    hydra_error(*main("experiments.eval", "modelpath=/x"), "Key 'modelpath' is not in struct")
    hydra_error(*main("experiments.train", "trainer.epochs=[1"), "no viable alternative at input '[1'",
                "override_grammar")


# --------------------------------------------------------------------------- data sets


def test_missing_dataset_paths(tmp_path, store, capsys, monkeypatch):
    monkeypatch.setenv("NICS_FIX_OFFLINE", "1")  # no download attempt (none would work here anyway)
    for name in ("mnist", "fashion_mnist"):
        code, err = run_main("experiments.train", f"data={name}", "data.path=/nonexistent/idx", "trainer.epochs=1",
                             f"mlflow.tracking_uri={store}", tmp_path=tmp_path, capsys=capsys)
        one_error(code, err, f"Could not load {name}", "/nonexistent/idx (does not exist)",
                  "downloads are off (NICS_FIX_OFFLINE=1)", "Fix: put them in one directory and set data.path=")
    code, err = run_main("experiments.train", "data=cifar10", "data.path=/nonexistent/cifar", "trainer.epochs=1",
                         f"mlflow.tracking_uri={store}", tmp_path=tmp_path, capsys=capsys)
    one_error(code, err, "cifar10", "/nonexistent/cifar")
    empty = tmp_path / "empty_idx"
    empty.mkdir()
    code, err = run_main("experiments.search", "data=mnist", f"data.path={empty}", tmp_path=tmp_path,
                         capsys=capsys)
    one_error(code, err, f"{empty} (", "train-images-idx3-ubyte")


def test_download_fallback_gives_up_on_a_silent_network(tmp_path, monkeypatch):
    """A server that accepts and never answers: the Keras download fails after the socket timeout."""
    import urllib.request

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/mnist.npz"

    def download(name):
        with urllib.request.urlopen(url) as response:  # no timeout given, as in keras.utils.get_file
            return response.read()

    monkeypatch.setattr(data_module, "_keras_load", download)
    monkeypatch.setenv("NICS_FIX_DOWNLOAD_TIMEOUT", "1")
    monkeypatch.delenv("NICS_FIX_OFFLINE", raising=False)
    start = time.time()
    try:
        with pytest.raises(data_module.DataError, match="timed out") as info:
            data_module.load_dataset({"name": "mnist", "path": str(tmp_path / "nothing")})
    finally:
        server.close()
    assert time.time() - start < 10
    assert "NICS_FIX_OFFLINE=1 skips the download" in str(info.value)
    assert socket.getdefaulttimeout() is None  # restored


# --------------------------------------------------------------------------- saved models


def test_bad_saved_model_paths_and_run_ids(tmp_path, store, capsys):
    def evaluate(*overrides):
        return run_main("experiments.eval", f"mlflow.tracking_uri={store}", *overrides, tmp_path=tmp_path,
                        capsys=capsys)

    one_error(*evaluate("model_path=/nonexistent/fixed_model"), "model_path=/nonexistent/fixed_model: no such folder")
    junk = tmp_path / "not_a_model"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    one_error(*evaluate(f"model_path={junk}"), str(junk), "not a saved fixed model", "fixed_model_saver")
    one_error(*evaluate("run_id=0123456789abcdef0123456789abcdef"), "run_id=0123456789abcdef0123456789abcdef",
              "not found")
    client = MlflowClient(store)
    bare = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    one_error(*evaluate(f"run_id={bare}"), f"run_id={bare}", "cannot read the run's fixed_model artifact")
    one_error(*evaluate(), "give exactly one of run_id=")
    one_error(*evaluate("run_id=abc", "model_path=/x"), "give exactly one of run_id=")
    one_error(*evaluate("run_id=12345"), "run_id=12345", "not found")  # Hydra hands over an int

    import keras

    import nics_fix as nf

    saved = tmp_path / "fixed_model"
    with nf.fixed_scope("saved"):
        model = keras.Sequential([keras.Input((4,)), nf.Dense(2, name="dense1")])
    nf.fixed_model_saver(model).save(saved)
    for text, needle in ((b"- a\n- b\n", "missing or not a mapping: trainer, data, model"),
                         (b"trainer: {}\n", "missing or not a mapping: data, model"),
                         (b"a: [\n", "not a readable YAML train config"),
                         (b"x: !!python/object/apply:os.system ['true']\n", "not a readable YAML train config"),
                         (b"\xff\xfe", "'utf-8' codec can't decode")):
        (saved / "train_config.yaml").write_bytes(text)
        one_error(*evaluate(f"model_path={saved}"), f"{saved}/train_config.yaml", needle)


# --------------------------------------------------------------------------- MLflow and Optuna URIs


def test_bad_tracking_uris_fail_fast(tmp_path, capsys):
    def train(uri):
        start = time.time()
        code, err = run_main("experiments.train", *CHEAP, f"mlflow.tracking_uri={uri}", tmp_path=tmp_path,
                             capsys=capsys)
        return code, err, time.time() - start

    fix = "Fix: point mlflow.tracking_uri at a reachable store"
    code, err, _ = train("bogus://x")
    one_error(code, err, "mlflow.tracking_uri=bogus://x:", "unsupported URI", fix)
    code, err, took = train("http://127.0.0.1:1")  # nobody listens: MLflow alone retries for minutes
    one_error(code, err, "mlflow.tracking_uri=http://127.0.0.1:1: no tracking server answers there", fix)
    assert took < 15
    code, err, took = train("postgresql+psycopg2://user:secret@127.0.0.1:1/mlflow")  # MLflow alone: ~100 s
    one_error(code, err, "user:***@127.0.0.1:1/mlflow: cannot connect to the database", fix)
    assert "secret" not in err and took < 15
    code, err = run_main("experiments.eval", "model_path=/x", "mlflow.tracking_uri=bogus://x", tmp_path=tmp_path,
                         capsys=capsys)
    one_error(code, err, "mlflow.tracking_uri=bogus://x:")
    mlflow.set_tracking_uri(None)

    # Where the user set nothing, the platform's MLflow HTTP settings: about 2 minutes of retries, not 4.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    shown = subprocess.run(
        [sys.executable, "-c", ("import os, experiments; print(*(os.environ['MLFLOW_HTTP_REQUEST_' + k] "
                                "for k in ('MAX_RETRIES', 'BACKOFF_FACTOR', 'TIMEOUT')))")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert shown.stdout.split() == ["7", "1", "30"]


def test_sqlite_tracking_uris_that_cannot_be_a_store(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a database")
    for uri, needle in ((f"sqlite:///{tmp_path}", f"{tmp_path} is a folder, not a database file"),
                        (f"sqlite:///{tmp_path}/notes.txt", f"{tmp_path}/notes.txt exists and is not a SQLite database"),
                        ("sqlite:////proc/nics_fix/mlflow.db", "cannot write in /proc/nics_fix")):
        start = time.time()
        code, err = run_main("experiments.train", *CHEAP, f"mlflow.tracking_uri={uri}", tmp_path=tmp_path,
                             capsys=capsys)
        one_error(code, err, f"mlflow.tracking_uri={uri}: {needle}")
        assert time.time() - start < 15  # a folder made MLflow retry for ~110 s before
    mlflow.set_tracking_uri(None)


def test_a_search_stops_at_the_first_trial_that_fails_on_bad_input(tmp_path, store, capsys):
    """Input found bad only when a trial runs fails every trial alike: the first one stops the search."""
    code, err = run_main("experiments.search", *CHEAP, f"mlflow.tracking_uri={store}", "search.n_trials=3",
                         "search.float_reference=false", "search.storage=sqlite:///" + str(tmp_path / "o.db"),
                         "trainer.optimizer.name=nadam", tmp_path=tmp_path, capsys=capsys)
    assert code == 2 and "trainer.optimizer.name must be one of" in err  # caught before any trial
    monkey = pytest.MonkeyPatch()
    from experiments import search_trials, searching

    def bad_input(*args, **kwargs):
        raise searching.SearchConfigError("search.pin.dense9: no such layer (a stand-in for input a trial finds bad)")

    monkey.setattr(search_trials, "run_training", bad_input)
    try:
        code, err = run_main("experiments.search", *CHEAP, f"mlflow.tracking_uri={store}", "search.n_trials=3",
                             "search.float_reference=false", "search.storage=sqlite:///" + str(tmp_path / "o.db"),
                             tmp_path=tmp_path, capsys=capsys)
    finally:
        monkey.undo()
    one_error(code, err, "search.pin.dense9: no such layer")
    import optuna

    study = optuna.load_study(study_name=optuna.get_all_study_names(f"sqlite:///{tmp_path / 'o.db'}")[0],
                              storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL"]  # not 3 failed trials and exit 0
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("nics_fix").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]  # the trial and the search, nothing RUNNING


def test_bad_optuna_storage_urls(tmp_path, store, capsys):
    def search(storage):
        start = time.time()
        code, err = run_main("experiments.search", *CHEAP, f"mlflow.tracking_uri={store}",
                             f"search.storage={storage}", tmp_path=tmp_path, capsys=capsys)
        return code, err, time.time() - start

    code, err, _ = search("notadb://")
    one_error(code, err, "search.storage=notadb://: cannot open Optuna study", "Can't load plugin",
              "Fix: give an SQLAlchemy database URL")
    code, err, took = search("postgresql+psycopg2://user:secret@127.0.0.1:1/optuna")
    one_error(code, err, "search.storage=postgresql+psycopg2://user:***@127.0.0.1:1/optuna", "Connection refused")
    assert "secret" not in err and took < 15
    (tmp_path / "a_file").write_text("not a folder")
    code, err, _ = search(f"sqlite:///{tmp_path}/a_file/optuna.db")
    one_error(code, err, f"search.storage=sqlite:///{tmp_path}/a_file/optuna.db", "cannot open Optuna study")
    # Nothing was recorded as a search: the storage is checked before the parent run starts.
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("nics_fix")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


# --------------------------------------------------------------------------- the real commands


@pytest.mark.slow
def test_real_commands_exit_non_zero_with_one_line(tmp_path):
    """The train entry point as users run it: exit code and stderr of a real process (the others share
    ``cli.user_errors`` and are checked in-process above)."""
    conf = tmp_path / "myconf" / "fixed"
    conf.mkdir(parents=True)
    (conf / "too_wide.yaml").write_text("by_type: {Dense: {weight: {data_config: {bit_width: 40, training: auto}}}}\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO), NICS_FIX_OFFLINE="1")
    uri = f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"
    commands = {
        "fixed file": (["experiments.train", f"--config-dir={tmp_path / 'myconf'}", "fixed=too_wide", uri,
                        *CHEAP], 2, "bit_width must be from 1 to 32, got 40"),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", *args, f"hydra.run.dir={tmp_path / name.replace(' ', '_')}"],
                                    cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _, _) in commands.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        _, code, needle = commands[name]
        assert proc.returncode == code, (name, err[-3000:])
        assert needle in err and "Traceback" not in err, (name, err[-3000:])
        if code == 2:
            assert sum(line.startswith("error:") for line in err.splitlines()) == 1, (name, err)
