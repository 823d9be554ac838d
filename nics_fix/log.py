"""The package logger, configured from ``NICS_FIX_LOGLEVEL``.

``NICS_FIX_LOGLEVEL`` is one of debug, info, warning (default), error, fatal.
At ``info`` every quantization point logs the config it resolved to.
"""

from __future__ import annotations

import logging
import os
import warnings

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}

logger = logging.getLogger("nics_fix")


def level_from_env(value: str | None) -> int:
    """The logging level for a ``NICS_FIX_LOGLEVEL`` value (warning if unset or invalid)."""
    if value is None or value.strip() == "":
        return logging.WARNING
    key = value.strip().lower()
    if key not in LEVELS:
        warnings.warn(
            f"NICS_FIX_LOGLEVEL={value!r} is not one of {', '.join(LEVELS)}; using 'warning'",
            stacklevel=2,
        )
        return logging.WARNING
    return LEVELS[key]


class _UnlessTheRootPrints(logging.Filter):
    """Lets a record through only where the application has not set up logging itself.

    A script that never configures logging still sees nics_fix's warnings; where
    the root logger has handlers (a Hydra job: console and the job's log file),
    the record reaches them by propagation, and printing it here too would show
    every line twice.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (logger.propagate and logging.getLogger().handlers)


def configure_from_env() -> None:
    logger.setLevel(level_from_env(os.environ.get("NICS_FIX_LOGLEVEL")))
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[nics_fix %(levelname)s] %(message)s"))
        handler.addFilter(_UnlessTheRootPrints())
        logger.addHandler(handler)


configure_from_env()
