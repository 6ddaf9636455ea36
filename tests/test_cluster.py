"""Running on a Ray cluster: cluster.yaml and cluster-onprem.yaml pass Ray's own validation, share everything
that is not provisioning and keep the security settings (tests/test_ray_up.py runs `ray up` for real); a
real head (`ray start --head`, token authentication on) takes the smoke run as a Ray job that `ray job stop`
interrupts and a second job with --resume finishes, and raycv's metrics appear on the node's Prometheus
endpoint (`raycv tune --address` joining a head, and folds sharing one GPU, are shown by
tests/test_dashboard.py's watched run).

Every command here has a hard time limit; the head is stopped at the end whatever happens.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from raycv.cluster import DRIVER_RESOURCE, JOB_STOP_WAIT_S

from helpers import REPO_DIR, free_port, ray_head

REPO = REPO_DIR
CLUSTER_YAML = REPO / "cluster.yaml"
ONPREM_YAML = REPO / "cluster-onprem.yaml"
SHARED_MARK = "# ---- From here to the end"
# What both launcher configs share: setup, start commands (token auth, dashboard on loopback, metrics port), mounts.
SHARED_KEYS = ["file_mounts", "rsync_exclude", "initialization_commands", "setup_commands", "head_setup_commands",
               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"]
# 1 trial, 3 evaluation points
SMALL = ["'search.params={train.lr: {grid: [0.003]}}'", "train.epochs=3"]


# ---------------------------------------------------------------- cluster.yaml (no Ray started)


def load_cluster_yaml() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_validation():
    """The checks `ray up` runs before it launches anything: defaults filled in, then the JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load_cluster_yaml()))


def test_onprem_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(ONPREM_YAML.read_text())
    assert config["provider"]["type"] == "local"
    assert {"head_ip", "worker_ips"} <= set(config["provider"]) and config["auth"]["ssh_private_key"]
    validate_config(prepare_config(config))


def test_both_configs_share_everything_but_provisioning():
    """Ray's YAML has no includes: the shared part is byte-identical (from the marker line to the end)."""
    aws, onprem = CLUSTER_YAML.read_text(), ONPREM_YAML.read_text()
    assert aws.count(SHARED_MARK) == onprem.count(SHARED_MARK) == 1
    assert aws[aws.index(SHARED_MARK):] == onprem[onprem.index(SHARED_MARK):]
    aws_config, onprem_config = yaml.safe_load(aws), yaml.safe_load(onprem)
    assert {key: aws_config[key] for key in SHARED_KEYS} == {key: onprem_config[key] for key in SHARED_KEYS}
    assert set(onprem_config) - set(SHARED_KEYS) == {"cluster_name", "provider", "auth"}


def test_setup_needs_only_the_package_index_and_is_idempotent():
    setup = load_cluster_yaml()["setup_commands"]
    text = " ".join(setup)
    assert not re.search(r"\b(curl|wget|http://|https://)", text), "setup fetches only through pip (the package index)"
    assert all(re.search(r"(\|\||pip install)", command) for command in setup)  # guarded, or pip (keeps what is there)
    assert setup[0].startswith("test -x ~/raycv-venv/bin/python ||")


def header_commands(path) -> list[str]:
    from test_ray_up import header_commands as parse

    return parse(path.read_text())


def test_documented_jobs_name_data_and_output_on_the_nodes():
    """A job runs in an uploaded copy of the checkout without the git-ignored data/ and models/: the headers'
    job commands name the data, the output and the storage by their place on the nodes."""
    for path, home in ((CLUSTER_YAML, "/home/ubuntu"), (ONPREM_YAML, "/home/YOUR-USER")):
        jobs = [c for c in header_commands(path) if c.startswith("ray job submit")]
        assert len(jobs) == 1, path
        assert f"data.path={home}/raycv/data/train.csv" in jobs[0]
        assert f"run.output_dir={home}/raycv/runs/base" in jobs[0]
        assert "run.storage_path=" in jobs[0]
        assert f"ray rsync-down {path.name} {home}/raycv/runs/base runs/" in header_commands(path)


def test_aws_header_commands_are_the_onprem_ones_test_ray_up_runs():
    """Every command cluster.yaml's header shows is one cluster-onprem.yaml's header shows (which
    tests/test_ray_up.py runs as written), with the config's name, the nodes' home and the storage replaced."""
    def as_aws(command: str) -> str:
        command = re.sub(r"\s+#.*", "", command)
        for onprem, aws in (("cluster-onprem.yaml", "cluster.yaml"), ("/home/YOUR-USER", "/home/ubuntu"),
                            ("/mnt/shared/raycv", "s3://YOUR-BUCKET/raycv")):
            command = command.replace(onprem, aws)
        return command

    onprem = [as_aws(c) for c in header_commands(ONPREM_YAML) if "RAY_UP_enable_autoscaler_v2" not in c]
    assert [as_aws(c) for c in header_commands(CLUSTER_YAML)] == onprem


def test_ray_validation_rejects_a_broken_edit():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = load_cluster_yaml()
    broken["available_node_types"]["gpu"]["max_worker"] = 4
    with pytest.raises(ValidationError):
        validate_config(prepare_config(broken))


def test_cluster_yaml_security_settings():
    config = load_cluster_yaml()
    text = CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in re.sub(r"#.*", "", text), "nothing may listen on or be opened to every address"
    # Every node in the user's own security group, so the launcher never creates one with SSH from anywhere.
    groups = {tuple(t["node_config"]["SecurityGroupIds"]) for t in config["available_node_types"].values()}
    assert len(groups) == 1 and all(groups)
    assert "security_group" not in config["provider"]
    # Token authentication on every node, the token file mounted to every node.
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in starts if "ray start" in cmd)
    assert sum("ray start" in cmd for cmd in starts) == 2
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # The dashboard (and with it the Jobs API) on the head's loopback only.
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--metrics-export-port=" in head_start
    assert "--resources='{\"raycv_driver\": 100}'" in head_start  # also on cluster-onprem.yaml's head


def test_cluster_yaml_installs_this_raycv_and_ray_version():
    import ray

    config = load_cluster_yaml()
    setup = " ".join(config["setup_commands"])
    assert config["file_mounts"]["~/raycv"] == "."
    assert "-e ~/raycv" in setup and "torch>=2.4,<3" in setup
    pinned = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert pinned == ray.__version__
    gpu = config["available_node_types"]["gpu"]
    assert gpu["node_config"]["InstanceType"].startswith(("g5.", "g6.", "g6e.", "p4", "p5"))
    assert config["available_node_types"]["head"]["resources"] == {"GPU": 0, DRIVER_RESOURCE: 100}
    assert all(DRIVER_RESOURCE not in t["resources"] for name, t in config["available_node_types"].items()
               if name != "head")  # trial drivers never land on a GPU node
    assert config["available_node_types"]["gpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"


@pytest.mark.parametrize("wait, says", [(None, "3 s"), ("3", "3 s"), ("59.5", "59.5 s"), ("x", "3 s"),
                                         ("60", None), (str(JOB_STOP_WAIT_S), None)])
def test_a_job_tells_when_ray_job_stop_would_sigkill_it_first(wait, says):
    """Only a Ray job's entrypoint (Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR there) hears about the stop's wait,
    and only when the wait is short; Ray's JobSupervisor reads the same variable, default 3 s."""
    from raycv.cluster import job_stop_note

    env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}", **({"RAY_JOB_STOP_WAIT_TIME_S": wait} if wait else {})}
    note = job_stop_note(env)
    assert note == (None if says is None else
                    f"note: `ray job stop` gives this run {says} (RAY_JOB_STOP_WAIT_TIME_S) before SIGKILL, too little "
                    "to end it as interrupted with its state saved; submit it with --runtime-env-json "
                    f"'{{\"env_vars\": {{\"RAY_JOB_STOP_WAIT_TIME_S\": \"{JOB_STOP_WAIT_S}\"}}}}' (docs/cluster.md)")
    assert job_stop_note({k: v for k, v in env.items() if k != "RAY_JOB_CONFIG_JSON_ENV_VAR"}) is None
    if note:  # the flag it names is what cluster.md submits with
        assert json.loads(note.split("--runtime-env-json '")[1].split("'")[0]) == \
            {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(JOB_STOP_WAIT_S)}}
        assert note.split("--runtime-env-json ")[1].split(" (docs")[0] in (REPO / "docs" / "cluster.md").read_text()


# ---------------------------------------------------------------- a real head


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` as cluster.yaml starts it (token authentication, dashboard on loopback)."""
    with ray_head(tmp_path_factory.mktemp("head"), ["--num-cpus=2"]) as info:
        yield info


def raycv_metrics(metrics_port: int) -> dict[str, list[tuple[dict, float]]]:
    """raycv's series on the node's Prometheus endpoint: name -> [(labels, value)]."""
    try:
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    except requests.RequestException:
        return {}
    found: dict[str, list] = {}
    for line in text.splitlines():
        match = re.match(r"^(ray_raycv_\w+)\{([^}]*)\} ([-\d.eE+]+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            found.setdefault(match.group(1), []).append((labels, float(match.group(3))))
    return found


def submit(client, entrypoint: str, runtime_env: dict) -> str:
    deadline = time.monotonic() + 120
    while True:  # a head that has just started may have no job agent yet
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def follow(client, job_id: str, head: dict, metrics: dict, until, timeout: float) -> str:
    """Poll the job until `until(status, logs)`, collecting the node's raycv metrics meanwhile; the status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        for name, series in raycv_metrics(head["ports"]["metrics"]).items():
            metrics.setdefault(name, []).extend(series)
        if until(status, client.get_job_logs(job_id)):
            return status
        time.sleep(2)
    raise AssertionError(f"job {job_id} {status} after {timeout} s:\n{client.get_job_logs(job_id)[-5000:]}")


@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_smoke_run_as_a_ray_job_stopped_resumed_and_with_metrics(head, train_csv, tmp_path):
    """The run as docs/cluster.md submits it: `ray job stop` mid-trial ends it as `interrupted` (with the
    wait the docs give the stop: Ray's own 3 s end it by SIGKILL before its state is saved), and the same
    command with --resume, submitted again, finishes it."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    # Token authentication is on: without the token the Jobs API refuses.
    assert requests.get(f"{head['dashboard']}/api/jobs/", timeout=30).status_code in (401, 403)
    client = JobSubmissionClient(head["dashboard"], headers={"Authorization": f"Bearer {head['token']}"})
    out_dir = tmp_path / "job_run"
    entrypoint = (f"raycv tune search_spaces/smoke.yaml data.path={train_csv} run.name=job "
                  f"run.output_dir={out_dir} " + " ".join(SMALL))
    runtime_env = {"working_dir": str(REPO), "excludes": [".venv", ".git", "runs", ".pytest_cache"]}
    ended = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    metrics: dict = {}

    # 1. Submitted as the docs say; stopped once the trial has pooled its first point.
    stop_wait = {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(JOB_STOP_WAIT_S)}}
    first = submit(client, entrypoint, {**runtime_env, **stop_wait})
    follow(client, first, head, metrics, timeout=600,
           until=lambda status, logs: status in ended or re.search(r"\| point 1/3 \| step \d+/\d+ \| cv_rmse", logs))
    client.stop_job(first)
    stopped_at = time.monotonic()
    status = follow(client, first, head, metrics, timeout=JOB_STOP_WAIT_S + 60,
                    until=lambda status, logs: status in ended)
    waited = time.monotonic() - stopped_at
    logs = client.get_job_logs(first)
    assert status == JobStatus.STOPPED, f"job {status}:\n{logs[-5000:]}"
    supervisor = (Path(head["temp_dir"]) / "session_latest" / "logs" / "jobs" / f"supervisor-{first}.log").read_text()
    assert "has been terminated gracefully with SIGTERM" in supervisor, supervisor[-3000:]  # not SIGKILLed
    assert waited < JOB_STOP_WAIT_S - 30, f"the stop took {waited:.0f} s"
    assert "ray job stop` gives this run" not in logs
    assert "trials: 1 (1 interrupted)" in logs
    assert re.search(r"^interrupted: 1 trial\(s\) cut short.*continue with: raycv tune .* --resume$", logs, re.M)
    (trial,) = json.loads((out_dir / "run.json").read_text())["trials"]
    assert trial["status"] == "interrupted"

    # 2. The same command with --resume, submitted without the stop's wait: raycv says what a stop would do.
    second = submit(client, f"{entrypoint} --resume", runtime_env)
    status = follow(client, second, head, metrics, timeout=720, until=lambda status, logs: status in ended)
    logs = client.get_job_logs(second)
    assert status == JobStatus.SUCCEEDED, f"job {status}:\n{logs[-5000:]}"
    assert "note: `ray job stop` gives this run 3 s (RAY_JOB_STOP_WAIT_TIME_S) before SIGKILL" in logs

    # The Jobs view lists the job with its entrypoint and logs; the logs name the report, which exists.
    listed = {job.submission_id: job for job in client.list_jobs()}
    assert listed[second].entrypoint.startswith("raycv tune search_spaces/smoke.yaml")
    assert f"report: {out_dir / 'report.md'}" in logs
    report = json.loads((out_dir / "report.json").read_text())
    assert [t["status"] for t in report["trials"]] == ["finished"]
    assert report["trials"][0]["trial_id"] == trial["trial_id"]

    # raycv's own metrics reached the node's Prometheus endpoint with sensible values.
    for name in ("ray_raycv_cv_rmse", "ray_raycv_cv_rmse_best", "ray_raycv_fold_rmse",
                 "ray_raycv_train_samples_per_second", "ray_raycv_eval_points"):
        assert metrics.get(name), f"{name} never appeared; saw {sorted(metrics)}"
    assert all(0.3 < value < 3.0 for _, value in metrics["ray_raycv_cv_rmse"])
    assert {labels["fold"] for labels, _ in metrics["ray_raycv_fold_rmse"]} == {"0", "1", "2"}
    assert {labels["run"] for labels, _ in metrics["ray_raycv_cv_rmse"]} == {"job"}
    assert all(value > 0 for _, value in metrics["ray_raycv_train_samples_per_second"])
    assert max(value for _, value in metrics["ray_raycv_eval_points"]) >= 1
    trial_ids = {t["trial_id"] for t in report["trials"]}
    assert {labels["trial"] for labels, _ in metrics["ray_raycv_cv_rmse"]} <= trial_ids

    # The dashboard's Train view: each trial is a Train run named after its trial id, with one worker per
    # fold, listed by world rank (= fold index).
    response = requests.get(f"{head['dashboard']}/api/train/v2/runs/v1", timeout=60,
                            headers={"Authorization": f"Bearer {head['token']}"})
    assert response.status_code == 200, response.text[:500]
    runs = {run["name"]: run for run in response.json()["train_runs"]}
    for trial_id in trial_ids:
        attempt = runs[f"train_{trial_id}"]["attempts"][-1]
        assert sorted(worker["world_rank"] for worker in attempt["workers"]) == [0, 1, 2]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_trial_whose_resources_never_come_fails_in_one_line(head, train_csv, tmp_path):
    """Fold workers that want a resource no node has (an autoscaler that cannot add the node, a GPU type
    nobody offers) wait run.resource_wait_s, not forever: the trial ends as an error naming what it waited
    for, and the run ends."""
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    out_dir = tmp_path / "starved"
    proc = subprocess.run(
        [sys.executable, "-m", "raycv.cli", "tune", "--address", head["address"], "spaces/smoke.yaml",
         f"data.path={train_csv}", f"run.output_dir={out_dir}", "search.params={train.lr: {grid: [0.003]}}",
         "resources.custom_per_fold={raycv_absent: 1}", "run.resource_wait_s=15"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=480,
    )
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]  # no trial produced a result
    assert "waiting for the autoscaler: one trial needs" in proc.stdout
    (trial,) = json.loads((out_dir / "report.json").read_text())["trials"]
    assert trial["status"] == "error"
    assert trial["reason"] == ("waited 15 s (run.resource_wait_s) for 3 fold workers of 0.5 CPU, 1 raycv_absent "
                               "each, which the cluster never had free; free or add them, lower "
                               "resources.*_per_fold, or raise run.resource_wait_s")
    assert f"trial {trial['trial_id']} error: waited 15 s" in proc.stdout


def test_joining_a_cluster_that_is_not_there_is_one_line_and_status_2(tmp_path, train_csv):
    proc = subprocess.run(
        [sys.executable, "-m", "raycv.cli", "tune", "--address", f"127.0.0.1:{free_port()}", "spaces/smoke.yaml",
         f"data.path={train_csv}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("raycv: error: cannot join the Ray cluster")
    assert not (tmp_path / "runs").exists()
