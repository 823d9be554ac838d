"""The quantized copy of a weight that evaluation reuses from batch to batch.

In evaluation a weight point with a ``fixed``, integer or ``auto`` scale gives
the same quantized tensor for every batch until the weight or its scale
changes, so it is quantized once and kept, instead of once per batch of every
``evaluate``/``predict``. The copy is exactly what the point computed (the
first evaluation call after a change computes it the ordinary way), so values
never differ from quantizing each time.

The copy is dropped (marked stale; the next evaluation call recomputes it) by:

* every training-mode call of the point (``fit``, ``train_on_batch``, custom
  loops): the optimizer step that follows changes the weight;
* every evaluation-mode call while a ``tf.GradientTape`` may record (a loop
  that trains through ``training=False``): such calls also never use the copy,
  so gradients flow as they do without it;
* every ``assign``/``assign_add``/``assign_sub`` of the weight or of its scale
  variable through Keras (``set_weights``, ``load_weights``, loading a saved
  model, ``layer.kernel.assign(...)``, scale changes), in eager mode or inside
  a ``tf.function``.

A write that bypasses Keras, on the raw ``tf.Variable`` behind a weight
(``layer.kernel.value.assign(...)``, ``tf.train.Checkpoint.restore``, and
Keras' own exponential moving average: ``use_ema=True`` optimizers at the end
of ``fit`` and the ``SwapEMAWeights`` callback), is not seen: call
:func:`clear_weight_caches` after one. Under a distribution strategy nothing
is cached. BatchNormalization keeps its evaluation multiplier and offset the
same way (they depend on gamma, beta and the moving statistics only), except
under XLA, whose arithmetic rounds them differently.

>>> import keras, numpy as np, nics_fix as nf
>>> q8 = {"data_config": {"bit_width": 8, "training": "auto", "not_training": "fixed"}}
>>> layer = nf.Dense(2, fixed_config={"weight": q8})
>>> x = np.ones((1, 3), "float32")
>>> before = layer(x).numpy()
>>> layer.kernel.assign(np.zeros((3, 2), "float32"))  # drops the cached copy  # doctest: +ELLIPSIS
<...>
>>> layer(x).numpy().tolist()
[[0.0, 0.0]]
"""

from __future__ import annotations

import tensorflow as tf


def _tape_may_record() -> bool:
    try:
        from tensorflow.python.eager import record
    except ImportError:  # pragma: no cover - internal layout changed: never cache under a tape
        return True
    return bool(record.could_possibly_record())


def _on_assign(variable, callback) -> None:
    """Call ``callback()`` after each Keras ``assign`` of ``variable`` (``assign_add``/``_sub`` go through it)."""
    hooks = variable.__dict__.get("_nf_assign_hooks")
    if hooks is None:
        hooks = []
        plain_assign = variable.assign

        def assign(value):
            out = plain_assign(value)
            for hook in hooks:
                hook()
            return out

        variable.__dict__["_nf_assign_hooks"] = hooks
        variable.assign = assign
    hooks.append(callback)


class EvaluationCache:
    """The evaluation-mode value of ``variable`` (its quantized copy), stale after
    any write to it or to ``watched``; with ``shapes`` instead, a tuple of values
    derived from the ``watched`` variables (e.g. BatchNormalization's evaluation
    multiplier and offset), one per shape.

    Untracked ``tf.Variable`` (not layer weights, never saved): the copies and
    a flag saying whether they are current.
    """

    def __init__(self, variable=None, watched=(), shapes=None):
        self.variable = variable
        self.single = shapes is None
        shapes = [tuple(variable.shape)] if shapes is None else [tuple(s) for s in shapes]
        with tf.init_scope():
            self.values = [tf.Variable(tf.zeros(shape, tf.float32), trainable=False, name="quantized_copy")
                           for shape in shapes]
            self.current = tf.Variable(False, trainable=False, name="quantized_copy_current")
        self.value = self.values[0]
        for watched_variable in ((variable,) if variable is not None else ()) + tuple(watched):
            _on_assign(watched_variable, self.invalidate)

    def invalidate(self) -> None:
        self.current.assign(False)

    def quantized(self, compute, fused=None):
        """``compute()`` (the evaluation-mode value: one tensor, or a tuple as long as
        ``shapes``) or the copy of its last result.

        ``fused(copy, current)``: the same choice and refresh as one op, or None
        where it cannot be one; a ``tf.cond`` makes the choice otherwise.
        """
        if _tape_may_record() or tf.distribute.has_strategy():
            self.invalidate()
            return compute()
        if fused is not None:
            # One op instead of a cond: a cond per weight cost about 7% of an
            # MLP's evaluation step (its Switch/Merge and branch calls).
            out = fused(self.value, self.current)
            if out is not None:
                return out

        def refresh():
            out = compute()
            outs = [out] if self.single else list(out)
            for copy, value in zip(self.values, outs):
                copy.assign(value)
            self.current.assign(True)
            return [tf.identity(value) for value in outs]

        got = tf.cond(self.current, lambda: [copy.read_value() for copy in self.values], refresh)
        return got[0] if self.single else tuple(got)


def clear_weight_caches(model) -> None:
    """Drop every cached quantized weight of ``model`` (needed only after writes that bypass Keras)."""
    from nics_fix.introspect import fixed_layers

    for layer in fixed_layers(model):
        for cache in layer.evaluation_caches():
            cache.invalidate()


__all__ = ["EvaluationCache", "clear_weight_caches"]
