"""What every stage needs: the store, the run's prefix, and a skip when already done."""

from __future__ import annotations

import logging

from malt_ops.config import Recipe
from malt_ops.errors import MaltError
from malt_ops.storage import StageOutput, open_store

log = logging.getLogger("malt_ops")


def stage_output(recipe: Recipe, run_id: str, stage: str, unit: str | None = None) -> StageOutput:
    return StageOutput(open_store(recipe.storage.root), run_id, stage, unit)


def already_done(out: StageOutput) -> dict | None:
    """The committed manifest's summary if this unit finished before (a rerun skips it)."""
    if out.done():
        log.info(
            "%s: already done (%s), skipping",
            out.unit or out.prefix,
            out.store.uri(out.manifest_key),
        )
        summary = out.manifest().get("summary", {})
        return {**summary, "skipped": True}
    return None


def require_done(recipe: Recipe, run_id: str, stage: str) -> StageOutput:
    """The finished output of an earlier stage, or a one-line error saying which command to run."""
    earlier = stage_output(recipe, run_id, stage)
    if not earlier.done():
        raise MaltError(
            f"{stage} has not finished for run '{run_id}': run `malt-ops {stage}` first"
        )
    return earlier
