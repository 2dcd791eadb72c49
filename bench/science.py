"""Science benchmark: a full MALT cycle, then the paper's Table 1 rows for this setting.

Runs prepare -> sample -> label -> train (generator, verifier, refiner, star) -> evaluate
for a recipe through the stage commands the DAG runs (each skips when its manifest exists,
so a rerun with the same --run-id resumes or only reports), then reads evaluate/report.json
and per_question.jsonl from the store and reports:

- the Table 1 rows (SA, SA+MV, MA, MA+MV, the STaR rows, MALT w/o MV, MALT), mean ± std
  over the evaluation seeds;
- the relative gain of MALT over SA;
- paired one-sided tests of MALT against SA, MA+MV, STaR SA+MV and STaR MA+MV: each
  question's correctness averaged over the seeds that drew it, the per-question differences
  tested with the exact sign-flip permutation test (the question is the unit, not the item);
- turn-wise accuracy (after G, V, R) and answer flips per system;
- wall time per stage.

The report is printed, appended to bench/RESULTS.md (unless --no-append) and logged to
MLflow as a nested run ``bench[science]`` under the pipeline's parent run.

    python bench/science.py --recipe recipes/science-validation.yaml --run-id sci-val \\
        [--set key=value ...] [--stages prepare,sample,label,train,evaluate | none] [--no-append]

The validation and test recipes differ only in what is evaluated, so the test run can take
its trees, labels and adapters from the finished validation run (``--train-from sci-val``):
the training questions must be byte-identical and the model, inference, sampling, labeling
and training sections equal to the ones the source run logged to MLflow, else it refuses.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import report as print_report
from common import table

from malt_ops.config import TRAINED, Recipe, load_recipe
from malt_ops.errors import MaltError
from malt_ops.significance import paired_by_question
from malt_ops.stages.common import adopt, require_done, stage_output
from malt_ops.stages.evaluate import setting_key
from malt_ops.storage import run_prefix, validate_run_id

STAGES = ("prepare", "sample", "label", "train", "evaluate")
TARGET_GAIN = 0.07
"""MALT must beat SA by at least this much, relative."""
COMPARISONS = ("SA", "MA+MV", "STaR SA+MV", "STaR MA+MV")
"""References MALT is tested against (paired, one-sided)."""
REUSABLE_STAGES = ("sample", "label", "train")
TRAINING_SIDE = ("model.", "inference.", "sampling.", "labeling.", "training.")
"""Recipe sections that decide the trees, labels and adapters (with the training questions)."""


SECONDS_PER_SEQUENCE = 0.6
"""Measured here (run sci-val-t08): Qwen2.5-Coder-0.5B bf16, hf backend, batch 32, the science
prompts, each prompt's n samples sharing its KV cache, 2 cores with avx512_bf16."""
SECONDS_PER_EVAL_SEQUENCE = 1.3
"""Evaluation levels after the generator have one sample per prompt (nothing to share) and
longer prompts: 22.8 min for 1,080 generations in sci-val-t08."""
SECONDS_PER_SFT_STEP = {"generator": 12.0, "verifier": 24.0, "refiner": 30.0, "star": 12.0}
"""Batch 8; a role's examples are longer the later it speaks (its prompt holds the earlier turns)."""
SECONDS_PER_DPO_STEP = 60.0
SECONDS_PER_MODEL_LOAD = 15.0


def estimate(recipe: Recipe) -> dict[str, float]:
    """Predicted wall seconds per stage from the recipe's sizes and this machine's rates."""
    s, ev, t = recipe.sampling, recipe.evaluation, recipe.training
    per_tree = s.n + s.n * s.m + s.n * s.m * s.l
    questions = recipe.data.train_size or 1000
    sample = questions * per_tree * SECONDS_PER_SEQUENCE + SECONDS_PER_MODEL_LOAD
    train = 0.0
    for role in TRAINED:
        cfg = getattr(t, role)
        steps = cfg.max_steps if cfg.max_steps > 0 else 50  # unbounded: a guess
        train += steps * SECONDS_PER_SFT_STEP[role] + SECONDS_PER_MODEL_LOAD
        if getattr(cfg, "dpo", False) and role in ("verifier", "refiner"):
            dpo = cfg.dpo_max_steps if cfg.dpo_max_steps > 0 else 25
            train += dpo * SECONDS_PER_DPO_STEP + SECONDS_PER_MODEL_LOAD
    chains = len(ev.seeds) * ev.subset_size * ev.votes
    evaluate = 3 * chains * 3 * SECONDS_PER_EVAL_SEQUENCE + SECONDS_PER_MODEL_LOAD
    return {"prepare": 10.0, "sample": sample, "label": 5.0, "train": train, "evaluate": evaluate}


def stage_commands(recipe: Recipe, stage: str) -> list[list[str]]:
    """The `malt-ops` argument lists of one stage (sample per shard, train per role)."""
    if stage == "sample":
        return [
            ["sample", "--shard", str(k), "--num-shards", str(recipe.sampling.num_shards)]
            for k in range(recipe.sampling.num_shards)
        ]
    if stage == "train":
        return [["train", "--role", role] for role in TRAINED]
    return [[stage]]


def run_cycle(
    recipe: Recipe, recipe_path: str, overrides: list[str], run_id: str, stages: list[str]
) -> dict[str, float]:
    """Run the chosen stages in order (finished ones skip themselves); wall seconds per stage."""
    from malt_ops.cli import run_stage

    common = ["--recipe", recipe_path, "--run-id", run_id]
    for override in overrides:
        common += ["--set", override]
    seconds: dict[str, float] = {}
    for stage in stages:
        started = time.perf_counter()
        for command in stage_commands(recipe, stage):
            print(f"== malt-ops {' '.join(command)} (run {run_id})", flush=True)
            head, *rest = command
            run_stage([head, *common, *rest])
        seconds[stage] = time.perf_counter() - started
    return seconds


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


def correctness(per_question: list[dict[str, Any]], setting: str) -> dict[tuple, bool]:
    """(seed, question id) -> correct, for one Table 1 setting."""
    system, key = setting_key(setting)
    return {
        (q["seed"], q["question_id"]): bool(q[key]) for q in per_question if q["system"] == system
    }


def paired_tests(per_question: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """MALT against each reference: per-question sign-flip test (malt_ops.significance)."""
    malt = correctness(per_question, "MALT")
    return [
        {
            "reference": reference,
            **paired_by_question(malt, correctness(per_question, reference)).as_dict(),
        }
        for reference in COMPARISONS
    ]


def summarize(report: dict[str, Any], per_question: list[dict[str, Any]]) -> dict[str, Any]:
    by_name = {s["setting"]: s for s in report["settings"]}
    sa, malt = by_name["SA"]["mean"], by_name["MALT"]["mean"]
    gain = (malt - sa) / sa if sa > 0 else float("inf") if malt > 0 else 0.0
    tests = paired_tests(per_question)
    beats = {
        t["reference"]: by_name["MALT"]["mean"] > by_name[t["reference"]]["mean"] for t in tests
    }
    return {
        "relative_gain_vs_sa": gain,
        "tests": tests,
        "beats": beats,
        "target_met": gain >= TARGET_GAIN
        and beats["MA+MV"]
        and beats["STaR SA+MV"]
        and beats["STaR MA+MV"],
    }


def format_body(
    recipe: Recipe,
    run_id: str,
    report: dict[str, Any],
    summary: dict[str, Any],
    seconds: dict[str, float],
    labels: dict[str, Any] | None,
    reused: tuple[str, dict[str, float], dict[str, float]] | None = None,
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
    gain = summary["relative_gain_vs_sa"]
    lines.append(f"MALT vs SA: {gain * 100:+.1f}% relative (target ≥ +{TARGET_GAIN * 100:.0f}%).")
    lines.append("")
    test_rows = [
        [
            f"MALT vs {t['reference']}",
            t["questions"],
            t["repeated_questions"],
            t["items"],
            f"{t['wins']}/{t['losses']}",
            f"{t['effect'] * 100:+.2f}",
            f"{t['p_value']:.3g}",
        ]
        for t in summary["tests"]
    ]
    lines += [
        table(
            [
                "paired test",
                "questions",
                "under several seeds",
                "items",
                "wins/losses (questions)",
                "Δ points",
                "p sign-flip",
            ],
            test_rows,
        ),
        "",
        "The unit is the question: its correctness is averaged over the seeds that drew it; "
        "p-values are exact, one-sided (MALT better).",
        "",
    ]
    turn_rows = []
    for system, turns in report["turnwise"].items():
        flips = report["flips"][system]
        turn_rows.append(
            [
                system,
                *(f"{t * 100:.1f}" for t in turns),
                flips["wrong_to_right"],
                flips["right_to_wrong"],
                flips["chains"],
            ]
        )
    lines += [
        table(
            [
                "system",
                "after G %",
                "after V %",
                "after R %",
                "wrong→right",
                "right→wrong",
                "chains",
            ],
            turn_rows,
        ),
        "",
    ]
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
    if seconds:
        total = sum(seconds.values())
        lines.append(
            "Wall time this invocation: "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
            + f"; total {total / 60:.1f} min."
        )
    if reused:
        # the manifests' times, so a report-only rerun gives the same total
        source, source_seconds, own_seconds = reused
        cycle = {**own_seconds, **source_seconds}
        lines += [
            "",
            f"Sample, label and train were taken from run `{source}` (same training questions, "
            "same training-side recipe, checked): "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in source_seconds.items())
            + f" there; the whole cycle {sum(cycle.values()) / 60:.1f} min.",
        ]
    return "\n".join(lines).rstrip()


def verdict(summary: dict[str, Any]) -> str:
    beats = summary["beats"]
    parts = [
        f"MALT ≥ SA +{TARGET_GAIN * 100:.0f}% relative: "
        + ("met" if summary["relative_gain_vs_sa"] >= TARGET_GAIN else "not met"),
        *(f"beats {ref}: {'yes' if beats[ref] else 'no'}" for ref in COMPARISONS[1:]),
    ]
    return "Target: " + "; ".join(parts) + (" -> met." if summary["target_met"] else " -> not met.")


def log_to_mlflow(
    recipe: Recipe, run_id: str, report: dict, summary: dict, body: str, seconds: dict
) -> None:
    from malt_ops.tracking import log_stage

    metrics: dict[str, float] = {
        f"{s['setting']}.{stat}": s[stat] for s in report["settings"] for stat in ("mean", "std")
    }
    metrics["relative_gain_vs_SA"] = summary["relative_gain_vs_sa"]
    metrics["target_met"] = float(summary["target_met"])
    for t in summary["tests"]:
        for key in ("effect", "p_value", "questions"):
            metrics[f"MALT_vs_{t['reference']}.{key}"] = t[key]
    metrics |= {f"wall_seconds.{stage}": value for stage, value in seconds.items()}
    artifacts = {
        "science.md": body.encode(),
        "science.json": json.dumps({"summary": summary, "seconds": seconds}, indent=2).encode(),
    }
    log_stage(recipe, run_id, "bench", "science", metrics=metrics, artifacts=artifacts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="e.g. recipes/science-validation.yaml")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated stages to run before reporting, or 'none' to report on a "
        "finished run (finished stages skip themselves anyway)",
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
    stages = [] if args.stages == "none" else [s.strip() for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)} or 'none'")
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.estimate:
            predicted = estimate(recipe)
            for stage, seconds in predicted.items():
                print(f"{stage:<9} {seconds / 60:6.1f} min")
            print(f"{'total':<9} {sum(predicted.values()) / 60:6.1f} min")
            return 0
        run_id = validate_run_id(args.run_id)
        reused = None
        if args.train_from:
            # this run's own questions first: the check compares its training questions
            first = [s for s in stages if s == "prepare"]
            seconds = run_cycle(recipe, args.recipe, args.overrides, run_id, first)
            source_seconds = reuse_training(recipe, run_id, args.train_from)
            # copied units skip themselves; a shard or role the source never finished runs here
            rest = [s for s in stages if s != "prepare"]
            seconds |= run_cycle(recipe, args.recipe, args.overrides, run_id, rest)
        else:
            seconds = run_cycle(recipe, args.recipe, args.overrides, run_id, stages)
        evaluated = require_done(recipe, run_id, "evaluate")
        report = evaluated.read_json("report.json")
        per_question = list(evaluated.iter_jsonl("per_question.jsonl"))
        labeled = stage_output(recipe, run_id, "label")
        labels = labeled.manifest().get("summary") if labeled.done() else None
        if args.train_from:
            own = {s: stage_seconds(evaluated.store, run_id, s) for s in ("prepare", "evaluate")}
            reused = (args.train_from, source_seconds, own)
    except MaltError as exc:
        print(f"bench/science.py: error: {exc}", file=sys.stderr)
        return 2
    summary = summarize(report, per_question)
    body = format_body(recipe, run_id, report, summary, seconds, labels, reused)
    print_report(
        f"bench/science.py ({Path(args.recipe).name})",
        body,
        verdict(summary),
        append=not args.no_append,
    )
    if recipe.tracking.enabled:
        log_to_mlflow(recipe, run_id, report, summary, body, seconds)
        from malt_ops.tracking import finish_pipeline

        finish_pipeline(recipe, run_id)  # the cycle has ended: its parent run is not running
    return 0


if __name__ == "__main__":
    sys.exit(main())
