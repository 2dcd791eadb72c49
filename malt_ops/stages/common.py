"""What every stage needs: the store, the run's prefix, and a skip when already done.

A unit counts as done only when its committed manifest was made from what the recipe now
says and from the input manifests that are committed now (malt_ops.provenance):

- the recipe keys it depends on changed: refused in one line naming them, unless the stage
  runs forced (``--force``), which redoes it;
- an input manifest changed (an earlier stage was redone, forced): redone, so a forced
  stage carries every stage after it along without each needing ``--force``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from malt_ops import provenance
from malt_ops.config import Recipe
from malt_ops.console import mark_skipped
from malt_ops.errors import MaltError
from malt_ops.storage import StageOutput, open_store, run_prefix

log = logging.getLogger("malt_ops")

_FORCE: ContextVar[bool] = ContextVar("malt_ops_force", default=False)


@contextmanager
def forcing(force: bool = True) -> Iterator[None]:
    """Run the stages called inside as ``--force``: a recipe change redoes them."""
    token = _FORCE.set(force)
    try:
        yield
    finally:
        _FORCE.reset(token)


def stage_output(recipe: Recipe, run_id: str, stage: str, unit: str | None = None) -> StageOutput:
    out = StageOutput(open_store(recipe.storage.root), run_id, stage, unit)
    out.recipe = recipe  # type: ignore[attr-defined] - for the provenance checks below
    out.run_id = run_id  # type: ignore[attr-defined]
    return out


def _expected(out: StageOutput) -> dict:
    """The provenance this attempt will record: recipe values and input manifest digests."""
    recipe, run_id = out.recipe, out.run_id  # type: ignore[attr-defined]
    values = provenance.recipe_values(recipe, out.stage, out.unit)
    inputs: dict[str, str | None] = {}
    for stage, unit in provenance.input_units(recipe, out.stage):
        earlier = StageOutput(out.store, run_id, stage, unit)
        # Keyed below the run, so outputs copied into another run keep their meaning.
        name = earlier.manifest_key.removeprefix(run_prefix(run_id, ""))
        inputs[name] = earlier.manifest_sha256() if earlier.done() else None
    return {"recipe": values, "recipe_sha256": provenance.digest(values), "inputs": inputs}


def _refusal(out: StageOutput, changes: list[str]) -> MaltError:
    """One line: what changed, and the two ways on (a new run, or redo from the first stage
    that reads a changed key)."""
    stage = provenance.first_stage(changes)
    later = provenance.later_stages(stage)
    after = f" and every stage after it ({', '.join(later)})" if later else ""
    return MaltError(
        f"{out.name} of run '{out.prefix.split('/')[1]}' was made with another recipe "
        f"({'; '.join(changes)}): use a new --run-id, or --force to redo {stage}{after}"
    )


def already_done(out: StageOutput) -> dict | None:
    """The committed manifest's summary if this unit finished before from the same recipe and
    inputs (a rerun skips it); None when it is to be (re)done. Refuses a recipe change."""
    out.provenance = expected = _expected(out)
    out.begin()
    if not out.done():
        return None
    manifest = out.manifest()
    recorded = manifest.get("provenance") or {}
    where = out.store.uri(out.manifest_key)
    if "recipe" not in recorded:
        log.warning("%s: %s records no provenance (older malt-ops); reusing it", out.name, where)
    else:
        redone = sorted(
            key
            for key, digest in expected["inputs"].items()
            if recorded.get("inputs", {}).get(key) != digest
        )
        changes = provenance.changed_keys(recorded["recipe"], expected["recipe"])
        if redone:
            log.info("%s: redoing it: its input %s was redone since", out.name, redone[0])
            out.replace = True
            return None
        if changes and _FORCE.get():
            log.info("%s: --force: redoing it (%s)", out.name, "; ".join(changes))
            out.replace = True
            return None
        if changes:
            raise _refusal(out, changes)
    log.info("%s: already done (%s), skipping", out.unit or out.prefix, where)
    mark_skipped()
    return {**manifest.get("summary", {}), "skipped": True}


def adopt(recipe: Recipe, run_id: str, stage: str, unit: str | None = None) -> None:
    """Make a unit copied in from another run this run's own: its manifest's provenance
    becomes this recipe's values and this run's input manifests. Only for a caller that has
    checked that the copy is what this recipe would have produced (bench --train-from)."""
    out = stage_output(recipe, run_id, stage, unit)
    manifest = out.manifest()
    manifest["provenance"] = _expected(out)
    out.store.write_json(out.manifest_key, manifest)


def check_made_with(earlier: StageOutput, recipe: Recipe) -> StageOutput:
    """``earlier`` (a committed upstream unit) was made from what ``recipe`` says for its keys;
    else one line naming the changed keys (a later stage must not mix two recipes)."""
    recorded = (earlier.manifest().get("provenance") or {}).get("recipe")
    if recorded is None:
        return earlier
    current = provenance.recipe_values(recipe, earlier.stage, earlier.unit)
    if changes := provenance.changed_keys(recorded, current):
        raise _refusal(earlier, changes)
    return earlier


def require_done(recipe: Recipe, run_id: str, stage: str, unit: str | None = None) -> StageOutput:
    """The finished output of an earlier stage, or a one-line error saying which command to run."""
    earlier = stage_output(recipe, run_id, stage, unit)
    if not earlier.done():
        raise MaltError(
            f"{stage} has not finished for run '{run_id}': run `malt-ops {stage}` first"
        )
    return check_made_with(earlier, recipe)


def trained_adapter(recipe: Recipe, run_id: str, role: str) -> StageOutput | None:
    """The committed train unit of ``role`` when it holds an adapter; None when the role was
    not trained (nothing to learn from) or train has not run for it."""
    unit = stage_output(recipe, run_id, "train", role)
    if not unit.done():
        return None
    check_made_with(unit, recipe)
    return unit if unit.has(f"adapters/{role}/adapter_config.json") else None
