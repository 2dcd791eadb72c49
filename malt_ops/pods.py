"""What a stage's pod looks like in the `kubernetes` execution mode.

Pure functions from :class:`KubernetesConfig` to KubernetesPodOperator arguments, so the
DAG stays wiring and tests can render the exact pod the operator would create.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from malt_ops.config import KubernetesConfig, Recipe, describe_validation_error
from malt_ops.errors import MaltError

VALUES_ENV = "MALT_OPS_KUBERNETES_VALUES"
"""A YAML file of KubernetesConfig keys written by the Helm chart (the cluster's values)."""

StageKind = Literal["sampler", "trainer", "light"]

STAGE_KINDS: dict[str, StageKind] = {
    "prepare": "light",
    "sample": "sampler",
    "label": "light",
    "train": "trainer",
    "evaluate": "sampler",
    "register": "light",
    # promote evaluates the champion on the challenger's questions (unless the evaluation
    # cache holds its results): inference, so a GPU.
    "promote": "sampler",
}
GPU_KINDS: frozenset[StageKind] = frozenset({"sampler", "trainer"})

SCRATCH = "/scratch"
"""The pod's only writable place besides /dev/shm: HOME, caches, temp files, run state."""
SCRATCH_ENV = {
    "HOME": SCRATCH,
    "TMPDIR": SCRATCH,
    "XDG_CACHE_HOME": f"{SCRATCH}/.cache",
    "HF_HOME": f"{SCRATCH}/.cache/huggingface",
    "MALT_OPS_CACHE": f"{SCRATCH}/.cache/malt-ops",
    "PYTHONUNBUFFERED": "1",
}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def kubernetes_config(recipe: Recipe, values_path: str | None = None) -> KubernetesConfig:
    """The cluster's values file (``$MALT_OPS_KUBERNETES_VALUES``) with the recipe's explicit keys on top."""
    path = values_path if values_path is not None else os.environ.get(VALUES_ENV)
    if not path:
        return recipe.kubernetes
    source = Path(path)
    if not source.is_file():
        raise MaltError(
            f"{VALUES_ENV}={path}: no such file (mount the malt-ops-kubernetes ConfigMap)"
        )
    try:
        values = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MaltError(f"{path}: not valid YAML") from exc
    if not isinstance(values, dict):
        raise MaltError(f"{path}: expected a mapping of kubernetes settings")
    merged = _deep_merge(values, recipe.kubernetes.model_dump(exclude_unset=True))
    try:
        return KubernetesConfig.model_validate(merged)
    except ValidationError as exc:
        raise MaltError(describe_validation_error(exc, f"kubernetes values {path}")) from None


def stage_command(stage: str, config: KubernetesConfig) -> list[str]:
    """The pod's command: ``malt-ops``; for train on several GPUs, torchrun starting one
    ``malt-ops`` process per GPU (DDP or FSDP by training.strategy, gloo/NCCL by device)."""
    if stage == "train" and config.gpu.count > 1:
        return [
            "torchrun",
            "--standalone",
            f"--nproc-per-node={config.gpu.count}",
            "-m",
            "malt_ops.cli",
        ]
    return ["malt-ops"]


def stage_kind(stage: str) -> StageKind:
    try:
        return STAGE_KINDS[stage]
    except KeyError:
        raise MaltError(
            f"no pod kind for stage {stage!r}; known: {', '.join(STAGE_KINDS)}"
        ) from None


def pod_operator_kwargs(stage: str, config: KubernetesConfig) -> dict[str, Any]:
    """Keyword arguments for ``KubernetesPodOperator`` running ``malt-ops <stage>``.

    Everything but ``task_id`` and ``arguments``: the argument list comes from the run plan.
    """
    from airflow.providers.cncf.kubernetes.secret import Secret
    from kubernetes.client import models as k8s

    kind = stage_kind(stage)
    gpu = kind in GPU_KINDS
    resources = config.resources.get(kind)
    limits = dict(resources.limits) if resources else {}
    requests = dict(resources.requests) if resources else {}
    if gpu:
        limits[config.gpu.resource] = str(config.gpu.count)

    volumes = [
        k8s.V1Volume(
            name="scratch",
            empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=config.scratch_size_limit),
        ),
        # torch DataLoader workers and vLLM's NCCL share memory through /dev/shm, which is tiny by default.
        k8s.V1Volume(
            name="shm",
            empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=config.shm_size_limit),
        ),
    ]
    mounts = [
        k8s.V1VolumeMount(name="scratch", mount_path=SCRATCH),
        k8s.V1VolumeMount(name="shm", mount_path="/dev/shm"),
    ]
    if config.recipes_config_map:
        volumes.append(
            k8s.V1Volume(
                name="recipes",
                config_map=k8s.V1ConfigMapVolumeSource(name=config.recipes_config_map),
            )
        )
        mounts.append(
            k8s.V1VolumeMount(name="recipes", mount_path=config.recipes_mount_path, read_only=True)
        )

    uid = config.run_as_user
    runtime_default = k8s.V1SeccompProfile(type="RuntimeDefault")
    return {
        "namespace": config.namespace,
        "name": f"malt-ops-{stage}",
        "random_name_suffix": True,
        "image": getattr(config.images, kind),
        "image_pull_policy": config.image_pull_policy,
        "image_pull_secrets": [
            k8s.V1LocalObjectReference(name=n) for n in config.image_pull_secrets
        ]
        or None,
        "cmds": stage_command(stage, config),
        "labels": {
            "app.kubernetes.io/name": "malt-ops",
            "app.kubernetes.io/component": stage,
            "malt-ops/stage-kind": kind,
            **config.labels,
        },
        "service_account_name": config.service_account,
        # Stage pods talk to S3 and MLflow, never to the Kubernetes API.
        "automount_service_account_token": False,
        "container_resources": k8s.V1ResourceRequirements(
            requests=requests or None, limits=limits or None
        ),
        "node_selector": dict(config.gpu.node_selector)
        if gpu and config.gpu.node_selector
        else None,
        "tolerations": [
            k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect)
            for t in config.gpu.tolerations
        ]
        if gpu
        else None,
        "secrets": [
            Secret(deploy_type="env", deploy_target=None, secret=name) for name in config.secrets
        ],
        "env_vars": {**SCRATCH_ENV, **config.env},
        "volumes": volumes,
        "volume_mounts": mounts,
        "security_context": k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=uid,
            run_as_group=uid,
            fs_group=uid,
            seccomp_profile=runtime_default,
        ),
        "container_security_context": k8s.V1SecurityContext(
            run_as_non_root=True,
            run_as_user=uid,
            allow_privilege_escalation=False,
            privileged=False,
            read_only_root_filesystem=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
            seccomp_profile=runtime_default,
        ),
        "startup_timeout_seconds": config.startup_timeout_seconds,
        "on_finish_action": "delete_pod",
        "deferrable": config.deferrable,
        # A worker that dies mid-stage reattaches to the running pod instead of starting a second one.
        "durable": True,
        "get_logs": True,
        "log_events_on_failure": True,
        "do_xcom_push": False,
    }
