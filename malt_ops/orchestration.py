"""The glue between Airflow tasks and stage functions (the DAG file stays wiring only).

XCom carries only the run id; every task reloads the recipe from the DAG run's params.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from malt_ops.config import Recipe, load_recipe
from malt_ops.storage import validate_run_id

log = logging.getLogger("malt_ops")

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE_ENV = "MALT_OPS_RECIPE"


def dag_recipe_path() -> str:
    """The recipe the DAG is parsed with: ``$MALT_OPS_RECIPE`` or recipes/local.yaml."""
    return os.environ.get(RECIPE_ENV) or str(REPO_ROOT / "recipes" / "local.yaml")


def load_dag_recipe() -> Recipe:
    return load_recipe(dag_recipe_path())


def _params(context: dict[str, Any]) -> dict[str, Any]:
    return dict(context.get("params") or {})


def recipe_for(context: dict[str, Any]) -> Recipe:
    params = _params(context)
    return load_recipe(
        params.get("recipe") or dag_recipe_path(), list(params.get("overrides") or [])
    )


def run_id_for(context: dict[str, Any]) -> str:
    """The pipeline run id: the ``run_id`` param, else Airflow's run id made path-safe."""
    explicit = _params(context).get("run_id")
    if explicit:
        return validate_run_id(str(explicit))
    return validate_run_id(re.sub(r"[^A-Za-z0-9_.:+-]", "-", context["dag_run"].run_id))


def call_stage(stage: str, context: dict[str, Any], **kwargs: Any) -> str:
    """Run ``malt_ops.stages.<stage>.run`` for this DAG run; returns the run id for XCom."""
    module = importlib.import_module(f"malt_ops.stages.{stage}")
    run_id = run_id_for(context)
    summary = module.run(recipe_for(context), run_id, **kwargs)
    log.info(
        "%s finished for run %s: %s",
        stage,
        run_id,
        {k: v for k, v in (summary or {}).items() if not isinstance(v, dict | list)},
    )
    return run_id


def shard_ids(context: dict[str, Any]) -> list[int]:
    return list(range(recipe_for(context).sampling.num_shards))


def training_set_asset_uri(recipe: Recipe) -> str | None:
    """The Airflow Asset URI of the training set, when it is a file that new data can land in."""
    path = recipe.data.train_path if recipe.data.source == "file" else None
    if not path:
        return None
    return path if "://" in path else f"file://{Path(path).expanduser().resolve()}"


def dag_schedule(recipe: Recipe) -> Any:
    """The recipe's cron, or'ed with the training-set Asset: new data also starts a cycle."""
    from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable

    uri = training_set_asset_uri(recipe)
    cron = recipe.schedule.cron
    if uri is None:
        return cron
    if cron is None:
        return [Asset(uri)]
    return AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[Asset(uri)]
    )
