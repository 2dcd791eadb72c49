"""Champion check: runs whenever promote updates the champion Asset (dags/malt_retraining.py).

It loads ``models:/<prefix>-system@champion`` from the registry, as a serving team would, and
asks it the recipe's promotion.check_question. An example of a downstream consumer: deploy,
canary or smoke-test jobs hang off the same Asset.

Wiring only: the check lives in malt_ops.system_model.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, task

from malt_ops.execution import champion_asset, config_errors_fail_fast
from malt_ops.orchestration import load_dag_recipe

recipe = load_dag_recipe()

with DAG(
    dag_id="malt_champion_check",
    description="Load the new MALT champion from the MLflow registry and ask it a question.",
    schedule=[champion_asset(recipe)],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["malt", "serving"],
    doc_md=__doc__,
) as dag:

    @task
    def check_champion() -> dict:
        from malt_ops.system_model import check_champion as check

        with config_errors_fail_fast():
            row = check(recipe)
        return {"answer": row.get("answer"), "question": recipe.promotion.check_question}

    check_champion()
