"""Bad input of any kind: exit status 2, one line per problem, no traceback, nothing created (issue 16).

    python -m pytest tests/test_inputs.py          # about a minute on 2 cores; no Ray

Hypothesis generates the inputs (search spaces, overrides, CSVs, run directories, output paths) and runs
`raycv.cli.main` in-process, each example in a fresh working folder. For every input: exit status 0 or 2,
no "Traceback", on exit 2 a few lines that each start "raycv: error:" and name a key, file, flag or row;
the working folder is unchanged afterwards except for the output a successful command was asked for.
The example tests at the end pin the exact messages of the bugs these properties found.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import os
import re
import shutil
import string
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from raycv import model as raycv_model
from raycv import preflight as raycv_preflight
from raycv.cli import main, one_line
from raycv.cluster import address_problem
from raycv.config import LEAF_KEYS, SEARCHABLE, dump_yaml
from raycv.model import minilm_dir

from helpers import SPACES_DIR, TINY_STRUCTBERT_CONFIG, alicemind_state, tiny_bert

pytestmark = pytest.mark.timeout(300)

# A tiny model on a few short real rows: each example runs in well under a second.
TINY = {
    "data": {"path": "DATA", "num_folds": 2},
    "model": {"backbone": {"type": "tiny", "hidden_size": 8, "num_layers": 1, "num_heads": 1, "intermediate_size": 8},
              "max_length": 32, "dropout": 0.0},
    "train": {"epochs": 1, "batch_size": 4, "evals_per_epoch": 1},
    "scheduler": {"type": "none"},
    "resources": {"gpus_per_fold": 0},
}
ROWS = 40
MAX_LINES = 12  # "a few lines": one per problem
MAX_LINE_CHARS = 1000  # a line, not a dump of the input (a value the line quotes is cut short)
# what every line names: a key, a flag, a path, a row, a line, an environment variable (Ray's have lower case)
NAMES = re.compile(r"[\w-]+\.[\w.\[\]-]+|--[a-z-]+|/|\brows?\b|\bline \d|override|command|argument"
                   r"|\b[A-Z][A-Z_]+=|\bRAY_\w+=|^(?:out_dir|checkpoint|config_json|vocab_txt): ")
SETTINGS = {"derandomize": True, "deadline": None, "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]}


# ---------------------------------------------------------------- the harness


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and modification time: what "unchanged" compares."""
    found = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        found[str(path.relative_to(folder))] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return found


def run_cli(argv: list[str], cwd: Path, outputs: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """main(argv) in `cwd`; asserts the promise for any input. `outputs`: paths (relative to cwd) a
    successful run may create or change; on exit 2 nothing may change at all."""
    before = snapshot(cwd)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    out, err = out.getvalue(), err.getvalue()
    assert code in (0, 2), (code, argv, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err, (argv, err[-3000:])
    after = snapshot(cwd)
    if code == 2:
        lines = err.splitlines()
        assert 1 <= len(lines) <= MAX_LINES, (argv, err)
        for line in lines:
            assert line.startswith("raycv: error: "), (argv, err)
            assert len(line) <= MAX_LINE_CHARS, (argv, len(line), line[:500])
            assert NAMES.search(line.removeprefix("raycv: error: ")), (argv, line)  # names a key, file or row
        assert after == before, (argv, err, sorted(set(after) ^ set(before)))
    else:
        changed = {path for path in set(before) | set(after) if before.get(path) != after.get(path)}
        allowed = {path for path in changed if any(path == o or path.startswith(o.rstrip("/") + "/") for o in outputs)}
        assert changed == allowed, (argv, sorted(changed - allowed))
    return code, out, err


@contextlib.contextmanager
def workdir():
    """A fresh, empty working folder for one example."""
    with tempfile.TemporaryDirectory(prefix="raycv-inputs-") as folder:
        yield Path(folder)


@pytest.fixture(scope="module", autouse=True)
def one_tokenizer_per_backbone():
    """Each example would load the MiniLM tokenizer three times (0.1 s each on a busy machine): cache it by
    backbone, so that hundreds of examples fit in a minute. What is checked is unchanged."""
    loaded = {}

    def load(model_config):
        key = model_config.backbone.model_dump_json()
        if key not in loaded:
            loaded[key] = real(model_config)
        return loaded[key]

    real = raycv_model.load_tokenizer
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(raycv_model, "load_tokenizer", load)
        patch.setattr(raycv_preflight, "load_tokenizer", load)
        yield


@pytest.fixture(scope="module")
def small_csv(train_csv, tmp_path_factory) -> Path:
    """ROWS real rows, their texts cut short (token counts do not matter here, speed does)."""
    rows = pd.read_csv(train_csv, nrows=ROWS)[["id", "excerpt", "target"]]
    rows["excerpt"] = rows["excerpt"].str.slice(0, 120)
    path = tmp_path_factory.mktemp("data") / "small.csv"
    rows.to_csv(path, index=False)
    return path


def tiny_space(data_path: Path, **sections) -> dict:
    space = yaml.safe_load(yaml.safe_dump(TINY))
    space["data"]["path"] = str(data_path)
    for name, values in sections.items():
        space.setdefault(name, {}).update(values)
    return space


# ---------------------------------------------------------------- strategies

SECTIONS = ["data", "model", "train", "search", "scheduler", "resources", "run"]
WORDS = ["auto", "tiny", "pretrained", "structbert", "asha", "none", "cls", "mean", "minilm-l6", "hub:x", "2e-5",
         "2024-13-45", ".nan", "-.inf", "~", "[", "{", "a: b", "'", "\\", "null", "yes", "0x1F", "1_000", "!!binary x"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10), st.sampled_from(WORDS),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.sampled_from(SECTIONS),
                                                                inner, max_size=3),
    max_leaves=6,
)
keys = st.one_of(
    st.sampled_from(LEAF_KEYS),
    st.sampled_from(SECTIONS + ["model.backbone", "search.params", "search.params.train.lr", "run.mlflow"]),
    st.text(alphabet=string.ascii_lowercase + "._", max_size=14),
)


def yaml_text(value) -> str:
    """A value as one line of YAML, as someone would type it after key=."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


override_words = st.one_of(
    st.tuples(keys, values).map(lambda kv: f"{kv[0]}={yaml_text(kv[1])}"),
    st.tuples(keys, st.text(max_size=12)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(alphabet=string.ascii_letters + "._-=", max_size=12).filter(lambda w: not w.startswith("-")),
)


@st.composite
def spaces(draw) -> object:
    """A tiny space with a few of its keys set to anything, deleted or added, or no mapping at all."""
    kind = draw(st.sampled_from(["mutated"] * 6 + ["not-a-mapping", "nested-garbage"]))
    if kind == "not-a-mapping":
        return draw(st.one_of(scalars, st.lists(values, max_size=3)))
    space = tiny_space(Path("DATA"))
    if kind == "nested-garbage":
        space[draw(st.sampled_from(SECTIONS))] = draw(values)
        return space
    for _ in range(draw(st.integers(1, 3))):
        action, key = draw(st.sampled_from(["set", "delete", "add"])), draw(st.sampled_from(LEAF_KEYS))
        *parents, leaf = key.split(".")
        section = space
        for part in parents:
            section = section.setdefault(part, {}) if isinstance(section.get(part, {}), dict) else {}
        if action == "set":
            section[leaf] = draw(values)
        elif action == "delete":
            section.pop(leaf, None)
        else:
            section[draw(st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=8))] = draw(scalars)
    return space


def encode(text: str, how: str) -> bytes:
    return {
        "utf-8": lambda: text.encode(),
        "utf-8-bom": lambda: codecs.BOM_UTF8 + text.encode(),
        "utf-16": lambda: text.encode("utf-16"),  # with its BOM
        "utf-16-le": lambda: text.encode("utf-16-le"),  # without one
        "latin-1": lambda: text.encode("latin-1", errors="replace"),
    }[how]()


encodings = st.sampled_from(["utf-8", "utf-8", "utf-8-bom", "utf-16", "utf-16-le", "latin-1"])


def space_bytes(draw, data_path: Path) -> bytes:
    document = draw(spaces())
    if isinstance(document, dict) and isinstance(document.get("data"), dict) and document["data"].get("path") == "DATA":
        document["data"]["path"] = str(data_path)
    text = yaml.safe_dump(document, allow_unicode=True, sort_keys=False)
    lines = text.splitlines(keepends=True)
    if lines and draw(st.integers(0, 4)) == 0:  # a line given twice: a key repeated, or the structure broken
        at = draw(st.integers(0, len(lines) - 1))
        lines.insert(draw(st.integers(at + 1, len(lines))), lines[at])
        text = "".join(lines)
    if draw(st.booleans()):
        text += f"# {draw(st.text(max_size=8))}\n"  # a comment with any characters, é included
    raw = encode(text, draw(encodings))
    if draw(st.integers(0, 5)) == 0:  # a byte that is no text at all
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xe9", b"\x00", b"\x80\x80", b"\xc3"])) + raw[at:]
    return raw


# ---------------------------------------------------------------- search spaces and overrides


@settings(max_examples=70, **SETTINGS)
@given(data=st.data())
def test_any_search_space_for_folds(small_csv, data):
    raw = space_bytes(data.draw, small_csv)
    with workdir() as cwd:
        (cwd / "space.yaml").write_bytes(raw)
        run_cli(["folds", "space.yaml", "--out", "folds.csv"], cwd, outputs=("folds.csv",))


@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_any_search_space_for_validate(small_csv, data):
    raw = space_bytes(data.draw, small_csv)
    with workdir() as cwd:
        (cwd / "space.yaml").write_bytes(raw)
        run_cli(["validate", "space.yaml", "--no-model"], cwd)


def alias_bomb(width: int, depth: int) -> str:
    """A YAML value of `depth` nested lists, each `width` aliases of the one inside it: a few hundred bytes
    that are width**depth leaves once expanded (PyYAML shares the nodes; printing the value does not)."""
    node = f"&a0 [{', '.join(['x'] * width)}]"
    for level in range(1, depth):
        node = f"&a{level} [{node}{f', *a{level - 1}' * (width - 1)}]"
    return node


@settings(max_examples=15, **SETTINGS)
@given(width=st.integers(2, 9), depth=st.integers(1, 8),
       key=st.sampled_from(LEAF_KEYS + ["search.params", "search.params.train.lr.grid",
                                        "search.params.train.lr.choice", "resources.custom_per_fold.x",
                                        "x", "data.x", "run.mlflow.x"]),  # a key no section has, too
       self_reference=st.integers(0, 3).map(lambda n: n == 0))
@example(width=9, depth=9, key="x", self_reference=False)  # walked alias by alias: validate hung
@example(width=2, depth=1, key="train.lr", self_reference=True)  # a list holding itself: RecursionError
def test_a_yaml_alias_bomb_anywhere_is_a_few_short_lines(small_csv, width, depth, key, self_reference):
    """9 levels of 9 aliases printed a 226 MB error line (1.4 GB of memory, 8 s) for `train.lr`; under a key no
    section has, `raycv validate` hung walking them (NUL check). `self_reference`: the bomb inside a list that
    holds itself (`&loop [BOMB, *loop]`), which PyYAML builds and every walk recursed into for ever."""
    space = tiny_space(small_csv)
    *parents, leaf = key.split(".") if not key.startswith("search.params.train.lr") else \
        ["search", "params", "train.lr", key.rsplit(".", 1)[1]]
    section = space
    for part in parents:
        section = section.setdefault(part, {}) if isinstance(section.get(part), dict | None) else {}
    section[leaf] = "BOMB"
    bomb = f"&loop [{alias_bomb(width, depth)}, *loop]" if self_reference else alias_bomb(width, depth)
    text = yaml.safe_dump(space, sort_keys=False).replace("BOMB", bomb, 1)
    with workdir() as cwd:
        (cwd / "space.yaml").write_text(text)
        code, _, err = run_cli(["validate", "space.yaml", "--no-model"], cwd)
    # a bomb is no value of any key; 9 leaves may be a valid list
    assert code == 2 or (width ** depth < 10 and not self_reference), err
    if self_reference:
        assert "*loop is inside the value it names" in err, err
    assert len(err) <= MAX_LINES * MAX_LINE_CHARS


@settings(max_examples=50, **SETTINGS)
@given(words=st.lists(override_words, max_size=4))
def test_any_override_words(small_csv, words):
    with workdir() as cwd:
        (cwd / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
        run_cli(["validate", "space.yaml", *words, "--no-model"], cwd)


# Searched keys with any values: one valid alone may not be with the file's other keys, or with another searched
# value (a search of model.backbone.type ended in pydantic's 41-line traceback; lr 0.5 with weight_decay 3 passed).
dimensions = st.one_of(
    st.tuples(st.sampled_from(["grid", "choice"]), st.lists(scalars, min_size=1, max_size=3)),
    st.tuples(st.sampled_from(["uniform", "loguniform", "randint"]),
              st.lists(st.integers(-2, 70) | st.floats(-1, 100, allow_nan=False), min_size=2, max_size=2)),
).map(lambda kind_values: {kind_values[0]: kind_values[1]})


@settings(max_examples=40, **SETTINGS)
@given(params=st.dictionaries(st.sampled_from(sorted(SEARCHABLE) + ["model.backbone.type", "data.num_folds"]),
                              dimensions, min_size=1, max_size=3))
@example(params={"model.backbone.type": {"choice": ["tiny", "pretrained"]}})
@example(params={"train.lr": {"grid": [0.5]}, "train.weight_decay": {"grid": [3]}})
@example(params={"model.backbone.hidden_size": {"grid": [12]}, "model.backbone.num_heads": {"randint": [1, 6]}})
def test_any_searched_values(small_csv, params):
    with workdir() as cwd:
        (cwd / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv, search={"params": params})))
        run_cli(["validate", "space.yaml", "--no-model"], cwd)


@pytest.mark.parametrize("override, line", [
    ("resources.cpus_per_fold=.inf", "resources.cpus_per_fold: Input should be a finite number, found inf"),
    ("run.resource_wait_s=.inf", "run.resource_wait_s: Input should be a finite number, found inf"),
    ("run.gpu_hour_price=.nan", "run.gpu_hour_price: Input should be a finite number, found nan"),
    ("resources.custom_per_fold={x: -1}", "resources.custom_per_fold: 'x': -1: name a resource Ray knows and a "
                                          "positive amount, e.g. {fold_slot: 1}"),
    ("resources.custom_per_fold={' ': 1}", "resources.custom_per_fold: ' ': 1: name a resource Ray knows"),
])
def test_a_resource_or_wait_no_cluster_can_give_is_one_line(small_csv, tmp_path, override, line):
    """Validation passed them all: an infinite CPU share, a wait without end, a negative custom resource."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    (got,) = lines_of(["validate", "space.yaml", override, "--no-model"], tmp_path)
    assert got.startswith(f"raycv: error: space.yaml: {line}"), got


def test_values_valid_alone_but_not_together_are_one_line_naming_both(small_csv, tmp_path):
    params = "search.params={train.lr: {grid: [0.5, 0.001]}, train.weight_decay: {grid: [3, 0.1]}}"
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    (line,) = lines_of(["validate", "space.yaml", params, "--no-model"], tmp_path)
    assert line.startswith("raycv: error: space.yaml: search.params: values a trial can draw together are invalid "
                           "(train.lr=0.5, train.weight_decay=3): train: weight_decay 3 x lr must stay below 1"), line
    # A randint's few values are each checked: 8 is divided by heads 1, 2 and 4, not 3.
    (line,) = lines_of(["validate", "space.yaml", "search.params={model.backbone.num_heads: {randint: [1, 5]}}",
                        "--no-model"], tmp_path)
    assert line == ("raycv: error: space.yaml: search.params.model.backbone.num_heads.randint: value 3 is invalid: "
                    "model.backbone: hidden_size 8 is not a multiple of num_heads 3"), line
    (line,) = lines_of(["validate", "space.yaml", "search.params={model.backbone.type: {choice: [tiny, pretrained]}}",
                        "--no-model"], tmp_path)
    assert line.endswith("search.params.model.backbone.type: not searchable (each backbone type has keys of its "
                         "own); run one search per backbone, or search model.backbone.path between pretrained models")


# MLflow tracking URIs: Tune's MLflow callback opens the store in the driver after Ray has started, where a bad
# one ended in a traceback (an unknown scheme, a SQLite file that cannot be created or is not a database).
# Servers are on loopback ports nothing or nobody listens on: a name to resolve could wait on DNS.
tracking_uris = st.one_of(
    st.text(max_size=30),
    st.builds(lambda scheme, rest: f"{scheme}://{rest}",
              st.sampled_from(["sqlite", "sqlite:", "http", "https", "garbage", "file", "postgresql+x", ""]),
              st.one_of(st.text(max_size=20), st.sampled_from(
                  ["/mlflow.db", "//proc/x.db", "/folder", "/a_file/x.db", "/a_file", "/text.db", "/no/dir/m.db",
                   "127.0.0.1:1", "127.0.0.1:99999", "[::1", "127.0.0.1:abc", "/:memory:", ""]))),
)


@settings(max_examples=40, **SETTINGS)
@given(uri=tracking_uris)
def test_any_mlflow_tracking_uri(small_csv, uri):
    with workdir() as cwd:
        (cwd / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
        (cwd / "folder").mkdir()
        (cwd / "a_file").write_text("")
        (cwd / "text.db").write_text("not a database")
        run_cli(["validate", "space.yaml", "--no-model", f"run.mlflow.tracking_uri={uri!r}"], cwd)


@pytest.mark.parametrize("uri, problem", [
    ("garbage://x", "garbage://x is not a store MLflow tracks to"),
    ("sqlite:////proc/x.db", "cannot create the SQLite database /proc/x.db"),
    ("sqlite:///no/dir/m.db", "cannot create the SQLite database no/dir/m.db (no folder "),
    ("sqlite:///text.db", "text.db is not a SQLite database"),
    ("sqlite:///folder", "folder is a directory; name a database file"),
    ("http://127.0.0.1:1", "no MLflow server answers at http://127.0.0.1:1 (Connection refused)"),
    ("http://[::1", "http://[::1 is not a URI (Invalid IPv6 URL)"),
])
def test_a_tracking_uri_mlflow_cannot_open_is_refused_before_ray(small_csv, tmp_path, uri, problem):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    (tmp_path / "folder").mkdir()
    (tmp_path / "text.db").write_text("not a database")
    (line,) = lines_of(["validate", "space.yaml", "--no-model", f"run.mlflow.tracking_uri={uri}"], tmp_path)
    assert line.startswith(f"raycv: error: space.yaml: run.mlflow.tracking_uri: {problem}"), line


# ---------------------------------------------------------------- cluster addresses

# --address and RAY_ADDRESS: a malformed one ended in a traceback logged by ray.init (`:`), a dashboard's
# http:// one (what `ray job submit` takes) in Ray's many-line error, `local` in a run that took its own local
# Ray for a cluster it then reported lost. Each example also carries a bad override: the address is checked
# with the config, every problem at once, and nothing starts Ray.
addresses = st.one_of(
    st.text(max_size=24),
    st.builds(lambda scheme, host, port: f"{scheme}{host}{port}",
              st.sampled_from(["", "", "ray://", "http://", "https://", "gs://", "ray:/", "://"]),
              st.sampled_from(["", "127.0.0.1", "[::1]", "::1", "[::1", "::1]", "[head]", "[[::1]]", "head node", "h/x",
                               "auto", "local", "localhost"]),
              st.sampled_from(["", ":", ":6379", ":0", ":99999", ":abc", ":10001/x", ":-1"])),
)


@settings(max_examples=40, **SETTINGS)
@given(address=addresses, from_env=st.booleans())
def test_any_cluster_address(small_csv, address, from_env):
    with workdir() as cwd, pytest.MonkeyPatch.context() as patch:
        (cwd / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
        patch.delenv("RAY_ADDRESS", raising=False)
        if from_env:
            patch.setenv("RAY_ADDRESS", address)
        argv = ["tune", "space.yaml", "train.epochs=abc"] + ([] if from_env else [f"--address={address}"])
        code, _, err = run_cli(argv, cwd)
        if not (from_env or address.strip()):
            assert code == 2 and "argument --address: empty" in err  # an unset variable in --address "$HEAD"
            return
        refused = address and address_problem(address, "RAY_ADDRESS" if from_env else "--address")
        assert code == 2 and "train.epochs" in err, err
        assert not refused or f"raycv: error: {one_line(refused)}\n" in err, err  # with the config's, at once


@pytest.mark.parametrize("address, problem", [
    (":", "--address : is not HOST:PORT; give auto, HOST:6379 (the head's GCS) or ray://HOST:10001 (Ray Client)"),
    ("ray://", "--address ray:// is not HOST:PORT; give auto,"),
    ("http://127.0.0.1:8265", "--address http://127.0.0.1:8265 is a dashboard address (the Jobs API's, for `ray job "
                              "submit`); raycv tune joins a cluster at auto, HOST:6379"),
    ("gs://bucket:1", "--address gs://bucket:1: unknown scheme gs://; give auto,"),
    ("[::1:6379", "--address [::1:6379 is not HOST:PORT; give auto,"),  # reached ray.init, which refuses it
    ("::1:6379", "--address ::1:6379 is not HOST:PORT; give auto,"),  # an IPv6 host goes in brackets, for Ray too
])
def test_an_address_ray_cannot_join_is_one_line_with_the_forms_it_can(small_csv, tmp_path, address, problem,
                                                                       monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    lines = lines_of(["tune", "space.yaml", "--address", address, "train.epochs=abc"], tmp_path)
    assert len(lines) == 2 and lines[0].startswith(f"raycv: error: {problem}"), lines
    assert "train.epochs" in lines[1]
    monkeypatch.setenv("RAY_ADDRESS", address)
    (line, _) = lines_of(["tune", "space.yaml", "train.epochs=abc"], tmp_path)
    assert line.startswith(f"raycv: error: {problem.replace('--address', 'RAY_ADDRESS', 1)}"), line


def test_address_local_is_a_local_ray_as_for_ray_init():
    from raycv.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["tune", "space.yaml", "--address", "local"]).address is None
    assert parse(["tune", "space.yaml", "--address", "auto"]).address == "auto"


# ---------------------------------------------------------------- names the system refuses

# Every path a command takes, given a name longer than a file system takes (255 bytes): the first look at it
# (is it a file?) raised "OSError: [Errno 36] File name too long" in eight places.
PATH_ARGUMENTS = [
    ["validate", "NAME"], ["validate", "space.yaml", "data.path=NAME", "--no-model"],
    ["validate", "space.yaml", "model.backbone.tokenizer=NAME"], ["folds", "space.yaml", "--out", "NAME"],
    ["train-fold", "space.yaml", "--fold", "0", "--out-dir", "NAME"], ["report", "NAME"],
    ["predict", "NAME", "--data", "test.csv"], ["predict", "run", "--data", "NAME"],
    ["predict", "run", "--data", "test.csv", "--out", "NAME"], ["convert-structbert", "NAME", "NAME", "NAME", "out"],
    ["convert-structbert", "space.yaml", "space.yaml", "space.yaml", "NAME"],
    ["tune", "NAME"], ["bench", "--quick", "--data", "NAME"],
]


@settings(max_examples=30, **SETTINGS)
@given(argv=st.sampled_from(PATH_ARGUMENTS), name=st.builds(
    lambda folder, long, suffix: f"{folder}a{long}{suffix}", st.sampled_from(["", "a_dir/", "/tmp/"]),
    st.text(alphabet=string.ascii_letters + "é_-", min_size=256, max_size=400), st.sampled_from(["", ".csv", "/x"])))
def test_a_name_too_long_for_the_system_is_one_line(finished_run, small_csv, argv, name):
    with workdir() as cwd:
        (cwd / "a_dir").mkdir()
        (cwd / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
        shutil.copytree(finished_run, cwd / "run")
        pd.read_csv(small_csv, nrows=3).drop(columns="target").to_csv(cwd / "test.csv", index=False)
        code, _, err = run_cli([name if word == "NAME" else word.replace("=NAME", f"={name}") for word in argv], cwd)
    assert code == 2 and "File name too long" in err, err


def test_a_nul_character_in_a_config_value_is_one_line_and_shown_escaped(small_csv, tmp_path):
    space = tiny_space(small_csv, run={"output_dir": "runs/a\0b", "storage_path": "x\0"})
    space["data"]["path"] = "data\0.csv"
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    lines = lines_of(["validate", "space.yaml", "--no-model"], tmp_path)
    assert lines == [
        "raycv: error: space.yaml: data.path: 'data\\x00.csv' holds a NUL character (\\0), which no path or name can; "
        "remove it",
        "raycv: error: space.yaml: run.output_dir: 'runs/a\\x00b' holds a NUL character (\\0), which no path or name "
        "can; remove it",
        "raycv: error: space.yaml: run.storage_path: 'x\\x00' holds a NUL character (\\0), which no path or name can; "
        "remove it"], lines
    assert one_line("a\0b") == "a\\x00b"  # a terminal drops it, a log reader stops at it


def test_a_line_too_long_to_read_keeps_what_is_wrong_and_the_fix(small_csv, tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    (line,) = lines_of(["validate", "space.yaml", f"run.name={'a' * 100_000}", "--no-model"], tmp_path)
    assert len(line) <= MAX_LINE_CHARS + 5 and " ... " in line, len(line)
    assert line.startswith("raycv: error: space.yaml: run.output_dir: cannot write ") and line.endswith(
        "(File name too long); choose another place"), line


@pytest.mark.timeout(60)
def test_a_number_of_epochs_no_run_could_train_is_one_line(small_csv, tmp_path):
    """train.epochs=1e23 (a typo) passed validation; train-fold then hung before its first step, laying out
    that many evaluation steps, and each fold worker of a search would have too."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    lines = lines_of(["train-fold", "space.yaml", "--fold", "0", f"train.epochs={10**23}", "--out-dir", "out"],
                     tmp_path)
    assert lines == [f"raycv: error: space.yaml: train.epochs: Input should be less than or equal to 1000, found "
                     f"{10**23}"], lines


def test_ray_variables_that_are_no_regular_expressions_are_one_line_each(small_csv, tmp_path, monkeypatch):
    """Ray compiles them as it is imported: `import ray` failed, after every check had passed."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_DEDUP_LOGS_ALLOW_REGEX", "(")
    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "[")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    lines = lines_of(["tune", "space.yaml", "train.epochs=abc"], tmp_path)
    assert lines[:2] == [
        "raycv: error: RAY_DEDUP_LOGS_ALLOW_REGEX='(' is not a regular expression (missing ), unterminated subpattern "
        "at position 0); fix it or unset it",
        "raycv: error: RAY_DEDUP_LOGS_SKIP_REGEX='[' is not a regular expression (unterminated character set at "
        "position 0); fix it or unset it"], lines
    assert len(lines) == 3 and "train.epochs" in lines[2]  # with the config's problems, at once
    assert os.environ["RAY_DEDUP_LOGS_ALLOW_REGEX"] == "("  # left as it was, not wrapped into ours
    assert lines_of(["bench", "--quick"], tmp_path) == lines[:2]


@given(value=st.one_of(st.sampled_from(["abc", "1.5", "-3", "0", " ", "1e3", "60s", str(2**32), "٣"]),
                       st.text(min_size=1, max_size=8)))
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_gcs_reconnect_timeout_that_is_no_whole_number_is_one_line(small_csv, tmp_path, monkeypatch, value):
    """The cluster watch read RAY_gcs_rpc_server_reconnect_timeout_s with an unguarded float() once Ray had
    started (a traceback mid-search; Ray's own config is a whole number of seconds): refused with the config's
    problems, before anything starts. A whole number from 1 up passes."""
    if "\x00" in value:
        return  # no environment can hold a NUL
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_gcs_rpc_server_reconnect_timeout_s", value)
    from raycv.cluster import ray_environment_problems

    problems = ray_environment_problems()
    if value.strip().isascii() and value.strip().isdigit() and 0 < int(value) < 2**32:
        assert problems == []
        return
    assert len(problems) == 1 and problems[0].startswith("RAY_gcs_rpc_server_reconnect_timeout_s=")
    assert problems[0].endswith("fix it or unset it (60 s)")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    assert lines_of(["tune", "space.yaml"], tmp_path) == [f"raycv: error: {one_line(problems[0])}"]


# ---------------------------------------------------------------- CSVs


texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "a" * 20000, "café é ü", "line\nbreak", '"']))
ids = st.one_of(st.sampled_from(["a", "b", "c", "", " ", "1", "01", "nan"]), st.text(max_size=6))
targets = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                    st.sampled_from(["", "abc", "nan", "1e400", "-1.5"]),
                    # finite, but beyond 32-bit floats or their range overflowing (pd.cut's traceback), an integer
                    # too long for a float (to_numeric's OverflowError), booleans (read as 1 and 0)
                    st.sampled_from(["1e308", "-1.7e308", "3.5e38", "9" * 400, "True", "false"]), st.booleans())


@st.composite
def csv_bytes(draw, with_target: bool = True) -> bytes:
    """0-10 rows; columns missing, repeated, empty-named or extra; any id, text and target; any encoding."""
    columns = ["id", "excerpt"] + (["target"] if with_target else [])
    columns = draw(st.lists(st.sampled_from(columns + ["", "extra", "id"]), min_size=0, max_size=5)
                   | st.just(columns) | st.just(columns))
    strategy = {"id": ids, "excerpt": texts, "target": targets, "": texts, "extra": texts}
    rows = draw(st.lists(st.tuples(*[strategy[c] for c in columns]), max_size=10))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    return encode(buffer.getvalue(), draw(encodings))


def packed(raw: bytes, how: str) -> tuple[str, bytes]:
    """The CSV's bytes as a file name and its bytes: as they are, or compressed or archived (pandas decompresses
    by the name's ending), whole, cut short, or an archive of no file or of two."""
    import gzip
    import lzma
    import tarfile
    import zipfile

    def archive(kind: str, members: list[bytes]) -> bytes:
        buffer = io.BytesIO()
        if kind == "zip":
            with zipfile.ZipFile(buffer, "w") as z:
                for i, member in enumerate(members):
                    z.writestr(f"{i}.csv", member)
        else:
            with tarfile.open(fileobj=buffer, mode="w") as t:
                for i, member in enumerate(members):
                    info = tarfile.TarInfo(f"{i}.csv")
                    info.size = len(member)
                    t.addfile(info, io.BytesIO(member))
        return buffer.getvalue()

    return {
        "plain": lambda: ("train.csv", raw),
        "gzip named .csv": lambda: ("train.csv", gzip.compress(raw)),
        "gzip": lambda: ("train.csv.gz", gzip.compress(raw)),
        "gzip cut short": lambda: ("train.csv.gz", gzip.compress(raw)[:30]),
        "xz cut short": lambda: ("train.csv.xz", lzma.compress(raw)[:40]),
        "zip": lambda: ("train.zip", archive("zip", [raw])),
        "zip of none": lambda: ("train.zip", archive("zip", [])),
        "zip of two": lambda: ("train.zip", archive("zip", [raw, raw])),
        "zip named .xlsx": lambda: ("train.xlsx", archive("zip", [raw])),
        "tar of two": lambda: ("train.tar", archive("tar", [raw, raw])),
        "not a tar": lambda: ("train.tar", raw),
        "zstd": lambda: ("train.csv.zst", b"\x28\xb5\x2f\xfd" + raw),
    }[how]()


@settings(max_examples=50, **SETTINGS)
@given(raw=csv_bytes(), command=st.sampled_from(["folds", "folds", "validate"]),
       how=st.sampled_from(["plain"] * 12 + ["gzip named .csv", "gzip", "gzip cut short", "xz cut short", "zip",
                                              "zip of none", "zip of two", "zip named .xlsx", "tar of two",
                                              "not a tar", "zstd"]))
@example(raw=b"id,excerpt,target\na,x,1e308\nb,x,-1e308\nc,x,1\nd,x,2\ne,x,3\n", command="folds",
         how="plain")  # pd.cut's traceback
@example(raw=b"id,excerpt,target\na,x,1\nb,x,2\nc,x,3\nd,x," + b"9" * 400 + b"\n", command="folds",
         how="plain")  # OverflowError
# EOFError, ValueError, BadZipFile, TarError, LZMAError: tracebacks from pandas' decompression
@example(raw=b"id,excerpt,target\na,x,1\n", command="folds", how="gzip cut short")
@example(raw=b"id,excerpt,target\na,x,1\n", command="folds", how="zip of two")
@example(raw=b"id,excerpt,target\na,x,1\n", command="folds", how="not a tar")
def test_any_csv_for_the_data(raw, command, how):
    name, raw = packed(raw, how)
    with workdir() as cwd:
        (cwd / name).write_bytes(raw)
        (cwd / "space.yaml").write_text(yaml.safe_dump(tiny_space(Path(name))))
        argv = [command, "space.yaml", "data.num_folds=2"] + (["--out", "folds.csv"] if command == "folds" else [])
        run_cli(argv + (["--no-model"] if command == "validate" else []), cwd, outputs=("folds.csv",))


# ---------------------------------------------------------------- run directories


@pytest.fixture(scope="module")
def finished_run(small_csv, tmp_path_factory) -> Path:
    """A genuine finished run directory, made without Ray by raycv's own code: a trial whose two folds train
    with train_fold, its results written to the storage as rank 0 writes them, collected and settled as the
    Tune callback does, its fold models exported as the search keeps them (the report: `raycv report`)."""
    from raycv import storage
    from raycv.collect import collect_trial, kept_trials, new_run_state, save_run_state, settle
    from raycv.predict import export_fold_models
    from raycv.preflight import preflight
    from raycv.scoring import compute_baselines, score_trial
    from raycv.spaces import load_config
    from raycv.train_fold import split_fold, train_fold

    root = tmp_path_factory.mktemp("finished")
    space = root / "tiny.yaml"
    space.write_text(yaml.safe_dump(tiny_space(small_csv, run={"output_dir": str(root / "run"),
                                                               "keep_fold_models": 1})))
    config = load_config(space)
    plan = preflight(config, str(space))
    run_dir, storage_path = Path(config.run.output_dir), config.run.storage_path
    table = plan.encoded.table
    # sweep.write_run_files (sweep imports Ray; these three lines are what it writes)
    storage.write_text_atomic(run_dir / "resolved_config.yaml", dump_yaml(config))
    storage.write_atomic(run_dir / "folds.csv", lambda tmp: table[["id", "fold", "target"]].to_csv(tmp, index=False))
    storage.write_text_atomic(run_dir / "baselines.json", pd.Series(compute_baselines(table)).to_json())
    state = new_run_state(name=config.run.name, num_points=plan.num_points, max_t=plan.max_t,
                          scheduler=config.scheduler.type, searched=["train.seed"], command=f"raycv tune {space}")
    for trial_id, seed in (("t_00000", 1),):
        trial = config.with_overrides({"train.seed": seed})
        record = state.trial(trial_id)
        record.params = {"train.seed": seed}
        results = []
        for fold in range(trial.data.num_folds):
            saved = {}
            result = train_fold(trial, split_fold(plan.encoded, fold),
                                on_eval=lambda point, snap, saved=saved: saved.update(snap()))
            point_dir = Path(storage_path) / storage.train_run_name(trial_id) / storage.checkpoint_dir_name(1)
            point_dir.mkdir(parents=True, exist_ok=True)
            torch.save(saved, point_dir / storage.FOLD_STATE.format(fold))
            results.append(result.predictions())
        oof = pd.concat(results, ignore_index=True)
        scores = score_trial(oof)
        curve = [{"eval_point": 1, "cv_rmse_last": scores["cv_rmse_last"], "cv_rmse_best": scores["cv_rmse_best"]}]
        files = storage.trial_files(trial_id)
        storage.write_text(storage_path, files["oof"], oof.to_csv(index=False))
        storage.write_text(storage_path, files["curve"], pd.DataFrame(curve).to_csv(index=False))
        collect_trial(storage_path, run_dir, record)
        settle(record, plan.max_t)
    state.state = "finished"
    save_run_state(run_dir, state)
    for trial_id in kept_trials(state, run_dir, config.run.keep_fold_models):
        export_fold_models(storage_path, run_dir, trial_id, config.with_overrides(state.trial(trial_id).params))
    shutil.rmtree(Path(storage_path))  # what a finished run keeps: its fold models are exported
    return run_dir


@pytest.mark.parametrize("damage", ["random bytes", "cut short", "a list", "no model entry", "a non-tensor"])
def test_a_damaged_fold_checkpoint_is_not_exported_and_is_one_line_naming_it(small_csv, tmp_path, damage):
    """export_fold_models reads raycv's own fold checkpoints back from the storage; one that a storage handed
    back cut short or edited ended the finished search in torch's traceback (neither the export's guard nor
    the search's end caught it). It is one line naming the object, and no models folder is left, whole or
    staged: the search keeps that trial's checkpoints for another try."""
    from raycv import RaycvError, storage
    from raycv.predict import export_fold_models, models_dir
    from raycv.spaces import load_config

    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(tiny_space(small_csv, run={"output_dir": str(tmp_path / "run")})))
    config = load_config(space)
    point = Path(config.run.storage_path) / storage.train_run_name("t_0") / storage.checkpoint_dir_name(1)
    point.mkdir(parents=True)
    good = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}}, good)
    content = {"random bytes": os.urandom(64), "cut short": good.getvalue()[:40],
               "a list": _saved([1, 2]), "no model entry": _saved({"weights": {}}),
               "a non-tensor": _saved({"model": {"w": 3}})}[damage]
    for fold in range(config.data.num_folds):
        (point / storage.FOLD_STATE.format(fold)).write_bytes(content)
    with pytest.raises(RaycvError) as caught:
        export_fold_models(config.run.storage_path, Path(config.run.output_dir), "t_0", config)
    line = str(caught.value)
    assert "\n" not in line and storage.FOLD_STATE.format(0) in line, line
    assert "not a fold checkpoint raycv can export" in line, line
    run_dir = Path(config.run.output_dir)
    models = models_dir(run_dir, "t_0").parent
    assert not models.exists() or not any(models.iterdir())  # neither the models nor their staging folder


def _saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("damage, why", [
    ("missing", "cannot be read ([Errno 2] No such file or directory: "),
    ("a directory", "cannot be read ([Errno 21] Is a directory: "),
    ("not YAML", "cannot be read (while parsing a flow"),
    ("not UTF-8", "cannot be read ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
    ("empty", "is empty"),
    ("a list", "holds a list, not a config"),
    ("a pipe", "cannot be read (it is a device, pipe or socket, not a file)"),  # --resume waited for a writer
])
@pytest.mark.timeout(120)
def test_resuming_a_run_whose_config_is_damaged_is_one_line(finished_run, tmp_path, damage, why):
    """--resume compares the config with the run's resolved_config.yaml, whose read was unguarded: a missing or
    broken one ended `raycv tune --resume` in a traceback (before Ray started)."""
    from raycv import RaycvError
    from raycv.spaces import load_config
    from raycv.sweep import check_run_directory

    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    state = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**state, "state": "interrupted"}))
    saved = run_dir / "resolved_config.yaml"
    config = load_config(saved)
    saved.unlink()
    {"a directory": saved.mkdir, "not YAML": lambda: saved.write_text("[\n"),
     "not UTF-8": lambda: saved.write_bytes(b"\xff\xfe\xfa"), "empty": lambda: saved.write_text(""),
     "a list": lambda: saved.write_text("- 1\n"), "missing": lambda: None, "a pipe": lambda: os.mkfifo(saved)}[damage]()
    with pytest.raises(RaycvError) as refused:
        check_run_directory(config, run_dir, True, "raycv tune tiny.yaml --resume")
    assert str(refused.value).startswith(f"--resume: {saved} {why}"), refused.value
    assert str(refused.value).endswith(f"so the run cannot be continued as it was; start a new one with run.name=NAME "
                                       f"(what it holds so far: raycv report {run_dir})")


def test_the_finished_run_reports_and_predicts(finished_run, small_csv, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    code, out, _ = run_cli(["report", "run"], tmp_path, outputs=("run",))
    assert code == 0 and out.strip().endswith("report: run/report.md")
    pd.read_csv(small_csv).drop(columns="target").to_csv(tmp_path / "test.csv", index=False)
    code, out, _ = run_cli(["predict", "run", "--data", "test.csv", "--out", "sub.csv"], tmp_path, outputs=("sub.csv",))
    assert code == 0, out
    submission = pd.read_csv(tmp_path / "sub.csv")
    assert list(submission.columns) == ["id", "target"] and len(submission) == ROWS


RUN_FILES = ["run.json", "folds.csv", "baselines.json", "resolved_config.yaml", "oof/{t}.csv", "curves/{t}.csv",
             "models/{t}/config.yaml", "models/{t}/backbone.json", "models/{t}/fold_0.safetensors",
             "models/{t}/fold_1.safetensors", "models/{t}/tokenizer/tokenizer.json",
             "models/{t}/tokenizer/tokenizer_config.json", "models/{t}/files.json"]


MODEL_FILES = [name for name in RUN_FILES if name.startswith("models/")] + ["models/{t}/tokenizer/vocab.txt"]


@st.composite
def run_mutations(draw, model_files_replaced: bool = False) -> list[tuple[str, str, bytes]]:
    """What happens to a run directory's files: deleted, truncated, replaced with garbage or an empty file;
    with `model_files_replaced`, a file predict opens from the kept models also by a FIFO (read, it waited for
    a writer for ever) or a directory."""
    changes = []
    for _ in range(draw(st.integers(1, 2))):
        name = draw(st.sampled_from(RUN_FILES + ["models/{t}", "oof", "curves", "models"]))
        hows = st.sampled_from(["delete", "truncate", "garbage", "empty", "json", "csv"])
        how = draw(hows | st.sampled_from(["fifo", "directory"]) if model_files_replaced else hows)
        if how in ("fifo", "directory"):
            name = draw(st.sampled_from(MODEL_FILES))
        payload = {
            "garbage": draw(st.binary(max_size=40)),
            "json": draw(st.sampled_from([b"{}", b"[]", b"null", b'{"trials": 3}', b'{"name": 1, "trials": [{}]}',
                                          b'{"state": "finished"}'])),
            "csv": draw(st.sampled_from([b"id,fold\n", b"a,b,c\n1,2,3\n", b"id,fold,target,pred_best,pred_last\n",
                                         b"id,fold,target,pred_best,pred_last\nx,0,nan,1,1\n", b"\xff\xfe"])),
        }.get(how, b"")
        changes.append((name, how, payload if how != "truncate" else bytes([draw(st.integers(1, 95))])))
    return changes


def mutate(run_dir: Path, changes, trial_id: str) -> None:
    for name, how, payload in changes:
        path = run_dir / name.format(t=trial_id)
        if how in ("delete", "fifo", "directory"):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            if how != "delete":
                path.parent.mkdir(parents=True, exist_ok=True)
                os.mkfifo(path) if how == "fifo" else path.mkdir()
        elif path.is_dir():
            continue
        elif how == "truncate" and path.is_file():
            data = path.read_bytes()
            path.write_bytes(data[: len(data) * payload[0] // 100])
        elif how != "truncate":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)


def kept_trial(run_dir: Path) -> str:
    return next((run_dir / "models").iterdir()).name


odd_numbers = st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, -1e308, 1e101, 10**400])
odd_values = st.one_of(odd_numbers, scalars, st.dictionaries(st.text(max_size=3), scalars, max_size=2),
                       st.lists(scalars, max_size=2), st.sampled_from(["$x", "$\\frac$", "x" * 500]))


# What a trial's files in the storage may hold instead of what rank 0 and the trial driver wrote (and what they do
# write, which is taken): status.json, restarts.json
TRIAL_JSON = [b"{", b"\xff", b"[1]", b'"finished"', b"null", b"", b'{"status": "done", "reason": null}',
              b'{"status": "error"}', b'{"status": "diverged", "reason": "loss is NaN"}', b'[{"points_redone": 1}]',
              b'[{"checkpoint_point": 1, "points_redone": -1}]', b'[{"checkpoint_point": 1, "points_redone": 2.5}]',
              b'[{"checkpoint_point": 1, "points_redone": 1e400}]', b'[{"checkpoint_point": 0, "points_redone": 1}]']
STORED = ["oof.csv", "curve.csv", "status.json", "restarts.json"]


@st.composite
def report_damage(draw) -> list[tuple[str, object]]:
    """What an edit does to the values a report reads (its files stay well formed): numbers that are not finite
    or too large in OOF predictions, curve times and baselines; params of odd types; a driver pid no process
    can have; run.json nested too deep for JSON; a directory or a pipe where a report file goes. And in the
    files of a trial an unfinished run's report collects from the storage: status.json or restarts.json
    damaged, or any of them a directory or a pipe; a trial's OOF predictions or curve in the run directory a
    directory or a pipe; OOF seed columns not numbered 0 to K-1."""
    places = st.tuples(st.sampled_from(["report.md", "report.json", "trials.csv", "cv_rmse_curves.png",
                                        "pred_vs_target.png", "rmse_by_param.png"]), st.sampled_from(["dir", "fifo"]))
    values = {"params": odd_values, "output": places, "status": st.sampled_from(TRIAL_JSON),
              "restarts": st.sampled_from(TRIAL_JSON), "stored": st.tuples(st.sampled_from(STORED),
                                                                           st.sampled_from(["dir", "fifo"])),
              "run_file": st.tuples(st.sampled_from(["oof", "curves"]), st.sampled_from(["dir", "fifo"])),
              "seeds": st.tuples(st.lists(st.sampled_from(["0", "1", "2", "01", "x"]), min_size=1, max_size=3),
                                 st.sampled_from([("best", "last"), ("last",)]))}
    kinds = ["oof", "curve", "baselines", "params", "pid", "deep", "output", *values.keys() - {"params", "output"}]
    return [(kind, draw(values.get(kind, odd_numbers)))
            for kind in draw(st.lists(st.sampled_from(sorted(kinds)), min_size=1, max_size=2))]


def with_storage(run_dir: Path, state: dict, trial_id: str) -> Path:
    """The run as an unfinished one leaves it: interrupted, its storage (run/ray, relative to the working
    folder) holding the trial's OOF predictions and curve as rank 0 wrote them. Returns the trial's results."""
    state["state"] = "interrupted"
    for trial in state["trials"]:
        trial["status"] = "interrupted"
    config = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    config["run"]["storage_path"] = "run/ray"  # relative to the working folder, where the report runs
    (run_dir / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    results = run_dir / "ray" / "results" / trial_id
    if not results.is_dir():
        results.mkdir(parents=True)
        shutil.copy(run_dir / "oof" / f"{trial_id}.csv", results / "oof.csv")
        shutil.copy(run_dir / "curves" / f"{trial_id}.csv", results / "curve.csv")
    return results


def replace(path: Path, content: bytes | str) -> None:
    """`path` (a file, a directory or nothing) becomes `content`: bytes, or "fifo" or "dir"."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if content == "fifo":
        os.mkfifo(path)
    elif content == "dir":
        path.mkdir()
    else:
        path.write_bytes(content)


def damage(run_dir: Path, changes, trial_id: str) -> None:
    import socket

    state = json.loads((run_dir / "run.json").read_text())
    for kind, value in changes:
        number = float(value) if isinstance(value, float) else value
        if kind in ("oof", "curve"):
            path = run_dir / kind.replace("curve", "curves") / f"{trial_id}.csv"
            if not path.is_file():  # made a directory or a pipe by the other change
                continue
            table = pd.read_csv(path, dtype={"id": str})
            columns = ["pred_last", "target"] if kind == "oof" else ["fold_busy_s", "fold_callbacks_s", "reported_at"]
            for column in columns[:2]:
                table[column] = table.get(column, 1.0)
                table[column] = table[column].astype(object)
                table.loc[len(table) // 2, column] = number
            table.to_csv(path, index=False)
        elif kind == "baselines":
            (run_dir / "baselines.json").write_text(json.dumps({"mean": {"pooled_rmse": number, "fold_rmse": [1.0]}}))
        elif kind == "params":
            state["trials"][0]["params"]["train.seed"] = value
        elif kind == "pid":
            state["state"], state["driver"] = "running", {"host": socket.gethostname(), "pid": value}
        elif kind == "output":
            name, what = value
            if not (run_dir / name).exists():
                (run_dir / name).mkdir() if what == "dir" else os.mkfifo(run_dir / name)
        elif kind in ("status", "restarts"):
            (with_storage(run_dir, state, trial_id) / f"{kind}.json").write_bytes(value)
        elif kind == "stored":
            replace(with_storage(run_dir, state, trial_id) / value[0], value[1])
        elif kind == "run_file":
            replace(run_dir / value[0] / f"{trial_id}.csv", value[1])
        elif kind == "seeds" and (run_dir / "oof" / f"{trial_id}.csv").is_file():
            path = run_dir / "oof" / f"{trial_id}.csv"
            table = pd.read_csv(path, dtype={"id": str})
            seeds, points = value
            for seed in seeds:
                for point in points:
                    table[f"pred_{point}_seed{seed}"] = table[f"pred_{point}"]
            table.to_csv(path, index=False)
    (run_dir / "run.json").write_text(json.dumps(state))
    if any(kind == "deep" for kind, _ in changes):
        (run_dir / "run.json").write_text("[" * 100000 + "]" * 100000)


@settings(max_examples=12, **SETTINGS)
@given(changes=run_mutations())
def test_any_broken_run_directory_for_report(finished_run, changes):
    with workdir() as cwd:
        shutil.copytree(finished_run, cwd / "run")
        mutate(cwd / "run", changes, kept_trial(finished_run))
        run_cli(["report", "run"], cwd, outputs=("run",))


@settings(max_examples=50, **SETTINGS)
@given(changes=report_damage())
@example(changes=[("run_file", ("curves", "fifo")), ("seeds", (["1", "2"], ("best", "last")))])
@example(changes=[("stored", ("oof.csv", "fifo")), ("restarts", b'[{"checkpoint_point": 0, "points_redone": 1}]')])
def test_any_damaged_values_in_a_run_for_report(finished_run, changes):
    """Exit 0 or 2, one line per problem, nothing written on 2; on 0, report.json is standard JSON and no
    warning (numpy's overflow, matplotlib's) reached the console."""
    import warnings

    with workdir() as cwd:
        shutil.copytree(finished_run, cwd / "run")
        damage(cwd / "run", changes, kept_trial(finished_run))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            code, _, _ = run_cli(["report", "run"], cwd, outputs=("run",))
        if code == 0:
            json.loads((cwd / "run" / "report.json").read_text(), parse_constant=pytest.fail)


@settings(max_examples=24, **SETTINGS)
@given(changes=run_mutations(),
       data=csv_bytes(with_target=False) | st.just(None) | st.sampled_from(["fifo", "directory", "/dev/zero"]))
def test_any_broken_run_directory_or_data_for_predict(finished_run, small_csv, changes, data):
    """--data may also be a FIFO, a directory or a device, which reading would wait on or never end."""
    with workdir() as cwd:
        shutil.copytree(finished_run, cwd / "run")
        texts = "test.csv"
        if data is None:  # the run is what is broken; the texts are fine
            pd.read_csv(small_csv, nrows=5).drop(columns="target").to_csv(cwd / "test.csv", index=False)
            mutate(cwd / "run", changes, kept_trial(finished_run))
        elif data == "fifo":
            os.mkfifo(cwd / "test.csv")
        elif data == "directory":
            (cwd / "test.csv").mkdir()
        elif isinstance(data, str):
            texts = data
        else:  # the texts are what is broken
            (cwd / "test.csv").write_bytes(data)
        run_cli(["predict", "run", "--data", texts, "--out", "sub.csv"], cwd, outputs=("sub.csv",))


@settings(max_examples=12, **SETTINGS)
@given(changes=run_mutations(model_files_replaced=True))
def test_any_kept_model_file_replaced_for_predict(finished_run, small_csv, changes):
    """A file predict opens from the kept models may also be a FIFO or a directory (a FIFO waited for ever)."""
    with workdir() as cwd:
        shutil.copytree(finished_run, cwd / "run")
        pd.read_csv(small_csv, nrows=5).drop(columns="target").to_csv(cwd / "test.csv", index=False)
        mutate(cwd / "run", changes, kept_trial(finished_run))
        run_cli(["predict", "run", "--data", "test.csv", "--out", "sub.csv"], cwd, outputs=("sub.csv",))


# ---------------------------------------------------------------- output paths


# data.csv is the space's data, test.csv predict's --data, run/ predict's run: a command's own input is not
# replaced by its output (`raycv folds --out train.csv` wrote the folds over Kaggle's train.csv).
OUTPUTS = ["a_dir", "a_file/out.csv", "a_file", "a_dir/deeper/out.csv", "/proc/raycv/out.csv", "/proc/out.csv",
           "out.csv", "a_dir/", "a_file/", "new/", "data.csv", "test.csv", "run/report.json", "run/oof", "run/mine.csv"]


@settings(max_examples=40, **SETTINGS)
@given(target=st.sampled_from(OUTPUTS), command=st.sampled_from(["folds", "predict", "train-fold"]),
       bad_config=st.booleans())
def test_any_output_path(finished_run, small_csv, target, command, bad_config):
    with workdir() as cwd:
        (cwd / "a_dir").mkdir()
        (cwd / "a_dir" / "predictions.csv").mkdir()  # where train-fold writes a file
        (cwd / "a_file").write_text("a file\n")
        shutil.copy(small_csv, cwd / "data.csv")
        space = cwd / "space.yaml"
        space.write_text(yaml.safe_dump(tiny_space(cwd / "data.csv", run={"output_dir": "runs"})))
        broken = ["train.lr=-1"] if bad_config else []
        flag = "--out-dir" if command == "train-fold" else "--out"
        if command == "folds":
            argv = ["folds", "space.yaml", *broken, "--out", target]
        elif command == "train-fold":
            argv = ["train-fold", "space.yaml", "--fold", "0", *broken, "--out-dir", target]
        else:
            shutil.copytree(finished_run, cwd / "run")
            pd.read_csv(small_csv, nrows=3).drop(columns="target").to_csv(cwd / "test.csv", index=False)
            argv = ["predict", "no_run" if bad_config else "run", "--data", "test.csv", "--out", target]
        refused = {"a_dir", "a_dir/", "a_file/", "a_file/out.csv", "/proc/raycv/out.csv", "/proc/out.csv"}
        refused |= {"a_file", "data.csv"} if command == "train-fold" else {"new/"}  # a file named as a folder
        refused |= {"data.csv"} if command == "folds" and not bad_config else set()  # its data.path: known once read
        refused |= {"test.csv", "run/oof"} | ({"run/report.json"} if not bad_config else set()) \
            if command == "predict" else set()
        code, _, err = run_cli(argv, cwd, outputs=(target.rstrip("/"), "a_dir", "run"))
        assert code == (2 if bad_config or target in refused else 0), err
        if target in refused:  # the flag is named, with the other problem too
            assert f"raycv: error: {flag}: " in err and len(err.splitlines()) == 1 + bad_config, err


# ---------------------------------------------------------------- StructBERT's three files


@pytest.fixture(scope="module")
def structbert_parts() -> dict:
    """The three files of AliceMind's layout for a tiny BERT (bert. prefix, LayerNorm gamma/beta), as bytes."""
    class Parts(dict):
        def __repr__(self):  # Hypothesis prints a failing example's arguments: not megabytes of them
            return f"<StructBERT files: {', '.join(self)}>"

    return Parts({"en_model": torch_bytes(alicemind_state(tiny_bert(), "bert.")),
                  "config.json": json.dumps(TINY_STRUCTBERT_CONFIG).encode(),
                  "vocab.txt": (minilm_dir() / "vocab.txt").read_bytes()})


def torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@st.composite
def structbert_changes(draw) -> dict:
    """Which of the three files to replace, and with what: other bytes, other JSON, a config with keys of any
    value or deleted, a checkpoint of other objects or with tensors dropped, added or reshaped."""
    changes = {}
    for name in draw(st.sets(st.sampled_from(["en_model", "config.json", "vocab.txt"]), min_size=1)):
        kind = draw(st.sampled_from(["bytes", "text", "json", "edited"]))
        if kind == "bytes":
            changes[name] = draw(st.binary(max_size=64))
        elif kind == "text":
            changes[name] = draw(st.text(max_size=40)).encode("utf-8", "surrogatepass")
        elif kind == "json":
            changes[name] = yaml_text(draw(values)).encode() if name != "en_model" else torch_bytes(draw(
                st.recursive(st.none() | st.integers() | st.text(max_size=4),
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                         max_size=3), max_leaves=5)))
        elif name == "config.json":
            config = dict(TINY_STRUCTBERT_CONFIG)
            for key in draw(st.lists(st.sampled_from(sorted(config)), min_size=1, max_size=3)):
                if draw(st.booleans()):
                    config.pop(key, None)
                else:
                    config[key] = draw(scalars)
            changes[name] = json.dumps(config).encode()
        elif name == "en_model":
            state = alicemind_state(tiny_bert(), "bert.")
            for key in draw(st.lists(st.sampled_from(sorted(state)), min_size=1, max_size=3, unique=True)):
                what = draw(st.sampled_from(["drop", "reshape", "rename"]))
                tensor = state.pop(key)
                if what == "reshape":
                    state[key] = torch.zeros(draw(st.lists(st.integers(0, 40), max_size=3)))
                elif what == "rename":
                    state[key + draw(st.text(alphabet=string.ascii_lowercase + ".", min_size=1, max_size=4))] = tensor
            changes[name] = torch_bytes(state)
        else:  # vocab.txt: lines taken away or made odd
            lines = (minilm_dir() / "vocab.txt").read_text().splitlines()
            changes[name] = "\n".join(lines[: draw(st.integers(0, 50))] + draw(st.lists(st.text(max_size=5),
                                                                                         max_size=3))).encode()
    return changes


@settings(max_examples=40, **SETTINGS)
@given(changes=structbert_changes(), command=st.sampled_from(["convert-structbert", "validate"]))
def test_any_structbert_files(structbert_parts, small_csv, changes, command):
    """`raycv convert-structbert` and a space with a StructBERT backbone, over three files any of which may be
    anything: status 0 or 2, one line per problem naming the file or key, nothing left behind on 2."""
    with workdir() as cwd:
        for name, content in {**structbert_parts, **changes}.items():
            (cwd / name).write_bytes(content)
        if command == "convert-structbert":
            argv = ["convert-structbert", "en_model", "config.json", "vocab.txt", "converted"]
        else:
            backbone = {"type": "structbert", "checkpoint": "en_model", "config": "config.json", "vocab": "vocab.txt"}
            space = tiny_space(small_csv)
            space["model"] = {**space["model"], "backbone": backbone}
            (cwd / "space.yaml").write_text(yaml.safe_dump(space))
            argv = ["validate", "space.yaml"]
        run_cli(argv, cwd, outputs=("converted", "space.yaml"))


# ---------------------------------------------------------------- the bugs these properties found, exactly


def lines_of(argv, cwd) -> list[str]:
    code, _, err = run_cli(argv, cwd)
    assert code == 2
    return err.splitlines()


@pytest.mark.parametrize("key, value, bound", [("hidden_size", 10**11, 1024), ("num_layers", 10**5, 24),
                                               ("num_heads", 512, 64), ("intermediate_size", 10**9, 4096)])
def test_a_tiny_backbone_larger_than_bert_large_is_one_line(small_csv, tmp_path, key, value, bound):
    """validate builds the model: 10**11 wide ended in a traceback from torch's allocator, 10**5 layers in
    minutes of building them."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    (line,) = lines_of(["validate", "space.yaml", f"model.backbone.{key}={value}"], tmp_path)
    assert line == (f"raycv: error: space.yaml: model.backbone.{key}: Input should be less than or equal to {bound}, "
                    f"found {value}")


def test_a_key_given_twice_is_one_line_naming_both_lines(small_csv, tmp_path):
    """PyYAML keeps the last of two equal keys: the first num_folds was dropped unsaid."""
    text = yaml.safe_dump(tiny_space(small_csv), sort_keys=False).replace("  num_folds: 2\n",
                                                                         "  num_folds: 2\n  num_folds: 3\n")
    (tmp_path / "space.yaml").write_text(text)
    line = text.splitlines().index("  num_folds: 3") + 1
    assert lines_of(["validate", "space.yaml", "--no-model"], tmp_path) == [
        f"raycv: error: space.yaml: not valid YAML at line {line}: key 'num_folds' is given twice (first on line "
        f"{line - 1}); keep one"]
    (tmp_path / "space.yaml").write_text(text.replace("  num_folds: 3\n", ""))
    assert lines_of(["validate", "space.yaml", "--no-model", "search.params={train.lr: {grid: [1e-3]}, "
                     "train.lr: {grid: [1e-4]}}"], tmp_path) == [
        "raycv: error: space.yaml: override 'search.params={train.lr: {grid: [1e-3]}, train.lr: {grid: [1e-4]}}': "
        "not valid YAML at line 1: key 'train.lr' is given twice (first on line 1); keep one"]


@pytest.mark.parametrize("override, fix", [
    ("search.params.train.lr={grid: [0.001]}", "search.params.train.lr: unknown key; a searched key is one dotted "
     "key: search.params={train.lr: {grid: [...]}} (the samplers: choice, grid, uniform, loguniform, randint)"),
    ("search.params={train.lr: {quniform: [0.001, 0.01, 0.001]}}",
     "search.params.train.lr.quniform: unknown key; did you mean search.params.train.lr.uniform?"),
    ("search.params={train.lr: {qq: 1}}", "search.params.train.lr.qq: unknown key; known keys: choice, grid, "
     "uniform, loguniform, randint"),
])
def test_a_sampler_raycv_does_not_know_names_those_it_does(small_csv, tmp_path, override, fix):
    """Below a searched key the known keys are the samplers: the line listed none."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    assert lines_of(["validate", "space.yaml", "--no-model", override], tmp_path) == [
        f"raycv: error: space.yaml: {fix}"]


@pytest.mark.parametrize("overrides, roles, column", [
    (["data.id_column=excerpt"], "data.id_column and data.text_column", "excerpt"),
    (["data.text_column=id"], "data.id_column and data.text_column", "id"),
    (["data.text_column=target"], "data.text_column and data.target_column", "target"),
    (["data.id_column=x", "data.text_column=x", "data.target_column=x"],
     "data.id_column, data.text_column and data.target_column", "x"),
])
def test_one_column_in_two_roles_is_one_line(small_csv, tmp_path, overrides, roles, column):
    """Ids as texts (or texts as ids) trained unsaid; targets as texts were blamed on the targets."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    assert lines_of(["validate", "space.yaml", "--no-model", *overrides], tmp_path) == [
        f"raycv: error: space.yaml: data: {roles} name the same column ({column}); ids, texts and targets are "
        "three columns of the CSV"]


def test_a_working_folder_that_was_deleted_is_one_line(tmp_path):
    """`import torch` there ended in "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"."""
    import subprocess
    import sys

    script = f"mkdir gone && cd gone && rmdir ../gone && exec {sys.executable} -m raycv.cli validate spaces/smoke.yaml"
    proc = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("raycv: error: the working folder no longer exists (deleted or moved away); cd to one "
                           "that does\n")


def test_an_output_that_is_an_input_is_refused(finished_run, small_csv, tmp_path):
    """`raycv folds --out train.csv` wrote the fold table over the training data; `predict --out` could
    replace its own --data (also through a link) or the run's files."""
    shutil.copy(small_csv, tmp_path / "data.csv")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(tmp_path / "data.csv")))
    assert lines_of(["folds", "space.yaml", "--out", "data.csv"], tmp_path) == [
        "raycv: error: --out: data.csv is the data.path file; writing there would replace it: name another file"]
    shutil.copytree(finished_run, tmp_path / "run")
    pd.read_csv(small_csv, nrows=3).drop(columns="target").to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "link.csv").symlink_to("test.csv")
    assert lines_of(["predict", "run", "--data", "test.csv", "--out", "link.csv"], tmp_path) == [
        "raycv: error: --out: link.csv is the --data file; writing there would replace it: name another file"]
    assert lines_of(["predict", "run", "--data", "test.csv", "--out", "run/folds.csv"], tmp_path) == [
        "raycv: error: --out: run/folds.csv is a file of the run run; writing there would replace it: name a new "
        "file"]
    # A file of the user's own beside the run's is theirs to rewrite.
    for _ in range(2):
        run_cli(["predict", "run", "--data", "test.csv", "--out", "run/submission.csv"], tmp_path,
                outputs=("run/submission.csv", "run"))  # the folder's time: a file added


@pytest.mark.parametrize("argv, argument", [
    (["validate", ""], "space"), (["folds", "space.yaml", "--out", " "], "--out"),
    (["train-fold", "space.yaml", "--fold", "0", "--out-dir", ""], "--out-dir"), (["report", ""], "run_dir"),
    (["predict", "run", "--data", ""], "--data"), (["predict", "", "--data", "t.csv"], "run_dir"),
    (["bench", "--quick", "--data", ""], "--data"), (["bench", "--quick", "--out", ""], "--out"),
    (["convert-structbert", "a", "", "b", "c"], "config_json"), (["tune", "", "--resume"], "space"),
])
def test_an_empty_path_is_one_line_naming_the_argument(tmp_path, argv, argument):
    """An unset variable (`--data "$TEST"`): '' was the working folder ("--out: . is a directory"), the default
    (bench's --data), or no name at all (": cannot read as CSV")."""
    command = argv[0]
    assert lines_of(argv, tmp_path) == [f"raycv: error: argument {argument}: empty; give a path "
                                        f"(see raycv {command} --help)"]


def test_a_weight_decay_that_flips_the_weights_is_one_line_whatever_lr_the_search_draws(small_csv, tmp_path):
    """AdamW scales weights by 1 - lr x weight_decay per step: weight_decay 1e300 trained to NaN unsaid. The
    problem is the weight decay's: one line for the file and every drawn lr alike."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    expected = ("train: weight_decay 1e+300 x lr must stay below 1 (AdamW scales weights by 1 - lr x weight_decay "
                "each step); lower train.weight_decay (0.01 is usual)")
    assert lines_of(["validate", "space.yaml", "--no-model", "train.weight_decay=1e300",
                     "search.params={train.lr: {grid: [1e-3, 1e-4]}}"], tmp_path) == [
        f"raycv: error: space.yaml: {expected}"]
    assert lines_of(["validate", "space.yaml", "--no-model", "train.weight_decay=200", "train.lr=1e-3",
                     "search.params={train.lr: {grid: [0.001, 0.009]}}"], tmp_path) == [
        f"raycv: error: space.yaml: search.params.train.lr.grid: value 0.009 is invalid: "
        f"{expected.replace('1e+300', '200')}"]


def test_a_space_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "space.yaml").write_bytes(b"data:\n  path: caf\xe9.csv\n")
    assert lines_of(["validate", "space.yaml"], tmp_path) == [
        "raycv: error: space.yaml: not UTF-8 text: byte 0xe9 at line 2 (invalid continuation byte); save the file "
        "as UTF-8"]


@pytest.mark.parametrize("how", ["utf-8-bom", "utf-16"])
def test_a_space_with_a_bom_reads_as_utf8_does(small_csv, tmp_path, how):
    text = yaml.safe_dump(tiny_space(small_csv))
    (tmp_path / "space.yaml").write_bytes(encode(text, how))
    assert run_cli(["folds", "space.yaml", "--out", "f.csv"], tmp_path, outputs=("f.csv",))[0] == 0


def test_a_bad_value_and_a_malformed_override_are_both_reported(small_csv, tmp_path):
    space = SPACES_DIR / "smoke.yaml"
    assert lines_of(["validate", space, f"data.path={small_csv}", "train.epochs=abc", "foo"], tmp_path) == [
        f"raycv: error: {space}: override 'foo': expected key=value, e.g. train.lr=3e-5",
        f"raycv: error: {space}: train.epochs: Input should be a valid integer, unable to parse string as an "
        "integer, found 'abc'"]


def test_an_override_that_is_not_yaml_is_one_line(small_csv, tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    assert lines_of(["validate", "space.yaml", "train.lr=[", "train.seed=2024-13-45"], tmp_path) == [
        "raycv: error: space.yaml: override 'train.lr=[': not valid YAML at line 1: expected the node content, "
        "but found '<stream end>'",
        "raycv: error: space.yaml: override 'train.seed=2024-13-45': not valid YAML: month must be in 1..12"]


def test_a_key_with_a_line_break_stays_on_one_line(small_csv, tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({**tiny_space(small_csv), "train": {"a\nb": 1}}))
    assert lines_of(["validate", "space.yaml"], tmp_path) == [
        "raycv: error: space.yaml: train.a\\nb: unknown key; known keys: " + ", ".join(
            key.split(".")[1] for key in LEAF_KEYS if key.startswith("train."))]


def test_a_search_key_that_is_no_text_is_one_line(small_csv, tmp_path):
    space = {**tiny_space(small_csv), "search": {"params": {1: {"choice": [1]}}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    assert lines_of(["validate", "space.yaml"], tmp_path) == [
        "raycv: error: space.yaml: search.params.1.[key]: Input should be a valid string, found 1"]


@pytest.mark.parametrize("command", ["folds", "predict"])
def test_out_that_is_a_directory_is_one_line_and_writes_nothing(finished_run, small_csv, tmp_path, command):
    (tmp_path / "dd").mkdir()
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    shutil.copytree(finished_run, tmp_path / "run")
    pd.read_csv(small_csv, nrows=3).drop(columns="target").to_csv(tmp_path / "test.csv", index=False)
    argv = {"folds": ["folds", "space.yaml"], "predict": ["predict", "run", "--data", "test.csv"]}[command]
    assert lines_of(argv + ["--out", "dd"], tmp_path) == [
        "raycv: error: --out: dd is a directory; name a file in it, e.g. --out dd/out.csv"]


def test_output_paths_under_a_file_or_in_proc(small_csv, tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    assert lines_of(["folds", "space.yaml", "--out", "a_file/f.csv"], tmp_path) == [
        "raycv: error: --out: cannot create a_file/f.csv: a_file is a file, not a directory"]
    assert lines_of(["folds", "space.yaml", "--out", "/proc/f.csv"], tmp_path) == [
        "raycv: error: --out: /proc/f.csv is a device or a process's file, not a file raycv can replace; name a "
        "file, e.g. --out out.csv"]
    assert lines_of(["train-fold", "space.yaml", "--fold", "0", "--out-dir", "a_file", "train.lr=-1"], tmp_path) == [
        "raycv: error: --out-dir: a_file is a file, not a directory; choose another with --out-dir DIR",
        "raycv: error: space.yaml: train.lr: Input should be greater than 0, found -1"]


def test_an_out_dir_that_is_a_device_or_a_fifo_is_named_as_one(small_csv, tmp_path):
    """train-fold's --out-dir /dev/null was "a file, not a directory"."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    os.mkfifo(tmp_path / "fifo")
    for out_dir in ("/dev/null", "fifo"):
        assert lines_of(["train-fold", "space.yaml", "--fold", "0", "--out-dir", out_dir], tmp_path) == [
            f"raycv: error: --out-dir: {out_dir} is a device, pipe or socket, not a directory; choose another with "
            "--out-dir DIR"]


@pytest.mark.parametrize("command", ["folds", "predict"])
@pytest.mark.parametrize("out", ["/dev/full", "/dev/stdout", "/dev/null", "/proc/self/fd/1"])
def test_out_that_is_a_device_is_refused_and_left_as_it_was(finished_run, small_csv, tmp_path, command, out):
    """A file is written beside its place and renamed onto it; renamed onto /dev/full as root, it replaced the
    device with a regular file (and onto /dev/stdout, the file the shell's output went to)."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    shutil.copytree(finished_run, tmp_path / "run")
    pd.read_csv(small_csv, nrows=3).drop(columns="target").to_csv(tmp_path / "test.csv", index=False)
    argv = {"folds": ["folds", "space.yaml"], "predict": ["predict", "run", "--data", "test.csv"]}[command]
    before = os.lstat(out)
    assert lines_of(argv + ["--out", out], tmp_path) == [
        f"raycv: error: --out: {out} is a device or a process's file, not a file raycv can replace; name a file, "
        "e.g. --out out.csv"]
    after = os.lstat(out)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)


def test_texts_with_a_header_and_no_rows_are_refused_as_such(finished_run, tmp_path):
    """A header alone used to get as far as the tokenizer, whose IndexError was reported as the run's kept
    models being cut short or edited."""
    shutil.copytree(finished_run, tmp_path / "run")
    (tmp_path / "test.csv").write_text("id,excerpt\n")
    assert lines_of(["predict", "run", "--data", "test.csv", "--out", "p.csv"], tmp_path) == [
        "raycv: error: test.csv: no rows under the header; nothing to score"]


# Before the fix each of these waited for ever, some inside safetensors' or tokenizers' Rust, which no signal
# interrupts: the thread method ends the whole session instead of hanging it.
FOREVER = pytest.mark.timeout(60, method="thread")


@FOREVER
@pytest.mark.parametrize("data", ["fifo", "/dev/zero", "folder"])
def test_data_that_is_no_file_is_refused_before_it_is_read(finished_run, tmp_path, data):
    """`predict --data` a FIFO waited for a writer for ever; /dev/zero was read without end."""
    shutil.copytree(finished_run, tmp_path / "run")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    kind = "a directory" if data == "folder" else "a device, pipe or socket"
    assert lines_of(["predict", "run", "--data", data, "--out", "p.csv"], tmp_path) == [
        f"raycv: error: --data: {data} is {kind}, not a file; name the CSV of texts to score"]


@FOREVER
@pytest.mark.parametrize("name", ["fold_0.safetensors", "fold_1.safetensors", "config.yaml", "backbone.json",
                                  "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                                  "tokenizer/special_tokens_map.json"])
def test_a_kept_model_file_that_is_a_fifo_is_refused_before_any_is_read(finished_run, small_csv, tmp_path, name):
    """A FIFO in place of a fold model (or any file predict opens from the kept models) waited for ever."""
    shutil.copytree(finished_run, tmp_path / "run")
    pd.read_csv(small_csv, nrows=3).drop(columns="target").to_csv(tmp_path / "test.csv", index=False)
    path = Path("run") / "models" / kept_trial(finished_run) / name
    (tmp_path / path).unlink(missing_ok=True)
    os.mkfifo(tmp_path / path)
    assert lines_of(["predict", "run", "--data", "test.csv", "--out", "p.csv"], tmp_path) == [
        f"raycv: error: {path} is a device, pipe or socket, not a file; the run's kept models were cut short or "
        "edited: run the search again to keep new ones"]


KEPT_FIX = "the run's kept models were cut short or edited: run the search again to keep new ones"


def test_kept_models_list_every_file_they_were_written_with(finished_run):
    directory = finished_run / "models" / kept_trial(finished_run)
    written = {path.relative_to(directory).as_posix(): path.stat().st_size for path in directory.rglob("*")
               if path.is_file() and path.name != "files.json"}
    assert json.loads((directory / "files.json").read_text()) == written
    assert {"config.yaml", "backbone.json", "fold_0.safetensors", "fold_1.safetensors", "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json"} <= set(written)


@FOREVER
def test_a_kept_model_file_that_is_missing_is_refused_before_any_is_read(finished_run, small_csv, tmp_path):
    """Without tokenizer.json, predict exited 0: transformers built another tokenizer from what was left. Every
    file the kept models were written with is needed as it was kept, and said missing before anything is read."""
    shutil.copytree(finished_run, tmp_path / "run")
    pd.read_csv(small_csv, nrows=3).drop(columns="target").to_csv(tmp_path / "test.csv", index=False)
    directory = Path("run") / "models" / kept_trial(finished_run)
    for name in json.loads((tmp_path / directory / "files.json").read_text()):
        moved = tmp_path / "aside"
        (tmp_path / directory / name).rename(moved)
        assert lines_of(["predict", "run", "--data", "test.csv", "--out", "p.csv"], tmp_path) == [
            f"raycv: error: {directory / name}: file not found; {KEPT_FIX}"], name
        moved.rename(tmp_path / directory / name)


@FOREVER
@pytest.mark.parametrize("name", ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                                  "fold_1.safetensors", "backbone.json"])
def test_a_kept_model_file_cut_short_is_refused_before_any_is_read(finished_run, small_csv, tmp_path, name):
    """A file a byte shorter than it was kept (a copy cut short) is named by its size, not half-loaded."""
    shutil.copytree(finished_run, tmp_path / "run")
    pd.read_csv(small_csv, nrows=3).drop(columns="target").to_csv(tmp_path / "test.csv", index=False)
    path = Path("run") / "models" / kept_trial(finished_run) / name
    size = (tmp_path / path).stat().st_size
    with open(tmp_path / path, "r+b") as handle:
        handle.truncate(size - 1)
    assert lines_of(["predict", "run", "--data", "test.csv", "--out", "p.csv"], tmp_path) == [
        f"raycv: error: {path}: {size - 1} bytes, not the {size} it was kept with; {KEPT_FIX}"]


@FOREVER
def test_models_kept_before_files_json_still_need_the_tokenizer_json(finished_run, small_csv, tmp_path):
    """Models kept before files.json listed every file predict as before, but never without their tokenizer.json."""
    shutil.copytree(finished_run, tmp_path / "run")
    pd.read_csv(small_csv, nrows=3).drop(columns="target").to_csv(tmp_path / "test.csv", index=False)
    directory = Path("run") / "models" / kept_trial(finished_run)
    (tmp_path / directory / "files.json").unlink()
    assert run_cli(["predict", "run", "--data", "test.csv", "--out", "p.csv"], tmp_path, outputs=("p.csv",))[0] == 0
    (tmp_path / "p.csv").unlink()
    (tmp_path / directory / "tokenizer" / "tokenizer.json").unlink()
    assert lines_of(["predict", "run", "--data", "test.csv", "--out", "p.csv"], tmp_path) == [
        f"raycv: error: {directory}/tokenizer/tokenizer.json: file not found; {KEPT_FIX}"]


@FOREVER
@pytest.mark.parametrize("listing", ["[]", "{}", '{"../../run.json": 10}', '{"/etc/passwd": 1}',
                                     '{"config.yaml": -1}', '{"config.yaml": "12"}', "{", "\xff"])
def test_a_kept_file_list_that_is_edited_is_one_line(finished_run, small_csv, tmp_path, listing):
    shutil.copytree(finished_run, tmp_path / "run")
    pd.read_csv(small_csv, nrows=3).drop(columns="target").to_csv(tmp_path / "test.csv", index=False)
    path = Path("run") / "models" / kept_trial(finished_run) / "files.json"
    (tmp_path / path).write_bytes(listing.encode("latin-1"))
    (line,) = lines_of(["predict", "run", "--data", "test.csv", "--out", "p.csv"], tmp_path)
    assert line.startswith(f"raycv: error: {path}: ") and line.endswith(KEPT_FIX), line


def test_out_through_a_link_writes_the_linked_file_and_keeps_the_link(small_csv, tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(tiny_space(small_csv)))
    (tmp_path / "link.csv").symlink_to(tmp_path / "real.csv")
    assert run_cli(["folds", "space.yaml", "--out", "link.csv"], tmp_path, outputs=("link.csv", "real.csv"))[0] == 0
    assert (tmp_path / "link.csv").is_symlink()
    assert (tmp_path / "real.csv").read_text().startswith("id,fold\n")


def test_base_yaml_with_a_pretrained_backbone_by_override(train_csv, tmp_path):
    """Issue 17: base.yaml's StructBERT keys no longer follow model.backbone.type=pretrained; with the
    packaged MiniLM the whole validation passes."""
    argv = ["validate", "spaces/base.yaml", "model.backbone.type=pretrained", f"model.backbone.path={minilm_dir()}",
            f"data.path={train_csv}", "data.max_rows=200", "--no-model"]  # a sample: tokenising is not the point
    code, out, err = run_cli(argv, tmp_path)
    assert code == 0, err
    backbone = yaml.safe_load(out.split("\n---\n")[0])["model"]["backbone"]
    assert backbone == {"type": "pretrained", "path": str(minilm_dir())}
    assert out.rstrip().endswith("ok")



def test_settings_the_data_cannot_take_are_refused_before_any_cut(train_csv, tmp_path):
    """Issue 16: scikit-learn's "test_size = 4 should be greater or equal to the number of classes = 12"."""
    space = SPACES_DIR / "smoke.yaml"
    assert lines_of(["folds", space, f"data.path={train_csv}", "data.max_rows=2830", "--out", "f.csv"], tmp_path) == [
        f"raycv: error: {train_csv}: data.max_rows: 2830 of the data's 2834 rows leaves 4 out, fewer than the 12 "
        "target bins the sample is stratified on; use every row (data.max_rows=null) or at most 2822"]
    assert lines_of(["validate", space, f"data.path={train_csv}", "data.num_bins=5000", "data.max_rows=null",
                     "--no-model"], tmp_path) == [
        f"raycv: error: {space}: {train_csv}: data.num_bins: 5000 target bins for 2834 rows in 3 folds leave fewer "
        "rows per bin than folds; use at most 944 (or leave it out: floor(1 + log2 N) = 12)"]


def test_structbert_files_the_properties_broke(structbert_parts, tmp_path):
    """An empty checkpoint (torch's EOFError has no message), a vocabulary without BERT's special tokens or not
    UTF-8 (the tokenizers library raises a bare Exception), a config giving 0 for a float: one line each, or a
    converted model."""
    cases = {"en_model": (b"", "en_model: not a torch checkpoint (it is empty or cut short)"),
             "vocab.txt": (b"hello\nworld\n", "vocab.txt: not a BERT vocab.txt, no [PAD], [UNK], [CLS], [SEP] among "
                                              "its 2 lines"),
             "vocab.txt ": (b"\x80", "vocab.txt: cannot read as a BERT vocab.txt ('utf-8' codec can't decode")}
    for name, (content, expected) in cases.items():
        with workdir() as cwd:
            for part, data in {**structbert_parts, name.strip(): content}.items():
                (cwd / part).write_bytes(data)
            (line,) = lines_of(["convert-structbert", "en_model", "config.json", "vocab.txt", "out"], cwd)
            assert line.startswith(f"raycv: error: {cwd / name.strip()}: ") and expected in line, line
    with workdir() as cwd:
        config = {**TINY_STRUCTBERT_CONFIG, "hidden_dropout_prob": 0, "attention_probs_dropout_prob": 0}
        for part, data in {**structbert_parts, "config.json": json.dumps(config).encode()}.items():
            (cwd / part).write_bytes(data)
        code, _, err = run_cli(["convert-structbert", "en_model", "config.json", "vocab.txt", "out"], cwd,
                               outputs=("out",))
        assert code == 0 and (cwd / "out" / "model.safetensors").is_file(), err


# ---------------------------------------------------------------- report inputs a probe found, exactly


def damaged_copy(finished_run: Path, cwd: Path, edit_state=None) -> Path:
    """A copy of the finished run in `cwd`/run, its run.json passed through `edit_state(dict)` if given."""
    shutil.copytree(finished_run, cwd / "run")
    if edit_state:
        state = json.loads((cwd / "run" / "run.json").read_text())
        edit_state(state)
        (cwd / "run" / "run.json").write_text(json.dumps(state))
    return cwd / "run"


@pytest.mark.parametrize("command", ["report", "predict"])
def test_a_run_path_too_long_to_look_up_is_one_line_naming_it(finished_run, small_csv, tmp_path, command):
    """OSError: [Errno 36] File name too long, from Path.is_file on RUN_DIR/run.json."""
    long_dir = f"/tmp/{'a' * 300}"
    argv = ["report", long_dir] if command == "report" else ["predict", long_dir, "--data", small_csv]
    assert lines_of(argv, tmp_path) == [
        f"raycv: error: {long_dir}/run.json: cannot look it up (File name too long)"]


def test_a_driver_pid_no_process_can_have_is_a_damaged_run_json(finished_run, tmp_path):
    """A running run whose driver is on this host: os.kill(10**30, 0) raised OverflowError."""
    import socket

    def running(state):
        state["state"], state["driver"] = "running", {"host": socket.gethostname(), "pid": 10**30}

    damaged_copy(finished_run, tmp_path, running)
    (line,) = lines_of(["report", "run"], tmp_path)
    assert line == ("raycv: error: run/run.json: not a run state raycv wrote (driver.pid: Input should be less than "
                    "or equal to 2147483647); it may be cut short or edited")


def test_run_json_nested_too_deep_for_json_is_one_line(finished_run, tmp_path):
    """json.loads raised RecursionError on 100000 nested lists."""
    damaged_copy(finished_run, tmp_path)
    (tmp_path / "run" / "run.json").write_text("[" * 100000 + "]" * 100000)
    (line,) = lines_of(["report", "run"], tmp_path)
    assert line.startswith("raycv: error: run/run.json: not a run state raycv wrote (maximum recursion depth "
                           "exceeded"), line


@pytest.mark.parametrize("column, value, shown_as", [("pred_last", "inf", "inf"), ("pred_best", "-inf", "-inf"),
                                                     ("pred_last", "1e308", "1e+308"), ("target", "nan", "nan")])
def test_an_oof_value_that_is_not_a_finite_number_of_sane_size_is_one_line(finished_run, tmp_path, column, value,
                                                                            shown_as):
    """inf ended in scikit-learn's ValueError; 1e308 passed, overflowed in the squared error (numpy's
    RuntimeWarning on the console) and left NaN in report.json."""
    run_dir = damaged_copy(finished_run, tmp_path)
    trial = kept_trial(finished_run)
    lines = (run_dir / "oof" / f"{trial}.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[3].split(",")
    cells[header.index(column)] = value
    lines[3] = ",".join(cells)
    (run_dir / "oof" / f"{trial}.csv").write_text("\n".join(lines) + "\n")
    assert lines_of(["report", "run"], tmp_path) == [
        f"raycv: error: run/oof/{trial}.csv: not what raycv wrote ({column} on line 4 is {shown_as}; it must be a "
        "finite number of magnitude 1e+100 at most); it may be cut short or edited"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e308"])
def test_a_baseline_that_is_not_a_finite_rmse_is_one_line(finished_run, tmp_path, value):
    """NaN was taken and written into report.json (which JSON has not)."""
    run_dir = damaged_copy(finished_run, tmp_path)
    (run_dir / "baselines.json").write_text(f'{{"mean": {{"pooled_rmse": {value}, "fold_rmse": [{value}]}}}}')
    (line,) = lines_of(["report", "run"], tmp_path)
    assert line.startswith("raycv: error: run/baselines.json: not what raycv wrote (mean.pooled_rmse: Input "
                           "should be "), line


def test_curve_times_too_large_to_add_leave_the_wall_time_unknown_without_a_warning(finished_run, tmp_path):
    """1e308 s in fold_busy_s + fold_callbacks_s overflowed (numpy's RuntimeWarning on the console)."""
    import warnings

    run_dir = damaged_copy(finished_run, tmp_path)
    path = run_dir / "curves" / f"{kept_trial(finished_run)}.csv"
    curve = pd.read_csv(path)
    curve["fold_busy_s"] = curve["fold_callbacks_s"] = curve["reported_at"] = 1e308
    curve.to_csv(path, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_cli(["report", "run"], tmp_path, outputs=("run",))[0] == 0
    report = json.loads((run_dir / "report.json").read_text(), parse_constant=pytest.fail)
    assert report["cost"]["trials"][0]["wall_s"] is None


@pytest.mark.parametrize("seed", [{"a": 1}, 10**400, "$\\frac$", None, [1, 2], True])
def test_params_of_any_type_are_plotted_or_shown_as_text(finished_run, tmp_path, seed):
    """A dict, a 400-digit number or mathtext as a trial's train.seed ended in matplotlib's TypeError,
    OverflowError or ValueError, with report.json, trials.csv and two plots written and no report.md."""
    import warnings

    def odd(state):
        state["trials"][0]["params"]["train.seed"] = seed

    run_dir = damaged_copy(finished_run, tmp_path, odd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_cli(["report", "run"], tmp_path, outputs=("run",))[0] == 0
    assert (run_dir / "report.md").is_file() and (run_dir / "rmse_by_param.png").is_file()
    json.loads((run_dir / "report.json").read_text(), parse_constant=pytest.fail)


@pytest.mark.parametrize("places, problems", [
    ({"report.md": "dir"}, ["run/report.md is a directory"]),
    ({"cv_rmse_curves.png": "dir", "trials.csv": "fifo"},
     ["run/trials.csv is not a regular file (a device or a pipe)", "run/cv_rmse_curves.png is a directory"]),
])
def test_a_report_file_that_cannot_be_replaced_leaves_the_whole_report_unwritten(finished_run, tmp_path, places,
                                                                                  problems):
    """With report.md a directory, report.json, trials.csv and the plots were written before the refusal."""
    run_dir = damaged_copy(finished_run, tmp_path)
    for name, what in places.items():
        (run_dir / name).mkdir() if what == "dir" else os.mkfifo(run_dir / name)
    assert lines_of(["report", "run"], tmp_path) == [
        f"raycv: error: {problem}; name a file to write" for problem in problems]
    assert not list(run_dir.glob(".*.tmp"))


# ---------------------------------------------------------------- a trial's files in the storage, and seed columns


def interrupted_copy(finished_run: Path, cwd: Path) -> tuple[Path, Path]:
    """A copy of the finished run in `cwd`/run as an interrupted run leaves it (`with_storage`), which
    `raycv report` collects from its storage before it reports. Returns (run directory, trial's results)."""
    results = []
    run_dir = damaged_copy(finished_run, cwd, lambda state: results.append(
        with_storage(cwd / "run", state, kept_trial(finished_run))))
    return run_dir, results[0]


NOT_WRITTEN = "; it may be cut short or edited: remove it, and the trial is collected without it"


@FOREVER
@pytest.mark.parametrize("name, content, reason", [
    ("status.json", b"{", "(the top: Invalid JSON: EOF while parsing an object at line 1 column 1)"),
    ("status.json", b"\xff\xfe", "('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
    ("status.json", b"[1]", "(the top: Input should be an object)"),
    ("status.json", b'"finished"', "(the top: Input should be an object)"),
    ("status.json", b'{"status": "done", "reason": null}', "(status 'done' is none of finished, stopped, diverged, "
                                                           "error)"),
    ("status.json", b'{"status": "error", "reason": 3}', "(reason: Input should be a valid string)"),
    ("status.json", b"", "(the top: Invalid JSON: EOF while parsing a value at line 1 column 0)"),
    ("restarts.json", b'"x"', "(the top: Input should be a valid array)"),
    ("restarts.json", b'{"points_redone": 1}', "(the top: Input should be a valid array)"),
    ("restarts.json", b"[1]", "(0: Input should be an object)"),
    ("restarts.json", b'[{"checkpoint_point": 1, "points_redone": -1}]',
     "(0.points_redone: Input should be greater than or equal to 0)"),
    ("restarts.json", b'[{"checkpoint_point": 1, "points_redone": "2"}]', "(0.points_redone: Input should be a valid "
                                                                          "integer)"),
    ("restarts.json", b'[{"checkpoint_point": 1}]', "(0.points_redone: Field required)"),
    ("restarts.json", b"[" * 100000 + b"]" * 100000, "(the top: Invalid JSON: recursion limit exceeded at line 1 "),
    ("curve.csv", b"\xff\xfe", "('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
    ("curve.csv", b"", "(No columns to parse from file)"),
], ids=lambda value: str(value)[:30])
def test_a_damaged_file_of_a_trial_in_the_storage_is_one_line_naming_it(finished_run, tmp_path, name, content,
                                                                        reason):
    """`raycv report` on a run that has not finished collects each unfinished trial's files from the storage;
    status.json and restarts.json were read unchecked (json.loads, then ["status"] or ["points_redone"]): a
    list, a string or not JSON at all ended in a traceback, after the trial's OOF predictions were copied."""
    run_dir, results = interrupted_copy(finished_run, tmp_path)
    replace(results / name, content)
    (line,) = lines_of(["report", "run"], tmp_path)  # and nothing in the run directory changed
    expected = f"raycv: error: run/ray/results/{kept_trial(finished_run)}/{name}: not what raycv wrote {reason}"
    assert line.startswith(expected) and line.endswith(NOT_WRITTEN), line


@FOREVER
@pytest.mark.parametrize("name", ["status.json", "restarts.json", "oof.csv", "curve.csv"])
@pytest.mark.parametrize("content", ["fifo", "dir"])
def test_a_trial_file_in_the_storage_that_is_no_file_is_refused_before_it_is_read(finished_run, tmp_path, name,
                                                                                   content):
    """A FIFO in place of a trial's oof.csv in the storage: `raycv report` waited for a writer for ever."""
    run_dir, results = interrupted_copy(finished_run, tmp_path)
    replace(results / name, content)
    kind = "a directory" if content == "dir" else "a device, pipe or socket"
    assert lines_of(["report", "run"], tmp_path) == [
        f"raycv: error: run/ray/results/{kept_trial(finished_run)}/{name} is {kind}, not a file raycv wrote; "
        "remove it"]


@FOREVER
@pytest.mark.parametrize("name, state", [
    ("oof/{t}.csv", "finished"), ("curves/{t}.csv", "finished"), ("run.json", "finished"), ("folds.csv", "finished"),
    # an unfinished run's report first copies the trial's files from the storage to these places
    ("oof/{t}.csv", "interrupted"), ("curves/{t}.csv", "interrupted"), ("run.json", "interrupted")])
@pytest.mark.parametrize("content", ["fifo", "dir"])
def test_a_run_file_that_is_no_file_is_one_line_naming_it(finished_run, tmp_path, name, content, state):
    """A FIFO or a directory in place of a trial's OOF predictions or curve was skipped: the report called the
    trial one without predictions (and a run.json or folds.csv that is a directory 'missing')."""
    interrupted_copy(finished_run, tmp_path) if state == "interrupted" else damaged_copy(finished_run, tmp_path)
    path = f"run/{name.format(t=kept_trial(finished_run))}"
    replace(tmp_path / path, content)
    kind = "a directory" if content == "dir" else "a device, pipe or socket"
    assert lines_of(["report", "run"], tmp_path) == [
        f"raycv: error: {path} is {kind}, not a file raycv wrote; remove it, or put back the run's file"]


def test_a_trial_whose_storage_holds_a_status_and_restarts_is_collected_with_them(finished_run, tmp_path):
    """What rank 0 and the trial driver write is taken: the checks refuse damage, not the files raycv writes."""
    run_dir, results = interrupted_copy(finished_run, tmp_path)
    (results / "status.json").write_text(json.dumps({"status": "diverged", "reason": "fold 1: loss is NaN"}))
    (results / "restarts.json").write_text(json.dumps([{"checkpoint_point": 1, "points_redone": 2},
                                                       {"checkpoint_point": 3, "points_redone": 0}]))
    assert run_cli(["report", "run"], tmp_path, outputs=("run",))[0] == 0
    (trial,) = json.loads((run_dir / "report.json").read_text())["trials"]
    assert (trial["status"], trial["reason"], trial["restarts"], trial["points_redone"]) == (
        "diverged", "fold 1: loss is NaN", 2, 2)


@pytest.mark.parametrize("seeds", [["1"], ["1", "2"], ["0", "2"], ["0", "1", "1x"], ["01"]])
@pytest.mark.parametrize("which", [["best", "last"], ["last"]])
def test_seed_columns_not_numbered_from_0_are_one_line_naming_the_oof_file(finished_run, tmp_path, seeds, which):
    """scoring.seed_columns counts the pred_last_seed* columns and reads seed0 .. seed{n-1}: an OOF table with
    seed1 and seed2 (or seed0 and seed2, or seed0 only for the last point) ended in a KeyError."""
    run_dir = damaged_copy(finished_run, tmp_path)
    path = f"oof/{kept_trial(finished_run)}.csv"
    oof = pd.read_csv(run_dir / path)
    for seed in seeds:
        for point in which:
            oof[f"pred_{point}_seed{seed}"] = oof[f"pred_{point}"]
    if which == ["last"] and seeds == ["0", "1", "1x"]:
        oof["pred_best_seed0"] = oof["pred_best"]  # seed 0 of both, seeds 1 and 1x of the last point only
    oof.to_csv(run_dir / path, index=False)
    (line,) = lines_of(["report", "run"], tmp_path)
    assert line.startswith(f"raycv: error: run/{path}: not what raycv wrote (its seed columns pred_"), line
    assert line.endswith("are not pred_best_seedK and pred_last_seedK for each K from 0 to the trial's seeds - 1); "
                         "it may be cut short or edited"), line


def test_seed_columns_numbered_from_0_are_scored_per_seed(finished_run, tmp_path):
    run_dir = damaged_copy(finished_run, tmp_path)
    path = run_dir / "oof" / f"{kept_trial(finished_run)}.csv"
    oof = pd.read_csv(path)
    for seed, shift in enumerate((0.0, 0.5)):
        for point in ("best", "last"):
            oof[f"pred_{point}_seed{seed}"] = oof[f"pred_{point}"] + shift
    oof.to_csv(path, index=False)
    assert run_cli(["report", "run"], tmp_path, outputs=("run",))[0] == 0
    (trial,) = json.loads((run_dir / "report.json").read_text())["trials"]
    assert len(trial["seed_rmse_last"]) == 2 and trial["seed_rmse_last"][0] < trial["seed_rmse_last"][1]
