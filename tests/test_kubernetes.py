"""The `kubernetes` execution mode: the pods the DAG's KubernetesPodOperators would create.

No API server can run here, so each stage task's pod is rendered with the operator's own
``build_pod_request_obj()`` (a dummy kubeconfig in place) and checked field by field, then
validated against the Kubernetes schema and the restricted pod security standard.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
import yaml

from malt_ops.config import TRAINED, load_recipe
from malt_ops.errors import MaltError
from malt_ops.orchestration import plan_run, role_arguments, shard_arguments
from malt_ops.pods import GPU_KINDS, STAGE_KINDS, kubernetes_config
from tests.conftest import LOCAL_RECIPE
from tests.pod_security import restricted_violations

DAGS = Path(__file__).resolve().parents[1] / "dags"
K8S_VERSION = kubernetes_validate.latest_version()

CLUSTER_VALUES = {
    "namespace": "malt-jobs",
    "service_account": "malt-runner",
    "images": {
        "sampler": "registry.example.com/malt/sampler:1.2.3",
        "trainer": "registry.example.com/malt/trainer:1.2.3",
        "light": "registry.example.com/malt/light:1.2.3",
    },
    "image_pull_secrets": ["regcred"],
    "gpu": {
        "count": 2,
        "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "secrets": ["malt-s3", "malt-mlflow"],
    "env": {"MLFLOW_TRACKING_URI": "http://malt-ops-mlflow.malt:5000"},
}
SECRET_VALUE = "sentinel-secret-never-rendered"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A DAG parsed in kubernetes mode with the cluster's values file, like the Helm chart mounts."""
    root = tmp_path_factory.mktemp("k8s")
    values = root / "kubernetes.yaml"
    values.write_text(yaml.safe_dump(CLUSTER_VALUES))
    kubeconfig = root / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "dummy"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    patch = pytest.MonkeyPatch()
    patch.setenv("MALT_OPS_EXECUTION_MODE", "kubernetes")
    patch.setenv("MALT_OPS_RECIPE", str(LOCAL_RECIPE.parent / "cluster.yaml"))
    patch.setenv("MALT_OPS_KUBERNETES_VALUES", str(values))
    patch.setenv("KUBECONFIG", str(kubeconfig))
    # the client reads KUBECONFIG once, when kubernetes.config is first imported (maybe by an
    # earlier test module): point its default at this file too
    import kubernetes.config.kube_config as kube_config

    patch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    yield SimpleNamespace(bag=bag, values_file=values)
    patch.undo()


def _context(overrides: list[str] | None = None) -> dict:
    return {
        "params": {
            "recipe": "/etc/malt-ops/recipes/local.yaml",
            "run_id": "nightly-42",
            "overrides": overrides or [],
        },
        "dag_run": SimpleNamespace(run_id="scheduled__2026-11-21"),
    }


def _recipe_loads(monkeypatch):
    # The plan checks the recipe; the pods' path (a ConfigMap mount) does not exist here.
    import malt_ops.orchestration as orchestration

    monkeypatch.setattr(
        orchestration, "load_recipe", lambda path, overrides: load_recipe(LOCAL_RECIPE, overrides)
    )


def _stage_arguments(monkeypatch, overrides: list[str] | None = None) -> dict[str, list]:
    _recipe_loads(monkeypatch)
    context = _context(overrides)
    plan = plan_run(context)
    return {
        **{
            stage: [plan[stage]]
            for stage in ("prepare", "label", "evaluate", "register", "promote")
        },
        "sample": shard_arguments(context),
        "train": role_arguments(context),
    }


def _rendered_pods(dag, arguments: dict[str, list]) -> dict[str, list[dict]]:
    from airflow.sdk.definitions.mappedoperator import MappedOperator
    from kubernetes.client import ApiClient

    pods: dict[str, list[dict]] = {}
    for stage, lists in arguments.items():
        task = dag.get_task(stage)
        for argv in lists:
            if isinstance(task, MappedOperator):
                operator = task.unmap({"arguments": argv})
            else:
                operator = copy.copy(task)
                operator.arguments = argv
            pod = operator.build_pod_request_obj()
            pods.setdefault(stage, []).append(ApiClient().sanitize_for_serialization(pod))
    return pods


@pytest.fixture(scope="module")
def pods(cluster):
    patch = pytest.MonkeyPatch()
    arguments = _stage_arguments(patch, overrides=["sampling.n=2", "data.train_path=a;rm -rf /"])
    rendered = _rendered_pods(cluster.bag.dags["malt_retraining"], arguments)
    patch.undo()
    return SimpleNamespace(arguments=arguments, rendered=rendered)


def test_every_stage_is_a_pod_operator_and_the_wiring_is_unchanged(cluster):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from malt_ops.stage_pod import StagePodOperator

    dag = cluster.bag.dags["malt_retraining"]
    assert cluster.bag.import_errors == {}
    for stage in STAGE_KINDS:
        task = dag.get_task(stage)
        operator_class = getattr(task, "operator_class", type(task))
        assert operator_class is StagePodOperator, stage
        assert issubclass(operator_class, KubernetesPodOperator)
    # Planning tasks stay in-process and light.
    assert {t.task_id for t in dag.tasks} - set(STAGE_KINDS) == {"plan", "shards", "roles"}
    chain = ["prepare", "sample", "label", "train", "evaluate", "register", "promote"]
    for upstream, downstream in itertools.pairwise(chain):
        assert downstream in dag.get_task(upstream).downstream_task_ids


def test_gpu_stages_run_in_the_gpu_pool_one_slot_per_gpu(cluster):
    dag = cluster.bag.dags["malt_retraining"]
    for stage, kind in STAGE_KINDS.items():
        task = dag.get_task(stage)
        if kind in GPU_KINDS:
            assert task.pool == "malt_ops_gpu", stage
            assert task.pool_slots == CLUSTER_VALUES["gpu"]["count"], stage
        else:
            assert task.pool == "default_pool" and task.pool_slots == 1, stage


def test_pod_image_arguments_and_resources_per_stage(pods):
    images = CLUSTER_VALUES["images"]
    assert len(pods.rendered["sample"]) == load_recipe(LOCAL_RECIPE).sampling.num_shards
    assert len(pods.rendered["train"]) == len(TRAINED)
    for stage, rendered in pods.rendered.items():
        kind = STAGE_KINDS[stage]
        for pod, argv in zip(rendered, pods.arguments[stage], strict=True):
            spec = pod["spec"]
            (container,) = spec["containers"]
            assert container["image"] == images[kind]
            # two GPUs per pod: train runs one process per GPU under torchrun
            launcher = ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "malt_ops.cli"]
            assert container["command"] == (launcher if stage == "train" else ["malt-ops"])
            assert container["args"] == argv and argv[0] == stage
            assert argv[argv.index("--run-id") + 1] == "nightly-42"
            assert pod["metadata"]["namespace"] == "malt-jobs"
            assert spec["serviceAccountName"] == "malt-runner"
            assert spec["automountServiceAccountToken"] is False
            assert spec["imagePullSecrets"] == [{"name": "regcred"}]
            assert spec["restartPolicy"] == "Never"
            assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == stage
            limits = container["resources"]["limits"]
            if kind in GPU_KINDS:
                assert limits["nvidia.com/gpu"] == "2", stage
                assert spec["nodeSelector"] == CLUSTER_VALUES["gpu"]["node_selector"]
                assert spec["tolerations"] == CLUSTER_VALUES["gpu"]["tolerations"]
            else:
                assert "nvidia.com/gpu" not in limits, stage
                assert not spec.get("nodeSelector") and not spec.get("tolerations")
    shards = [argv[-1] for argv in pods.arguments["sample"]]
    assert shards == [str(i) for i in range(len(shards))]
    assert [argv[-1] for argv in pods.arguments["train"]] == list(TRAINED)


def test_overrides_stay_single_arguments_never_a_shell_string(pods):
    argv = pods.arguments["label"][0]
    # A hostile value is one list element handed to exec, not parsed by a shell.
    assert argv[argv.index("data.train_path=a;rm -rf /") - 1] == "--set"
    for rendered in pods.rendered.values():
        for pod in rendered:
            (container,) = pod["spec"]["containers"]
            assert container["command"][-1] in ("malt-ops", "malt_ops.cli")
            assert all(isinstance(a, str) for a in container["args"])


def test_pods_meet_the_restricted_standard_and_the_schema(pods):
    for stage, rendered in pods.rendered.items():
        for pod in rendered:
            assert restricted_violations(pod) == [], stage
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
            mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
            assert {"/scratch", "/dev/shm", "/etc/malt-ops/recipes"} <= set(mounts)
            assert mounts["/etc/malt-ops/recipes"]["readOnly"] is True


def test_secrets_arrive_by_reference_only(pods):
    for rendered in pods.rendered.values():
        for pod in rendered:
            (container,) = pod["spec"]["containers"]
            assert [e["secretRef"]["name"] for e in container["envFrom"]] == [
                "malt-s3",
                "malt-mlflow",
            ]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["MLFLOW_TRACKING_URI"] == CLUSTER_VALUES["env"]["MLFLOW_TRACKING_URI"]
            assert env["HOME"] == "/scratch"
            assert SECRET_VALUE not in yaml.safe_dump(pod)
            assert "AWS_SECRET_ACCESS_KEY" not in env


def test_operator_settings_for_slow_gpu_scale_up(cluster):
    dag = cluster.bag.dags["malt_retraining"]
    for stage in STAGE_KINDS:
        task = dag.get_task(stage)
        settings = getattr(task, "partial_kwargs", None) or vars(task)
        assert settings["startup_timeout_seconds"] >= 900
        assert settings["on_finish_action"] == "delete_pod"
        assert settings["deferrable"] is True
        assert settings["do_xcom_push"] is False


def test_recipe_keys_win_over_the_cluster_values(tmp_path, monkeypatch):
    monkeypatch.delenv("MALT_OPS_KUBERNETES_VALUES", raising=False)
    values = tmp_path / "kubernetes.yaml"
    values.write_text(yaml.safe_dump(CLUSTER_VALUES))
    recipe = load_recipe(LOCAL_RECIPE, ["kubernetes.gpu.count=4"])
    merged = kubernetes_config(recipe, str(values))
    assert merged.gpu.count == 4
    assert merged.gpu.node_selector == CLUSTER_VALUES["gpu"]["node_selector"]
    assert merged.images.trainer == CLUSTER_VALUES["images"]["trainer"]
    assert kubernetes_config(load_recipe(LOCAL_RECIPE), None).namespace == "malt-ops-jobs"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("namespace: Not_A_Label\n", "namespace: Value error, must be a DNS label"),
        ("gpu: {count: 0}\n", "gpu.count"),
        ("imagez: {}\n", "unknown key 'imagez'"),
        ("- a list\n", "expected a mapping"),
        ("gpu: [\n", "not valid YAML"),
    ],
)
def test_bad_cluster_values_fail_in_one_line(tmp_path, content, message):
    values = tmp_path / "kubernetes.yaml"
    values.write_text(content)
    with pytest.raises(MaltError, match=None) as error:
        kubernetes_config(load_recipe(LOCAL_RECIPE), str(values))
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(MaltError, match="no such file"):
        kubernetes_config(load_recipe(LOCAL_RECIPE), str(tmp_path / "missing.yaml"))


def test_execution_mode_switch(monkeypatch):
    from malt_ops.execution import execution_mode

    monkeypatch.delenv("MALT_OPS_EXECUTION_MODE", raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_MALT_OPS_EXECUTION_MODE", raising=False)
    assert execution_mode() == "local"
    monkeypatch.setenv("AIRFLOW_VAR_MALT_OPS_EXECUTION_MODE", "kubernetes")
    assert execution_mode() == "kubernetes"
    monkeypatch.setenv("MALT_OPS_EXECUTION_MODE", "Local")
    assert execution_mode() == "local"
    monkeypatch.setenv("MALT_OPS_EXECUTION_MODE", "k8s")
    with pytest.raises(
        MaltError, match="MALT_OPS_EXECUTION_MODE='k8s': use one of local, kubernetes"
    ):
        execution_mode()


def test_local_mode_runs_only_stage_commands():
    from malt_ops.cli import run_stage

    with pytest.raises(MaltError, match="not a stage command"):
        run_stage(["rollback", "--recipe", str(LOCAL_RECIPE)])


def test_a_vllm_engine_wider_than_its_pod_is_refused_at_plan_time(cluster, monkeypatch):
    _recipe_loads(monkeypatch)
    # the cluster's values give each GPU pod 2 GPUs
    vllm = ["inference.backend=vllm", "inference.vllm.tensor_parallel_size=4"]
    with pytest.raises(MaltError) as refused:
        plan_run(_context(vllm))
    message = str(refused.value)
    assert message.startswith("kubernetes.gpu.count: 2 GPU(s) per pod") and "= 4:" in message
    assert "\n" not in message
    # an engine that spans the pod's GPUs plans (kubernetes keys are fixed at DAG parse time)
    plan = plan_run(_context(["inference.backend=vllm", "inference.vllm.tensor_parallel_size=2"]))
    assert plan["run_id"] == "nightly-42"


def test_training_processes_other_than_the_pods_gpus_are_refused_at_plan_time(cluster, monkeypatch):
    _recipe_loads(monkeypatch)
    with pytest.raises(MaltError) as refused:
        plan_run(_context(["training.processes=3"]))
    assert str(refused.value).startswith("training.processes: 3, but each train pod launches")
    assert plan_run(_context(["training.processes=2"]))["run_id"] == "nightly-42"


def test_a_model_that_does_not_fit_the_pools_gpus_is_refused_at_plan_time(
    cluster, monkeypatch, tmp_path
):
    _recipe_loads(monkeypatch)
    values = dict(CLUSTER_VALUES, gpu={**CLUSTER_VALUES["gpu"], "count": 1, "gpu_type": "l40s"})
    path = tmp_path / "kubernetes.yaml"
    path.write_text(yaml.safe_dump(values))
    monkeypatch.setenv("MALT_OPS_KUBERNETES_VALUES", str(path))
    llama = [
        "inference.backend=vllm",
        "model.source=path",
        "model.path=s3://models/Llama-3.1-8B-Instruct",
    ]
    # 15 GiB of bf16 weights, but vLLM may use only a fifth of the L40S's 48 GiB
    with pytest.raises(MaltError) as refused:
        plan_run(_context([*llama, "inference.vllm.gpu_memory_utilization=0.2"]))
    message = str(refused.value)
    assert message.startswith("kubernetes.gpu.gpu_type: l40s has 48 GiB, but inference needs 15.0")
    assert "tensor_parallel_size" in message and "\n" not in message
    assert plan_run(_context(llama))["run_id"] == "nightly-42"
    # a GPU type the hardware table does not know is named, with the ones it does
    values["gpu"]["gpu_type"] = "tpu-v9"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(MaltError, match=r"^kubernetes.gpu.gpu_type: tpu-v9 is not in"):
        plan_run(_context(llama))
