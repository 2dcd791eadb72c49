"""bench/science.py: a thin driver over `malt-ops run` that reports what evaluate wrote; with
--train-from, a test run takes a validation run's trees, labels and adapters only when they are
what its own recipe would have produced."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from malt_ops.config import load_recipe
from malt_ops.errors import MaltError
from malt_ops.stages import prepare
from malt_ops.stages.common import stage_output
from malt_ops.tracking import client_for, parent_run_id

# bench/ scripts import their siblings by name, as when run as `python bench/science.py`
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import science


def finished_source(recipe, run_id: str) -> None:
    """A finished run as far as training: its recipe in MLflow, one output per stage."""
    prepare.run(recipe, run_id)
    parent_run_id(client_for(recipe), recipe, run_id)
    for stage in science.REUSABLE_STAGES:
        unit = "generator" if stage == "train" else None
        out = stage_output(recipe, run_id, stage, unit)
        out.write_json("outputs/data.json", {"stage": stage})
        out.commit({"stage": stage})


def test_train_from_copies_a_run_with_the_same_training_side(recipe_file):
    path = recipe_file()
    recipe = load_recipe(path)
    finished_source(recipe, "val")
    # what only the evaluation reads may differ
    test_recipe = load_recipe(path, ["data.test_size=12", "evaluation.seeds=[0,1]"])
    prepare.run(test_recipe, "test")

    seconds = science.reuse_training(test_recipe, "test", "val")

    assert set(seconds) == set(science.REUSABLE_STAGES)
    for stage in science.REUSABLE_STAGES:
        unit = "generator" if stage == "train" else None
        copied = stage_output(test_recipe, "test", stage, unit)
        assert copied.done()
        assert copied.store.read_json(copied.key("outputs/data.json")) == {"stage": stage}
    # a rerun (resume, or report only) copies nothing new and still passes the checks
    assert science.reuse_training(test_recipe, "test", "val") == seconds


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.refiner.beta=0.5", "training.refiner.beta: 0.2 -> 0.5"),
        ("sampling.temperature=0.9", "sampling.temperature"),
        ("data.seed=3", "training questions differ"),
    ],
)
def test_train_from_refuses_a_run_trained_differently(recipe_file, override, message):
    path = recipe_file()
    finished_source(load_recipe(path), "val")
    changed = load_recipe(path, [override])
    prepare.run(changed, "test")

    with pytest.raises(MaltError, match=message):
        science.reuse_training(changed, "test", "val")
    for stage in science.REUSABLE_STAGES:
        assert not stage_output(changed, "test", stage).store.list(f"runs/test/{stage}")


def test_train_from_needs_the_source_to_have_finished_training(recipe_file):
    recipe = load_recipe(recipe_file())
    prepare.run(recipe, "val")
    parent_run_id(client_for(recipe), recipe, "val")
    prepare.run(recipe, "test")

    with pytest.raises(MaltError, match="its sample stage has not finished"):
        science.reuse_training(recipe, "test", "val")
    with pytest.raises(MaltError, match="names this run itself"):
        science.reuse_training(recipe, "val", "val")


def finished_evaluate(recipe, run_id: str, with_comparisons: bool = True) -> dict:
    """evaluate's outputs for the constructed case of tests/test_evaluate.py, committed."""
    from malt_ops.comparisons import compare
    from malt_ops.stages.evaluate import build_report
    from tests.test_evaluate import constructed_results, rows_of

    results = constructed_results()
    report = build_report(results, [0, 1], {"untrained": []})
    report["questions_per_seed"] = 3
    rows = rows_of(results)
    if with_comparisons:
        report["comparisons"] = compare(report, rows, recipe.evaluation.comparisons)
    out = stage_output(recipe, run_id, "evaluate")
    out.write_json("report.json", report)
    out.write_jsonl("per_question.jsonl", rows)
    out.commit({})
    return report


@pytest.mark.parametrize("with_comparisons", [True, False])
def test_report_only_prints_evaluates_comparisons(recipe_file, capsys, with_comparisons):
    """The report is evaluate's: its gains, question-level tests and flips (for a run evaluated
    before evaluate wrote them, the same computed from per_question.jsonl), and the wall time of
    the stages that ran, from their manifests."""
    path = recipe_file(tracking={"enabled": False})
    recipe = load_recipe(path)
    prepare.run(recipe, "done")
    finished_evaluate(recipe, "done", with_comparisons)

    code = science.main(["--recipe", str(path), "--run-id", "done", "--report-only", "--no-append"])

    assert code == 0
    printed = capsys.readouterr().out
    assert "MALT vs SA: +140.0% relative (100.00 vs 41.67; target ≥ +7%: met)." in printed
    lines = printed.splitlines()
    first_p = next(i for i, line in enumerate(lines) if "p (question-level" in line)
    assert lines[first_p + 2] == "| MALT vs SA | 0.125 | 4 | 1 | 5 | 3/0 | +62.50 |"
    assert "| malt | 3 | 0 | +3 | 5 |" in printed
    assert "MALT vs STaR MA+MV: not met" in printed and printed.rstrip().endswith("-> not met.")
    assert "Wall time per stage: prepare " in printed and ", evaluate " in printed


def test_report_only_on_an_unevaluated_run_is_one_line(recipe_file, capsys):
    path = recipe_file(tracking={"enabled": False})
    prepare.run(load_recipe(path), "half")

    assert science.main(["--recipe", str(path), "--run-id", "half", "--report-only"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] + "\n" == (
        "bench/science.py: error: evaluate has not finished for run 'half': run `malt-ops "
        "evaluate` first\n"
    )


@pytest.mark.slow  # two `malt-ops run`s of the tiny cycle on the real model (minutes)
@pytest.mark.nightly  # beyond CI's 90 minutes; test_run.py runs the DAG end to end in CI
@pytest.mark.model
def test_driver_runs_the_dag_and_a_test_run_reuses_the_validation_training(
    recipe_file, capsys, tmp_path
):
    """The driver runs `malt-ops run` (the DAG's stages, in the DAG's order) and reports
    evaluate's comparisons; --train-from copies sample, label and train, which the test run's
    DAG then skips (their manifests are the validation run's, byte for byte)."""
    from tests.test_run import FORCED, TINY

    path = recipe_file(tracking={"experiment": "science-driver", "model_prefix": "sci-driver"})
    sets = [a for o in (*TINY, *FORCED) for a in ("--set", o)]
    assert science.main(["--recipe", str(path), "--run-id", "val", "--no-append", *sets]) == 0
    first = capsys.readouterr().out
    assert "MALT vs SA: " in first and "| MALT vs SA |" in first
    order = first[first.index("Wall time per stage: ") :].split(";")[0]
    stages = [part.strip().split(" ")[0] for part in order.split(":", 1)[1].split(",")]
    assert stages == ["prepare", "sample", "label", "train", "evaluate", "register", "promote"]

    test_sets = [*sets, "--set", "evaluation.seeds=[2, 3]"]  # only what is evaluated differs
    code = science.main(
        [
            "--recipe",
            str(path),
            "--run-id",
            "test",
            "--train-from",
            "val",
            "--no-append",
            *test_sets,
        ]
    )
    assert code == 0
    second = capsys.readouterr().out
    assert "sample, label, train were taken from run `val`" in second
    recipe = load_recipe(path, [o for o in (*TINY, *FORCED)])
    store = stage_output(recipe, "val", "prepare").store
    for stage in science.REUSABLE_STAGES:
        manifests = [k for k in store.list(f"runs/val/{stage}/") if science.is_manifest(k)]
        assert manifests
        for key in manifests:
            mine = key.replace("runs/val/", "runs/test/", 1)
            # adopt() rewrites the copy's provenance to this run's recipe and inputs; the
            # attempt, its files and its times must still be the validation run's.
            copied, source = store.read_json(mine), store.read_json(key)
            copied.pop("provenance"), source.pop("provenance")
            assert copied == source, f"{mine} was made again"
    report = stage_output(recipe, "test", "evaluate").read_json("report.json")
    assert report["settings"][0]["seeds"] == [2, 3] and "comparisons" in report
