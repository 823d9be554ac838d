"""Fixed-point ``MultiHeadAttention``: fixed projections, quantized scores and softmax.

A ``MultiHeadAttention`` named ``att`` holds its projections as fixed
:class:`~nics_fix.layers.einsum_dense.EinsumDense` layers of their own, named
``att_query``, ``att_key``, ``att_value`` and ``att_attention_output`` (and
``att_gate`` with ``use_gate=True``). Each has kernel, bias and output points
and resolves its config like any layer, by its own name and then by the type
``EinsumDense``. The attention layer itself has two activation points, both
configured by its own ``activation`` config:

* ``att/scores``: the scaled dot products ``q.k / sqrt(key_dim)`` entering the softmax;
* ``att/softmax``: the attention probabilities leaving it.

``att`` has no output point of its own: its output is ``att_attention_output``'s.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import keras

from nics_fix.config import LayerFixedConfig
from nics_fix.layers.base import FixedLayer, _as_training_flag
from nics_fix.layers.einsum_dense import EinsumDense
from nics_fix.point import FixedPoint
from nics_fix.scope import current_scope
from nics_fix.strategy import build_strategy

#: The projections of a MultiHeadAttention, by Keras' names for them.
PROJECTIONS = ("query", "key", "value", "gate", "attention_output")

_BUILD_LOCK = threading.RLock()


def projection_name(attention_name: str, part: str) -> str:
    """The layer name of projection ``part`` of the attention layer ``attention_name``.

    >>> projection_name("att", "query")
    'att_query'
    """
    return f"{attention_name}_{part}"


@contextlib.contextmanager
def _fixed_projections(layer):
    """While Keras' ``MultiHeadAttention.build`` runs, its projections are made fixed.

    Keras creates them inside ``build`` from its module's ``EinsumDense``; that
    name is pointed at a factory for the duration (for this thread only), so
    Keras' own build keeps deciding every shape and equation.
    """
    module = sys.modules[keras.layers.MultiHeadAttention.__module__]
    plain = module.EinsumDense
    builder = threading.get_ident()

    def make(*args, name, **kwargs):
        if threading.get_ident() != builder:
            return plain(*args, name=name, **kwargs)
        config, strategy = layer._nf_projections[name]
        return EinsumDense(*args, name=projection_name(layer.name, name), fixed_config=config,
                           strategy_config=strategy, **kwargs)

    with _BUILD_LOCK:
        module.EinsumDense = make
        try:
            yield
        finally:
            module.EinsumDense = plain


@keras.saving.register_keras_serializable(package="nics_fix")
class MultiHeadAttention(FixedLayer, keras.layers.MultiHeadAttention):
    """``keras.layers.MultiHeadAttention`` with fixed projections and quantized attention.

    ``projection_configs`` / ``projection_strategy_configs``: optional
    ``{part: config}`` for the projections (parts: ``query``, ``key``,
    ``value``, ``gate``, ``attention_output``). A part not given there takes
    its config from the active :func:`~nics_fix.fixed_scope` (by the name
    ``<layer>_<part>``, then the type ``EinsumDense``), or outside any scope
    this layer's own ``fixed_config``.

    With a non-float ``activation`` config the attention runs Keras' explicit
    path (einsum, softmax, einsum) so that the scores exist to be quantized;
    float, it runs exactly as Keras' layer does.

    >>> import keras, nics_fix as nf
    >>> q = keras.Input((4, 8))
    >>> m = keras.Model(q, nf.MultiHeadAttention(2, 4, name="att")(q, q))
    >>> names = [p.name for p in nf.fixed_points(m)]
    >>> names[:2], "att_query/kernel" in names, "att_attention_output/activation" in names
    (['att/scores', 'att/softmax'], True, True)
    """

    quantize_output = False  # the output projection's activation point quantizes the output
    config_keys = FixedLayer.config_keys + ("projection_configs", "projection_strategy_configs")

    def __init__(self, *args, fixed_config=None, strategy_config=None, projection_configs=None,
                 projection_strategy_configs=None, **kwargs):
        super().__init__(*args, fixed_config=fixed_config, strategy_config=strategy_config, **kwargs)
        configs, strategies = dict(projection_configs or {}), dict(projection_strategy_configs or {})
        scope = current_scope()
        self._nf_projections = {}
        for part in PROJECTIONS:
            if part == "gate" and not self._use_gate:
                continue
            if scope is not None:
                config, strategy = scope.resolve_name(projection_name(self.name, part), "EinsumDense")
            else:
                config, strategy = self._nf_config, self._nf_strategy_config
            if part in configs:
                config = LayerFixedConfig.from_dict(configs[part], f"{self.name}.projection_configs.{part}")
            if part in strategies:
                strategy = strategies[part]
            self._nf_projections[part] = (config, strategy)

    def build(self, query_shape, value_shape, key_shape=None):
        with _fixed_projections(self):
            keras.layers.MultiHeadAttention.build(self, query_shape, value_shape, key_shape)
        strategy = build_strategy(self._nf_strategy_config)
        for key in ("scores", "softmax"):
            self._nf_points[key] = FixedPoint(self, key, "activation", self._nf_config.activation, strategy)

    def call(self, query, value, key=None, query_mask=None, value_mask=None, key_mask=None,
             attention_mask=None, return_attention_scores=False, training=None, use_causal_mask=False):
        training = _as_training_flag(training)
        explicit = not all(point.is_identity(training) for point in self._nf_points.values())
        if explicit and self._flash_attention:
            raise ValueError(
                f"MultiHeadAttention {self.name!r}: quantizing the attention scores needs the explicit "
                "attention path, and flash attention has none; pass flash_attention=False or keep this "
                "layer's activation config float")
        object.__setattr__(self, "_nf_training", training)
        # Asking for the scores makes Keras take the explicit path, where
        # _masked_softmax (below) quantizes them.
        outputs = keras.layers.MultiHeadAttention.call(
            self, query, value, key=key, query_mask=query_mask, value_mask=value_mask, key_mask=key_mask,
            attention_mask=attention_mask, return_attention_scores=return_attention_scores or explicit,
            training=training, use_causal_mask=use_causal_mask)
        return outputs[0] if explicit and not return_attention_scores else outputs

    def _masked_softmax(self, attention_scores, attention_mask=None):
        training = self.__dict__.get("_nf_training", False)
        scores = self._nf_points["scores"](attention_scores, training)
        probabilities = super()._masked_softmax(scores, attention_mask)
        return self._nf_points["softmax"](probabilities, training)

    def get_config(self):
        config = super().get_config()
        config["projection_configs"] = {part: c.to_dict() for part, (c, _) in self._nf_projections.items()}
        strategies = {part: [dict(e) for e in s] for part, (_, s) in self._nf_projections.items() if s}
        if strategies:
            config["projection_strategy_configs"] = strategies
        return config
