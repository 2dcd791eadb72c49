"""`malt-ops run` end to end: the Airflow DAG in-process on SmolLM2 with tiny sizes."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.model

# An easy task and a low threshold so that every role has positives and pairs to train on.
TINY = [
    "data.train_size=4",
    "data.test_size=4",
    "data.task_config={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, operators: ['+'], "
    "allow_negation: false, allow_parentheses: false}",
    "sampling.n=2",
    "sampling.m=2",
    "sampling.l=2",
    "sampling.max_new_tokens={generator: 40, verifier: 40, refiner: 40}",
    "labeling.threshold=0.01",
    "evaluation.seeds=[0, 1]",
    "evaluation.subset_size=2",
    "evaluation.votes=3",
    "evaluation.max_new_tokens={generator: 24, verifier: 24, refiner: 24}",
    *(f"training.{role}.max_steps=1" for role in ("generator", "verifier", "refiner", "star")),
    *(f"training.{role}.max_length=256" for role in ("generator", "verifier", "refiner", "star")),
]


def run(recipe, run_id):
    sets = [arg for override in TINY for arg in ("--set", override)]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "malt_ops.cli",
            "run",
            "--recipe",
            str(recipe),
            "--run-id",
            run_id,
            *sets,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from pathlib import Path

    tmp = tmp_path_factory.mktemp("e2e")
    recipe = tmp / "recipe.yaml"
    text = Path("recipes/local.yaml").read_text()
    recipe.write_text(
        text.replace(".state/store", str(tmp / "store")).replace(
            "state_dir: .state", f"state_dir: {tmp / 'state'}"
        )
    )
    done = run(recipe, "e2e")
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return recipe, tmp / "store" / "runs" / "e2e", done


def test_every_stage_committed_its_manifest(finished_run):
    _, run_dir, _ = finished_run
    expected = [
        "prepare/MANIFEST.json",
        "sample/MANIFEST-shard-0.json",
        "label/MANIFEST.json",
        *(f"train/MANIFEST-{role}.json" for role in ("generator", "verifier", "refiner", "star")),
        "evaluate/MANIFEST.json",
    ]
    for name in expected:
        manifest = json.loads((run_dir / name).read_text())
        for path, meta in manifest["files"].items():
            assert (run_dir / name.split("/")[0] / path).stat().st_size == meta["bytes"]


def test_three_role_adapters_load_with_peft(finished_run, model_dir):
    from peft import PeftModel

    from malt_ops.models import load_model

    _, run_dir, _ = finished_run
    model = None
    for role in ("generator", "verifier", "refiner"):
        adapter = run_dir / "train" / "adapters" / role
        assert (adapter / "adapter_config.json").exists(), role
        if model is None:
            model = PeftModel.from_pretrained(load_model(model_dir), adapter, adapter_name=role)
        else:
            model.load_adapter(adapter, adapter_name=role)
    assert set(model.peft_config) == {"generator", "verifier", "refiner"}
    phases = {
        role: json.loads((run_dir / "train" / "metrics" / f"{role}.json").read_text())["phases"]
        for role in ("generator", "verifier", "refiner")
    }
    assert phases["generator"] == ["sft"]
    assert phases["verifier"] == ["sft", "dpo"] and phases["refiner"] == ["sft", "dpo"]
    assert (run_dir / "train" / "plots" / "refiner_loss.png").stat().st_size > 1000


def test_report_has_all_ten_settings(finished_run):
    _, run_dir, done = finished_run
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    names = [s["setting"] for s in report["settings"]]
    assert names == [
        "SA",
        "SA+MV",
        "MA",
        "MA+MV",
        "STaR SA",
        "STaR SA+MV",
        "STaR MA",
        "STaR MA+MV",
        "MALT w/o MV",
        "MALT",
    ]
    for setting in report["settings"]:
        assert (
            len(setting["per_seed"]) == 2 and setting["n_questions"] == 2 and setting["tokens"] > 0
        )
        assert 0.0 <= setting["mean"] <= 1.0
    assert set(report["turnwise"]) == {"base", "star", "malt"}
    assert (run_dir / "evaluate" / "plots" / "accuracy.png").exists()
    assert "| MALT |" in done.stdout and "outputs in" in done.stdout


def test_rerun_skips_finished_stages(finished_run):
    recipe, run_dir, _ = finished_run
    before = (run_dir / "evaluate" / "report.json").read_bytes()
    again = run(recipe, "e2e")
    assert again.returncode == 0
    logs = again.stdout + again.stderr
    assert logs.count("already done") >= 8
    assert (run_dir / "evaluate" / "report.json").read_bytes() == before
