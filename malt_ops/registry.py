"""The MLflow model registry: one registered model per role, aliases challenger and champion.

A "set" is the three role versions registered from one pipeline run (tag
``malt_ops.run_id``); sets move between aliases together or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from malt_ops.config import ROLES, Recipe
from malt_ops.errors import MaltError
from malt_ops.tracking import client_for

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_TAG = "malt_ops.previous_champion"


def model_name(recipe: Recipe, role: str) -> str:
    return f"{recipe.tracking.model_prefix}-{role}"


def alias_versions(recipe: Recipe, alias: str, client=None) -> dict[str, Any] | None:
    """role -> ModelVersion holding ``alias``; None unless all three roles have it."""
    from mlflow.exceptions import MlflowException

    client = client or client_for(recipe)
    found = {}
    for role in ROLES:
        try:
            found[role] = client.get_model_version_by_alias(model_name(recipe, role), alias)
        except MlflowException:
            return None
    return found


def move_alias(recipe: Recipe, alias: str, versions: dict[str, str], client=None) -> None:
    client = client or client_for(recipe)
    for role in ROLES:
        client.set_registered_model_alias(model_name(recipe, role), alias, versions[role])


def adapter_dir(source: str) -> Path:
    """A local directory with the adapter files a model version points at."""
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
        import tempfile

        from mlflow.artifacts import download_artifacts

        return Path(
            download_artifacts(
                artifact_uri=source, dst_path=tempfile.mkdtemp(prefix="malt-adapter-")
            )
        )
    if source.startswith("s3://"):
        from malt_ops.s3 import S3Store, split_uri

        bucket, key = split_uri(source)
        return S3Store(f"s3://{bucket}").local_dir(key)
    path = Path(source.removeprefix("file://"))
    if not (path / "adapter_config.json").exists():
        raise MaltError(f"registered adapter {source} is missing or not a PEFT directory")
    return path


def champion_adapters(recipe: Recipe) -> dict[str, str] | None:
    """role -> local adapter directory of the current champion set, or None when there is none."""
    if not recipe.tracking.enabled:
        return None
    versions = alias_versions(recipe, CHAMPION)
    if versions is None:
        return None
    return {role: str(adapter_dir(v.source)) for role, v in versions.items()}
