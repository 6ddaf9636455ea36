"""Search-space YAML -> validated Config: shipped files, coercion, every problem at once, Tune samplers."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError
from ray.tune.search import sample

from raycv import RaycvError
from raycv.config import Config
from raycv.spaces import BUNDLED_SPACES_DIR, ConfigError, load_config, resolve_space_path
from raycv.sweep import to_param_space

from helpers import REPO_DIR, SPACES_DIR

SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))


def as_number(value):
    """PyYAML reads 2e-5 as a string; the config holds the float."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def problems_of(space, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(space, overrides)
    assert str(info.value).startswith(f"{info.value.source}: ")
    return info.value.problems


def test_the_shipped_spaces_are_found():
    assert BUNDLED_SPACES_DIR == SPACES_DIR
    assert {"base.yaml", "minilm_cpu.yaml", "smoke.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("space_path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_space_validates(space_path, train_csv, structbert_files):
    raw = yaml.safe_load(space_path.read_text())
    overrides = [f"data.path={train_csv}"]
    files = None
    if raw["model"]["backbone"]["type"] == "structbert":
        files = structbert_files("bert")
        overrides += [f"model.backbone.checkpoint={files.checkpoint}", f"model.backbone.config={files.config}",
                      f"model.backbone.vocab={files.vocab}"]

    config = load_config(space_path, overrides)

    assert config.data.path == str(train_csv.resolve())
    assert config.run.name == space_path.stem
    assert config.model.backbone.type == raw["model"]["backbone"]["type"]
    if files is not None:
        assert config.model.backbone.checkpoint == str(files.checkpoint.resolve())
        assert config.model.backbone.vocab == str(files.vocab.resolve())
    # The file's own values survive (nothing silently replaced by a default).
    for section in ("data", "train"):
        for key, value in raw.get(section, {}).items():
            if key != "path":
                assert getattr(getattr(config, section), key) == as_number(value), key
    # Its search section turns into Tune samplers, one per searched key.
    assert set(to_param_space(config)) == set(raw.get("search", {}).get("params", {}))
    # It opens with the command that runs it.
    header = space_path.read_text().split("\n\n")[0]
    assert re.search(rf"raycv tune \S*{space_path.name}", header), header


def test_scientific_notation_in_yaml_becomes_a_float(tmp_path, train_csv):
    space = tmp_path / "sci.yaml"
    space.write_text(
        f"data: {{path: {train_csv}}}\n"
        "train:\n  lr: 2e-5\n  weight_decay: 1e-2\n"
        "search:\n  params:\n    train.lr: {loguniform: [1e-5, 5e-5]}\n"
    )
    assert yaml.safe_load(space.read_text())["train"]["lr"] == "2e-5"  # PyYAML's own reading: a string

    config = load_config(space)

    assert type(config.train.lr) is float and config.train.lr == 2e-5
    assert type(config.train.weight_decay) is float and config.train.weight_decay == 0.01
    lr = to_param_space(config)["train.lr"]
    assert (lr.lower, lr.upper) == (1e-5, 5e-5)
    assert load_config(space, ["train.lr=3e-5"]).train.lr == 3e-5


def test_defaults_fill_what_a_file_leaves_out(tmp_path, train_csv):
    space = tmp_path / "minimal.yaml"
    space.write_text(f"data: {{path: {train_csv}}}\n")
    config = load_config(space)
    assert config.train.evals_per_epoch == 4 and config.train.eval_every_n_steps is None
    assert config.model.backbone.type == "pretrained" and config.model.backbone.path == "minilm-l6"
    assert config.data.num_folds == 5 and config.data.fold_seed == 1000
    assert config.run.name == "minimal"
    assert config.run.output_dir == str((Path.cwd() / "runs" / "minimal").resolve())


@pytest.mark.parametrize(
    "updates, expected",
    [
        ({"train": {"batchsize": 8}}, "train.batchsize: unknown key; did you mean train.batch_size?"),
        ({"model": {"backbone": {"hiden_size": 8}}}, "model.backbone.hiden_size: unknown key; did you mean model.backbone.hidden_size?"),
        ({"trian": {"lr": 1e-3}}, "trian: unknown key; did you mean train?"),
        ({"data": {"num_fold": 5}}, "data.num_fold: unknown key; did you mean data.num_folds?"),
    ],
)
def test_unknown_keys_get_a_did_you_mean(tiny_space, updates, expected):
    assert problems_of(tiny_space(updates)) == [expected]


def test_an_unknown_key_without_a_near_name_lists_the_known_keys(tiny_space):
    [problem] = problems_of(tiny_space({"scheduler": {"zzzz": 1}}))
    assert problem.startswith("scheduler.zzzz: unknown key; known keys: ")
    assert "grace_period" in problem and "reduction_factor" in problem


def test_keys_of_another_backbone_type_list_the_keys_of_the_type_given(tiny_space):
    # A file that gives a tiny backbone's keys to a pretrained one.
    backbone = {"type": "pretrained", "path": "minilm-l6", "hidden_size": 32, "num_layers": 2}
    problems = problems_of(tiny_space({"model": {"backbone": backbone}}))
    assert problems == [f"model.backbone.{key}: unknown key; known keys: type, path"
                        for key in ("hidden_size", "num_layers")]


def test_an_override_that_switches_the_backbone_type_drops_the_old_types_keys(tiny_space):
    """Issue 17: model.backbone.type=pretrained over the tiny space's backbone keeps only the keys the
    overrides give (before or after the switch), not hidden_size and the rest."""
    from raycv.spaces import SWITCH_KEYS

    assert SWITCH_KEYS == ["model.backbone.type"]  # every discriminated union of the schema
    config = load_config(tiny_space(), ["model.backbone.type=pretrained", "model.backbone.path=minilm-l6"])
    assert config.model.backbone.model_dump() == {"type": "pretrained", "path": "minilm-l6"}
    config = load_config(tiny_space(), ["model.backbone.path=minilm-l6", "model.backbone.type=pretrained"])
    assert config.model.backbone.model_dump() == {"type": "pretrained", "path": "minilm-l6"}
    # The same type again merges as any other key does; a switch back to tiny takes tiny's defaults.
    assert load_config(tiny_space(), ["model.backbone.type=tiny"]).model.backbone.hidden_size == 32
    config = load_config(tiny_space(), ["model.backbone.type=pretrained", "model.backbone.type=tiny",
                                        "model.backbone.num_layers=1"])
    assert config.model.backbone.num_layers == 1 and config.model.backbone.intermediate_size == 64


def test_every_problem_in_a_file_is_reported_at_once(tiny_space, tmp_path):
    space = tiny_space({
        "data": {"path": str(tmp_path / "nope.csv"), "num_fold": 3},
        "model": {"max_length": 4, "pooling": "max"},
        "train": {"evals_per_epoch": 2, "eval_every_n_steps": 10},
        "scheduler": {"reduction_factor": "x"},
        "search": {"params": {"train.lr": {"loguniform": [0, 1e-3]}}},
    })

    problems = problems_of(space)

    keys = [line.split(":")[0] for line in problems]
    assert sorted(keys) == sorted([
        "data.num_fold", "model.max_length", "model.pooling", "train", "scheduler.reduction_factor",
        "search.params.train.lr",
        "data.path",
    ]), problems
    assert len(problems) == 7
    by_key = dict(zip(keys, problems, strict=True))
    assert "did you mean data.num_folds?" in by_key["data.num_fold"]
    assert "found 4" in by_key["model.max_length"]
    assert "found 'max'" in by_key["model.pooling"]
    assert "found 'x'" in by_key["scheduler.reduction_factor"]
    assert "not both" in by_key["train"]
    assert "low > 0" in by_key["search.params.train.lr"]
    assert "nope.csv" in by_key["data.path"] and "not found" in by_key["data.path"]
    assert all("\n" not in line for line in problems)


def test_bad_overrides_are_reported(tiny_space):
    space = tiny_space()
    assert problems_of(space, ["train.lr"]) == ["override 'train.lr': expected key=value, e.g. train.lr=3e-5"]
    assert problems_of(space, ["=3"]) == ["override '=3': expected key=value, e.g. train.lr=3e-5"]
    assert problems_of(space, ["train.lr.x=1"]) == ["override 'train.lr.x=1': lr is not a section"]
    # Two bad ones: both reported.
    assert len(problems_of(space, ["train.lr", "epochs"])) == 2

    [wrong_type] = problems_of(space, ["train.epochs=abc"])
    assert wrong_type.startswith("train.epochs: ") and "found 'abc'" in wrong_type
    [unknown] = problems_of(space, ["train.lrr=1e-3"])
    assert unknown == "train.lrr: unknown key; did you mean train.lr?"
    # Reported once, not again for every searched train.lr value.
    searched = {"search": {"params": {"train.lr": {"grid": [1e-3, 3e-3]}}}}
    assert problems_of(tiny_space(searched, "searched.yaml"), ["train.lrr=1e-3"]) == [unknown]


def test_overrides_take_yaml_values(tiny_space):
    config = load_config(tiny_space(), ["train.epochs=2", "model.pooling=mean", "data.max_rows=null", "train.max_grad_norm="])
    assert config.train.epochs == 2
    assert config.model.pooling == "mean"
    assert config.data.max_rows is None
    assert config.train.max_grad_norm is None


def test_a_missing_data_file_is_reported(tiny_space, tmp_path):
    missing = tmp_path / "elsewhere" / "train.csv"
    [problem] = problems_of(tiny_space(), [f"data.path={missing}"])
    assert problem == (f"data.path: file not found (tried {missing}); set data.path=/path/to/file "
                       "(Kaggle's train.csv, competition commonlitreadabilityprize)")


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_a_data_path_that_is_not_a_file_says_what_it_is(kind, tiny_space, tmp_path):
    """A FIFO would block a reader forever and /dev/zero never end: neither is opened, and the line says what
    is there instead of "not found"."""
    path = {"directory": tmp_path, "fifo": tmp_path / "pipe", "device": Path("/dev/null")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    [problem] = problems_of(tiny_space(), [f"data.path={path}"])
    what = "a directory" if kind == "directory" else "a device, pipe or socket"
    assert problem == (f"data.path: {path} is {what}, not a file; set data.path=/path/to/file "
                       "(Kaggle's train.csv, competition commonlitreadabilityprize)")


def test_a_backbone_directory_that_is_a_file_says_so(tiny_space, tmp_path):
    (tmp_path / "model").write_text("not a directory")
    [problem] = problems_of(tiny_space(), ["model.backbone.type=pretrained", f"model.backbone.path={tmp_path / 'model'}"])
    assert problem == (f"model.backbone.path: {tmp_path / 'model'} is a file, not a directory; "
                       "set model.backbone.path=/path/to/directory")


def test_a_relative_data_path_resolves_against_the_yaml_folder(tmp_path, train_csv, monkeypatch):
    (tmp_path / "spaces" / "data").mkdir(parents=True)
    (tmp_path / "spaces" / "data" / "train.csv").symlink_to(train_csv)
    space = tmp_path / "spaces" / "rel.yaml"
    space.write_text("data: {path: data/train.csv}\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(space).data.path == str(train_csv.resolve())


def test_search_dimensions_become_tune_samplers(tiny_space):
    space = tiny_space({"search": {"num_samples": 2, "params": {
        "model.pooling": {"choice": ["cls", "mean"]},
        "train.seed": {"grid": [1, 2, 3]},
        "train.warmup_ratio": {"uniform": [0.0, 0.2]},
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "train.batch_size": {"randint": [8, 17]},
    }}})

    params = to_param_space(load_config(space))

    assert set(params) == {"model.pooling", "train.seed", "train.warmup_ratio", "train.lr", "train.batch_size"}
    assert isinstance(params["model.pooling"], sample.Categorical)
    assert params["model.pooling"].categories == ["cls", "mean"]
    assert params["train.seed"] == {"grid_search": [1, 2, 3]}
    warmup = params["train.warmup_ratio"]
    assert isinstance(warmup, sample.Float) and isinstance(warmup.get_sampler(), sample.Uniform)
    assert (warmup.lower, warmup.upper) == (0.0, 0.2)
    lr = params["train.lr"]
    assert isinstance(lr, sample.Float) and isinstance(lr.get_sampler(), sample.LogUniform)
    assert (lr.lower, lr.upper) == (1e-4, 1e-2)
    batch = params["train.batch_size"]
    assert isinstance(batch, sample.Integer) and isinstance(batch.get_sampler(), sample.Uniform)
    assert (batch.lower, batch.upper) == (8, 17)
    draws = np.array(batch.sample(size=2000, random_state=np.random.default_rng(0)))
    assert draws.min() == 8 and draws.max() == 16  # high is exclusive, as in Ray Tune
    lrs = np.log10(lr.sample(size=2000, random_state=np.random.default_rng(0)))
    assert lrs.min() >= -4 and lrs.max() <= -2 and abs(np.median(lrs) + 3) < 0.1  # uniform in log space


def test_sampled_values_make_valid_configs(tiny_space):
    config = load_config(tiny_space())
    trial = config.with_overrides({"train.lr": 1e-3, "model.pooling": "attention", "train.batch_size": 9})
    assert (trial.train.lr, trial.model.pooling, trial.train.batch_size) == (1e-3, "attention", 9)
    assert config.train.lr == 3e-3  # the original is untouched
    with pytest.raises(ValidationError):
        config.with_overrides({"train.batch_size": 0})


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"train.batch_size": {"choice": [8, 0]}}, r"search\.params\.train\.batch_size\.choice: value 0 is invalid: train\.batch_size: .*greater than or equal to 1"),
        ({"model.pooling": {"grid": ["cls", "max"]}}, r"search\.params\.model\.pooling\.grid: value 'max' is invalid: model\.pooling: "),
        ({"train.layer_decay": {"uniform": [0.5, 1.5]}}, r"search\.params\.train\.layer_decay\.uniform: value 1\.5 is invalid: train\.layer_decay: "),
        ({"train.epochs": {"randint": [0, 3]}}, r"search\.params\.train\.epochs\.randint: value 0 is invalid: train\.epochs: "),
        ({"train.batchsize": {"choice": [8]}}, r"search\.params\.train\.batchsize: not a searchable key .*did you mean train\.batch_size\?"),
        ({"data.num_folds": {"choice": [3, 5]}}, r"search\.params\.data\.num_folds: not a searchable key \(folds stay fixed across trials\)"),
        ({"train.lr": {"loguniform": [0, 1e-3]}}, r"search\.params\.train\.lr: loguniform needs low > 0, found 0\.0"),
        ({"train.lr": {"uniform": [1e-3, 1e-4]}}, r"search\.params\.train\.lr: uniform needs low < high"),
        ({"train.lr": {"choice": []}}, r"search\.params\.train\.lr: choice needs at least one value"),
        ({"train.lr": {"choice": [1e-3], "grid": [1e-3]}}, r"search\.params\.train\.lr: give exactly one of"),
        ({"train.lr": {"normal": [0, 1]}}, r"search\.params\.train\.lr\.normal: unknown key"),
        ({"model.backbone.hidden_size": {"choice": [32, 2]}},
         r"search\.params\.model\.backbone\.hidden_size\.choice: value 2 is invalid: model\.backbone\.hidden_size: .*greater than or equal to 4, found 2$"),
        ({"model.backbone.num_heads": {"grid": [2, 3]}},
         r"search\.params\.model\.backbone\.num_heads\.grid: value 3 is invalid: model\.backbone: hidden_size 32 is not a multiple of num_heads 3$"),
        ({"train.eval_every_n_steps": {"choice": [10]}},
         r"search\.params\.train\.eval_every_n_steps\.choice: value 10 is invalid: train: set evals_per_epoch or eval_every_n_steps, not both$"),
    ],
)
def test_invalid_search_values_are_reported(tiny_space, params, expected):
    problems = problems_of(tiny_space({"search": {"params": params}}))
    assert len(problems) == 1 and re.match(expected, problems[0]), problems


def test_every_bad_search_value_is_reported_with_the_rest(tiny_space):
    problems = problems_of(tiny_space({
        "train": {"epochs": 0},
        "search": {"params": {"train.batch_size": {"choice": [0, 8, -1]}, "train.foo": {"choice": [1]}}},
        "scheduler": {"type": "asha", "grace_period": 5, "max_t": 2},
    }))
    assert len(problems) == 5, problems
    assert problems[0].startswith("train.epochs: ")
    assert sum(p.startswith("search.params.train.batch_size.choice: value ") for p in problems) == 2
    assert any(p.startswith("search.params.train.foo: not a searchable key") for p in problems)
    assert "scheduler.grace_period: 5 is more than max_t 2; lower it or raise scheduler.max_t" in problems


def test_a_missing_spaces_file_resolves_to_the_bundled_one(tmp_path, monkeypatch, train_csv):
    monkeypatch.chdir(tmp_path)
    assert resolve_space_path("spaces/smoke.yaml") == SPACES_DIR / "smoke.yaml"
    config = load_config("spaces/smoke.yaml", [f"data.path={train_csv}"])
    assert config.run.name == "smoke" and config.data.max_rows == 450
    assert config.run.output_dir == str(tmp_path.resolve() / "runs" / "smoke")

    # A file that exists wins over the bundled one of the same name.
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "smoke.yaml").write_text(f"data: {{path: {train_csv}, max_rows: 100}}\n")
    assert resolve_space_path("spaces/smoke.yaml").resolve() == (tmp_path / "spaces" / "smoke.yaml").resolve()
    assert load_config("spaces/smoke.yaml").data.max_rows == 100


def test_the_wheel_carries_the_spaces_and_an_installed_raycv_finds_them(tmp_path, train_csv):
    """`pip install .` (not editable): the wheel holds search_spaces/ as raycv/search_spaces, and raycv run from
    it, in a directory without spaces/, resolves spaces/smoke.yaml there through importlib.resources."""
    source = tmp_path / "src"  # a copy, so the build writes nothing into the checkout
    for name in ("raycv", "search_spaces"):
        shutil.copytree(REPO_DIR / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_DIR / name, source / name)
    # The environment's own setuptools where it is new enough (offline), else pip's isolated build.
    setuptools_major = int(importlib.metadata.version("setuptools").split(".")[0])
    isolation = ["--no-build-isolation"] if setuptools_major >= 68 else []
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                            "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    [wheel] = (tmp_path / "wheel").glob("raycv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"raycv/search_spaces/{p.name}" for p in SHIPPED} <= names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    empty = tmp_path / "empty"
    empty.mkdir()
    code = ("import sys, raycv.spaces as s; from raycv.cli import main; "
            "print(s.BUNDLED_SPACES_DIR); print(s.resolve_space_path('spaces/smoke.yaml')); "
            f"sys.exit(main(['validate', 'spaces/smoke.yaml', 'data.path={train_csv}', '--no-model']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=empty, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == str(site / "raycv" / "search_spaces")
    assert lines[1] == str(site / "raycv" / "search_spaces" / "smoke.yaml")
    assert lines[-1] == "ok"


def test_a_missing_space_without_a_bundled_namesake_lists_the_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RaycvError) as info:
        load_config("spaces/nothing.yaml")
    assert not isinstance(info.value, ConfigError)
    message = str(info.value)
    assert message.startswith("search space spaces/nothing.yaml not found")
    assert all(p.name in message for p in SHIPPED)


def test_yaml_that_is_not_a_mapping_or_not_yaml_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    [problem] = problems_of(bad)
    assert problem.startswith("not valid YAML at line ")
    bad.write_text("- 1\n- 2\n")
    assert problems_of(bad) == ["expected a mapping of sections at the top, found list"]


def test_config_round_trips_through_its_dict(tiny_space):
    config = load_config(tiny_space())
    assert Config.model_validate(config.to_dict()) == config


@pytest.mark.parametrize("text, problem", [
    # "maximum recursion depth exceeded while calling a Python object": no line, no fix
    ("train: " + "[" * 5000 + "]" * 5000 + "\n",
     "not valid YAML: nested too deeply for Python to read (hundreds of levels; a search space has four)"),
    # Python's advice, "use sys.set_int_max_str_digits() to increase the limit", is no fix for a YAML file
    ("train: {epochs: " + "9" * 5000 + "}\n",
     f"not valid YAML: an integer of more than {sys.get_int_max_str_digits()} digits, more than any setting takes"),
])
def test_yaml_python_cannot_read_says_why_in_words(tmp_path, text, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert problems_of(bad) == [problem]


def test_thousands_of_problems_are_ten_lines_the_last_counting_the_rest(tmp_path):
    """A file of 20,000 unknown keys printed 20,000 lines, one per key."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("".join(f"key{i}: 1\n" for i in range(20_000)))
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    lines = info.value.lines()
    assert len(lines) == 10 and all(line.startswith(f"{bad}: ") for line in lines), lines
    assert lines[0].startswith(f"{bad}: key0: unknown key")
    assert lines[-1] == f"{bad}: and {20_000 + 1 - 9} more problems like these; fix those above first"
