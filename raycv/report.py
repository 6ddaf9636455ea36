"""A run directory -> report.json, report.md, trials.csv and PNG plots.

    raycv report runs/smoke

Reads only what the run stored (run.json, oof/, curves/, folds.csv, baselines.json, resolved_config.yaml),
so the report can be rebuilt anywhere, without Ray or GPUs. A run that is still going, or was interrupted,
gets a report marked partial, with each trial's state.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import yaml
from pydantic import Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from raycv import RaycvError, first_line, shown
from raycv.collect import STATUSES, RunState, load_run_state, run_file_exists
from raycv.config import Config
from raycv.scoring import (
    STACK_MIN_TRIALS,
    ensemble,
    rmse,
    score_ensemble,
    score_seeds,
    score_trial,
    seed_columns_problem,
    stack,
)
from raycv.storage import RUN_FILES, run_curve_path, run_oof_path, write_all

OPTIMISM_NOTE = (
    "cv_rmse_best takes each fold's predictions at that fold's best evaluation point, chosen on the same "
    "validation rows it is scored on, so it is optimistic; cv_rmse_last (every fold's final point) is the "
    "honest figure for a fixed training length. Trials, the best trial and the ensembles are ranked on "
    "cv_rmse_last."
)
SEED_KEY = "train.seed"


def load_run(run_dir: Path, state: RunState | None = None) -> dict:
    """What the run directory holds; `state` replaces run.json (a fresher view of a running run)."""
    run_dir = Path(run_dir)
    missing = [name for name in RUN_FILES if not run_file_exists(run_dir / name)]
    if missing:
        raise RaycvError(f"{run_dir} is not a raycv run (missing {', '.join(missing)}); run raycv tune first")
    state = state or load_run_state(run_dir)
    oofs, curves = {}, {}
    for trial in state.trials:
        oof_path, curve_path = run_oof_path(run_dir, trial.trial_id), run_curve_path(run_dir, trial.trial_id)
        if run_file_exists(oof_path):
            oofs[trial.trial_id] = read_table(oof_path, OOF_COLUMNS, check=seed_columns_problem)
        if run_file_exists(curve_path):
            curves[trial.trial_id] = read_table(curve_path, CURVE_COLUMNS)
    config = read_run_file(run_dir / "resolved_config.yaml", lambda text: Config.model_validate(yaml.safe_load(text)))
    return {
        "run": state, "trials": state.trials, "oofs": oofs, "curves": curves, "config": config.to_dict(),
        "folds": read_table(run_dir / "folds.csv", FOLDS_COLUMNS),
        "baselines": read_run_file(run_dir / "baselines.json", lambda text: BASELINES.validate_json(text)),
    }


OOF_COLUMNS = ("id", "fold", "target", "pred_best", "pred_last")
CURVE_COLUMNS = ("eval_point", "cv_rmse_last")  # what the report draws
FOLDS_COLUMNS = ("id", "fold")


# No score, target or prediction of a run comes near: beyond it, a squared error or a sum of seconds could
# overflow a float (1e308), and the report would show inf or NaN. A value beyond it is damage, not data.
LARGEST = 1e100
RMSE = Annotated[float, Field(ge=0, le=LARGEST, allow_inf_nan=False)]


class Baseline(TypedDict):
    pooled_rmse: RMSE
    fold_rmse: list[RMSE]


BASELINES = TypeAdapter(dict[str, Baseline])


def read_run_file(path: Path, parse):
    """parse(text) of a run directory's file; what cannot be read or is not what raycv wrote (cut short,
    edited, another file) is one line naming the file."""
    try:
        return parse(path.read_bytes().decode())
    except ValidationError as exc:
        err = exc.errors()[0]
        reason = f"{'.'.join(map(str, err['loc'])) or 'the top'}: {err['msg']}"
    # JSON, CSV and decoding errors too; RecursionError: JSON or YAML nested thousands deep
    except (OSError, ValueError, TypeError, KeyError, RecursionError, yaml.YAMLError) as exc:
        reason = first_line(exc)
    raise RaycvError(f"{path}: not what raycv wrote ({reason}); it may be cut short or edited")


def read_table(path: Path, columns: tuple[str, ...], rows: int = 1,
               check: Callable[[pd.DataFrame], str | None] | None = None) -> pd.DataFrame:
    """A CSV of the run with `columns` (numbers, but `id`) and at least `rows` rows, in which `check` finds no
    problem; else one line naming it."""
    def parse(text: str) -> pd.DataFrame:
        frame = pd.read_csv(io.StringIO(text), dtype={"id": str})
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"no column {', '.join(missing)}")
        if len(frame) < rows:
            raise ValueError("no rows")
        # what is scored besides the columns named: every seed's own predictions (pred_last_seed0, ...)
        numbers = frame[[c for c in columns if c != "id"] + [c for c in frame.columns if c.startswith("pred_")
                                                             and c not in columns]]
        if not all(pd.api.types.is_numeric_dtype(t) for t in numbers.dtypes):
            raise ValueError(f"{', '.join(numbers.columns)} must be numbers")
        bad = ~(np.isfinite(numbers) & (numbers.abs() <= LARGEST))  # NaN, inf, or a square that overflows
        if bad.any().any():
            column = bad.any().idxmax()
            row = int(bad[column].to_numpy().argmax())
            raise ValueError(f"{column} on line {row + 2} is {float(numbers[column].iloc[row]):g}; it must be a finite "
                             f"number of magnitude {LARGEST:g} at most")
        if "id" in columns and (frame["id"].isna().any() or frame["id"].duplicated().any()):
            raise ValueError("an id is empty or repeated")
        problem = check(frame) if check else None
        if problem:
            raise ValueError(problem)
        return frame

    return read_run_file(path, parse)


NO_SCORES = {f"{name}_{which}": None for name in ("cv_rmse", "fold_rmse") for which in ("last", "best")}
NO_SEED_SCORES = {f"seed_rmse_{which}{end}": None for which in ("last", "best") for end in ("", "_range")}
SEEDS_NOTE = (
    "With search.seeds_per_trial K > 1 every fold of a trial trains under K seeds; a trial's predictions (and "
    "cv_rmse_last, cv_rmse_best, the per-fold RMSEs, the ensembles and what ASHA ranked on) are the mean over "
    "its seeds. seed_rmse_last / seed_rmse_best: each seed's own pooled RMSE; *_range: their spread, max - min. "
    "seeds: the train.seed each seed trained with (seed 0 is the trial's train.seed)."
)


def build_report(loaded: dict) -> dict:
    run, oofs = loaded["run"], loaded["oofs"]
    trials = []
    for trial in loaded["trials"]:
        row = {key: getattr(trial, key)
               for key in ("trial_id", "params", "status", "eval_points", "reason", "restarts", "points_redone")}
        row.update(score_trial(oofs[trial.trial_id]) if trial.trial_id in oofs else NO_SCORES)
        row["seeds"] = trial.seeds
        row.update(score_seeds(oofs[trial.trial_id]) if trial.trial_id in oofs else NO_SEED_SCORES)
        trials.append(row)
    trials.sort(key=lambda t: (t["cv_rmse_last"] is None, t["cv_rmse_last"] or 0.0))
    # Only trials that ran to the end compete: a stopped trial's early, optimistic point is no fair rival.
    finished = [t for t in trials if t["status"] == "finished" and t["cv_rmse_last"] is not None]
    k = loaded["config"]["run"]["ensemble_top_k"]
    top_k = {"k": k, "trials": [t["trial_id"] for t in finished[:k]], **NO_SCORES}
    if top_k["trials"]:
        top_k.update(score_ensemble([oofs[m] for m in top_k["trials"]]))
    return {
        "run": run.name, "state": run.state, "partial": run.state != "finished",
        "rows": int(len(loaded["folds"])), "num_folds": int(loaded["folds"]["fold"].nunique()),
        "num_points": run.num_points, "max_t": run.max_t, "scheduler": run.scheduler,
        "searched": run.searched, "seeds_per_trial": loaded["config"]["search"]["seeds_per_trial"],
        "seeds_note": SEEDS_NOTE, "trials": trials, "best_trial": finished[0]["trial_id"] if finished else None,
        "top_k_ensemble": top_k, "stacked_ensemble": stacked_ensemble(finished, oofs),
        "seed_ensembles": seed_ensembles(finished, run.searched, oofs),
        "cost": run_cost(loaded, [t["trial_id"] for t in trials]),
        "baselines": loaded["baselines"], "note": OPTIMISM_NOTE,
    }


STACK_METHOD = ("non-negative least squares with a free intercept (scikit-learn LinearRegression(positive=True)) "
                "on the finished trials' last-point OOF predictions; cv_rmse_last: each fold predicted with weights "
                "fit on the other folds' rows only")


def stacked_ensemble(finished: list[dict], oofs: dict) -> dict:
    """Every finished trial's last-point OOF predictions, stacked (scoring.stack): the honest CV, and the weights
    fit on all rows that `raycv predict --trials stacked` uses. Fewer than two finished trials: no score, a reason."""
    members = [t["trial_id"] for t in finished]
    entry = {"trials": members, "num_trials": len(members), "num_weighted": None, "cv_rmse_last": None,
             "fold_rmse_last": None, "weights": None, "intercept": None, "in_sample_rmse": None, "rows": None,
             "fold_weights": None, "method": STACK_METHOD, "reason": None}
    if len(members) < STACK_MIN_TRIALS:
        entry["reason"] = (f"{len(members)} finished trial(s) with predictions; stacking needs {STACK_MIN_TRIALS} "
                           "or more")
        return entry
    try:
        entry.update(stack({m: oofs[m] for m in members}))
    except ValueError as exc:  # OOF tables edited by hand: no rows or folds in common, values not finite
        why = first_line(exc)
        entry["reason"] = f"cannot stack the finished trials: {why}"
        return entry
    entry["num_weighted"] = sum(weight > 0 for weight in entry["weights"].values())
    return entry


# ---------------------------------------------------------------- what the run cost

COST_NOTE = (
    "Resources times wall time: each trial holds num_folds x seeds_per_trial fold workers (search.seeds_per_trial; "
    "one per fold and seed) of resources.cpus_per_fold CPUs and "
    "resources.gpus_per_fold GPUs for its wall time, from when the search started it (the fold workers' start-up "
    "included) to its last evaluation point. A trial that was interrupted and resumed, or whose start was not "
    "recorded, counts its fold workers' training time from its curve only (wall_s_source curve): start-up and "
    "the time between sessions are left out. ASHA saved the evaluation points its stopped trials did not train, "
    "against every finished or stopped trial run to max_t, costed at the run's mean seconds per trained point."
)


def _numbers(curve: pd.DataFrame, *columns: str) -> np.ndarray | None:
    """The curve's columns summed as floats; None where one is missing or not a finite number (or beyond
    LARGEST: seconds no run takes, whose sums would overflow)."""
    if not set(columns) <= set(curve.columns):
        return None
    try:
        values = [pd.to_numeric(curve[c], errors="coerce").to_numpy(dtype=float) for c in columns]
    except (OverflowError, TypeError, ValueError):  # an integer of 400 digits fits no float
        return None
    if not all(np.isfinite(v).all() and (np.abs(v) <= LARGEST).all() for v in values):
        return None
    return sum(values)


def trial_wall_s(started_s: float | None, curve: pd.DataFrame | None) -> tuple[float | None, str | None]:
    """(a trial's wall time, how it was measured) from its curve, whose rows have rank 0's clock since its
    training loop began (fold_busy_s + fold_callbacks_s; a restarted worker's begins again at 0) and the wall
    clock once every fold reached the point (reported_at). Each session of the fold workers runs from its loop's
    start to its last point; with the trial's start (`started_s`) the first runs from there instead, so starting
    Ray Train's fold workers and building the models count: "trial start". Without it: "curve", the sessions'
    loops only. (None, None) without a curve."""
    elapsed = None if curve is None or not len(curve) else _numbers(curve, "fold_busy_s", "fold_callbacks_s")
    if elapsed is None:
        return None, None
    starts = [0] + [i + 1 for i in range(len(elapsed) - 1) if elapsed[i + 1] < elapsed[i]]
    ends = [s - 1 for s in starts[1:]] + [len(elapsed) - 1]
    reported = _numbers(curve, "reported_at")
    if reported is None:  # a curve without the wall clock: the loops' own times
        return float(sum(elapsed[e] for e in ends)), "curve"
    sessions = float(sum(reported[e] - (reported[s] - elapsed[s]) for s, e in zip(starts, ends, strict=True)))
    if started_s is None:
        return sessions, "curve"
    return sessions + max(float(reported[0] - elapsed[0]) - started_s, 0.0), "trial start"


def _product(*factors: float | None) -> float | None:
    """The product, or None where a factor is unknown (no wall time, no price, gpus_per_fold auto)."""
    return None if any(f is None for f in factors) else math.prod(factors)


def run_cost(loaded: dict, order: list[str]) -> dict:
    """Per trial (in `order`) and in total: wall time, worker-, CPU- and GPU-seconds, evaluation points; what
    ASHA saved; with run.gpu_hour_price, GPU time in money. Totals are the sums of the trials' rows."""
    config, max_t = loaded["config"], loaded["run"].max_t
    num_folds, seeds = config["data"]["num_folds"], config["search"]["seeds_per_trial"]
    folds, cpus = num_folds * seeds, float(config["resources"]["cpus_per_fold"])  # a trial's workers
    gpus = config["resources"]["gpus_per_fold"]
    gpus = None if gpus == "auto" else float(gpus)  # auto is resolved before a run writes its config
    price = config["run"].get("gpu_hour_price")
    records = {record.trial_id: record for record in loaded["trials"]}
    rows = []
    for trial_id in order:
        record = records[trial_id]
        wall, source = trial_wall_s(record.started_s, loaded["curves"].get(trial_id))
        gpu_s = _product(folds, gpus, wall)
        rows.append({
            "trial_id": trial_id, "status": record.status, "wall_s": wall, "wall_s_source": source,
            "worker_s": _product(folds, wall), "cpu_s": _product(folds, cpus, wall), "gpu_s": gpu_s,
            "gpu_cost": _product(gpu_s, price, 1 / 3600),
            "eval_points": record.eval_points, "points_trained": record.eval_points + record.points_redone,
        })
    total = {key: sum(row[key] or 0 for row in rows)
             for key in ("wall_s", "worker_s", "cpu_s", "gpu_s", "eval_points", "points_trained")}
    total["gpu_hours"] = total["gpu_s"] / 3600
    total["gpu_cost"] = _product(total["gpu_hours"], price)
    total["trials"], total["trials_without_wall_time"] = len(rows), [r["trial_id"] for r in rows if r["wall_s"] is None]
    timed = [r for r in rows if r["wall_s"] is not None]
    timed_points = sum(r["points_trained"] for r in timed)
    per_point = {key: sum(r[key] or 0 for r in timed) / timed_points if timed_points else None
                 for key in ("worker_s", "gpu_s")}
    ran = [r for r in rows if r["status"] in ("finished", "stopped")]
    full, saved = max_t * len(ran), sum(max(max_t - r["eval_points"], 0) for r in ran if r["status"] == "stopped")
    hours = lambda per: None if per is None else saved * per / 3600  # noqa: E731
    asha = {
        "scheduler": loaded["run"].scheduler,  # with none, nothing stops a trial early: nothing saved
        "points_if_all_ran_to_max_t": full, "points_reached": sum(r["eval_points"] for r in ran),
        "points_saved": saved, "fraction_saved": saved / full if full else None,
        "worker_s_per_point": per_point["worker_s"], "gpu_s_per_point": per_point["gpu_s"],
        "worker_hours_saved": hours(per_point["worker_s"]), "gpu_hours_saved": hours(per_point["gpu_s"]),
    }
    asha["gpu_cost_saved"] = _product(asha["gpu_hours_saved"], price)
    return {"resources": {"num_folds": num_folds, "seeds_per_trial": seeds, "workers_per_trial": folds,
                          "cpus_per_fold": cpus, "gpus_per_fold": gpus, "max_t": max_t,
                          "gpu_hour_price": price},
            "trials": rows, "total": total, "asha_saved": asha, "note": COST_NOTE}


def seed_ensembles(finished: list[dict], searched: list[str], oofs: dict) -> list[dict]:
    """Finished trials that share every searched value but the seed, averaged: one entry per such group of
    two or more, best first. Only where the seed is searched (otherwise equal values mean equal runs)."""
    if SEED_KEY not in searched:
        return []
    groups: dict[str, list[dict]] = {}
    for trial in finished:
        shared = {key: value for key, value in trial["params"].items() if key != SEED_KEY}
        groups.setdefault(json.dumps(shared, sort_keys=True), []).append(trial)
    entries = [
        {"params": json.loads(shared), "trials": [t["trial_id"] for t in members],
         **score_ensemble([oofs[t["trial_id"]] for t in members])}
        for shared, members in groups.items() if len(members) >= 2
    ]
    return sorted(entries, key=lambda entry: entry["cv_rmse_last"])


def write_report(run_dir: Path, state: RunState | None = None) -> dict:
    """Write every report file, or none of them (write_all); returns their paths and the report itself."""
    run_dir = Path(run_dir)
    loaded = load_run(run_dir, state)
    report = build_report(loaded)
    plots, images = render_plots(loaded, report)
    write_all(run_dir, {"report.json": json_text(report).encode(),
                        "trials.csv": trials_table(report).to_csv(index=False).encode(),
                        **images, "report.md": markdown(report, plots).encode()})
    files = [run_dir / name for name in ("report.md", "report.json", "trials.csv", *plots.values())]
    return {
        "report": report, "report_md": run_dir / "report.md", "report_json": run_dir / "report.json", "plots": plots,
        "files": files,  # every file written, for whoever ships the report elsewhere (MLflow)
        "summary": summary(report),  # what `raycv tune` prints about the stacked ensemble and the cost
    }


def json_text(report: dict) -> str:
    """report.json: standard JSON, whatever the run's files held (json.dumps writes NaN and Infinity, which
    JSON has not)."""
    return json.dumps(_finite(report), indent=2, allow_nan=False)


def _finite(value):
    """`value` with every float that is not finite as None: a figure that overflowed (a config's price or
    shares edited to 1e308) is as unknown as one never measured, which report.json writes as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def trials_table(report: dict) -> pd.DataFrame:
    """One flat row per trial: params as columns, per-fold RMSEs as columns."""
    rows = []
    for t in report["trials"]:
        row = {"trial_id": t["trial_id"], "status": t["status"], "eval_points": t["eval_points"],
               "restarts": t["restarts"], "points_redone": t["points_redone"],
               "cv_rmse_last": t["cv_rmse_last"], "cv_rmse_best": t["cv_rmse_best"]}
        row.update({f"param.{k}": v for k, v in t["params"].items()})
        for which in ("last", "best"):
            for fold, value in enumerate(t["fold_rmse_" + which] or []):
                row[f"fold_{fold}_rmse_{which}"] = value
        if report["seeds_per_trial"] > 1:  # each seed's own pooled RMSE, and their spread (max - min)
            row["seeds"] = " ".join(map(str, t["seeds"]))
            for which in ("last", "best"):
                for k, value in enumerate(t[f"seed_rmse_{which}"] or []):
                    row[f"seed_{k}_rmse_{which}"] = value
                row[f"seed_rmse_{which}_range"] = t[f"seed_rmse_{which}_range"]
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 else f"{value:.{digits}f}"
    return str(value)


def _ensemble_line(entry: dict) -> str:
    return (f"{', '.join(entry['trials'])}: CV RMSE {_fmt(entry['cv_rmse_last'])} (last points), "
            f"{_fmt(entry['cv_rmse_best'])} (best points); per fold (last) "
            + " / ".join(f"{v:.3f}" for v in entry["fold_rmse_last"]))


def markdown(report: dict, plots: dict[str, str]) -> str:
    searched = report["searched"]
    lines = [
        f"# CV report: {report['run']}", "",
        f"{report['rows']} rows, {report['num_folds']} folds, {report['num_points']} evaluation points per trial, "
        f"scheduler {report['scheduler']}. RMSEs are pooled over all out-of-fold rows unless marked per fold; "
        "trials are ranked on the last point.", "",
    ]
    if report["partial"]:
        counts = {s: sum(t["status"] == s for t in report["trials"]) for s in STATUSES}
        lines += [
            f"**Partial report: the run is {report['state']}** ("
            + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "). "
            + ("Continue it with `raycv tune ... --resume`." if report["state"] == "interrupted" else
               "Rebuild it any time with `raycv report RUN_DIR`."), "",
        ]
    lines += [
        "## Leaderboard", "",
        "| " + " | ".join(["trial", *searched]) + " | status | points | CV RMSE (last point) | CV RMSE (best point) | "
        "per-fold RMSE (last) | fold mean ± std (last) |",
        "|" + "---|" * (len(searched) + 7),
    ]
    for t in report["trials"]:
        per_fold = " / ".join(f"{v:.3f}" for v in t["fold_rmse_last"]) if t["fold_rmse_last"] else "-"
        spread = (f"{t['fold_rmse_last_mean']:.4f} ± {t['fold_rmse_last_std']:.4f}"
                  if t.get("fold_rmse_last_mean") is not None else "-")
        status = t["status"] + (f" ({t['reason']})" if t["reason"] else "")
        if t["restarts"]:
            status += f"; resumed {t['restarts']}x from fold checkpoints, {t['points_redone']} point(s) redone"
        lines.append(
            "| " + " | ".join([t["trial_id"], *(_fmt(t["params"].get(k)) for k in searched)])
            + f" | {status} | {t['eval_points']} | {_fmt(t['cv_rmse_last'])} | {_fmt(t['cv_rmse_best'])} "
            f"| {per_fold} | {spread} |"
        )
    best = next((t for t in report["trials"] if t["trial_id"] == report["best_trial"]), None)
    lines += ["", "## Best trial", ""]
    if best:
        lines.append(f"**{best['trial_id']}** (the finished trial with the lowest last-point CV RMSE): "
                     f"{_fmt(best['cv_rmse_last'])} at the last point, {_fmt(best['cv_rmse_best'])} at the best "
                     f"point; params {best['params']}.")
    else:
        lines.append("No trial ran to the end.")
    top_k = report["top_k_ensemble"]
    lines += ["", "## Top-k ensemble", ""]
    if top_k["trials"]:
        lines.append(f"Average of the OOF predictions of the top {len(top_k['trials'])} finished trial(s) "
                     f"(k = {top_k['k']}), whatever their searched values: " + _ensemble_line(top_k) + ".")
    else:
        lines.append("No finished trial to ensemble.")
    if report["seeds_per_trial"] > 1:
        lines += ["", "## Seeds per trial", ""] + seed_lines(report)
    lines += ["", "## Stacked ensemble", ""] + stacked_lines(report)
    lines += ["", "## Seed ensembles", ""]
    if report["seed_ensembles"]:
        lines.append("Finished trials that share every searched value but `train.seed`, averaged:")
        lines += [""] + [f"- {entry['params']}: " + _ensemble_line(entry) for entry in report["seed_ensembles"]]
    else:
        lines.append("None: no two finished trials share every searched value but the seed"
                     + ("." if SEED_KEY in searched else " (train.seed is not searched)."))
    lines += ["", "## Baselines on the same folds", "", "| baseline | CV RMSE | per-fold RMSE |", "|---|---|---|"]
    names = {"mean": "predict the training folds' mean", "tfidf_ridge": "TF-IDF (1-2 grams) + ridge"}
    for key, value in report["baselines"].items():
        lines.append(f"| {names.get(key, key)} | {value['pooled_rmse']:.4f} | "
                     f"{' / '.join(f'{v:.3f}' for v in value['fold_rmse'])} |")
    lines += ["", "## Cost", ""] + cost_lines(report["cost"])
    lines += ["", f"Note: {report['note']}", "", "## Plots", ""]
    lines += [f"![{title}]({name})" for title, name in plots.items()]
    return "\n".join(lines) + "\n"


def seed_lines(report: dict) -> list[str]:
    """Per trial: the seed-mean's pooled RMSE, each seed's own and their spread (search.seeds_per_trial > 1)."""
    k = report["seeds_per_trial"]
    lines = [
        f"Every fold of a trial trained under {k} seeds; a trial's predictions are the mean over its seeds, and "
        "that seed-mean is what the leaderboard, the ensembles and ASHA rank. Spread: max - min of the seeds' own "
        "pooled RMSEs.", "",
        "| trial | seeds (train.seed) | seed-mean CV RMSE (last) | seed-mean CV RMSE (best) | per-seed CV RMSE (last) "
        "| spread (last) | per-seed CV RMSE (best) | spread (best) |",
        "|" + "---|" * 8,
    ]
    for t in report["trials"]:
        per_seed = {which: " / ".join(f"{v:.4f}" for v in t[f"seed_rmse_{which}"]) if t[f"seed_rmse_{which}"] else "-"
                    for which in ("last", "best")}
        lines.append(f"| {t['trial_id']} | {', '.join(map(str, t['seeds'])) or '-'} | {_fmt(t['cv_rmse_last'])} | "
                     f"{_fmt(t['cv_rmse_best'])} | {per_seed['last']} | {_fmt(t['seed_rmse_last_range'])} | "
                     f"{per_seed['best']} | {_fmt(t['seed_rmse_best_range'])} |")
    return lines


def stacked_lines(report: dict) -> list[str]:
    """The stacked ensemble beside the best trial and the top-k ensemble, and its weights."""
    stacked = report["stacked_ensemble"]
    if stacked["cv_rmse_last"] is None:
        return [f"None: {stacked['reason']}."]
    best = next(t for t in report["trials"] if t["trial_id"] == report["best_trial"])
    lines = [
        f"All {stacked['num_trials']} finished trials stacked ({stacked['num_weighted']} with a weight above 0): "
        f"{stacked['method']}.", "",
        "| predictions | CV RMSE (last point) | per-fold RMSE (last) |", "|---|---|---|",
        f"| best trial {best['trial_id']} | {_fmt(best['cv_rmse_last'])} | "
        + " / ".join(f"{v:.3f}" for v in best["fold_rmse_last"]) + " |",
        f"| top-{len(report['top_k_ensemble']['trials'])} ensemble (average) | "
        f"{_fmt(report['top_k_ensemble']['cv_rmse_last'])} | "
        + " / ".join(f"{v:.3f}" for v in report["top_k_ensemble"]["fold_rmse_last"]) + " |",
        f"| stacked ensemble (weights fit on the other folds) | {_fmt(stacked['cv_rmse_last'])} | "
        + " / ".join(f"{v:.3f}" for v in stacked["fold_rmse_last"]) + " |",
        "", f"Weights fit on all {stacked['rows']} rows (what `raycv predict --trials stacked` uses): intercept "
        f"{stacked['intercept']:.4f}; " + ", ".join(f"{t} {w:.4f}" for t, w in stacked["weights"].items())
        + f". Scored on the rows they were fit on (optimistic): {_fmt(stacked['in_sample_rmse'])}.",
    ]
    return lines


def _hours(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:.3g} h"


def cost_lines(cost: dict) -> list[str]:
    res, total, asha, price = cost["resources"], cost["total"], cost["asha_saved"], cost["resources"]["gpu_hour_price"]
    money, gpus = price is not None, res["gpus_per_fold"]
    lines = [
        f"Each trial holds {res['workers_per_trial']} fold workers"
        + (f" ({res['num_folds']} folds x {res['seeds_per_trial']} seeds)" if res["seeds_per_trial"] > 1 else "")
        + f" of {res['cpus_per_fold']:g} CPU and "
        f"{'auto' if gpus is None else format(gpus, 'g')} GPU"
        + (f"; a GPU-hour costs {price:g}." if money else "."), "",
        "| trial | status | wall time | worker-hours | GPU-hours | " + ("GPU cost | " if money else "")
        + "points reached | points trained |",
        "|" + "---|" * (7 + money),
    ]
    for row in cost["trials"] + [{**total, "trial_id": "**total**", "status": "-", "wall_s_source": None}]:
        wall = "-" if row["wall_s"] is None else f"{row['wall_s']:.0f} s" + (
            " (curve)" if row["wall_s_source"] == "curve" else "")
        lines.append(f"| {row['trial_id']} | {row['status']} | {wall} | {_hours(row['worker_s'])} | "
                     f"{_hours(row['gpu_s'])} | " + (f"{_fmt(row['gpu_cost'])} | " if money else "")
                     + f"{row['eval_points']} | {row['points_trained']} |")
    lines.append("")
    if asha["scheduler"] != "asha":
        lines.append(f"Scheduler {asha['scheduler']}: every trial runs to max_t, nothing is stopped early.")
    elif asha["fraction_saved"] is None:
        lines.append("ASHA saved nothing to count: no trial finished or was stopped.")
    else:
        lines.append(
            f"ASHA saved {asha['points_saved']} of {asha['points_if_all_ran_to_max_t']} evaluation points "
            f"({asha['fraction_saved']:.0%}) against every finished or stopped trial run to max_t = {res['max_t']}: "
            f"{_hours(None if asha['worker_hours_saved'] is None else asha['worker_hours_saved'] * 3600)} of "
            f"workers, {_hours(None if asha['gpu_hours_saved'] is None else asha['gpu_hours_saved'] * 3600)} of GPUs"
            + (f", {_fmt(asha['gpu_cost_saved'])} in money" if money else "") + ".")
    if total["trials_without_wall_time"]:
        lines.append(f"No wall time for {', '.join(total['trials_without_wall_time'])} (counted as 0).")
    return lines + ["", cost["note"]]


def summary(report: dict) -> str:
    """The lines `raycv tune` ends with about the stacked ensemble and the cost (beside the best trial's)."""
    stacked, cost = report["stacked_ensemble"], report["cost"]
    total, asha = cost["total"], cost["asha_saved"]
    lines = [f"stacked ensemble of {stacked['num_trials']} trials: cv_rmse_last {stacked['cv_rmse_last']:.4f} "
             f"(weights fit on the other folds), {stacked['num_weighted']} weighted"
             if stacked["cv_rmse_last"] is not None else f"stacked ensemble: none ({stacked['reason']})"]
    price = cost["resources"]["gpu_hour_price"]
    line = (f"cost: {total['worker_s'] / 3600:.3g} worker-hours, {total['gpu_hours']:.3g} GPU-hours"
            + (f" ({total['gpu_cost']:.2f} at {price:g} per GPU-hour)" if price is not None else "")
            + f", {total['points_trained']} evaluation points trained")
    if asha["scheduler"] == "asha" and asha["fraction_saved"] is not None:
        line += (f"; ASHA saved {asha['points_saved']} of {asha['points_if_all_ran_to_max_t']} points "
                 f"({asha['fraction_saved']:.0%}), {asha['gpu_hours_saved'] or 0:.3g} GPU-hours")
    return "\n".join([*lines, line])


def _plottable(values: list) -> list:
    """A searched key's values as the hyperparameter plot's x: floats where every one is a number within
    LARGEST or missing (NaN: not drawn); else each as short text, a category (a choice of words, or values of
    mixed or odd types in a run.json edited by hand: a dict, a 400-digit number)."""
    def number(value) -> float | None:
        if value is None:
            return math.nan
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        try:
            value = float(value)
        except OverflowError:
            return None
        return value if math.isfinite(value) and abs(value) <= LARGEST else None

    numbers = [number(value) for value in values]
    if all(n is not None for n in numbers):
        return numbers
    return [_label(value if isinstance(value, str) else shown(value))[:40] for value in values]


def _label(text: str) -> str:
    """Text for a plot: a $ would start matplotlib's mathtext (an unbalanced one in a trial id is a ValueError)."""
    return str(text).replace("$", r"\$")


def render_plots(loaded: dict, report: dict) -> tuple[dict[str, str], dict[str, bytes]]:
    """The report's PNG plots, in memory: ({title: file name}, {file name: PNG bytes})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    plots, images = {}, {}
    trials = {t["trial_id"]: t for t in report["trials"]}

    def save(fig, name: str, title: str):
        image = io.BytesIO()
        fig.savefig(image, dpi=110, bbox_inches="tight", format="png")
        plt.close(fig)
        plots[title], images[name] = name, image.getvalue()

    # Predicted versus target at the last point: the best trial and the top-k ensemble.
    panels = []
    if report["best_trial"]:
        panels.append((f"best trial {report['best_trial']}", loaded["oofs"][report["best_trial"]]))
    members = report["top_k_ensemble"]["trials"]
    if members:
        panels.append((f"top-{len(members)} ensemble", ensemble([loaded["oofs"][m] for m in members])))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
        for ax, (title, oof) in zip(axes[0], panels, strict=True):
            ax.scatter(oof["target"], oof["pred_last"], s=6, alpha=0.5)
            low, high = oof["target"].min(), oof["target"].max()
            ax.plot([low, high], [low, high], color="black", linewidth=1)
            ax.set(title=_label(f"{title}: RMSE {rmse(oof, 'pred_last'):.4f}"), xlabel="target",
                   ylabel="out-of-fold prediction (last point)")
        save(fig, "pred_vs_target.png", "Predicted versus target")

    # Pooled last-point RMSE versus evaluation point for every trial; an x marks where ASHA stopped a trial.
    if loaded["curves"]:
        fig, ax = plt.subplots(figsize=(7, 4.6))
        for trial_id, curve in sorted(loaded["curves"].items()):
            line, = ax.plot(curve["eval_point"], curve["cv_rmse_last"], marker=".", label=_label(trial_id))
            if trials.get(trial_id, {}).get("status") == "stopped":
                ax.plot(curve["eval_point"].iloc[-1], curve["cv_rmse_last"].iloc[-1], "x", color=line.get_color(),
                        markersize=10)
        for name, value in report["baselines"].items():
            ax.axhline(value["pooled_rmse"], linestyle="--", color="grey", linewidth=1)
            ax.annotate(_label(name), (1, value["pooled_rmse"]), fontsize=8, color="grey")
        stopped = " (x: stopped by ASHA)" if report["scheduler"] == "asha" else ""
        ax.set(xlabel="evaluation point", ylabel="pooled OOF RMSE (cv_rmse_last)",
               title=f"Trials over evaluation points{stopped}")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if len(loaded["curves"]) <= 12:
            ax.legend(fontsize=7)
        save(fig, "cv_rmse_curves.png", "Pooled RMSE versus evaluation point")

    # Last-point RMSE by searched hyperparameter.
    scored = [t for t in report["trials"] if t["cv_rmse_last"] is not None]
    if report["searched"] and scored:
        keys = report["searched"]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            # A partial report's trials may be running or interrupted (at their last point so far): shown too.
            xs = _plottable([t["params"].get(key) for t in scored])
            for status in dict.fromkeys(t["status"] for t in scored):
                points = [(x, t["cv_rmse_last"]) for x, t in zip(xs, scored, strict=True) if t["status"] == status]
                ax.scatter(*zip(*points, strict=True), marker={"finished": "o", "stopped": "x"}.get(status, "."),
                           label=status)
            values = [x for x in xs if isinstance(x, float) and not math.isnan(x)]
            if values and min(values) > 0 and max(values) / min(values) > 20:
                ax.set_xscale("log")
            ax.set(xlabel=_label(key), ylabel="CV RMSE (last point)")
            ax.legend(fontsize=7)
        save(fig, "rmse_by_param.png", "RMSE by searched hyperparameter")
    return plots, images
