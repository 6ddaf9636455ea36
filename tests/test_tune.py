"""`raycv tune` end to end on a real local Ray, the real data and the shipped smoke space.

One run serves every test here: conftest.py's session-wide `smoke_run` (about 2 minutes on 2 cores), which
tests/test_resume.py also reads as the uninterrupted twin of its interrupted runs. The run is a subprocess
with a hard time limit; on a timeout its whole process group is killed and the test fails instead of hanging.
"""

import json
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raycv.worker import CHECKPOINT_DIR_NAME

from helpers import REPO_DIR, cluster_processes, die_with_pytest, kill_group, pooled_rmse, run_raycv

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1500)]


def test_run_prints_dashboard_summary_and_report_path(smoke_run):
    out = smoke_run["proc"].stdout
    assert "dashboard: http://127.0.0.1:" in out
    assert "trials: 4 (" in out
    assert f"report: {smoke_run['run_dir'] / 'report.md'}" in out
    assert "baselines on the same folds: training mean " in out
    # The summary comes last: no fold worker's line (Ray relays them a moment late) after it.
    assert "(RayTrainWorker" not in out[out.index("trials: 4 ("):], out[-3000:]
    everything = smoke_run["proc"].stdout + smoke_run["proc"].stderr
    assert everything.count("| cv_rmse_last ") >= 2 * 6 + 2 * 2  # one progress line per trial and evaluation point
    assert "Reporting training result" not in everything  # Ray Train's per-report INFO lines are quieted
    assert "Fatal Python error" not in everything and "SIGABRT" not in everything  # stopped workers leave quietly
    trials = {t["trial_id"] for t in smoke_run["report"]["trials"]}
    left = [p.name for p in Path(tempfile.gettempdir()).glob("raycv-ckpt-*")
            if (match := CHECKPOINT_DIR_NAME.match(p.name)) and match["trial"] in trials]
    assert not left, left  # no local checkpoint copy of the run's trials is left on the node


def test_a_search_beside_another_ray_instance_finds_its_own_cluster(smoke_run):
    """The smoke run ran beside another Ray on this machine: no process of it guessed which cluster is its
    own (Ray Train's helpers used to, and died), and every trial ran and ended."""
    everything = smoke_run["proc"].stdout + smoke_run["proc"].stderr
    assert "Found multiple active Ray instances" not in everything
    assert "WorkerGroupStartupTimeoutError" not in everything
    assert smoke_run["other_ray"] not in everything
    assert {t["status"] for t in smoke_run["report"]["trials"]} <= {"finished", "stopped"}


def test_report_has_one_row_per_trial(smoke_run):
    report, run_dir = smoke_run["report"], smoke_run["run_dir"]
    ids = [t["trial_id"] for t in report["trials"]]
    assert len(ids) == 4 == len(set(ids))  # a grid of 2 learning rates x 2 seeds
    assert sorted(pd.read_csv(run_dir / "trials.csv")["trial_id"]) == sorted(ids)
    section = (run_dir / "report.md").read_text().split("## Leaderboard", 1)[1].split("\n## ", 1)[0]
    leaderboard = [line for line in section.splitlines() if line.startswith("| ") and line.split(" | ")[0][2:] in ids]
    assert len(leaderboard) == 4
    assert sorted({t["params"]["train.lr"] for t in report["trials"]}) == [1e-4, 3e-3]
    for name in ("pred_vs_target.png", "cv_rmse_curves.png", "rmse_by_param.png", "folds.csv", "resolved_config.yaml"):
        assert (run_dir / name).stat().st_size > 0, name


def test_report_rmses_equal_those_recomputed_from_oof_files(smoke_run):
    report, run_dir = smoke_run["report"], smoke_run["run_dir"]
    for trial in report["trials"]:
        oof = pd.read_csv(run_dir / "oof" / f"{trial['trial_id']}.csv")
        assert trial["cv_rmse_best"] == pytest.approx(pooled_rmse(oof, "pred_best"), abs=1e-9)
        assert trial["cv_rmse_last"] == pytest.approx(pooled_rmse(oof, "pred_last"), abs=1e-9)
        per_fold = [pooled_rmse(oof[oof["fold"] == k], "pred_best") for k in range(3)]
        assert trial["fold_rmse_best"] == pytest.approx(per_fold, abs=1e-9)
    members = report["top_k_ensemble"]["trials"]
    assert len(members) == 2
    oofs = [pd.read_csv(run_dir / "oof" / f"{m}.csv").set_index("id").sort_index() for m in members]
    for which in ("last", "best"):
        mixed = oofs[0].assign(pred=(oofs[0][f"pred_{which}"] + oofs[1][f"pred_{which}"]) / 2)
        assert report["top_k_ensemble"][f"cv_rmse_{which}"] == pytest.approx(pooled_rmse(mixed, "pred"), abs=1e-9)


def test_tune_ranked_on_the_pooled_rmse_of_all_folds(smoke_run):
    """What ASHA saw (Tune's own result records) is the RMSE over every fold's rows, not fold 0's."""
    report, run_dir = smoke_run["report"], smoke_run["run_dir"]
    finished = [t for t in report["trials"] if t["status"] == "finished"]
    assert finished
    for trial in finished:
        result_json = run_dir / "ray" / "tune" / trial["trial_id"] / "result.json"
        records = [json.loads(line) for line in result_json.read_text().splitlines()]
        last = records[-1]
        oof = pd.read_csv(run_dir / "oof" / f"{trial['trial_id']}.csv")
        assert last["eval_point"] == report["num_points"]
        assert last["cv_rmse"] == last["cv_rmse_last"] == pytest.approx(pooled_rmse(oof, "pred_last"), abs=1e-9)
        assert last["cv_rmse_best"] == pytest.approx(pooled_rmse(oof, "pred_best"), abs=1e-9)
        assert last["fold_0_rmse_last"] == pytest.approx(pooled_rmse(oof[oof["fold"] == 0], "pred_last"), abs=1e-9)
        assert last["cv_rmse"] != pytest.approx(last["fold_0_rmse_last"], abs=1e-6)


def tensorboard_scalars(events_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] from a TensorBoard event file (TFRecord framing, tensorboardX's protobuf)."""
    from tensorboardX.proto import event_pb2

    data, pos, scalars = events_path.read_bytes(), 0, {}
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_has_every_trial_curve_under_the_run_directory(smoke_run):
    """`tensorboard --logdir runs/smoke/ray/tune`: Tune's logger writes each trial's reported metrics."""
    run_dir = smoke_run["run_dir"]
    for trial in smoke_run["report"]["trials"]:
        (events,) = (run_dir / "ray" / "tune" / trial["trial_id"]).glob("events.out.tfevents.*")
        scalars = tensorboard_scalars(events)
        curve = pd.read_csv(run_dir / "curves" / f"{trial['trial_id']}.csv")
        for tag in ("cv_rmse_last", "cv_rmse_best", "fold_0_rmse_last", "fold_2_rmse_best"):
            values = [value for _, value in scalars[f"ray/tune/{tag}"]]
            assert values == pytest.approx(curve[tag].tolist(), abs=1e-6), tag  # float32 in the event file


def test_every_trial_oof_covers_every_row_once(smoke_run):
    run_dir = smoke_run["run_dir"]
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"id": str}).set_index("id")
    assert len(folds) == 450
    for trial in smoke_run["report"]["trials"]:
        oof = pd.read_csv(run_dir / "oof" / f"{trial['trial_id']}.csv", dtype={"id": str})
        assert len(oof) == len(folds) and oof["id"].is_unique
        assert set(oof["id"]) == set(folds.index)
        assert (oof.set_index("id")["fold"] == folds.loc[oof["id"], "fold"]).all()
        assert oof[["pred_best", "pred_last"]].notna().all().all()


def test_asha_stopped_the_slow_learning_rate(smoke_run):
    report = smoke_run["report"]
    stopped = [t for t in report["trials"] if t["status"] == "stopped"]
    finished = [t for t in report["trials"] if t["status"] == "finished"]
    assert stopped and finished
    assert all(t["eval_points"] < report["max_t"] for t in stopped)
    assert all(t["eval_points"] == report["max_t"] for t in finished)
    assert all(t["params"]["train.lr"] == 1e-4 for t in stopped)
    # The finished trials share the learning rate and differ in seed: a true seed ensemble.
    (entry,) = report["seed_ensembles"]
    assert entry["params"] == {"train.lr": 3e-3} and sorted(entry["trials"]) == sorted(t["trial_id"] for t in finished)
    best = next(t for t in report["trials"] if t["trial_id"] == report["best_trial"])
    assert best["status"] == "finished"
    assert best["cv_rmse_last"] == min(t["cv_rmse_last"] for t in finished)  # ranked on the honest figure
    assert best["cv_rmse_last"] < report["baselines"]["mean"]["pooled_rmse"]


def test_only_the_best_trial_keeps_its_fold_models_and_no_checkpoint_is_left(smoke_run):
    """run.keep_fold_models 1: the best trial's fold models as safetensors (no optimiser state, no pickle);
    every fold checkpoint is gone once its trial has ended."""
    run_dir, report = smoke_run["run_dir"], smoke_run["report"]
    assert [p.name for p in (run_dir / "models").iterdir()] == [report["best_trial"]]
    kept = run_dir / "models" / report["best_trial"]
    assert sorted(p.name for p in kept.glob("*.safetensors")) == ["fold_0.safetensors", "fold_1.safetensors",
                                                                  "fold_2.safetensors"]
    assert (kept / "backbone.json").is_file() and (kept / "config.yaml").is_file()
    assert (kept / "tokenizer" / "tokenizer.json").is_file()
    assert list((run_dir / "ray").glob("train_*/point_*")) == []


def held_out_rows(smoke_run, train_csv, count: int = 40) -> pd.DataFrame:
    """Real rows the smoke run never saw (it trains on a 450-row sample), as Kaggle's test.csv has them."""
    seen = set(pd.read_csv(smoke_run["run_dir"] / "folds.csv", dtype={"id": str})["id"])
    rows = pd.read_csv(train_csv, dtype={"id": str})
    return rows[~rows["id"].isin(seen)].head(count)[["id", "excerpt"]]


def test_predict_averages_the_fold_models_of_the_best_trial(smoke_run, train_csv, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    test = held_out_rows(smoke_run, train_csv)
    test.to_csv(tmp_path / "test.csv", index=False)
    proc = run_raycv(["predict", str(smoke_run["run_dir"]), "--data", str(tmp_path / "test.csv"),
                      "--out", str(tmp_path / "submission.csv")], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    submission = pd.read_csv(tmp_path / "submission.csv", dtype={"id": str})
    assert list(submission.columns) == ["id", "target"]
    assert sorted(submission["id"]) == sorted(test["id"]) and submission["id"].is_unique
    assert np.isfinite(submission["target"]).all()

    # The same average, computed here from the saved files with transformers alone: smoke.yaml's head is
    # the pooled [CLS] output (dense + tanh) through a linear layer.
    kept = smoke_run["run_dir"] / "models" / smoke_run["report"]["best_trial"]
    tokenizer = AutoTokenizer.from_pretrained(kept / "tokenizer")
    batch = tokenizer(test["excerpt"].tolist(), truncation=True, max_length=128, padding=True, return_tensors="pt")
    outputs = []
    for fold in range(3):
        state = load_file(kept / f"fold_{fold}.safetensors")
        bert = BertModel(BertConfig.from_json_file(kept / "backbone.json")).eval()
        bert.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
        with torch.no_grad():
            pooled = bert(**batch).pooler_output
        outputs.append((pooled @ state["head.weight"].T + state["head.bias"]).squeeze(-1).numpy())
    expected = pd.Series(np.mean(outputs, axis=0), index=test["id"].to_numpy())
    assert submission.set_index("id")["target"].to_numpy() == pytest.approx(
        expected.loc[submission["id"]].to_numpy(), abs=1e-4)


def test_predict_refuses_bad_rows_and_runs_without_models(smoke_run, train_csv, tmp_path):
    test = held_out_rows(smoke_run, train_csv, 5)
    bad = pd.concat([test, test.head(1)]).reset_index(drop=True)  # a duplicate id
    bad.loc[2, "excerpt"] = "  "  # an empty text
    bad.to_csv(tmp_path / "bad.csv", index=False)
    proc = run_raycv(["predict", str(smoke_run["run_dir"]), "--data", str(tmp_path / "bad.csv")], cwd=tmp_path,
                     timeout=300)
    duplicate, empty = proc.stderr.splitlines()  # every kind of bad row at once, one line each
    assert proc.returncode == 2
    assert "duplicate id" in duplicate and test["id"].iloc[0] in duplicate
    assert "empty or non-text excerpt" in empty and bad.loc[2, "id"] in empty
    assert not (tmp_path / "submission.csv").exists()

    without = tmp_path / "without_models"
    shutil.copytree(smoke_run["run_dir"], without, ignore=shutil.ignore_patterns("ray", "models"))
    test.to_csv(tmp_path / "test.csv", index=False)
    proc = run_raycv(["predict", str(without), "--data", str(tmp_path / "test.csv")], cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "run.keep_fold_models" in proc.stderr
    assert not (tmp_path / "submission.csv").exists()


def test_raycv_report_rebuilds_the_same_report(smoke_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(smoke_run["run_dir"], copy, ignore=shutil.ignore_patterns("ray", "models"))
    for name in (
        "report.json", "report.md", "trials.csv", "pred_vs_target.png", "cv_rmse_curves.png", "rmse_by_param.png"
    ):
        (copy / name).unlink()
    proc = run_raycv(["report", str(copy)], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((copy / "report.json").read_text()) == smoke_run["report"]
    assert (copy / "report.md").read_text() == (smoke_run["run_dir"] / "report.md").read_text()
    assert (copy / "cv_rmse_curves.png").stat().st_size > 0


def test_second_run_into_the_same_directory_is_refused(smoke_run, train_csv):
    proc = run_raycv(["tune", "spaces/smoke.yaml", f"data.path={train_csv}"], cwd=smoke_run["cwd"], timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "already holds a run" in proc.stderr


# A fold worker that Ray stops mid-step: two Ray actors train in a thread as Ray Train's workers do (SDPA, the
# kernel a fold's forward pass was in when it happened), one of them marked as raycv's fold worker marks its
# training thread and holding a local checkpoint copy; both get the SIGTERM Ray sends a stopped trial's workers.
STOPPED_MID_STEP = textwrap.dedent("""
    import glob, json, os, signal, sys, threading, time
    import ray

    temp_dir = sys.argv[1]
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)

    @ray.remote(num_cpus=0)
    class Fold:
        def start(self, as_raycv):
            import torch
            from raycv import worker
            ready, found = threading.Event(), {}

            def train():
                if as_raycv:
                    worker.mark_training_thread()
                    found["copy"] = worker.checkpoint_dir("t_00000", "fold_0.pt")
                q = torch.randn(4, 2, 128, 32)
                ready.set()
                while True:
                    torch.nn.functional.scaled_dot_product_attention(q, q, q)

            threading.Thread(target=train, daemon=True).start()
            ready.wait()
            return os.getpid(), found.get("copy")

    folds = [Fold.remote(), Fold.remote()]
    started = ray.get([fold.start.remote(as_raycv) for fold, as_raycv in zip(folds, (False, True))])
    time.sleep(2)
    for pid, _ in started:
        os.kill(pid, signal.SIGTERM)
    session = max(glob.glob(os.path.join(temp_dir, "session_2*")))
    for pid, _ in started:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
    time.sleep(1)  # the log monitor has the last lines
    out = []
    for pid, copy in started:
        logs = "".join(open(f, errors="replace").read() for f in glob.glob(f"{session}/logs/worker-*-{pid}.err"))
        out.append({"aborted": "Fatal Python error" in logs or "SIGABRT" in logs,
                    "copy_left": bool(copy) and os.path.exists(copy)})
    print("RESULT", json.dumps(out), flush=True)
    ray.shutdown()
""")


def stopped_mid_step(tmp_path: Path) -> tuple[dict, dict]:
    """One run of STOPPED_MID_STEP: what the unmarked actor and raycv's fold worker left."""
    tmp_path.mkdir()
    script = tmp_path / "stopped_mid_step.py"
    script.write_text(STOPPED_MID_STEP)
    temp_dir = Path(tempfile.mkdtemp(prefix="raycv-stop-"))  # short: Ray's socket paths live under it
    proc = subprocess.Popen([sys.executable, str(script), str(temp_dir)], cwd=REPO_DIR, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=die_with_pytest)
    try:
        out, err = proc.communicate(timeout=150)
    finally:
        kill_group(proc)
        for process in cluster_processes(temp_dir):
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, err[-3000:]
    (line,) = [line for line in out.splitlines() if line.startswith("RESULT ")]
    unmarked, fold_worker = json.loads(line.removeprefix("RESULT "))
    return unmarked, fold_worker


@pytest.mark.timeout(480)
def test_a_fold_worker_stopped_mid_step_leaves_quietly_and_removes_its_checkpoint_copy(tmp_path):
    """Ray stops a stopped trial's fold workers with SIGTERM while their training thread may be mid-step;
    Python's teardown under that thread aborts with a native stack dump on the driver's console (the unmarked
    actor shows that this still happens). raycv's fold worker leaves at once instead, and removes the local
    checkpoint copy whose upload will not finish (a few GB for a large model, left in /tmp otherwise).

    The abort depends on where the thread is when the signal comes: on a loaded machine the unmarked actor
    once exited without it. So up to three tries, until the unmarked actor aborts; raycv's never may."""
    for attempt in range(1, 4):
        unmarked, fold_worker = stopped_mid_step(tmp_path / f"try_{attempt}")
        assert not fold_worker["aborted"] and not fold_worker["copy_left"], attempt
        if unmarked["aborted"]:
            return
    pytest.fail("the scenario no longer aborts without raycv's exit in 3 tries: this test tests nothing")


def test_checkpoint_copies_of_killed_workers_are_removed_once_old(tmp_path, monkeypatch):
    """A fold worker SIGKILLed (out of memory, a lost node) cannot remove its copies; the next fold worker on
    the node removes those whose worker is gone, once they are old enough that no live upload can own them."""
    from raycv import worker

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    dead = tmp_path / f"{worker.CHECKPOINT_DIR_PREFIX}a1b2c_00001-p{dead_pid}-fold1-abc"
    (dead / "fold_1.pt").parent.mkdir()
    (dead / "fold_1.pt").write_bytes(b"x")
    mine = Path(worker.checkpoint_dir("a1b2c_00002", "fold_0.pt"))
    other = tmp_path / "raycv-something-else"
    other.mkdir()
    worker.remove_orphaned_checkpoint_dirs()  # an hour: too young to be an orphan
    assert dead.exists() and mine.exists()
    worker.remove_orphaned_checkpoint_dirs(min_age_s=0)
    assert not dead.exists() and mine.exists() and other.exists()
    worker.remove_checkpoint_dirs_made_here()
    assert not mine.exists()
    # Once a search ends, its driver removes its trials' copies on its node, whoever made them.
    theirs = Path(worker.checkpoint_dir("a1b2c_00003", "fold_2.pt"))
    worker._made_here.clear()  # as if another process had made it
    others = Path(worker.checkpoint_dir("ffff0_00003", "fold_2.pt"))
    assert worker.remove_checkpoint_dirs_of({"a1b2c_00003", "a1b2c_00001"}) == 1
    assert not theirs.exists() and others.exists() and other.exists()
