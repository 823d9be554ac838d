"""Layer class names as config files spell them: what a ``by_type`` key may name.

Every nics_fix layer class registers its name here when it is defined, so a
new layer class is a valid ``by_type`` key with no list to edit. A key is
looked up exactly, then under the name the original TF1 framework gave the
same layer, then ignoring case; a key that names no class is an error that
suggests the closest one.

>>> import nics_fix as nf
>>> lookup_layer_type("Dense")
('Dense', None)
>>> lookup_layer_type("Conv2d")[0]
'Conv2D'
>>> lookup_layer_type("BN")[0]
'BatchNormalization'
"""

from __future__ import annotations

import difflib

#: Class name -> whether its layers have quantization points (what a fixed or
#: strategy config can set); pass-through layers register with False.
_LAYER_TYPES: dict[str, bool] = {}

#: Other names of today's classes: the names the original TF1 nics_fix registered
#: its ops under (``BN``, ``MaxPool``, ``AvePool``) and Keras' short aliases, whose
#: layers are of the long-named class. Used only when the class exists.
FORMER_NAMES = {
    "BN": "BatchNormalization",
    "MaxPool": "MaxPooling2D",
    "MaxPool2D": "MaxPooling2D",
    "AvePool": "AveragePooling2D",
    "AvgPool2D": "AveragePooling2D",
}


def register_layer_type(name: str, has_fixed_points: bool) -> None:
    """Called by every nics_fix layer class as it is defined (see ``ScopedLayer``)."""
    _LAYER_TYPES[name] = _LAYER_TYPES.get(name, False) or bool(has_fixed_points)


def layer_types() -> dict[str, bool]:
    """``{class name: has quantization points}`` of every registered layer class."""
    return dict(_LAYER_TYPES)


def lookup_layer_type(name: str) -> tuple[str, str | None]:
    """``(class name, why it was renamed or None)`` for a ``by_type`` key.

    Raises :class:`LookupError` naming the closest class when nothing matches.
    With no class registered (``nics_fix.layers`` not imported) every name is
    taken as it is.
    """
    if name in _LAYER_TYPES or not _LAYER_TYPES:
        return name, None
    target = FORMER_NAMES.get(name)
    if target in _LAYER_TYPES:
        return target, f"{name!r} is another name of {target}"
    spellings = {n.lower(): n for n in list(_LAYER_TYPES) + [a for a, t in FORMER_NAMES.items() if t in _LAYER_TYPES]}
    found = spellings.get(name.lower())
    if found in FORMER_NAMES:
        return FORMER_NAMES[found], f"{name!r} is another name of {FORMER_NAMES[found]}"
    if found is not None:
        return found, f"{name!r} differs from the class {found} only in case"
    close = difflib.get_close_matches(name.lower(), list(spellings), n=1, cutoff=0.6)
    hint = f"did you mean {FORMER_NAMES.get(spellings[close[0]], spellings[close[0]])!r}? " if close else ""
    quantized = sorted(n for n, points in _LAYER_TYPES.items() if points)
    raise LookupError(f"no nics_fix layer class {name!r}; {hint}"
                      f"classes with quantization points: {', '.join(quantized)}")
