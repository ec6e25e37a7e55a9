"""On real infrastructure started by the project's own scripts: a two-node Ray cluster (`ray start`,
token auth, loopback), an MLflow server on PostgreSQL, sweeps submitted with `make sweep
RAY_ADDRESS=...` as a user would; faults, security, the UI in Debian's chromium."""

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sweeps.spec import load_spec

from .conftest import ROOT
from .sweep_helpers import assert_complete, kill_group, run_sweep, runs, steps, sweep_env, wait_for

pytestmark = pytest.mark.integration
LOCAL = ROOT / "sweeps" / "cluster" / "local"
SPECS = ROOT / "tests" / "specs"
PORTS = {"RAY_GCS_PORT": "6391", "RAY_DASHBOARD_PORT": "8276", "RAY_PORT_BASE": "23000",
         "PG_PORT": "5434", "MLFLOW_PORT": "5002"}
ARTIFACTS = ROOT / "runs" / "ci-artifacts"


def chromium(playwright):
    """Debian's chromium, headless, without the background connections this closed network refuses."""
    return playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])


def sh(*args, env, timeout=300):
    proc = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def stack():
    """Cluster and tracking server up for the module, down (by PID) afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="study-stack-"))
    os.chmod(tmp, 0o755)  # PostgreSQL's own user reads its folder
    env = {**os.environ, **PORTS, "CLUSTER_DIR": str(tmp / "cluster"),
           "MLFLOW_DIR": str(tmp / "mlflow"), "HOME": str(tmp / "home")}
    (tmp / "home").mkdir()
    try:
        sh(LOCAL / "ray-cluster.sh", "up", env=env)
        sh(LOCAL / "mlflow-server.sh", "up", env=env)
        client_env = {**env, "RAY_ADDRESS": f"http://127.0.0.1:{PORTS['RAY_DASHBOARD_PORT']}",
                      "RAY_AUTH_MODE": "token",
                      "RAY_AUTH_TOKEN_PATH": str(tmp / "cluster" / "auth_token"),
                      "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{PORTS['MLFLOW_PORT']}",
                      "OPTUNA_STORAGE": f"postgresql+psycopg2://mlflow@127.0.0.1:{PORTS['PG_PORT']}/optuna",
                      "PGPASSFILE": str(tmp / "mlflow" / "pgpass"), "STORAGE": str(tmp / "storage")}
        yield tmp, env, client_env
    finally:
        subprocess.run([LOCAL / "mlflow-server.sh", "down"], env=env, timeout=120)
        subprocess.run([LOCAL / "ray-cluster.sh", "down"], env=env, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


def make_sweep(spec: Path, env: dict, *settings: str) -> subprocess.Popen:
    args = ["make", "--no-print-directory", "sweep", f"SPEC={spec.relative_to(ROOT)}", *settings]
    args += [f"{k}={env[k]}" for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "STORAGE")]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def children(env, spec):
    return [r for r in runs(env, spec.experiment) if r.data.tags.get("sweep.role") == "trial"]


def test_a_sweep_submitted_with_make_sweep_runs_on_both_nodes(stack, monkeypatch):
    _, _, env = stack
    spec = load_spec(SPECS / "cluster_smoke.yaml")
    out = finish(make_sweep(SPECS / "cluster_smoke.yaml", env))
    assert "succeeded" in out and "4 trials, 0 failed" in out
    done = assert_complete(spec, env)
    nodes = {json.loads(c.data.tags["trial.placement"])["node"] for c in done}
    assert len(nodes) == 2, nodes  # the head and the worker node both ran trials
    import optuna  # the searcher's study, in the tracking server's PostgreSQL

    monkeypatch.setenv("PGPASSFILE", env["PGPASSFILE"])
    study = optuna.load_study(study_name=spec.sweep_id, storage=env["OPTUNA_STORAGE"])
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * spec.num_trials


def test_services_listen_on_loopback_and_require_the_token(stack):
    tmp, env, client = stack
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    for port in (PORTS["RAY_DASHBOARD_PORT"], PORTS["MLFLOW_PORT"], PORTS["PG_PORT"]):
        addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines()
                     if line.split()[3].endswith(f":{port}")}
        assert addresses == {"127.0.0.1"}, (port, addresses)
    no_token = {k: v for k, v in client.items() if k not in ("RAY_AUTH_TOKEN_PATH",)}
    proc = subprocess.run([ROOT / ".venv" / "bin" / "ray", "job", "list", "--address",
                           client["RAY_ADDRESS"]], env=no_token, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0  # the Jobs API refuses a client without the token
    proc = subprocess.run([ROOT / ".venv" / "bin" / "ray", "status", "--address",
                           f"127.0.0.1:{PORTS['RAY_GCS_PORT']}"], env=no_token,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Authentication" in proc.stdout + proc.stderr


def test_no_secret_reaches_mlflow(stack):
    tmp, env, client_env = stack
    token = (tmp / "cluster" / "auth_token").read_text().strip()
    password = (tmp / "mlflow" / "pgpass").read_text().strip().rsplit(":", 1)[1]
    client = MlflowClient(client_env["MLFLOW_TRACKING_URI"])
    seen = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            seen += [json.dumps(run.data.params), json.dumps(run.data.tags)]
            folder = client.download_artifacts(run.info.run_id, "", tempfile.mkdtemp())
            seen += [p.read_text(errors="ignore") for p in Path(folder).rglob("*") if p.is_file()]
    assert len(seen) > 10
    assert not [s for s in seen if token in s or password in s]


def test_mlflow_ui_shows_the_sweep_in_a_browser(stack):
    from playwright.sync_api import sync_playwright

    _, _, env = stack
    spec = load_spec(SPECS / "cluster_smoke.yaml")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cluster-smoke")
    trial = [r for r in client.search_runs([experiment.experiment_id])
             if r.data.tags.get("sweep.role") == "trial"][0]
    base = env["MLFLOW_TRACKING_URI"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = chromium(p)
        page = browser.new_page(viewport={"width": 2400, "height": 900})
        printed = subprocess.run(  # what `make ui` prints, for this server
            [ROOT / ".venv" / "bin" / "python", "-m", "sweeps", "ui", "--tracking-uri", base,
             "--base", base], capture_output=True, text=True, timeout=120, cwd=ROOT).stdout
        [address] = [line.split(": ", 1)[1] for line in printed.splitlines()
                     if line.strip().startswith("cluster-smoke: ")]
        page.goto(address)
        page.get_by_text(re.compile(r"^cluster-smoke-[0-9a-f]{8}$")).first.wait_for(timeout=60_000)
        assert "/runs" in page.url and "Model training" in page.content()
        page.get_by_text(f"{len(children(env, spec)) + 1} matching runs").wait_for(timeout=30_000)
        for column in ("best/val/accuracy_binary", "trials/finished", "trials/failed", "Dataset",
                       "Source", "Description"):  # the parent's summary and MLflow's own columns
            page.get_by_text(column, exact=True).first.wait_for(timeout=30_000)
        page.get_by_text("Sweep of tests/specs/cluster_smoke.yaml").first.wait_for(timeout=30_000)
        page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()  # expand
        for child in children(env, spec):
            page.get_by_text(child.info.run_name, exact=True).wait_for(timeout=30_000)
        page.get_by_text(re.compile(r"^synthetic \([0-9a-f]{16}\)$")).first.wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow-experiment.png"))
        page.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs/{trial.info.run_id}"
                  "/model-metrics")
        # metric charts grouped by prefix; the first group (act/*) opens with its charts drawn
        page.get_by_text(re.compile(r"\(act/bit_entropy\)$")).first.wait_for(timeout=60_000)
        for group in ("train", "val", "test"):
            page.get_by_text(group, exact=True).first.wait_for(timeout=30_000)
        page.wait_for_selector("canvas, svg.main-svg, .js-plotly-plot", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow-run-metrics.png"), full_page=True)
        browser.close()


def test_tracking_server_outage_loses_nothing(stack):
    _, env, client = stack
    spec = load_spec(SPECS / "cluster_faults.yaml")
    proc = make_sweep(SPECS / "cluster_faults.yaml", client)
    try:
        wait_for(lambda: any(steps(client, c) for c in children(client, spec)), 600,
                 "the first logged epoch", proc)
        sh(LOCAL / "mlflow-server.sh", "stop-mlflow", env=env)
        time.sleep(30)
        sh(LOCAL / "mlflow-server.sh", "start-mlflow", env=env)
        finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = assert_complete(spec, client)  # every epoch of every trial exactly once
    assert all(c.info.status == "FINISHED" for c in done)
    assert sum(len(steps(client, c)) for c in done) == spec.num_trials * spec.epochs


def test_a_stopped_worker_node_moves_its_trials_to_the_head(stack):
    _, env, client = stack
    spec = load_spec(SPECS / "cluster_worker_loss.yaml")
    proc = make_sweep(SPECS / "cluster_worker_loss.yaml", client)
    try:
        wait_for(lambda: sum(bool(steps(client, c)) for c in children(client, spec)) >= 2, 600,
                 "trials on both nodes", proc)
        sh(LOCAL / "ray-cluster.sh", "down-worker", env=env)
        stopped = time.time() * 1000
        finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        sh(LOCAL / "ray-cluster.sh", "up-worker", env=env)
    done = assert_complete(spec, client)
    assert all(c.info.status == "FINISHED" for c in done)
    after = [c for c in done if c.info.end_time > stopped]
    nodes = {json.loads(c.data.tags["trial.placement"])["node"] for c in after}
    assert after and len(nodes) == 1  # everything after the loss ran on the one node left


def test_sixteen_trials_log_concurrently_without_loss(stack):
    _, _, client = stack
    spec = load_spec(SPECS / "cluster_16.yaml")
    out = finish(make_sweep(SPECS / "cluster_16.yaml", client), timeout=1200)
    assert "16 trials, 0 failed" in out and "database is locked" not in out
    done = assert_complete(spec, client)
    assert sum(len(steps(client, c)) for c in done) == 16 * spec.epochs



def jobs_api(env, expression: str):
    """`expression` evaluated on the cluster's authenticated Jobs API client `jobs`; its JSON."""
    code = ("import json, os; from ray.job_submission import JobSubmissionClient; "
            f"jobs = JobSubmissionClient(os.environ['RAY_ADDRESS']); print(json.dumps({expression}))")
    return json.loads(sh(ROOT / ".venv" / "bin" / "python", "-c", code, env=env).splitlines()[-1])


def assert_closed_killed(env, spec, started_after: float) -> None:
    """The parent KILLED, no trial RUNNING, every trial's tags equal to its metric history."""
    recorded = [r for r in runs(env, spec.experiment) if r.info.start_time >= started_after]
    [parent] = [r for r in recorded if r.data.tags["sweep.role"] == "parent"]
    assert parent.info.status == "KILLED"
    trials = [r for r in recorded if r.data.tags["sweep.role"] == "trial"]
    assert "KILLED" in {r.info.status for r in trials} and "RUNNING" not in {r.info.status for r in trials}
    for run in trials:
        assert run.data.tags["trial.epochs"] == str(len(steps(env, run)))
        if run.info.status == "KILLED":
            assert run.data.tags["trial.ended"] == "interrupted"


def test_ray_job_stop_closes_the_record_and_the_same_command_resumes(stack):
    """`ray job stop`: SIGTERM to the job's driver, SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (the
    Makefile gives it 30 s): the driver closes its record and leaves well within that."""
    _, _, env = stack
    spec = load_spec(SPECS / "cluster_stop.yaml")
    started = time.time() * 1000
    proc = make_sweep(SPECS / "cluster_stop.yaml", env)
    try:
        wait_for(lambda: sum(len(steps(env, c)) for c in children(env, spec)) >= 2, 600,
                 "two logged epochs", proc)
        [job] = jobs_api(env, "[j.submission_id for j in jobs.list_jobs() if j.status == 'RUNNING']")
        sent = time.monotonic()
        sh(ROOT / ".venv" / "bin" / "ray", "job", "stop", job, env=env)
        took = time.monotonic() - sent
        out, _ = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "ray-job-stop.txt").write_text(f"the job stopped {took:.1f} s after `ray job stop`\n")
    assert took <= 20, f"{took:.1f} s to stop"
    assert jobs_api(env, f"jobs.get_job_status('{job}').value") == "STOPPED"
    logs = jobs_api(env, f"jobs.get_job_logs('{job}')")
    assert "interrupted by SIGTERM: the sweep and" in logs and "stopped at once" not in logs
    assert_closed_killed(env, spec, started)
    finish(make_sweep(SPECS / "cluster_stop.yaml", env))  # the same command again
    done = assert_complete(spec, env)
    assert all(c.info.status == "FINISHED" for c in done)


def test_a_job_past_its_time_limit_closes_its_record(stack):
    """`make sweep TIME_LIMIT=...`: the job's driver stops itself at the limit, record KILLED."""
    _, _, env = stack
    spec = load_spec(SPECS / "cluster_limit.yaml")
    started = time.time() * 1000
    proc = make_sweep(SPECS / "cluster_limit.yaml", env, "TIME_LIMIT=45s")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "failed with exit code 124" in out, out[-3000:]
    assert "interrupted by SIGTERM: the sweep and" in out
    assert_closed_killed(env, spec, started)


@pytest.mark.parametrize("resources", ["{cpus: 2}", "{cpus: 1, gpus: 1}"], ids=["cpus", "gpus"])
def test_resources_no_node_of_the_cluster_has_are_refused_before_submission(stack, resources):
    _, _, env = stack
    folder = ROOT / "runs" / "test-specs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "too-big.yaml"
    path.write_text((SPECS / "cluster_smoke.yaml").read_text().replace(
        "name: cluster-smoke", "name: too-big").replace("resources: {cpus: 1}",
                                                        f"resources: {resources}"))
    proc = make_sweep(path, env)
    out, _ = proc.communicate(timeout=300)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, out[-3000:]
    assert "never be placed" in errors[0] and "largest node of the cluster" in errors[0]
    assert "ray job submit" not in out  # refused before a job existed
    assert MlflowClient(env["MLFLOW_TRACKING_URI"]).get_experiment_by_name("too-big") is None


def test_make_dashboard_shows_the_persisted_optuna_study_in_a_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    env = sweep_env(tmp_path)
    run_sweep(ROOT / "sweeps" / "specs" / "quick.yaml", env, "--smoke")
    spec = load_spec(ROOT / "sweeps" / "specs" / "quick.yaml", size="smoke")
    port = "8094"
    proc = subprocess.Popen(["make", "--no-print-directory", "dashboard", f"DASHBOARD_PORT={port}",
                             f"STUDIES=sqlite:///{tmp_path}/optuna.db"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/api/studies"],
                                        capture_output=True).returncode == 0, 60, "the dashboard", proc)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = chromium(p)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/dashboard")
            page.get_by_text(spec.sweep_id).first.click()  # the study is named by the sweep id
            page.get_by_text("Hyperparameter Importance").first.wait_for(timeout=60_000)
            page.get_by_text("activation.p", exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "optuna-dashboard.png"), full_page=True)
            browser.close()
        # every trial of the sweep, once, with its final score and no per-epoch values (the study
        # is told each trial's end only), as the dashboard serves them to the page
        api = f"http://127.0.0.1:{port}/api/studies"
        studies = json.loads(subprocess.run(["curl", "-sf", api], capture_output=True,
                                            text=True).stdout)["study_summaries"]
        [study_id] = [s["study_id"] for s in studies if s["study_name"] == spec.sweep_id]
        trials = json.loads(subprocess.run(["curl", "-sf", f"{api}/{study_id}"], capture_output=True,
                                           text=True).stdout)["trials"]
        assert sorted(t["number"] for t in trials) == list(range(spec.num_trials))
        assert all(t["state"] == "Complete" and t.get("values") and not t["intermediate_values"]
                   for t in trials), trials
    finally:
        kill_group(proc)
