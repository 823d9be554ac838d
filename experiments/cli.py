"""Turning user mistakes into one clear line and a non-zero exit, not a traceback."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from nics_fix.config import ConfigError
from nics_fix.saving import FixedModelError

#: Absolute, so the entry points work as ``python -m``, as console scripts and in-process.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

#: Errors that mean "your input is wrong", each with a message saying what and where.
USER_ERRORS: tuple[type, ...] = (ConfigError, FixedModelError)


def _user_error_types() -> tuple[type, ...]:
    from experiments.checkpoint import ResumeError
    from experiments.data import DataError
    from experiments.models import ModelConfigError
    from experiments.tracking import TrackingError
    from experiments.training import TrainConfigError

    return USER_ERRORS + (DataError, ModelConfigError, TrainConfigError, ResumeError, TrackingError)


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().mode.name == "MULTIRUN"
    except Exception:  # noqa: BLE001 - not under Hydra
        return False


@contextlib.contextmanager
def user_errors(extra: tuple[type, ...] = ()):
    """Print a user error as ``error: ...`` and exit 2 (in a multirun, let it propagate)."""
    try:
        yield
    except _user_error_types() + tuple(extra) as err:
        if _in_multirun():
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
