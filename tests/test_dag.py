"""The DAG parses, is wiring only, and has the expected tasks, order, tags and retries."""

import re
from pathlib import Path

import pytest

from malt_ops.errors import MaltError
from tests.conftest import LOCAL_RECIPE, committed

DAGS = Path(__file__).resolve().parents[1] / "dags"


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "malt_retraining" in dagbag.dag_ids


def test_tasks_and_dependencies(dagbag):
    dag = dagbag.dags["malt_retraining"]
    assert set(dag.task_ids) == {
        "plan",
        "prepare",
        "shards",
        "sample",
        "label",
        "roles",
        "train",
        "evaluate",
        "register",
        "promote",
    }
    downstream = {
        task_id: set(dag.get_task(task_id).downstream_task_ids) for task_id in dag.task_ids
    }
    stages = {"prepare", "label", "evaluate", "register", "promote"}
    assert downstream["plan"] == stages | {"shards", "roles"}
    assert downstream["prepare"] == {"sample"}
    assert downstream["shards"] == {"sample"}
    assert downstream["sample"] == {"label"}
    assert downstream["label"] == {"train"}
    assert downstream["roles"] == {"train"}
    assert downstream["train"] == {"evaluate"}
    assert downstream["evaluate"] == {"register"}
    assert downstream["register"] == {"promote"}
    assert downstream["promote"] == set()


def test_local_mode_runs_stages_in_process(dagbag):
    from malt_ops.execution import run_stage_arguments

    dag = dagbag.dags["malt_retraining"]
    for stage in ("prepare", "sample", "label", "train", "evaluate", "register", "promote"):
        assert dag.get_task(stage).python_callable is run_stage_arguments, stage


def test_plan_builds_one_argument_list_per_stage_task(monkeypatch):
    from types import SimpleNamespace

    from malt_ops.orchestration import plan_run, role_arguments, shard_arguments

    context = {
        "params": {
            "recipe": str(LOCAL_RECIPE),
            "run_id": None,
            "overrides": ["sampling.num_shards=3"],
        },
        "dag_run": SimpleNamespace(run_id="manual__2026-11-21T10:00:00+00:00"),
    }
    plan = plan_run(context)
    run_id = plan["run_id"]
    assert run_id == "manual__2026-11-21T10:00:00+00:00"
    assert plan["label"] == [
        "label", "--recipe", str(LOCAL_RECIPE), "--run-id", run_id, "--set", "sampling.num_shards=3"
    ]  # fmt: skip
    assert [a[-4:] for a in shard_arguments(context)] == [
        ["--num-shards", "3", "--shard", str(i)] for i in range(3)
    ]
    assert [a[-1] for a in role_arguments(context)] == ["generator", "verifier", "refiner", "star"]
    bad = {**context, "params": {**context["params"], "overrides": ["sampling.n=-1"]}}
    with pytest.raises(MaltError, match=r"sampling\.n"):
        plan_run(bad)


@pytest.mark.parametrize("run_type", ["manual", "asset_triggered", "scheduled", "backfill"])
def test_airflow_generated_run_ids_become_valid_run_ids(run_type):
    """Airflow's own run ids (microseconds, ':' and '+', a random suffix) are accepted."""
    from types import SimpleNamespace

    import pendulum
    from airflow.models.dagrun import DagRun
    from airflow.utils.types import DagRunType

    from malt_ops.orchestration import run_id_for
    from malt_ops.storage import validate_run_id

    airflow_id = DagRun.generate_run_id(
        run_type=DagRunType(run_type), logical_date=None, run_after=pendulum.now("UTC")
    )
    run_id = run_id_for({"params": {}, "dag_run": SimpleNamespace(run_id=airflow_id)})
    assert validate_run_id(run_id) == run_id


def test_distinct_airflow_run_ids_stay_distinct():
    from types import SimpleNamespace

    from malt_ops.orchestration import run_id_for

    def mapped(airflow_id):
        return run_id_for({"params": {}, "dag_run": SimpleNamespace(run_id=airflow_id)})

    assert mapped("a b") != mapped("a/b")
    ids = ["a b", "a/b", "a-b", "a\\b", "a..b", "a...b", "a--b", "-ab", "_ab", "x" * 250, "x" * 251]
    assert len({mapped(i) for i in ids}) == len(ids)
    assert mapped("manual__2026-11-21T10:00:00+00:00") == "manual__2026-11-21T10:00:00+00:00"


@pytest.mark.parametrize(
    "override",
    [
        "kubernetes.namespace=other-jobs",
        "kubernetes={}",
        "schedule.retries=0",
        "schedule.cron=null",
    ],
)
def test_overrides_of_keys_read_at_parse_time_are_refused(override):
    """Pods, retries and the schedule are built when the DAG is parsed: a per-run value is lost."""
    from types import SimpleNamespace

    from malt_ops.orchestration import plan_run

    context = {
        "params": {"recipe": str(LOCAL_RECIPE), "run_id": "r1", "overrides": [override]},
        "dag_run": SimpleNamespace(run_id="manual__2026-11-21T10:00:00+00:00"),
    }
    key = override.split("=")[0]
    with pytest.raises(MaltError, match=rf"^override '{re.escape(override)}': {key} is read when"):
        plan_run(context)


def test_schedule_tags_retries_and_params(dagbag):
    import yaml

    recipe = yaml.safe_load(LOCAL_RECIPE.read_text())
    dag = dagbag.dags["malt_retraining"]
    assert not dag.catchup
    assert {"malt", "post-training"} <= set(dag.tags)
    assert all(task.retries == recipe["schedule"]["retries"] for task in dag.tasks)
    assert dag.schedule == recipe["schedule"]["cron"]
    assert {"recipe", "run_id", "overrides", "force"} <= set(dag.params.keys())


def test_dag_file_is_wiring_only():
    source = (DAGS / "malt_retraining.py").read_text()
    # Tasks delegate to stage functions; no model, data or training code lives in the DAG.
    for forbidden in ("transformers", "torch", "trl", "open(", "jsonl"):
        assert forbidden not in source
    assert source.count("stages.single(") == 5 and source.count("stages.mapped(") == 2


def test_new_training_data_also_triggers_a_cycle(tmp_path):
    from airflow.sdk import AssetOrTimeSchedule

    from malt_ops.config import load_recipe
    from malt_ops.orchestration import dag_schedule

    train = tmp_path / "train.jsonl"
    train.write_text("")
    recipe = load_recipe(LOCAL_RECIPE, ["data.source=file", f"data.train_path={train}"])
    schedule = dag_schedule(recipe)
    assert isinstance(schedule, AssetOrTimeSchedule)
    assert [a.uri for a in schedule.asset_condition.objects] == [f"file://{train}"]
    assert dag_schedule(load_recipe(LOCAL_RECIPE)) == "@weekly"


@pytest.mark.slow
@pytest.mark.nightly  # a third DAG run beside test_run.py's and the deployment's: not in CI
@pytest.mark.model
def test_dag_test_with_airflows_own_run_id_reaches_evaluate(recipe_file, tmp_path):
    """No run_id param: the run id is Airflow's ``manual__<time with microseconds>+00:00``."""
    import json
    import os
    import subprocess
    import sys

    from tests.test_run import FORCED, TINY

    recipe = recipe_file(name="qwen2.5")
    script = f"""
import json, os
from malt_ops.orchestration import run_id_for
from malt_ops.pipeline import load_dag, prepare_airflow_home
prepare_airflow_home({str(tmp_path / "state")!r})
dag_run = load_dag().test(run_conf={{"recipe": {str(recipe)!r}, "overrides": {TINY + FORCED!r}}})
print(json.dumps({{"state": str(dag_run.state), "airflow_id": dag_run.run_id,
    "run_id": run_id_for({{"params": {{}}, "dag_run": dag_run}})}}))
"""
    env = {**os.environ, "MALT_OPS_RECIPE": str(recipe)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1500
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["airflow_id"].startswith("manual__") and "." in result["airflow_id"]
    assert "success" in result["state"], done.stderr[-3000:]
    run = tmp_path / "store" / "runs" / result["run_id"]
    assert committed(run, "evaluate", "report.json").is_file()
