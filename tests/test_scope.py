"""Scopes, kwargs scopes, manual quantization, fixed_points and logging (issue 2)."""

from __future__ import annotations

import logging
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import nics_fix as nf
import nics_fix.log
from nics_fix.config import DataConfig, GradientConfig, LayerFixedConfig
from nics_fix.scope import current_scope




def wcfg(bits, training="auto", not_training="fixed"):
    return {"data_config": {"bit_width": bits, "training": training, "not_training": not_training}}


def dense_cfg(bits):
    return {"weight": wcfg(bits)}


X8 = np.random.default_rng(7).normal(size=(6, 8)).astype(np.float32)


# ----------------------------------------------------------------------------
# fixed_scope
# ----------------------------------------------------------------------------


def test_fixed_scope_looks_up_by_name_then_type(fix8):
    cfg = {"by_type": {"Dense": fix8, "ReLU": {"activation": wcfg(6)}},
           "by_name": {"dense1": dense_cfg(4)}}
    with nf.fixed_scope("net", cfg) as scope:
        dense1 = nf.Dense(4, name="dense1")
        dense2 = nf.Dense(4, name="dense2")
        relu = nf.ReLU(name="relu1")
        conv = nf.Conv2D(2, 3, name="conv1")
        assert current_scope() is scope
    assert scope.name == "net"
    # by_name merges over by_type (no config_name): 4-bit weight data, fix8 for the rest.
    assert dense1.fixed_config.weight.data == DataConfig(4, "auto", "fixed")
    assert dense1.fixed_config.weight.gradient == GradientConfig(8, "auto")
    assert dense1.fixed_config.activation == LayerFixedConfig.from_dict(fix8).activation
    assert dense2.fixed_config == LayerFixedConfig.from_dict(fix8)
    assert relu.fixed_config.activation.data == DataConfig(6, "auto", "fixed")
    assert relu.fixed_config.weight.data.is_float
    assert conv.fixed_config.is_float
    assert list(scope.layer_configs) == ["dense1", "dense2", "relu1", "conv1"]
    assert scope.layer_configs["dense1"] == dense1.fixed_config
    assert scope.layers == [dense1, dense2, relu, conv]
    assert current_scope() is None
    assert nf.Dense(4, name="dense1").fixed_config.is_float  # outside: float


def test_explicit_fixed_config_wins_over_the_scope(fix8):
    with nf.fixed_scope("net", {"by_type": {"Dense": fix8}}):
        layer = nf.Dense(4, name="d", fixed_config=dense_cfg(3))
    assert layer.fixed_config.weight.data.bit_width == 3
    assert layer.fixed_config.activation.is_float


def test_fixed_scope_accepts_yaml_text_and_a_file(tmp_path):
    text = "by_type:\n  Dense: {weight: {data_config: {bit_width: 5, training: auto, not_training: auto}}}\n"
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    for source in (text, str(path), path, nf.parse_cfg_from_str(text)):
        with nf.fixed_scope("net", source):
            layer = nf.Dense(2)
        assert layer.fixed_config.weight.data.bit_width == 5


def test_nested_scopes_inner_wins_and_outer_is_restored():
    outer_cfg = {"by_type": {"Dense": dense_cfg(8), "ReLU": {"activation": wcfg(8)}}}
    inner_cfg = {"by_type": {"Dense": dense_cfg(4)}}
    with nf.fixed_scope("outer", outer_cfg) as outer:
        before = nf.Dense(2, name="before")
        with nf.fixed_scope("inner", inner_cfg) as inner:
            assert current_scope() is inner
            in_inner = nf.Dense(2, name="in_inner")
            relu_inner = nf.ReLU(name="relu_inner")
        assert current_scope() is outer
        after = nf.Dense(2, name="after")
    assert current_scope() is None
    outside = nf.Dense(2, name="outside")
    assert before.fixed_config.weight.data.bit_width == 8
    assert in_inner.fixed_config.weight.data.bit_width == 4
    assert relu_inner.fixed_config.is_float  # the inner scope replaces, it does not merge
    assert after.fixed_config.weight.data.bit_width == 8
    assert outside.fixed_config.is_float
    assert list(inner.layer_configs) == ["in_inner", "relu_inner"]
    assert list(outer.layer_configs) == ["before", "after"]


def test_scope_is_restored_when_the_block_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with nf.fixed_scope("net", {"by_type": {"Dense": dense_cfg(8)}}):
            raise RuntimeError("boom")
    assert current_scope() is None
    assert nf.Dense(2).fixed_config.is_float


def test_unmatched_by_name_entry_warns_and_is_listed(fix8):
    cfg = {"by_name": {"dense1": fix8, "dense_typo": fix8}}
    strategies = {"by_name": {"relu9": {"name": "noise_strategy"}}}
    with pytest.warns(UserWarning) as record:
        with nf.fixed_scope("net", cfg, strategies) as scope:
            nf.Dense(4, name="dense1")
            nf.ReLU(name="relu1")
    assert scope.unmatched_names() == ["dense_typo", "relu9"]
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert messages == ["fixed_scope 'net': by_name entries matched no layer: dense_typo, relu9; "
                        "layers built: dense1, relu1"]


def test_no_warning_when_every_by_name_entry_matches(fix8):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with nf.fixed_scope("net", {"by_name": {"dense1": fix8}}) as scope:
            nf.Dense(4, name="dense1")
    assert scope.unmatched_names() == []


def test_unmatched_by_name_for_a_model(fix8):
    inputs = keras.Input((8,))
    outputs = nf.ReLU(name="relu1")(nf.Dense(4, name="dense1")(inputs))
    model = keras.Model(inputs, outputs)
    cfg = {"by_name": {"dense1": fix8, "relu1": fix8, "dense2": fix8, "conv": fix8}}
    assert nf.unmatched_by_name(model, cfg) == ["dense2", "conv"]
    assert nf.unmatched_by_name(model, {"by_name": {"relu1": fix8}}) == []
    assert nf.unmatched_by_name(model, "by_name: {dense9: {}}\n") == ["dense9"]


# ----------------------------------------------------------------------------
# kwargs scopes
# ----------------------------------------------------------------------------


def test_kwargs_scope_typed_and_general_defaults():
    reg = keras.regularizers.L2(0.01)
    with nf.kwargs_scope(**{"Conv2D.kernel_size": 3, "kernel_regularizer": reg}):
        conv = nf.Conv2D(8)
        dense = nf.Dense(4)
        relu = nf.ReLU()  # does not take kernel_regularizer: unaffected, no error
        pool = nf.MaxPool2D()
        depthwise = nf.DepthwiseConv2D(kernel_size=2)  # not a Conv2D; has no kernel_regularizer
    assert conv.kernel_size == (3, 3)
    assert conv.kernel_regularizer is reg
    assert dense.kernel_regularizer is reg
    assert not hasattr(relu, "kernel_regularizer")
    assert pool.pool_size == (2, 2)
    assert depthwise.kernel_size == (2, 2)
    assert depthwise.depthwise_regularizer is None
    dense.build((None, 8))
    assert len(dense.losses) == 1
    assert float(dense.losses[0]) == pytest.approx(float(reg(dense.kernel)))
    with pytest.raises(TypeError, match="kernel_size"):
        nf.Conv2D(8)  # the default is gone outside the scope


def test_kwargs_scope_explicit_arguments_win():
    reg = keras.regularizers.L2(0.01)
    with nf.kwargs_scope(**{"Conv2D.kernel_size": 3, "kernel_regularizer": reg, "use_bias": False}):
        positional = nf.Conv2D(8, 5)
        keyword = nf.Conv2D(8, kernel_size=1, use_bias=True)
        dense = nf.Dense(4, kernel_regularizer=None)
    assert positional.kernel_size == (5, 5) and positional.use_bias is False
    assert keyword.kernel_size == (1, 1) and keyword.use_bias is True
    assert dense.kernel_regularizer is None and dense.use_bias is False


def test_kwargs_scope_nesting_inner_wins_and_restores():
    with nf.kwargs_scope(**{"Conv2D.kernel_size": 3, "Conv2D.padding": "same", "use_bias": False}):
        with nf.kwargs_scope(**{"Conv2D.kernel_size": 5, "use_bias": True}):
            inner = nf.Conv2D(4)
            inner_dense = nf.Dense(2)
        outer = nf.Conv2D(4)
        outer_dense = nf.Dense(2)
    assert inner.kernel_size == (5, 5) and inner.padding == "same" and inner.use_bias is True
    assert inner_dense.use_bias is True
    assert outer.kernel_size == (3, 3) and outer.padding == "same" and outer.use_bias is False
    assert outer_dense.use_bias is False
    assert nf.Dense(2).use_bias is True


def test_kwargs_scope_is_restored_when_the_block_raises():
    with pytest.raises(ValueError, match="inside"):
        with nf.kwargs_scope(use_bias=False):
            raise ValueError("inside")
    assert nf.Dense(2).use_bias is True


def test_kwargs_scope_by_type():
    with nf.kwargs_scope_by_type(Conv2D={"kernel_size": 3, "padding": "same"},
                                 Dense={"use_bias": False, "units": 7}):
        conv = nf.Conv2D(4)
        dense = nf.Dense()
        depthwise = nf.DepthwiseConv2D(2)
    assert conv.kernel_size == (3, 3) and conv.padding == "same" and conv.use_bias is True
    assert dense.units == 7 and dense.use_bias is False
    assert depthwise.padding == "valid"
    with pytest.raises(TypeError, match=r"kwargs_scope_by_type\(Dense=...\) needs a dict"):
        nf.kwargs_scope_by_type(Dense=3)


def test_kwargs_scope_and_fixed_scope_together(fix8):
    with nf.fixed_scope("net", {"by_type": {"Conv2D": fix8}}), nf.kwargs_scope(**{"Conv2D.kernel_size": 3}):
        conv = nf.Conv2D(2, name="conv1")
    assert conv.kernel_size == (3, 3)
    assert conv.fixed_config == LayerFixedConfig.from_dict(fix8)


# ----------------------------------------------------------------------------
# Manual quantization and the chain style
# ----------------------------------------------------------------------------

POINT_INT = {"data_config": {"bit_width": 6, "training": 1, "not_training": 1}}


def test_quantitize_is_quantize():
    assert nf.quantitize is nf.quantize


def test_quantize_with_a_point_config_dict():
    out = nf.quantize(tf.constant(X8), POINT_INT, name="q")
    assert np.array_equal(out.numpy(), nf.fixed_point_quantize(X8, 6, 1).numpy())


def test_quantize_with_a_layer_config():
    out = nf.quantize(tf.constant(X8), {"activation": POINT_INT}, name="q")
    assert np.array_equal(out.numpy(), nf.fixed_point_quantize(X8, 6, 1).numpy())
    layer_cfg = LayerFixedConfig.from_dict({"activation": POINT_INT})
    out = nf.quantize(tf.constant(X8), layer_cfg, name="q2")
    assert np.array_equal(out.numpy(), nf.fixed_point_quantize(X8, 6, 1).numpy())


def test_quantize_with_a_config_name_inside_a_scope():
    cfg = {"configs": {"q4": {"activation": {"data_config": {"bit_width": 4, "training": 0,
                                                              "not_training": 0}}}}}
    with nf.fixed_scope("net", cfg):
        out = nf.quantize(tf.constant(X8), "q4", name="q")
    assert np.array_equal(out.numpy(), nf.fixed_point_quantize(X8, 4, 0).numpy())


def test_quantize_config_name_errors():
    with pytest.raises(nf.ConfigError, match="config_name 'q4' given outside any fixed_scope"):
        nf.quantize(tf.constant(X8), "q4")
    with nf.fixed_scope("net", {"configs": {"q8": {}}}):
        with pytest.raises(nf.ConfigError, match="unknown config_name 'q4'; defined configs: q8"):
            nf.quantize(tf.constant(X8), "q4")
    with pytest.raises(nf.ConfigError) as info:
        nf.quantize(tf.constant(X8), {"data_config": {"bit_width": 99, "training": 1}})
    assert info.value.key_path == "fix_cfg.activation.data_config.bit_width"


def _build_chain(cfg):
    inputs = keras.Input((8,))
    outputs = (nf.wrap(inputs).Dense(units=8, name="dense1").ReLU().Dense(units=2)
               .apply(nf.quantize, cfg, name="logits").tensor)
    return keras.Model(inputs, outputs)


def test_wrap_chain_builds_the_expected_model():
    model = _build_chain(POINT_INT)
    layers = model.layers[1:]
    assert [type(layer) for layer in layers] == [nf.Dense, nf.ReLU, nf.Dense, nf.Quantize]
    assert [layer.name for layer in layers] == ["dense1", "re_lu", "dense", "logits"]
    assert layers[0].units == 8 and layers[2].units == 2
    assert model.output.shape == (None, 2)
    assert layers[3].fixed_config.activation.data == DataConfig(6, 1, 1)
    assert all(layer.fixed_config.is_float for layer in layers[:3])
    with pytest.raises(AttributeError, match="no layer 'Dens'"):
        nf.wrap(model.input).Dens(units=3)


def test_wrap_chain_output_is_the_quantized_float_output():
    model = _build_chain(POINT_INT)
    float_part = keras.Model(model.input, model.get_layer("logits").input)
    x = X8 * 3
    expected = nf.fixed_point_quantize(float_part.predict(x, verbose=0), 6, 1).numpy()
    got = model.predict(x, verbose=0)
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, float_part.predict(x, verbose=0))


# ----------------------------------------------------------------------------
# fixed_points
# ----------------------------------------------------------------------------


def _small_model(fix8):
    with nf.fixed_scope("net", {"by_type": {"Dense": fix8, "ReLU": fix8}}):
        inputs = keras.Input((8,))
        hidden = nf.Dense(4, name="dense1",
                          kernel_initializer=keras.initializers.RandomUniform(-0.1, 0.1))(inputs)
        outputs = nf.ReLU(name="relu1")(hidden)
    return keras.Model(inputs, outputs)


def test_fixed_points_lists_every_point(fix8):
    model = _small_model(fix8)
    points = nf.fixed_points(model)
    assert [(p.name, p.layer, p.variable, p.kind) for p in points] == [
        ("dense1/kernel", "dense1", "kernel", "weight"),
        ("dense1/bias", "dense1", "bias", "weight"),
        ("dense1/activation", "dense1", "activation", "activation"),
        ("relu1/activation", "relu1", "activation", "activation"),
    ]
    for p in points:
        quantity = fix8[p.kind]
        assert p.data_config == quantity["data_config"]
        assert p.gradient_config == quantity["gradient_config"]
        assert (p.data_scale, p.grad_scale) == (0, 0)
    assert nf.layer_fixed_configs(model) == {"dense1": LayerFixedConfig.from_dict(fix8),
                                             "relu1": LayerFixedConfig.from_dict(fix8)}


def test_fixed_points_after_one_training_step_hold_auto_scales(fix8):
    model = _small_model(fix8)
    dense = model.get_layer("dense1")
    kernel_before = dense.kernel.numpy()
    assert kernel_before.any() and not dense.bias.numpy().any()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=50.0), loss="mse")
    model.fit(X8, np.full((6, 4), 3.0, np.float32), batch_size=6, epochs=1, verbose=0)
    points = {p.name: p for p in nf.fixed_points(model)}

    s_kernel = int(nf.auto_scale(kernel_before))
    assert points["dense1/kernel"].data_scale == s_kernel
    # The update moved the kernel to another scale: the stored one is the forward pass's.
    assert int(nf.auto_scale(dense.kernel.numpy())) != s_kernel
    assert points["dense1/bias"].data_scale == nf.MIN_SCALE  # the bias was all zeros
    kernel_q = nf.fixed_point_quantize(kernel_before, 8, s_kernel).numpy()
    hidden = X8 @ kernel_q
    assert points["dense1/activation"].data_scale == int(nf.auto_scale(hidden))
    assert points["relu1/activation"].data_scale == int(nf.auto_scale(np.maximum(hidden, 0)))


def test_gradient_scale_is_the_auto_scale_of_the_arriving_gradient(fix8):
    model = _small_model(fix8)
    upstream = tf.constant(np.linspace(-5.0, 2.0, 24, dtype=np.float32).reshape(6, 4))
    with tf.GradientTape() as tape:
        y = model(X8, training=True)
    tape.gradient(y, model.trainable_variables, output_gradients=upstream)
    points = {p.name: p for p in nf.fixed_points(model)}
    assert points["relu1/activation"].grad_scale == int(nf.auto_scale(upstream)) == 3


# ----------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("value, level", [
    ("debug", logging.DEBUG), ("DEBUG", logging.DEBUG), ("info", logging.INFO),
    (" Info ", logging.INFO), ("warning", logging.WARNING), ("WARNING", logging.WARNING),
    ("error", logging.ERROR), ("Error", logging.ERROR), ("fatal", logging.CRITICAL),
    ("FATAL", logging.CRITICAL), (None, logging.WARNING), ("", logging.WARNING),
])
def test_level_from_env(value, level):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nics_fix.log.level_from_env(value) == level


def test_invalid_level_warns_naming_the_valid_ones():
    with pytest.warns(UserWarning) as record:
        assert nics_fix.log.level_from_env("verbose") == logging.WARNING
    assert str(record[0].message) == ("NICS_FIX_LOGLEVEL='verbose' is not one of debug, info, "
                                      "warning, error, fatal; using 'warning'")


def test_configure_from_env_sets_the_package_logger_level(monkeypatch):
    logger = logging.getLogger("nics_fix")
    assert nf.logger is logger
    old = logger.level
    try:
        monkeypatch.setenv("NICS_FIX_LOGLEVEL", "Error")
        nics_fix.log.configure_from_env()
        assert logger.level == logging.ERROR
        monkeypatch.delenv("NICS_FIX_LOGLEVEL")
        nics_fix.log.configure_from_env()
        assert logger.level == logging.WARNING
        assert len(logger.handlers) == 1  # configuring again adds no second handler
    finally:
        logger.setLevel(old)


def test_a_warning_prints_once_whether_or_not_the_application_set_up_logging():
    """Alone, the package handler prints it; under a root handler (as in a Hydra job) only that one does."""
    import io

    logger, root = logging.getLogger("nics_fix"), logging.getLogger()
    (handler,) = logger.handlers
    ours, theirs = io.StringIO(), io.StringIO()
    saved_stream, saved_root = handler.setStream(ours), root.handlers[:]
    try:
        root.handlers = []
        logger.warning("alone")
        root.handlers = [logging.StreamHandler(theirs)]
        logger.warning("under a root handler")
    finally:
        handler.setStream(saved_stream)
        root.handlers = saved_root
    assert ours.getvalue() == "[nics_fix WARNING] alone\n"
    assert theirs.getvalue() == "under a root handler\n"


def test_each_point_logs_its_resolved_config_at_info(caplog, fix8):
    cfg = {"by_name": {"dense1": {"weight": fix8["weight"]}}}
    with caplog.at_level(logging.WARNING, logger="nics_fix"):
        with nf.fixed_scope("net", cfg):
            nf.Dense(4, name="dense1").build((None, 8))
    assert not [r for r in caplog.records if r.levelno < logging.WARNING]
    keras.backend.clear_session(free_memory=False)
    with caplog.at_level(logging.INFO, logger="nics_fix"):
        with nf.fixed_scope("net", cfg):
            nf.Dense(4, name="dense1").build((None, 8))
    messages = [r.getMessage() for r in caplog.records if r.name == "nics_fix" and r.levelno == logging.INFO]
    weight = ("data {'bit_width': 8, 'training': 'auto', 'not_training': 'fixed'}, "
              "gradient {'bit_width': 8, 'training': 'auto'}")
    assert messages == [
        f"point dense1/kernel (weight): {weight}",
        f"point dense1/bias (weight): {weight}",
        "point dense1/activation (activation): data {'training': 'none', 'not_training': 'none'}, "
        "gradient {'training': 'none'}",
    ]
