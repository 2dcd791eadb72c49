"""Issue 20: `malt-ops train` in two CPU processes (torchrun, gloo) trains one role as one
process would at the same global batch, and writes, commits and logs it once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from malt_ops.config import load_recipe
from malt_ops.stages.common import stage_output
from malt_ops.tracking import client_for
from tests.test_resume import TRAIN, _labeled_run

pytestmark = [pytest.mark.slow, pytest.mark.model]

ROLE = "generator"


def _train(path, run_id: str, processes: int, expect: int = 0) -> subprocess.CompletedProcess:
    arguments = ["train", "--recipe", str(path), "--run-id", run_id, "--role", ROLE]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "malt_ops.cli",
            *arguments,
            "--set",
            f"training.processes={processes}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == expect, (done.stdout + done.stderr)[-3000:]
    return done


def test_two_processes_train_as_one_at_the_same_global_batch(recipe_file):
    steps = {"max_steps": 3, "batch_size": 4, "max_length": 256, "gradient_checkpointing": False}
    path = recipe_file(training={**TRAIN, ROLE: {**TRAIN[ROLE], **steps}})
    recipe = load_recipe(path)
    for run_id in ("one", "two"):
        _labeled_run(recipe, run_id)
    _train(path, "one", 1)
    done = _train(path, "two", 2)
    log = done.stdout + done.stderr
    assert "2 processes (ddp) under torchrun" in log

    one, two = (stage_output(recipe, r, "train", unit=ROLE) for r in ("one", "two"))
    assert two.done() and two.manifest()["summary"]["processes"] == 2
    assert one.manifest()["summary"]["processes"] == 1
    # one attempt committed, one adapter: the second rank wrote nothing
    attempts = {
        k.split("/attempts/")[1].split("/")[0]
        for k in two.store.list("runs/two/train/")
        if "/attempts/" in k
    }
    assert len(attempts) == 1, attempts
    # the ranks' weights agreed (else the stage refuses to save). The losses follow the
    # one-process run at the same global batch of 4 within 10%, not step by step: DDP's
    # DistributedSampler deals the rows in another order than the single process's sampler.
    losses = {
        name: [
            h["loss"]
            for h in out.read_json(f"metrics/{ROLE}.json")["history"]["sft"]
            if "loss" in h
        ]
        for name, out in (("one", one), ("two", two))
    }
    assert len(losses["one"]) == len(losses["two"]) == 3
    mean = {name: sum(values) / len(values) for name, values in losses.items()}
    assert mean["two"] == pytest.approx(mean["one"], rel=0.10), losses
    assert losses["two"][-1] == pytest.approx(losses["one"][-1], rel=0.10), losses
    assert losses["two"][-1] < losses["two"][0] and losses["one"][-1] < losses["one"][0]
    # one MLflow run for the role, logged by the main process
    client = client_for(recipe)
    experiment = client.get_experiment_by_name(recipe.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id],
        "tags.malt_ops.run_id = 'two' and tags.malt_ops.stage = 'train'",
    )
    assert len(runs) == 1, [r.info.run_name for r in runs]


def test_a_batch_that_does_not_split_over_the_processes_is_refused(recipe_file):
    path = recipe_file(training={**TRAIN, ROLE: {**TRAIN[ROLE], "batch_size": 3}})
    recipe = load_recipe(path)
    _labeled_run(recipe, "odd")
    done = _train(path, "odd", 2, expect=2)
    assert (
        "training.generator.batch_size (3) must be a multiple of the 2 training processes"
        in done.stderr
    )
