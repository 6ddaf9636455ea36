"""The `raycv` command: validate, folds, train-fold; bad input -> one line per problem, exit status 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import root_mean_squared_error

from raycv.cli import main
from raycv.data import load_folds
from raycv.spaces import load_config

from helpers import SPACES_DIR

SMOKE = str(SPACES_DIR / "smoke.yaml")
# The smoke space's values the assertions below count on, pinned so an edit of the shipped file does not break them.
PINNED = ["data.num_folds=3", "data.fold_seed=1000", "data.max_rows=450", "model.max_length=128", "model.pooling=cls",
          "model.backbone={type: tiny, hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64}",
          "train.batch_size=16", "train.epochs=6", "train.evals_per_epoch=1"]


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def bad_input(argv, capsys, problems: int = 1) -> list[str]:
    """Run a command that must refuse its input; return its error lines."""
    code, out, err = run(argv, capsys)
    lines = err.splitlines()
    assert code == 2, (out, err)
    assert len(lines) == problems, err
    assert all(line.startswith("raycv: error: ") for line in lines), err
    assert "Traceback" not in err and "Traceback" not in out
    return lines


# ---------------------------------------------------------------- validate


def test_validate_shows_rows_folds_tokens_and_parameters(train_csv, capsys):
    code, out, err = run(["validate", SMOKE, f"data.path={train_csv}", *PINNED], capsys)

    assert code == 0, err
    config_text, report = out.split("\n---\n")
    assert f"path: {train_csv.resolve()}" in config_text and "max_rows: 450" in config_text  # the resolved config
    assert f"rows: 450 from {train_csv.resolve()}" in report
    assert "folds: 3 (seed 1000), validation rows per fold: 150/150/150" in report
    tokens = re.search(
        r"tokens per excerpt: mean (\d+), p90 (\d+), max (\d+); ([\d.]+)% truncated at max_length 128", report
    )
    assert tokens, report
    assert 200 < int(tokens[1]) < 235 and int(tokens[3]) > 256 and float(tokens[4]) == 100.0
    assert re.search(r"useful-token fraction at batch 16: length-bucketed 1\.000 \(widths rounded up to a multiple "
                     r"of 8\), fixed padding 1\.000", report)
    assert "per fold: 19 steps/epoch x 6 epochs, 6 evaluation points per trial" in report
    params = re.search(r"model: ([\d,]+) parameters \(tiny, pooling cls\)", report)
    assert params and int(params[1].replace(",", "")) == expected_tiny_parameters()
    assert report.rstrip().endswith("ok")


def expected_tiny_parameters() -> int:
    """smoke.yaml's tiny BERT (hidden 32, 2 layers, intermediate 64, MiniLM's 30,522 tokens) + a 33-weight head."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    return sum(p.numel() for p in BertModel(config, add_pooling_layer=True).parameters()) + 33


def test_validate_reports_padding_at_a_length_that_truncates_less(train_csv, capsys):
    fractions = {}
    for multiple in (1, 8):
        code, out, _ = run(["validate", SMOKE, f"data.path={train_csv}", *PINNED, "model.max_length=256",
                            "train.batch_size=8", f"train.pad_to_multiple_of={multiple}", "--no-model"], capsys)
        assert code == 0
        found = re.search(rf"length-bucketed ([\d.]+) \(widths rounded up to a multiple of {multiple}\), "
                          r"fixed padding ([\d.]+)", out)
        fractions[multiple] = float(found[1]), float(found[2])
    assert fractions[1][0] > 0.99 and 0.98 < fractions[8][0] < fractions[1][0]  # rounding up costs a little
    assert fractions[1][1] == fractions[8][1] and 0.8 < fractions[1][1] < 0.9
    assert "parameters" not in out.split("\n---\n")[1]


# ---------------------------------------------------------------- folds


def test_folds_writes_every_id_once(train_csv, tmp_path, capsys):
    out_csv = tmp_path / "folds.csv"

    code, out, err = run(["folds", SMOKE, f"data.path={train_csv}", "data.max_rows=null", "data.num_folds=5",
                          "--out", out_csv], capsys)

    assert code == 0, err
    written = pd.read_csv(out_csv, dtype={"id": str})
    assert list(written.columns) == ["id", "fold"]
    assert written["id"].is_unique and sorted(written["id"]) == sorted(pd.read_csv(train_csv)["id"])
    assert written["fold"].value_counts().sort_index().tolist() == [567, 567, 567, 567, 566]
    assert out.strip() == f"wrote {out_csv}: 2834 rows, folds 567/567/567/567/566"
    assert [p.name for p in tmp_path.iterdir()] == ["folds.csv"]  # no temporary file left


# ---------------------------------------------------------------- train-fold


def test_train_fold_that_diverges_says_so_and_exits_1(train_csv, tmp_path, capsys):
    """Targets beyond float32 make the loss infinite: the fold stops at its first point, as a trial of `raycv
    tune` ends diverged (it printed "best val_rmse nan" and exited 0)."""
    data = pd.read_csv(train_csv)
    data["target"] = data["target"] * 1e30
    data.to_csv(tmp_path / "exploding.csv", index=False)
    code, out, err = run(["train-fold", SMOKE, "--fold", "1", f"data.path={tmp_path / 'exploding.csv'}", *PINNED,
                          "train.epochs=2", "scheduler.type=none", "--out-dir", tmp_path / "fold1"], capsys)
    assert (code, err) == (1, "")
    assert out.splitlines()[-1] == (f"fold 1 diverged at point 1 (step 19): train_loss inf; wrote {tmp_path / 'fold1'} "
                                    "(its predictions from that point on are not finite)")
    assert pd.read_csv(tmp_path / "fold1" / "curve.csv")["point"].tolist() == [1]


def test_train_fold_writes_its_three_files_or_none(train_csv, tmp_path, capsys, monkeypatch):
    """A disk that fills while train-fold writes its --out-dir left predictions.csv without its curve.csv and
    config (three renames one after another): now all three are written beside their places first, and a
    failure leaves the folder as it was (here: an earlier run's three files, untouched) and one line."""
    import errno
    import tempfile

    out_dir = tmp_path / "fold0"
    out_dir.mkdir()
    before = {name: f"an earlier run's {name}\n" for name in ("predictions.csv", "curve.csv", "resolved_config.yaml")}
    for name, text in before.items():
        (out_dir / name).write_text(text)
    real_mkstemp = tempfile.mkstemp

    def disk_full_at_the_curve(*args, prefix=None, **kwargs):
        if prefix and prefix.startswith(".curve.csv."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir / "curve.csv"))
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", disk_full_at_the_curve)
    code, _, err = run(["train-fold", SMOKE, "--fold", "0", f"data.path={train_csv}", *PINNED, "train.epochs=1",
                        "scheduler.type=none", "--out-dir", out_dir], capsys)
    assert (code, err) == (2, f"raycv: error: cannot write {out_dir / 'curve.csv'}: No space left on device\n")
    assert {path.name: path.read_text() for path in out_dir.iterdir()} == before  # no temporary file left either


def test_train_fold_writes_predictions_and_curve(train_csv, tmp_path, capsys):
    out_dir = tmp_path / "fold0"

    code, out, err = run(["train-fold", SMOKE, "--fold", "0", f"data.path={train_csv}", *PINNED, "train.epochs=2",
                          "--out-dir", out_dir], capsys)

    assert code == 0, err
    predictions = pd.read_csv(out_dir / "predictions.csv", dtype={"id": str})
    assert list(predictions.columns) == ["id", "fold", "target", "pred_best", "pred_last"]
    config = load_config(SMOKE, [f"data.path={train_csv}", *PINNED])
    table = load_folds(config.data)
    fold0 = table[table["fold"] == 0]
    assert len(predictions) == len(fold0) == 150
    assert predictions["id"].tolist() == fold0["id"].tolist()
    assert (predictions["fold"] == 0).all()
    assert np.allclose(predictions["target"], fold0["target"])

    curve = pd.read_csv(out_dir / "curve.csv")
    assert list(curve.columns) == ["point", "step", "epoch", "train_loss", "val_rmse"]
    assert curve["point"].tolist() == [1, 2] and curve["step"].tolist() == [19, 38]
    # The RMSEs recomputed by hand from the written predictions.
    assert root_mean_squared_error(predictions["target"], predictions["pred_last"]) == pytest.approx(
        curve["val_rmse"].iloc[-1], abs=1e-5
    )
    assert root_mean_squared_error(predictions["target"], predictions["pred_best"]) == pytest.approx(
        curve["val_rmse"].min(), abs=1e-5
    )
    resolved = load_config(out_dir / "resolved_config.yaml")
    assert resolved.train.epochs == 2 and resolved.data.path == str(train_csv.resolve())

    lines = out.splitlines()
    progress = [line for line in lines if line.startswith("fold 0 | point ")]
    assert len(progress) == 2
    assert progress[0].startswith("fold 0 | point 1/2 | step 19/38 | epoch 1.00 |")
    assert progress[1].startswith("fold 0 | point 2/2 | step 38/38 | epoch 2.00 |")
    assert lines[0] == "fold 0: 300 training rows, 150 validation rows, batch 16, 2 epochs"
    assert lines[-1].startswith("fold 0: best val_rmse ") and lines[-1].endswith(f"; wrote {out_dir}")
    assert len(lines) == 4


# ---------------------------------------------------------------- bad input


def test_an_unknown_key(train_csv, capsys, tmp_path):
    [line] = bad_input(["validate", SMOKE, f"data.path={train_csv}", "train.lrr=1e-3"], capsys)
    assert line == f"raycv: error: {SMOKE}: train.lrr: unknown key; did you mean train.lr?"


def test_a_bad_override_value(train_csv, capsys):
    [line] = bad_input(["validate", SMOKE, f"data.path={train_csv}", "train.epochs=many"], capsys)
    assert line.startswith(f"raycv: error: {SMOKE}: train.epochs: ") and "found 'many'" in line


def test_several_problems_give_one_line_each(train_csv, capsys):
    lines = bad_input(["validate", SMOKE, f"data.path={train_csv}", "train.epochs=0", "model.pooling=max",
                       "train.batchsize=3"], capsys, problems=3)
    keys = sorted(line.split(": ")[3] for line in lines)  # raycv: error: FILE: KEY: ...
    assert keys == ["model.pooling", "train.batchsize", "train.epochs"]


def test_a_missing_yaml(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    [line] = bad_input(["validate", "spaces/nope.yaml"], capsys)
    assert line.startswith(
        "raycv: error: search space spaces/nope.yaml not found, and no bundled one is named nope.yaml"
    )


@pytest.mark.parametrize("where", ["a directory", "/dev/null"])
def test_a_space_that_is_not_a_file(where, capsys, tmp_path):
    path = str(tmp_path) if where == "a directory" else where
    [line] = bad_input(["validate", path], capsys)
    kind = "a directory" if where == "a directory" else "not a regular file"
    assert line == f"raycv: error: search space {path} is {kind}; name a YAML file (or a bundled space: raycv spaces)"


def test_a_fold_out_of_range_writes_nothing(train_csv, capsys, tmp_path):
    out_dir = tmp_path / "fold3"
    [line] = bad_input(
        ["train-fold", SMOKE, "--fold", "3", f"data.path={train_csv}", "data.num_folds=3", "--out-dir", out_dir], capsys
    )
    assert line == "raycv: error: --fold 3 is out of range; data.num_folds is 3 (0..2)"
    assert not out_dir.exists()
    bad_input(["train-fold", SMOKE, "--fold", "-1", f"data.path={train_csv}", "--out-dir", out_dir], capsys)
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["tunes", SMOKE], r"raycv: error: argument command: invalid choice: 'tunes'"),
        ([], r"raycv: error: the following arguments are required: command"),
        (["train-fold", SMOKE], r"raycv: error: the following arguments are required: --fold"),
        (["train-fold", SMOKE, "--fold", "one"], r"raycv: error: argument --fold: invalid int value: 'one'"),
        (["validate", SMOKE, "--color"], r"raycv: error: unrecognized arguments: --color \(see raycv validate --help"),
        (["report", "x", "--out", "y"], r"raycv: error: unrecognized arguments: --out y \(see raycv report --help"),
        (["tune", SMOKE, "--address", ""], r"raycv: error: argument --address: empty; give the cluster's address"),
    ],
    ids=["unknown-subcommand", "no-subcommand", "no-fold", "fold-not-int", "unknown-flag", "unknown-flag-of-report",
         "empty-address"],
)
def test_bad_command_lines(argv, expected, capsys):
    [line] = bad_input(argv, capsys)
    assert re.match(expected, line), line
    assert line.endswith("--help)")


def test_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"raycv {metadata.version('raycv')}\n"


def test_a_csv_with_a_missing_column_writes_nothing(train_csv, tmp_path, capsys):
    broken = tmp_path / "no_target.csv"
    pd.read_csv(train_csv, nrows=40).drop(columns=["target"]).to_csv(broken, index=False)
    out_csv = tmp_path / "folds.csv"

    [line] = bad_input(["folds", SMOKE, f"data.path={broken}", "--out", out_csv], capsys)

    assert line == (f"raycv: error: {broken}: missing column(s) target (data.target_column); "
                    "found id, url_legal, license, excerpt, standard_error")
    assert not out_csv.exists()
    out_dir = tmp_path / "fold0"
    bad_input(["train-fold", SMOKE, "--fold", "0", f"data.path={broken}", "--out-dir", out_dir], capsys)
    assert not out_dir.exists()


def test_bad_config_writes_nothing(train_csv, tmp_path, capsys):
    out_csv = tmp_path / "folds.csv"
    bad_input(["folds", SMOKE, f"data.path={train_csv}", "data.num_folds=1", "--out", out_csv], capsys)
    assert not out_csv.exists()
    assert list(tmp_path.iterdir()) == []


def test_the_console_script_end_to_end(tmp_path):
    script = Path(sys.executable).parent / "raycv"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "raycv.cli"]
    out_csv = tmp_path / "folds.csv"

    done = subprocess.run([*command, "folds", "spaces/nope.yaml", "--out", str(out_csv)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("raycv: error: search space spaces/nope.yaml not found")
    assert done.stderr.count("\n") == 1
    assert not out_csv.exists()

    module = subprocess.run([sys.executable, "-m", "raycv.cli", "validate"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert module.returncode == 2
    assert module.stderr.startswith("raycv: error: the following arguments are required: space")
    assert module.stderr.endswith(" (see raycv validate --help)\n") and module.stderr.count("\n") == 1


def test_rays_driver_prints_every_progress_line_of_every_worker(tmp_path):
    """Ray's driver deduplicates worker lines that differ only in their numbers, across processes: three folds'
    lines would come out as one and "[repeated 2x across cluster]", as would two concurrent trials' lines, or a
    trial's after its workers restart on another node. `raycv` keeps its progress lines out of that; Ray's own
    lines are deduplicated as before. Ray's real deduplicator, as `raycv` leaves it, fed as its log monitor
    would feed it."""
    code = f"""
import json, sys
from types import SimpleNamespace
from raycv import cli, progress
assert 'ray' not in sys.modules
cli.main(['validate', {str(tmp_path / 'missing.yaml')!r}])  # any command: the setting comes first
from ray._private.ray_logging import stdout_deduplicator

def point(fold, index):
    return SimpleNamespace(fold=fold, index=index, num_points=8, step=10 * index, total_steps=80, epoch=index / 8,
                           train_loss=0.5, val_rmse=0.6 + fold / 100, best_rmse=0.6, samples_per_s=9.0,
                           elapsed_s=3.0 * index)

scores = {{'cv_rmse_last': 0.61, 'cv_rmse_best': 0.6, 'fold_rmse_last': [0.6, 0.61, 0.62]}}
batches = []
for index in (1, 2):
    for trial, first_pid in (('ab12_00000', 100), ('ab12_00001', 200)):
        for fold in range(3):
            lines = [progress.fold_line(point(fold, index), trial)]
            if fold == 0:
                lines.append(progress.trial_line(trial, point(fold, index), scores))
            batches.append({{'ip': '10.0.0.1', 'pid': first_pid + fold, 'lines': lines}})
# the same trial's rank 0 after a restart on another node: a new process prints point 2 again
batches.append({{'ip': '10.0.0.2', 'pid': 300, 'lines': [progress.trial_line('ab12_00000', point(0, 2), scores)]}})
# a line of Ray's own from three workers: deduplicated as Ray does
batches += [{{'ip': '10.0.0.1', 'pid': pid, 'lines': ['(pid=gcs) Warning: 3 pending tasks']}} for pid in (1, 2, 3)]
out = [line for batch in batches for kept in stdout_deduplicator.deduplicate(batch) for line in kept['lines']]
out += [line for kept in stdout_deduplicator.flush() for line in kept['lines']]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS_ALLOW_REGEX"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    fold_lines = [line for line in out if re.match(r"trial \S+ \| fold \d \| point", line)]
    trial_lines = [line for line in out if re.match(r"trial \S+ \| point \d/8 \| step", line)]
    assert len(fold_lines) == 2 * 2 * 3 and len(set(fold_lines)) == 12, out
    assert len(trial_lines) == 2 * 2 + 1, out
    assert [line for line in trial_lines if "point 2/8" in line and "ab12_00000" in line] == [trial_lines[2]] * 2
    ray_lines = [line for line in out if "pending tasks" in line]
    assert ray_lines[0] == "(pid=gcs) Warning: 3 pending tasks" and len(ray_lines) == 2, out
    assert "repeated 2x across cluster" in ray_lines[1], out


def test_the_reason_the_system_gives_for_a_path_is_one_helper(tmp_path):
    """convert-structbert, predict and the CLI's last resort each spelled out `exc.strerror or first_line(exc)`:
    storage.path_refusal is the one place, and says the system's reason without the errno or the path again."""
    import errno

    from raycv.storage import path_refusal

    with pytest.raises(OSError) as too_long:
        (tmp_path / ("a" * 300)).stat()
    assert too_long.value.errno == errno.ENAMETOOLONG and path_refusal(too_long.value) == "File name too long"
    with pytest.raises(ValueError) as nul:
        os.stat(tmp_path / "a\0b")
    assert path_refusal(nul.value) == "embedded null byte"
    assert path_refusal(OSError("the share went away")) == "the share went away"  # no strerror: the first line

