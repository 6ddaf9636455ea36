"""Everything that would fail inside a fold worker, checked before Ray (or a GPU) starts.

    raycv validate search_spaces/base.yaml        # runs these checks; so does raycv tune, before Ray starts

`raycv.spaces` has already checked every key and every value a search can draw. Here each config a trial
can get (the file's, and the file's with each searched value in turn) is checked against what only the
model and the data can say: the backbone's position embeddings, vocabulary and layers, the training steps
the evaluation points need, the scheduler's horizon, and where the run will write. Every problem is
reported at once, one line each, naming the key, what was found and what is expected.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from raycv import RaycvError, shown, storage
from raycv.config import Config, ModelConfig, StructBertBackbone
from raycv.data import DataError, EncodedFolds, encode_folds
from raycv.model import (
    backbone_config,
    load_tokenizer,
    read_structbert_config,
    read_structbert_state_dict,
    structbert_mismatch,
)
from raycv.spaces import ConfigError
from raycv.train_fold import steps_per_epoch, trial_eval_points


@dataclass
class Plan:
    """What the checks computed and the search uses: the encoded folds and the trial's evaluation points."""

    encoded: EncodedFolds
    num_points: int  # evaluation points of every trial
    max_t: int  # ASHA's horizon in evaluation points
    valid_sizes: list[int]  # validation rows per fold


def drawable_configs(config: Config) -> list[tuple[str, Config]]:
    """(where, config) for the file's config and for each searched value in turn, as a trial would get it."""
    configs = [("", config)]
    for key, dim in config.search.params.items():
        for value in dim.values_to_check():
            where = f"search.params.{key}.{dim.kind} value {shown(value)}: "
            configs.append((where, config.with_overrides({key: value})))
    return configs


def preflight(config: Config, source: str) -> Plan:
    """Check `config` for everything the workers would trip on; raise ConfigError with every problem."""
    problems = check_output_paths(config) + check_extras(config)
    drawn = drawable_configs(config)
    # What each distinct backbone the search can draw is, read from its files once (or why it cannot be): its
    # tokenizer, and its shape and checkpoint's problems. Reading them again for each searched value (a
    # StructBERT-large checkpoint mapped and its model built: a quarter of a second) was most of validate's time.
    read: dict[tuple[str, str], object] = {}  # (backbone, what) -> what was read, or the RaycvError saying why not

    def backbone_key(trial: Config) -> str:
        return json.dumps(trial.model.backbone.model_dump(), sort_keys=True)

    def once(trial: Config, what: str, load):
        key = (backbone_key(trial), what)
        if key not in read:
            try:
                read[key] = load(trial.model)
            except RaycvError as exc:
                read[key] = exc
        if isinstance(read[key], RaycvError):
            raise read[key]
        return read[key]

    def model_problems(trial: Config) -> list[str]:
        try:
            return check_model(trial, once(trial, "tokenizer", load_tokenizer), once(trial, "shape", read_backbone))
        except RaycvError as exc:
            return [str(exc)]

    problems += per_drawn_config(drawn, model_problems)
    tokenizer = read[backbone_key(config), "tokenizer"]
    if isinstance(tokenizer, RaycvError):  # the file's own tokenizer failed: said above, once
        raise ConfigError(source, list(dict.fromkeys(problems)))
    try:
        encoded = encode_folds(config, tokenizer)
    except DataError as exc:  # the data's problems, each naming its file
        raise ConfigError(source, problems + exc.lines()) from None
    except RaycvError as exc:
        raise ConfigError(source, problems + [str(exc)]) from None
    valid_sizes = encoded.table["fold"].value_counts().sort_index().tolist()
    num_points = trial_eval_points(config.train, encoded.table["fold"])
    train_rows = len(encoded.table) - max(valid_sizes)

    def step_problems(trial: Config) -> list[str]:
        total = trial.train.epochs * steps_per_epoch(train_rows, trial.train.batch_size)
        if total >= num_points:
            return []
        return [f"train.batch_size: {trial.train.batch_size} leaves {total} training steps per fold, fewer than "
                f"the {num_points} evaluation points of a trial; lower it or train longer"]

    problems += per_drawn_config(drawn, step_problems)
    max_t = config.scheduler.max_t or num_points
    if max_t > num_points:
        problems.append(f"scheduler.max_t: {max_t} is more than the {num_points} evaluation points of a trial; "
                        f"lower it (or leave it out)")
    if config.scheduler.type == "asha" and config.scheduler.grace_period > max_t:
        problems.append(f"scheduler.grace_period: {config.scheduler.grace_period} exceeds the {max_t} evaluation "
                        f"points of a trial; lower it")
    if problems:
        raise ConfigError(source, list(dict.fromkeys(problems)))
    return Plan(encoded=encoded, num_points=num_points, max_t=max_t, valid_sizes=valid_sizes)


def per_drawn_config(drawn: list[tuple[str, Config]], check) -> list[str]:
    """`check(config)` for the file's config and each drawn one; a drawn value's problem only where that value
    causes it (the file's config does not have the same problem), so one problem is one line."""
    base = check(drawn[0][1])
    problems = list(base)
    for where, trial in drawn[1:]:
        problems += [where + problem for problem in check(trial) if problem not in base]
    return problems


@dataclass
class BackboneFacts:
    """What preflight reads from a backbone's own files: the same for every trial that draws the backbone."""

    shape: dict[str, int]  # max_position_embeddings, vocab_size, num_hidden_layers
    checkpoint_problems: list[str]  # a StructBERT checkpoint's tensors that do not fit its config


def read_backbone(model: ModelConfig) -> BackboneFacts:
    bert = backbone_config(model)
    shape = {key: int(getattr(bert, key)) for key in ("max_position_embeddings", "vocab_size", "num_hidden_layers")}
    backbone = model.backbone
    return BackboneFacts(shape, structbert_checkpoint_problems(backbone) if isinstance(backbone, StructBertBackbone)
                         else [])


def check_model(config: Config, tokenizer, backbone: BackboneFacts) -> list[str]:
    """Shapes the backbone cannot take: positions, vocabulary, layers; a StructBERT checkpoint's tensors."""
    shape = backbone.shape
    problems = []
    if config.model.max_length > shape["max_position_embeddings"]:
        problems.append(f"model.max_length: {config.model.max_length} is more than the backbone's "
                        f"{shape['max_position_embeddings']} position embeddings; lower it")
    if len(tokenizer) > shape["vocab_size"]:
        problems.append(f"model.backbone: the tokenizer has {len(tokenizer)} tokens but the embedding table "
                        f"{shape['vocab_size']} rows; use the vocabulary the checkpoint was trained with")
    if config.model.reinit_layers > shape["num_hidden_layers"]:
        problems.append(f"model.reinit_layers: {config.model.reinit_layers} is more than the backbone's "
                        f"{shape['num_hidden_layers']} layers; lower it")
    return problems + backbone.checkpoint_problems


def structbert_checkpoint_problems(backbone: StructBertBackbone) -> list[str]:
    """Every tensor the config needs is in the checkpoint with its shape (mapped, not read; the model on the
    meta device), so a mismatched en_model fails here rather than in every fold worker."""
    state, _ = read_structbert_state_dict(backbone.checkpoint, mmap=True)
    mismatch = structbert_mismatch(read_structbert_config(backbone.config), state)
    if not mismatch:
        return []
    return [f"model.backbone.checkpoint: {backbone.checkpoint} does not fit {backbone.config}: {mismatch}"]


def check_extras(config: Config) -> list[str]:
    """Settings that need an optional package (an extra of raycv) have it; a file store MLflow accepts."""
    needed = []
    if config.run.mlflow.tracking_uri:
        needed.append(("run.mlflow.tracking_uri", "mlflow", "MLflow"))
    if config.search.algorithm == "optuna":
        needed.append(("search.algorithm", "optuna", "Optuna"))
    problems, missing = [], set()
    for key, package, name in needed:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.add(package)
            problems.append(f"{key}: needs {name}, which is not installed; install it with "
                            f"pip install 'raycv[{package}]' (or unset {key})")
    if config.run.mlflow.tracking_uri and "mlflow" not in missing:
        problems += check_mlflow_store(config.run.mlflow.tracking_uri)
    return problems


def check_mlflow_store(tracking_uri: str) -> list[str]:
    """Newer MLflow (3.17 as tested) refuses a file store (file:DIR, a bare path) unless
    MLFLOW_ALLOW_FILE_STORE=true: say so before the search, not in the Tune driver after it started."""
    from mlflow import environment_variables

    allow = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)  # absent: file stores allowed
    try:
        parsed = urlparse(tracking_uri)
        parsed.port  # noqa: B018 -- parsing the port is what refuses a bad one
    except ValueError as exc:
        return [f"run.mlflow.tracking_uri: {tracking_uri} is not a URI ({exc}); use e.g. sqlite:///mlflow.db or "
                "http://HOST:5000"]
    file_store = parsed.scheme in ("", "file") and not tracking_uri.startswith("databricks")
    if file_store and allow is not None and not allow.get():
        return [f"run.mlflow.tracking_uri: {tracking_uri} is a file store, which this MLflow refuses unless "
                "MLFLOW_ALLOW_FILE_STORE=true is set; use a database store such as sqlite:///mlflow.db (or set "
                "MLFLOW_ALLOW_FILE_STORE=true)"]
    return [] if file_store else check_mlflow_reachable(tracking_uri)


# The stores MLflow tracks to, by URI scheme (its tracking store registry, MLflow 3.x); a database URI may name
# its driver after a '+' (postgresql+psycopg2://...).
MLFLOW_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
MLFLOW_SERVERS = ("http", "https")
MLFLOW_OTHERS = ("databricks", "databricks-uc", "uc")


def check_mlflow_reachable(tracking_uri: str) -> list[str]:
    """The tracking URI names a store MLflow knows and, where that can be seen in a second without side
    effects, one that works: a SQLite file raycv can create, a server that answers. Tune's MLflow callback
    opens it in the driver after Ray has started, where a bad one ended in a traceback."""
    key = "run.mlflow.tracking_uri"
    parsed = urlparse(tracking_uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme == "sqlite":
        database = tracking_uri.split("://", 1)[1].removeprefix("/")  # sqlite:///relative, sqlite:////absolute
        if database in ("", ":memory:"):
            return []
        path = Path(database)
        if path.is_dir():
            return [f"{key}: {database} is a directory; name a database file, e.g. sqlite:///mlflow.db"]
        if path.exists() and not path.is_file():
            return [f"{key}: {database} is not a regular file; name a database file, e.g. sqlite:///mlflow.db"]
        if path.is_file():
            with path.open("rb") as handle:
                head = handle.read(16)
            if head and head != b"SQLite format 3\x00":
                return [f"{key}: {database} is not a SQLite database; name a new file or an MLflow database, e.g. "
                        "sqlite:///mlflow.db"]
            return []
        folder = path.absolute().parent  # SQLite creates the file, not its folder
        try:
            if not folder.is_dir():
                raise FileNotFoundError(f"no folder {folder}")
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            return [f"{key}: cannot create the SQLite database {database} ({exc.strerror or exc}); use e.g. "
                    "sqlite:///mlflow.db"]
        return []
    if scheme in MLFLOW_SERVERS:
        try:
            port = parsed.port or (443 if scheme == "https" else 80)
            socket.create_connection((parsed.hostname or "", port), timeout=5).close()
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return [f"{key}: no MLflow server answers at {tracking_uri} ({reason}); start it "
                    "(mlflow server --host HOST --port PORT) or use sqlite:///mlflow.db"]
        return []
    if scheme in MLFLOW_DATABASES + MLFLOW_OTHERS:
        return []  # a database server or Databricks: MLflow's own client says what is wrong
    return [f"{key}: {tracking_uri} is not a store MLflow tracks to (schemes: "
            f"{', '.join(MLFLOW_DATABASES + MLFLOW_SERVERS + MLFLOW_OTHERS + ('file',))}); use e.g. "
            "sqlite:///mlflow.db or http://HOST:5000"]


def output_problems(flag: str, path: str | Path, files: tuple[str, ...] = (), directory: bool = False,
                    example: str = "out.csv") -> list[str]:
    """Where a command will write, checked before it does any work: a file (no `files`, not `directory`) must
    not be a directory, or named as one (`--out preds/` wrote a file named preds), a directory (holding `files`)
    must not be a file, and the nearest existing folder above must take a new file (tried: permissions alone say
    nothing to root, and /proc refuses anyway). `flag`: the command-line flag or the config key that names the
    place; `example`, a file name the fix suggests."""
    directory = directory or bool(files)
    other = f"{flag} DIR" if flag.startswith("--") else f"{flag}=DIR"
    as_folder, path = str(path).endswith("/"), Path(path)
    try:
        if not directory and (as_folder or path.is_dir()):
            kind = "is a directory" if path.is_dir() else "ends with /, a directory's name"
            return [f"{flag}: {path} {kind}; name a file in it, e.g. {flag} {path / example}"]
        if not directory and (problem := storage.not_a_file_to_replace(path)):  # written by a rename, which replaces it
            return [f"{flag}: {path} {problem}; name a file, e.g. {flag} {example}"]
        if directory and path.exists() and not path.is_dir():
            return [f"{flag}: {path} is {storage.what_is_at(path)}, not a directory; choose another with {other}"]
        taken = [name for name in files if (path / name).is_dir()]
        if taken:
            return [f"{flag}: {path} holds a directory named {taken[0]}, where a file is written; choose another "
                    f"with {other}"]
        existing = next(p for p in [*([path] if directory else []), *path.parents] if p.exists())
        if not existing.is_dir():
            return [f"{flag}: cannot create {path}: {existing} is {storage.what_is_at(existing)}, not a directory"]
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return [f"{flag}: cannot write {path} ({exc.strerror or exc}); choose another place"]
    return []


def replaces_an_input(flag: str, path: Path, inputs: dict[str, str | Path | None]) -> list[str]:
    """An output that is one of the command's inputs (the same file, by any name or link) would be replaced
    by it: `raycv folds --out train.csv` wrote the fold table over Kaggle's train.csv, `raycv predict --data
    test.csv --out test.csv` the submission over the texts. `inputs`: what names each (a flag or key) -> its
    path; a directory is a run directory, standing for the files the run keeps there."""
    if not path.is_file():
        return []  # a new file replaces nothing
    for name, source in inputs.items():
        if source is None or not Path(source).exists():
            continue
        source = Path(source)
        if source.is_dir() and storage.is_run_file(source, path):
            return [f"{flag}: {path} is a file of {name} {source}; writing there would replace it: name a new file"]
        if not source.is_dir() and os.path.samefile(path, source):
            return [f"{flag}: {path} is the {name} file; writing there would replace it: name another file"]
    return []


def check_output_paths(config: Config) -> list[str]:
    """run.output_dir (and a local run.storage_path) must be a directory raycv can create and write; a bucket
    (s3://...) must take a small object, written and deleted with short timeouts, before Ray starts."""
    problems = output_problems("run.output_dir", Path(config.run.output_dir), directory=True)
    storage_path = config.run.storage_path
    if storage_path and storage.is_remote(storage_path):
        unwritable = storage.probe(storage_path)  # one line, or None
        problems += [unwritable] if unwritable else []
    elif storage_path and not (problems and Path(storage_path).is_relative_to(config.run.output_dir)):
        problems += output_problems("run.storage_path", Path(storage_path), directory=True)  # not a 2nd line
    return problems
