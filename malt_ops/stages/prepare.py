"""prepare: benchmark source -> problems/{train,test}.jsonl (normalized problem records)."""

from __future__ import annotations

from typing import Any

from malt_ops.config import Recipe
from malt_ops.data import load_splits
from malt_ops.errors import MaltError
from malt_ops.stages.common import already_done, log, stage_output
from malt_ops.tracking import log_stage, stage_artifacts

STAGE = "prepare"
HELP = "Load the benchmark (packaged copy, file or hub), normalize and split it into problems/{train,test}.jsonl."


def run(recipe: Recipe, run_id: str) -> dict[str, Any]:
    out = stage_output(recipe, run_id, STAGE)
    if (done := already_done(out)) is not None:
        return done
    splits = load_splits(recipe.data)
    if not splits.train:
        raise MaltError(
            f"no usable training problems for {recipe.data.benchmark} "
            f"(skipped: {dict(splits.skipped) or 'none'}): check data.* in the recipe"
        )
    out.write_jsonl("problems/train.jsonl", splits.train)
    out.write_jsonl("problems/test.jsonl", splits.test)
    summary = {
        "train": len(splits.train),
        "test": len(splits.test),
        "skipped": dict(splits.skipped),
        "notes": splits.notes,
        "benchmark": recipe.data.benchmark,
    }
    out.write_json("stats.json", summary)
    out.commit(summary)
    log_stage(
        recipe,
        run_id,
        STAGE,
        metrics={
            "train_problems": len(splits.train),
            "test_problems": len(splits.test),
            "skipped_rows": sum(splits.skipped.values()),
        },
        artifacts=stage_artifacts(out),
        datasets={
            split: (
                rows,
                out.store.uri(out.key(f"problems/{split}.jsonl")),
                out.files[f"problems/{split}.jsonl"]["sha256"],
            )
            for split, rows in (("train", splits.train), ("test", splits.test))
        },
    )
    for note in splits.notes:
        log.info("prepare: %s", note)
    log.info(
        "prepare: %d train, %d test problems; skipped %s",
        len(splits.train),
        len(splits.test),
        dict(splits.skipped) or "none",
    )
    return summary
