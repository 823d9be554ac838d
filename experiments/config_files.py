"""Bring your own fixed or strategy file: ``fixed_file=path`` and ``strategy_file=path``.

A user's own file need not be copied into ``conf/``::

    python -m experiments.train fixed_file=my_fixed.yaml strategy_file=old/strategy.yaml

The file is read with nics_fix's loader (the original TF1 framework's files
included: ``!!python/unicode`` keys, ``weightgradsaver_strategy``, ``Conv2d``)
and replaces the ``fixed`` (``strategy``) group. :func:`load_config_files`
does that once per job and notes the path under ``config_files.<group>``; the
run then records the path as the param ``fixed_file`` (``strategy_file``) and
the file itself as the artifact ``config/fixed_file/<name>``. A group chosen
from a folder added with ``hydra.searchpath`` is recorded the same way.

>>> load_config_files({"fixed": {}, "fixed_file": None})["config_files"]
{}
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import mlflow

import nics_fix as nf
from experiments.cli import CONF_DIR

#: group -> the key that names a file to take it from.
FILE_KEYS = {"fixed": "fixed_file", "strategy": "strategy_file"}

_PARSERS = {"fixed": nf.parse_cfg_from_file, "strategy": nf.parse_strategy_cfg_from_file}


def load_config_files(cfg: Mapping) -> dict:
    """``cfg`` with each group whose ``*_file`` is set read from that file.

    The group becomes the parsed file in the core format (checked: a bad path
    or content is a ConfigError naming the file and the key), ``*_file``
    becomes null, so loading again changes nothing, and ``config_files.<group>``
    holds the file's absolute path.
    """
    out = copy.deepcopy(dict(cfg))
    files = dict(out.get("config_files") or {})
    for group, key in FILE_KEYS.items():
        given = out.get(key)
        if given in (None, ""):
            continue
        if not isinstance(given, (str, os.PathLike)):
            raise nf.ConfigError(f"must be a path to a YAML file, got {given!r}", key)
        path = Path(given).expanduser().resolve()
        if not path.is_file():
            raise nf.ConfigError(f"{given}: no such file (relative paths start from {Path.cwd()})", key)
        out[group] = _PARSERS[group](path).to_dict()
        out[key] = None
        files[group] = str(path)
    out["config_files"] = files
    return out


def file_choices(cfg: Mapping, choices: Mapping) -> dict:
    """Hydra's ``choices`` with the file's name for each group ``cfg`` names a file for (before
    loading), so run names and ``choice.*`` params say where the group came from."""
    out = dict(choices)
    for group, key in FILE_KEYS.items():
        if cfg.get(key):
            out[group] = Path(str(cfg[key])).name
    return out


def outside_conf(cfg: Mapping, choices: Mapping, file_of: Callable[[str, str], str]) -> dict[str, str]:
    """``{group: path}`` of the fixed/strategy files this run came from that are not in ``conf/``.

    A loaded file counts where ``choices`` still name it (:func:`file_choices`):
    a search's trials and float reference replace the group and say so.
    ``file_of(group, choice)`` is where Hydra found a group's choice (a file
    from a ``hydra.searchpath`` folder is outside ``conf/``).
    """
    loaded = cfg.get("config_files") or {}
    files = {group: path for group, path in loaded.items() if choices.get(group) == Path(path).name}
    for group in FILE_KEYS:
        choice = choices.get(group)
        if group in loaded or not choice:
            continue
        path = Path(file_of(group, choice))
        if path.is_absolute() and path.is_file() and not path.resolve().is_relative_to(CONF_DIR):
            files[group] = str(path)
    return files


def log_config_files(files: Mapping[str, str], params: bool = True) -> None:
    """Record each file: its path as the param ``<group>_file``, the file as ``config/<group>_file/``."""
    if params and files:
        mlflow.log_params({FILE_KEYS[group]: path for group, path in files.items()})
    for group, path in files.items():
        if Path(path).is_file():
            mlflow.log_artifact(path, f"config/{FILE_KEYS[group]}")
