"""The command line: help texts, one-line errors, exit codes."""

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize(
    ("stage", "words"),
    [
        ("prepare", "problems/{train,test}.jsonl"),
        ("sample", "trees/shard-K.jsonl"),
        ("label", "SFT and DPO"),
        ("train", "SFT then DPO"),
        ("evaluate", "evaluate/report.json"),
        ("register", "alias 'challenger'"),
        ("promote", "paired test"),
        ("run", "Airflow DAG"),
    ],
)
def test_stage_help_says_what_it_does(stage, words):
    done = run_cli(stage, "--help")
    assert done.returncode == 0
    assert words in " ".join(done.stdout.split())
    for option in ("--recipe", "--run-id", "--set"):
        assert option in done.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "sampling.nn=2"], "unknown key 'sampling.nn'"),
        (["--set", "data.benchmark=squad"], "data.benchmark"),
        (["--set", "data.task=not_a_task"], "not a reasoning-gym task"),
        (
            ["--set", "data.source=file", "--set", "data.train_path=/nonexistent/train.jsonl"],
            "does not exist",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(recipe_file, args, needle):
    done = run_cli("prepare", "--recipe", str(recipe_file()), "--run-id", "bad", *args)
    assert done.returncode == 2
    assert needle in done.stderr
    assert "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if "error:" in line]) == 1


@pytest.mark.slow  # about 30 s: it loads the real model to fail on a missing one
def test_bad_run_id_and_missing_model(recipe_file, tmp_path):
    done = run_cli("prepare", "--recipe", str(recipe_file()), "--run-id", "../escape")
    assert done.returncode == 2 and "run id" in done.stderr
    recipe = str(recipe_file())
    assert run_cli("prepare", "--recipe", recipe, "--run-id", "m").returncode == 0

    def sample_with(model_path):
        return run_cli(
            "sample",
            "--recipe",
            recipe,
            "--run-id",
            "m",
            "--set",
            "model.source=path",
            "--set",
            f"model.path={model_path}",
        )

    done = sample_with(tmp_path / "missing-model")
    assert done.returncode == 2 and "model.path" in done.stderr and "Traceback" not in done.stderr
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 64)
    done = sample_with(corrupt)
    assert (
        done.returncode == 2
        and "could not read GGUF" in done.stderr
        and "Traceback" not in done.stderr
    )


def test_run_refuses_an_override_the_dag_reads_at_parse_time(recipe_file):
    done = run_cli(
        "run", "--recipe", str(recipe_file()), "--run-id", "k8s", "--set", "schedule.retries=0"
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "schedule.retries is read when the DAG is parsed" in done.stderr
    assert "Traceback" not in done.stderr
