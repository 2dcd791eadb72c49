"""Execution modes: the same DAG wiring runs each stage in-process or as a Kubernetes pod.

``local`` (default) calls the stage in the Airflow worker, which is what ``malt-ops run``
and the tests use. ``kubernetes`` makes every stage a KubernetesPodOperator running
``malt-ops <stage> ...`` in the stage kind's image (see malt_ops.pods). The mode comes from
``$MALT_OPS_EXECUTION_MODE``, else the Airflow Variable ``malt_ops_execution_mode``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal

from malt_ops.config import Recipe
from malt_ops.errors import MaltError, RegistryUnavailable

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


@contextmanager
def config_errors_fail_fast() -> Iterator[None]:
    """A configuration error fails its task without retries: a retry would fail the same way.
    A registry that did not answer (RegistryUnavailable) is a fault, and is retried."""
    try:
        yield
    except RegistryUnavailable:
        raise
    except MaltError as exc:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"{exc} (a configuration error: not retried)") from exc


def run_stage_arguments(arguments: list[str]) -> str:
    """Local mode's task body: run the stage in-process; the run id goes to XCom."""
    from malt_ops.cli import run_stage

    with config_errors_fail_fast():
        run_stage(arguments)
    return arguments[arguments.index("--run-id") + 1]


def champion_asset(recipe: Recipe) -> Any:
    """The Airflow Asset that promote updates: the registry's system champion."""
    from airflow.sdk import Asset

    from malt_ops.registry import system_model_name

    return Asset(
        name=f"{system_model_name(recipe)}-champion",
        uri=f"models:/{system_model_name(recipe)}@champion",
    )


class StageTasks:
    """Builds one Airflow task per stage for the chosen mode; the DAG only wires them."""

    def __init__(self, recipe: Recipe, mode: Mode | None = None) -> None:
        self.mode = mode or execution_mode()
        self.recipe = recipe
        self._kubernetes = None
        if self.mode == "kubernetes":
            from malt_ops.pods import kubernetes_config

            self._kubernetes = kubernetes_config(recipe)

    def default_args(self) -> dict[str, Any]:
        """Every task's retries, and the failure notifier where the recipe names a webhook."""
        schedule = self.recipe.schedule
        args: dict[str, Any] = {
            "retries": schedule.retries,
            "retry_delay": timedelta(minutes=schedule.retry_delay_minutes),
        }
        if schedule.notify_conn_id:
            from malt_ops.notify import failure_notifier

            args["on_failure_callback"] = failure_notifier(schedule.notify_conn_id)
        return args

    def options(self, stage: str) -> dict[str, Any]:
        """Per-stage task options: the timeout, the GPU pool, and promote's Asset outlet."""
        schedule = self.recipe.schedule
        options: dict[str, Any] = {
            "execution_timeout": timedelta(minutes=schedule.timeout_minutes[stage])
        }
        if self._kubernetes is not None and self._kubernetes.gpu.pool:
            from malt_ops.pods import GPU_KINDS, stage_kind

            if stage_kind(stage) in GPU_KINDS:
                options["pool"] = self._kubernetes.gpu.pool
                options["pool_slots"] = self._kubernetes.gpu.count
        if stage == "promote":
            options["outlets"] = [champion_asset(self.recipe)]
            if schedule.notify_conn_id:
                from malt_ops.notify import promotion_notifier

                options["on_success_callback"] = promotion_notifier(schedule.notify_conn_id)
        return options

    def approval(self) -> list[Any]:
        """The approval task before promote where promotion.require_approval, else none."""
        if not self.recipe.promotion.require_approval:
            return []
        from airflow.providers.standard.operators.hitl import ApprovalOperator

        return [
            ApprovalOperator(
                task_id="approve_promotion",
                subject="Promote the MALT challenger of run {{ params.run_id or run_id }}?",
                body=(
                    "Evaluate and register finished. Approve to let promote compare the "
                    "challenger with the champion and move the champion alias if it wins; "
                    "reject to keep the champion as it is."
                ),
                response_timeout=timedelta(days=7),
            )
        ]

    def single(self, stage: str, arguments: Any) -> Any:
        """A task running one argument list (an XComArg from the plan)."""
        if self._kubernetes is None:
            from airflow.sdk import task

            return task(task_id=stage, **self.options(stage))(run_stage_arguments)(arguments)
        from malt_ops.pods import pod_operator_kwargs
        from malt_ops.stage_pod import StagePodOperator

        return StagePodOperator(
            task_id=stage,
            arguments=arguments,
            **pod_operator_kwargs(stage, self._kubernetes),
            **self.options(stage),
        )

    def mapped(self, stage: str, argument_lists: Any, name_prefix: str = "") -> Any:
        """One mapped task instance per argument list; the last argument names the instance."""
        if self._kubernetes is None:
            from airflow.sdk import task

            decorated = task(
                task_id=stage,
                map_index_template=name_prefix + "{{ task.op_kwargs['arguments'][-1] }}",
                **self.options(stage),
            )(run_stage_arguments)
            return decorated.expand(arguments=argument_lists)
        from malt_ops.pods import pod_operator_kwargs
        from malt_ops.stage_pod import StagePodOperator

        return StagePodOperator.partial(
            task_id=stage,
            map_index_template=name_prefix + "{{ task.arguments[-1] }}",
            **pod_operator_kwargs(stage, self._kubernetes),
            **self.options(stage),
        ).expand(arguments=argument_lists)
