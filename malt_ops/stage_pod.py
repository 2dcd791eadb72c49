"""The stage pod operator: KubernetesPodOperator that does not retry a configuration error.

A stage exits with CONFIG_ERROR_EXIT (2) when its recipe or inputs are wrong; a retry would
start a GPU pod only to fail the same way. The provider retries every failed pod alike, and
its only exit-code hook (``skip_on_exit_code``) skips rather than fails, so this subclass
turns exit code 2 into AirflowFailException (failed, no retries) in ``cleanup``, where the
provider raises a failed pod's error in both its sync and deferrable paths.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from malt_ops.errors import CONFIG_ERROR_EXIT


def container_exit_code(pod: Any, container: str) -> int | None:
    """The exit code of ``container`` in a finished pod, or None while it has none."""
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    for status in statuses:
        if status.name == container and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None


class StagePodOperator(KubernetesPodOperator):
    def cleanup(self, pod: Any, remote_pod: Any, xcom_result: Any = None, context: Any = None):
        try:
            return super().cleanup(pod, remote_pod, xcom_result=xcom_result, context=context)
        except AirflowFailException:
            raise
        except AirflowException as exc:
            if container_exit_code(remote_pod, self.base_container_name) == CONFIG_ERROR_EXIT:
                raise AirflowFailException(
                    f"{self.task_id}: the stage exited {CONFIG_ERROR_EXIT}, a configuration "
                    "error (its log says what to fix): not retried"
                ) from exc
            raise
