"""Users' own Keras models, by Hydra's ``_target_`` convention.

``model=custom model._target_=my_pkg.models.make_net +model.width=8`` imports
``make_net`` and calls it with the data's ``input_shape`` and ``num_classes``
as keyword arguments plus the node's other keys (``width=8``); what it
returns, a built Keras model ending in logits, is then converted to fixed
point. A ``keras.applications`` constructor works too
(``model._target_=keras.applications.MobileNetV2`` with ``weights: null``):
it takes ``classes`` instead of ``num_classes``, and gets
``classifier_activation=None`` (the trainer's loss takes logits) unless the
node sets it. ``name`` names the run and the study, and keys starting with
``_`` are Hydra's: neither is passed on.

>>> import keras
>>> model = call_target({"_target_": "keras.applications.MobileNetV2", "alpha": 0.35, "weights": None},
...                     (32, 32, 3), 10)  # doctest: +SKIP
>>> model.output.shape  # doctest: +SKIP
(None, 10)
"""

from __future__ import annotations

import inspect
import pydoc
from collections.abc import Mapping

import keras
from keras.src.utils import naming

from experiments.models import ModelConfigError


class UserModelError(ModelConfigError):
    """A ``model._target_`` cannot be imported, called, or does not give a Keras model."""


def locate(target) -> object:
    """The object a dotted path names (``pkg.module.function``), or UserModelError."""
    if not isinstance(target, str) or not target or target == "???":
        raise UserModelError(f"model._target_: expected a dotted path to a function returning a Keras model "
                             f"(e.g. model._target_=my_pkg.models.make_net), got {target!r}")
    try:
        found = pydoc.locate(target)
    except pydoc.ErrorDuringImport as err:
        cause = err.value
        raise UserModelError(f"model._target_={target}: importing it failed: "
                             f"{type(cause).__name__}: {cause}") from None
    if found is None:
        raise UserModelError(f"model._target_={target}: cannot import it (no such module or attribute; "
                             f"is its package on the Python path, e.g. the current folder?)")
    if not callable(found):
        raise UserModelError(f"model._target_={target}: {type(found).__name__} is not callable")
    return found


def _arguments(function, node: Mapping, input_shape, num_classes: int) -> dict:
    """The node's keys, plus input shape and classes under the names ``function`` takes."""
    kwargs = {k: v for k, v in node.items() if k != "name" and not str(k).startswith("_")}
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature: give it everything
        parameters = {}
    any_keyword = not parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    kwargs.setdefault("input_shape", tuple(input_shape))
    if "classes" in parameters and "num_classes" not in parameters:  # keras.applications
        kwargs.setdefault("classes", num_classes)
        if "classifier_activation" in parameters:
            kwargs.setdefault("classifier_activation", None)
    else:
        kwargs.setdefault("num_classes", num_classes)
    if not any_keyword:
        for key in ("input_shape", "num_classes"):
            if key not in parameters and key not in node:
                kwargs.pop(key, None)  # it does not ask for it: leave it out
    return kwargs


def call_target(node: Mapping, input_shape, num_classes: int) -> keras.Model:
    """Import ``node["_target_"]``, call it, and check that it returned a built Keras model."""
    target = node.get("_target_")
    function = locate(target)
    kwargs = _arguments(function, node, input_shape, num_classes)
    try:
        inspect.signature(function).bind(**kwargs)
    except TypeError as err:
        missing = str(err).replace("argument:", "argument").strip()
        raise UserModelError(f"model._target_={target}: {missing} (give it as +model.KEY=VALUE; it is called "
                             f"with {', '.join(sorted(kwargs)) or 'no arguments'})") from None
    except ValueError:  # no signature to check
        pass
    # Keras names unnamed layers dense, dense_1, ... counting over the whole process: start
    # from zero so the names (and with them by_name configs and the search space) are the
    # same in every trial and every process.
    naming.reset_uids()
    try:
        model = function(**kwargs)
    except (TypeError, ValueError) as err:
        text = " ".join(str(err).split())
        raise UserModelError(f"model._target_={target}: calling it failed: {type(err).__name__}: {text}") from None
    if not isinstance(model, keras.Model):
        raise UserModelError(f"model._target_={target}: returned {type(model).__name__}, not a keras.Model "
                             f"(return e.g. keras.Model(inputs, outputs) or a keras.Sequential)")
    if not model.built:
        raise UserModelError(f"model._target_={target}: returned a model that is not built; give it an "
                             f"input (keras.Input(shape=input_shape)) so its layers have weights")
    outputs = getattr(model, "outputs", None)  # a subclassed model has none: the conversion says why
    if outputs is not None and (len(outputs) != 1 or outputs[0].shape[-1] != num_classes):
        shapes = [tuple(o.shape) for o in outputs]
        raise UserModelError(f"model._target_={target}: the model's output must be one tensor of "
                             f"{num_classes} logits (the data's classes), got {shapes}")
    return model
