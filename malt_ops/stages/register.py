"""register: the run's three role adapters become MLflow model versions, and one version of
``<prefix>-system`` records the three of them; that system version gets alias `challenger`
(mirrored on the role models)."""

from __future__ import annotations

from typing import Any

from malt_ops.config import ROLES, Recipe
from malt_ops.data import TRAIN_QUESTIONS, question_hash
from malt_ops.errors import MaltError
from malt_ops.models import base_model_sha256
from malt_ops.registry import CHALLENGER, model_name, move_set, register_system_version
from malt_ops.stages.common import (
    already_done,
    log,
    require_done,
    stage_output,
    trained_adapter,
)
from malt_ops.tracking import client_for, log_stage, registry_errors

STAGE = "register"
HELP = (
    "Register the run's generator/verifier/refiner adapters as MLflow model versions "
    "(<prefix>-<role>) pointing at the store, and give them alias 'challenger'."
)


def _adapter_key(recipe: Recipe, run_id: str, role: str) -> str:
    """Where the committed adapter of ``role`` lies (its attempt's folder)."""
    adapter = trained_adapter(recipe, run_id, role)
    assert adapter is not None  # register refuses an incomplete set before this
    return adapter.key(f"adapters/{role}")


def _create_version(
    client, recipe: Recipe, run_id: str, name: str, role: str, tags: dict[str, str]
):
    """A model version whose source is the adapter in the store (see _logged_source).

    An MLflow server refuses local paths as sources (only artifacts of a run may be local),
    so with a local store and a remote server the adapter is logged as an artifact of the
    register run and the version points there; the store path stays in a tag.
    """
    from mlflow.exceptions import MlflowException

    source = tags["malt_ops.store_uri"]
    try:
        return client.create_model_version(
            name,
            source=source,
            run_id=_parent(client, recipe, run_id),
            tags=tags,
            description=f"from pipeline run {run_id}",
        )
    except MlflowException as exc:
        if "local path" not in str(exc) or source.startswith("s3://"):
            raise
    adapter = trained_adapter(recipe, run_id, role)
    assert adapter is not None  # register refuses an incomplete set before this
    parent, logged = _logged_source(
        client, recipe, run_id, str(adapter.local_dir(f"adapters/{role}")), f"adapters/{role}"
    )
    return client.create_model_version(
        name, source=logged, run_id=parent, tags=tags, description=f"from pipeline run {run_id}"
    )


def _parent(client, recipe: Recipe, run_id: str) -> str:
    """The pipeline's parent run: a version links to it, so MLflow shows the version beside
    the run's evaluation metrics (numbers stay metrics there, not version tags)."""
    from malt_ops.tracking import parent_run_id

    return parent_run_id(client, recipe, run_id)


def _logged_source(client, recipe: Recipe, run_id: str, local: str, path: str) -> tuple[str, str]:
    """Log ``local`` as an artifact of the pipeline run: (parent run id, runs:/ source).

    An MLflow server refuses local paths as sources (only artifacts of a run may be local),
    so with a local store and a remote server the files go in as artifacts.
    """
    from malt_ops.tracking import parent_run_id

    parent = parent_run_id(client, recipe, run_id)
    client.log_artifacts(parent, local, artifact_path=path)
    return parent, f"runs:/{parent}/{path}"


def _system_version(client, recipe: Recipe, out, run_id: str, versions: dict, tags) -> str:
    """The system version recording ``versions``; its files (system.json and the training
    questions) sit in the store."""
    from mlflow.exceptions import MlflowException

    prepared = require_done(recipe, run_id, "prepare")
    trained_on = sorted(
        {question_hash(p["question"]) for p in prepared.iter_jsonl("problems/train.jsonl")}
    )
    out.write_json(f"system/{TRAIN_QUESTIONS}", {"normalised_question_sha256": trained_on})
    tags = {**tags, "train_questions_sha256": out.files[f"system/{TRAIN_QUESTIONS}"]["sha256"]}
    out.write_json("system/system.json", {"roles": versions, "run_id": run_id})
    source = out.store.uri(out.key("system"))
    try:
        return register_system_version(
            recipe,
            run_id,
            versions,
            source,
            client,
            tags,
            source_run_id=_parent(client, recipe, run_id),
        )
    except MlflowException as exc:
        if "local path" not in str(exc) or source.startswith("s3://"):
            raise
    parent, logged = _logged_source(
        client, recipe, run_id, str(out.store.local_dir(out.key("system"))), "system"
    )
    return register_system_version(
        recipe, run_id, versions, logged, client, tags, source_run_id=parent
    )


def _save_pyfunc(recipe: Recipe, run_id: str, out, base_sha256: str) -> None:
    """The system version's files are an MLflow pyfunc (malt_ops.system_model): loadable
    and servable as ``models:/<prefix>-system@<alias>``. MLmodel goes last."""
    import tempfile
    from pathlib import Path

    from malt_ops.system_model import save_system_model, system_config

    adapters = {}
    for role in ROLES:
        adapter = trained_adapter(recipe, run_id, role)
        assert adapter is not None  # register refuses an incomplete set before this
        adapters[role] = adapter.local_dir(f"adapters/{role}")
    with tempfile.TemporaryDirectory() as scratch:
        model = save_system_model(
            Path(scratch) / "system", system_config(recipe, base_sha256), adapters
        )
        out.put_dir("system", model, last="MLmodel")


def _create_model(client, name: str, description: str) -> None:
    """Create a registered model; one created by a concurrent register meanwhile is fine."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=description)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise


def _version_of_run(client, name: str, run_id: str):
    """The version this run registered before it was interrupted, if any (a rerun reuses it
    rather than registering the same adapter twice)."""
    found = client.search_model_versions(f"name = '{name}' and tags.`malt_ops.run_id` = '{run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def run(recipe: Recipe, run_id: str) -> dict[str, Any]:
    out = stage_output(recipe, run_id, STAGE)
    if (done := already_done(out)) is not None:
        return done
    evaluated = require_done(recipe, run_id, "evaluate")
    if not recipe.tracking.enabled:
        raise MaltError("register needs MLflow: set tracking.enabled: true")
    missing = [r for r in ROLES if trained_adapter(recipe, run_id, r) is None]
    if missing:
        summary = {
            "registered": False,
            "versions": {},
            "reason": f"incomplete set: {', '.join(missing)} untrained; nothing registered",
        }
        log.warning("register: %s", summary["reason"])
        out.write_json("versions.json", summary)
        out.commit(summary)
        return summary
    evaluated.read_json("report.json")  # a set is registered only with its evaluation whole
    data_hash = require_done(recipe, run_id, "prepare").manifest()["files"]["problems/train.jsonl"][
        "sha256"
    ]
    base = recipe.model.name if recipe.model.source == "packaged" else recipe.model.path
    base_sha = base_model_sha256(recipe.model)  # promote compares content, not the name
    with registry_errors(recipe):
        versions = _register_set(recipe, out, run_id, (base, base_sha), data_hash)
    system = versions.pop("system")
    summary = {"registered": True, "versions": versions, "system_version": system, "reason": None}
    out.write_json("versions.json", summary)
    out.commit(summary)
    log_stage(recipe, run_id, STAGE, metrics={f"{r}.version": int(v) for r, v in versions.items()})
    log.info(
        "register: challenger system v%s = %s",
        system,
        ", ".join(f"{model_name(recipe, r)} v{v}" for r, v in versions.items()),
    )
    return summary


def _register_set(
    recipe: Recipe, out, run_id: str, base: tuple[str, str], data_hash: str
) -> dict[str, str]:
    """``base``: the base model's name or path, and its content hash."""
    store = out.store
    base, base_sha = base
    client = client_for(recipe)
    versions = {}
    for role in ROLES:
        name = model_name(recipe, role)
        if client.search_registered_models(filter_string=f"name = '{name}'") == []:
            _create_model(client, name, f"MALT {role} LoRA adapter ({base})")
        tags = {
            "malt_ops.run_id": run_id,
            "malt_ops.role": role,
            "base_model": str(base),
            "base_model_sha256": base_sha,
            "recipe_digest": recipe.digest(),
            "data_sha256": data_hash,
            "malt_ops.store_uri": store.uri(_adapter_key(recipe, run_id, role)),
        }
        version = _version_of_run(client, name, run_id) or _create_version(
            client, recipe, run_id, name, role, tags
        )
        versions[role] = str(version.version)
    shared = {
        k: tags[k] for k in ("base_model", "base_model_sha256", "recipe_digest", "data_sha256")
    }
    _save_pyfunc(recipe, run_id, out, base_sha)  # the system version's source holds it
    system = _system_version(client, recipe, out, run_id, versions, shared)
    move_set(recipe, CHALLENGER, system, client)  # one alias write moves all three
    return {**versions, "system": system}
