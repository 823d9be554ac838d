"""Fixed Conv1D, Conv2DTranspose, SeparableConv2D, EinsumDense, Embedding, LayerNormalization
and MultiHeadAttention: Keras to the bit in float, their points, and quantization by hand."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import nics_fix as nf
from tests.test_quant import ref_auto_scale, ref_quantize


def float_weights(layer):
    return [v for v in layer.weights if "int" not in str(v.dtype)]


def copy_random_weights(theirs, ours, rng):
    pairs = list(zip(float_weights(theirs), float_weights(ours)))
    assert len(pairs) == len(float_weights(ours)) == len(float_weights(theirs))
    for a, b in pairs:
        value = rng.standard_normal(a.shape).astype(np.float32) * 0.5
        a.assign(value)
        b.assign(value)


def run(layer, inputs, training):
    """Outputs and gradients (float inputs and trainable weights) of sum(y^2)."""
    inputs = [tf.constant(x) for x in inputs]
    watched = [x for x in inputs if x.dtype.is_floating]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        y = layer(*inputs, training=training)
        loss = tf.reduce_sum(tf.square(y))
    grads = tape.gradient(loss, watched + layer.trainable_weights)
    return y.numpy(), [tf.convert_to_tensor(g).numpy() for g in grads]


def float_(shape, rng):
    return rng.standard_normal(shape).astype(np.float32)


CASES = {
    "Conv1D": (dict(filters=3, kernel_size=3, padding="causal", activation="relu"),
               lambda rng: [float_((2, 7, 4), rng)]),
    "Conv2DTranspose": (dict(filters=3, kernel_size=3, strides=2, padding="same"),
                        lambda rng: [float_((2, 5, 5, 2), rng)]),
    "SeparableConv2D": (dict(filters=4, kernel_size=3, depth_multiplier=2, activation="relu"),
                        lambda rng: [float_((2, 6, 6, 3), rng)]),
    "EinsumDense": (dict(equation="abc,cd->abd", output_shape=(4, 5), bias_axes="d", activation="gelu"),
                    lambda rng: [float_((2, 4, 6), rng)]),
    "Embedding": (dict(input_dim=10, output_dim=4),
                  lambda rng: [rng.integers(0, 10, (3, 5)).astype(np.int32)]),
    "LayerNormalization": (dict(), lambda rng: [float_((3, 4, 6), rng) * 3 + 1]),
    "ReLU": (dict(max_value=6.0, negative_slope=0.1, threshold=0.5),  # Keras' arguments kept
             lambda rng: [float_((3, 8), rng) * 5]),
    "MultiHeadAttention": (dict(num_heads=2, key_dim=3, dropout=0.25, seed=7),
                           lambda rng: [float_((2, 4, 6), rng), float_((2, 5, 6), rng)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_float_config_is_keras_to_the_bit(name, rng):
    kwargs, make_inputs = CASES[name]
    inputs = make_inputs(rng)
    ours, theirs = getattr(nf, name)(**kwargs), getattr(keras.layers, name)(**kwargs)
    for layer in (ours, theirs):
        layer(*inputs)  # builds
    copy_random_weights(theirs, ours, rng)
    for training in (False, True):
        y_ours, g_ours = run(ours, inputs, training)
        y_theirs, g_theirs = run(theirs, inputs, training)
        np.testing.assert_array_equal(y_ours, y_theirs)
        assert len(g_ours) == len(g_theirs)
        for a, b in zip(g_ours, g_theirs):
            np.testing.assert_array_equal(a, b)


def test_every_weight_has_a_point(rng):
    for name, (kwargs, make_inputs) in CASES.items():
        layer = getattr(nf, name)(**kwargs)
        layer(*make_inputs(rng))
        fixed = [sub for sub in layer._flatten_layers() if isinstance(sub, nf.layers.FixedLayer)]
        weights = {id(getattr(sub, p.key)) for sub in fixed for p in sub.fixed_points.values() if p.kind == "weight"}
        assert {id(v) for v in layer.trainable_weights} == weights, name


# ---------------------------------------------------------------------------
# Quantization, computed by hand
# ---------------------------------------------------------------------------

W8 = {"weight": {"data_config": {"bit_width": 6, "training": "auto", "not_training": "auto"}}}


def test_separable_conv_quantizes_both_kernels_with_their_own_scales(rng):
    layer = nf.SeparableConv2D(2, 3, fixed_config=W8, name="sep")
    x = float_((1, 5, 5, 2), rng)
    layer(x)
    layer.depthwise_kernel.assign(float_(layer.depthwise_kernel.shape, rng) * 4)
    dw, pw, b = (v.numpy() for v in (layer.depthwise_kernel, layer.pointwise_kernel, layer.bias))
    y = layer(x, training=False).numpy()
    scales = [ref_auto_scale(w) for w in (dw, pw)]
    assert scales[0] != scales[1]
    reference = keras.layers.SeparableConv2D(2, 3)
    reference(x)
    for v, w in zip(reference.weights, (ref_quantize(dw, 6, scales[0]), ref_quantize(pw, 6, scales[1]), b)):
        v.assign(w)
    np.testing.assert_array_equal(y, reference(x).numpy())
    assert [p.data_scale for p in nf.fixed_points(keras.Sequential([layer]))][:2] == scales


def test_embedding_table_and_output_are_quantized(rng):
    cfg = {"weight": {"data_config": {"bit_width": 4, "training": 0, "not_training": 0}},
           "activation": {"data_config": {"bit_width": 3, "training": -1, "not_training": -1},
                          "gradient_config": {"bit_width": 8, "training": "auto"}}}
    layer = nf.Embedding(6, 3, fixed_config=cfg)
    ids = np.array([[0, 5, 2, 2]], np.int32)
    layer(ids)
    table = layer.embeddings.numpy()
    want = ref_quantize(ref_quantize(table, 4, 0)[ids], 3, -1)
    np.testing.assert_array_equal(layer(ids, training=False).numpy(), want)
    with tf.GradientTape() as tape:  # the table's gradient flows through both points
        loss = tf.reduce_sum(layer(ids, training=True) * 0.3)
    grad = tf.convert_to_tensor(tape.gradient(loss, layer.embeddings)).numpy()
    inside = (table >= -1) & (table <= 1 - 2 ** -3)
    counts = np.bincount(ids.ravel(), minlength=6)[:, None] * np.ones((1, 3))
    np.testing.assert_allclose(grad, np.where(inside, counts * ref_quantize(0.3, 8, ref_auto_scale(0.3)), 0))


def test_layer_normalization_quantizes_gamma_beta_and_output(rng):
    cfg = {"weight": {"data_config": {"bit_width": 4, "training": 1, "not_training": 1}},
           "activation": {"data_config": {"bit_width": 5, "training": 2, "not_training": 2}}}
    layer = nf.LayerNormalization(fixed_config=cfg, epsilon=1e-3)
    x = float_((3, 6), rng)
    layer(x)
    layer.gamma.assign(float_((6,), rng))
    layer.beta.assign(float_((6,), rng))
    reference = keras.layers.LayerNormalization(epsilon=1e-3)  # Keras normalizes, NumPy quantizes
    reference(x)
    reference.gamma.assign(ref_quantize(layer.gamma.numpy(), 4, 1))
    reference.beta.assign(ref_quantize(layer.beta.numpy(), 4, 1))
    want = ref_quantize(reference(x).numpy(), 5, 2)
    np.testing.assert_array_equal(layer(x, training=True).numpy(), want)
    assert len(np.unique(want)) > 8  # not everything clipped


def attention_by_hand(layer, q, v, cfg_bits, scale_scores, scale_softmax):
    """Multi-head attention in NumPy float64 from the (float) projection weights."""
    def project(sub, x):
        return np.einsum("abc,cde->abde", x, sub.kernel.numpy()) + sub.bias.numpy()

    query, key, value = (project(sub, x) for sub, x in ((layer.query_dense, q), (layer.key_dense, v),
                                                         (layer.value_dense, v)))
    scores = np.einsum("aecd,abcd->acbe", key, query / np.sqrt(layer.key_dim))
    scores = ref_quantize(scores, cfg_bits, scale_scores).astype(np.float64)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = ref_quantize(probs / probs.sum(-1, keepdims=True), cfg_bits, scale_softmax).astype(np.float64)
    context = np.einsum("acbe,aecd->abcd", probs, value)
    out = layer.output_dense
    return np.einsum("abcd,cde->abe", context, out.kernel.numpy()) + out.bias.numpy()


def test_attention_scores_and_softmax_are_quantized(rng):
    cfg = {"activation": {"data_config": {"bit_width": 6, "training": 2, "not_training": 1}}}
    layer = nf.MultiHeadAttention(2, 3, fixed_config=cfg, projection_configs={
        part: {} for part in ("query", "key", "value", "attention_output")}, name="att")
    q, v = float_((2, 4, 5), rng), float_((2, 3, 5), rng)
    layer(q, v)
    for w in float_weights(layer):
        w.assign(float_(w.shape, rng))
    got, scores = layer(q, v, return_attention_scores=True, training=False)
    np.testing.assert_allclose(got.numpy(), attention_by_hand(layer, q, v, 6, 1, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(scores.numpy(), ref_quantize(scores.numpy(), 6, 1))  # the softmax point's grid
    names = [p.name for p in nf.fixed_points(keras.Sequential([layer]))]
    assert names[:2] == ["att/scores", "att/softmax"] and "att_attention_output/kernel" in names
    float_out = keras.layers.MultiHeadAttention.call(layer, q, v)  # no points: differs
    assert not np.allclose(got.numpy(), float_out.numpy(), atol=1e-3)


def test_attention_projections_resolve_by_their_own_names_in_a_scope():
    w4 = {"weight": {"data_config": {"bit_width": 4, "training": "auto", "not_training": "auto"}}}
    cfg = {"by_type": {"EinsumDense": w4}, "by_name": {"att_value": {"weight": {"data_config": {"bit_width": 7}}},
                                                       "att": {"activation": w4["weight"]}}}
    with nf.fixed_scope("net", cfg) as scope:
        q = keras.Input((4, 8))
        model = keras.Model(q, nf.MultiHeadAttention(2, 4, name="att")(q, q))
    assert scope.unmatched_names() == []
    configs = nf.layer_fixed_configs(model)
    assert configs["att_query"].weight.data.bit_width == 4
    assert configs["att_value"].weight.data.bit_width == 7
    assert configs["att"].activation.data.bit_width == 4 and configs["att"].weight.is_float
    restored = keras.layers.deserialize(keras.layers.serialize(model.get_layer("att")))
    assert restored._nf_projections["value"][0].weight.data.bit_width == 7  # configs travel in get_config


def test_flash_attention_with_quantized_scores_is_a_clear_error(rng):
    cfg = {"activation": {"data_config": {"bit_width": 6, "training": 2, "not_training": 0}}}
    layer = nf.MultiHeadAttention(2, 3, fixed_config=cfg, flash_attention=True)
    with pytest.raises(ValueError, match="flash attention has none; pass flash_attention=False"):
        layer(float_((1, 4, 6), np.random.default_rng(0)), float_((1, 4, 6), np.random.default_rng(1)))


# ---------------------------------------------------------------------------
# Cost model: MACs of the new layers, by hand
# ---------------------------------------------------------------------------

MAC_CASES = [  # layer, input shape (no batch), {weight key: MACs per example}
    (lambda: nf.Dense(5), (4, 6), {"kernel": 4 * 6 * 5}),  # on a sequence: per position
    (lambda: nf.EinsumDense("abc,cd->abd", (4, 5)), (4, 6), {"kernel": 4 * 5 * 6}),
    (lambda: nf.SeparableConv2D(4, 3, depth_multiplier=2), (6, 6, 3),
     {"depthwise_kernel": 16 * 3 * 3 * 3 * 2, "pointwise_kernel": 16 * 6 * 4}),
    (lambda: nf.Conv2DTranspose(3, 3, strides=2, padding="same"), (5, 5, 2), {"kernel": 25 * 3 * 3 * 3 * 2}),
    (lambda: nf.Conv1D(3, 2), (7, 4), {"kernel": 6 * 2 * 4 * 3}),
    (lambda: nf.Embedding(10, 4), (5,), {}),  # a lookup, no multiplications
]


@pytest.mark.parametrize("make, shape, want", MAC_CASES)
def test_multiply_accumulates_per_weight(make, shape, want):
    from nics_fix.cost import _weight_macs

    layer = make()
    layer.build((None,) + shape)
    assert _weight_macs(layer) == want


def test_bops_of_attention_count_its_projections():
    bits = {"data_config": {"bit_width": 4, "training": "auto", "not_training": "auto"}}
    with nf.fixed_scope("net", {"by_type": {"EinsumDense": {"weight": bits}}}):
        inputs = keras.Input((4, 6))
        x = nf.quantize(inputs, {"data_config": {"bit_width": 8, "training": "auto", "not_training": "auto"}})
        model = keras.Model(inputs, nf.MultiHeadAttention(2, 3, name="att")(x, x))
    projection = 4 * 2 * 3 * 6  # each of q, k, v and the output: 144 MACs
    # q, k, v read the 8-bit input; the output projection reads an unquantized product (32 bits).
    assert nf.cost.bops(model) == 3 * projection * 4 * 8 + projection * 4 * 32
