"""Every Python block of the README and every ``python -m ...`` command in it runs.

Commands run as written, in a scratch folder holding a small MLflow store,
with the few extra arguments of :data:`SMALL` (the longest matching command
prefix wins; an extra ``key=value`` replaces the command's own value of that
key, an extra ``--flag value`` its own ``--flag``). Placeholders become real
ids from that store (:data:`PLACEHOLDERS`); ``../shared/data`` becomes the
shared data folder, and commands that need it are skipped where it is absent.
A README section added later is covered by the default small settings
(:data:`DEFAULT_SMALL`); add an entry to :data:`SMALL` when it needs more.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, shared_data_dir
from tests.original_tf1_files import ORIGINAL_GENERATED_MLP, ORIGINAL_WAG

README = REPO / "README.md"

#: What makes a train-like job small: one epoch on a few hundred examples, no post-training
#: rounding (``compare_bits`` rebuilds and re-traces the model; tests/test_first_hour.py covers it).
TRAIN_SMALL = ["trainer.epochs=1", "data.limit=256", "data.test_limit=128", "compare_bits=[]"]
SEARCH_SMALL = TRAIN_SMALL + ["search.n_trials=2", "search.widths=[4,8]", "search.float_reference=false"]

#: Command prefix -> extra arguments, or a string: the reason the command is not run here.
SMALL: dict[str, list[str] | str] = {
    "python -m pip": "a set-up command (the test runs inside the installed project)",
    "python -m pytest": "the test suite itself",
    "python -m experiments.train": TRAIN_SMALL,
    "python -m experiments.train -m +experiment=gupta2015": TRAIN_SMALL + ["fixed=float,gupta_fl8_nearest",
                                                                           "trainer.seed=0"],
    "python -m experiments.search": SEARCH_SMALL,
    "python -m experiments.search mlflow=server": "needs a tracking server and a shared Optuna database",
    "python -m experiments.eval": [],
    "python -m experiments.export": [],
    "python -m experiments.train -m fixed=float,w8a8,w4a4 mlflow=server hydra/launcher=submitit_slurm":
        "needs a Slurm cluster and a tracking server",
    "python -m analysis.report": [],
    "python -m benchmarks.train_step": ["--models", "mlp", "--xla", "off", "--phases", "train", "--rounds", "1",
                                        "--reps", "1", "--steps", "1", "--warmup", "0", "--out", "bench"],
    "python -m benchmarks.quant_exactness": [],
}
#: Extra arguments of a command no entry of SMALL matches: Hydra jobs of experiments/ get the train settings.
DEFAULT_SMALL = {"python -m experiments.": TRAIN_SMALL}

#: A word of the command -> extra arguments that shrink its model (same layer types, fewer of them):
#: tracing a full-size zoo model costs minutes, and the command's meaning is its config, not its size.
MODEL_SMALL = {
    "model=resnet20": ["model.blocks=1", "model.filters=[4,8,8]"],
    "model=vit": ["model.depth=1", "model.dim=16", "model.heads=2"],
    "model=mobilenet_v2": ["model.width=0.35", "model.input_size=32"],
    "+experiment=cifar10_vgg11": ["model.width=0.125"],
}

#: Placeholder -> how the store names it (filled in by the ``store`` fixture).
PLACEHOLDERS = ("<run id>", "<search parent run id>")

#: Tokens that mean "needs the shared data folder".
NEEDS_DATA = re.compile(r"data=(mnist|fashion_mnist|cifar10)\b|experiment=(mnist_mlp|gupta2015|cifar10_vgg11)\b"
                        r"|\.\./shared/data")


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """``(language, first line number, lines)`` of every fenced block, in order."""
    blocks, current = [], None
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if current is None and stripped.startswith("```"):
            current = (stripped[3:].strip(), number + 1, [])
        elif current is not None and stripped == "```":
            blocks.append(current)
            current = None
        elif current is not None:
            current[2].append(line)
    return blocks


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced ``python`` block."""
    return [(first, "\n".join(lines)) for language, first, lines in fenced_blocks(text) if language == "python"]


def commands(text: str) -> list[tuple[int, str]]:
    """``(line, command)`` of every ``python -m`` command in fenced shell blocks (continuations joined)."""
    found = []
    for language, number, lines in fenced_blocks(text):
        if language not in ("bash", "sh", "shell", "console", ""):
            continue
        pending, first = "", number
        for n, raw in enumerate(lines, number):
            first = first if pending else n
            pending += raw.strip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            if pending.startswith("python -m "):
                found.append((first, pending))
            pending = ""
    return found


def split(command: str) -> list[str]:
    """The command's words, shell comments dropped."""
    return shlex.split(command, comments=True)


def extras_for(command: str):
    words = " ".join(split(command))
    table = {**DEFAULT_SMALL, **SMALL}
    matches = [p for p in table if words.startswith(p)]
    extras = table[max(matches, key=len)] if matches else []
    if isinstance(extras, str):
        return extras
    return extras + [extra for word, more in MODEL_SMALL.items() if word in split(command) for extra in more]


def with_extras(words: list[str], extras: list[str]) -> list[str]:
    """``words`` with each extra replacing the command's own value of the same key or flag."""
    words = list(words)
    i = 0
    while i < len(extras):
        extra = extras[i]
        if extra.startswith("--"):
            takes_value = i + 1 < len(extras) and not extras[i + 1].startswith("--")
            if extra in words:
                at = words.index(extra)
                del words[at:at + (2 if takes_value and at + 1 < len(words) else 1)]
            words += extras[i:i + (2 if takes_value else 1)]
            i += 2 if takes_value else 1
            continue
        key = extra.split("=", 1)[0]
        words = [w for w in words if w.lstrip("+").split("=", 1)[0] != key]
        words.append(extra)
        i += 1
    return words


TEXT = README.read_text(encoding="utf-8")
COMMANDS = commands(TEXT)
BLOCKS = python_blocks(TEXT)


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", NICS_FIX_OFFLINE="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A scratch folder with a default MLflow store holding one small train run and one small search."""
    from mlflow.tracking import MlflowClient

    cwd = tmp_path_factory.mktemp("readme")
    for _, code in BLOCKS:  # a block headed "# pkg/file.py" is a file the reader saves: save it
        named = re.match(r"# (\S+\.py)\b", code)
        if named:
            path = cwd / named.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(code, encoding="utf-8")
    # The files a user of the original TF1 framework brings ("Coming from the original nics_fix").
    (cwd / "config_fix_wag.yaml.sample").write_text(ORIGINAL_WAG, encoding="utf-8")
    (cwd / "strategy.yaml").write_text(ORIGINAL_GENERATED_MLP, encoding="utf-8")
    tiny = ["data=synthetic", "data.num_examples=128", "data.test_examples=32", "model.hidden_units=[8]"]
    # An exportable run (input point, fixed scales): the integer export/eval commands take its id.
    train = _run([sys.executable, "-m", "experiments.train", *tiny, "trainer.epochs=1", "compare_bits=[]",
                  "model.input_bits=8", "fixed=w8a8"], cwd)
    assert train.returncode == 0, train.stderr[-3000:]
    search = _run([sys.executable, "-m", "experiments.search", *tiny, "trainer.epochs=1", "search.n_trials=1",
                   "search.float_reference=false"], cwd)
    assert search.returncode == 0, search.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("nics_fix").experiment_id], max_results=100)
    ids = {"<run id>": next(r.info.run_id for r in runs if r.data.tags.get("nics_fix.role") == "train"),
           "<search parent run id>": next(r.info.run_id for r in runs if r.data.tags.get("nics_fix.role") == "search")}
    # The report of a whole experiment reads this copy: the commands below add runs of other models.
    (cwd / "one_model").mkdir()
    shutil.copy(cwd / "mlflow.db", cwd / "one_model" / "mlflow.db")
    return cwd, ids


@pytest.mark.slow
@pytest.mark.parametrize("line, command", COMMANDS, ids=[f"L{n}" for n, _ in COMMANDS])
def test_readme_command_runs(line, command, store):
    extras = extras_for(command)
    if isinstance(extras, str):
        pytest.skip(extras)
    cwd, ids = store
    for placeholder, value in ids.items():
        command = command.replace(placeholder, value)
    if "<" in command.split("#")[0]:
        pytest.skip(f"README line {line}: a placeholder this test does not know: {command}")
    if NEEDS_DATA.search(command):
        data = shared_data_dir()
        if data is None:
            pytest.skip("needs ../shared/data (absent)")
        command = command.replace("../shared/data", str(data))
    words = with_extras(split(command), extras)
    if words[:3] == ["python", "-m", "analysis.report"] and "--tracking-uri" in words:
        words[words.index("--tracking-uri") + 1] = f"sqlite:///{cwd / 'one_model' / 'mlflow.db'}"
    done = _run([sys.executable, *words[1:]], cwd)
    assert done.returncode == 0, (f"README line {line}: {command}\nran: {' '.join(words)}\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"L{n}" for n, _ in BLOCKS])
def test_readme_python_block_runs(line, code, store):
    cwd, _ = store
    done = _run([sys.executable, "-c", code], cwd)
    assert done.returncode == 0, f"README line {line}:\n{code}\n{done.stderr[-3000:]}"


def test_the_readme_has_its_commands_and_blocks():
    """The parser finds what a reader sees (an empty list would make the tests above vacuous)."""
    assert len(COMMANDS) >= 20 and len(BLOCKS) >= 2
    assert any(c.startswith("python -m experiments.train") for _, c in COMMANDS)
    words = with_extras(split("python -m experiments.train trainer.epochs=5 +x.y=1  # comment"),
                        ["trainer.epochs=1", "x.y=2"])
    assert words == ["python", "-m", "experiments.train", "trainer.epochs=1", "x.y=2"]
    assert with_extras(["m", "--rounds", "3", "--mlflow"], ["--rounds", "1", "--warmup", "0"]) == \
        ["m", "--mlflow", "--rounds", "1", "--warmup", "0"]
    resnet = "python -m experiments.train model=resnet20 data=cifar10 trainer.epochs=3"
    assert with_extras(split(resnet), extras_for(resnet))[-2:] == ["model.blocks=1", "model.filters=[4,8,8]"]
    assert extras_for("python -m pytest -n 2") == SMALL["python -m pytest"]
