"""Strategies: registration, strategy configs, hook order and NoiseStrategy (issue 2)."""

from __future__ import annotations

import logging
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import nics_fix as nf
from nics_fix.strategy import HOOKS, StrategyChain, build_strategy, get_strategy_class



# ----------------------------------------------------------------------------
# Test strategies (registered globally on import)
# ----------------------------------------------------------------------------

EVENTS: list = []


class RecordingStrategy(nf.Strategy):
    """Appends ``(tag, hook, point name)`` to EVENTS in each of the eight hooks."""

    def __init__(self, tag: str = "?"):
        super().__init__()
        self.tag = tag


def _recording_hook(hook):
    def method(self, x, point):
        EVENTS.append((self.tag, hook, point.name))
        return x

    method.__name__ = hook
    return method


for _hook in HOOKS:
    setattr(RecordingStrategy, _hook, _recording_hook(_hook))


class SpyStrategy(nf.Strategy):
    """Records what each hook receives: the tensor, the scale, the step and the training flag."""

    seen: dict = {}

    def __init__(self):
        super().__init__()
        SpyStrategy.seen = {}


def _spy_hook(hook):
    def method(self, x, point):
        scale = None if point.scale is None else int(point.scale)
        step = None if point.step is None else float(point.step)
        SpyStrategy.seen.setdefault(hook, []).append(
            dict(x=np.array(x), scale=scale, step=step, training=point.training, name=point.name,
                 kind=point.kind, bit_width=point.bit_width))
        return x

    method.__name__ = hook
    return method


for _hook in HOOKS:
    setattr(SpyStrategy, _hook, _spy_hook(_hook))


class DoubleBeforeQuantizer(nf.Strategy):
    def pre_activation(self, x, point):
        return 2.0 * x


@pytest.fixture(autouse=True)
def _clear_events():
    EVENTS.clear()
    yield
    EVENTS.clear()


def act_cfg(bits, training, not_training=None, grad=None):
    cfg = {"activation": {"data_config": {"bit_width": bits, "training": training,
                                          "not_training": training if not_training is None else not_training}}}
    if grad is not None:
        cfg["activation"]["gradient_config"] = {"bit_width": grad[0], "training": grad[1]}
    return cfg


def noise(where: str, kind: str, low, high, part="data_config"):
    quantity, stage = where.split(".")
    return {"name": "noise_strategy", quantity: {part: {stage: {"type": kind, "min": low, "max": high}}}}


X8 = np.array([[0.30, -1.20, 0.77, 0.05, -0.40, 1.10, 0.66, -0.01],
               [1.50, 0.20, -0.33, 0.90, 0.12, -0.80, 0.41, 0.25]], np.float32)


# ----------------------------------------------------------------------------
# Registration and strategy configs
# ----------------------------------------------------------------------------


def test_registration_by_snake_case_class_name():
    class MyTinyStrategy(nf.Strategy):
        pass

    class Other(nf.Strategy):
        name = "custom_name"

    assert MyTinyStrategy.name == "my_tiny_strategy"
    assert get_strategy_class("my_tiny_strategy") is MyTinyStrategy
    assert get_strategy_class("custom_name") is Other
    assert get_strategy_class("noise_strategy") is nf.NoiseStrategy
    assert get_strategy_class("recording_strategy") is RecordingStrategy
    registered = nf.registered_strategies()
    assert {"noise_strategy", "my_tiny_strategy", "custom_name", "recording_strategy"} <= set(registered)
    assert "strategy_chain" not in registered
    assert registered == sorted(registered)


def test_base_strategy_hooks_are_identity():
    s = nf.Strategy()
    x = tf.constant([1.5, -2.0])
    info = nf.PointInfo("d/kernel", "weight", nf.DataConfig(8, "auto", "fixed"), tf.constant(1))
    for hook in HOOKS:
        assert getattr(s, hook)(x, info) is x
    assert info.quantized and float(info.step) == 2.0 ** (1 - 7)
    assert not nf.PointInfo("d/kernel", "weight", nf.DataConfig()).quantized
    assert nf.PointInfo("d/kernel", "weight", nf.DataConfig()).step is None


ISSUE_STRATEGY_YAML = textwrap.dedent("""\
    by_type:
      Dense:
        name: noise_strategy
        weight: {gradient_config: {post: {type: uniform_ratio, min: -0.5, max: 0.5}}}
    by_name:
      conv1:
        - {name: noise_strategy, activation: {data_config: {pre: {type: uniform, min: 0, max: 0.1}}}}
        - {name: recording_strategy, tag: inner}
      dense2: {name: recording_strategy, tag: only}
    """)


def test_parse_strategy_cfg_by_type_by_name_and_list_nesting():
    cfg = nf.parse_strategy_cfg_from_str(ISSUE_STRATEGY_YAML)
    assert cfg.by_name_keys == ["conv1", "dense2"]
    dense = cfg.resolve("dense1", "Dense")
    assert dense == [{"name": "noise_strategy",
                      "weight": {"gradient_config": {"post": {"type": "uniform_ratio", "min": -0.5,
                                                              "max": 0.5}}}}]
    strategy = build_strategy(dense)
    assert isinstance(strategy, nf.NoiseStrategy)
    assert strategy.specs == {"post_weight_grad": {"type": "uniform_ratio", "min": -0.5, "max": 0.5}}
    assert strategy.uses_gradients("weight") and not strategy.uses_gradients("activation")

    conv = cfg.resolve("conv1", "Conv2D")
    assert [e["name"] for e in conv] == ["noise_strategy", "recording_strategy"]
    chain = build_strategy(conv)
    assert isinstance(chain, StrategyChain)
    assert [type(s) for s in chain.strategies] == [nf.NoiseStrategy, RecordingStrategy]
    assert chain.strategies[1].tag == "inner"
    assert chain.get_config() == conv

    # by_name replaces by_type: dense2 gets only its own entry.
    assert cfg.resolve("dense2", "Dense") == [{"name": "recording_strategy", "tag": "only"}]
    assert cfg.resolve("relu1", "ReLU") is None
    assert nf.StrategyConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_parse_strategy_cfg_from_file(tmp_path):
    path = tmp_path / "strategy.yaml"
    path.write_text(ISSUE_STRATEGY_YAML)
    assert nf.parse_strategy_cfg_from_file(path).resolve("conv1", "Conv2D")[1]["tag"] == "inner"
    path.write_text("by_type:\n  Dense: {name: nosie_strategy}\n")
    with pytest.raises(nf.ConfigError) as info:
        nf.parse_strategy_cfg_from_file(path)
    assert str(info.value).startswith(f"{path}: by_type.Dense.name: unknown strategy 'nosie_strategy'")


def test_unknown_strategy_names_it_and_lists_registered_ones():
    with pytest.raises(nf.ConfigError) as info:
        nf.parse_strategy_cfg_from_str(
            "by_name:\n  conv1: [{name: noise_strategy}, {name: gaussian_strategy}]\n")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.key_path == "by_name.conv1[1].name"
    assert "unknown strategy 'gaussian_strategy'" in str(err)
    assert f"registered strategies: {', '.join(nf.registered_strategies())}" in str(err)
    assert "noise_strategy" in str(err) and "recording_strategy" in str(err)


STRATEGY_ERRORS = {
    "noise type": (
        "by_type:\n  Dense:\n    name: noise_strategy\n"
        "    weight: {data_config: {pre: {type: gaussian, min: 0, max: 1}}}\n",
        "by_type.Dense.weight.data_config.pre.type",
        "noise type must be one of none, uniform, uniform_ratio, got 'gaussian'"),
    "min > max": (
        "by_name:\n  conv1:\n    - {name: recording_strategy}\n"
        "    - {name: noise_strategy, activation: {gradient_config: {post: {type: uniform, min: 2, max: 1}}}}\n",
        "by_name.conv1[1].activation.gradient_config.post",
        "min (2) is greater than max (1)"),
    "min not a number": (
        "by_type:\n  ReLU:\n    name: noise_strategy\n"
        "    activation: {data_config: {post: {type: uniform, min: small, max: 1}}}\n",
        "by_type.ReLU.activation.data_config.post.min", "must be a number, got 'small'"),
    "max a bool": (
        "by_type:\n  ReLU:\n    name: noise_strategy\n"
        "    activation: {data_config: {post: {type: uniform, min: 0, max: true}}}\n",
        "by_type.ReLU.activation.data_config.post.max", "must be a number, got True"),
    "unknown stage": (
        "by_type:\n  Dense:\n    name: noise_strategy\n"
        "    weight: {data_config: {middle: {type: uniform}}}\n",
        "by_type.Dense.weight.data_config.middle", "unknown key 'middle' (allowed: pre, post)"),
    "unknown spec key": (
        "by_type:\n  Dense:\n    name: noise_strategy\n"
        "    weight: {data_config: {pre: {type: uniform, mean: 0}}}\n",
        "by_type.Dense.weight.data_config.pre.mean", "unknown key 'mean'"),
    "unknown part": (
        "by_type:\n  Dense:\n    name: noise_strategy\n    weight: {storage_config: {}}\n",
        "by_type.Dense.weight.storage_config", "unknown key 'storage_config'"),
    "spec not a mapping": (
        "by_type:\n  Dense:\n    name: noise_strategy\n    weight: {data_config: {pre: uniform}}\n",
        "by_type.Dense.weight.data_config.pre", "expected a mapping, got str 'uniform'"),
    "unknown argument": (
        "by_type:\n  Dense: {name: noise_strategy, bias: {}}\n",
        "by_type.Dense", "noise_strategy: got an unexpected keyword argument 'bias'"),
    "missing name": (
        "by_type:\n  Dense: {weight: {}}\n", "by_type.Dense", "a strategy entry needs a 'name'"),
    "name not a string": (
        "by_type:\n  Dense: {name: [noise_strategy]}\n", "by_type.Dense.name",
        "strategy name must be a string, got ['noise_strategy']; registered strategies: "),
    "entry not a mapping": (
        "by_type:\n  Dense: noise_strategy\n", "by_type.Dense", "expected a mapping, got str"),
    "empty list": ("by_name:\n  conv1: []\n", "by_name.conv1", "an empty strategy list"),
    "unknown top-level key": ("configs: {}\n", "configs", "unknown key 'configs'"),
}


@pytest.mark.parametrize("name", list(STRATEGY_ERRORS))
def test_bad_strategy_config_raises_config_error_with_key_path(name):
    text, key_path, fragment = STRATEGY_ERRORS[name]
    with pytest.raises(nf.ConfigError) as info:
        nf.parse_strategy_cfg_from_str(text)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.key_path == key_path
    assert str(err).startswith(key_path + ": "), str(err)
    assert fragment in str(err), str(err)


def test_explicit_layer_strategy_config_is_validated():
    with pytest.raises(nf.ConfigError) as info:
        nf.Dense(4, name="dense1", strategy_config={"name": "no_such_strategy"})
    assert "unknown strategy 'no_such_strategy'" in str(info.value)
    assert info.value.key_path == "dense1.strategy_config.name"


# ----------------------------------------------------------------------------
# Hook order and what each hook sees
# ----------------------------------------------------------------------------


def test_chain_order_forward_and_backward(fix8):
    strategies = "by_name:\n  dense1: [{name: recording_strategy, tag: A}, {name: recording_strategy, tag: B}]\n"
    with nf.fixed_scope("net", {"by_name": {"dense1": fix8}}, strategies):
        layer = nf.Dense(4, name="dense1")
    layer.build((None, 8))
    x = tf.constant(X8)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * y)
    forward = list(EVENTS)
    EVENTS.clear()
    tape.gradient(loss, [x, layer.kernel, layer.bias])
    backward = list(EVENTS)

    def around(stage_hook, point):
        return [("A", f"pre_{stage_hook}", point), ("B", f"pre_{stage_hook}", point),
                ("B", f"post_{stage_hook}", point), ("A", f"post_{stage_hook}", point)]

    assert forward == (around("weight", "dense1/kernel") + around("weight", "dense1/bias")
                       + around("activation", "dense1/activation"))
    # The gradient arrives at the output first, then at the weights.
    assert backward[:4] == around("activation_grad", "dense1/activation")
    for point in ("dense1/kernel", "dense1/bias"):
        assert [e for e in backward if e[2] == point] == around("weight_grad", point)
    assert len(backward) == 12


def test_chain_order_from_the_layer_strategy_config_argument():
    layer = nf.ReLU(strategy_config=[{"name": "recording_strategy", "tag": "outer"},
                                     {"name": "recording_strategy", "tag": "mid"},
                                     {"name": "recording_strategy", "tag": "inner"}])
    layer(tf.constant(X8), training=False)
    assert [(t, h) for t, h, _ in EVENTS] == [
        ("outer", "pre_activation"), ("mid", "pre_activation"), ("inner", "pre_activation"),
        ("inner", "post_activation"), ("mid", "post_activation"), ("outer", "post_activation")]


def test_pre_output_is_what_the_quantizer_sees():
    cfg = act_cfg(8, 1)
    relu = nf.ReLU(fixed_config=cfg, strategy_config={"name": "double_before_quantizer"})
    plain = nf.ReLU(fixed_config=cfg)
    x = tf.constant(X8)
    relu_x = np.maximum(X8, 0)
    out = relu(x, training=False).numpy()
    expected = nf.fixed_point_quantize(2.0 * relu_x, 8, 1).numpy()
    assert np.array_equal(out, expected)
    assert np.array_equal(plain(x).numpy(), nf.fixed_point_quantize(relu_x, 8, 1).numpy())
    assert not np.array_equal(out, plain(x).numpy())
    assert out.max() == 2.0 - 2.0 ** -6  # 2 * 1.5 saturates at the top of the scale-1 range


def test_post_sees_quantized_values_and_the_scale_just_used():
    cfg = act_cfg(8, "auto", "fixed", grad=(6, "auto"))
    relu = nf.ReLU(name="relu1", fixed_config=cfg, strategy_config={"name": "spy_strategy"})
    x = tf.constant(X8)
    upstream = tf.constant(np.linspace(-0.9, 3.1, 16, dtype=np.float32).reshape(2, 8))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = relu(x, training=True)
    dx = tape.gradient(y, x, output_gradients=upstream).numpy()
    seen = SpyStrategy.seen

    relu_x = np.maximum(X8, 0)
    s = int(nf.auto_scale(relu_x))
    assert s == 1
    pre, post = seen["pre_activation"][0], seen["post_activation"][0]
    assert np.array_equal(pre["x"], relu_x)
    assert pre["scale"] == 0  # the stored scale (initial value for auto) before this call
    assert np.array_equal(post["x"], nf.fixed_point_quantize(relu_x, 8, s).numpy())
    assert post["scale"] == s and post["step"] == 2.0 ** (s - 7)
    assert post["name"] == "relu1/activation" and post["kind"] == "activation"
    assert post["bit_width"] == 8 and post["training"] is True

    gs = int(nf.auto_scale(upstream))
    assert gs == 2
    gpre, gpost = seen["pre_activation_grad"][0], seen["post_activation_grad"][0]
    assert np.array_equal(gpre["x"], upstream.numpy())
    assert gpre["scale"] == 0
    quantized_grad = nf.fixed_point_quantize(upstream, 6, gs).numpy()
    assert np.array_equal(gpost["x"], quantized_grad)
    assert gpost["scale"] == gs and gpost["step"] == 2.0 ** (gs - 5) and gpost["bit_width"] == 6
    assert np.array_equal(dx, np.where(X8 > 0, quantized_grad, 0))

    # A second call: pre_* sees the scale stored by the first one; evaluation uses `fixed`.
    relu(x * 4, training=False)
    pre2, post2 = seen["pre_activation"][1], seen["post_activation"][1]
    assert pre2["scale"] == s and post2["scale"] == s and pre2["training"] is False
    assert np.array_equal(post2["x"], nf.fixed_point_quantize(relu_x * 4, 8, s).numpy())
    assert set(seen) == {"pre_activation", "post_activation", "pre_activation_grad",
                         "post_activation_grad"}


def test_post_weight_sees_quantized_kernel(fix8):
    layer = nf.Dense(4, fixed_config={"weight": fix8["weight"]}, strategy_config={"name": "spy_strategy"})
    layer.build((None, 8))
    kernel = layer.kernel.numpy()
    layer(tf.constant(X8), training=True)
    s = int(nf.auto_scale(kernel))
    post = SpyStrategy.seen["post_weight"][0]
    assert post["name"].endswith("/kernel")
    assert post["scale"] == s
    assert np.array_equal(post["x"], nf.fixed_point_quantize(kernel, 8, s).numpy())
    assert np.array_equal(SpyStrategy.seen["pre_weight"][0]["x"], kernel)
    # A float activation point passes None as scale.
    assert SpyStrategy.seen["post_activation"][0]["scale"] is None
    assert SpyStrategy.seen["post_activation"][0]["step"] is None


# ----------------------------------------------------------------------------
# NoiseStrategy
# ----------------------------------------------------------------------------


def test_uniform_noise_with_min_equal_max_adds_exactly_c_in_training_only():
    c = 0.375
    cfg = act_cfg(8, 1)
    relu = nf.ReLU(fixed_config=cfg, strategy_config=noise("activation.post", "uniform", c, c))
    x = tf.constant(X8)
    q = nf.fixed_point_quantize(np.maximum(X8, 0), 8, 1).numpy()
    assert np.array_equal(relu(x, training=True).numpy(), q + np.float32(c))
    assert np.array_equal(relu(x, training=False).numpy(), q)


def test_uniform_noise_before_the_quantizer_is_quantized():
    c = 0.25
    relu = nf.ReLU(fixed_config=act_cfg(4, 0), strategy_config=noise("activation.pre", "uniform", c, c))
    out = relu(tf.constant(X8), training=True).numpy()
    assert np.array_equal(out, nf.fixed_point_quantize(np.maximum(X8, 0) + np.float32(c), 4, 0).numpy())


def test_uniform_ratio_half_adds_half_a_step():
    relu = nf.ReLU(fixed_config=act_cfg(8, 1), strategy_config=noise("activation.post", "uniform_ratio",
                                                                      0.5, 0.5))
    q = nf.fixed_point_quantize(np.maximum(X8, 0), 8, 1).numpy()
    out = relu(tf.constant(X8), training=True).numpy()
    assert np.array_equal(out, q + np.float32(2.0 ** -7))  # step = 2**(1 - 8 + 1)
    assert np.array_equal(relu(tf.constant(X8), training=False).numpy(), q)


def test_uniform_ratio_on_a_float_point_warns_and_does_nothing(caplog):
    relu = nf.ReLU(name="relu_float", strategy_config=noise("activation.post", "uniform_ratio", 0.5, 0.5))
    with caplog.at_level(logging.WARNING, logger="nics_fix"):
        out = relu(tf.constant(X8), training=True).numpy()
        relu(tf.constant(X8), training=True)
    assert np.array_equal(out, np.maximum(X8, 0))
    messages = [r.getMessage() for r in caplog.records if r.name == "nics_fix"]
    assert len(messages) == 1, messages  # warned once, not on every call
    assert "uniform_ratio noise at relu_float/activation (post_activation) has no effect" in messages[0]
    assert caplog.records[0].levelno == logging.WARNING


def test_weight_gradient_noise_changes_the_kernel_gradient_by_exactly_c():
    c = 0.125
    noisy = nf.Dense(4, strategy_config=noise("weight.post", "uniform", c, c, part="gradient_config"))
    plain = nf.Dense(4)
    noisy.build((None, 8))
    plain.build((None, 8))
    plain.set_weights(noisy.get_weights())
    x = tf.constant(X8)

    def grads(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
        return [g.numpy() for g in tape.gradient(loss, [layer.kernel, layer.bias, x])]

    gk, gb, gx = grads(noisy)
    pk, pb, px = grads(plain)
    assert np.array_equal(gk, pk + np.float32(c))
    assert np.array_equal(gb, pb + np.float32(c))  # the bias is a weight point too
    assert np.array_equal(gx, px)  # the input gradient is untouched
    assert not np.array_equal(gk, pk)


def test_noise_type_none_does_nothing():
    relu = nf.ReLU(fixed_config=act_cfg(8, 1), strategy_config=noise("activation.post", "none", 0, 0))
    q = nf.fixed_point_quantize(np.maximum(X8, 0), 8, 1).numpy()
    assert np.array_equal(relu(tf.constant(X8), training=True).numpy(), q)
