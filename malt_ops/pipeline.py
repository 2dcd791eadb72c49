"""Runs the stages in order for one run id (until the Airflow DAG takes over this role)."""

from __future__ import annotations

from typing import Any

from malt_ops.config import Recipe
from malt_ops.stages import label, prepare, sample
from malt_ops.stages.common import log
from malt_ops.storage import open_store, run_prefix


def run_pipeline(recipe: Recipe, run_id: str) -> dict[str, Any]:
    results: dict[str, Any] = {"prepare": prepare.run(recipe, run_id)}
    backend = None
    shards = []
    for shard in range(recipe.sampling.num_shards):
        if backend is None and not _shard_done(recipe, run_id, shard):
            from malt_ops.backends import create_backend

            backend = create_backend(recipe)
        shards.append(sample.run(recipe, run_id, shard, backend=backend))
    results["sample"] = shards
    results["label"] = label.run(recipe, run_id)
    store = open_store(recipe.storage.root)
    log.info(
        "run %s finished; outputs in %s", run_id, store.uri(run_prefix(run_id, "")).rstrip("/")
    )
    return results


def _shard_done(recipe: Recipe, run_id: str, shard: int) -> bool:
    from malt_ops.stages.common import stage_output

    return stage_output(recipe, run_id, "sample", unit=f"shard-{shard}").done()
