"""The train job's work: data, model in a fixed scope, Keras fit, MLflow record.

:func:`run_training` takes the composed config as a plain dict (Hydra's
``DictConfig`` converted by the entry point) so it can also be called from
Python, tests and the search.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
import yaml

import nics_fix as nf
from experiments import checkpoint, config_files, jit_choice, tracking
from experiments.compare_bits import check_compare_bits, compare_bits
from experiments.console import CompactEpochLogger
from experiments.cli import CONF_DIR
from experiments.data import Dataset, load_dataset
from experiments.models import build_model
from experiments.validate import TrainConfigError, check_mapping, check_value


def _fixed_pipeline(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Autotuning off: ``fit`` on NumPy arrays or an autotuned pipeline stalls for
    seconds at the start of many epochs on small CPUs; a fixed pipeline does not."""
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    return ds.prefetch(2).with_options(options)


def make_dataset(x, y, batch_size: int) -> tf.data.Dataset:
    """Batches of ``(x, y)`` in order (validation, test)."""
    return _fixed_pipeline(tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size))


def training_dataset(x, y, batch_size: int, seed: int, first_epoch: int = 0) -> tf.data.Dataset:
    """Endless shuffled batches, epoch after epoch from ``first_epoch``.

    Epoch ``e`` visits the examples in an order that depends only on
    ``(seed, e)``, so a job resumed from a checkpoint at epoch ``e`` sees the
    same batches as the job that was killed: with op determinism and nearest
    rounding, resuming gives the same weights, to the bit, as never stopping.
    (``Dataset.shuffle`` reshuffles per iterator instead, and restarts its
    sequence in every new process.) Use with ``fit(steps_per_epoch=...)``.
    """
    x, y = tf.constant(x), tf.constant(y)
    n = int(x.shape[0])

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64),
                                                                                       epoch]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_batches)
    return _fixed_pipeline(ds.map(lambda index: (tf.gather(x, index), tf.gather(y, index))))


OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "step")


def make_optimizer(trainer: Mapping, steps_per_epoch: int):
    """The Keras optimizer and learning-rate schedule of a trainer config (checked by :func:`check_trainer`)."""
    opt = dict(trainer.get("optimizer") or {})
    lr = float(opt.get("learning_rate", 1e-3))
    schedule = dict(trainer.get("lr_schedule") or {})
    kind = str(schedule.get("name", "constant")).lower()
    epochs = int(trainer.get("epochs", 1))
    if kind == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, epochs * steps_per_epoch))
    elif kind == "step":
        every = int(schedule.get("step_epochs", 10)) * steps_per_epoch
        gamma = float(schedule.get("gamma", 0.1))
        boundaries = list(range(every, epochs * steps_per_epoch, every))
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries, [lr * gamma ** i for i in range(len(boundaries) + 1)])
    wd = opt.get("weight_decay")
    name = str(opt.get("name", "adam")).lower()
    if name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=wd if wd is not None else 0.004)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=float(opt.get("momentum", 0.0) or 0.0), weight_decay=wd)
    optimizer = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop}[name]
    return optimizer(lr, weight_decay=wd)


def check_trainer(trainer: Mapping) -> None:
    """The trainer's plain settings, checked before any is used (a typo is a clear error, not a traceback)."""
    where = " (fix it in conf/trainer/ or on the command line)"

    def check(mapping, prefix, key, kind, minimum=None, maximum=None, nullable=False, required=False,
              above=False):
        if key in mapping or required:
            check_value(mapping.get(key), f"{prefix}{key}", kind, minimum, maximum, nullable,
                        TrainConfigError, where, above)

    check(trainer, "trainer.", "epochs", "int", 1, required=True)
    for key, minimum in (("seed", None), ("batch_size", 1), ("verbose", 0)):
        check(trainer, "trainer.", key, "int", minimum)
    check(trainer, "trainer.", "heartbeat_interval", "int", 1, nullable=True)
    for key in ("deterministic", "checkpoint", "save_model", "save_fixed_weight"):
        check(trainer, "trainer.", key, "bool")
    if trainer.get("jit_compile", False) not in (True, False, "auto"):
        raise TrainConfigError(f"trainer.jit_compile must be true, false or auto, got "
                               f"{trainer['jit_compile']!r}{where}")
    optimizer = check_mapping(trainer.get("optimizer"), "trainer.optimizer", TrainConfigError, where)
    check(optimizer, "trainer.optimizer.", "learning_rate", "number", 0, above=True)
    check(optimizer, "trainer.optimizer.", "momentum", "number", 0, 1, nullable=True)
    check(optimizer, "trainer.optimizer.", "weight_decay", "number", 0, nullable=True)
    schedule = check_mapping(trainer.get("lr_schedule"), "trainer.lr_schedule", TrainConfigError, where)
    check(schedule, "trainer.lr_schedule.", "step_epochs", "int", 1)
    check(schedule, "trainer.lr_schedule.", "gamma", "number", 0)
    for mapping, key, names in ((optimizer, "trainer.optimizer.name", OPTIMIZERS),
                                (schedule, "trainer.lr_schedule.name", SCHEDULES)):
        name = str(mapping.get("name", names[0])).lower()
        if name not in names:
            raise TrainConfigError(f"{key} must be one of {', '.join(names)}, got {name!r}{where}")


def _source(group: str, choices: Mapping) -> str:
    """Where a group's config came from: its file (as Hydra found it) and command-line overrides."""
    choice = choices.get(group)
    text = f"{group}={choice} ({_config_file(group, choice)})" if choice else group
    overrides = [o for o in _hydra_overrides() if o.lstrip("+~").split("=", 1)[0].startswith(f"{group}.")]
    if overrides:
        text += f" with {' '.join(overrides)}"
    return text


def _config_file(group: str, choice: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        for source in HydraConfig.get().runtime.config_sources:
            path = Path(str(source.path)) / group / f"{choice}.yaml"
            if source.schema == "file" and path.is_file():
                inside = path.resolve().is_relative_to(CONF_DIR)
                return f"conf/{group}/{choice}.yaml" if inside else str(path)
    except (ImportError, ValueError, AttributeError):  # not under Hydra
        pass
    return f"conf/{group}/{choice}.yaml"


def _hydra_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return [str(o) for o in HydraConfig.get().overrides.task]
    except (ImportError, ValueError):  # not under Hydra
        return []


def build(cfg: Mapping, data: Dataset, choices: Mapping | None = None):
    """Parse the fixed/strategy configs and build the model: ``(model, scope)``."""
    choices = choices or {}
    files = cfg.get("config_files") or {}  # groups read from the user's own files (experiments.config_files)
    fixed = nf.FixedConfig.from_dict(cfg.get("fixed") or {}, source=files.get("fixed") or _source("fixed", choices))
    strategy = nf.StrategyConfig.from_dict(cfg.get("strategy") or {},
                                           source=files.get("strategy") or _source("strategy", choices))
    return build_model(cfg["model"], data.input_shape, data.num_classes, fixed, strategy)


def compile_model(model, trainer: Mapping, steps_per_epoch: int):
    optimizer = make_optimizer(trainer, steps_per_epoch)
    if _has_storage_configs(model):
        optimizer = _storage_optimizer(optimizer, model, trainer)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_choice.resolve_flag(trainer),
    )
    return model


def _has_storage_configs(model) -> bool:
    return any(not layer.fixed_config.weight.storage.is_float for layer in nf.introspect.fixed_layers(model))


def _storage_optimizer(optimizer, model, trainer):
    thdh = dict(trainer.get("thdh") or {})
    return nf.fixed_storage_optimizer(
        optimizer, model,
        update_config=thdh.get("update_config"),
        state_config=thdh.get("state_config"),
        power_of_two_lr=bool(thdh.get("power_of_two_lr", False)),
    )


def seed_everything(seed: int, trainer: Mapping | None = None) -> None:
    """Seed Python, NumPy and TF; switch TF op determinism on or off for this job.

    Op determinism is process-wide, and Keras silently turns XLA off while it is
    on: a ``jit_compile`` job therefore runs without it (XLA's own kernels are
    deterministic on CPU for these models, but not promised to be).
    """
    trainer = trainer or {}
    keras.utils.set_random_seed(int(seed))
    wanted = bool(trainer.get("deterministic", True)) and not trainer.get("jit_compile", False)
    from tensorflow.python.framework import config as tf_config  # public API has no "disable"

    if wanted:
        tf_config.enable_op_determinism()
    elif tf_config.is_op_determinism_enabled():
        tf_config.disable_op_determinism()


def _callbacks(model, run_id, folder, compact_epochs: int | None = None):
    """Epoch-end order matters: counters add to the logs, the checkpoint (with
    those logs) is written, and only then are they sent to MLflow; so an epoch
    is recorded once whatever instant a SIGKILL hits (see _log_unrecorded_epoch)."""
    callbacks = [StopOnSigterm()] + ([nf.UpdateCountersCallback()] if _has_storage_configs(model) else [])
    if compact_epochs:  # after the counters: one readable line per epoch instead of Keras' dozens of values
        callbacks.append(CompactEpochLogger(compact_epochs))
    if folder is not None:
        callbacks.append(checkpoint.CheckpointCallback(folder, run_id))
    return callbacks + [tracking.MlflowEpochLogger(run_id)]


def _log_unrecorded_epoch(run_id: str, folder, model) -> None:
    """Log the checkpointed epoch if the killed job died before logging it.

    Epochs after the checkpoint were neither kept nor logged (logging follows
    checkpointing), and the resumed job runs them again: every epoch of the
    run's history is logged once and belongs to the weights it ends with.
    """
    state = checkpoint.read_state(folder)
    epoch, logs = state["next_epoch"] - 1, state.get("logs")
    if epoch < 0 or not logs:
        return
    metrics = tracking.epoch_metrics(logs)
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, next(iter(metrics)))}
    if epoch not in logged:
        tracking.log_batch(run_id, metrics={**metrics, **tracking.scale_metrics(model)}, step=epoch)


def run_training(cfg: Mapping, output_dir: str | Path | None = None, choices: Mapping | None = None,
                 run_tags: Mapping | None = None, nested: bool = False, callbacks=None) -> dict:
    """Train, evaluate and record one run; return its final metrics and run id.

    ``callbacks`` are extra Keras callbacks (e.g. a search's pruning callback);
    ``run_tags`` extra MLflow tags; ``nested`` starts a child of the active run.
    With ``output_dir``, a checkpoint is saved there every epoch, and
    ``trainer.resume`` (a run id, a checkpoint folder, or ``true`` for the
    latest interrupted run of the experiment) continues that run.

    The MLflow run is started before anything can fail, so every failure
    (a bad fixed config, a missing dataset) ends as a FAILED run with an
    ``error`` tag, and an interrupt (Ctrl-C, SIGTERM) as KILLED: never a run
    left RUNNING.
    """
    choices = config_files.file_choices(cfg, choices if choices is not None else tracking.hydra_choices())
    mlcfg = cfg.get("mlflow") or {}
    tracking.setup(mlcfg.get("tracking_uri"), mlcfg.get("experiment_name", "nics_fix"))
    trainer = cfg["trainer"]
    resume_folder, resume_run = _find_resume(trainer.get("resume"), mlcfg.get("experiment_name", "nics_fix"))
    tags = {**tracking.base_tags("train"), **checkpoint.process_tags(), **(run_tags or {})}
    if resume_run:
        resume_status = mlflow.MlflowClient().get_run(resume_run).info.status
        run = mlflow.start_run(run_id=resume_run, nested=nested)
        mlflow.set_tags({**checkpoint.process_tags(), "nics_fix.resumed": "true"})
    else:
        run_name = mlcfg.get("run_name") or tracking.default_run_name(choices)
        run = mlflow.start_run(run_name=run_name, tags=tags, nested=nested)
    run_id = run.info.run_id
    folder = resume_folder or (Path(output_dir) / "checkpoint" if output_dir and trainer.get("checkpoint", True)
                               else None)
    if folder is not None:
        mlflow.set_tag("nics_fix.checkpoint_dir", str(Path(folder).resolve()))
    try:
        with _sigterm_as_interrupt():
            check_trainer(trainer)
            check_compare_bits(cfg.get("compare_bits"))
            with checkpoint.heartbeat(run_id, trainer.get("heartbeat_interval", 60)):
                results = _train_in_run(cfg, trainer, run_id, choices, output_dir, callbacks or [], folder,
                                        resumed=bool(resume_run))
    except BaseException as err:
        if isinstance(err, checkpoint.ResumeError):  # the checkpoint does not fit: the run stays as it was
            mlflow.set_tag("nics_fix.resume_error", str(err)[:5000])
            mlflow.end_run("KILLED" if resume_status == "RUNNING" else resume_status)
            raise
        interrupted = isinstance(err, KeyboardInterrupt)
        mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
        mlflow.end_run("KILLED" if interrupted else "FAILED")
        raise
    if not nested:  # the runs table shows the name without configuration: put the result there too
        name = mlflow.get_run(run_id).info.run_name
        mlflow.set_tag("mlflow.runName", f"{name} | acc {results['test_accuracy']:.4f} | "
                                         f"{results['avg_weight_bits']:.2f} w bits")
    mlflow.end_run("FINISHED")
    return results


#: Code that must not be interrupted half-way: a KeyboardInterrupt inside a database
#: commit can leave the transaction open and the store locked for the rest of the process.
_STORE_MODULES = ("mlflow", "sqlalchemy", "sqlite3", "alembic", "psycopg2", "optuna.storages", "requests",
                  "urllib3")


_DEFER_S = 10.0


def _in_store_call(frame) -> bool:
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(_STORE_MODULES):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (what schedulers send) ends the run as KILLED instead of leaving it RUNNING.

    The interrupt is raised at once, unless the main thread is inside an MLflow/Optuna
    store call: then it is raised once that call has returned (re-checked every 50 ms,
    for at most ``_DEFER_S`` seconds), or at the end of the block.

    An interrupt raised while TensorFlow runs Python code from C++ can be swallowed
    there; so a delivered SIGTERM is remembered, :class:`StopOnSigterm` raises it again
    at the next batch, and a block that still ends normally raises it at its end.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[float] = []  # when the first deferred signal came
    outermost = not _SIGTERM_DEPTH
    if outermost:
        _SIGTERM_DELIVERED.clear()
    _SIGTERM_DEPTH.append(1)

    def resend(signum):
        if signal.getsignal(signal.SIGTERM) is handler:
            os.kill(os.getpid(), signum)

    def handler(signum, frame):
        if _in_store_call(frame) and time.monotonic() - (pending or [time.monotonic()])[0] < _DEFER_S:
            pending.append(time.monotonic())
            threading.Timer(0.05, resend, (signum,)).start()
            return
        pending.clear()  # delivered
        _SIGTERM_DELIVERED.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _SIGTERM_DEPTH.pop()
    if pending or _SIGTERM_DELIVERED:
        raise KeyboardInterrupt(f"signal {signal.SIGTERM.value}")


_SIGTERM_DEPTH: list[int] = []  # nesting of _sigterm_as_interrupt blocks (search > trial)
_SIGTERM_DELIVERED: list[int] = []  # signals raised as KeyboardInterrupt in the outermost block


def interrupt_handled() -> None:
    """Call where a KeyboardInterrupt from SIGTERM is caught on purpose (the search's wind-down)."""
    _SIGTERM_DELIVERED.clear()


class StopOnSigterm(keras.callbacks.Callback):
    """Raises a delivered SIGTERM again if ``fit`` is still running (the first raise was swallowed)."""

    def on_train_batch_end(self, batch, logs=None):
        if _SIGTERM_DELIVERED:
            raise KeyboardInterrupt(f"signal {_SIGTERM_DELIVERED[0]}")

    on_test_batch_end = on_train_batch_end


def _find_resume(resume, experiment_name: str):
    """``trainer.resume`` → (checkpoint folder, run id), or (None, None) for a fresh run."""
    if resume in (None, False, "", "false"):
        return None, None
    client = mlflow.tracking.MlflowClient()
    if resume is True or str(resume).lower() in ("true", "last"):
        experiment = client.get_experiment_by_name(experiment_name)
        runs = [] if experiment is None else client.search_runs(
            [experiment.experiment_id], filter_string="attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=200)
        for run in runs:
            folder = run.data.tags.get("nics_fix.checkpoint_dir")
            if run.info.status == "RUNNING" and not checkpoint.is_stale(run):
                continue  # still training somewhere
            if folder and (Path(folder) / checkpoint.STATE_JSON).is_file():
                return Path(folder), run.info.run_id
        raise checkpoint.ResumeError(
            f"trainer.resume=true: experiment {experiment_name!r} has no interrupted run with a checkpoint")
    if Path(str(resume)).is_dir():
        state = checkpoint.read_state(Path(str(resume)))
        try:
            finished = client.get_run(state["run_id"]).info.status == "FINISHED"
        except mlflow.exceptions.MlflowException:
            raise checkpoint.ResumeError(f"trainer.resume={resume}: its run {state['run_id']} is not in "
                                         f"{mlflow.get_tracking_uri()} (set mlflow.tracking_uri to its store)") from None
        if finished:
            raise checkpoint.ResumeError(f"trainer.resume={resume}: its run {state['run_id']} is FINISHED, "
                                         "nothing to resume (start a new run to train further)")
        return Path(str(resume)), state["run_id"]
    try:
        run = client.get_run(str(resume))
    except mlflow.exceptions.MlflowException:
        raise checkpoint.ResumeError(
            f"trainer.resume={resume}: neither a checkpoint folder nor a run id of {mlflow.get_tracking_uri()}"
        ) from None
    if run.info.status == "FINISHED":
        raise checkpoint.ResumeError(f"trainer.resume={resume}: the run is FINISHED, nothing to resume "
                                     "(start a new run to train further)")
    folder = run.data.tags.get("nics_fix.checkpoint_dir")
    if not folder:
        raise checkpoint.ResumeError(f"trainer.resume={resume}: the run recorded no checkpoint folder")
    if run.info.status == "RUNNING" and not checkpoint.is_stale(run):
        tags = run.data.tags
        raise checkpoint.ResumeError(
            f"trainer.resume={resume}: the run is still RUNNING in a live process (pid {tags.get('nics_fix.pid')} "
            f"on {tags.get('nics_fix.host')}); a process on another host counts as dead once its heartbeat "
            f"has been silent for twice its interval ({tags.get(checkpoint.HEARTBEAT_INTERVAL, '?')} s)")
    checkpoint.read_state(Path(folder))
    return Path(folder), run.info.run_id


def _train_in_run(cfg, trainer, run_id, choices, output_dir, extra_callbacks, folder, resumed) -> dict:
    cfg = config_files.load_config_files(cfg)
    config_files.log_config_files(config_files.outside_conf(cfg, choices, _config_file), params=not resumed)
    if not resumed:  # a resumed run has its params already (MLflow refuses changed values)
        params = {}
        for group in ("data", "model", "trainer", "strategy"):
            params.update(tracking.flatten(cfg.get(group) or {}, group))
        params.update({f"choice.{k}": v for k, v in choices.items()})
        tracking.log_batch(run_id, params=params)
        mlflow.log_text(yaml.safe_dump(_plain(cfg), sort_keys=False), "config/train_config.yaml")

    seed_everything(trainer.get("seed", 0), trainer)
    data = load_dataset(dict(cfg["data"], seed=cfg["data"].get("seed", trainer.get("seed", 0))))
    if trainer.get("jit_compile") == "auto":
        trainer = _choose_jit(cfg, trainer, data, choices, run_id, resumed)
        cfg = dict(cfg, trainer=trainer)  # the saved train_config holds the choice
    model, scope = build(cfg, data, choices)
    if scope.unmatched_names():
        mlflow.set_tag("nics_fix.unmatched_by_name", ",".join(scope.unmatched_names()))
    if not resumed:
        tracking.log_batch(run_id, params={**tracking.point_params(model), **tracking.layer_order_param(model)},
                           metrics=tracking.cost_metrics(model))
    mlflow.log_text(yaml.safe_dump(scope.fixed_config_dict(), sort_keys=False), "config/fixed_config.yaml")
    mlflow.log_text(yaml.safe_dump(_plain(cfg.get("strategy") or {}), sort_keys=False),
                    "config/strategy_config.yaml")

    batch_size = int(trainer.get("batch_size", 64))
    steps = max(1, math.ceil(len(data.x_train) / batch_size))
    compile_model(model, trainer, steps)
    initial_epoch = 0
    if resumed:
        initial_epoch = checkpoint.load_checkpoint(folder, model)
        mlflow.set_tag("nics_fix.resumed_from_epoch", str(initial_epoch))
        print(f"resuming run {run_id} from its checkpoint {folder}: epoch {initial_epoch + 1} of "
              f"{int(trainer.get('epochs', 1))} next", flush=True)
        _log_unrecorded_epoch(run_id, folder, model)
    train_ds = training_dataset(data.x_train, data.y_train, batch_size, int(trainer.get("seed", 0)), initial_epoch)
    val_ds = make_dataset(data.x_val, data.y_val, batch_size) if len(data.x_val) else None
    verbose = int(trainer.get("verbose", 2))
    compact = verbose == 2 and _has_storage_configs(model)  # THDH counters: too many values for Keras' line
    history = model.fit(train_ds, validation_data=val_ds, epochs=int(trainer.get("epochs", 1)),
                        steps_per_epoch=steps, shuffle=False, initial_epoch=initial_epoch,
                        verbose=0 if compact else verbose,
                        callbacks=_callbacks(model, run_id, folder, int(trainer.get("epochs", 1)) if compact else None)
                        + list(extra_callbacks))
    test_loss, test_accuracy = evaluate(model, data, batch_size)
    results = {"test_loss": test_loss, "test_accuracy": test_accuracy}
    if "val_accuracy" in history.history:
        results["val_accuracy"] = float(history.history["val_accuracy"][-1])
        results["val_loss"] = float(history.history["val_loss"][-1])
    mlflow.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy})
    widths = check_compare_bits(cfg.get("compare_bits"))
    if widths:
        results["compare_bits"] = compare_bits(
            model, lambda fixed: build(dict(cfg, fixed=fixed), data, choices)[0],
            lambda rounded: evaluate(rounded, data, batch_size)[1], widths)
        mlflow.log_metrics({f"rounded.w{b}a{b}.test_accuracy": acc for b, acc in results["compare_bits"].items()})

    if trainer.get("save_model", True):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(output_dir or tmp) / "fixed_model"
            nf.fixed_model_saver(model, fixed_weight=bool(trainer.get("save_fixed_weight", False))).save(folder)
            (folder / "train_config.yaml").write_text(yaml.safe_dump(_plain(cfg), sort_keys=False))
            mlflow.log_artifacts(str(folder), "fixed_model")
    results["run_id"] = run_id
    results["objective"] = results.get("val_accuracy", test_accuracy)
    # Shown in the MLflow UI without configuring columns: the description, and three short summary entries.
    cost = tracking.cost_metrics(model)
    results["avg_weight_bits"] = cost["cost.avg_weight_bits"]
    summary = {"summary.test_accuracy": test_accuracy, "summary.avg_weight_bits": cost["cost.avg_weight_bits"]}
    tracking.log_batch(run_id, metrics=summary, params={"summary.fixed": choices.get("fixed", "given")},
                       tags={"mlflow.note.content": tracking.run_description(results, choices, cost)})
    return results


def _choose_jit(cfg, trainer, data: Dataset, choices, run_id: str, resumed: bool) -> dict:
    """``trainer`` with ``jit_compile: auto`` resolved (:mod:`experiments.jit_choice`), recorded in MLflow.

    A resumed run keeps the choice it recorded.
    """
    batch_size = int(trainer.get("batch_size", 64))
    steps = max(1, math.ceil(len(data.x_train) / batch_size))
    recorded = mlflow.get_run(run_id).data.params.get("jit_compile.choice") if resumed else None
    if recorded is not None:
        flag = recorded == "True"
    else:
        def build_compiled(jit: bool):
            return compile_model(build(cfg, data, choices)[0], dict(trainer, jit_compile=jit), steps)

        def reset():
            keras.backend.clear_session()  # the job's layers get the names they get without the copies

        flag, params, metrics = jit_choice.choose(
            trainer, build_compiled, data.x_train[:batch_size], data.y_train[:batch_size],
            steps * int(trainer.get("epochs", 1)), reset)
        tracking.log_batch(run_id, params=params, metrics=metrics)
    trainer = dict(trainer, jit_compile=flag)
    seed_everything(trainer.get("seed", 0), trainer)  # seeds and op determinism as for a fixed setting
    return trainer


def evaluate(model, data: Dataset, batch_size: int) -> tuple[float, float]:
    """Test loss and accuracy in evaluation (not_training) mode, in a fixed batch order."""
    test_ds = make_dataset(data.x_test, data.y_test, batch_size)
    loss, accuracy = model.evaluate(test_ds, verbose=0)
    return float(loss), float(accuracy)


def _plain(value):
    """A config as plain YAML-able values, URL passwords masked (it is recorded and written to disk)."""
    if isinstance(value, str):
        return tracking.without_passwords(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
