"""Watching a run the way a person does: the open-source Ray 2.60 dashboard in a real browser (Debian's
chromium driven by Playwright, with the cluster's token), Prometheus (Debian's) scraping the node as Ray's
documented set-up does, and raycv's Grafana dashboard definition.

One real run serves the Ray tests here: a head started by the test (token authentication on, one logical
GPU), and `raycv tune --address` on it running one trial of the smoke space, its three folds sharing that GPU
(resources.gpus_per_fold 0.2), with enough evaluation points to still be training while the browser looks.
The same run shows that raycv joins a running cluster and leaves it running. Every Ray test has a hard time
limit; the run, Prometheus and the head are stopped at the end, whatever happens.

    RAYCV_SCREENSHOTS=raycv/assets python -m pytest tests/test_dashboard.py    # README's screenshots
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

import raycv
from raycv.metrics import FoldMetrics

from helpers import die_with_pytest, free_port, kill_group, list_actors, ray_head

DASHBOARD_JSON = Path(raycv.__file__).parent / "dashboards" / "raycv_grafana_dashboard.json"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# One trial (no ASHA), 3 folds sharing one GPU, 12 evaluation points of the tiny model: long enough to be
# training while the browser looks, short enough for CI.
RUN_ARGS = ["spaces/smoke.yaml", "run.name=watch", "search.params={train.lr: {grid: [0.003]}}",
            "search.num_samples=1", "scheduler.type=none", "train.epochs=4", "train.evals_per_epoch=3",
            "resources.gpus_per_fold=0.2"]
NUM_FOLDS, NUM_POINTS = 3, 12


def exported_metrics() -> dict[str, tuple[str, ...]]:
    """The metrics raycv exports, as Prometheus names them (Ray prefixes `ray_`) -> their label keys."""
    from ray.util.metrics import Metric

    fold = FoldMetrics("run", "trial", 0)
    return {f"ray_{m.info['name']}": tuple(m.info["tag_keys"]) for m in vars(fold).values() if isinstance(m, Metric)}


# ---------------------------------------------------------------- the Grafana dashboard (no Ray started)


def test_grafana_dashboard_queries_only_metrics_raycv_exports():
    from ray.dashboard.modules.metrics.grafana_dashboard_factory import generate_default_grafana_dashboard

    dashboard = json.loads(DASHBOARD_JSON.read_text())
    exported = exported_metrics()
    assert len(exported) == 7, exported
    # A Grafana dashboard model: a title, a uid of its own beside Ray's, panels with a place on the grid.
    assert dashboard["title"] and dashboard["uid"] == "raycv"
    assert dashboard["uid"] != generate_default_grafana_dashboard()[1]
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids, queried = set(), set()
    for panel in dashboard["panels"]:
        assert panel["type"] in ("timeseries", "stat") and panel["title"]
        assert panel["id"] not in ids
        ids.add(panel["id"])
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            names = set(re.findall(r"\bray_raycv_\w+", expr))
            assert names and names <= set(exported), f"{panel['title']}: {expr} queries {names - set(exported)}"
            queried |= names
            # Grouped and filtered only by labels those metrics carry (or Ray adds: SessionName).
            labels = set(re.findall(r"by \(([^)]*)\)", expr)[0].replace(" ", "").split(","))
            labels |= set(re.findall(r"(\w+)=~", expr))
            carried = set.intersection(*(set(exported[name]) for name in names)) | {"SessionName"}
            assert labels <= carried, f"{panel['title']}: {labels - carried}"
            assert set(re.findall(r"\$(\w+)", expr)) <= set(variables)
            for legend_label in re.findall(r"\{\{(\w+)\}\}", target["legendFormat"]):
                assert legend_label in labels
    assert queried == set(exported), f"no panel shows {set(exported) - queried}"
    for var in variables.values():
        assert set(re.findall(r"\$(\w+)", json.dumps(var.get("query", "")))) <= set(variables)


# ---------------------------------------------------------------- one real run on a head the test started


@pytest.fixture(scope="module")
def watched(tmp_path_factory, train_csv):
    """A head (token authentication on) and `raycv tune --address` on it, running in the background."""
    home = tmp_path_factory.mktemp("dashboard")
    # A listen port of its own for the node's dashboard agent, which serves the workers' logs to the dashboard:
    # the default one (52365) belongs to whichever other Ray on this machine took it first.
    # One (logical) GPU: enough for a trial whose folds share it (resources.gpus_per_fold 0.2).
    with ray_head(home, ["--num-cpus=2", "--num-gpus=1", f"--dashboard-agent-listen-port={free_port()}"]) as head, \
            prometheus_watching(head, home) as prometheus_port:
        env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
        out_dir, console = home / "runs" / "watch", home / "tune.out"
        with console.open("w") as stream:
            proc = subprocess.Popen(
                [sys.executable, "-m", "raycv.cli", "tune", "--address", head["address"], *RUN_ARGS,
                 f"data.path={train_csv}", f"run.output_dir={out_dir}"],
                cwd=home, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            yield {**head, "proc": proc, "out_dir": out_dir, "console": console,
                   "headers": {"Authorization": f"Bearer {head['token']}"}, "prometheus_port": prometheus_port}
        finally:
            kill_group(proc)
            proc.wait()


def fold_workers(watched, deadline: float) -> tuple[str, list[dict]]:
    """The trial id and its fold workers (world rank = fold), from Ray Train's state in the dashboard."""
    while True:
        assert watched["proc"].poll() is None, f"raycv tune ended early:\n{watched['console'].read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no Train run appeared:\n{watched['console'].read_text()[-4000:]}"
        response = requests.get(f"{watched['dashboard']}/api/train/v2/runs/v1", headers=watched["headers"], timeout=30)
        runs = response.json()["train_runs"] if response.ok else []  # a 500 until the first Train run starts
        workers = runs[-1]["attempts"][-1]["workers"] if runs and runs[-1]["attempts"] else []
        if len(workers) == NUM_FOLDS:
            return runs[-1]["name"].removeprefix("train_"), sorted(workers, key=lambda w: w["world_rank"])
        time.sleep(2)


def worker_log(watched, actor_id: str) -> str:
    """A fold worker's stdout, as the dashboard serves it to the Actors page's Log."""
    response = requests.get(f"{watched['dashboard']}/api/v0/logs/file", headers=watched["headers"], timeout=30,
                            params={"actor_id": actor_id, "suffix": "out", "lines": 10000})
    return response.text if response.ok else ""


@pytest.fixture(scope="module")
def training(watched):
    """Waits until every fold worker has logged two evaluation points: the run is training."""
    deadline = time.monotonic() + 300
    trial, workers = fold_workers(watched, deadline)
    second = {w["actor_id"]: f"trial {trial} | fold {w['world_rank']} | point 2/{NUM_POINTS} |" for w in workers}
    while not all(line in worker_log(watched, actor_id) for actor_id, line in second.items()):
        assert watched["proc"].poll() is None, f"raycv tune ended early:\n{watched['console'].read_text()[-4000:]}"
        assert time.monotonic() < deadline, "the fold workers logged no second evaluation point"
        time.sleep(2)
    return {"trial": trial, "workers": workers}


@contextlib.contextmanager
def browser(watched):
    """Debian's chromium, driven by Playwright, sending the cluster's token as a person's browser would."""
    from playwright import sync_api  # the test extra

    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=120_000)
        try:
            context = chromium.new_context(extra_http_headers=watched["headers"],
                                           viewport={"width": 1400, "height": 900})
            page = context.new_page()
            page.set_default_timeout(90_000)
            yield page
        finally:
            chromium.close()


def screenshot(page, name: str) -> None:
    """With RAYCV_SCREENSHOTS=DIR, a full-page PNG of what the browser shows (README's pictures)."""
    directory = os.environ.get("RAYCV_SCREENSHOTS")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(directory) / f"dashboard_{name}.png"), full_page=True)


@pytest.mark.ray
@pytest.mark.needs("chromium")
@pytest.mark.timeout(900)
def test_the_dashboard_shows_each_fold_worker_and_its_progress(watched, training):
    trial, workers = training["trial"], training["workers"]
    url = watched["dashboard"]
    with browser(watched) as page:
        # Overview: the run is the cluster's job.
        page.goto(f"{url}/#/overview")
        page.get_by_text("raycv.cli tune").first.wait_for()
        screenshot(page, "overview")
        # Jobs: the job, with raycv's command line as its entrypoint.
        page.goto(f"{url}/#/jobs")
        page.get_by_text(f"--address {watched['address']} spaces/smoke.yaml").first.wait_for()
        # Actors: every fold is a RayTrainWorker actor; Ray Train gives it no name and no repr, so the page
        # tells the folds apart by actor id and pid (the Train state and the worker's log map them to folds).
        page.goto(f"{url}/#/actors")
        page.get_by_label("Class", exact=True).fill("RayTrainWorker")
        for worker in workers:
            page.get_by_text(worker["actor_id"]).first.wait_for()
        table = page.inner_text("body")
        for worker in workers:
            row = table.split(worker["actor_id"], 1)[1][:600]  # the cells after the actor id, in order
            assert "RayTrainWorker" in row and f"\t{worker['pid']}\t" in row, row
        screenshot(page, "actors")
        # README's way to a fold: its pid (in the console's prefix of its lines) in the PID filter.
        fold_1 = workers[1]
        page.get_by_label("PID", exact=True).fill(str(fold_1["pid"]))
        page.get_by_text(workers[0]["actor_id"]).wait_for(state="detached")
        assert fold_1["actor_id"] in page.inner_text("body")
        # Actors -> a fold worker -> Log (STDOUT): which trial and fold it is, and that fold's progress lines.
        for worker in workers:
            fold = worker["world_rank"]
            page.goto(f"{url}/#/actors/{worker['actor_id']}")
            page.get_by_role("tab", name="STDOUT").click()
            page.get_by_text(f"trial {trial} | fold {fold} | point 2/{NUM_POINTS} |").first.wait_for()
            text = page.inner_text("body")
            assert f"trial {trial} | fold {fold} | fold worker started: world rank {fold} of {NUM_FOLDS}, " \
                   f"pid {worker['pid']}" in text
            assert f"trial {trial} | fold {fold} | point 1/{NUM_POINTS} | step" in text
            other = (fold + 1) % NUM_FOLDS
            assert f"| fold {other} | point" not in text  # its own fold's lines only
            if fold == 1:
                screenshot(page, "actor_log")
        # Metrics: Ray's page (Grafana panels once Grafana is set up; README says how).
        page.goto(f"{url}/#/metrics")
        page.get_by_text("Grafana").first.wait_for()
        screenshot(page, "metrics")


# ---------------------------------------------------------------- Prometheus scraping the node


def session_dir(head: dict) -> Path:
    """The head's session directory (where Ray writes its Prometheus and Grafana configs), from the node's
    record in the dashboard."""
    response = requests.get(f"{head['dashboard']}/nodes?view=summary", timeout=30,
                            headers={"Authorization": f"Bearer {head['token']}"})
    response.raise_for_status()
    (node,) = response.json()["data"]["summary"]
    return Path(node["raylet"]["sessionDir"])


@contextlib.contextmanager
def prometheus_watching(head: dict, home: Path):
    """Debian's Prometheus with the Prometheus config Ray wrote for this session (README's Prometheus step
    runs exactly this file), scraping from before the run starts; yields its port (None without it)."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:  # its test is skipped, or fails in CI (tests/conftest.py)
        yield None
        return
    deadline = time.monotonic() + 120
    while True:  # a head that has just started may not list its node, or have written the config, yet
        with contextlib.suppress(requests.RequestException, ValueError, KeyError):
            config = session_dir(head) / "metrics" / "prometheus" / "prometheus.yml"
            if config.is_file():
                break
        assert time.monotonic() < deadline, "the head wrote no Prometheus config within 120 s"
        time.sleep(2)
    port = free_port()
    proc = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={home / 'tsdb'}"],
        stdout=subprocess.DEVNULL, stderr=(home / "prometheus.log").open("w"), start_new_session=True,
        preexec_fn=die_with_pytest,
    )
    try:
        yield port
    finally:
        kill_group(proc)
        proc.wait()


def prometheus_query(port: int, query: str) -> list[dict]:
    with contextlib.suppress(requests.RequestException):
        answer = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=10)
        return answer.json()["data"]["result"] if answer.ok else []
    return []


@pytest.mark.ray
@pytest.mark.needs("prometheus")
@pytest.mark.timeout(900)
def test_prometheus_scrapes_raycv_metrics_with_the_trials_labels(watched, training):
    # Ray's own Prometheus config for this session scrapes every node listed in the service-discovery file Ray
    # keeps up to date: the head's metrics port is in it.
    config = session_dir(watched) / "metrics" / "prometheus" / "prometheus.yml"
    sd_files = yaml.safe_load(config.read_text())["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert Path(sd_files[0]).is_file() and str(watched["ports"]["metrics"]) in Path(sd_files[0]).read_text()
    port = watched["prometheus_port"]
    # Over the whole run (a series that stopped being exported, as a finished trial's does, is stale for an
    # instant query but its samples stay).
    selector = f'ray_raycv_cv_rmse{{run="watch",trial="{training["trial"]}"}}'
    query = f"max_over_time({selector}[30m])"
    deadline = time.monotonic() + 240
    while not (result := prometheus_query(port, query)):
        assert time.monotonic() < deadline, f"Prometheus never answered {query}"
        time.sleep(3)
    (series,) = result
    assert series["metric"]["run"] == "watch" and series["metric"]["trial"] == training["trial"]
    assert 0.3 < float(series["value"][1]) < 3.0
    # Every fold of the trial, by its label, in the per-fold series.
    # Each fold worker exports its own series from its own process: a later scrape may be the first to see one.
    per_fold = f'max by (fold) (max_over_time(ray_raycv_eval_points{{trial="{training["trial"]}"}}[30m]))'
    while (seen := sorted(s["metric"]["fold"] for s in prometheus_query(port, per_fold))) != [
            str(k) for k in range(NUM_FOLDS)]:
        assert time.monotonic() < deadline, f"Prometheus has the folds {seen} of {NUM_FOLDS}"
        time.sleep(3)


# ---------------------------------------------------------------- what the job's overview counts as failed


ACTOR_GONE = {"ACTOR_DIED", "WORKER_DIED", "TASK_CANCELLED", "NODE_DIED", "ACTOR_UNAVAILABLE",
              "TASK_PLACEMENT_GROUP_REMOVED", "ACTOR_PLACEMENT_GROUP_REMOVED"}  # the trial's placement group removed


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_the_only_failed_tasks_of_a_healthy_run_are_tunes_queue_polls(watched):
    """README: the failed tasks the dashboard counts for a raycv job are `_QueueActor.get` calls that end in
    `ray.util.queue.Empty` -- Tune polling the queue TuneReportCallback reports through -- and nothing else."""
    finished_run(watched)
    report = json.loads((watched["out_dir"] / "report.json").read_text())
    assert [t["status"] for t in report["trials"]] == ["finished"]
    code = (
        "import json; from ray.util.state import list_tasks; "
        f"tasks = list_tasks(address={watched['dashboard']!r}, filters=[('state', '=', 'FAILED')], detail=True, "
        "limit=10000, raise_on_missing_output=False); "
        "print(json.dumps([[t.func_or_class_name, t.error_type, (t.error_message or '').strip()[-200:]] "
        "for t in tasks]))"
    )
    listed = subprocess.run([sys.executable, "-c", code], env={**watched["env"], "RAY_AUTH_MODE": "token"},
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    failed = json.loads(listed.stdout.strip().splitlines()[-1])
    assert failed, "no failed tasks: README's paragraph on _QueueActor.get no longer holds"
    # Besides the polls, at most Train's controller task of the finished trial, ended by its actor's removal.
    others = [f for f in failed if f[0] != "_QueueActor.get"]
    assert all(name == "TrainController.run" and kind in ACTOR_GONE for name, kind, _ in others), others
    assert len(others) <= 1, others
    assert any(name == "_QueueActor.get" for name, _, _ in failed)
    # Each ends in Empty, raised in the queue's actor (a poll still waiting when its trial ends may instead
    # end with the queue's actor, which goes with the trial).
    raised = [message for _, kind, message in failed if kind == "TASK_EXECUTION_EXCEPTION"]
    assert raised and all(message.endswith("ray.util.queue.Empty") for message in raised), raised[:3]


# ---------------------------------------------------------------- the same run: joined, folds on one GPU


def finished_run(watched) -> str:
    """The watched run's console once it has ended (exit 0)."""
    try:
        watched["proc"].wait(timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail(f"raycv tune ran past 600 s:\n{watched['console'].read_text()[-4000:]}")
    console = watched["console"].read_text()
    assert watched["proc"].returncode == 0, console[-4000:]
    return console


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_raycv_tune_joins_a_running_cluster_and_leaves_it_running(watched):
    console = finished_run(watched)
    assert f"joined the Ray cluster at {watched['address']}" in console
    assert (watched["out_dir"] / "report.md").is_file()
    status = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "status", f"--address={watched['address']}"],
                            env=watched["env"], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_folds_share_one_gpu(watched):
    """resources.gpus_per_fold 0.2: the trial's three fold workers are placed together on the head's single
    GPU (a logical one here: this machine has no CUDA, so the folds compute on the CPU) and pool their
    predictions over gloo, which, unlike NCCL, takes several ranks on one device."""
    console = finished_run(watched)
    assert "0.2 GPU + 0.5 CPU per fold" in console
    # Each fold worker held 0.2 of a GPU in the trial's placement group (resources named GPU_group_<pg>), all
    # three in one group on the head's single GPU.
    workers = list_actors(watched["dashboard"], "RayTrainWorker", watched["env"])
    shares = [{k: v for k, v in (w["required_resources"] or {}).items() if re.fullmatch(r"GPU_group_[0-9a-f]+", k)}
              for w in workers]
    shares = [share for share in shares if share]
    assert len(shares) == 3 and all(list(share.values()) == [pytest.approx(0.2)] for share in shares), workers
    assert len({key for share in shares for key in share}) == 1  # one placement group: one trial
