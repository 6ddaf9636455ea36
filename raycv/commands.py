"""What each `raycv` subcommand does; `cli.py` parses the line and turns RaycvError into exit status 2.

Human output lives here (and in the Tune driver): the library modules only log.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

from raycv import RaycvError, attempt
from raycv.config import dump_yaml
from raycv.spaces import BUNDLED_SPACES_DIR, ConfigError, list_spaces, load_config, resolve_space_path
from raycv.storage import write_all, write_atomic


def validate(args) -> int:
    """Resolved config, rows, fold sizes, token lengths, padding, model size; trains nothing."""
    from raycv.data import bucketed_batches, useful_token_fraction
    from raycv.model import build_model, count_parameters, load_tokenizer
    from raycv.preflight import preflight
    from raycv.train_fold import steps_per_epoch

    config = load_config(args.space, args.overrides)
    plan = preflight(config, str(resolve_space_path(args.space)))
    tokenizer = load_tokenizer(config.model)
    table, tokens = plan.encoded.table, plan.encoded.tokens
    print(dump_yaml(config).rstrip())
    print("---")
    sizes = table["fold"].value_counts().sort_index().tolist()
    print(f"rows: {len(table)} from {config.data.path}")
    print(
        f"folds: {config.data.num_folds} (seed {config.data.fold_seed}), "
        f"validation rows per fold: {'/'.join(map(str, sizes))}"
    )
    full = [len(ids) for ids in tokenizer(table["text"].tolist(), truncation=False)["input_ids"]]
    full = np.array(full)
    lengths = np.array([len(t) for t in tokens])
    print(
        f"tokens per excerpt: mean {full.mean():.0f}, p90 {np.percentile(full, 90):.0f}, max {full.max()}; "
        f"{(full > config.model.max_length).mean():.1%} truncated at max_length {config.model.max_length}"
    )
    batch = config.train.batch_size
    bucketed = useful_token_fraction(lengths, bucketed_batches(lengths, batch, np.random.default_rng(0)),
                                     config.train.pad_to_multiple_of, config.model.max_length)
    fixed = lengths.sum() / (len(lengths) * config.model.max_length)
    print(f"useful-token fraction at batch {batch}: length-bucketed {bucketed:.3f} (widths rounded up to a multiple "
          f"of {config.train.pad_to_multiple_of}), fixed padding {fixed:.3f}")
    train_rows = len(table) - min(sizes)
    print(
        f"per fold: {steps_per_epoch(train_rows, batch)} steps/epoch x {config.train.epochs} epochs, "
        f"{plan.num_points} evaluation points per trial"
    )
    print(f"trials: {config.num_trials} (search.num_samples {config.search.num_samples} x grid points)")
    print(trial_workers_line(config))
    if not args.no_model:
        model = build_model(config.model, seed=0)
        print(
            f"model: {count_parameters(model):,} parameters "
            f"({config.model.backbone.type}, pooling {config.model.pooling})"
        )
    print("ok")
    return 0


def trial_workers_line(config) -> str:
    """What one trial holds: its Ray Train workers (a fold's under each of search.seeds_per_trial seeds) and
    each worker's resources, e.g. "a trial: 6 workers = 3 folds x 2 seeds, each 0.5 CPU, 0 GPU"."""
    res, seeds = config.resources, config.search.seeds_per_trial
    gpus = res.gpus_per_fold if res.gpus_per_fold == "auto" else format(res.gpus_per_fold, "g")
    each = [f"{res.cpus_per_fold:g} CPU", f"{gpus} GPU"]
    each += [f"{amount:g} {name}" for name, amount in res.custom_per_fold.items()]
    return (f"a trial: {config.workers_per_trial} workers = {config.data.num_folds} folds x {seeds} "
            f"seed{'s' if seeds > 1 else ''}, each {', '.join(each)}"
            + (" (resources.gpus_per_fold auto is resolved when the search starts)" if gpus == "auto" else ""))


def spaces(args) -> int:
    """The shipped search spaces, one line each: `spaces/NAME.yaml` and its purpose (its header's first sentence)."""
    listed = list_spaces()
    if not listed:
        raise RaycvError(f"no search spaces found in {BUNDLED_SPACES_DIR}; reinstall raycv")
    width = max(len(f"spaces/{name}") for name, _ in listed)
    for name, purpose in listed:
        print(f"{f'spaces/{name}':<{width}}  {purpose}")
    print(f"(shipped in {BUNDLED_SPACES_DIR}; a file at the path you give wins over them; "
          "check one with raycv validate spaces/NAME.yaml)")
    return 0


def folds(args) -> int:
    from raycv.data import load_folds
    from raycv.preflight import output_problems, replaces_an_input

    out = Path(args.out)
    problems = output_problems("--out", args.out)
    config = attempt(problems, lambda: load_config(args.space, args.overrides, model_files=False))  # data only
    problems += replaces_an_input("--out", out, {"data.path": config.data.path}) if config else []
    table = attempt(problems, lambda: load_folds(config.data)) if config else None
    if problems:
        raise ConfigError(None, problems)
    write_atomic(out, lambda tmp: table[["id", "fold"]].to_csv(tmp, index=False))
    sizes = table["fold"].value_counts().sort_index().tolist()
    print(f"wrote {out}: {len(table)} rows, folds {'/'.join(map(str, sizes))}")
    return 0


def train_fold(args) -> int:
    from raycv.preflight import output_problems, preflight
    from raycv.progress import fold_line
    from raycv.train_fold import split_fold
    from raycv.train_fold import train_fold as run_fold

    problems = output_problems("--out-dir", Path(args.out_dir), FOLD_FILES) if args.out_dir else []
    config = attempt(problems, lambda: load_config(args.space, args.overrides))
    if config is None:
        raise ConfigError(None, problems)
    if not 0 <= args.fold < config.data.num_folds:
        problems.insert(0, f"--fold {args.fold} is out of range; "
                           f"data.num_folds is {config.data.num_folds} (0..{config.data.num_folds - 1})")
    out_dir = Path(args.out_dir or Path(config.run.output_dir) / "train_fold" / f"fold_{args.fold}")
    # (a run.output_dir that is no directory is preflight's line: said once)
    if not args.out_dir and not output_problems("run.output_dir", Path(config.run.output_dir), directory=True):
        problems += output_problems("run.output_dir", out_dir, FOLD_FILES)
    plan = attempt(problems, lambda: preflight(config, str(resolve_space_path(args.space))))
    if problems:
        raise ConfigError(None, problems)
    data = split_fold(plan.encoded, args.fold)
    print(f"fold {args.fold}: {len(data.train_ids)} training rows, {len(data.valid_ids)} validation rows, "
          f"batch {config.train.batch_size}, {config.train.epochs} epochs")
    result = run_fold(config, data, on_eval=lambda point, _: print(fold_line(point), flush=True))
    write_all(out_dir, {"predictions.csv": result.predictions().to_csv(index=False).encode(),  # all or none
                        "curve.csv": pd.DataFrame(result.curve).to_csv(index=False).encode(),
                        "resolved_config.yaml": dump_yaml(config).encode()})
    if result.diverged:  # as a trial of `raycv tune` ends diverged: what it trained is written, the exit says so
        print(f"{result.diverged}; wrote {out_dir} (its predictions from that point on are not finite)")
        return 1
    print(f"fold {args.fold}: best val_rmse {result.best_rmse:.4f}, last {result.last_rmse:.4f}; wrote {out_dir}")
    return 0


def convert_structbert(args) -> int:
    from raycv.model import convert_structbert as convert
    from raycv.model import file_problem, out_dir_problem
    from raycv.preflight import output_problems

    inputs = (args.checkpoint, args.config_json, args.vocab_txt)
    problems = [problem for path in inputs if (problem := file_problem(Path(path).absolute()))]
    out_dir = Path(args.out_dir)  # itself, then where it would be made (under a file, in a folder not writable)
    problems += [f"out_dir: {problem}"] if (problem := out_dir_problem(out_dir)) else \
        output_problems("out_dir", out_dir, directory=True)
    if problems:
        raise ConfigError(None, problems)
    ignored = convert(args.checkpoint, args.config_json, args.vocab_txt, args.out_dir)
    if ignored:
        print(f"ignored {len(ignored)} tensors a BertModel does not use (pretraining heads): {', '.join(ignored[:5])}"
              + (" ..." if len(ignored) > 5 else ""))
    print(f"wrote {args.out_dir}: point a search space at it with model.backbone.type=pretrained "
          f"model.backbone.path={args.out_dir}")
    return 0


def tune(args) -> int:
    from raycv.cluster import address_problem, ray_environment_problems, use_token_auth
    from raycv.preflight import preflight

    address, where = (args.address, "--address") if args.address else (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")
    problems = [problem] if address and (problem := address_problem(address, where)) else []
    problems += ray_environment_problems()
    config = attempt(problems, lambda: load_config(args.space, args.overrides))
    # before Ray, or a GPU, starts
    plan = attempt(problems, lambda: preflight(config, str(resolve_space_path(args.space)))) if config else None
    if problems:
        raise ConfigError(None, problems)
    use_token_auth(args.address)
    from raycv.sweep import run_sweep  # imports Ray, which reads the authentication mode as it loads

    command = ["raycv", "tune", args.space, *args.overrides] + (["--address", args.address] if args.address else [])
    return run_sweep(config, plan, address=args.address, resume=args.resume, command=shlex.join(command))


def report(args) -> int:
    from raycv.collect import refresh_unfinished
    from raycv.report import write_report

    run_dir = Path(args.run_dir)
    state = refresh_unfinished(run_dir)  # a running or interrupted run: what the storage holds now
    paths = write_report(run_dir, state)
    if paths["report"]["partial"]:
        print(f"partial report: the run is {paths['report']['state']}")
    print(f"report: {paths['report_md']}")
    return 0


def predict(args) -> int:
    from raycv.model import file_problem
    from raycv.predict import predict_run
    from raycv.preflight import output_problems, replaces_an_input
    from raycv.report import build_report, load_run

    run_dir, out = Path(args.run_dir), Path(args.out)
    # before it is read: a FIFO as --data waited for a writer for ever, /dev/zero never ended
    problems = [f"--data: {problem}; name the CSV of texts to score"] if (problem := file_problem(args.data)) else []
    problems += output_problems("--out", args.out) + replaces_an_input("--out", out, {"--data": args.data,
                                                                                   "the run": run_dir})
    report = attempt(problems, lambda: build_report(load_run(run_dir)))
    if problems:
        raise ConfigError(None, problems)
    submission, how = predict_run(run_dir, report, args.trials, args.data)
    write_atomic(out, lambda tmp: submission.to_csv(tmp, index=False))
    print(f"wrote {out}: {len(submission)} rows (id,target), {how}")
    return 0


# ---------------------------------------------------------------- every problem at once

FOLD_FILES = ("predictions.csv", "curve.csv", "resolved_config.yaml")  # what train-fold writes in its --out-dir


def bench(args) -> int:
    from raycv.bench import bench as run_bench
    from raycv.cluster import ray_environment_problems

    if problems := ray_environment_problems():
        raise ConfigError(None, problems)
    return run_bench(quick=args.quick, gpu=args.gpu, out=args.out, data=args.data, peak_tflops=args.peak_tflops)
