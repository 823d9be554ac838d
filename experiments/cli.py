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

#: Errors that mean "your input is wrong", each with a message saying what and where.
USER_ERRORS: tuple[type, ...] = (ConfigError, FixedModelError)


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
