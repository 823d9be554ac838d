"""Turning user mistakes into one clear line and a non-zero exit, not a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from nics_fix.config import ConfigError
from nics_fix.saving import FixedModelError

#: Absolute, so the entry points work as ``python -m``, as console scripts and in-process.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")



class UnknownKeyError(ValueError):
    """A ``+key=value`` override adds a key that nothing reads (a typo of an existing key or group)."""


#: Errors that mean "your input is wrong", each with a message saying what and where.
USER_ERRORS: tuple[type, ...] = (ConfigError, FixedModelError, UnknownKeyError)

#: Where ``+key=value`` may add keys: mappings whose keys are names the user chooses (layers, named
#: configs, layer classes: the fixed and strategy parsers check them), THDH's optional trainer settings,
#: the search's pins, and Hydra's own settings.
OPEN_KEYS = ("fixed.", "strategy.", "trainer.thdh.", "search.pin.", "hydra.")


def _added_key(override: str) -> str | None:
    """The key of a ``+key=value`` / ``++key=value`` override, or None for any other override."""
    if not override.startswith("+"):
        return None
    key = override.lstrip("+").split("=", 1)[0]
    return key.split("@", 1)[0]


def check_added_keys(cfg, overrides, groups=()) -> None:
    """Refuse a ``+key=value`` that adds a key nothing reads, naming the closest valid name.

    Hydra only needs ``+`` for keys that are not in the config yet, and merges
    whatever it is given: ``+fixd=w8a8`` (Hydra's own hint after the typo
    ``fixd=w8a8``) or ``+trainer.epoch=3`` would be ignored and the job would
    run its defaults. ``groups`` (config groups, such as ``experiment``) may be
    appended with ``+``; keys under :data:`OPEN_KEYS` may be added freely.
    """
    import difflib

    for override in overrides:
        key = _added_key(override)
        if key is None or key in groups or key.startswith(OPEN_KEYS) or f"{key}.".startswith(OPEN_KEYS):
            continue
        if key.startswith("model.") and hasattr(cfg.get("model"), "get") and cfg["model"].get("_target_"):
            continue  # a user's own model function (model=custom) takes whatever keyword arguments it declares
        *parents, name = key.split(".")
        node, where = cfg, ""
        for part in parents:
            node = node.get(part) if hasattr(node, "get") else None
            where += f"{part}."
        siblings = [str(k) for k in (node.keys() if hasattr(node, "keys") else ()) if str(k) != name]
        if not parents:
            siblings += [g for g in groups if g not in siblings]
        close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
        value = override.split("=", 1)[1] if "=" in override else "..."
        if close and (not parents and close[0] in groups):
            hint = f"did you mean the group {close[0]}? Choose it without '+': {close[0]}={value}"
        elif close:
            hint = f"did you mean {where}{close[0]}? Set it without '+': {where}{close[0]}={value}"
        else:
            hint = f"known keys here: {', '.join(sorted(siblings)) or 'none'}"
        raise UnknownKeyError(f"{override}: '{key}' is not a setting of this job ({hint})")


def check_job_overrides(cfg) -> None:
    """:func:`check_added_keys` for the running Hydra job (its command-line overrides and groups)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    groups = [p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()]
    groups += [str(g) for g in hydra_cfg.runtime.choices if not str(g).startswith("hydra")]
    check_added_keys(cfg, [str(o) for o in hydra_cfg.overrides.task], tuple(dict.fromkeys(groups)))


def user_error_types() -> tuple[type, ...]:
    """Every exception type that means "the input is wrong" (its message says what and where)."""
    from experiments.checkpoint import ResumeError
    from experiments.data import DataError
    from experiments.models import ModelConfigError
    from experiments.tracking import TrackingError
    from experiments.validate import TrainConfigError

    from omegaconf.errors import InterpolationResolutionError  # a ${...} that names nothing

    return USER_ERRORS + (DataError, ModelConfigError, TrainConfigError, ResumeError, TrackingError,
                          InterpolationResolutionError)


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().mode.name == "MULTIRUN"
    except Exception:  # noqa: BLE001 - not under Hydra
        return False


def _yaml_error(err: BaseException | None):
    import yaml

    while err is not None:
        if isinstance(err, yaml.YAMLError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _compact_config_file_errors() -> None:
    """A config file that is not valid YAML: one ``error: ...`` line (file, line, column), exit 2.

    Hydra prints a full traceback for exceptions it does not know that happen while it
    composes the config (before the job runs); this wraps the function through which
    ``@hydra.main`` runs (``hydra._internal.utils.run_and_report``, Hydra 1.3).
    ``HYDRA_FULL_ERROR=1`` still shows the traceback.
    """
    try:
        from hydra._internal import utils as hydra_utils
    except ImportError:  # another Hydra layout: keep its own reporting
        return
    original = hydra_utils.run_and_report
    if getattr(original, "nics_fix_wrapped", False):
        return

    def run_and_report(func):
        def guarded():
            try:
                return func()
            except Exception as err:
                found = _yaml_error(err)
                if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                text = " ".join(str(found).split())
                print(f"error: a config file is not valid YAML: {text}\n"
                      "Fix that file (conf/ or a --config-dir folder), or choose another config.", file=sys.stderr)
                raise SystemExit(2) from None

        return original(guarded)

    run_and_report.nics_fix_wrapped = True
    hydra_utils.run_and_report = run_and_report


_compact_config_file_errors()


@contextlib.contextmanager
def user_errors(extra: tuple[type, ...] = ()):
    """Print a user error as ``error: ...`` and exit 2 (in a multirun, let it propagate)."""
    try:
        yield
    except user_error_types() + tuple(extra) as err:
        if _in_multirun():
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


class _Tee:
    """A text stream writing to two streams (the console and a log file)."""

    def __init__(self, console, log):
        self.console, self.log = console, log

    def write(self, text):
        self.log.write(text)
        return self.console.write(text)

    def flush(self):
        self.log.flush()
        self.console.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding ...: the console's
        return getattr(self.console, name)


@contextlib.contextmanager
def tee_to(path: str | Path):
    """Copy what the job prints (stdout and stderr: Keras' epoch lines, our summary) into ``path`` too.

    Hydra's own ``<job>.log`` only receives Python ``logging`` records, and the
    job prints instead; this appends the printed lines to that same file.
    """
    with open(path, "a", encoding="utf-8", buffering=1) as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err
