"""MLflow tracking: one parent run per pipeline run, a nested run per stage unit.

The tracking URI follows MLflow's conventions: ``MLFLOW_TRACKING_URI`` (and
``MLFLOW_REGISTRY_URI``) in the environment win over ``tracking.uri`` in the recipe; the
default is a SQLite store under ``run.state_dir``. Tracking never loses a stage's work:
outputs are committed to the store before anything is logged, and a tracking failure is
reported as a warning naming the stage, not as a failed stage.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from malt_ops.config import Recipe
from malt_ops.errors import MaltError, redact
from malt_ops.storage import run_prefix

log = logging.getLogger("malt_ops")

RUN_TAG = "malt_ops.run_id"
KIND_TAG = "malt_ops.kind"
LOG_KEY_TAG = "malt_ops.log_key"
QUEUE = "tracking-queue"
"""Where a run's logs wait while MLflow is unreachable: ``runs/<run id>/tracking-queue/``."""
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
    results). ``datasets``: context ("train", "test") -> the split, logged as a run input.

    When MLflow cannot be reached the stage goes on: what it would have logged is queued in
    the store (see :func:`replay_queue`) and logged by the next stage that reaches MLflow, or
    by ``malt-ops run`` at its end."""
    if not recipe.tracking.enabled:
        return None
    started, finished = _unit_times(recipe, run_id, stage, unit)
    entry = {
        "kind": "stage",
        "key": uuid.uuid4().hex,
        "stage": stage,
        "unit": unit,
        "started": started,
        "finished": finished or int(time.time() * 1000),
        "metrics": _numbers(metrics or {}),
        "series": {k: [[int(s), float(v)] for s, v in p] for k, p in (series or {}).items()},
        "headline": _numbers(headline or {}),
        "artifacts": {k: base64.b64encode(v).decode() for k, v in (artifacts or {}).items()},
        "tables": tables or {},
        "datasets": {k: list(v) for k, v in (datasets or {}).items()},
    }
    try:
        child = _apply(recipe, run_id, entry)
    except Exception as exc:
        _report_unreachable(recipe, run_id, entry, exc)
        return None
    replay_queue(recipe, run_id)
    return child


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _report_unreachable(recipe: Recipe, run_id: str, entry: dict[str, Any], exc: Exception) -> None:
    what = entry["stage"] + (f"[{entry['unit']}]" if entry.get("unit") else "")
    queued = _enqueue(recipe, run_id, entry)
    log.warning(
        "MLflow tracking of %s failed (%s: %s); %s%s",
        what,
        type(exc).__name__,
        redact(str(exc).splitlines()[0][:200]) if str(exc) else "",
        "the stage's outputs are committed in the store"
        if entry["kind"] == "stage"
        else "the run's outcome is in the store",
        ", and what it would have logged is queued there: the next stage or `malt-ops run` "
        "logs it once MLflow answers"
        if queued
        else "",
    )


# ------------------------------------------------------------------ the offline queue
#
# MLflow's client has no offline mode (its async logging only buffers in memory, and loses
# the buffer with the process), so a stage that cannot reach the server writes its log as
# one JSON entry in the store, beside its outputs. Replaying an entry is idempotent: the
# stage run it creates carries the entry's key as a tag, a finished run with that key means
# the entry is logged, and an unfinished one (a log cut off midway) is deleted and redone.
# Metrics carry the entry's own timestamps, and MLflow drops a metric identical in key,
# value, time and step, so the headline metrics on the parent run never repeat either.


def _queue_prefix(run_id: str) -> str:
    return run_prefix(run_id, QUEUE) + "/"


def _enqueue(recipe: Recipe, run_id: str, entry: dict[str, Any]) -> bool:
    from malt_ops.storage import open_store

    try:
        name = f"{entry['finished']:015d}-{entry['key']}.json"
        open_store(recipe.storage.root).write_bytes(
            _queue_prefix(run_id) + name, json.dumps(entry, default=str).encode()
        )
        return True
    except Exception as exc:  # the store is the stage's own; it failing is reported, not raised
        log.warning("could not queue the MLflow log of %s: %s", entry["stage"], exc)
        return False


def queued(recipe: Recipe, run_id: str) -> list[str]:
    """Store keys of the entries waiting for MLflow, oldest first."""
    from malt_ops.storage import open_store

    return sorted(open_store(recipe.storage.root).list(_queue_prefix(run_id)))


def replay_queue(recipe: Recipe, run_id: str) -> tuple[int, int]:
    """Log the queued entries of ``run_id``, oldest first: (replayed, still queued).

    Stops at the first entry MLflow refuses (the server is still away); the rest wait."""
    from malt_ops.storage import open_store

    if not recipe.tracking.enabled:
        return 0, 0
    try:
        keys = queued(recipe, run_id)
    except Exception:
        return 0, 0
    store = open_store(recipe.storage.root)
    for done, key in enumerate(keys):
        try:
            entry = json.loads(store.read_bytes(key))
        except Exception:  # replayed (and deleted) by a concurrent stage meanwhile
            continue
        try:
            _apply(recipe, run_id, entry)
        except Exception as exc:
            log.warning(
                "MLflow still unreachable (%s); %d queued log(s) of %s wait in the store",
                redact(str(exc).splitlines()[0][:200]) if str(exc) else type(exc).__name__,
                len(keys) - done,
                run_id,
            )
            return done, len(keys) - done
        store.delete_prefix(key)
    if keys:
        log.info(
            "MLflow: logged %d queued entr%s of %s",
            len(keys),
            "y" if len(keys) == 1 else "ies",
            run_id,
        )
    return len(keys), 0


def _apply(recipe: Recipe, run_id: str, entry: dict[str, Any]) -> str:
    client = client_for(recipe)
    parent = parent_run_id(client, recipe, run_id)
    if entry["kind"] == "finish":
        client.set_terminated(parent, entry["status"], end_time=entry["finished"])
        return parent
    experiment_id = client.get_run(parent).info.experiment_id
    existing = _runs_with_key(client, experiment_id, entry["key"])
    if any(r.info.status == "FINISHED" for r in existing):
        return next(r.info.run_id for r in existing if r.info.status == "FINISHED")
    for partial in existing:  # a log cut off midway: redo it whole
        client.delete_run(partial.info.run_id)
    child = _log_stage(client, parent, experiment_id, run_id, entry)
    _log_tables_and_inputs(recipe, client, child, entry["tables"], entry["datasets"])
    client.set_terminated(child, "FINISHED", end_time=entry["finished"])
    # Two stages replaying one entry at once can both find no run: the one with the
    # smallest run id stays, whoever looks.
    twins = sorted(r.info.run_id for r in _runs_with_key(client, experiment_id, entry["key"]))
    for twin in twins[1:]:
        client.delete_run(twin)
    return twins[0] if twins else child


def _runs_with_key(client, experiment_id: str, key: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`{LOG_KEY_TAG}` = '{key}'")


def _log_stage(client, parent: str, experiment_id: str, run_id: str, entry: dict[str, Any]) -> str:
    from mlflow.entities import Metric

    stage, unit = entry["stage"], entry.get("unit")
    child = client.create_run(
        experiment_id,
        start_time=entry["started"],
        run_name=f"{stage}[{unit}]" if unit else stage,
        tags={
            "mlflow.parentRunId": parent,
            RUN_TAG: run_id,
            KIND_TAG: "stage",
            LOG_KEY_TAG: entry["key"],
            "malt_ops.stage": stage,
            "malt_ops.unit": unit or "",
        },
    ).info.run_id
    at = entry["finished"]
    batch = [Metric(metric_name(k), v, at, 0) for k, v in entry["metrics"].items()]
    for key, points in entry["series"].items():
        batch += [Metric(metric_name(key), float(v), at, int(step)) for step, v in points]
    for start in range(0, len(batch), 1000):
        client.log_batch(child, metrics=batch[start : start + 1000])
    on_parent = [Metric(metric_name(k), v, at, 0) for k, v in entry["headline"].items()]
    if on_parent:
        client.log_batch(parent, metrics=on_parent)
    if entry["artifacts"]:
        with tempfile.TemporaryDirectory(prefix="malt-artifacts-") as scratch:
            for path, data in entry["artifacts"].items():
                target = Path(scratch) / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(data))
            client.log_artifacts(child, scratch)
    return child


def _log_tables_and_inputs(
    recipe: Recipe,
    client,
    run: str,
    tables: dict[str, list[dict[str, Any]]],
    datasets: dict[str, list],
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
    """Close the pipeline's parent run; queued when MLflow is away, like a stage's log."""
    if not recipe.tracking.enabled:
        return
    entry = {
        "kind": "finish",
        "key": uuid.uuid4().hex,
        "stage": "the parent run",
        "unit": None,
        "status": status,
        "finished": int(time.time() * 1000),
    }
    replay_queue(recipe, run_id)
    try:
        _apply(recipe, run_id, entry)
    except Exception as exc:
        _report_unreachable(recipe, run_id, entry, exc)


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
