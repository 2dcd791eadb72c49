"""Science benchmark: a recipe's whole MALT cycle through `malt-ops run`, then its report.

The driver runs the pipeline as a user does and reads what it wrote; it knows nothing of the
stage order (that is the DAG's, in dags/):

1. `malt-ops run --recipe R --run-id ID [--set k=v ...]`: the DAG, in-process under Airflow.
   Every stage skips itself when its manifest exists, so a rerun with the same --run-id
   resumes an interrupted cycle, or only reports on a finished one.
2. evaluate's report.json from the store: the Table 1 rows (mean ± std over the evaluation
   seeds), the paired comparisons of ``evaluation.comparisons`` (relative gains, question-level
   sign-flip tests, answer flips: malt_ops.comparisons, the same numbers evaluate writes into
   table.md and MLflow), turn-wise accuracy, the label summary and the wall time of every
   stage from its manifests. Printed, and appended to bench/RESULTS.md unless --no-append.

    python bench/science.py --recipe recipes/science-validation.yaml --run-id sci-val \\
        [--set key=value ...] [--report-only] [--no-append] [--estimate]

The validation and test recipes differ only in what is evaluated, so the test run can take
its trees, labels and adapters from the finished validation run (``--train-from sci-val``):
its own prepare runs first (`malt-ops prepare`), the training questions must be
byte-identical and the model, inference, sampling, labeling and training sections equal to
the ones the source run logged to MLflow, else it refuses; the sample, label and train
outputs are then copied in and `malt-ops run` skips those stages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import report as print_report
from common import table

from malt_ops.comparisons import compare, format_comparisons
from malt_ops.config import Recipe, load_recipe
from malt_ops.errors import MaltError
from malt_ops.estimate import estimate, format_estimate
from malt_ops.stages.common import adopt, require_done, stage_output
from malt_ops.storage import run_prefix, validate_run_id

REUSABLE_STAGES = ("sample", "label", "train")
"""What --train-from copies from the source run (the stages the training side decides)."""
ESTIMATE_DEVICE = "cpu-2core"
"""The hardware table's entry fitted to measured science runs (malt_ops/hardware.yaml)."""
TRAINING_SIDE = ("model.", "inference.", "sampling.", "labeling.", "training.")
"""Recipe sections that decide the trees, labels and adapters (with the training questions)."""


def logged_recipe(recipe: Recipe, run_id: str) -> dict[str, str]:
    """The flattened recipe a run's MLflow pipeline run was created with."""
    from malt_ops.tracking import client_for, find_parent_run

    client = client_for(recipe)
    experiment = client.get_experiment_by_name(recipe.tracking.experiment)
    found = experiment and find_parent_run(client, experiment.experiment_id, run_id)
    if not found:
        raise MaltError(
            f"--train-from {run_id}: no MLflow pipeline run for it in experiment "
            f"'{recipe.tracking.experiment}' at {client.tracking_uri}: its recipe cannot be checked"
        )
    return dict(found.data.params)


def training_side_differences(recipe: Recipe, source: dict[str, str]) -> list[str]:
    """'key: source -> this' for every training-side recipe value that differs."""
    from malt_ops.tracking import flatten

    mine = flatten(recipe.model_dump(mode="json"))
    keys = {k for k in (*mine, *source) if k.startswith(TRAINING_SIDE)}
    return [
        f"{k}: {source.get(k, '<unset>')} -> {mine.get(k, '<unset>')}"
        for k in sorted(keys)
        if source.get(k) != mine.get(k)
    ]


def is_manifest(key: str) -> bool:
    """MANIFEST.json of a whole stage, or MANIFEST-<unit>.json of one shard or role."""
    return key.rsplit("/", 1)[-1].startswith("MANIFEST")


def stage_seconds(store: Any, run_id: str, stage: str) -> float:
    """Wall seconds a finished stage took, summed over its manifests (shards, roles)."""
    total = 0.0
    for key in filter(is_manifest, store.list(run_prefix(run_id, stage))):
        manifest = store.read_json(key)
        total += manifest["finished_at"] - manifest["started_at"]
    return total


def run_seconds(store: Any, run_id: str) -> dict[str, float]:
    """Wall seconds per finished stage of a run, in the order the stages started.

    Read from the manifests the DAG's stages left, so the stage order here is the DAG's (the
    one in dags/), whichever stages ran in this invocation and whichever were reused.
    """
    prefix = run_prefix(run_id, "")
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for key in filter(is_manifest, store.list(prefix)):
        stage = key[len(prefix) :].split("/", 1)[0]
        manifest = store.read_json(key)
        started[stage] = min(started.get(stage, manifest["started_at"]), manifest["started_at"])
        seconds[stage] = seconds.get(stage, 0.0) + manifest["finished_at"] - manifest["started_at"]
    return {stage: seconds[stage] for stage in sorted(seconds, key=started.__getitem__)}


def reuse_training(recipe: Recipe, run_id: str, source: str) -> dict[str, float]:
    """Copy a finished run's sample, label and train outputs into this run after checking that
    they are what this recipe would have produced; the source's wall seconds per stage."""
    source = validate_run_id(source)
    if source == run_id:
        raise MaltError("--train-from names this run itself: give the finished validation run")
    if not recipe.tracking.enabled:
        raise MaltError(
            "--train-from needs tracking.enabled: the source recipe is read from MLflow"
        )
    # The source's prepare was made from its own recipe (its test split may differ): only
    # its training questions must be this run's.
    earlier = stage_output(recipe, source, "prepare")
    if not earlier.done():
        raise MaltError(f"--train-from {source}: its prepare stage has not finished")
    question_files = [
        unit.manifest()["files"]["problems/train.jsonl"]["sha256"]
        for unit in (earlier, require_done(recipe, run_id, "prepare"))
    ]
    if question_files[0] != question_files[1]:
        raise MaltError(
            f"--train-from {source}: its training questions differ from this run's "
            "(data section or data.seed changed): run without --train-from"
        )
    differences = training_side_differences(recipe, logged_recipe(recipe, source))
    if differences:
        raise MaltError(
            f"--train-from {source}: recipe differs on the training side ("
            + "; ".join(differences[:5])
            + (f"; {len(differences) - 5} more" if len(differences) > 5 else "")
            + "): run without --train-from"
        )
    store = stage_output(recipe, run_id, "prepare").store
    seconds = {}
    for stage in REUSABLE_STAGES:
        keys = store.list(run_prefix(source, stage))
        manifests = [k for k in keys if is_manifest(k)]
        if not manifests:
            raise MaltError(f"--train-from {source}: its {stage} stage has not finished")
        # manifests last, so an interrupted copy leaves this run's stage unfinished, not partial
        for key in sorted(keys, key=lambda k: k in manifests):
            target = run_prefix(run_id, stage) + key[len(run_prefix(source, stage)) :]
            if not store.exists(target):
                store.write_bytes(target, store.read_bytes(key))
        seconds[stage] = stage_seconds(store, source, stage)
        # The copies now stand for this run (checked above): their provenance names this
        # recipe and this run's inputs, in stage order, so the next stage sees them.
        for key in manifests:
            name = key.rsplit("/", 1)[-1]
            unit = name.removeprefix("MANIFEST-").removesuffix(".json") if "-" in name else None
            adopt(recipe, run_id, stage, unit)
    print(f"== sample, label, train taken from run {source} (same questions and training side)")
    return seconds


def malt_ops(command: str, recipe_path: str, run_id: str, overrides: list[str]) -> None:
    """`malt-ops COMMAND --recipe R --run-id ID --set ...` in a fresh process, as a user runs it."""
    arguments = [command, "--recipe", recipe_path, "--run-id", run_id]
    for override in overrides:
        arguments += ["--set", override]
    print(f"== malt-ops {' '.join(arguments)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "malt_ops.cli", *arguments], check=False)
    if done.returncode != 0:
        raise MaltError(
            f"malt-ops {command} exited with {done.returncode} (its error is above); rerun the "
            "same command to resume: finished stages are skipped"
        )


def comparisons_of(recipe: Recipe, report: dict[str, Any], evaluated: Any) -> dict[str, Any]:
    """evaluate's comparisons; for a run evaluated before evaluate wrote them, computed the
    same way from its per_question.jsonl."""
    if "comparisons" in report:
        return report["comparisons"]
    rows = list(evaluated.iter_jsonl("per_question.jsonl"))
    return compare(report, rows, recipe.evaluation.comparisons)


def format_body(
    recipe: Recipe,
    run_id: str,
    report: dict[str, Any],
    seconds: dict[str, float],
    labels: dict[str, Any] | None,
    reused: str | None = None,
) -> str:
    data = recipe.data
    task = f"{data.benchmark}" + (
        f" {data.task} {json.dumps(data.task_config)}" if data.task else ""
    )
    model = recipe.model.name if recipe.model.source == "packaged" else recipe.model.path
    s = recipe.sampling
    lines = [
        f"Recipe `{recipe.name}` (run `{run_id}`, digest {recipe.digest()}): {model}, {task}; "
        f"{data.train_size} train questions, n×m×l = {s.n}×{s.m}×{s.l} at T={s.temperature}; "
        f"evaluation {report['questions_per_seed']} questions × {len(recipe.evaluation.seeds)} "
        f"seeds × {recipe.evaluation.votes} chains at T={recipe.evaluation.temperature}.",
        "",
    ]
    rows = [
        [
            s["setting"],
            f"{s['mean'] * 100:.2f} ± {s['std'] * 100:.2f}",
            ", ".join(f"{v * 100:.1f}" for v in s["per_seed"]),
            s["tokens"],
        ]
        for s in report["settings"]
    ]
    lines += [table(["setting", "accuracy % (mean ± std)", "per seed", "tokens"], rows), ""]
    repeats = report.get("question_repeats")
    if repeats and repeats["max_repeats"] > 1:
        lines += [
            f"Questions repeat across seeds: {repeats['distinct_questions']} distinct questions "
            f"in {repeats['items']} items (up to {repeats['max_repeats']} times each).",
            "",
        ]
    lines += [format_comparisons(report["comparisons"]), ""]
    turn_rows = [
        [system, *(f"{t * 100:.1f}" for t in turns)] for system, turns in report["turnwise"].items()
    ]
    lines += [table(["system", "after G %", "after V %", "after R %"], turn_rows), ""]
    if report.get("untrained"):
        lines += [f"Untrained (base model used): {', '.join(report['untrained'])}.", ""]
    if labels and "roles" in labels:
        roles = ", ".join(
            f"{role} {v['positives']} positives / {v['pairs']} pairs"
            for role, v in labels["roles"].items()
        )
        lines += [
            f"Training data ({labels['questions']} questions, "
            f"{labels['questions_without_positive']} without any correct leaf): {roles}; "
            f"STaR {labels['star']['positives']} positives.",
            "",
        ]
    # the manifests' times, so a report-only rerun gives the same total
    copied = {k: v for k, v in seconds.items() if reused and k in REUSABLE_STAGES}
    own = {k: v for k, v in seconds.items() if k not in copied}
    if own:
        lines.append(
            "Wall time per stage: "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in own.items())
            + f"; the whole cycle {sum(seconds.values()) / 60:.1f} min."
        )
    if copied:
        lines += [
            "",
            f"{', '.join(copied)} were taken from run `{reused}` (same training questions, same "
            "training-side recipe, checked): "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in copied.items())
            + " there, counted in the whole cycle.",
        ]
    return "\n".join(lines).rstrip()


def verdict(comparisons: dict[str, Any]) -> str:
    parts = [f"{t['name']}: {'met' if t['met'] else 'not met'}" for t in comparisons["tests"]]
    met = " -> met." if comparisons["target_met"] else " -> not met."
    return "Target: " + "; ".join(parts) + met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="e.g. recipes/science-validation.yaml")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="report on a finished run without starting `malt-ops run`",
    )
    parser.add_argument("--no-append", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument(
        "--train-from",
        metavar="RUN_ID",
        help="take sample, label and train from this finished run (e.g. the validation run) "
        "after checking its training questions and training-side recipe equal this one's",
    )
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="print the predicted wall time per stage for this recipe on this machine and exit",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.estimate:
            # the one estimator (`malt-ops estimate`), priced on this project's 2-core machines
            print(
                format_estimate(estimate(recipe, device=ESTIMATE_DEVICE, recipe_name=args.recipe))
            )
            return 0
        run_id = validate_run_id(args.run_id)
        if not args.report_only:
            if args.train_from:
                # this run's own questions first: the check compares its training questions
                malt_ops("prepare", args.recipe, run_id, args.overrides)
                reuse_training(recipe, run_id, args.train_from)
            # copied units skip themselves; a shard or role the source never finished runs here
            malt_ops("run", args.recipe, run_id, args.overrides)
        evaluated = require_done(recipe, run_id, "evaluate")
        report = evaluated.read_json("report.json")
        report["comparisons"] = comparisons_of(recipe, report, evaluated)
        labeled = stage_output(recipe, run_id, "label")
        labels = labeled.manifest().get("summary") if labeled.done() else None
        seconds = run_seconds(evaluated.store, run_id)
    except MaltError as exc:
        print(f"bench/science.py: error: {exc}", file=sys.stderr)
        return 2
    body = format_body(recipe, run_id, report, seconds, labels, args.train_from)
    print_report(
        f"bench/science.py ({Path(args.recipe).name})",
        body,
        verdict(report["comparisons"]),
        append=not args.no_append,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
