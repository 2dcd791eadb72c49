"""MALT retraining: prepare -> sample (per shard) -> label -> train (per role, STaR beside)
-> evaluate -> register -> promote.

Each cycle samples with the current champion adapters, so cycle k improves on cycle k-1.

Wiring only: every task calls a stage function through malt_ops.orchestration.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, task

from malt_ops.config import TRAINED
from malt_ops.orchestration import (
    call_stage,
    dag_recipe_path,
    dag_schedule,
    load_dag_recipe,
    shard_ids,
)

recipe = load_dag_recipe()

with DAG(
    dag_id="malt_retraining",
    description="Sample MALT trees, label them, train generator/verifier/refiner adapters and evaluate.",
    schedule=dag_schedule(recipe),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["malt", "post-training", "llm"],
    default_args={
        "retries": recipe.schedule.retries,
        "retry_delay": timedelta(minutes=recipe.schedule.retry_delay_minutes),
    },
    params={
        "recipe": Param(dag_recipe_path(), type="string", description="recipe YAML path"),
        "run_id": Param(
            None, type=["null", "string"], description="pipeline run id (default: Airflow's)"
        ),
        "overrides": Param([], type="array", description="recipe overrides, dotted.key=value"),
    },
    doc_md=__doc__,
) as dag:

    @task
    def prepare(**context) -> str:
        return call_stage("prepare", context)

    @task
    def shards(malt_run_id: str, **context) -> list[int]:
        return shard_ids(context)

    @task(map_index_template="shard {{ task.op_kwargs['shard'] }}")
    def sample(malt_run_id: str, shard: int, **context) -> str:
        return call_stage("sample", context, shard=shard)

    @task
    def label(malt_run_id: str, **context) -> str:
        return call_stage("label", context)

    @task(map_index_template="{{ task.op_kwargs['role'] }}")
    def train(malt_run_id: str, role: str, **context) -> str:
        return call_stage("train", context, role=role)

    @task
    def evaluate(malt_run_id: str, **context) -> str:
        return call_stage("evaluate", context)

    @task
    def register(malt_run_id: str, **context) -> str:
        return call_stage("register", context)

    @task
    def promote(malt_run_id: str, **context) -> str:
        return call_stage("promote", context)

    malt_run_id = prepare()
    sampled = sample.partial(malt_run_id=malt_run_id).expand(shard=shards(malt_run_id))
    labeled = label(malt_run_id)
    trained = train.partial(malt_run_id=labeled).expand(role=list(TRAINED))
    evaluated = evaluate(malt_run_id)
    sampled >> labeled
    trained >> evaluated
    promote(register(evaluated))
