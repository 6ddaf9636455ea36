"""The `raycv` command.

    raycv spaces                                       # the shipped search spaces and what each is for
    raycv validate search_spaces/smoke.yaml            # check a space, show data, folds, tokens, model
    raycv folds search_spaces/base.yaml --out folds.csv
    raycv train-fold search_spaces/smoke.yaml --fold 0  # one fold, locally, no Ray
    raycv convert-structbert en_model large_bert_config.json vocab.txt structbert-large/
    raycv tune search_spaces/base.yaml [--address auto]
    raycv report runs/base
    raycv bench [--quick] [--gpu] [--out bench.json] [--data train.csv]
    raycv predict runs/base --data test.csv --out submission.csv [--trials best|top-k|stacked]

Any search space takes `key=value` overrides after it (`data.path=/data/train.csv train.lr=3e-5`).
Bad input of any kind: one line on stderr per problem, exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from importlib import metadata

from raycv import RaycvError, progress, shown

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own two-line usage error -> our one line, exit 2
        raise RaycvError(f"{message} (see {self.prog} --help)")


def _space_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("space", type=_path,
                        help="search-space YAML (a missing spaces/NAME.yaml falls back to the bundled one)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. train.lr=3e-5")


def _path(value: str) -> str:
    """A file or folder argument: an empty one (an unset variable in `--data "$TEST"`) named the working
    folder, or nothing at all, in the error it led to."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty; give a path")
    return value


def _address(value: str) -> str | None:
    """--address: an empty one (an unset variable in `--address "$HEAD"`) is a mistake, not a local Ray;
    "local" is a new local Ray, as for ray.init (the same as no --address)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty; give the cluster's address (auto, HOST:6379 or ray://HOST:10001), "
                                         "or leave --address out for a local Ray")
    return None if value == "local" else value


def build_parser() -> Parser:
    parser = Parser(prog="raycv", description="Ray-orchestrated CV and hyperparameter search for BERT regressors.")
    parser.add_argument("--version", action="version", version=f"raycv {metadata.version('raycv')}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    sub.add_parser("spaces", help="list the shipped search spaces (spaces/NAME.yaml) with what each is for")

    p = sub.add_parser("validate", help="validate a search space; show data, folds, token lengths and the model")
    _space_args(p)
    p.add_argument("--no-model", action="store_true", help="skip building the model (no parameter count)")

    p = sub.add_parser("folds", help="write the fold assignment as id,fold")
    _space_args(p)
    p.add_argument("--out", type=_path, default="folds.csv", help="CSV to write (default folds.csv)")

    p = sub.add_parser("train-fold", help="fine-tune one fold locally (no Ray) and write its predictions")
    _space_args(p)
    p.add_argument("--fold", type=int, required=True, help="fold index, 0..num_folds-1")
    p.add_argument("--out-dir", type=_path, help="where to write (default <run.output_dir>/train_fold/fold_K)")

    p = sub.add_parser("convert-structbert", help="AliceMind StructBERT checkpoint -> transformers directory")
    p.add_argument("checkpoint", type=_path, help="AliceMind's en_model (a torch state dict)")
    p.add_argument("config_json", type=_path, help="AliceMind's large_bert_config.json")
    p.add_argument("vocab_txt", type=_path, help="AliceMind's vocab.txt")
    p.add_argument("out_dir", type=_path, help="new directory for config.json, model.safetensors and the tokenizer")

    p = sub.add_parser("tune", help="run the search: Ray Tune trials, one Ray Train worker per fold")
    _space_args(p)
    p.add_argument("--address", type=_address,
                   help="Ray cluster to join (auto, or ray://...); default: RAY_ADDRESS, else a local Ray")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in the same output directory (same space and overrides)")

    p = sub.add_parser("bench", help="measure raycv against a bare loop, fixed padding and HF Trainer + Ray Tune")
    p.add_argument("--quick", action="store_true", help="every key, roughly, in a minute or two (tiny model)")
    p.add_argument("--gpu", action="store_true", help="the GPU figures only: BERT-large tokens/s and MFU, 5 folds "
                   "sharing one GPU (exit 2 without a GPU)")
    p.add_argument("--out", type=_path, default="bench.json",
                   help="JSON file to write every key to (default bench.json)")
    p.add_argument("--data", type=_path,
                   help="CommonLit train.csv (default: the data.path of the bundled space it uses)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for a GPU not in the table")

    p = sub.add_parser("report", help="rebuild a run's CV report from what it stored (no Ray needed)")
    p.add_argument("run_dir", type=_path, help="the run's output directory, e.g. runs/base")

    p = sub.add_parser("predict", help="score new texts with a run's kept fold models (Kaggle submission format)")
    p.add_argument("run_dir", type=_path, help="the run's output directory, e.g. runs/base")
    p.add_argument("--data", type=_path, required=True,
                   help="CSV with the id and text columns the run was trained with")
    p.add_argument("--out", type=_path, default="submission.csv",
                   help="CSV to write as id,target (default submission.csv)")
    p.add_argument("--trials", choices=["best", "top-k", "stacked"], default="best",
                   help="the best trial's fold models, those of the report's top-k ensemble, or the stacked "
                        "ensemble's weighted trials (default best)")
    return parser


# Every character str.splitlines() breaks at, written as Python writes it in a repr.
# Every character str.splitlines() breaks at, and NUL (a terminal drops it, a log reader stops at it), written
# as Python writes it in a repr.
LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029\x00"}
LINE_MAX = 900  # a line, not the input it quotes: a 100,000-character run.name made a path of that length


def one_line(problem: str) -> str:
    """A problem as one line, whatever it quotes: a key, id or value read from a file may hold a line break.
    A line too long to read keeps its start (what is wrong) and its end (the fix)."""
    line = problem.translate(LINE_BREAKS)
    return line if len(line) <= LINE_MAX else f"{line[:LINE_MAX * 2 // 3]} ... {line[-LINE_MAX // 3:]}"


def working_folder() -> str:
    """The working folder, which every relative path is read against; in a folder that was deleted (or
    moved away) `import torch` ended the command with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        raise RaycvError("the working folder no longer exists (deleted or moved away); cd to one that does") from None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Before anything imports ray: its driver's log deduplicator reads this once, at import.
    os.environ["RAY_DEDUP_LOGS_ALLOW_REGEX"] = progress.dedup_allow_regex(os.environ.get("RAY_DEDUP_LOGS_ALLOW_REGEX"))
    try:
        working_folder()
        parser = build_parser()
        # argparse hands a key=value given after an option (`--fold 0 train.lr=3e-5`) back as unrecognised;
        # those are overrides too, in command-line order.
        args, extra = parser.parse_known_args(argv)
        unknown = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
        if unknown:  # the subcommand's own --help lists what it takes
            raise RaycvError(f"unrecognized arguments: {' '.join(unknown)} (see raycv {args.command} --help)")
        if extra:
            args.overrides = args.overrides + extra
        from raycv import commands

        return getattr(commands, args.command.replace("-", "_"))(args) or 0
    except RaycvError as exc:  # a ConfigError or DataError holds several problems, one line each
        for line in exc.lines() if hasattr(exc, "lines") else [str(exc)]:
            print(f"raycv: error: {one_line(line)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        # Where a path argument is first looked at (is it a file? does it exist?), the OS refuses a name
        # longer than it takes; nothing has been written yet.
        from raycv.storage import path_refusal  # here: pyarrow (under storage) is no cost of `raycv --help`

        print(f"raycv: error: {one_line(shown(exc.filename))}: {path_refusal(exc)} (the system takes at most "
              f"{os.pathconf('/', 'PC_NAME_MAX')} bytes per name); name a shorter path", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("raycv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
