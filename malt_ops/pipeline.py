"""`malt-ops run`: the Airflow DAG in dags/, run in-process with Airflow's ``dag.test()``.

Airflow's metadata lives in SQLite under ``<run.state_dir>/airflow``, created on first use.
The stage order is defined only by the DAG.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from malt_ops.config import Recipe
from malt_ops.console import say
from malt_ops.errors import MaltError, redact
from malt_ops.orchestration import RECIPE_ENV, REPO_ROOT, refuse_parse_time_overrides
from malt_ops.storage import StageOutput, open_store, run_prefix

log = logging.getLogger("malt_ops")
DAG_ID = "malt_retraining"


def dags_folder() -> Path:
    return Path(os.environ.get("MALT_OPS_DAGS_FOLDER") or REPO_ROOT / "dags")


def prepare_airflow_home(state_dir: str) -> Path:
    """Point Airflow at a local SQLite home and migrate it once."""
    home = Path(state_dir).expanduser().resolve() / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags_folder())
    os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
    marker = home / ".migrated"
    if not marker.exists():
        log.info("creating Airflow metadata database in %s (once)", home)
        done = subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            capture_output=True,
            text=True,
            check=False,
            env=os.environ.copy(),
        )
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise MaltError(f"airflow db migrate failed in {home}: {tail}")
        marker.write_text("ok\n")
    return home


def load_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dags_folder()))
    if bag.import_errors:
        path, error = next(iter(bag.import_errors.items()))
        raise MaltError(f"DAG file {path} does not import: {error.strip().splitlines()[-1]}")
    dag = bag.dags.get(DAG_ID)
    if dag is None:
        raise MaltError(f"no DAG '{DAG_ID}' in {dags_folder()}")
    return dag


def ui_command(recipe: Recipe) -> str:
    """How to open this run's MLflow: the UI over a local SQLite store, or the server's URL."""
    from malt_ops.tracking import tracking_uri

    uri = tracking_uri(recipe)
    if uri.startswith(("http://", "https://")):
        return f"open {redact(uri)}"
    return f"mlflow ui --backend-store-uri {uri}"


def run_pipeline(
    recipe: Recipe,
    recipe_path: str,
    overrides: list[str],
    run_id: str,
    cycles: int = 1,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Run the DAG ``cycles`` times; cycle k samples with the champion that cycle k-1 left.

    ``force``: every stage runs with ``--force`` (a recipe change redoes, not refuses)."""
    from malt_ops.tracking import finish_pipeline, replay_queue

    refuse_parse_time_overrides(overrides)  # before Airflow starts, not at the plan task
    if recipe.promotion.require_approval:
        raise MaltError(
            "promotion.require_approval: true waits for a person's approval in a deployed "
            "Airflow (UI or REST API); `malt-ops run` has no one to ask: set it false here"
        )
    os.environ[RECIPE_ENV] = str(Path(recipe_path).resolve())
    prepare_airflow_home(recipe.run.state_dir)
    dag = load_dag()
    store = open_store(recipe.storage.root)
    results = []
    for cycle in range(1, cycles + 1):
        cycle_id = run_id if cycles == 1 else f"{run_id}-c{cycle}"
        conf = {
            "recipe": str(Path(recipe_path).resolve()),
            "run_id": cycle_id,
            "overrides": list(overrides),
            "force": force,
        }
        say(f"run {cycle_id}" + (f" (cycle {cycle} of {cycles})" if cycles > 1 else "") + ":")
        dag_run = dag.test(run_conf=conf)
        state = str(getattr(dag_run, "state", "unknown"))
        if "success" not in state:
            finish_pipeline(recipe, cycle_id, "FAILED")
            raise MaltError(
                f"run {cycle_id} did not succeed (state {state}); rerun the same command to "
                "resume: finished stages are skipped"
            )
        outputs = store.uri(run_prefix(cycle_id, "")).rstrip("/")
        evaluated = StageOutput(store, cycle_id, "evaluate")
        if evaluated.done() and evaluated.has("table.md"):
            say(f"\n{evaluated.read_bytes('table.md').decode()}")
        promoted = StageOutput(store, cycle_id, "promote")
        if promoted.done() and promoted.has("decision.json"):
            decision = promoted.read_json("decision.json")
            say(
                f"promotion: {'PROMOTED' if decision['promoted'] else 'not promoted'} — {decision['reason']}"
            )
        say(f"run {cycle_id}: outputs in {outputs}")
        if recipe.tracking.enabled:
            replayed, waiting = replay_queue(recipe, cycle_id)
            if replayed:
                say(f"MLflow: logged {replayed} entries queued while it was unreachable")
            if waiting:
                say(
                    f"MLflow: {waiting} entries still queued (unreachable); rerun this command "
                    "once it answers to log them"
                )
            say(f"see it in MLflow: {ui_command(recipe)}")
        results.append({"run_id": cycle_id, "state": state, "outputs": outputs})
    return results
