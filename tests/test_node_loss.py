"""A node lost mid-trial costs the points since the last fold checkpoint, not the trial.

A cluster of three nodes on this machine, as on `cluster.yaml`: a head that runs only trial drivers (the
`raycv_driver` resource), and two worker nodes (`ray start --address ... --block`, each in a process group
of its own) that offer `fold_slot`s, standing in for GPU nodes. One trial's three folds land together on
one worker node; once they are past a checkpoint, that node is killed outright (SIGKILL to its raylet's
process group, as a spot reclaim or a hardware fault would take it). Ray Train restarts the worker group on
the node left (run.max_failures 1), every fold resumes from its latest checkpoint, the points after it are
trained again bit for bit, and the report says the trial restarted and how many points were redone.
Everything is ended by the test; a hard time limit on the whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from raycv.cluster import DRIVER_RESOURCE

from helpers import die_with_pytest, kill_group, list_actors, ray_head, start_raycv, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

NUM_POINTS = 8


@contextlib.contextmanager
def worker_node(head: dict, name: str):
    """`ray start --address HEAD --block` with `fold_slot`s and a resource naming it, in a process group of its
    own; yields the process, whose group the test may kill to lose the node."""
    resources = {"fold_slot": 3, name: 1}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", f"--address={head['address']}", "--block",
         "--num-cpus=2", f"--resources={json.dumps(resources)}", f"--temp-dir={head['temp_dir']}",
         "--disable-usage-stats"],
        env=head["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=die_with_pytest,
    )
    try:
        yield proc
    finally:
        kill_group(proc)
        proc.wait(timeout=60)


def nodes_by_name(head: dict) -> dict[str, str]:
    """Alive nodes' names (the resource each worker node was started with) -> node id, by the state API."""
    code = ("import json; from ray.util.state import list_nodes; "
            f"nodes = list_nodes(address={head['dashboard']!r}, detail=True); "
            "print(json.dumps([[n.node_id, n.state, n.resources_total] for n in nodes]))")
    proc = subprocess.run([sys.executable, "-c", code], env={**head["env"], "RAY_AUTH_MODE": "token"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {}
    for node_id, state, resources in json.loads(proc.stdout.strip().splitlines()[-1]):
        for name in ("node_a", "node_b"):
            if state == "ALIVE" and name in resources:
                names[name] = node_id
    return names


def wait_for_nodes(head: dict, names: set[str], timeout_s: float = 120) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while not names <= set(found := nodes_by_name(head)):
        assert time.monotonic() < deadline, f"worker nodes {sorted(names - set(found))} did not join"
        time.sleep(2)
    return found


def fold_worker_nodes(head: dict, alive: bool = True) -> list[str]:
    """The node id of each fold worker (those alive now, or all the cluster has had)."""
    workers = list_actors(head["dashboard"], "RayTrainWorker", head["env"])
    return [worker["node_id"] for worker in workers if worker["state"] == "ALIVE" or not alive]


def pooled_result(log: str, point: int) -> bool:
    """Whether the trial's line for `point` (its pooled RMSE over all folds) is in the log."""
    return re.search(rf"trial \S+ \| point {point}/{NUM_POINTS} \| .*\| cv_rmse_last ", log) is not None


def test_a_lost_node_costs_the_points_since_the_checkpoint_not_the_trial(tmp_path, train_csv):
    head_args = ["--num-cpus=1", f"--resources={json.dumps({DRIVER_RESOURCE: 100})}"]
    # The head notices a dead node within a few seconds instead of half a minute.
    fast_health_check = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    with ray_head(tmp_path, head_args, fast_health_check) as head, contextlib.ExitStack() as nodes:
        # One after the other: two raylets that start at the same moment on one machine, in one session
        # folder, can both time out registering ("Failed to get node info: Deadline Exceeded").
        node_a = nodes.enter_context(worker_node(head, "node_a"))
        wait_for_nodes(head, {"node_a"})
        node_b = nodes.enter_context(worker_node(head, "node_b"))
        node_ids = wait_for_nodes(head, {"node_a", "node_b"})
        env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
        run_dir, log_path = tmp_path / "runs" / "lost", tmp_path / "tune.log"
        args = ["tune", "--address", head["address"], "spaces/smoke.yaml", f"data.path={train_csv}",
                "run.name=lost", f"run.output_dir={run_dir}", "search.params={train.lr: {grid: [0.003]}}",
                f"train.epochs={NUM_POINTS}", "run.checkpoint_every=2", "resources.custom_per_fold={fold_slot: 1}"]
        proc = start_raycv(args, tmp_path, log_path, env=env)
        try:
            # The node to lose is found while the trial trains its first points (a state API query takes
            # seconds), so that the kill follows point 5's pooled result at once.
            wait_for(lambda: pooled_result(log_path.read_text(), 1), proc, log_path, 400, "point 1")
            (lost,) = set(fold_worker_nodes(head))  # the three folds of a trial on one node
            lost_name = next(name for name, node_id in node_ids.items() if node_id == lost)
            # Past the checkpoint at point 4 and point 5's pooled result (not only its first training steps:
            # a kill then would leave no point to redo), before the checkpoint at point 6: point 5 is redone.
            wait_for(lambda: pooled_result(log_path.read_text(), 5), proc, log_path, 400, "point 5")
            kill_group(node_a if lost_name == "node_a" else node_b)  # the node is gone
            assert not list((run_dir / "ray").glob("train_*/point_0006")), "too late: point 6 is checkpointed"
            proc.wait(timeout=600)
        finally:
            kill_group(proc)
        out = log_path.read_text()
        assert proc.returncode == 0, out[-4000:]
        # Three fold workers on the node that was lost, then three on the node that was left.
        survivor = next(node_id for name, node_id in node_ids.items() if name != lost_name)
        placed = fold_worker_nodes(head, alive=False)
        assert sorted(placed) == sorted([lost] * 3 + [survivor] * 3), (placed, lost, survivor)

    report = json.loads((run_dir / "report.json").read_text())
    (trial,) = report["trials"]
    assert trial["status"] == "finished" and trial["eval_points"] == NUM_POINTS
    curve = pd.read_csv(run_dir / "curves" / f"{trial['trial_id']}.csv")
    assert curve["eval_point"].tolist() == list(range(1, NUM_POINTS + 1))
    # The folds resumed from the checkpoint at point 4: points 5 onwards trained again, with the same
    # pooled RMSE each time (same weights, optimiser, scheduler, RNG and batch order), point 1 never again.
    # (Three raylets on one machine share a session folder, so each node's log monitor relays a worker's lines:
    # the same line may come several times. A line printed again after the restart differs in its seconds. Ray's
    # driver would fold the restarted rank 0's lines into "[repeated 2x across cluster]": raycv keeps them whole.)
    lines = re.findall(r"\| point (\d+)/8 \| .*? \| cv_rmse_last ([\d.]+) .*?\| (\d+) s\b", out)
    lines = [(point, value) for point, value, _ in dict.fromkeys(lines)]
    by_point: dict[str, set] = {}
    for point, value in lines:
        by_point.setdefault(point, set()).add(value)
    assert sorted(by_point, key=int) == [str(p) for p in range(1, NUM_POINTS + 1)]
    assert all(len(values) == 1 for values in by_point.values()), by_point
    points = [int(point) for point, _ in lines]
    assert points.count(1) == 1 and points.count(5) == 2 and points.count(4) == 1, f"points printed: {points}"
    assert "resumes at step" in out
    # The report says so: one restart, the points trained twice.
    assert (trial["restarts"], trial["points_redone"]) == (1, len(points) - NUM_POINTS)
    assert "resumed 1x from fold checkpoints" in (run_dir / "report.md").read_text()


# ---------------------------------------------------------------- the head lost


def test_a_lost_head_ends_the_run_as_interrupted_in_one_line(tmp_path, train_csv):
    """The cluster's GCS goes away mid-trial (here the local Ray's, SIGKILLed; on a cluster, the head node).
    Ray's core would wait gcs_rpc_server_reconnect_timeout_s and end the driver with a log line of its own;
    raycv says instead what happened and how to resume, and leaves the run marked interrupted."""
    import psutil

    log_path = tmp_path / "tune.log"
    args = ["tune", "spaces/smoke.yaml", f"data.path={train_csv}", "search.params={train.lr: {grid: [0.003]}}",
            "scheduler.type=none"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_gcs_rpc_server_reconnect_timeout_s"] = "20"  # Ray's patience (60 s by default), for the test
    proc = start_raycv(args, tmp_path, log_path, env=env)
    try:
        wait_for(lambda: "| point 1/6 |" in log_path.read_text(), proc, log_path, 300, "a first evaluation point")
        (gcs,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "gcs_server"]
        lost_at = time.monotonic()
        gcs.kill()
        proc.wait(timeout=120)
        waited = time.monotonic() - lost_at
    finally:
        kill_group(proc)
    out = log_path.read_text()
    assert proc.returncode == 1, out[-3000:]
    assert 10 <= waited < 40, waited  # 5/6 of Ray's patience, before Ray's own end
    (line,) = [line for line in out.splitlines() if line.startswith("raycv: error:")]
    assert line.startswith("raycv: error: lost the local Ray (GCS ") and "has not answered for" in line
    assert line.endswith(f"resumes from its checkpoints once a cluster is up: raycv tune {' '.join(args[1:2])} "
                         f"data.path={train_csv} 'search.params={{train.lr: {{grid: [0.003]}}}}' "
                         "scheduler.type=none --resume")
    assert "Traceback" not in out and "Failed to connect to GCS" not in out
    state = json.loads((tmp_path / "runs" / "smoke" / "run.json").read_text())
    assert state["state"] == "interrupted" and [t["status"] for t in state["trials"]] == ["interrupted"]
    (trial,) = state["trials"]
    assert not list(Path(tempfile.gettempdir()).glob(f"raycv-ckpt-{trial['trial_id']}-p*"))  # no local copy left
