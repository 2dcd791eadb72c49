"""MALT retraining: plan -> prepare -> sample (per shard) -> label -> train (per role, STaR
beside) -> evaluate -> register -> promote.

Each cycle samples with the current champion adapters, so cycle k improves on cycle k-1.
Every stage runs its ``malt-ops`` argument list from the plan: in-process in the `local`
execution mode, as a pod in `kubernetes` mode (``$MALT_OPS_EXECUTION_MODE``).

Wiring only: planning lives in malt_ops.orchestration, tasks in malt_ops.execution.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param, chain, task

from malt_ops.execution import StageTasks, config_errors_fail_fast
from malt_ops.orchestration import (
    dag_recipe_path,
    dag_schedule,
    load_dag_recipe,
    plan_run,
    role_arguments,
    shard_arguments,
)

recipe = load_dag_recipe()
stages = StageTasks(recipe)

with DAG(
    dag_id="malt_retraining",
    description="Sample MALT trees, label them, train generator/verifier/refiner adapters and evaluate.",
    schedule=dag_schedule(recipe),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["malt", "post-training", "llm"],
    default_args=stages.default_args(),
    params={
        "recipe": Param(dag_recipe_path(), type="string", description="recipe YAML path"),
        "run_id": Param(
            None, type=["null", "string"], description="pipeline run id (default: Airflow's)"
        ),
        "overrides": Param([], type="array", description="recipe overrides, dotted.key=value"),
        "force": Param(
            False,
            type="boolean",
            description="redo the stages whose recipe keys changed (and every later one) "
            "instead of refusing",
        ),
    },
    doc_md=__doc__,
) as dag:

    @task(multiple_outputs=True)
    def plan(**context) -> dict:
        with config_errors_fail_fast():
            return plan_run(context)

    @task
    def shards(malt_run_id: str, **context) -> list[list[str]]:
        with config_errors_fail_fast():
            return shard_arguments(context)

    @task
    def roles(malt_run_id: str, **context) -> list[list[str]]:
        with config_errors_fail_fast():
            return role_arguments(context)

    run = plan()
    prepared = stages.single("prepare", run["prepare"])
    sampled = stages.mapped("sample", shards(run["run_id"]), name_prefix="shard ")
    labeled = stages.single("label", run["label"])
    trained = stages.mapped("train", roles(run["run_id"]))
    evaluated = stages.single("evaluate", run["evaluate"])
    registered = stages.single("register", run["register"])
    promoted = stages.single("promote", run["promote"])
    # promotion.require_approval puts a person's approval between register and promote
    chain(prepared, sampled, labeled, trained, evaluated, registered, *stages.approval(), promoted)
