"""search.seeds_per_trial (issue 20): every fold of a trial trains under K seeds; the trial is their mean.

Fast tests without Ray (validation, the rank -> (fold, seed) mapping, the seeds, validate's line, the
seed-mean table), then one real search with two seeds per trial on the real data and the tiny model, shared
by its assertions: what ASHA saw is the pooled RMSE of the seed-mean, recomputed here from the OOF files.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import root_mean_squared_error

from raycv.cli import main
from raycv.config import Config, fold_and_seed, seed_for
from raycv.scoring import score_seeds, score_trial, seed_mean_table
from raycv.spaces import ConfigError, load_config
from raycv.storage import fold_state_name

from helpers import SPACES_DIR, run_raycv

SMOKE = str(SPACES_DIR / "smoke.yaml")


# ---------------------------------------------------------------- without Ray


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "true"])
def test_a_bad_seeds_per_trial_is_one_line_naming_the_key_and_the_fix(value, train_csv):
    with pytest.raises(ConfigError) as caught:
        load_config(SMOKE, [f"data.path={train_csv}", f"search.seeds_per_trial={value}"], model_files=False)
    (line,) = caught.value.lines()
    assert "search.seeds_per_trial: expected a whole number of seeds, 1 or more; set search.seeds_per_trial=1" in line
    assert "\n" not in line


def test_seeds_per_trial_defaults_to_one_and_is_not_searchable(train_csv):
    assert Config().search.seeds_per_trial == 1
    assert load_config(SMOKE, [f"data.path={train_csv}", "search.seeds_per_trial=3"],
                       model_files=False).search.seeds_per_trial == 3
    with pytest.raises(ConfigError, match="search.params.search.seeds_per_trial: not a searchable key"):
        load_config(SMOKE, [f"data.path={train_csv}", "search.params={search.seeds_per_trial: {grid: [1, 2]}}"],
                    model_files=False)


def test_every_rank_is_one_fold_under_one_seed():
    pairs = [fold_and_seed(rank, 3) for rank in range(6)]
    assert pairs == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert [fold_and_seed(rank, 5) for rank in range(5)] == [(k, 0) for k in range(5)]  # one seed: rank = fold
    names = {fold_state_name(fold, seed, 2) for fold, seed in pairs}
    assert names == {f"fold_{f}_seed{s}.pt" for f in range(3) for s in range(2)}
    assert fold_state_name(2) == fold_state_name(2, 0, 1) == "fold_2.pt"  # one seed: as before


def test_seeds_are_derived_from_train_seed_reproducibly():
    config = Config.model_validate({"train": {"seed": 42}, "search": {"seeds_per_trial": 3}})
    seeds = config.trial_seeds
    assert seeds[0] == 42 and len(set(seeds)) == 3
    assert all(0 <= seed <= 2**32 - 1 for seed in seeds)
    assert Config.model_validate(config.to_dict()).trial_seeds == seeds  # the same on every worker
    assert seeds[1:] == [int(np.random.SeedSequence([42, k]).generate_state(1)[0]) for k in (1, 2)]
    other = Config.model_validate({"train": {"seed": 43}, "search": {"seeds_per_trial": 3}}).trial_seeds
    assert not set(seeds) & set(other)  # neighbouring train.seed values share no seed (seed + k would)
    assert Config().trial_seeds == [Config().train.seed] and seed_for(7, 0) == 7


def test_validate_shows_the_workers_and_resources_of_a_trial(train_csv, capsys):
    common = ["validate", SMOKE, f"data.path={train_csv}", "data.num_folds=3", "resources.cpus_per_fold=0.5",
              "resources.gpus_per_fold=0", "--no-model"]
    assert main([*common, "search.seeds_per_trial=2"]) == 0
    assert "a trial: 6 workers = 3 folds x 2 seeds, each 0.5 CPU, 0 GPU\n" in capsys.readouterr().out
    assert main(common) == 0
    assert "a trial: 3 workers = 3 folds x 1 seed, each 0.5 CPU, 0 GPU\n" in capsys.readouterr().out


def test_the_seed_mean_table_averages_rows_and_keeps_each_seed():
    rng = np.random.default_rng(0)
    base = pd.DataFrame({"id": [f"r{i}" for i in range(30)], "fold": np.arange(30) % 3, "target": rng.normal(size=30)})
    noisy = lambda s: base["target"] + rng.normal(0, s, 30)  # noqa: E731
    seeds = [base.assign(pred_best=noisy(s), pred_last=noisy(s)) for s in (0.3, 0.5)]
    mean = seed_mean_table(seeds)
    assert list(mean.columns) == ["id", "fold", "target", "pred_best", "pred_last", "pred_best_seed0",
                                  "pred_last_seed0", "pred_best_seed1", "pred_last_seed1"]
    assert mean["pred_last"].to_numpy() == pytest.approx((seeds[0]["pred_last"] + seeds[1]["pred_last"]) / 2)
    scores = score_seeds(mean)
    own = [root_mean_squared_error(s["target"], s["pred_last"]) for s in seeds]
    assert scores["seed_rmse_last"] == pytest.approx(own)
    assert scores["seed_rmse_last_range"] == pytest.approx(max(own) - min(own))
    assert seed_mean_table(seeds[:1]) is seeds[0]  # one seed: the table as it was
    one = score_seeds(seeds[0])
    assert one["seed_rmse_last"] == [score_trial(seeds[0])["cv_rmse_last"]] and one["seed_rmse_last_range"] == 0.0


# ---------------------------------------------------------------- one real search, two seeds per trial

SEEDS_RUN_LIMIT_S = 420  # 2 trials x 4 workers: their start-up takes most of it


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory, train_csv):
    """`raycv tune spaces/smoke.yaml search.seeds_per_trial=2`, small: 240 rows in 2 folds, 3 epochs (3
    evaluation points), two learning rates (ASHA stops the slow one at its first point), 4 workers of 0.25 CPU
    per trial (2 folds x 2 seeds: every worker process costs seconds of start-up on 2 cores)."""
    cwd = tmp_path_factory.mktemp("seeds")
    proc = run_raycv(["tune", "spaces/smoke.yaml", f"data.path={train_csv}", "search.seeds_per_trial=2",
                      "search.params={train.lr: {grid: [0.003, 0.0001]}}", "data.max_rows=240", "data.num_folds=2",
                      "train.epochs=3",
                      "scheduler.grace_period=1", "resources.cpus_per_fold=0.25"], cwd=cwd, timeout=SEEDS_RUN_LIMIT_S)
    run_dir = cwd / "runs" / "smoke"
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return {"proc": proc, "cwd": cwd, "run_dir": run_dir, "report": json.loads((run_dir / "report.json").read_text()),
            "oofs": {t: pd.read_csv(run_dir / "oof" / f"{t}.csv", dtype={"id": str})
                     for t in (p.stem for p in (run_dir / "oof").glob("*.csv"))}}


def sk_rmse(oof: pd.DataFrame, column: str) -> float:
    return float(root_mean_squared_error(oof["target"], oof[column]))


@pytest.mark.ray
@pytest.mark.timeout(SEEDS_RUN_LIMIT_S + 60)
def test_the_report_scores_the_seed_mean_and_each_seed_from_the_oof_file(seeds_run):
    report, oofs = seeds_run["report"], seeds_run["oofs"]
    assert report["seeds_per_trial"] == 2 and len(report["trials"]) == 2
    assert sorted(t["status"] for t in report["trials"]) == ["finished", "stopped"]
    for trial in report["trials"]:
        oof = oofs[trial["trial_id"]]
        assert len(oof) == 240 and oof["id"].is_unique
        seed_columns = [f"pred_last_seed{k}" for k in range(2)]
        # the trial's prediction of a row is the mean of its two seeds' predictions
        assert oof["pred_last"].to_numpy() == pytest.approx(oof[seed_columns].mean(axis=1).to_numpy(), abs=1e-12)
        assert trial["cv_rmse_last"] == pytest.approx(sk_rmse(oof, "pred_last"), abs=1e-12)
        assert trial["cv_rmse_best"] == pytest.approx(sk_rmse(oof, "pred_best"), abs=1e-12)
        own = [sk_rmse(oof, column) for column in seed_columns]
        assert trial["seed_rmse_last"] == pytest.approx(own, abs=1e-12)
        assert trial["seed_rmse_best"] == pytest.approx([sk_rmse(oof, f"pred_best_seed{k}") for k in range(2)],
                                                        abs=1e-12)
        assert trial["seed_rmse_last_range"] == pytest.approx(max(own) - min(own), abs=1e-12)
        assert own[0] != pytest.approx(own[1], abs=1e-6)  # two seeds really trained differently
        assert oof["pred_last_seed0"].to_numpy() != pytest.approx(oof["pred_last_seed1"].to_numpy(), abs=1e-6)
    md = (seeds_run["run_dir"] / "report.md").read_text()
    section = md.split("## Seeds per trial", 1)[1].split("\n## ", 1)[0]
    assert "Spread: max - min" in section
    assert sum(line.startswith(f"| {t['trial_id']} |") for t in report["trials"] for line in section.splitlines()) == 2
    trials_csv = pd.read_csv(seeds_run["run_dir"] / "trials.csv")
    assert {"seed_0_rmse_last", "seed_1_rmse_last", "seed_rmse_last_range"} <= set(trials_csv.columns)


@pytest.mark.ray
@pytest.mark.timeout(SEEDS_RUN_LIMIT_S + 60)
def test_the_seeds_are_recorded_in_run_json_and_the_report(seeds_run):
    expected = [42, seed_for(42, 1)]  # smoke.yaml's train.seed; the lr grid leaves it unsearched
    run = json.loads((seeds_run["run_dir"] / "run.json").read_text())
    assert [t["seeds"] for t in run["trials"]] == [expected, expected]
    assert [t["seeds"] for t in seeds_run["report"]["trials"]] == [expected, expected]
    out = seeds_run["proc"].stdout
    assert f"seeds ({expected[0]}, {expected[1]}): cv_rmse_last " in out
    assert "0.25 CPU per fold x 2 seeds: 4 fold workers per trial" in out


@pytest.mark.ray
@pytest.mark.timeout(SEEDS_RUN_LIMIT_S + 60)
def test_asha_ranked_on_the_pooled_rmse_of_the_seed_mean_at_every_point(seeds_run):
    report, run_dir = seeds_run["report"], seeds_run["run_dir"]
    for trial in report["trials"]:
        trial_id = trial["trial_id"]
        records = [json.loads(line) for line in (run_dir / "ray" / "tune" / trial_id / "result.json").read_text()
                   .splitlines()]
        curve = pd.read_csv(run_dir / "curves" / f"{trial_id}.csv")
        assert curve["eval_point"].tolist() == list(range(1, trial["eval_points"] + 1))
        # What Tune saw: every point of a finished trial; of a stopped one, up to the point ASHA stopped it at
        # (its workers may report one more before the stop reaches them: in the curve, not in Tune's records).
        seen = [r["eval_point"] for r in records]
        assert seen == list(range(1, len(seen) + 1)) and 1 <= len(seen) <= len(curve)
        assert len(seen) == len(curve) or trial["status"] == "stopped"
        for record, (_, point) in zip(records, curve.iterrows(), strict=False):
            assert record["cv_rmse"] == record["cv_rmse_last"] == pytest.approx(point["cv_rmse_last"], abs=1e-12)
            seeds = [record[f"seed_{k}_cv_rmse_last"] for k in range(2)]
            assert seeds == pytest.approx([point[f"seed_{k}_cv_rmse_last"] for k in range(2)], abs=1e-12)
            assert all(record["cv_rmse"] != pytest.approx(value, abs=1e-6) for value in seeds)  # not one seed's
        oof = seeds_run["oofs"][trial_id]  # rewritten at every point: the curve's last one
        last = curve.iloc[-1]
        assert last["cv_rmse_last"] == pytest.approx(sk_rmse(oof, "pred_last"), abs=1e-12)
        assert [last[f"seed_{k}_cv_rmse_last"] for k in range(2)] == pytest.approx(
            [sk_rmse(oof, f"pred_last_seed{k}") for k in range(2)], abs=1e-12)
    stopped = next(t for t in report["trials"] if t["status"] == "stopped")
    finished = next(t for t in report["trials"] if t["status"] == "finished")
    first = {t["trial_id"]: pd.read_csv(run_dir / "curves" / f"{t['trial_id']}.csv")["cv_rmse_last"].iloc[0]
             for t in (stopped, finished)}
    assert first[stopped["trial_id"]] > first[finished["trial_id"]]  # ASHA stopped the worse seed-mean
    assert report["best_trial"] == finished["trial_id"]


@pytest.mark.ray
@pytest.mark.timeout(SEEDS_RUN_LIMIT_S + 60)
def test_predict_averages_every_fold_and_seed_model_of_the_best_trial(seeds_run, train_csv, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    run_dir = seeds_run["run_dir"]
    kept = run_dir / "models" / seeds_run["report"]["best_trial"]
    names = sorted(p.name for p in kept.glob("fold_*.safetensors"))
    assert names == sorted(f"fold_{f}_seed{s}.safetensors" for f in range(2) for s in range(2))
    seen = set(pd.read_csv(run_dir / "folds.csv", dtype={"id": str})["id"])
    rows = pd.read_csv(train_csv, dtype={"id": str})
    test = rows[~rows["id"].isin(seen)].head(12)[["id", "excerpt"]]
    test.to_csv(tmp_path / "test.csv", index=False)
    proc = run_raycv(["predict", str(run_dir), "--data", str(tmp_path / "test.csv"),
                      "--out", str(tmp_path / "submission.csv")], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"the average of the 4 fold models of {seeds_run['report']['best_trial']}" in proc.stdout
    submission = pd.read_csv(tmp_path / "submission.csv", dtype={"id": str}).set_index("id")

    # The same average by hand, with transformers alone: smoke.yaml's head is the pooled [CLS] output.
    tokenizer = AutoTokenizer.from_pretrained(kept / "tokenizer")
    batch = tokenizer(test["excerpt"].tolist(), truncation=True, max_length=128, padding=True, return_tensors="pt")
    outputs = []
    for name in names:
        state = load_file(kept / name)
        bert = BertModel(BertConfig.from_json_file(kept / "backbone.json")).eval()
        bert.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
        with torch.no_grad():
            pooled = bert(**batch).pooler_output
        outputs.append((pooled @ state["head.weight"].T + state["head.bias"]).squeeze(-1).numpy())
    assert len(outputs) == 4
    expected = pd.Series(np.mean(outputs, axis=0), index=test["id"].to_numpy())
    assert submission.loc[test["id"], "target"].to_numpy() == pytest.approx(expected.to_numpy(), abs=1e-4)
    # not the average of seed 0's models alone
    seed0 = np.mean([o for o, name in zip(outputs, names, strict=True) if name.endswith("seed0.safetensors")], axis=0)
    assert submission.loc[test["id"], "target"].to_numpy() != pytest.approx(seed0, abs=1e-6)
