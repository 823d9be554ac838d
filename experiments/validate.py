"""One check for the plain values of the trainer and search groups (typos become clear errors)."""

from __future__ import annotations

import math
from collections.abc import Mapping

class TrainConfigError(ValueError):
    """A trainer/optimizer setting is invalid (names the key)."""


_KINDS = {"int": "an integer", "number": "a number", "bool": "true or false"}


def check_value(value, key: str, kind: str, minimum=None, maximum=None, nullable: bool = False,
                error: type[Exception] = ValueError, where: str = "", above: bool = False):
    """Return ``value`` if it is of ``kind`` (int, number, bool) within ``[minimum, maximum]``
    (``(minimum, maximum]`` with ``above``).

    Otherwise raise ``error`` naming ``key``, what was expected and what was
    given; ``where`` says where to fix it. YAML's ``true`` is never a number, nor are NaN and Inf.
    """
    if value is None and nullable:
        return value
    is_bool = isinstance(value, bool)
    ok = {"int": isinstance(value, int) and not is_bool,
          "number": isinstance(value, (int, float)) and not is_bool and math.isfinite(value),
          "bool": is_bool}[kind]
    if ok and kind != "bool":
        ok = ((minimum is None or value > minimum or (value == minimum and not above))
              and (maximum is None or value <= maximum))
    if ok:
        return value
    expected = _KINDS[kind]
    if minimum is not None and maximum is not None:
        expected += f" from {minimum} to {maximum}"
    elif minimum is not None:
        expected += f" {'>' if above else '>='} {minimum}"
    elif maximum is not None:
        expected += f" <= {maximum}"
    if nullable:
        expected += " or null"
    raise error(f"{key} must be {expected}, got {value!r}{where}")


def check_mapping(value, key: str, error: type[Exception] = ValueError, where: str = "") -> Mapping:
    """``value`` or ``{}`` for null; a clear error for anything but a mapping."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise error(f"{key} must be a mapping (key: value, ...), got {value!r}{where}")
    return value
