"""The glue between Airflow and the stages: the DAG's recipe, the run id, each stage's arguments.

A run is planned once (recipe checked, run id fixed, one ``malt-ops`` argument list per stage
task); every stage task then runs its list, in-process or as a pod (see malt_ops.execution).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from malt_ops.config import TRAINED, Recipe, load_recipe, parse_override
from malt_ops.errors import MaltError
from malt_ops.storage import validate_run_id

log = logging.getLogger("malt_ops")

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE_ENV = "MALT_OPS_RECIPE"


def dag_recipe_path() -> str:
    """The recipe the DAG is parsed with: ``$MALT_OPS_RECIPE`` or recipes/local.yaml."""
    return os.environ.get(RECIPE_ENV) or str(REPO_ROOT / "recipes" / "local.yaml")


def load_dag_recipe() -> Recipe:
    return load_recipe(dag_recipe_path())


def _params(context: dict[str, Any]) -> dict[str, Any]:
    return dict(context.get("params") or {})


PARSE_TIME_SECTIONS = ("kubernetes", "schedule")
"""Recipe sections the DAG file reads when it is parsed (pods, retries, schedule): a per-run
override of them would be silently ignored, so it is refused."""


PARSE_TIME_KEYS = ("promotion.require_approval",)
"""Single keys the DAG file reads when parsed (they change its tasks)."""


def refuse_parse_time_overrides(overrides: list[str]) -> None:
    for text in overrides:
        parts, _ = parse_override(text)
        dotted = ".".join(parts)
        if parts[0] in PARSE_TIME_SECTIONS or any(
            dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + ".")
            for key in PARSE_TIME_KEYS
        ):
            raise MaltError(
                f"override '{text}': {'.'.join(parts)} is read when the DAG is parsed, not per "
                f"run: set it in the DAG's recipe ({dag_recipe_path()}) or the Helm values"
            )


def recipe_for(context: dict[str, Any]) -> Recipe:
    params = _params(context)
    overrides = [str(o) for o in params.get("overrides") or []]
    refuse_parse_time_overrides(overrides)
    return load_recipe(params.get("recipe") or dag_recipe_path(), overrides)


def run_id_for(context: dict[str, Any]) -> str:
    """The pipeline run id: the ``run_id`` param, else Airflow's run id made path-safe.

    One-to-one: an Airflow run id that is already a valid run id is kept as it is; any other
    (characters replaced, '..', too long) gets a hash of the original appended, so 'a b' and
    'a/b' never share one run's outputs.
    """
    explicit = _params(context).get("run_id")
    if explicit:
        return validate_run_id(str(explicit))
    original = str(context["dag_run"].run_id)
    safe = re.sub(r"[^A-Za-z0-9_.:+-]", "-", original)
    safe = re.sub(r"\.(?=\.)", "-", safe)
    if not (safe[:1].isascii() and safe[:1].isalnum()):
        safe = f"r{safe}"
    if safe != original or len(safe) > 200:
        safe = f"{safe[:180]}-{hashlib.sha256(original.encode()).hexdigest()[:16]}"
    return validate_run_id(safe)


def stage_arguments(stage: str, context: dict[str, Any], *extra: str) -> list[str]:
    """The ``malt-ops`` argument list that runs ``stage`` for this DAG run.

    The same list runs in-process (local mode) or as a pod's args (kubernetes mode). It is a
    list, never a shell string: recipe values cannot inject commands.
    """
    params = _params(context)
    arguments = [
        stage,
        "--recipe",
        str(params.get("recipe") or dag_recipe_path()),
        "--run-id",
        run_id_for(context),
    ]
    for override in params.get("overrides") or []:
        arguments += ["--set", str(override)]
    if params.get("force"):
        arguments.append("--force")
    return [*arguments, *extra]


SINGLE_STAGES = ("prepare", "label", "evaluate", "register", "promote")


def plan_run(context: dict[str, Any]) -> dict[str, Any]:
    """Check the recipe and overrides once, up front; the run id and each stage's arguments.

    Only ids, paths and argument lists travel through XCom, never data.
    """
    recipe = recipe_for(context)  # fail here, in one line, before any pod or stage starts
    from malt_ops.data import check_splits
    from malt_ops.policy import run_policy

    check_splits(recipe.data)  # a test question that is also a training question stops here
    check_gpus(recipe)
    check_memory(recipe)

    # One sampling policy for every shard: resolved here, once, and recorded in the store.
    run_policy(recipe, run_id_for(context))
    return {"run_id": run_id_for(context)} | {
        stage: stage_arguments(stage, context) for stage in SINGLE_STAGES
    }


def check_gpus(recipe: Recipe) -> None:
    """In kubernetes mode, a vLLM stage's pod must ask for exactly the GPUs its engine spans
    (tensor x pipeline parallel): fewer and vLLM fails at start-up on the node, more and they
    sit idle; and training runs one process per GPU of its pod. Checked once at plan time,
    before any pod is scheduled."""
    from malt_ops.execution import execution_mode
    from malt_ops.pods import kubernetes_config

    if execution_mode() != "kubernetes":
        return
    count = kubernetes_config(recipe).gpu.count
    if recipe.training.processes not in (1, count):
        raise MaltError(
            f"training.processes: {recipe.training.processes}, but each train pod launches one "
            f"process per GPU, kubernetes.gpu.count = {count}: set it to {count} or leave it 1"
        )
    if recipe.inference.backend != "vllm":
        return
    engine = recipe.inference.vllm
    needed = engine.tensor_parallel_size * engine.pipeline_parallel_size
    if count != needed:
        raise MaltError(
            f"kubernetes.gpu.count: {count} GPU(s) per pod, but inference.vllm."
            f"tensor_parallel_size x pipeline_parallel_size = {engine.tensor_parallel_size} x "
            f"{engine.pipeline_parallel_size} = {needed}: make them equal"
        )


def check_memory(recipe: Recipe) -> None:
    """In kubernetes mode with a known GPU type, the model's weights must fit each GPU: what a
    vLLM engine holds per GPU (split over tensor x pipeline parallel), and what a trainer
    holds (DDP keeps a whole copy per GPU). Activations and KV cache come on top, so weights
    may take only the hardware table's memory_headroom share. An unknown model shape is not
    checked (nothing to check it with)."""
    from malt_ops.estimate import load_hardware
    from malt_ops.execution import execution_mode
    from malt_ops.pods import kubernetes_config

    gpu_type = kubernetes_config(recipe).gpu.gpu_type if execution_mode() == "kubernetes" else None
    if gpu_type is None:
        return
    table = load_hardware()
    if gpu_type not in table.devices:
        raise MaltError(
            f"kubernetes.gpu.gpu_type: {gpu_type} is not in malt_ops/hardware.yaml "
            f"(one of {', '.join(table.devices)}); set the Helm value gpu.type to one of them"
        )
    shape = table.model_of(recipe)
    if shape is None:
        log.info("plan: no shape for the model in malt_ops/hardware.yaml; memory not checked")
        return
    device = table.devices[gpu_type]
    headroom = table.shares(gpu_type).memory_headroom
    budget = device.memory_gib * 2**30 * headroom
    engine = recipe.inference.vllm
    split = 1
    if recipe.inference.backend == "vllm":
        split = engine.tensor_parallel_size * engine.pipeline_parallel_size
        budget = min(budget, device.memory_gib * 2**30 * engine.gpu_memory_utilization)
    for where, per_gpu in (
        ("inference", shape.weight_bytes / split),
        ("training", shape.weight_bytes),
    ):
        if per_gpu > budget:
            raise MaltError(
                f"kubernetes.gpu.gpu_type: {gpu_type} has {device.memory_gib:g} GiB, but "
                f"{where} needs {per_gpu / 2**30:.1f} GiB of bf16 weights per GPU for a "
                f"{shape.params_b:g} B model (at most {budget / 2**30:.1f} GiB): choose a larger "
                "GPU"
                + (", or raise inference.vllm.tensor_parallel_size" if where == "inference" else "")
            )


def shard_arguments(context: dict[str, Any]) -> list[list[str]]:
    """One ``sample`` argument list per shard (the shard last: it names the mapped task)."""
    shards = recipe_for(context).sampling.num_shards
    return [
        stage_arguments("sample", context, "--num-shards", str(shards), "--shard", str(shard))
        for shard in range(shards)
    ]


def role_arguments(context: dict[str, Any]) -> list[list[str]]:
    """One ``train`` argument list per trained adapter (the role last: it names the mapped task)."""
    return [stage_arguments("train", context, "--role", role) for role in TRAINED]


def training_set_asset_uri(recipe: Recipe) -> str | None:
    """The Airflow Asset URI of the training set, when it is a file that new data can land in."""
    path = recipe.data.train_path if recipe.data.source == "file" else None
    if not path:
        return None
    return path if "://" in path else f"file://{Path(path).expanduser().resolve()}"


def dag_schedule(recipe: Recipe) -> Any:
    """The recipe's cron, or'ed with the training-set Asset: new data also starts a cycle."""
    from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable

    uri = training_set_asset_uri(recipe)
    cron = recipe.schedule.cron
    if uri is None:
        return cron
    if cron is None:
        return [Asset(uri)]
    return AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[Asset(uri)]
    )
