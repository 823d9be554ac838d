"""Fixed configs: the YAML format, resolution rules and the error discipline (issue 2)."""

from __future__ import annotations

import textwrap

import pytest

import nics_fix as nf
from nics_fix.config import DataConfig, GradientConfig, LayerFixedConfig, StorageConfig



ISSUE_EXAMPLE = textwrap.dedent("""\
    configs:                 # named, reusable blocks
      fix8:
        weight:
          data_config: {bit_width: 8, training: auto, not_training: fixed}
          gradient_config: {bit_width: 8, training: auto}
        activation:
          data_config: {bit_width: 8, training: auto, not_training: fixed}
          gradient_config: {bit_width: 16, training: auto}
    by_type:                 # per layer type (Dense, Conv2D, ReLU, ...)
      Conv2D: {config_name: fix8}
    by_name:                 # per layer name; wins over by_type; may override parts of a named block
      dense1:
        config_name: fix8
        weight: {data_config: {bit_width: 4, training: auto, not_training: fixed}}
    """)

FIX8_WEIGHT_DATA = DataConfig(bit_width=8, training="auto", not_training="fixed")
FIX8_WEIGHT_GRAD = GradientConfig(bit_width=8, training="auto")
FIX8_ACT_DATA = DataConfig(bit_width=8, training="auto", not_training="fixed")
FIX8_ACT_GRAD = GradientConfig(bit_width=16, training="auto")


def parse(text: str) -> nf.FixedConfig:
    return nf.parse_cfg_from_str(textwrap.dedent(text))


# ----------------------------------------------------------------------------
# The issue's example and resolution rules
# ----------------------------------------------------------------------------


def test_issue_example_dense1_gets_4_bit_weights_and_the_rest_of_fix8():
    cfg = nf.parse_cfg_from_str(ISSUE_EXAMPLE)
    assert cfg.config_names == ["fix8"]
    assert cfg.by_name_keys == ["dense1"]
    dense1 = cfg.resolve("dense1", "Dense")
    assert dense1.weight.data == DataConfig(bit_width=4, training="auto", not_training="fixed")
    assert dense1.weight.gradient == FIX8_WEIGHT_GRAD
    assert dense1.activation.data == FIX8_ACT_DATA
    assert dense1.activation.gradient == FIX8_ACT_GRAD
    assert dense1.weight.storage == StorageConfig()


def test_by_type_alone_gives_the_named_block():
    cfg = nf.parse_cfg_from_str(ISSUE_EXAMPLE)
    conv = cfg.resolve("conv7", "Conv2D")
    assert conv == cfg.named("fix8")
    assert conv.weight.data == FIX8_WEIGHT_DATA
    assert conv.activation.gradient == FIX8_ACT_GRAD


def test_by_name_wins_over_by_type():
    cfg = nf.parse_cfg_from_str(ISSUE_EXAMPLE)
    # A Conv2D named dense1 takes its by_name entry (4-bit weights), not the by_type one.
    assert cfg.resolve("dense1", "Conv2D").weight.data.bit_width == 4
    assert cfg.resolve("conv1", "Conv2D").weight.data.bit_width == 8


def test_by_name_config_name_replaces_the_by_type_entry():
    cfg = parse("""
        configs:
          a: {activation: {data_config: {bit_width: 6, training: auto, not_training: auto}}}
          b: {weight: {data_config: {bit_width: 3, training: 1, not_training: 1}}}
        by_type: {Dense: a}
        by_name: {dense1: b}
        """)
    resolved = cfg.resolve("dense1", "Dense")
    assert resolved.weight.data == DataConfig(bit_width=3, training=1, not_training=1)
    assert resolved.activation.is_float  # nothing of `a` survives
    assert cfg.resolve("dense2", "Dense").activation.data.bit_width == 6


def test_unknown_layer_is_all_float():
    cfg = nf.parse_cfg_from_str(ISSUE_EXAMPLE)
    resolved = cfg.resolve("relu3", "ReLU")
    assert resolved == LayerFixedConfig()
    assert resolved.is_float
    assert resolved.weight.data == DataConfig(bit_width=None, training="none", not_training="none")
    assert nf.parse_cfg_from_str("{}").resolve("x", "Dense").is_float
    assert nf.parse_cfg_from_str("").resolve("x", "Dense").is_float  # an empty file


def test_partial_by_name_override_merges_field_by_field_over_by_type():
    cfg = parse("""
        configs:
          fix8:
            weight:
              data_config: {bit_width: 8, training: auto, not_training: fixed}
              gradient_config: {bit_width: 8, training: auto}
        by_type: {Dense: fix8}
        by_name:
          dense1:
            weight: {data_config: {not_training: 3}}
        """)
    resolved = cfg.resolve("dense1", "Dense")
    # Only not_training changed; bit_width and training come from by_type, the gradient too.
    assert resolved.weight.data == DataConfig(bit_width=8, training="auto", not_training=3)
    assert resolved.weight.gradient == GradientConfig(bit_width=8, training="auto")
    assert cfg.resolve("dense2", "Dense").weight.data.not_training == "fixed"


def test_config_name_shorthand_string_entry():
    cfg = parse("""
        configs:
          fix8: {weight: {data_config: {bit_width: 8, training: auto, not_training: fixed}}}
        by_type: {Conv2D: fix8}
        by_name: {dense9: fix8}
        """)
    assert cfg.resolve("c", "Conv2D") == cfg.named("fix8")
    assert cfg.resolve("dense9", "Dense").weight.data == FIX8_WEIGHT_DATA
    assert cfg.to_dict()["by_type"] == {"Conv2D": {"config_name": "fix8"}}


def test_integer_modes_including_negative_and_limits():
    cfg = parse("""
        by_type:
          Dense:
            weight:
              data_config: {bit_width: 8, training: -3, not_training: 0}
              gradient_config: {bit_width: 16, training: -94}
            activation:
              data_config: {bit_width: 8, training: 126, not_training: AUTO}
        """)
    r = cfg.resolve("d", "Dense")
    assert r.weight.data.training == -3 and isinstance(r.weight.data.training, int)
    assert r.weight.data.not_training == 0
    assert r.weight.gradient.training == -94
    assert r.activation.data.training == 126
    assert r.activation.data.not_training == "auto"  # modes are case-insensitive
    assert r.weight.data.mode(True) == -3 and r.weight.data.mode(False) == 0


@pytest.mark.parametrize("spelling", ["null", "~", "none", "None", "NONE"])
def test_yaml_null_and_none_mean_float(spelling):
    cfg = parse(f"""
        by_type:
          Dense:
            weight: {{data_config: {{bit_width: 8, training: auto, not_training: {spelling}}}}}
        """)
    data = cfg.resolve("d", "Dense").weight.data
    assert data.not_training == "none"
    assert data.training == "auto"


def test_all_none_modes_need_no_bit_width():
    cfg = parse("""
        by_type:
          Dense: {weight: {data_config: {training: none, not_training: null}, gradient_config: {training: none}}}
        """)
    assert cfg.resolve("d", "Dense").is_float


@pytest.mark.parametrize("rounding", ["nearest", "floor", "stochastic"])
def test_rounding_field(rounding):
    cfg = parse(f"""
        by_type:
          Dense:
            weight:
              data_config: {{bit_width: 8, training: auto, not_training: fixed, rounding: {rounding}}}
              gradient_config: {{bit_width: 8, training: auto, rounding: {rounding}}}
        """)
    r = cfg.resolve("d", "Dense")
    assert r.weight.data.rounding == rounding
    assert r.weight.gradient.rounding == rounding
    assert r.activation.data.rounding == "nearest"  # the default


def test_storage_config_under_weight():
    cfg = parse("""
        by_type:
          Dense:
            weight:
              data_config: {bit_width: 8, training: auto, not_training: fixed}
              storage_config: {bit_width: 12, scale: 2, rounding: stochastic}
          Conv2D:
            weight:
              storage_config: {bit_width: 10}
        """)
    assert cfg.resolve("d", "Dense").weight.storage == StorageConfig(bit_width=12, scale=2,
                                                                     rounding="stochastic")
    # A storage format given without a scale takes `auto`.
    assert cfg.resolve("c", "Conv2D").weight.storage == StorageConfig(bit_width=10, scale="auto")
    assert not cfg.resolve("c", "Conv2D").is_float


def test_storage_config_rejected_under_activation():
    with pytest.raises(nf.ConfigError) as info:
        parse("""
            by_type:
              Dense: {activation: {storage_config: {bit_width: 8, scale: auto}}}
            """)
    err = info.value
    assert err.key_path == "by_type.Dense.activation.storage_config"
    assert "by_type.Dense.activation.storage_config" in str(err)
    assert "unknown key 'storage_config'" in str(err)
    assert "allowed: data_config, gradient_config" in str(err)


def test_storage_scale_fixed_is_rejected():
    with pytest.raises(nf.ConfigError) as info:
        parse("""
            by_type:
              Dense: {weight: {storage_config: {bit_width: 8, scale: fixed}}}
            """)
    assert info.value.key_path == "by_type.Dense.weight.storage_config.scale"


def test_gradient_not_training_is_accepted_and_ignored():
    cfg = parse("""
        by_type:
          Dense:
            weight:
              gradient_config: {bit_width: 8, training: auto, not_training: fixed}
        """)
    grad = cfg.resolve("d", "Dense").weight.gradient
    assert grad == GradientConfig(bit_width=8, training="auto")
    assert not hasattr(grad, "not_training")
    # ... but it is still validated.
    with pytest.raises(nf.ConfigError) as info:
        parse("""
            by_type:
              Dense: {weight: {gradient_config: {bit_width: 8, training: auto, not_training: often}}}
            """)
    assert info.value.key_path == "by_type.Dense.weight.gradient_config.not_training"


def _resolve_all(cfg, layers):
    return {(n, t): cfg.resolve(n, t) for n, t in layers}


LAYERS = [("dense1", "Dense"), ("dense2", "Dense"), ("conv1", "Conv2D"), ("relu1", "ReLU"),
          ("x", "BatchNormalization")]


def test_to_dict_round_trips_through_from_dict():
    cfg = parse("""
        configs:
          fix8:
            weight:
              data_config: {bit_width: 8, training: auto, not_training: fixed, rounding: floor}
              gradient_config: {bit_width: 8, training: auto}
              storage_config: {bit_width: 12}
            activation:
              data_config: {bit_width: 8, training: 2, not_training: null}
        by_type: {Conv2D: fix8, Dense: {activation: {gradient_config: {bit_width: 16, training: auto}}}}
        by_name:
          dense1:
            config_name: fix8
            weight: {data_config: {bit_width: 4}}
          relu1: {activation: {data_config: {bit_width: 5, training: auto, not_training: auto}}}
        """)
    plain = cfg.to_dict()
    again = nf.FixedConfig.from_dict(plain)
    assert again.to_dict() == plain
    assert _resolve_all(again, LAYERS) == _resolve_all(cfg, LAYERS)
    assert again.resolve("dense1", "Dense").weight.data == DataConfig(4, "auto", "fixed", "floor")
    # And through YAML text too.
    import yaml

    assert _resolve_all(nf.parse_cfg_from_str(yaml.safe_dump(plain)), LAYERS) == _resolve_all(cfg, LAYERS)


def test_layer_config_to_dict_round_trips(fix8):
    layer = LayerFixedConfig.from_dict(fix8)
    assert LayerFixedConfig.from_dict(layer.to_dict()) == layer
    assert layer.to_dict() == fix8


def test_storage_config_with_scale_none_round_trips():
    # A storage bit width with scale none is float storage, but to_dict must not lose it:
    # saved models compare their configs after such a round trip.
    layer = LayerFixedConfig.from_dict({"weight": {"storage_config": {"bit_width": 8, "scale": "none"}}})
    assert layer.weight.storage == StorageConfig(bit_width=8, scale="none")
    assert LayerFixedConfig.from_dict(layer.to_dict()) == layer


def test_from_dict_accepts_omegaconf_dictconfig():
    omegaconf = pytest.importorskip("omegaconf")
    import yaml

    node = omegaconf.OmegaConf.create(yaml.safe_load(ISSUE_EXAMPLE))
    assert isinstance(node, omegaconf.DictConfig)
    cfg = nf.FixedConfig.from_dict(node)
    assert _resolve_all(cfg, LAYERS) == _resolve_all(nf.parse_cfg_from_str(ISSUE_EXAMPLE), LAYERS)
    assert cfg.resolve("dense1", "Dense").weight.data.bit_width == 4
    # OmegaConf nulls and integer modes survive.
    node = omegaconf.OmegaConf.create({"by_type": {"Dense": {"weight": {"data_config": {
        "bit_width": 6, "training": -1, "not_training": None}}}}})
    assert nf.FixedConfig.from_dict(node).resolve("d", "Dense").weight.data == DataConfig(6, -1, "none")


def test_from_dict_accepts_a_plain_dict_and_none():
    assert nf.FixedConfig.from_dict(None).resolve("d", "Dense").is_float
    cfg = nf.FixedConfig.from_dict({"by_name": {"d": {"activation": {"data_config": {
        "bit_width": 8, "training": "auto", "not_training": "fixed"}}}}})
    assert cfg.resolve("d", "Dense").activation.data == FIX8_ACT_DATA


def test_parse_cfg_from_file(tmp_path):
    path = tmp_path / "fix.yaml"
    path.write_text(ISSUE_EXAMPLE)
    cfg = nf.parse_cfg_from_file(path)
    assert cfg.source == str(path)
    assert cfg.resolve("dense1", "Dense").weight.data.bit_width == 4
    assert nf.parse_cfg_from_file(str(path)).resolve("c", "Conv2D") == cfg.named("fix8")


# ----------------------------------------------------------------------------
# Malformed configs: ConfigError (a ValueError) with the exact key path
# ----------------------------------------------------------------------------

POINT = "{bit_width: 8, training: auto, not_training: fixed}"

MALFORMED = {
    "unknown top-level key": (
        "configs: {}\nby_kind: {Dense: {}}\n",
        "by_kind", ["unknown key 'by_kind'", "allowed: configs, by_type, by_name"]),
    "unknown key in a point": (
        f"by_name:\n  dense1:\n    weight: {{data_cfg: {POINT}}}\n",
        "by_name.dense1.weight.data_cfg",
        ["unknown key 'data_cfg'", "allowed: data_config, gradient_config, storage_config"]),
    "unknown key in a data config": (
        "by_name:\n  dense1:\n    weight: {data_config: {bits: 8}}\n",
        "by_name.dense1.weight.data_config.bits", ["unknown key 'bits'"]),
    "unknown layer quantity": (
        f"by_type:\n  Dense: {{weights: {{data_config: {POINT}}}}}\n",
        "by_type.Dense.weights", ["unknown key 'weights'", "config_name, weight, activation"]),
    "unknown config_name": (
        f"configs:\n  fix8: {{weight: {{data_config: {POINT}}}}}\n  fix4: {{}}\n"
        "by_name:\n  dense1: {config_name: fix16}\n",
        "by_name.dense1.config_name", ["unknown config_name 'fix16'", "defined configs: fix4, fix8"]),
    "unknown config_name shorthand": (
        "by_type:\n  Conv2D: fix8\n",
        "by_type.Conv2D.config_name", ["unknown config_name 'fix8'", "(none defined)"]),
    "bit_width 0": (
        "by_name:\n  dense1:\n    weight: {data_config: {bit_width: 0, training: auto}}\n",
        "by_name.dense1.weight.data_config.bit_width", ["bit_width must be from 1 to 32, got 0"]),
    "bit_width 33": (
        "configs:\n  big: {activation: {gradient_config: {bit_width: 33, training: auto}}}\n",
        "configs.big.activation.gradient_config.bit_width", ["bit_width must be from 1 to 32, got 33"]),
    "bit_width string": (
        "by_name:\n  dense1:\n    weight: {data_config: {bit_width: '8', training: auto}}\n",
        "by_name.dense1.weight.data_config.bit_width", ["bit_width must be an integer, got '8'"]),
    "bit_width bool": (
        "by_name:\n  dense1:\n    weight: {data_config: {bit_width: true, training: auto}}\n",
        "by_name.dense1.weight.data_config.bit_width", ["bit_width must be an integer, got True"]),
    "bit_width float": (
        "by_name:\n  dense1:\n    weight: {data_config: {bit_width: 8.0, training: auto}}\n",
        "by_name.dense1.weight.data_config.bit_width", ["bit_width must be an integer, got 8.0"]),
    "mode automatic": (
        "by_type:\n  Dense:\n    activation: {data_config: {bit_width: 8, training: automatic}}\n",
        "by_type.Dense.activation.data_config.training",
        ["mode must be one of auto, fixed, dynamic, none or an integer scale, got 'automatic'"]),
    "mode 3.5": (
        "by_type:\n  Dense:\n    activation: {data_config: {bit_width: 8, not_training: 3.5}}\n",
        "by_type.Dense.activation.data_config.not_training", ["got 3.5"]),
    "mode bool": (
        "by_type:\n  Dense:\n    weight: {gradient_config: {bit_width: 8, training: yes}}\n",
        "by_type.Dense.weight.gradient_config.training", ["got True"]),
    "integer scale too large": (
        "by_type:\n  Dense:\n    weight: {data_config: {bit_width: 8, training: 127}}\n",
        "by_type.Dense.weight.data_config.training",
        ["integer scale must be from -94 to 126, got 127"]),
    "integer scale too small": (
        "by_type:\n  Dense:\n    weight: {data_config: {bit_width: 8, training: -95}}\n",
        "by_type.Dense.weight.data_config.training",
        ["integer scale must be from -94 to 126, got -95"]),
    "rounding up": (
        "by_type:\n  Dense:\n    weight: {data_config: {bit_width: 8, training: auto, rounding: up}}\n",
        "by_type.Dense.weight.data_config.rounding",
        ["rounding must be one of nearest, floor, stochastic, got 'up'"]),
    "list instead of mapping (point)": (
        "by_name:\n  dense1:\n    weight: [8, auto, fixed]\n",
        "by_name.dense1.weight", ["expected a mapping, got list"]),
    "list instead of mapping (section)": (
        "by_type: [Dense, Conv2D]\n",
        "by_type", ["expected a mapping, got list"]),
    "scalar instead of mapping (data config)": (
        "by_name:\n  dense1:\n    weight: {data_config: 8}\n",
        "by_name.dense1.weight.data_config", ["expected a mapping, got int 8"]),
    "config_name not a string": (
        "configs: {a: {}}\nby_name:\n  dense1: {config_name: [a]}\n",
        "by_name.dense1.config_name", ["config_name must be a string"]),
    "missing bit_width with a non-none mode": (
        "configs:\n  fix8:\n    weight:\n      data_config: {training: auto, not_training: fixed}\n",
        "configs.fix8.weight.data_config.bit_width",
        ["bit_width is required when a mode is not 'none'"]),
    "missing bit_width in a by_type entry": (
        "by_type:\n  ReLU: {activation: {gradient_config: {training: 4}}}\n",
        "by_type.ReLU.activation.gradient_config.bit_width",
        ["bit_width is required when a mode is not 'none'"]),
    "missing bit_width after merging over a named block": (
        "configs: {f: {weight: {data_config: {training: none}}}}\n"
        "by_name:\n  dense1: {config_name: f, weight: {data_config: {training: auto}}}\n",
        "by_name.dense1.weight.data_config.bit_width",
        ["bit_width is required when a mode is not 'none'"]),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_config_raises_config_error_with_key_path(name):
    text, key_path, fragments = MALFORMED[name]
    with pytest.raises(nf.ConfigError) as info:
        nf.parse_cfg_from_str(text)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.key_path == key_path
    assert str(err).startswith(key_path + ": "), str(err)
    for fragment in fragments:
        assert fragment in str(err), str(err)
    assert err.source is None


def test_missing_bit_width_in_a_by_name_entry_is_reported_on_resolve():
    # Without config_name a by_name entry may complete a by_type one, so it is checked
    # when a layer resolves to it.
    cfg = parse("""
        by_type: {Dense: {weight: {data_config: {bit_width: 8}}}}
        by_name: {dense1: {weight: {data_config: {training: auto}}}}
        """)
    assert cfg.resolve("dense1", "Dense").weight.data == DataConfig(8, "auto", "none")
    with pytest.raises(nf.ConfigError) as info:
        cfg.resolve("dense1", "Conv2D")
    assert info.value.key_path == "by_name.dense1.weight.data_config.bit_width"


def test_yaml_syntax_error_has_a_line_number():
    text = "configs:\n  fix8:\n    weight: {data_config: {bit_width: 8\nby_type: {}\n"
    with pytest.raises(nf.ConfigError) as info:
        nf.parse_cfg_from_str(text)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("invalid YAML: line ")
    assert "line 4, column" in str(info.value), str(info.value)


def test_python_yaml_tag_is_rejected_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = f"configs: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(nf.ConfigError) as info:
        nf.parse_cfg_from_str(text)
    assert "python/object/apply:os.system" in str(info.value)
    assert "line 1" in str(info.value)
    assert not marker.exists()
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    with pytest.raises(nf.ConfigError) as info:
        nf.parse_cfg_from_file(path)
    assert str(info.value).startswith(f"{path}: invalid YAML")
    assert not marker.exists()


def test_error_in_a_file_starts_with_the_file_path(tmp_path):
    path = tmp_path / "conf" / "bad.yaml"
    path.parent.mkdir()
    path.write_text(ISSUE_EXAMPLE.replace("bit_width: 4", "bit_width: 40"))
    with pytest.raises(nf.ConfigError) as info:
        nf.parse_cfg_from_file(path)
    err = info.value
    assert err.source == str(path)
    assert err.key_path == "by_name.dense1.weight.data_config.bit_width"
    assert str(err) == (f"{path}: by_name.dense1.weight.data_config.bit_width: "
                        "bit_width must be from 1 to 32, got 40")


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(nf.ConfigError) as info:
        nf.parse_cfg_from_file(path)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{path}: cannot read file")
    assert info.value.source == str(path)


def test_top_level_must_be_a_mapping():
    with pytest.raises(nf.ConfigError) as info:
        nf.parse_cfg_from_str("- configs\n- by_type\n")
    assert info.value.key_path == ""
    assert "expected a mapping with configs/by_type/by_name, got list" in str(info.value)


def test_layer_fixed_config_from_dict_errors_carry_its_key_path():
    with pytest.raises(nf.ConfigError) as info:
        LayerFixedConfig.from_dict({"activation": {"data_config": {"bit_width": 8, "training": "x"}}},
                                   "dense1.fixed_config")
    assert info.value.key_path == "dense1.fixed_config.activation.data_config.training"


def test_unknown_named_block_lookup():
    cfg = nf.parse_cfg_from_str(ISSUE_EXAMPLE)
    with pytest.raises(nf.ConfigError) as info:
        cfg.named("fix16")
    assert "unknown config_name 'fix16'; defined configs: fix8" in str(info.value)
