"""Mistakes caught before anything starts: each case is a search space that would fail inside every fold
worker of every trial. `raycv validate` and `raycv tune` refuse it with one line naming the culprit, exit
status 2, and nothing created -- no Ray, no run directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from raycv import RaycvError
from raycv.cli import main
from raycv.cluster import DRIVER_RESOURCE, secure_token_file, trial_driver_resources
from raycv.collect import describe_failure

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def short_bert_dir(tmp_path_factory):
    """A transformers directory whose model has only 128 position embeddings (MiniLM's tokenizer)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from raycv.model import minilm_dir

    directory = tmp_path_factory.mktemp("short_bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def small_vocab_structbert(tmp_path_factory, structbert_files):
    """An AliceMind-layout checkpoint whose embedding table has 1,000 rows, beside the 30,522-token vocab."""
    from transformers import BertConfig, BertModel

    from helpers import TINY_STRUCTBERT_CONFIG, alicemind_state

    directory = tmp_path_factory.mktemp("small_vocab")
    settings = {**TINY_STRUCTBERT_CONFIG, "vocab_size": 1000}
    torch.save(alicemind_state(BertModel(BertConfig(**settings)), "bert."), directory / "en_model")
    (directory / "config.json").write_text(json.dumps(settings))
    shutil.copy(structbert_files("bert").vocab, directory / "vocab.txt")
    return directory


def structbert(directory) -> list[str]:
    return ["model.backbone={type: structbert, checkpoint: " + str(directory / "en_model") + ", config: "
            + str(directory / "config.json") + ", vocab: " + str(directory / "vocab.txt") + "}"]


CASES = {
    # name: (overrides, the culprit the one line must name, a phrase of what is expected)
    "max_length beyond the position embeddings": (
        lambda f: ["model.backbone={type: pretrained, path: " + str(f["short_bert_dir"]) + "}", "model.max_length=256"],
        "model.max_length: 256 is more than the backbone's 128 position embeddings"),
    "a vocabulary larger than the embedding table": (
        lambda f: structbert(f["small_vocab_structbert"]),
        "model.backbone: the tokenizer has 30522 tokens but the embedding table 1000 rows"),
    "a searched reinit_layers beyond the layers": (
        lambda f: ["search.params={model.reinit_layers: {grid: [0, 3]}}"],
        "search.params.model.reinit_layers.grid value 3: model.reinit_layers: 3 is more than the backbone's 2"),
    "a negative seed": (lambda f: ["train.seed=-1"], "train.seed: Input should be greater than or equal to 0"),
    "a searched seed beyond numpy's range": (
        lambda f: ["search.params={train.seed: {randint: [0, 8589934592]}}"],
        "search.params.train.seed.randint: value 8589934591 is invalid: train.seed"),
    "more folds than the data allows": (
        lambda f: ["data.max_rows=20", "data.num_folds=15"], "data.num_folds: 15 folds need at least 30 rows"),
    "max_t beyond a trial's evaluation points": (
        lambda f: ["scheduler.type=asha", "scheduler.max_t=50"],
        "scheduler.max_t: 50 is more than the 6 evaluation points of a trial"),
    "an output directory that is a file": (
        lambda f: [f"run.output_dir={f['a_file']}"], "run.output_dir: " ),
    "an output directory where nothing can be created, even by root": (
        lambda f: ["run.output_dir=/proc/raycv-run"], "run.output_dir: cannot write /proc/raycv-run ("),
    "a model directory that does not exist": (
        lambda f: ["model.backbone={type: pretrained, path: no-such-org/no-such-model}"],
        "model.backbone.path: directory not found"),
}


@pytest.mark.parametrize("case", list(CASES), ids=[name.replace(" ", "-") for name in CASES])
def test_refused_before_anything_starts(case, tiny_space, tmp_path, monkeypatch, capsys, short_bert_dir,
                                        small_vocab_structbert):
    make_overrides, expected = CASES[case]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    overrides = make_overrides({"short_bert_dir": short_bert_dir, "small_vocab_structbert": small_vocab_structbert,
                                "a_file": a_file})
    space = tiny_space()
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    for command in ("validate", "tune"):
        assert main([command, str(space), *overrides]) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert err and all(line.startswith("raycv: error: ") for line in err), err
        assert any(expected in line for line in err), err
    assert list(workdir.iterdir()) == [] and not (tmp_path / "runs").exists()  # nothing created


def test_every_problem_at_once(tiny_space, capsys, short_bert_dir):
    overrides = ["model.backbone={type: pretrained, path: " + str(short_bert_dir) + "}", "model.max_length=256",
                 "model.reinit_layers=5", "scheduler.type=asha", "scheduler.max_t=50"]
    assert main(["validate", str(tiny_space()), *overrides]) == 2
    err = capsys.readouterr().err
    for key in ("model.max_length:", "model.reinit_layers:", "scheduler.max_t:"):
        assert key in err


def test_folds_need_only_the_data(tmp_path, train_csv, capsys):
    """`raycv folds` on base.yaml (StructBERT files absent here) writes the folds all the same."""
    out = tmp_path / "folds.csv"
    assert main(["folds", "spaces/base.yaml", f"data.path={train_csv}", "--out", str(out)]) == 0
    assert out.read_text().count("\n") == 2835
    assert main(["validate", "spaces/base.yaml", f"data.path={train_csv}"]) == 2  # training does need them
    assert "model.backbone.checkpoint: file not found" in capsys.readouterr().err


def test_a_hub_name_is_tried_only_when_asked_for(tiny_space, capsys):
    """A plain name is a local directory (not found at once); hub:NAME is what goes to a hub."""
    from raycv.config import HUB_PREFIX
    from raycv.model import name_or_dir

    assert name_or_dir("bert-base-uncased") == ("bert-base-uncased", True)
    assert name_or_dir(f"{HUB_PREFIX}bert-base-uncased") == ("bert-base-uncased", False)
    assert main(["validate", str(tiny_space()), "model.backbone={type: pretrained, path: bert-base-uncased}"]) == 2
    assert "model.backbone.path: directory not found" in capsys.readouterr().err


def test_the_console_script_refuses_in_seconds_without_starting_ray(tiny_space, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raycv.cli", "tune", str(tiny_space()), "train.seed=-3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "train.seed" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- safety and failure lines


def test_the_token_file_is_made_private(tmp_path):
    token = tmp_path / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)
    assert secure_token_file(token) is True
    assert os.stat(token).st_mode & 0o777 == 0o600
    assert secure_token_file(token) is False  # already private: left alone


def test_trial_drivers_go_where_cluster_yaml_says():
    assert trial_driver_resources({"CPU": 8}) == {"CPU": 0.25}
    assert trial_driver_resources({"CPU": 8, DRIVER_RESOURCE: 100})[DRIVER_RESOURCE] > 0


def test_concurrency_follows_what_the_cluster_can_grow_to(tiny_space):
    """A local Ray runs as many trials as fit now; cluster.yaml's autoscaling cluster (its head offers the
    driver resource) lets Tune queue them all, for the autoscaler to add GPU nodes, within
    run.max_concurrent_trials."""
    from raycv.cluster import plan_resources
    from raycv.spaces import load_config

    config = load_config(tiny_space())  # 3 folds x 0.5 CPU + 0.25 for the driver
    assert plan_resources(config, {"CPU": 2}, joined=False) == (0.0, 1)
    assert plan_resources(config, {"CPU": 8}, joined=False) == (0.0, 4)
    base = load_config(tiny_space({"resources": {"gpus_per_fold": "auto", "cpus_per_fold": 2}}))
    head_only = {"CPU": 8, DRIVER_RESOURCE: 100}  # GPU nodes all down: autoscaling starts from zero
    assert plan_resources(base, head_only, joined=True) == (1.0, None)
    capped = load_config(tiny_space({"resources": {"gpus_per_fold": 1}, "run": {"max_concurrent_trials": 2}}))
    assert plan_resources(capped, head_only, joined=True) == (1.0, 2)
    shared = load_config(tiny_space({"resources": {"gpus_per_fold": 0.2, "cpus_per_fold": 0.5}}))
    assert plan_resources(shared, {"CPU": 16, "GPU": 1}, joined=False) == (0.2, 1)  # 3 x 0.2 of one GPU
    with pytest.raises(RaycvError, match="needs 3 GPU, the cluster has 0"):
        plan_resources(capped, {"CPU": 8}, joined=False)
    # Two seeds per trial: every fold's every seed is a worker (6 x 0.5 CPU + 0.25 for the driver).
    seeds = load_config(tiny_space({"search": {"seeds_per_trial": 2}}))
    assert plan_resources(seeds, {"CPU": 8}, joined=False) == (0.0, 2)
    with pytest.raises(RaycvError, match=r"one trial \(6 fold workers \(3 folds x 2 seeds\) x resources.\*_per_fold, "
                                         r"\+ 0.25 CPU for its driver\) needs 3.25 CPU, the cluster has 2"):
        plan_resources(seeds, {"CPU": 2}, joined=False)


def test_a_gpu_share_above_one_is_refused(tiny_space, capsys):
    assert main(["validate", str(tiny_space()), "resources.gpus_per_fold=1.5"]) == 2
    assert "resources: gpus_per_fold is 1.5" in capsys.readouterr().err


def test_a_fold_failure_is_one_line_naming_the_fold():
    from ray.train import WorkerGroupError

    error = WorkerGroupError("long text\nwith a traceback", {2: RuntimeError("CUDA error: device-side assert")})
    assert describe_failure(error) == "fold 2: RuntimeError: CUDA error: device-side assert"


def test_a_memory_kill_says_how_much_the_worker_held_and_what_to_change():
    """The message Ray's memory monitor gives a killed worker (ray 2.60's wording), as one line."""
    from ray.exceptions import OutOfMemoryError
    from ray.train import WorkerGroupError

    ray_text = (
        "Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.0.0.5, ID: 3f2a) "
        "where the task (actor ID: 9c1d, name=RayTrainWorker.__init__, pid=4242, memory used=4.31GB) was "
        "running was 22.35GB / 23.47GB (0.952262), which exceeds the memory usage threshold of 0.95. Ray "
        "killed this worker (ID: 77ab) because it was the most recently scheduled task; to see more "
        "information about memory usage on this node, use `ray logs raylet.out -ip 10.0.0.5`.\n" * 3
    )
    line = describe_failure(WorkerGroupError("...", {3: OutOfMemoryError(ray_text)}))
    assert "\n" not in line and len(line) < 300
    assert line.startswith("fold 3: killed by Ray's memory monitor: the worker held 4.3 GB")
    assert "22.4 of 23.5 GB" in line and "train.batch_size" in line


@pytest.mark.parametrize("backbone", ["short_bert_dir", "small_vocab_structbert"])
def test_a_problem_no_searched_value_causes_is_one_line(backbone, tiny_space, capsys, short_bert_dir,
                                                        small_vocab_structbert):
    """Issue 16: a backbone's problem was said once for the file's config and again for every value the
    search can draw (5 lines for one problem)."""
    overrides = {"short_bert_dir": ["model.backbone={type: pretrained, path: " + str(short_bert_dir) + "}",
                                    "model.max_length=256"],
                 "small_vocab_structbert": structbert(small_vocab_structbert)}[backbone]
    search = "search.params={train.lr: {grid: [1.0e-4, 3.0e-3]}, train.seed: {randint: [0, 100]}}"
    assert main(["validate", str(tiny_space()), *overrides, search, "--no-model"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    expected = {"short_bert_dir": "model.max_length: 256 is more than the backbone's 128 position embeddings",
                "small_vocab_structbert": "model.backbone: the tokenizer has 30522 tokens but the embedding table "
                                          "1000 rows"}[backbone]
    assert line.startswith(f"raycv: error: {tiny_space()}: {expected}"), line


def test_a_searched_value_that_causes_a_problem_is_named(tiny_space, capsys, short_bert_dir):
    backbone = "model.backbone={type: pretrained, path: " + str(short_bert_dir) + "}"
    search = "search.params={model.max_length: {grid: [64, 256]}, train.lr: {grid: [1.0e-4, 3.0e-3]}}"
    assert main(["validate", str(tiny_space()), backbone, "model.max_length=64", search, "--no-model"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == (f"raycv: error: {tiny_space()}: search.params.model.max_length.grid value 256: "
                    "model.max_length: 256 is more than the backbone's 128 position embeddings; lower it")
    # The file's own value out of range and a drawn one: two problems, two lines.
    assert main(["validate", str(tiny_space()), backbone, "model.max_length=200", search, "--no-model"]) == 2
    lines = capsys.readouterr().err.splitlines()
    keys = [line.split(": ", 4)[3] for line in lines]  # raycv: error: FILE: KEY: ...
    assert keys == ["model.max_length", "search.params.model.max_length.grid value 256"]


def test_an_unwritable_output_dir_is_one_line_not_two(tiny_space, capsys):
    """The default run.storage_path lies under run.output_dir: where that cannot be written, one line says so;
    a storage path of its own elsewhere gets its own line."""
    assert main(["validate", str(tiny_space()), "run.output_dir=/proc/raycv-run"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"raycv: error: {tiny_space()}: run.output_dir: cannot write /proc/raycv-run (No such file or directory); "
        "choose another place"]
    assert main(["validate", str(tiny_space()), "run.output_dir=/proc/raycv-run", "run.storage_path=/proc/other"]) == 2
    assert [line.split(": ")[3] for line in capsys.readouterr().err.strip().splitlines()] == [
        "run.output_dir", "run.storage_path"]
