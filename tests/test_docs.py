"""The docs say what the code does: every command README.md shows runs (or, for a search or a cluster,
validates with the same space and overrides), README's set-up commands are `.ci/run`'s, `raycv spaces` lists
the shipped spaces, and docs/config-reference.md is what `python -m raycv.config_reference` prints.

    python -m pytest tests/test_docs.py

Nothing here starts Ray: `raycv report` and `raycv predict` run on a copy of the session's smoke run
(conftest.smoke_run), which tests/test_tune.py reads too.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_ray_up import header_commands

from raycv.cli import build_parser, main
from raycv.config_reference import config_reference
from raycv.spaces import BUNDLED_SPACES_DIR, list_spaces

from helpers import REPO_DIR, SPACES_DIR

README = REPO_DIR / "README.md"
DOCS_DIR = REPO_DIR / "docs"
CI_RUN = REPO_DIR / ".ci" / "run"
DATA = "../shared/data/commonlit/train.csv"  # README's place for the data: where the tests read it
TEST_DATA = "../shared/data/commonlit/test.csv"

# What README shows that no test can run here: Kaggle's CLI needs an account.
EXTERNAL = {"kaggle", "unzip"}
# raycv commands that run in seconds, as README writes them (placeholders replaced).
CHEAP = {"spaces", "validate", "folds"}
# raycv commands that need a finished run directory.
ON_A_RUN = {"report", "predict"}


def shell_commands(markdown: str) -> list[list[str]]:
    """Every command in the markdown's ```bash blocks, as words: continued lines joined, comments dropped,
    `a && b` split, and a trailing `> log 2>&1 &` and a leading `nohup` taken off."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                command, words = words[:cut], words[cut + 1:]
                if ">" in command:
                    command = command[: command.index(">")]
                command = [w for w in command if w != "&"]
                if command[:1] == ["nohup"]:
                    command = command[1:]
                if command and command not in commands:
                    commands.append(command)
    return commands


README_COMMANDS = shell_commands(README.read_text())


def ci_lines() -> list[str]:
    return [line.strip() for line in CI_RUN.read_text().splitlines() if not line.lstrip().startswith("#")]


def by_kind(kind: str) -> list[list[str]]:
    return [c for c in README_COMMANDS if c[0] == "raycv" and _raycv_kind(c) == kind]


def _raycv_kind(command: list[str]) -> str:
    sub = command[1]
    if sub in CHEAP:
        return "cheap"
    if sub in ON_A_RUN:
        return "run"
    return "parse"


# ---------------------------------------------------------------- README's own shape


def test_readme_is_short_and_every_command_is_known():
    assert len(README.read_text().splitlines()) <= 250
    known = {"raycv", "ray", "pip", "python", "python3", "."} | EXTERNAL
    unknown = [shlex.join(c) for c in README_COMMANDS if c[0] not in known]
    assert not unknown, f"README shows commands tests/test_docs.py does not check: {unknown}"
    assert {c[1] for c in README_COMMANDS if c[0] == "raycv"} >= {"spaces", "validate", "tune", "report", "predict"}


def test_readmes_set_up_commands_are_the_ones_ci_runs():
    """Two commands: one installs, one tests; .ci/run runs exactly these."""
    setup = [c for c in README_COMMANDS if c[0] in ("python3", ".", "pip", "python")]
    install = [c for c in setup if c[0] == "pip"]
    tests = [c for c in setup if c[0] == "python"]
    assert install == [["pip", "install", "torch==2.13.0", "-e", ".[test]"]], install
    assert tests == [["python", "-m", "pytest"]], tests
    assert ["python3", "-m", "venv", ".venv"] in setup and [".", ".venv/bin/activate"] in setup
    lines = ci_lines()
    assert "python3 -m venv .venv" in lines and ". .venv/bin/activate" in lines
    assert shlex.join(install[0]).replace("'", "") in [line.replace("'", "") for line in lines]
    assert "python -m pytest" in lines


def test_every_relative_link_in_the_docs_points_at_a_file():
    pages = [README, *sorted(DOCS_DIR.glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO_DIR)}: {target}")
    assert not broken


def test_every_doc_says_what_it_is_for():
    for page in sorted(DOCS_DIR.glob("*.md")):
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# ") and lines[2].startswith("What it is for: "), page.name


def test_the_config_reference_is_generated_from_config_py():
    """docs/config-reference.md is stale when this fails: python -m raycv.config_reference > docs/config-reference.md"""
    assert (DOCS_DIR / "config-reference.md").read_text() == config_reference(), (
        "docs/config-reference.md is stale: run python -m raycv.config_reference > docs/config-reference.md")


def test_the_config_reference_has_every_key():
    from raycv.config import LEAF_KEYS

    text = config_reference()
    assert not [key for key in LEAF_KEYS if f"| `{key}` |" not in text]


def test_the_layout_page_names_every_module_and_test_file():
    text = (DOCS_DIR / "layout.md").read_text()
    modules = [p.name for p in (REPO_DIR / "raycv").glob("*.py") if p.name != "__init__.py"]
    tests = [p.name for p in (REPO_DIR / "tests").glob("test_*.py")]
    missing = [f"raycv/{m}" for m in modules if f"raycv/{m}" not in text] + [t for t in tests if f"`{t}`" not in text]
    assert not missing, f"docs/layout.md does not say what these are for: {missing}"


# ---------------------------------------------------------------- raycv spaces


def test_raycv_spaces_lists_every_shipped_space_with_its_purpose(capsys):
    assert main(["spaces"]) == 0
    out = capsys.readouterr().out.splitlines()
    shipped = sorted(p.name for p in SPACES_DIR.glob("*.yaml"))
    assert [line.split()[0] for line in out[:-1]] == [f"spaces/{name}" for name in shipped]
    for (name, purpose), line in zip(list_spaces(), out, strict=False):
        assert line.startswith(f"spaces/{name} ") and line.endswith(purpose) and purpose.endswith("."), line
    smoke = dict(list_spaces())["smoke.yaml"]
    assert smoke == ("A few-minute CPU run of the whole pipeline: a tiny random BERT on a stratified sample of "
                     "the real data.")
    assert str(BUNDLED_SPACES_DIR) in out[-1]


# ---------------------------------------------------------------- every command README shows


@pytest.fixture
def placeholders(tmp_path, train_csv):
    """README's placeholders -> what exists here; test.csv: Kaggle's columns, rows of train.csv."""
    test_csv = tmp_path / "test.csv"
    pd.read_csv(train_csv, nrows=12)[["id", "url_legal", "license", "excerpt"]].to_csv(test_csv, index=False)
    return {DATA: str(train_csv), TEST_DATA: str(test_csv), "s3://YOUR-BUCKET/raycv": str(tmp_path / "storage")}


def replace(command: list[str], placeholders: dict[str, str]) -> list[str]:
    out = []
    for word in command:
        for old, new in placeholders.items():
            word = word.replace(old, new)
        out.append(word)
    return out


def parses(argv: list[str]) -> None:
    """argv is a command line raycv's parser takes (as main() reads it: overrides may follow options)."""
    args, extra = build_parser().parse_known_args(argv)
    assert all("=" in item and not item.startswith("-") for item in extra), argv


@pytest.mark.parametrize("command", by_kind("cheap"), ids=shlex.join)
def test_a_cheap_readme_command_runs(command, placeholders, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # as a user runs it: no spaces/ here, so the shipped space is used
    argv = replace(command[1:], placeholders)
    parses(argv)
    assert main(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().err == ""


def validate_instead(argv: list[str]) -> list[str]:
    """A `raycv tune SPACE [options] [key=value ...]` as the `raycv validate` of the same space and overrides."""
    assert argv[0] == "tune", argv
    words, kept = argv[1:], []
    while words:
        word = words.pop(0)
        if word == "--address":
            words.pop(0)
        elif word != "--resume":
            kept.append(word)
    return ["validate", *kept, "--no-model"]


@pytest.fixture
def cluster_checkout(tmp_path, train_csv, structbert_files):
    """A directory laid out as cluster.md asks of the checkout on the head: data/train.csv and StructBERT's
    files under models/structbert-large/ (tiny ones), where base.yaml's relative paths find them."""
    checkout = tmp_path / "raycv"
    (checkout / "data").mkdir(parents=True)
    shutil.copy(train_csv, checkout / "data" / "train.csv")
    files = structbert_files("bert")
    models = checkout / "models" / "structbert-large"
    models.mkdir(parents=True)
    shutil.copy(files.checkpoint, models / "en_model")
    shutil.copy(files.config, models / "large_bert_config.json")
    shutil.copy(files.vocab, models / "vocab.txt")
    return checkout


def expensive_commands() -> list[list[str]]:
    """README's searches, and the raycv commands inside its `ray exec` lines: each becomes a validate."""
    found = by_kind("parse")
    for command in README_COMMANDS:
        if command[:2] == ["ray", "exec"]:
            for part in command[3].split("&&"):
                words = shlex.split(part)
                if words[0] == "raycv":
                    found.append(words)
    return found


@pytest.mark.parametrize("command", expensive_commands(), ids=shlex.join)
def test_a_search_readme_shows_validates_with_the_same_space_and_overrides(command, placeholders, cluster_checkout,
                                                                           monkeypatch, capsys):
    argv = replace(command[1:], placeholders)
    parses(argv)
    if argv[0] != "tune":
        return  # bench, train-fold, convert-structbert: the command line parses
    monkeypatch.chdir(cluster_checkout)
    assert main(validate_instead(argv)) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.rstrip().endswith("ok")


def test_readmes_cluster_commands_name_real_configs_and_ray_subcommands():
    from ray.scripts.scripts import cli

    ray_commands = [c for c in README_COMMANDS if c[0] == "ray"]
    assert ray_commands
    for command in ray_commands:
        assert command[1] in cli.commands, command
        configs = [w for w in command if w.endswith(".yaml")]
        assert configs and all((REPO_DIR / c).is_file() for c in configs), command
        assert "search_spaces/base.yaml" not in shlex.join(command) or (SPACES_DIR / "base.yaml").is_file()


def test_readmes_cluster_commands_are_ones_test_ray_up_runs():
    """README's cluster steps name cluster.yaml (AWS, which no test here can rent). Each is, with the config's
    name, the nodes' home and the storage as cluster-onprem.yaml has them, a command of that file's header,
    which tests/test_ray_up.py runs as written against real SSH nodes."""
    onprem = [shlex.split(c, comments=True) for c in header_commands((REPO_DIR / "cluster-onprem.yaml").read_text())]
    for command in (c for c in README_COMMANDS if c[0] == "ray"):
        as_onprem = [word.replace("cluster.yaml", "cluster-onprem.yaml").replace("/home/ubuntu", "/home/YOUR-USER")
                     .replace("s3://YOUR-BUCKET/raycv", "/mnt/shared/raycv") for word in command]
        assert as_onprem in onprem, f"README's {shlex.join(command)} is not in cluster-onprem.yaml's header"


@pytest.mark.ray  # the session's smoke search starts for the first test that reads it
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("command", by_kind("run"), ids=shlex.join)
def test_a_readme_command_on_the_smoke_run_runs(command, smoke_run, placeholders, tmp_path, monkeypatch, capsys):
    """raycv report / predict on a copy of the session's smoke run (runs/smoke, as README names it)."""
    shutil.copytree(smoke_run["run_dir"], tmp_path / "runs" / "smoke", symlinks=True)
    monkeypatch.chdir(tmp_path)
    argv = replace(command[1:], placeholders)
    parses(argv)
    assert main(argv) == 0, capsys.readouterr().err
    if argv[0] == "predict":
        out = Path(argv[argv.index("--out") + 1])
        submission = pd.read_csv(out)
        assert list(submission.columns) == ["id", "target"] and len(submission) == 12


# ---------------------------------------------------------------- the searches docs/ and the YAML headers show

HEAD_CHECKOUTS = ("/home/ubuntu/raycv", "/home/YOUR-USER/raycv", "~/raycv")


def raycv_parts(command: str) -> list[list[str]]:
    """The raycv command lines inside a shell command: itself, the part after `ray job submit ... --`, or
    the raycv steps of `ray exec CONFIG '...'`."""
    words = shlex.split(command, comments=True)
    if words[:1] == ["nohup"]:  # `nohup raycv tune ... > tune.log 2>&1 &`: the raycv command itself
        words = words[1:words.index(">")] if ">" in words else words[1:]
    if words[:3] == ["ray", "job", "submit"]:
        return [words[words.index("--") + 1:]]
    if words[:2] == ["ray", "exec"]:
        return [shlex.split(part) for part in words[3].split("&&") if shlex.split(part)[0] == "raycv"]
    return [words] if words[0] == "raycv" else []


def documented_searches() -> list[list[str]]:
    found = []
    for doc in sorted(DOCS_DIR.glob("*.md")):
        for command in shell_commands(doc.read_text()):
            found += raycv_parts(shlex.join(command))
    for yaml_file in [*sorted(SPACES_DIR.glob("*.yaml")), *sorted(REPO_DIR.glob("cluster*.yaml"))]:
        for command in header_commands(yaml_file.read_text()):
            found += raycv_parts(command)
    unique = []
    for command in found:
        if command[1] in ("tune", "validate") and command not in unique:
            unique.append(command)
    return unique


def test_the_docs_and_yaml_headers_show_searches():
    searches = documented_searches()
    assert any("base.yaml" in shlex.join(c) for c in searches) and len(searches) >= 8, searches


@pytest.mark.parametrize("command", documented_searches(), ids=shlex.join)
def test_a_search_the_docs_or_a_yaml_header_shows_validates(command, placeholders, cluster_checkout, tmp_path,
                                                             monkeypatch, capsys):
    """Each `raycv tune` / `raycv validate` of docs/ and the YAML headers (cluster ones as the head runs
    them, in its checkout) validates with the same space and overrides; a pretrained backbone's directory
    is a real Hugging Face model (the packaged MiniLM, saved)."""
    from raycv.model import minilm_dir

    monkeypatch.chdir(cluster_checkout)
    hf_dir = cluster_checkout / "models" / "structbert-large-hf"
    if not hf_dir.exists():
        shutil.copytree(minilm_dir(), hf_dir)
    cluster = {old: str(cluster_checkout) for old in HEAD_CHECKOUTS}
    cluster.update({"s3://YOUR-BUCKET/raycv": str(tmp_path / "storage"), "/mnt/shared/raycv": str(tmp_path / "shared"),
                    "/path/to/train.csv": placeholders[DATA]})
    argv = replace(replace(command[1:], placeholders), cluster)
    parses(argv)
    argv = validate_instead(argv) if argv[0] == "tune" else [*argv, "--no-model"]
    if any(word.startswith("model.backbone.path=") for word in argv):
        argv.remove("--no-model")  # the model directory named: build the model from it, as the search would
    assert main(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.rstrip().endswith("ok")
