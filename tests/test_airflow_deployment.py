"""The DAG under a real Airflow deployment: API server, scheduler and DAG processor as
separate processes (LocalExecutor, SQLite metadata, SimpleAuthManager with a password),
driven only through the public REST API, the way an operator or CI would.

The recipe is the embedded default shrunk to a handful of tokens per stage, so the run
checks the deployment (parsing, params, mapped tasks, XCom, task processes forked by the
executor, MLflow from parallel tasks) rather than the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900, method="signal")]

# Not imported from tests.conftest: `.venv/bin/pytest` does not put the repo on sys.path.
REPO = Path(__file__).resolve().parents[1]
LOCAL_RECIPE = REPO / "recipes" / "local.yaml"
DAG_ID = "malt_retraining"


def committed(run_dir: Path, stage: str, name: str, unit: str | None = None) -> Path:
    """A committed file: below the attempt folder its unit's manifest names."""
    manifest = run_dir / stage / ("MANIFEST.json" if unit is None else f"MANIFEST-{unit}.json")
    attempt = json.loads(manifest.read_text()).get("attempt")
    return run_dir / stage / "attempts" / attempt / name if attempt else run_dir / stage / name


RUN_ID = "deploy-test"  # Airflow's DAG run id
MALT_RUN_ID = "deploy-malt"  # the pipeline run id, passed as the DAG's run_id param
USER = "malt-deploy"
AIRFLOW = Path(sys.executable).with_name("airflow")
# Each wait has its own deadline; together they stay under the pytest-timeout above.
START_SECONDS = 90
PARSE_SECONDS = 90
RUN_SECONDS = 660
GRACE_SECONDS = 20
STAGES = ("prepare", "sample", "label", "train", "evaluate", "register", "promote")
TRAINED = ("generator", "verifier", "refiner", "star")
EXPECTED_MANIFESTS = [
    "prepare/MANIFEST.json",
    "sample/MANIFEST-shard-0.json",
    "label/MANIFEST.json",
    *(f"train/MANIFEST-{role}.json" for role in TRAINED),
    "evaluate/MANIFEST.json",
    "register/MANIFEST.json",
    "promote/MANIFEST.json",
]
# Tiny: two easy questions, 2x2x2 trees, one optimizer step per phase, one question in one
# seed. 40 sampling tokens and the low threshold give every role positives, so the train
# tasks really train and register really registers; evaluation accuracy does not matter.
SAMPLE_TOKENS = {"generator": 40, "verifier": 40, "refiner": 40}
EVAL_TOKENS = {"generator": 16, "verifier": 16, "refiner": 16}
TINY_RECIPE = {
    "data": {
        "train_size": 2,
        "test_size": 2,
        "task_config": {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 1,
            "operators": ["+"],
            "allow_negation": False,
            "allow_parentheses": False,
        },
    },
    "sampling": {"n": 2, "m": 2, "l": 2, "max_new_tokens": SAMPLE_TOKENS, "num_shards": 1},
    "labeling": {"threshold": 0.01},
    # Per role: the embedded default's settings with one SFT step (DPO is one step there).
    "training": {
        role: {**values, "max_steps": 1, "max_length": 320} if isinstance(values, dict) else values
        for role, values in yaml.safe_load(LOCAL_RECIPE.read_text())["training"].items()
    },
    "evaluation": {"seeds": [0], "subset_size": 1, "votes": 1, "max_new_tokens": EVAL_TOKENS},
    "promotion": {"require_significance": False},
    "schedule": {"cron": None, "retries": 0, "retry_delay_minutes": 0},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_members(sid: int) -> list[int]:
    """Every live process in session ``sid``: task runners move to their own process group
    (``setpgid``) but stay in the session of the component that started them."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _signal_session(sid: int, sig: int) -> None:
    pids = _session_members(sid) if Path("/proc/self/stat").exists() else [sid]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, sig)


class Deployment:
    """The Airflow components, each in its own session, and a client for the REST API."""

    def __init__(self, root: Path, env: dict[str, str], port: int) -> None:
        self.root = root
        self.env = env
        self.url = f"http://127.0.0.1:{port}"
        self.home = Path(env["AIRFLOW_HOME"])
        self.procs: dict[str, subprocess.Popen] = {}
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.log(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def run(self, *args: str, timeout: int = 300) -> None:
        name = "-".join(args[:2])
        with self.log(name).open("wb") as out:
            done = subprocess.run(
                [str(AIRFLOW), *args],
                cwd=self.root,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        assert done.returncode == 0, f"airflow {' '.join(args)} failed:\n{self.tail(name)}"

    def start(self, name: str, *args: str) -> None:
        with self.log(name).open("wb") as out:
            self.procs[name] = subprocess.Popen(
                [str(AIRFLOW), *args],
                # Not the checkout: whatever a component writes to its working directory
                # (MLflow's default ./mlruns artifact root, for one) stays under tmp_path.
                cwd=self.root,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, (
                f"airflow {name} exited with {proc.returncode}:\n{self.tail(name)}"
            )

    def stop(self) -> None:
        """SIGTERM every component's session, SIGKILL what is left after the grace period."""
        self.http.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                _signal_session(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            _signal_session(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def wait_for(self, what: str, seconds: float, probe, logs: tuple[str, ...] = ()):
        """Call ``probe`` until it returns something truthy; fail with ``what`` and log tails."""
        deadline = time.monotonic() + seconds
        while True:
            self.check_alive()
            try:
                result = probe()
            except (httpx.TransportError, OSError, ValueError):
                result = None
            if result:
                return result
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {name}.log ---\n{self.tail(name)}" for name in logs)
                pytest.fail(f"{what}: not within {seconds:.0f} s\n{tails}")
            time.sleep(1)

    def login(self) -> None:
        passwords = Path(self.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])

        def password():
            return json.loads(passwords.read_text()).get(USER)

        secret = self.wait_for(
            f"the generated password for '{USER}' in {passwords}", 30, password, ("api-server",)
        )
        response = self.http.post("/auth/token", json={"username": USER, "password": secret})
        assert response.status_code == 201, response.text
        token = response.json()["access_token"]
        self.http.headers["Authorization"] = f"Bearer {token}"
        anonymous = httpx.get(f"{self.url}/api/v2/dags/{DAG_ID}", timeout=30)
        assert anonymous.status_code == 401, "the API answers without credentials"

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        return self.http.request(method, f"/api/v2{path}", **kwargs)


def _airflow_env(tmp_path: Path, recipe: Path, port: int) -> dict[str, str]:
    home = tmp_path / "airflow"
    home.mkdir()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_")}
    return {
        **inherited,
        "PATH": f"{AIRFLOW.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # Two cores: the LocalExecutor forks this many workers up front.
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        # One parse at start is enough; re-parsing every 30 s only steals a core.
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
        "MALT_OPS_EXECUTION_MODE": "local",
        "MALT_OPS_RECIPE": str(recipe),
    }


@pytest.fixture
def deployment(tmp_path: Path, recipe_file):
    recipe = recipe_file(**TINY_RECIPE)
    port = _free_port()
    deployment = Deployment(tmp_path, _airflow_env(tmp_path, recipe, port), port)
    try:
        _start(deployment, port)
        yield deployment
    finally:
        deployment.stop()


def _start(deployment: Deployment, port: int) -> None:
    deployment.run("db", "migrate")
    deployment.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(port))
    deployment.start("dag-processor", "dag-processor")
    # Task logs are read from the files here, so no log-serving process.
    deployment.start("scheduler", "scheduler", "--skip-serve-logs")


def _task_log_tail(home: Path, ti: dict, lines: int = 40) -> str:
    """The last lines of a task instance's log file, JSON lines rendered readable."""
    folder = home / "logs" / f"dag_id={DAG_ID}" / f"run_id={RUN_ID}" / f"task_id={ti['task_id']}"
    if ti.get("map_index", -1) >= 0:
        folder /= f"map_index={ti['map_index']}"
    files = sorted(folder.glob("attempt=*.log"))
    if not files:
        return f"(no log under {folder})"
    rendered = []
    for line in files[-1].read_text(errors="replace").splitlines()[-lines:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            rendered.append(line)
            continue
        rendered.append(f"{record.get('level', '?'):>7} {record.get('event', '')}")
        for error in record.get("error_detail") or []:
            rendered.append(f"        {error.get('exc_type')}: {error.get('exc_value')}")
            frames = error.get("frames") or []
            rendered.extend(
                f"          {f.get('filename')}:{f.get('lineno')} {f.get('name')}"
                for f in frames[-6:]
            )
    return "\n".join(rendered)


def _ti_name(ti: dict) -> str:
    return ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['map_index']}]"


def _task_instances(deployment: Deployment) -> list[dict]:
    response = deployment.api(
        "GET", f"/dags/{DAG_ID}/dagRuns/{RUN_ID}/taskInstances", params={"limit": 100}
    )
    assert response.status_code == 200, response.text
    return response.json()["task_instances"]


def test_dag_runs_to_success_under_a_real_deployment(deployment: Deployment, tmp_path: Path):
    started = time.monotonic()

    def healthy():
        response = deployment.http.get("/api/v2/monitor/health")
        return (
            response.status_code == 200
            and response.json()["metadatabase"]["status"] == "healthy"
            and response.json()["scheduler"]["status"] == "healthy"
            and response.json()["dag_processor"]["status"] == "healthy"
        )

    deployment.wait_for(
        f"API at {deployment.url} healthy with scheduler and DAG processor",
        START_SECONDS,
        healthy,
        ("api-server", "scheduler", "dag-processor"),
    )
    deployment.login()

    def parsed():
        errors = deployment.api("GET", "/importErrors").json()
        assert errors["total_entries"] == 0, f"DAG import errors: {errors['import_errors']}"
        response = deployment.api("GET", f"/dags/{DAG_ID}")
        return response.json() if response.status_code == 200 else None

    dag = deployment.wait_for(
        f"DAG {DAG_ID} parsed and served by the API", PARSE_SECONDS, parsed, ("dag-processor",)
    )
    assert dag["is_paused"], "new DAGs should start paused"
    response = deployment.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    assert response.status_code == 200 and not response.json()["is_paused"], response.text

    response = deployment.api(
        "POST",
        f"/dags/{DAG_ID}/dagRuns",
        json={"dag_run_id": RUN_ID, "logical_date": None, "conf": {"run_id": MALT_RUN_ID}},
    )
    assert response.status_code == 200, response.text
    triggered = time.monotonic()

    def finished():
        state = deployment.api("GET", f"/dags/{DAG_ID}/dagRuns/{RUN_ID}").json()["state"]
        if state == "failed":
            tis = _task_instances(deployment)
            states = ", ".join(f"{_ti_name(ti)} {ti['state']}" for ti in tis)
            logs = "\n".join(
                f"--- {_ti_name(ti)} log ---\n{_task_log_tail(deployment.home, ti)}"
                for ti in tis
                if ti["state"] == "failed"
            )
            pytest.fail(f"DAG run {RUN_ID} failed: {states}\n{logs}")
        return state == "success"

    deployment.wait_for(f"DAG run {RUN_ID} succeeded", RUN_SECONDS, finished, ("scheduler",))
    run_seconds = time.monotonic() - triggered

    tis = _task_instances(deployment)
    not_successful = [f"{_ti_name(ti)} {ti['state']}" for ti in tis if ti["state"] != "success"]
    assert not not_successful, not_successful
    assert set(STAGES) <= {ti["task_id"] for ti in tis}
    # Mapped stages: one instance per shard and per trained adapter, named by the template.
    mapped = {
        stage: sorted(ti["rendered_map_index"] or "" for ti in tis if ti["task_id"] == stage)
        for stage in ("sample", "train")
    }
    assert len(mapped["sample"]) == 1 and "0" in mapped["sample"][0], mapped
    assert len(mapped["train"]) == len(TRAINED), mapped
    assert all(any(role in label for label in mapped["train"]) for role in TRAINED), mapped

    run_root = tmp_path / "store" / "runs" / MALT_RUN_ID
    missing = [name for name in EXPECTED_MANIFESTS if not (run_root / name).is_file()]
    assert not missing, f"manifests missing under {run_root}: {missing}"
    for name in EXPECTED_MANIFESTS:
        manifest = json.loads((run_root / name).read_text())
        stage = name.split("/")[0]
        for path, meta in manifest["files"].items():
            committed_file = committed(run_root, stage, path, manifest["unit"])
            assert committed_file.stat().st_size == meta["bytes"], (name, path)
    registered = json.loads(committed(run_root, "register", "versions.json").read_text())
    print(
        f"\nAirflow deployment: up and parsed in {triggered - started:.0f} s, "
        f"DAG run {run_seconds:.0f} s, total {time.monotonic() - started:.0f} s; "
        f"registered: {registered.get('registered')} {registered.get('reason') or ''}"
    )


def _serve_and_unpause(deployment: Deployment) -> None:
    """Wait for the API, scheduler and DAG processor, log in, and unpause the DAG."""

    def healthy():
        body = deployment.http.get("/api/v2/monitor/health")
        return body.status_code == 200 and all(
            body.json()[part]["status"] == "healthy"
            for part in ("metadatabase", "scheduler", "dag_processor")
        )

    deployment.wait_for("API healthy", START_SECONDS, healthy, ("api-server", "scheduler"))
    deployment.login()

    def parsed():
        response = deployment.api("GET", f"/dags/{DAG_ID}")
        return response.json() if response.status_code == 200 else None

    deployment.wait_for(f"DAG {DAG_ID} parsed", PARSE_SECONDS, parsed, ("dag-processor",))
    response = deployment.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    assert response.status_code == 200, response.text


def _answer_approval(deployment: Deployment, run_id: str, option: str) -> None:
    """Wait until the run asks for approval, then answer it through the REST API."""

    def asking():
        path = f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve_promotion"
        response = deployment.api("GET", path)
        if response.status_code == 200 and response.json()["state"] == "failed":
            pytest.fail(f"approve_promotion failed in {run_id}")
        run = deployment.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").json()
        if run["state"] == "failed":
            pytest.fail(f"DAG run {run_id} failed before its approval")
        # a HITL task waits in state awaiting_input (Airflow 3.3; deferred in earlier 3.x)
        return response.status_code == 200 and response.json()["state"] in (
            "awaiting_input",
            "deferred",
        )

    deployment.wait_for(f"{run_id} asking for approval", RUN_SECONDS, asking, ("scheduler",))
    # As a person would, answer a few seconds later: in Airflow 3.3 an answer within a second
    # of the pause re-queues the task before the executor has reported the pausing workload's
    # end, and the scheduler then fails it ("finished with state success, but ... queued").
    time.sleep(5)
    path = f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve_promotion/-1/hitlDetails"
    response = deployment.api("PATCH", path, json={"chosen_options": [option]})
    assert response.status_code == 200, response.text

    def finished():
        state = deployment.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"]
        assert state != "failed", f"DAG run {run_id} failed after its approval"
        return state == "success"

    deployment.wait_for(f"{run_id} finished", RUN_SECONDS, finished, ("scheduler",))


@pytest.mark.nightly  # two full DAG runs under the deployment (about 6 minutes)
def test_a_person_approves_one_promotion_and_rejects_another(tmp_path: Path, recipe_file):
    from malt_ops.config import load_recipe
    from malt_ops.registry import CHAMPION, alias_versions
    from malt_ops.tracking import client_for

    promotion = {"require_significance": False, "min_effect": -1, "require_approval": True}
    recipe_path = recipe_file(**{**TINY_RECIPE, "promotion": promotion})
    recipe = load_recipe(recipe_path)
    port = _free_port()
    deployment = Deployment(tmp_path, _airflow_env(tmp_path, recipe_path, port), port)
    try:
        _start(deployment, port)
        _serve_and_unpause(deployment)
        champions = {}
        for run_id, option in (("approved", "Approve"), ("rejected", "Reject")):
            response = deployment.api(
                "POST",
                f"/dags/{DAG_ID}/dagRuns",
                json={"dag_run_id": run_id, "logical_date": None, "conf": {"run_id": run_id}},
            )
            assert response.status_code == 200, response.text
            _answer_approval(deployment, run_id, option)
            promote = deployment.api(
                "GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/promote"
            ).json()
            champion = alias_versions(recipe, CHAMPION, client_for(recipe))
            champions[run_id] = {role: v.version for role, v in (champion or {}).items()}
            if option == "Approve":  # promote ran and decided (the tiny run registers no
                # complete set, so its decision is to keep the champion: none yet)
                assert promote["state"] == "success"
                assert (
                    tmp_path / "store" / "runs" / run_id / "promote" / "MANIFEST.json"
                ).is_file()
            else:  # rejected: promote never ran, the champion is what the approved run left
                assert promote["state"] == "skipped"
                assert not (tmp_path / "store" / "runs" / run_id / "promote").exists()
        assert champions["rejected"] == champions["approved"]
    finally:
        deployment.stop()
