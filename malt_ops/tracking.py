"""MLflow tracking: one parent run per pipeline run, a nested run per stage unit.

The tracking URI follows MLflow's conventions: ``MLFLOW_TRACKING_URI`` (and
``MLFLOW_REGISTRY_URI``) in the environment win over ``tracking.uri`` in the recipe; the
default is a SQLite store under ``run.state_dir``. Tracking never loses a stage's work:
outputs are committed to the store before anything is logged, and a tracking failure is
reported as a warning naming the stage, not as a failed stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from malt_ops.config import Recipe
from malt_ops.errors import MaltError, redact

log = logging.getLogger("malt_ops")

RUN_TAG = "malt_ops.run_id"
KIND_TAG = "malt_ops.kind"
_SECRET_WORDS = ("secret", "password", "token", "credential", "access_key", "apikey", "api_key")
_ARTIFACT_SUFFIXES = (".png", ".md", ".json")
_MAX_ARTIFACT_BYTES = 20 * 1024 * 1024


def tracking_uri(recipe: Recipe) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if recipe.tracking.uri:
        return recipe.tracking.uri
    state = Path(recipe.run.state_dir).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    database = state / "mlflow.db"
    if not database.exists():
        _create_sqlite_store(database, (state / "mlartifacts").as_uri())
    return f"sqlite:///{database}"


def _create_sqlite_store(database: Path, artifacts: str) -> None:
    """Create the default SQLite store whole, or not at all.

    MLflow builds a new database in many migration steps; a process killed between two of
    them leaves a schema that every later client refuses ("out-of-date database schema").
    So the migrations run on a scratch file that is then linked into place; a database
    created meanwhile by another process is kept.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    scratch = database.with_name(f".{database.name}.{os.getpid()}.partial")
    scratch.unlink(missing_ok=True)
    try:
        SqlAlchemyStore(f"sqlite:///{scratch}", artifacts).engine.dispose()
        with contextlib.suppress(FileExistsError):
            os.link(scratch, database)
    finally:
        scratch.unlink(missing_ok=True)


def client_for(recipe: Recipe):
    from mlflow import MlflowClient

    return MlflowClient(
        tracking_uri=tracking_uri(recipe),
        registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri(recipe),
    )


def metric_name(text: str) -> str:
    """MLflow metric keys allow letters, digits, '_', '-', '.', ' ' and '/'; map the rest."""
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", text.replace("+", "_").replace("w/o", "wo")).strip()


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Dotted params from a nested recipe dump, leaving out anything that looks like a secret."""
    flat: dict[str, str] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if any(word in name.lower() for word in _SECRET_WORDS):
                continue
            flat.update(flatten(item, name))
    else:
        flat[prefix] = redact(str(value))[:500]
    return flat


def _artifact_location(recipe: Recipe) -> str | None:
    """Artifacts beside the default SQLite store, not in ./mlruns of whatever directory we run in.

    A server (http) or a user-chosen store keeps its own artifact root.
    """
    if os.environ.get("MLFLOW_TRACKING_URI") or recipe.tracking.uri:
        return None
    state = Path(recipe.run.state_dir).expanduser().resolve()
    return (state / "mlartifacts").as_uri()


def _experiment_id(client, recipe: Recipe) -> str:
    name = recipe.tracking.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(recipe))
    except Exception:  # created by a concurrent task in the meantime
        return client.get_experiment_by_name(name).experiment_id


def find_parent_run(client, experiment_id: str, run_id: str):
    """The pipeline's parent run in an experiment (its params are the run's recipe), or None."""
    found = client.search_runs(
        [experiment_id],
        filter_string=(f"tags.`{RUN_TAG}` = '{run_id}' and tags.`{KIND_TAG}` = 'pipeline'"),
        max_results=1,
    )
    return found[0] if found else None


def parent_run_id(client, recipe: Recipe, run_id: str) -> str:
    """The pipeline's parent run (created with the recipe as params on first use)."""
    from mlflow.entities import Param

    experiment_id = _experiment_id(client, recipe)
    if (found := find_parent_run(client, experiment_id, run_id)) is not None:
        return found.info.run_id
    parent = client.create_run(
        experiment_id,
        run_name=run_id,
        tags={
            RUN_TAG: run_id,
            KIND_TAG: "pipeline",
            "malt_ops.recipe": recipe.name,
            "malt_ops.recipe_digest": recipe.digest(),
        },
    )
    params = [Param(k, v) for k, v in flatten(recipe.model_dump(mode="json")).items()]
    for start in range(0, len(params), 100):
        client.log_batch(parent.info.run_id, params=params[start : start + 100])
    return parent.info.run_id


DatasetRecord = tuple[list[dict[str, Any]], str, str]
"""(rows, source URI, content digest) of one data split."""


def log_stage(
    recipe: Recipe,
    run_id: str,
    stage: str,
    unit: str | None = None,
    *,
    metrics: dict[str, float] | None = None,
    series: dict[str, Iterable[tuple[int, float]]] | None = None,
    artifacts: dict[str, bytes] | None = None,
    headline: dict[str, float] | None = None,
    tables: dict[str, list[dict[str, Any]]] | None = None,
    datasets: dict[str, DatasetRecord] | None = None,
) -> str | None:
    """Log one finished stage unit as a nested run; returns its MLflow run id (None if not tracked).

    ``headline``: metrics that are also logged on the pipeline's parent run, so that MLflow's
    runs list and compare view show cycles side by side (evaluate's rows and gains, promote's
    decision). ``tables``: artifact file -> rows, logged with ``log_table`` (the per-question
    results). ``datasets``: context ("train", "test") -> the split, logged as a run input."""
    if not recipe.tracking.enabled:
        return None
    try:
        child = _log_stage(
            recipe,
            run_id,
            stage,
            unit,
            metrics or {},
            series or {},
            artifacts or {},
            headline or {},
        )
        _log_tables_and_inputs(recipe, child, tables or {}, datasets or {})
        return child
    except Exception as exc:
        log.warning(
            "MLflow tracking of %s%s failed (%s: %s); the stage's outputs are committed in the store",
            stage,
            f"[{unit}]" if unit else "",
            type(exc).__name__,
            redact(str(exc).splitlines()[0][:200]),
        )
        return None


def _log_stage(recipe, run_id, stage, unit, metrics, series, artifacts, headline) -> str:
    import time

    from mlflow.entities import Metric

    client = client_for(recipe)
    parent = parent_run_id(client, recipe, run_id)
    experiment_id = client.get_run(parent).info.experiment_id
    name = f"{stage}[{unit}]" if unit else stage
    started, finished = _unit_times(recipe, run_id, stage, unit)
    child = client.create_run(
        experiment_id,
        start_time=started,
        run_name=name,
        tags={
            "mlflow.parentRunId": parent,
            RUN_TAG: run_id,
            KIND_TAG: "stage",
            "malt_ops.stage": stage,
            "malt_ops.unit": unit or "",
        },
    )
    now = finished or int(time.time() * 1000)
    batch = [
        Metric(metric_name(k), float(v), now, 0)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    for key, points in series.items():
        batch += [Metric(metric_name(key), float(v), now, int(step)) for step, v in points]
    for start in range(0, len(batch), 1000):
        client.log_batch(child.info.run_id, metrics=batch[start : start + 1000])
    on_parent = [
        Metric(metric_name(k), float(v), now, 0)
        for k, v in headline.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    if on_parent:
        client.log_batch(parent, metrics=on_parent)
    if artifacts:
        with tempfile.TemporaryDirectory(prefix="malt-artifacts-") as scratch:
            for path, data in artifacts.items():
                target = Path(scratch) / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            client.log_artifacts(child.info.run_id, scratch)
    client.set_terminated(child.info.run_id, "FINISHED", end_time=finished)
    return child.info.run_id


def _log_tables_and_inputs(
    recipe: Recipe,
    run: str,
    tables: dict[str, list[dict[str, Any]]],
    datasets: dict[str, DatasetRecord],
) -> None:
    if not tables and not datasets:
        return
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    def flat(rows: list[dict[str, Any]]) -> pd.DataFrame:
        # nested fields (choices, task metadata, turn lists) as JSON text: one column each
        return pd.DataFrame(
            [
                {k: v if isinstance(v, str | int | float) else json.dumps(v) for k, v in r.items()}
                for r in rows
            ]
        )

    client = client_for(recipe)
    for artifact_file, rows in tables.items():
        client.log_table(run, data=flat(rows), artifact_file=artifact_file)
    inputs = []
    for context, (rows, source, digest) in datasets.items():
        dataset = mlflow.data.from_pandas(
            flat(rows),
            source=source,
            name=f"{recipe.data.benchmark}-{context}",
            digest=digest[:16],
        )
        inputs.append(
            DatasetInput(
                dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]
            )
        )
    if inputs:
        client.log_inputs(run, datasets=inputs)


def _unit_times(
    recipe: Recipe, run_id: str, stage: str, unit: str | None
) -> tuple[int | None, int | None]:
    """When the committed unit's attempt started and finished (epoch ms), from its manifest:
    a stage is logged after it commits, and its MLflow run should span the work, not the
    logging. (None, None) when the unit is not committed (MLflow then uses the time now)."""
    from malt_ops.storage import StageOutput, open_store

    try:
        manifest = StageOutput(open_store(recipe.storage.root), run_id, stage, unit).manifest()
        return int(manifest["started_at"] * 1000), int(manifest["finished_at"] * 1000)
    except Exception:  # any store error: the times are a nicety, the metrics are not
        return None, None


def stage_artifacts(out) -> dict[str, bytes]:
    """Small human-facing files a stage wrote (plots, tables, reports), read back from the store."""
    picked = {}
    for name, meta in out.files.items():
        if name.endswith(_ARTIFACT_SUFFIXES) and meta["bytes"] <= _MAX_ARTIFACT_BYTES:
            picked[name] = out.store.read_bytes(out.key(name))
    return picked


def finish_pipeline(recipe: Recipe, run_id: str, status: str = "FINISHED") -> None:
    if not recipe.tracking.enabled:
        return
    try:
        client = client_for(recipe)
        client.set_terminated(parent_run_id(client, recipe, run_id), status)
    except Exception as exc:
        log.warning(
            "could not close the MLflow parent run of %s: %s",
            run_id,
            redact(str(exc).splitlines()[0][:200]),
        )


@contextmanager
def registry_errors(recipe: Recipe) -> Iterator[None]:
    """Stages that cannot work without MLflow (register, promote) fail with one clear line."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise MaltError(
            redact(f"MLflow at {tracking_uri(recipe)}: {str(exc).splitlines()[0][:300]}")
        ) from None
