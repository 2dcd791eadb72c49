"""Webhook notifications: a failed task, and each promote decision, posted as JSON.

Airflow's HttpNotifier sends them through an HTTP connection, so the webhook URL (and any
token) lives in a connection from the environment or a Kubernetes Secret, never in a recipe.
Our subclass only builds the payload in Python from the callback's context: Airflow's
templates are strict about missing context keys, and a failure callback must never fail.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.providers.http.notifications.http import HttpNotifier

from malt_ops.errors import redact

log = logging.getLogger("malt_ops")


def _run_id(context: dict[str, Any]) -> str:
    dag_run = context.get("dag_run")
    return str(getattr(dag_run, "run_id", "") or context.get("run_id") or "")


def _task_id(context: dict[str, Any]) -> str:
    ti = context.get("ti") or context.get("task_instance")
    return str(getattr(ti, "task_id", "") or "")


def _dag_id(context: dict[str, Any]) -> str:
    dag = context.get("dag")
    return str(getattr(dag, "dag_id", "") or "")


def promotion_decision(context: dict[str, Any]) -> dict[str, Any] | None:
    """What promote decided, from its manifest in the store (None where unreadable here)."""
    try:
        from malt_ops.orchestration import recipe_for, run_id_for
        from malt_ops.stages.common import stage_output

        recipe = recipe_for(context)
        out = stage_output(recipe, run_id_for(context), "promote")
        summary = out.manifest().get("summary") or {}
    except Exception as exc:  # the notification still goes out, without the decision
        log.warning("promote decision not readable for the notification: %s", exc)
        return None
    keep = ("promoted", "reason", "challenger_accuracy", "reference_accuracy", "p_value", "effect")
    return {k: summary[k] for k in keep if k in summary}


class MaltNotifier(HttpNotifier):
    def __init__(self, *, event: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.event = event

    def payload(self, context: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "event": self.event,
            "dag_id": _dag_id(context),
            "run_id": _run_id(context),
            "task_id": _task_id(context),
        }
        if self.event == "failure":
            error = context.get("exception")
            reason = redact(str(error)).splitlines()[0][:300] if error else "see the task log"
            body["error"] = reason
            body["text"] = f"malt-ops {body['run_id']}: task {body['task_id']} failed: {reason}"
        else:
            decision = promotion_decision(context)
            body["decision"] = decision
            verdict = (
                "decision not readable here (see the promote log)"
                if decision is None
                else ("new champion" if decision.get("promoted") else "champion kept")
            )
            body["text"] = f"malt-ops {body['run_id']}: promote: {verdict}"
        return body

    def notify(self, context: Any) -> None:
        self.json = self.payload(context)
        try:
            super().notify(context)
        except Exception as exc:  # a webhook outage must not fail or retry the stage
            log.error("webhook notification (%s) not sent: %s", self.event, redact(str(exc)))


def failure_notifier(conn_id: str) -> MaltNotifier:
    return MaltNotifier(event="failure", http_conn_id=conn_id)


def promotion_notifier(conn_id: str) -> MaltNotifier:
    return MaltNotifier(event="promotion", http_conn_id=conn_id)
