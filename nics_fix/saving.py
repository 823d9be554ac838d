"""Saving a fixed model for evaluation: weights, scales and resolved configs.

A saved fixed model is a folder::

    weights.npz         every variable, keyed "<layer>/<variable>" (scales included)
    fixed_config.yaml   the resolved per-layer configs in the core format (by_name)
    manifest.json       format version, fixed_weight flag, points and their scales

With ``fixed_weight=True`` the stored weights are already the quantized values
that evaluation uses, as a chip would hold them. Restoring into a freshly built
model of the same architecture and config reproduces the trained model's
predictions bit for bit.

>>> saver = fixed_model_saver(model)              # doctest: +SKIP
>>> saver.save("run/fixed_model")                 # doctest: +SKIP
>>> restore_fixed_model(fresh_model, "run/fixed_model")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
import zlib
from pathlib import Path

import keras
import numpy as np
import yaml

from nics_fix.config import LayerFixedConfig, layer_configs_to_fixed_config
from nics_fix.quant import fixed_point_quantize
from nics_fix.scope import FixedScope

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.npz"
CONFIG_FILE = "fixed_config.yaml"
MANIFEST_FILE = "manifest.json"


class FixedModelError(ValueError):
    """A saved fixed model is missing, damaged, or does not match the model."""



def atomic_write(path, write) -> None:
    """``write(tmp)`` to a name private to this process beside ``path``, then rename.

    Readers, and other processes writing the same file (a Hydra multirun, search
    workers), see either the old file or the whole new one, never half a file;
    a failed write leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_savez(path, arrays: dict) -> None:
    """``np.savez`` (uncompressed: loads fast) of ``arrays`` to ``path`` through :func:`atomic_write`."""
    def write(tmp):
        with open(tmp, "wb") as handle:  # a handle: np.savez would append ".npz" to a name
            np.savez(handle, **arrays)

    atomic_write(path, write)

def _layers_of(model_or_scope) -> list:
    if isinstance(model_or_scope, FixedScope):
        return list(model_or_scope.layers)
    return [layer for layer in model_or_scope._flatten_layers(include_self=False, recursive=True)
            if layer.weights]


def _variables(layers) -> dict:
    out = {}
    for layer in layers:
        own = layer._trainable_variables + layer._non_trainable_variables
        for variable in own:
            out[f"{layer.name}/{variable.name}"] = variable
    return out


def eval_weight(point) -> tuple[np.ndarray, int | np.ndarray | None]:
    """The value a weight point feeds the layer in evaluation, and its scale
    (an int, or an int32 array for per-channel and per-block scales)."""
    value = keras.ops.convert_to_tensor(getattr(point.layer, point.key))
    data = point.config.data
    if data.not_training == "none":
        return keras.ops.convert_to_numpy(value), None
    scale = point.evaluation_scale(value)
    groups = point.data_groups
    quantized = fixed_point_quantize(value, data.bit_width, scale if groups is None else groups.expand(scale),
                                     data.rounding).numpy()
    scale = keras.ops.convert_to_numpy(scale).astype(np.int32)
    return quantized, int(scale) if scale.ndim == 0 else scale


class FixedModelSaver:
    """Saves a model's (or a scope's) fixed layers; see :func:`fixed_model_saver`."""

    def __init__(self, model_or_scope, fixed_weight: bool = False):
        self.target = model_or_scope
        self.fixed_weight = bool(fixed_weight)

    def save(self, path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        layers = _layers_of(self.target)
        variables = _variables(layers)
        arrays = {key: keras.ops.convert_to_numpy(v) for key, v in variables.items()}
        points = []
        for layer in fixed_layers_of(layers):
            for point in layer.fixed_points.values():
                entry = point.describe()
                if self.fixed_weight and point.kind == "weight":
                    value, scale = eval_weight(point)
                    arrays[f"{layer.name}/{point.key}"] = value
                    if scale is not None:
                        arrays[f"{layer.name}/{point.key}_data_scale"] = np.asarray(scale, np.int32)
                        entry["data_scale"] = scale if isinstance(scale, int) else scale.tolist()
                        entry["eval_mode"] = "fixed"  # the stored value is already on its grid
                points.append(entry)
        configs = {layer.name: layer.fixed_config for layer in fixed_layers_of(layers)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "fixed_weight": self.fixed_weight,
            "layers": {name: cfg.to_dict() for name, cfg in configs.items()},
            "points": points,
        }
        atomic_savez(path / WEIGHTS_FILE, arrays)  # never a half-written weights file
        with open(path / CONFIG_FILE, "w", encoding="utf-8") as handle:
            yaml.safe_dump(layer_configs_to_fixed_config(configs), handle, sort_keys=False)
        with open(path / MANIFEST_FILE, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1)
        return path


def fixed_layers_of(layers) -> list:
    from nics_fix.layers.base import FixedLayer

    return [layer for layer in layers if isinstance(layer, FixedLayer)]


def fixed_model_saver(model_or_scope, fixed_weight: bool = False) -> FixedModelSaver:
    """A saver for a model or a :class:`~nics_fix.scope.FixedScope`'s layers.

    ``fixed_weight=True`` stores the weights as the quantized values evaluation
    uses (and pins their evaluation scale), instead of the float master copy.
    """
    return FixedModelSaver(model_or_scope, fixed_weight)


def read_manifest(path) -> dict:
    path = Path(path)
    for name in (WEIGHTS_FILE, MANIFEST_FILE):
        if not (path / name).is_file():
            raise FixedModelError(
                f"{path}: not a saved fixed model ({name} is missing); save one with "
                "nics_fix.fixed_model_saver(model).save(path)")
    try:
        with open(path / MANIFEST_FILE, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as err:
        raise FixedModelError(f"{path / MANIFEST_FILE}: unreadable manifest: {err}") from None
    if not isinstance(manifest, dict):
        raise FixedModelError(f"{path / MANIFEST_FILE}: unreadable manifest: not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FixedModelError(f"{path / MANIFEST_FILE}: format_version "
                              f"{manifest.get('format_version')!r} is not {FORMAT_VERSION}")
    for key, kind in (("layers", dict), ("points", list)):
        if not isinstance(manifest.get(key), kind):
            raise FixedModelError(f"{path / MANIFEST_FILE}: unreadable manifest: {key!r} is missing "
                                  f"or not a {'mapping' if kind is dict else 'list'}")
    return manifest


def restore_fixed_model(model_or_scope, path, strict: bool = True):
    """Load a saved fixed model into a freshly built one, for evaluation.

    The model must have the same layers and, with ``strict`` (default), the
    same resolved configs. Returns the model.
    """
    path = Path(path)
    manifest = read_manifest(path)
    layers = _layers_of(model_or_scope)
    variables = _variables(layers)
    try:
        with np.load(path / WEIGHTS_FILE) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        # A truncated or damaged .npz raises BadZipFile/zlib.error, not OSError.
        raise FixedModelError(f"{path / WEIGHTS_FILE}: unreadable weights: {err}") from None
    missing = sorted(set(arrays) - set(variables))
    unset = sorted(set(variables) - set(arrays))
    if missing or unset:
        raise FixedModelError(
            f"{path}: the model does not match the saved one; saved but not in the model: "
            f"{missing or 'none'}; in the model but not saved: {unset or 'none'}")
    fixed = {layer.name: layer for layer in fixed_layers_of(layers)}
    if strict:
        for name, saved in manifest["layers"].items():
            have = fixed[name].fixed_config if name in fixed else None
            if have is None or have != LayerFixedConfig.from_dict(saved):
                raise FixedModelError(
                    f"{path}: layer {name!r} was saved with config {saved} but the model has "
                    f"{have.to_dict() if have else 'no such fixed layer'}")
    for key, variable in variables.items():
        if tuple(variable.shape) != tuple(arrays[key].shape):
            raise FixedModelError(f"{path}: {key} has shape {arrays[key].shape} in the file and "
                                  f"{tuple(variable.shape)} in the model")
        variable.assign(arrays[key])
    for entry in manifest["points"]:
        if entry.get("eval_mode") == "fixed":
            point = fixed[entry["layer"]].fixed_points[entry["variable"]]
            point.config = dataclasses.replace(
                point.config, data=dataclasses.replace(point.config.data, not_training="fixed"))
    return model_or_scope
