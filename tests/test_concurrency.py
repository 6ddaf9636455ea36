"""Every node busy: on an autoscaling cluster, trials are not capped by the nodes up at the start. Ray's fake
autoscaling cluster (worker nodes that start on demand, on this machine) stands in for cluster.yaml's:
the head offers the trial drivers' resource, the worker nodes a custom resource standing in for GPUs.
The head runs as `ray start --head --block` in a process group of its own, ended by the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raycv.cluster import DRIVER_RESOURCE

from helpers import free_port, ray_head

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

NODE_SLOTS, MAX_NODES, FOLDS = 3, 2, 3  # one trial (3 folds x 1 slot) fills a node; 2 nodes at most


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory):
    home = tmp_path_factory.mktemp("autoscaling")
    gcs_port = free_port()
    # Ray's fake multi-node provider (its example config, which the wheel does not ship): worker nodes are
    # raylets the autoscaler starts on this machine when trials ask for their resources.
    config = {
        "cluster_name": "raycv_fake", "max_workers": MAX_NODES, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2, DRIVER_RESOURCE: 100}, "node_config": {}, "max_workers": 0},
            "fold_node": {"resources": {"CPU": 2, "fold_slot": NODE_SLOTS, "object_store_memory": 300_000_000},
                          "node_config": {}, "min_workers": 0, "max_workers": MAX_NODES},
        },
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }
    config_path = home / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(config))
    extra = [f"--autoscaling-config={config_path}", "--num-cpus=2", f"--resources={json.dumps({DRIVER_RESOURCE: 100})}"]
    with ray_head(home, extra, {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}, gcs_port) as info:
        yield info


def trial_spans(tune_dir: Path) -> list[tuple[float, float]]:
    """When each trial's folds were training, from Tune's own result records: from its first evaluation
    point's result to its last. (A trial's driver starts at once on the head; while its placement group
    waits for a node, it reports nothing.)"""
    spans = []
    for result_json in tune_dir.glob("*/result.json"):
        records = [json.loads(line) for line in result_json.read_text().splitlines() if line.strip()]
        spans.append((records[0]["timestamp"], records[-1]["timestamp"]))
    return spans


def most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = best = 0
    for _, change in events:
        running += change
        best = max(best, running)
    return best


def test_trials_fill_every_node_the_autoscaler_can_add(autoscaling_head, tmp_path, train_csv):
    env = {k: v for k, v in autoscaling_head["env"].items() if k not in ("RAY_FAKE_CLUSTER",)}
    out_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "raycv.cli", "tune", "spaces/smoke.yaml", "--address", autoscaling_head["address"],
         f"data.path={train_csv}", f"run.output_dir={out_dir}", "search.params={train.lr: {grid: [0.003]}}",
         f"search.num_samples={MAX_NODES}", "scheduler.type=none", "train.epochs=8", "resources.cpus_per_fold=0.5",
         "resources.custom_per_fold={fold_slot: 1}", "run.max_concurrent_trials=null"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, start_new_session=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "as many as the autoscaler can place" in proc.stdout
    spans = trial_spans(out_dir / "ray" / "tune")
    assert len(spans) == MAX_NODES
    # The cluster starts with no worker node: the autoscaler added one per trial, up to its limit, and every
    # trial trained at once (a local Ray's plan would have run them one after another).
    assert most_at_once(spans) == MAX_NODES, spans
