"""`ray up` for real: every command cluster-onprem.yaml's header shows, as written (only its placeholders
replaced, and the smoke space, shrunk, for base.yaml), run against three machines on this one.

tests/ray_up_namespace.sh makes them inside a PID, network and mount namespace of the test's own (as root;
CI runs the tests as root): the user's machine, a head and a worker, each node with Debian's sshd on port
22 of its own address, its own home, /tmp and a copy-on-write view of this venv. The launcher (`ray up`),
the Jobs API (`ray job submit`/`logs`), `ray rsync-down`, `ray exec` and `ray down` then work as they do
for a user. Inside, nothing reaches the package index, so what setup_commands install is prepared first:
the venv itself (each node's ~/raycv-venv) and a one-wheel mirror with setuptools for pip's editable build.

This file is also the script the user's machine runs inside the namespaces (`python tests/test_ray_up.py
--inside`): it runs the commands and writes what it saw to ~/ray_up_results.json; the test asserts on it.
Every process it started ends with the namespace: the test kills the namespace's init process.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
NAMESPACE_SCRIPT = TESTS_DIR / "ray_up_namespace.sh"
ONPREM_YAML = "cluster-onprem.yaml"
HEAD_IP, WORKER_IP = "10.250.0.1", "10.250.0.2"
# Placeholders of cluster-onprem.yaml and what they are here (the nodes' user is root: home /root).
PLACEHOLDERS = {"HEAD-IP": HEAD_IP, "WORKER-IP": WORKER_IP, "/home/YOUR-USER": "/root", "YOUR-USER": "root"}
# The documented runs use base.yaml (StructBERT large, GPUs); here the smoke space: one trial, 2 folds, 1 epoch.
# Each fold reserves a resource only the worker offers (as a GPU would on a real cluster), so the folds must
# run on the worker node, the trial drivers on the head (raycv_driver).
FOLD_RESOURCE = "raycv_fold"
SMALL = ["search.params={}", "search.num_samples=1", "data.num_folds=2", "data.max_rows=300", "train.epochs=1",
         "scheduler.type=none",
         f"resources.custom_per_fold.{FOLD_RESOURCE}=1"]
# The whole scenario (each command has its own, smaller limit). About 4 minutes on 2 idle cores; generous
# because a machine shared with other test runs (load average 30+ on 2 cores, seen here) took 13.
INSIDE_TIMEOUT = 1080


def header_commands(yaml_text: str) -> list[str]:
    """The shell commands in a cluster YAML's header: its first block of `#   ` lines, continuations joined."""
    commands, current = [], ""
    for line in yaml_text.splitlines():
        if not line.startswith("#"):
            break
        if not (line.startswith("#   ") or current):
            if commands:
                break
            continue
        text = line[1:].strip()
        current = f"{current} {text}" if current else text
        if current.endswith("\\"):
            current = current[:-1].rstrip()
        else:
            commands.append(current)
            current = ""
    return commands


# ---------------------------------------------------------------- the test (outside the namespaces)


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def _check_machine() -> None:
    missing = [tool for tool in ("unshare", "ip", "ssh", "ssh-keygen", "rsync") if not shutil.which(tool)]
    if not Path("/usr/sbin/sshd").is_file():
        missing.append("sshd (Debian: openssh-server)")
    if missing:
        _unavailable(f"missing {', '.join(missing)} (apt-get install openssh-server openssh-client rsync iproute2)")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--net", "--mount", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        _unavailable(f"cannot create PID/network/mount namespaces (run as root): {probe.stderr.strip()}")


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)
    return Path(f"{path}.pub").read_text()


def _prepare(base: Path, train_csv: Path) -> None:
    """The user's machine (a checkout with data/train.csv, an SSH key) and the two nodes' homes."""
    client_home = base / "client" / "home"
    (client_home / ".ssh").mkdir(parents=True, mode=0o700)
    public_key = _keygen(client_home / ".ssh" / "id_ed25519")

    # The user's checkout: the working tree's files that git does not ignore, plus the data (git-ignored).
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_DIR,
                           capture_output=True, text=True, check=True, timeout=60).stdout.split("\0")
    checkout = client_home / "raycv"
    for name in filter(None, files):
        source = REPO_DIR / name
        if source.is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, checkout / name)
    (checkout / "data").mkdir()
    shutil.copy(train_csv, checkout / "data" / "train.csv")
    text = (checkout / ONPREM_YAML).read_text()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    (checkout / ONPREM_YAML).write_text(text)

    # A mirror of the package index with what pip's isolated editable build needs (setup_commands' pip
    # finds everything else already installed in the venv).
    wheels = base / "wheels"
    download = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                               "-d", str(wheels), "setuptools>=68"], capture_output=True, text=True, timeout=300)
    if download.returncode != 0:
        _unavailable(f"cannot fetch the setuptools wheel for the nodes' offline pip: {download.stderr[-500:]}")
    for node in ("head", "worker"):
        home = base / node / "home"
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        (home / ".ssh" / "authorized_keys").write_text(public_key)
        (home / ".sshd").mkdir(mode=0o700)
        _keygen(home / ".sshd" / "host_key")
        (base / node / "tmp").mkdir(mode=0o1777)
        (home / "raycv-venv").symlink_to(sys.prefix)  # "already installed": setup_commands reuse it
        shutil.copytree(wheels, home / "wheels")
        (home / ".config" / "pip").mkdir(parents=True)
        (home / ".config" / "pip" / "pip.conf").write_text(
            "[global]\nno-index = true\nfind-links = /root/wheels\n")
        worker_only = f"export RAY_OVERRIDE_RESOURCES='{{\"{FOLD_RESOURCE}\": 100}}'\n"
        (home / ".bashrc").write_text(worker_only if node == "worker" else "")
    (base / "client" / "tmp").mkdir(mode=0o1777)


def _end_namespace(proc: subprocess.Popen) -> None:
    """SIGKILL the namespace's init (the child of `unshare --fork`): the kernel then kills every process
    in the namespace and the ones nested in it -- sshd, Ray, everything the scenario started."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    try:
        for pid in children.read_text().split():
            os.kill(int(pid), signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.ray
@pytest.mark.timeout(INSIDE_TIMEOUT + 120)
def test_ray_up_onprem_cluster_as_documented(tmp_path, train_csv):
    _check_machine()
    base = tmp_path / "machines"
    try:
        _prepare(base, train_csv)
        log_path = tmp_path / "inside.log"
        started = time.monotonic()
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--mount",
                 "bash", str(NAMESPACE_SCRIPT), str(base), sys.prefix, sys.base_prefix, "--",
                 sys.executable, str(Path(__file__).resolve()), "--inside"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            try:
                proc.wait(timeout=INSIDE_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
            finally:
                timed_out = proc.poll() is None
                _end_namespace(proc)
        wall = time.monotonic() - started
        log_text = log_path.read_text()
        results_path = base / "client" / "home" / "ray_up_results.json"
        assert results_path.is_file(), f"no results ({wall:.0f} s, timed out: {timed_out}):\n{log_text[-8000:]}"
        results = json.loads(results_path.read_text())
        print(f"ray up scenario: {wall:.0f} s; steps: " +
              ", ".join(f"{s['command'][:40]} {s['seconds']:.0f}s" for s in results["steps"]))
        _assert_scenario(results, log_text, timed_out)
    finally:
        shutil.rmtree(base / "client" / "home" / "raycv", ignore_errors=True)


def _assert_scenario(results: dict, log_text: str, timed_out: bool) -> None:
    steps = results["steps"]
    failed = [s for s in steps if s["returncode"] != 0]
    assert not failed and not results.get("error") and not timed_out, (
        f"failed: {[s['command'] for s in failed]}; error: {results.get('error')}; timed out: {timed_out}\n"
        + "\n".join(f"$ {s['command']}\n{s['output'][-3000:]}" for s in failed) + "\n" + log_text[-4000:])
    ran = [s["command"] for s in steps]
    documented = header_commands((REPO_DIR / ONPREM_YAML).read_text())
    assert len([c for c in documented if not c.startswith("export ")]) == len(ran), (documented, ran)

    # Both nodes joined. Setup found the venv each node already had (as after a restart) and kept it, with
    # no package index in reach.
    assert sorted(results["node_ips"]) == [HEAD_IP, WORKER_IP]
    assert results["setup_reused"]
    # The job's folds ran on the worker node, the trial driver on the head.
    assert len(results["fold_worker_ips"]) >= 2 and set(results["fold_worker_ips"]) == {WORKER_IP}
    assert results["trial_driver_ips"] and set(results["trial_driver_ips"]) == {HEAD_IP}
    job_logs = next(s for s in steps if s["command"].startswith("ray job logs"))["output"]
    assert "report: /root/raycv/runs/base/report.md" in job_logs
    # The report came down with rsync-down and was rebuilt here; `raycv tune --address auto` ran on the head.
    assert {"report.md", "report.json"} <= set(results["fetched_report"])
    assert results["rebuilt_report"] and len(results["rebuilt_report_json"]["trials"]) == 1
    exec_tune = next(s for s in steps if s["command"].startswith("ray exec") and "raycv tune" in s["command"])
    assert "joined the Ray cluster" in exec_tune["output"]
    assert results["nodes_after_down"] == 0


# ---------------------------------------------------------------- the scenario (inside the namespaces)


def _inside() -> int:
    checkout = Path.cwd()
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{venv_bin}:{env['PATH']}"  # the user's activated venv (raycv and ray installed)
    results: dict = {"steps": []}
    results_path = Path.home() / "ray_up_results.json"
    dashboard = None

    def run(command: str, timeout: float) -> str:
        started = time.monotonic()
        print(f"$ {command}", flush=True)
        try:
            proc = subprocess.run(["bash", "-c", command], cwd=checkout, env=env, timeout=timeout,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True)
            returncode, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            returncode, output = 124, f"ran past {timeout} s\n{exc.stdout or ''}{exc.stderr or ''}"
        print(output[-2000:], flush=True)
        results["steps"].append({"command": command, "returncode": returncode, "output": output[-20000:],
                                 "seconds": time.monotonic() - started})
        results_path.write_text(json.dumps(results))
        if returncode != 0:
            raise RuntimeError(f"{command!r} exited {returncode}")
        return output

    try:
        for command in header_commands((checkout / ONPREM_YAML).read_text()):
            if "raycv tune search_spaces/base.yaml" in command:
                command = command.replace("search_spaces/base.yaml", "search_spaces/smoke.yaml " + " ".join(SMALL))
            if "JOB_ID" in command:
                command = command.replace("JOB_ID", results["job_id"])
            if command.startswith("export "):
                for assignment in shlex.split(command, comments=True)[1:]:
                    name, value = assignment.split("=", 1)
                    env[name] = value
                continue
            if command.startswith("ray dashboard"):  # an SSH tunnel that stays open: in the background
                print(f"$ {command} &", flush=True)
                dashboard = subprocess.Popen(["bash", "-c", command], cwd=checkout, env=env,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                results["steps"].append({"command": command, "returncode": 0, "output": "", "seconds": 0})
                _wait_for_worker(results)
                continue
            if command.startswith("ray job submit"):
                command += " run.name=job"
            if command.startswith("ray exec") and "raycv tune" in command:
                command = command[:-1] + " run.name=onhead" + command[-1]
            output = run(command, timeout=420 if "raycv tune" in command or command.startswith("ray up") else 120)
            if command.startswith("ray up"):  # the nodes' venv was there: setup reused it, offline
                results["setup_reused"] = "Requirement already satisfied: torch" in output
            if command.startswith("ray job submit"):
                results["job_id"] = re.search(r"(raysubmit_\w+)", output).group(1)
                _where_actors_ran(results)
            report_dir = checkout / "runs" / "base"
            if command.startswith("ray rsync-down"):
                results["fetched_report"] = sorted(p.name for p in report_dir.glob("report.*"))
                (report_dir / "report.md").unlink()  # so the next command's report is its own
            if command.startswith("raycv report"):
                results["rebuilt_report"] = (report_dir / "report.md").is_file()
                results["rebuilt_report_json"] = json.loads((report_dir / "report.json").read_text())
            if command.startswith("ray down"):
                results["nodes_after_down"] = _alive_nodes_after_down()
    except Exception as exc:  # noqa: BLE001 -- recorded for the test's message
        results["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if dashboard is not None:
            dashboard.terminate()
        results_path.write_text(json.dumps(results))
    return 0 if "error" not in results else 1


def _state(function: str, **kwargs):
    import ray.util.state as state

    return getattr(state, function)(address="http://localhost:8265", raise_on_missing_output=False, **kwargs)


def _wait_for_worker(results: dict) -> None:
    """Once the tunnel answers: wait for the worker (the head's autoscaler starts it after `ray up`)."""
    deadline = time.monotonic() + 240
    while True:
        try:
            nodes = [n for n in _state("list_nodes") if n.state == "ALIVE"]
            if len(nodes) >= 2:
                break
        except Exception:  # noqa: BLE001 -- the tunnel or the head still starting
            nodes = []
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not join within 240 s; alive: {[n.node_ip for n in nodes]}")
        time.sleep(2)
    results["node_ips"] = [n.node_ip for n in nodes]


def _where_actors_ran(results: dict) -> None:
    ips = {n.node_id: n.node_ip for n in _state("list_nodes")}
    actors = _state("list_actors", detail=True, limit=10000)
    results["fold_worker_ips"] = [ips.get(a.node_id) for a in actors if a.class_name == "RayTrainWorker"]
    results["trial_driver_ips"] = [ips.get(a.node_id) for a in actors if a.class_name == "ImplicitFunc"]
    results["actors"] = [(a.class_name, ips.get(a.node_id), a.state) for a in actors]


def _alive_nodes_after_down() -> int:
    try:
        return len([n for n in _state("list_nodes", timeout=10) if n.state == "ALIVE"])
    except Exception:  # noqa: BLE001 -- nothing answers: the head is gone
        return 0


if __name__ == "__main__" and sys.argv[1:] == ["--inside"]:
    os.environ["RAY_AUTH_MODE"] = "token"  # this process's own state API calls (Ray reads it at import)
    sys.exit(_inside())
