"""Check workload manifests against the Kubernetes "restricted" Pod Security Standard.

A pure helper for the tests (rendered Helm manifests, pods built for KubernetesPodOperator):
:func:`restricted_violations` lists what the admission controller's ``restricted`` level
would reject, plus our own rule that every container has a read-only root filesystem.
Manifests are plain dicts in the API's camelCase form (``yaml.safe_load`` of a manifest,
or ``ApiClient().sanitize_for_serialization(pod)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

WORKLOAD_KINDS = frozenset(
    {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
)

# Volume types the restricted level allows; anything else (hostPath, nfs, ...) is rejected.
ALLOWED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
ALLOWED_ADDED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
ALLOWED_SECCOMP = frozenset({"RuntimeDefault", "Localhost"})
ALLOWED_APPARMOR = frozenset({"RuntimeDefault", "Localhost"})
ALLOWED_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t"})
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
CONTAINER_FIELDS = ("initContainers", "containers", "ephemeralContainers")


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    """The pod spec inside a workload manifest (a Pod's own spec, or its template's)."""
    kind = manifest.get("kind")
    if kind not in WORKLOAD_KINDS:
        raise ValueError(f"not a workload manifest: kind {kind!r}")
    spec = manifest.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    return ((spec.get("template") or {}).get("spec")) or {}


def containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(field, container) for every container of a pod spec, init and ephemeral ones included."""
    for field in CONTAINER_FIELDS:
        for container in spec.get(field) or []:
            yield field, container


def _name(manifest: dict[str, Any]) -> str:
    return f"{manifest.get('kind')}/{(manifest.get('metadata') or {}).get('name', '?')}"


def _seccomp_type(context: dict[str, Any]) -> str | None:
    return (context.get("seccompProfile") or {}).get("type")


def restricted_violations(manifest: dict[str, Any]) -> list[str]:
    """Why ``manifest`` fails the restricted Pod Security Standard (empty list: it passes).

    Checks every container, init and ephemeral ones included, against the restricted
    level (which includes the baseline level), plus ``readOnlyRootFilesystem: true``.
    """
    spec = pod_spec(manifest)
    where = _name(manifest)
    problems: list[str] = []
    pod_ctx = spec.get("securityContext") or {}

    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            problems.append(f"{where}: {flag} must not be true")
    if (pod_ctx.get("windowsOptions") or {}).get("hostProcess"):
        problems.append(f"{where}: windowsOptions.hostProcess must not be true")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        bad = sorted(kinds - ALLOWED_VOLUME_TYPES)
        if bad:
            problems.append(
                f"{where}: volume {volume.get('name')!r} has disallowed type {', '.join(bad)}"
            )
    for sysctl in pod_ctx.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"{where}: sysctl {sysctl.get('name')!r} is not in the safe set")
    if pod_ctx.get("runAsUser") == 0:
        problems.append(f"{where}: pod runAsUser must not be 0")
    problems += _selinux_apparmor(pod_ctx, f"{where} pod")

    pod_non_root = pod_ctx.get("runAsNonRoot") is True
    pod_seccomp = _seccomp_type(pod_ctx)
    if pod_seccomp is not None and pod_seccomp not in ALLOWED_SECCOMP:
        problems.append(f"{where}: pod seccompProfile.type {pod_seccomp!r} is not allowed")

    for field, container in containers(spec):
        at = f"{where} {field[:-1]} {container.get('name')!r}"
        ctx = container.get("securityContext") or {}
        if ctx.get("privileged"):
            problems.append(f"{at}: privileged must not be true")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation must be false")
        non_root = ctx.get("runAsNonRoot")
        if non_root is False or (non_root is None and not pod_non_root):
            problems.append(f"{at}: runAsNonRoot must be true (pod or container)")
        if ctx.get("runAsUser") == 0:
            problems.append(f"{at}: runAsUser must not be 0")
        seccomp = _seccomp_type(ctx) or pod_seccomp
        if seccomp not in ALLOWED_SECCOMP:
            problems.append(
                f"{at}: seccompProfile.type must be RuntimeDefault or Localhost (got {seccomp!r})"
            )
        capabilities = ctx.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{at}: capabilities must drop ALL")
        added = sorted(set(capabilities.get("add") or []) - ALLOWED_ADDED_CAPABILITIES)
        if added:
            problems.append(f"{at}: capabilities may add only NET_BIND_SERVICE (adds {added})")
        if ctx.get("procMount") not in (None, "Default"):
            problems.append(f"{at}: procMount must be Default")
        if (ctx.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"{at}: windowsOptions.hostProcess must not be true")
        problems += _selinux_apparmor(ctx, at)
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{at}: hostPort {port['hostPort']} is not allowed")
        # Our own rule on top of the standard.
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: readOnlyRootFilesystem must be true")
    return problems


def _selinux_apparmor(context: dict[str, Any], at: str) -> list[str]:
    problems = []
    selinux = context.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in ALLOWED_SELINUX_TYPES:
        problems.append(f"{at}: seLinuxOptions.type {selinux['type']!r} is not allowed")
    for key in ("user", "role"):
        if selinux.get(key):
            problems.append(f"{at}: seLinuxOptions.{key} must not be set")
    apparmor = (context.get("appArmorProfile") or {}).get("type")
    if apparmor is not None and apparmor not in ALLOWED_APPARMOR:
        problems.append(f"{at}: appArmorProfile.type {apparmor!r} is not allowed")
    return problems


def missing_resources(manifest: dict[str, Any]) -> list[str]:
    """Containers without CPU and memory requests or without a memory limit."""
    where = _name(manifest)
    problems = []
    for field, container in containers(pod_spec(manifest)):
        resources = container.get("resources") or {}
        requests = resources.get("requests") or {}
        limits = resources.get("limits") or {}
        at = f"{where} {field[:-1]} {container.get('name')!r}"
        for key in ("cpu", "memory"):
            if key not in requests:
                problems.append(f"{at}: no {key} request")
        if "memory" not in limits:
            problems.append(f"{at}: no memory limit")
    return problems
