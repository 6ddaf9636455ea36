"""How the package is put together: imports run one way, downwards; the framework internals raycv relies
on are still where they were when it was written (these tests fail loudly when a pin moves and breaks one).
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "raycv"

# The data flow, lowest first: a module may import only modules of a lower layer (and the package root).
LAYERS = [
    {"__init__"},
    {"storage", "scoring", "progress", "metrics", "config"},
    {"spaces", "config_reference", "data", "model", "collect"},
    {"train_fold", "report"},
    {"worker", "preflight", "cluster", "predict", "tracking", "scheduler"},
    {"driver_guard"},
    {"sweep"},
    {"bench"},
    {"commands"},
    {"cli"},
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def raycv_imports(path: Path) -> set[str]:
    """The raycv modules `path` imports anywhere in it, inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("raycv.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "raycv":
            if node.module == "raycv":  # `from raycv import storage` names a module; `RaycvError` the root
                found |= {alias.name if alias.name in RANK else "__init__" for alias in node.names}
            else:
                found.add(node.module.split(".")[1])
    return found


def test_every_module_has_a_layer():
    assert {path.stem for path in PACKAGE_DIR.glob("*.py")} == set(RANK)


@pytest.mark.parametrize("module", sorted(RANK))
def test_imports_run_downwards(module):
    upward = {name for name in raycv_imports(PACKAGE_DIR / f"{module}.py") if RANK[name] >= RANK[module]}
    assert not upward, f"raycv.{module} imports {sorted(upward)} from its own layer or above"


@pytest.mark.parametrize("module", ["config", "spaces"])
def test_the_config_does_not_import_ray(module):
    tree = ast.parse((PACKAGE_DIR / f"{module}.py").read_text())
    modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    assert not [name for name in modules if name.split(".")[0] == "ray"]


# ---------------------------------------------------------------- private framework APIs, pinned


def test_the_ray_train_report_logger_is_where_raycv_quiets_it():
    """worker.quiet_train_report_logs: Ray Train's per-report INFO line comes from a logger named after the
    private module's file (checked against ray 2.60.0)."""
    from ray.train.v2._internal.execution import context as train_execution_context

    from raycv.worker import quiet_train_report_logs

    source = Path(train_execution_context.__file__).read_text()
    assert "logging.getLogger(__file__)" in source and "Reporting training result" in source
    logger = logging.getLogger(train_execution_context.__file__)
    before = logger.level
    try:
        quiet_train_report_logs()
        assert train_execution_context.logger is logger and logger.getEffectiveLevel() == logging.WARNING
    finally:
        logger.setLevel(before)


def test_reinitialise_redraws_a_layer_as_transformers_initialises_it():
    """model.reinitialise calls each model class's private `_init_weights` (checked against transformers
    5.24): a re-drawn layer has fresh weights of the configured spread and LayerNorms back at 1 and 0."""
    from transformers import BertConfig, BertModel

    from raycv.model import reinitialise

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        initializer_range=0.5)
    model = BertModel(config)
    layer, other = model.encoder.layer[1], model.encoder.layer[0]
    other_before = {name: tensor.clone() for name, tensor in other.state_dict().items()}
    with torch.no_grad():
        for param in layer.parameters():
            param.fill_(3.0)
    reinitialise(model, [layer])
    weight = layer.intermediate.dense.weight
    assert not torch.all(weight == 3.0) and 0.4 < weight.std().item() < 0.6
    assert torch.all(layer.output.LayerNorm.weight == 1) and torch.all(layer.output.LayerNorm.bias == 0)
    assert all(torch.equal(other.state_dict()[name], tensor) for name, tensor in other_before.items())
