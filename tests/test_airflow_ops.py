"""Issue 20, operating the DAG in Airflow: stage timeouts, no retries for a configuration
error (in-process and as a pod's exit code 2), the webhook notifier, and promote's champion
Asset with the example DAG that consumes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from malt_ops.config import load_recipe
from tests.conftest import LOCAL_RECIPE

DAGS = Path(__file__).resolve().parents[1] / "dags"
STAGES = ("prepare", "sample", "label", "train", "evaluate", "register", "promote")


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


@pytest.fixture
def webhook():
    """A local HTTP receiver: every JSON body POSTed to it, in order."""
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            received.append(json.loads(self.rfile.read(length) or b"{}"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}", received=received)
    server.shutdown()


def test_every_stage_task_has_the_recipes_timeout(dagbag):
    recipe = load_recipe(LOCAL_RECIPE)
    dag = dagbag.dags["malt_retraining"]
    assert set(recipe.schedule.timeout_minutes) == set(STAGES)
    override = load_recipe(LOCAL_RECIPE, ["schedule.timeout_minutes={train: 5}"])
    assert override.schedule.timeout_minutes["train"] == 5
    assert override.schedule.timeout_minutes["sample"] == recipe.schedule.timeout_minutes["sample"]
    for stage in STAGES:
        minutes = recipe.schedule.timeout_minutes[stage]
        assert dag.get_task(stage).execution_timeout == timedelta(minutes=minutes), stage


def test_promote_updates_the_champion_asset_that_the_check_dag_consumes(dagbag):
    assert dagbag.import_errors == {}
    promote = dagbag.dags["malt_retraining"].get_task("promote")
    (asset,) = promote.outlets
    from malt_ops.registry import system_model_name

    assert asset.uri == f"models:/{system_model_name(load_recipe(LOCAL_RECIPE))}@champion"
    check = dagbag.dags["malt_champion_check"]
    assert [a.uri for a in check.timetable.asset_condition.objects] == [asset.uri]
    assert check.task_ids == ["check_champion"]


def test_a_configuration_error_fails_at_once_and_the_webhook_hears_it(
    recipe_file, tmp_path, webhook
):
    recipe = recipe_file(schedule={"notify_conn_id": "malt_ops_webhook", "retries": 2})
    script = f"""
import json
from malt_ops.pipeline import load_dag, prepare_airflow_home
prepare_airflow_home({str(tmp_path / "state")!r})
run = load_dag().test(run_conf={{"recipe": {str(recipe)!r}, "overrides": ["sampling.n=0"]}})
plan = next(ti for ti in run.get_task_instances() if ti.task_id == "plan")
print(json.dumps({{"state": str(run.state), "plan": str(plan.state), "tries": plan.try_number}}))
"""
    env = {
        **os.environ,
        "MALT_OPS_RECIPE": str(recipe),
        "AIRFLOW_CONN_MALT_OPS_WEBHOOK": webhook.url,
    }
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "failed" in result["state"] and "failed" in result["plan"], result
    assert result["tries"] == 1, result  # retries: 2 in the recipe, none spent on a bad recipe
    (message,) = [m for m in webhook.received if m["event"] == "failure"]
    assert message["task_id"] == "plan" and message["dag_id"] == "malt_retraining"
    assert "sampling.n" in message["error"] and "not retried" in message["error"]
    assert message["text"].startswith(f"malt-ops {message['run_id']}: task plan failed: ")


def test_the_promotion_notice_carries_the_decision(recipe_file, webhook, monkeypatch):
    from malt_ops.notify import promotion_notifier
    from malt_ops.stages.common import stage_output

    path = recipe_file()
    recipe = load_recipe(path)
    out = stage_output(recipe, "nightly-7", "promote")
    out.commit({"promoted": True, "p_value": 0.01, "effect": 0.08, "reason": "beat MA+MV"})
    monkeypatch.setenv("AIRFLOW_CONN_MALT_OPS_WEBHOOK", webhook.url)
    context = {
        "params": {"recipe": str(path), "run_id": "nightly-7", "overrides": []},
        "dag_run": SimpleNamespace(run_id="scheduled__2026-12-04"),
        "ti": SimpleNamespace(task_id="promote"),
        "dag": SimpleNamespace(dag_id="malt_retraining"),
    }
    promotion_notifier("malt_ops_webhook").notify(context)
    (message,) = webhook.received
    assert message["event"] == "promotion" and message["text"].endswith("promote: new champion")
    assert message["decision"] == {
        "promoted": True,
        "p_value": 0.01,
        "effect": 0.08,
        "reason": "beat MA+MV",
    }


def _finished_pod(exit_code: int):
    from kubernetes.client import models as k8s

    terminated = k8s.V1ContainerStateTerminated(exit_code=exit_code, reason="Error")
    status = k8s.V1ContainerStatus(
        name="base",
        image="i",
        image_id="",
        ready=False,
        restart_count=0,
        state=k8s.V1ContainerState(terminated=terminated),
    )
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="malt-ops-train-x", namespace="jobs"),
        status=k8s.V1PodStatus(phase="Failed", container_statuses=[status]),
    )


@pytest.mark.parametrize("exit_code, retried", [(2, False), (1, True), (75, True)])
def test_a_stage_pod_that_exits_2_is_not_retried(exit_code, retried, monkeypatch):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from malt_ops.stage_pod import StagePodOperator

    operator = StagePodOperator(task_id="train", name="malt-ops-train", image="i")
    # no Kubernetes API server here: the pod's deletion and patching are what it would call
    monkeypatch.setattr(operator, "process_pod_deletion", lambda *a, **k: None)
    monkeypatch.setattr(operator, "patch_already_checked", lambda *a, **k: None)
    monkeypatch.setattr(operator, "_read_pod_container_states", lambda *a, **k: None)
    monkeypatch.setattr(operator, "_read_pod_events", lambda *a, **k: None)
    monkeypatch.setattr(operator, "is_istio_enabled", lambda *a, **k: False)
    pod = _finished_pod(exit_code)
    with pytest.raises(AirflowException) as raised:
        operator.cleanup(pod, pod)
    assert isinstance(raised.value, AirflowFailException) is not retried
    if not retried:
        assert "configuration error" in str(raised.value)


def test_require_approval_puts_a_human_between_register_and_promote(recipe_file, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    monkeypatch.setenv("MALT_OPS_RECIPE", str(recipe_file(promotion={"require_approval": True})))
    dag = DagBag(dag_folder=str(DAGS)).dags["malt_retraining"]
    gate = dag.get_task("approve_promotion")
    assert isinstance(gate, ApprovalOperator)
    assert gate.upstream_task_ids == {"register"}
    assert dag.get_task("promote").upstream_task_ids >= {"approve_promotion"}
    assert "register" not in dag.get_task("promote").upstream_task_ids


def test_without_approval_register_leads_straight_to_promote(dagbag):
    dag = dagbag.dags["malt_retraining"]
    assert "approve_promotion" not in dag.task_ids
    assert "register" in dag.get_task("promote").upstream_task_ids


def test_approval_is_a_parse_time_key_and_malt_ops_run_refuses_it(recipe_file):
    from malt_ops.errors import MaltError
    from malt_ops.orchestration import refuse_parse_time_overrides
    from malt_ops.pipeline import run_pipeline

    with pytest.raises(MaltError, match="read when the DAG is parsed"):
        refuse_parse_time_overrides(["promotion.require_approval=true"])
    refuse_parse_time_overrides(["promotion.alpha=0.1"])
    path = recipe_file(promotion={"require_approval": True})
    with pytest.raises(MaltError, match="has no one to ask"):
        run_pipeline(load_recipe(path), str(path), [], "approval")
