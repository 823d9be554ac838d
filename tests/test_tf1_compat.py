"""Users of the original TF1 nics_fix: their files, names and commands work here.

The three kinds of files below are written in the original's published
format: its example fixed config (``examples/config_fix_wag.yaml.sample``), its
example strategy config (``examples/config_strategy_noise.yaml.sample``) and a
strategy file as its scripts generated them with Python 2's PyYAML
(``examples/cifar10/config/strategy.yaml.sample``).
"""

from __future__ import annotations

import logging
import re
import shlex

import keras
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

import nics_fix as nf
from experiments.config_files import file_choices, load_config_files, outside_conf
from experiments.evaluation import run_eval
from nics_fix.config import DataConfig, GradientConfig, LayerFixedConfig, PointConfig, load_yaml
from nics_fix.strategy import PointInfo
from tests.conftest import REPO, shared_data_dir
from tests.original_tf1_files import ORIGINAL_GENERATED, ORIGINAL_GENERATED_MLP, ORIGINAL_NOISE, ORIGINAL_WAG
from tests.test_bad_input import CHEAP, one_error, run_main, store  # noqa: F401 - store: a fixture

WAG_LAYER = LayerFixedConfig(
    weight=PointConfig(DataConfig(2, "auto", "fixed"), GradientConfig(4, "auto")),
    activation=PointConfig(DataConfig(4, "auto", "fixed"), GradientConfig(8, "auto")),
)


def build_in_scope(fixed, strategy=None):
    """A small CNN with the original's layer kinds, built inside a fixed scope: ``{name: layer}``."""
    with nf.fixed_scope("net", fixed, strategy):
        inputs = keras.Input((8, 8, 1))
        x = nf.Conv2D(4, 3, name="conv1")(inputs)
        x = nf.ReLU(name="relu1")(nf.BatchNormalization(name="bn1")(x))
        x = nf.Dense(10, name="dense6")(nf.Flatten()(nf.MaxPool2D()(x)))
        model = keras.Model(inputs, x)
    return {layer.name: layer for layer in model.layers}


# --------------------------------------------------------------------------- the original's files


def test_wag_sample_resolves_to_the_original_per_layer_configs():
    layers = build_in_scope(nf.parse_cfg_from_str(ORIGINAL_WAG, "config_fix_wag.yaml.sample"))
    assert layers["conv1"].fixed_config == WAG_LAYER
    assert layers["dense6"].fixed_config == WAG_LAYER
    # The original configured only Conv2D and Dense: ReLU and batch norm stay float, as there.
    assert layers["relu1"].fixed_config.is_float and layers["bn1"].fixed_config.is_float


def test_noise_sample_gives_dense_layers_uniform_ratio_noise_on_both_gradients():
    layers = build_in_scope(None, nf.parse_strategy_cfg_from_str(ORIGINAL_NOISE, "config_strategy_noise.yaml.sample"))
    strategy = layers["dense6"].strategy
    assert isinstance(strategy, nf.NoiseStrategy)
    spec = {"type": "uniform_ratio", "min": -0.5, "max": 0.5}
    assert strategy.specs == {"post_weight_grad": spec, "post_activation_grad": spec}
    assert layers["conv1"].strategy is None and layers["relu1"].strategy is None


def test_generated_strategy_file_reads_as_gradient_buffers_with_the_original_format():
    cfg = nf.parse_strategy_cfg_from_str(ORIGINAL_GENERATED, "strategy.yaml")
    assert all(type(key) is str for key in cfg.by_name_keys)
    assert cfg.resolve("conv3_1", "Conv2D") == [{"name": "gradient_buffer_strategy", "bit_width": 24, "scale": 8}]
    with pytest.warns(UserWarning, match="by_name entries matched no layer: conv2, conv3_1, dense8"):
        layers = build_in_scope(None, cfg)
    for name, scale in (("conv1", 10), ("dense6", 8)):
        strategy = layers[name].strategy
        assert isinstance(strategy, nf.GradientBufferStrategy)
        assert (strategy.bit_width, strategy.scale, strategy.rounding) == (24, scale, "nearest")

    # The original's WeightGradSaverStrategy.post_weight_grad: _do_quantitize(g, scale, bit_width),
    # i.e. round(g / step) * step (TF rounds half to even) clipped to [-2^s, 2^s - step].
    strategy = layers["conv1"].strategy
    step = 2.0 ** (10 - 23)
    grads = np.array([0.1, -3.3e-4, 2.5 * step, 3.5 * step, -2.5 * step, 1023.99995, 5000.0, -5000.0], np.float32)
    reference = np.clip(np.round(grads.astype(np.float64) / step) * step, -2.0 ** 10, 2.0 ** 10 - step)
    point = PointInfo("conv1/kernel", "weight", GradientConfig(), None)
    np.testing.assert_array_equal(np.asarray(strategy.post_weight_grad(grads, point)), reference.astype(np.float32))


def test_weightgradsaver_without_a_scale_has_the_original_default_scale_0(caplog):
    caplog.set_level(logging.INFO, logger="nics_fix")
    cfg = nf.parse_strategy_cfg_from_str("by_name:\n  dense1: {name: weightgradsaver_strategy}\n", "s.yaml")
    assert cfg.resolve("dense1", "Dense") == [{"name": "gradient_buffer_strategy", "scale": 0}]
    assert nf.GradientBufferStrategy.from_config({"scale": 0}).bit_width == 24  # the original's default too
    lines = [r.getMessage() for r in caplog.records if "weightgradsaver_strategy" in r.getMessage()]
    assert lines == ["s.yaml: by_name.dense1.name: strategy 'weightgradsaver_strategy' read as "
                     "gradient_buffer_strategy"]


def test_the_originals_own_test_config_and_the_merge_rule():
    """The original's tests/test_config.py case: ``Conv2d`` (its spelling) and a by_name entry."""
    cfg = nf.parse_cfg_from_str("""
by_type:
  Conv2d:
    weight:
      data_config: {bit_width: 4, not_training: fixed, training: auto}
      gradient_config: {bit_width: 8, training: auto}
by_name:
  conv_1:
    activation:
      data_config: {bit_width: 8, training: 2}
""")
    weight = PointConfig(DataConfig(4, "auto", "fixed"), GradientConfig(8, "auto"))
    assert cfg.resolve("conv_2", "Conv2D") == LayerFixedConfig(weight=weight)
    # The original replaced the by_type entry (conv_1's weights were float there); here by_name
    # merges over by_type, so conv_1 keeps the Conv2D weights (README: "What differs").
    assert cfg.resolve("conv_1", "Conv2D") == LayerFixedConfig(
        weight=weight, activation=PointConfig(DataConfig(8, 2, "none")))


# --------------------------------------------------------------------------- YAML: strings yes, Python no


def test_python2_string_tags_read_as_plain_strings():
    data = load_yaml("!!python/unicode 'conv1': {name: !!python/str 'noise_strategy', note: !!python/unicode x}\n")
    assert data == {"conv1": {"name": "noise_strategy", "note": "x"}}
    assert {type(k) for k in data} == {str} and {type(v) for v in data["conv1"].values()} == {str}
    # PyYAML's own safe loader is untouched: only nics_fix's loader knows these two tags.
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load("!!python/unicode 'conv1': 1\n")


@pytest.mark.parametrize("text", [
    "a: !!python/object/apply:builtins.exec [\"open(r'{marker}', 'w').write('ran')\"]\n",
    "a: !!python/object/new:builtins.exec [\"open(r'{marker}', 'w').write('ran')\"]\n",
    "a: !!python/name:os.system\n",
    "a: !!python/module:os\n",
    "a: !!python/tuple [1, 2]\n",
    "a: !!python/object:argparse.Namespace {x: 1}\n",
    "a: !!python/bytes aGk=\n",
])
def test_every_other_python_tag_is_refused_and_never_executed(text, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(text.replace("{marker}", str(marker)))
    with pytest.raises(nf.ConfigError, match=r"Python tags are refused; only !!python/unicode and !!python/str"):
        nf.parse_strategy_cfg_from_file(path)
    with pytest.raises(nf.ConfigError, match=str(path)):
        nf.parse_cfg_from_file(path)
    assert not marker.exists()


def test_a_string_tag_on_a_list_is_an_error_not_a_string():
    with pytest.raises(nf.ConfigError, match="line 1, column 1: expected a scalar node"):
        load_yaml("!!python/unicode [conv1]: 1\n", "x.yaml")


# --------------------------------------------------------------------------- by_type class names


def test_by_type_names_differing_in_case_or_the_originals_resolve_with_one_info_line(caplog):
    caplog.set_level(logging.INFO, logger="nics_fix")
    point = {"data_config": {"bit_width": 6, "training": "auto", "not_training": "fixed"}}
    cfg = nf.parse_cfg_from_str(yaml.safe_dump({"by_type": {
        "conv2D": {"weight": point}, "BN": {"weight": point}, "dense": {"activation": point}}}), "old.yaml")
    layers = build_in_scope(cfg)
    assert layers["conv1"].fixed_config.weight.data == DataConfig(6, "auto", "fixed")
    assert layers["bn1"].fixed_config.weight.data == DataConfig(6, "auto", "fixed")
    assert layers["dense6"].fixed_config.activation.data == DataConfig(6, "auto", "fixed")
    lines = sorted(r.getMessage() for r in caplog.records if "read as" in r.getMessage())
    assert lines == ["old.yaml: by_type.BN: read as BatchNormalization ('BN' is another name of BatchNormalization)",
                     "old.yaml: by_type.conv2D: read as Conv2D ('conv2D' differs from the class Conv2D only in case)",
                     "old.yaml: by_type.dense: read as Dense ('dense' differs from the class Dense only in case)"]


@pytest.mark.parametrize("parse", [nf.parse_cfg_from_str, nf.parse_strategy_cfg_from_str])
def test_a_by_type_key_naming_no_class_is_an_error_naming_the_closest(parse):
    with pytest.raises(nf.ConfigError) as info:
        parse("by_type:\n  Dens: {}\n", "mine.yaml")
    assert info.value.key_path == "by_type.Dens"
    assert str(info.value).startswith("mine.yaml: by_type.Dens: no nics_fix layer class 'Dens'; did you mean 'Dense'?")
    with pytest.raises(nf.ConfigError, match="by_type.Conv2d and by_type.Conv2D both name the layer class Conv2D"):
        parse("by_type:\n  Conv2d: {}\n  Conv2D: {}\n")
    with pytest.raises(nf.ConfigError, match="no nics_fix layer class 'Wibble'; classes with quantization points: "
                                             "BatchNormalization, Conv.*, Dense, ") as info:
        parse("by_type:\n  Wibble: {}\n")
    listed = str(info.value).split("quantization points: ")[1].split(", ")
    assert listed == sorted(listed) and "MaxPooling2D" not in listed


def test_thdh_format_rules_take_the_same_class_names():
    from nics_fix.optimizers import FormatRules

    rules = FormatRules({"by_type": {"dense": {"bit_width": 16, "scale": 4}}})
    assert rules.resolve("dense1", "Dense", "kernel").to_dict() == {"bit_width": 16, "scale": 4, "rounding": "nearest"}
    with pytest.raises(nf.ConfigError, match=r"^update_config.by_type.Dens: no nics_fix layer class 'Dens'; did you "
                                             r"mean 'Dense'"):
        FormatRules({"by_type": {"Dens": {"bit_width": 16, "scale": 4}}})


def test_new_layer_classes_join_the_valid_names_and_passthrough_entries_warn(caplog):
    class CompatProbeDense(nf.layers.FixedLayer, keras.layers.Dense):
        fixed_weights = ("kernel", "bias")

    point = {"data_config": {"bit_width": 5, "training": "auto", "not_training": "fixed"}}
    cfg = nf.parse_cfg_from_str(yaml.safe_dump({"by_type": {"compatprobedense": {"weight": point}}}))
    with nf.fixed_scope("net", cfg):
        layer = CompatProbeDense(3, name="probe")
    assert layer.fixed_config.weight.data == DataConfig(5, "auto", "fixed")

    caplog.set_level(logging.INFO, logger="nics_fix")
    nf.parse_cfg_from_str("by_type:\n  MaxPool: {}\n", "pools.yaml")
    assert ("pools.yaml: by_type.MaxPool: MaxPooling2D layers have no quantization points; this entry changes "
            "nothing") in [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_kwargs_scopes_and_chains_take_the_originals_names():
    with nf.kwargs_scope_by_type(MaxPool={"pool_size": (4, 4), "strides": 4}):
        pool = nf.MaxPool2D()
    assert pool.pool_size == (4, 4) and pool.strides == (4, 4)
    inputs = keras.Input((8, 8, 2))
    out = nf.wrap(inputs).BN(name="bn").MaxPool(pool_size=2).tensor
    assert tuple(out.shape) == (None, 4, 4, 2)
    with pytest.raises(nf.ConfigError, match=r"kwargs_scope.Dens.units: no nics_fix layer class 'Dens'; did you "
                                             r"mean 'Dense'"):
        with nf.kwargs_scope(**{"Dens.units": 3}):
            pass


# --------------------------------------------------------------------------- fixed_file= / strategy_file=


def test_load_config_files_parses_checks_and_is_idempotent(tmp_path, monkeypatch):
    (tmp_path / "wag.yaml.sample").write_text(ORIGINAL_WAG)
    (tmp_path / "gen.yaml").write_text(ORIGINAL_GENERATED_MLP)
    monkeypatch.chdir(tmp_path)
    cfg = {"fixed": {"by_type": {"ReLU": {}}}, "strategy": {}, "fixed_file": "wag.yaml.sample",
           "strategy_file": str(tmp_path / "gen.yaml")}
    loaded = load_config_files(cfg)
    assert nf.FixedConfig.from_dict(loaded["fixed"]).resolve("dense1", "Dense") == WAG_LAYER
    assert loaded["strategy"] == {"by_name": {
        "dense1": [{"name": "gradient_buffer_strategy", "bit_width": 24, "scale": 3}],
        "dense2": [{"name": "gradient_buffer_strategy", "bit_width": 24, "scale": 5}]}}
    assert loaded["config_files"] == {"fixed": str(tmp_path / "wag.yaml.sample"), "strategy": str(tmp_path / "gen.yaml")}
    assert loaded["fixed_file"] is None and load_config_files(loaded) == loaded
    assert file_choices(cfg, {"fixed": "float", "model": "mlp"}) == {"fixed": "wag.yaml.sample", "strategy": "gen.yaml",
                                                                     "model": "mlp"}
    # Loaded (a search's trials): the caller's choices stand, and a replaced group is not the file's.
    assert file_choices(loaded, {"fixed": "searched"}) == {"fixed": "searched"}
    assert outside_conf(loaded, {"fixed": "searched", "strategy": "gen.yaml"}, lambda *_: "conf/x.yaml") == {
        "strategy": str(tmp_path / "gen.yaml")}

    with pytest.raises(nf.ConfigError, match=r"^fixed_file: nope.yaml: no such file \(relative paths start from "):
        load_config_files({"fixed_file": "nope.yaml"})
    with pytest.raises(nf.ConfigError, match=r"^strategy_file: must be a path to a YAML file, got \[1\]"):
        load_config_files({"strategy_file": [1]})
    (tmp_path / "binary.yaml").write_bytes(b"by_type: \xff\xfe\n")
    with pytest.raises(nf.ConfigError, match=rf"^{tmp_path}/binary.yaml: not UTF-8 text"):
        load_config_files({"fixed_file": "binary.yaml"})


def only_run(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("nics_fix").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def artifact_text(client, run, path, tmp_path):
    return open(client.download_artifacts(run.info.run_id, path, str(tmp_path))).read()


@pytest.mark.slow
def test_train_job_takes_the_users_own_files_and_records_them(tmp_path, store, capsys):
    wag, gen = tmp_path / "mine" / "config_fix_wag.yaml.sample", tmp_path / "strategy.yaml"
    wag.parent.mkdir()
    wag.write_text(ORIGINAL_WAG)
    gen.write_text(ORIGINAL_GENERATED_MLP)
    code, err = run_main("experiments.train", f"fixed_file={wag}", f"strategy_file={gen}", *CHEAP,
                         "trainer.save_model=true", f"mlflow.tracking_uri={store}", tmp_path=tmp_path, capsys=capsys)
    assert code == 0, err
    client, run = only_run(store)
    params = run.data.params
    assert run.info.status == "FINISHED"
    assert (params["fixed_file"], params["strategy_file"]) == (str(wag), str(gen))
    assert params["choice.fixed"] == "config_fix_wag.yaml.sample" and run.info.run_name.startswith("mlp/config_fix_wag.yaml.sample")
    bits = {k: v for k, v in params.items() if k.startswith("bits.")}
    assert bits == {"bits.dense1.weight.data": "2", "bits.dense1.weight.grad": "4",
                    "bits.dense1.activation.data": "4", "bits.dense1.activation.grad": "8",
                    "bits.relu1.activation.data": "float", "bits.relu1.activation.grad": "float",
                    "bits.dense2.weight.data": "2", "bits.dense2.weight.grad": "4",
                    "bits.dense2.activation.data": "4", "bits.dense2.activation.grad": "8"}
    assert params["strategy.by_name.dense1"] == '[{"name": "gradient_buffer_strategy", "bit_width": 24, "scale": 3}]'
    assert artifact_text(client, run, "config/fixed_file/config_fix_wag.yaml.sample", tmp_path) == ORIGINAL_WAG
    assert artifact_text(client, run, "config/strategy_file/strategy.yaml", tmp_path) == ORIGINAL_GENERATED_MLP
    # The saved model carries the configs read from the files: evaluating it needs neither file.
    wag.unlink()
    gen.unlink()
    evaluated = run_eval({"run_id": run.info.run_id, "mlflow": {"tracking_uri": store}, "log_to": "none"})
    assert evaluated["reproduced"] is True


@pytest.mark.slow
def test_hydra_searchpath_finds_the_users_file_by_name_and_records_it(tmp_path, store, capsys):
    mine = tmp_path / "my_configs" / "fixed" / "wag_sample.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text(ORIGINAL_WAG)
    code, err = run_main("experiments.train", f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]",
                         "fixed=wag_sample", *CHEAP, f"mlflow.tracking_uri={store}", tmp_path=tmp_path, capsys=capsys)
    assert code == 0, err
    client, run = only_run(store)
    assert run.data.params["fixed_file"] == str(mine) and run.data.params["choice.fixed"] == "wag_sample"
    assert run.data.params["bits.dense1.weight.data"] == "2"
    assert artifact_text(client, run, "config/fixed_file/wag_sample.yaml", tmp_path) == ORIGINAL_WAG


@pytest.mark.slow
def test_a_search_takes_the_users_file_as_its_base(tmp_path, store, capsys):
    wag = tmp_path / "config_fix_wag.yaml.sample"
    wag.write_text(ORIGINAL_WAG)
    code, err = run_main("experiments.search", f"fixed_file={wag}", *CHEAP, f"mlflow.tracking_uri={store}",
                         "search.n_trials=1", "search.storage=sqlite:///" + str(tmp_path / "o.db"),
                         tmp_path=tmp_path, capsys=capsys)
    assert code == 0, err
    client = MlflowClient(store)
    runs = {r.data.tags["nics_fix.role"]: r for r in client.search_runs(
        [client.get_experiment_by_name("nics_fix").experiment_id])}
    assert runs["search"].data.params["choice.fixed"] == "config_fix_wag.yaml.sample"
    # The trial searched the data widths over the file's config: its gradients are the file's 4/8 bits.
    trial = runs["trial"].data.params
    assert (trial["choice.fixed"], trial["bits.dense1.weight.grad"], trial["bits.dense1.activation.grad"]) == (
        "searched", "4", "8")
    reference = runs["reference"].data.params
    assert reference["choice.fixed"] == "float" and reference["bits.dense1.weight.grad"] == "float"
    assert "fixed_file" not in trial and "fixed_file" not in reference


def test_bad_own_files_stop_the_job_with_one_line_naming_file_and_key(tmp_path, store, capsys):
    bad_strategy = tmp_path / "strategy.yaml"
    bad_strategy.write_text("by_name:\n  !!python/unicode 'dense1': {bit_width: 40, name: weightgradsaver_strategy}\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text(ORIGINAL_WAG.replace("  Dense:", "  Dens:"))

    def train(*args):
        return run_main("experiments.train", *args, *CHEAP, f"mlflow.tracking_uri={store}", tmp_path=tmp_path,
                        capsys=capsys)

    one_error(*train(f"fixed_file={tmp_path}/missing.yaml"), f"error: fixed_file: {tmp_path}/missing.yaml: no such file")
    one_error(*train(f"strategy_file={bad_strategy}"),
              f"error: {bad_strategy}: by_name.dense1.bit_width: bit_width must be from 1 to 32, got 40")
    one_error(*train(f"fixed_file={typo}"), f"error: {typo}: by_type.Dens: no nics_fix layer class 'Dens'; "
                                            "did you mean 'Dense'?")
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("nics_fix").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"] * 3


# --------------------------------------------------------------------------- the README's commands


def readme_commands() -> list[str]:
    section = REPO.joinpath("README.md").read_text().split("## Coming from the original nics_fix", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python -m ")]


def test_readme_section_shows_the_originals_two_examples():
    commands = readme_commands()
    assert len(commands) == 3
    assert all("fixed_file=config_fix_wag.yaml.sample" in c for c in commands)
    assert sum("+experiment=mnist_mlp" in c for c in commands) == 2
    assert sum("+experiment=cifar10_vgg11" in c for c in commands) == 1


#: Small overrides the test adds so each README command runs in seconds.
QUICK = ["trainer.epochs=1", "trainer.verbose=0", "trainer.save_model=false", "trainer.checkpoint=false",
         "data.limit=200", "data.test_limit=100"]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(3))
def test_readme_commands_run_as_written(index, tmp_path, store, capsys, monkeypatch):
    command = readme_commands()[index]
    data = shared_data_dir()
    args = shlex.split(command)[2:]
    if "+experiment=cifar10_vgg11" in args:
        # Decoding CIFAR-10 takes minutes the first time: same shapes, synthetic pixels.
        extra = ["data=synthetic", "data.shape=[32,32,3]", "data.num_examples=64", "data.test_examples=32",
                 "model.width=0.125", "trainer.batch_size=32"]
    elif data is not None and (data / "mnist").is_dir():
        extra = [f"data.path={data / 'mnist'}", "model.hidden_units=[16]"]
    else:
        pytest.skip("needs ../shared/data/mnist")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config_fix_wag.yaml.sample").write_text(ORIGINAL_WAG)
    (tmp_path / "strategy.yaml").write_text(ORIGINAL_GENERATED_MLP)
    code, err = run_main(args[0], *args[1:], *QUICK, *extra, f"mlflow.tracking_uri={store}", tmp_path=tmp_path,
                         capsys=capsys)
    assert code == 0, err
    experiment = "cifar10_vgg11" if "cifar10" in command else "mnist_mlp"
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    params = run.data.params
    assert params["fixed_file"] == str(tmp_path / "config_fix_wag.yaml.sample")
    assert params["bits.dense1.weight.data"] == "2" and params["bits.dense1.activation.grad"] == "8"
    if "strategy_file=" in command:
        assert params["strategy_file"] == str(tmp_path / "strategy.yaml")
        assert "nics_fix.unmatched_by_name" not in run.data.tags
