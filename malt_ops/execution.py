"""Execution modes: the same DAG wiring runs each stage in-process or as a Kubernetes pod.

``local`` (default) calls the stage in the Airflow worker, which is what ``malt-ops run``
and the tests use. ``kubernetes`` makes every stage a KubernetesPodOperator running
``malt-ops <stage> ...`` in the stage kind's image (see malt_ops.pods). The mode comes from
``$MALT_OPS_EXECUTION_MODE``, else the Airflow Variable ``malt_ops_execution_mode``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

from malt_ops.config import Recipe
from malt_ops.errors import MaltError

log = logging.getLogger("malt_ops")

MODE_ENV = "MALT_OPS_EXECUTION_MODE"
MODE_VARIABLE = "malt_ops_execution_mode"
MODES = ("local", "kubernetes")
Mode = Literal["local", "kubernetes"]


def _variable(key: str) -> str | None:
    try:
        from airflow.sdk import Variable

        return Variable.get(key, default=None)
    except Exception as exc:  # parsing outside a deployment (tests, CLI) has no Variable store
        log.debug("Airflow Variable %s not readable here (%s); using the default", key, exc)
        return None


def execution_mode() -> Mode:
    value, source = os.environ.get(MODE_ENV), MODE_ENV
    if not value:
        value, source = _variable(MODE_VARIABLE), f"Airflow Variable {MODE_VARIABLE}"
    mode = (value or "local").strip().lower()
    if mode not in MODES:
        raise MaltError(f"{source}={value!r}: use one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


def run_stage_arguments(arguments: list[str]) -> str:
    """Local mode's task body: run the stage in-process; the run id goes to XCom."""
    from malt_ops.cli import run_stage

    run_stage(arguments)
    return arguments[arguments.index("--run-id") + 1]


class StageTasks:
    """Builds one Airflow task per stage for the chosen mode; the DAG only wires them."""

    def __init__(self, recipe: Recipe, mode: Mode | None = None) -> None:
        self.mode = mode or execution_mode()
        self._kubernetes = None
        if self.mode == "kubernetes":
            from malt_ops.pods import kubernetes_config

            self._kubernetes = kubernetes_config(recipe)

    def single(self, stage: str, arguments: Any) -> Any:
        """A task running one argument list (an XComArg from the plan)."""
        if self._kubernetes is None:
            from airflow.sdk import task

            return task(task_id=stage)(run_stage_arguments)(arguments)
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        from malt_ops.pods import pod_operator_kwargs

        return KubernetesPodOperator(
            task_id=stage, arguments=arguments, **pod_operator_kwargs(stage, self._kubernetes)
        )

    def mapped(self, stage: str, argument_lists: Any, name_prefix: str = "") -> Any:
        """One mapped task instance per argument list; the last argument names the instance."""
        if self._kubernetes is None:
            from airflow.sdk import task

            decorated = task(
                task_id=stage,
                map_index_template=name_prefix + "{{ task.op_kwargs['arguments'][-1] }}",
            )(run_stage_arguments)
            return decorated.expand(arguments=argument_lists)
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        from malt_ops.pods import pod_operator_kwargs

        return KubernetesPodOperator.partial(
            task_id=stage,
            map_index_template=name_prefix + "{{ task.arguments[-1] }}",
            **pod_operator_kwargs(stage, self._kubernetes),
        ).expand(arguments=argument_lists)
