"""`malt-ops run --cycles 2` end to end, in the production shape: the Airflow DAG in-process
on SmolLM2 with tiny sizes, a real MLflow server, and the store and MLflow artifacts in a
real S3 server (SeaweedFS).

Cycle promotion is forced (no significance, any effect) so that cycle 2 must sample with
cycle 1's champion; the real gate is then checked on sets built from real evaluations.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

from malt_ops.storage import StageOutput
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY, run_cli

# Two full cycles through Airflow take about 12 minutes here: `make test-slow` runs them, and
# `make test` keeps the stages' own tests (issue 17 keeps `make test` within 15 minutes).
pytestmark = [pytest.mark.model, pytest.mark.slow]
ROLES = ("generator", "verifier", "refiner")

# An easy task and a low threshold so that every role has positives and pairs to train on.
TINY = [
    "data.train_size=4",
    "data.test_size=6",
    "data.task_config={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, operators: ['+'], "
    "allow_negation: false, allow_parentheses: false}",
    "sampling.n=2",
    "sampling.m=2",
    "sampling.l=2",
    "sampling.max_new_tokens={generator: 40, verifier: 40, refiner: 40}",
    "labeling.threshold=0.01",
    "evaluation.seeds=[0, 1]",
    "evaluation.subset_size=3",
    "evaluation.votes=3",
    "evaluation.max_new_tokens={generator: 24, verifier: 24, refiner: 24}",
    *(f"training.{role}.max_steps=1" for role in ("generator", "verifier", "refiner", "star")),
    *(f"training.{role}.max_length=320" for role in ("generator", "verifier", "refiner", "star")),
]
FORCED = ["promotion.require_significance=false", "promotion.min_effect=-1"]
GATE = ["promotion.require_significance=false", "promotion.min_effect=0"]


def sets(overrides):
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture(scope="module")
def env(s3_server, mlflow_server):
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server["url"],
        "MALT_OPS_S3_ENDPOINT_URL": s3_server["endpoint"],
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def cli(env, *args):
    return run_cli(*args, env=env)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, env, s3_server):
    tmp = tmp_path_factory.mktemp("e2e")
    recipe = tmp / "recipe.yaml"
    text = Path("recipes/local.yaml").read_text()
    recipe.write_text(
        text.replace(".state/store", f"s3://{s3_server['bucket']}/e2e")
        .replace("state_dir: .state", f"state_dir: {tmp / 'state'}")
        .replace("model_prefix: malt", "model_prefix: e2e")
    )
    done = cli(
        env,
        "run",
        "--recipe",
        str(recipe),
        "--run-id",
        "e2e",
        "--cycles",
        "2",
        *sets(TINY + FORCED),
    )
    (tmp / "run.out").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    assert done.returncode == 0, (f"full output: {tmp / 'run.out'}", done.stderr[-3000:])
    from malt_ops.config import load_recipe
    from malt_ops.storage import open_store

    os.environ.update(
        {
            k: env[k]
            for k in (
                "MALT_OPS_S3_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION",
            )
        }
    )
    store = open_store(load_recipe(recipe).storage.root)
    return {"recipe": recipe, "store": store, "done": done, "tmp": tmp}


def output(store, run_id: str, stage: str, unit: str | None = None) -> StageOutput:
    """A committed stage unit: its files are found (and checked) through its manifest."""
    return StageOutput(store, run_id, stage, unit)


def test_every_stage_committed_its_manifest(finished_run):
    store = finished_run["store"]
    expected = [
        ("prepare", None),
        ("sample", "shard-0"),
        ("label", None),
        *(("train", role) for role in (*ROLES, "star")),
        ("evaluate", None),
        ("register", None),
        ("promote", None),
    ]
    for cycle in ("e2e-c1", "e2e-c2"):
        for stage, unit in expected:
            committed = output(store, cycle, stage, unit)
            manifest = committed.manifest()
            assert manifest["attempt"] and manifest["provenance"], (cycle, stage, unit)
            for path, meta in manifest["files"].items():
                assert len(committed.read_bytes(path)) == meta["bytes"]  # sha256 checked too


def test_three_role_adapters_load_with_peft(finished_run, model_dir):
    from peft import PeftModel

    from malt_ops.models import load_model

    store = finished_run["store"]
    model = None
    for role in ROLES:
        adapter = output(store, "e2e-c1", "train", role).local_dir(f"adapters/{role}")
        assert (adapter / "adapter_config.json").exists(), role
        if model is None:
            model = PeftModel.from_pretrained(load_model(model_dir), adapter, adapter_name=role)
        else:
            model.load_adapter(adapter, adapter_name=role)
    assert set(model.peft_config) == set(ROLES)
    phases = {
        role: output(store, "e2e-c1", "train", role).read_json(f"metrics/{role}.json")["phases"]
        for role in ROLES
    }
    assert phases == {"generator": ["sft"], "verifier": ["sft", "dpo"], "refiner": ["sft", "dpo"]}
    refiner = output(store, "e2e-c1", "train", "refiner")
    assert len(refiner.read_bytes("plots/refiner_loss.png")) > 1000


def test_report_has_all_ten_settings(finished_run):
    report = output(finished_run["store"], "e2e-c1", "evaluate").read_json("report.json")
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
            len(setting["per_seed"]) == 2 and setting["n_questions"] == 3 and setting["tokens"] > 0
        )
        assert 0.0 <= setting["mean"] <= 1.0
    assert set(report["turnwise"]) == {"base", "star", "malt"}
    # the comparisons are part of every run's report, and of what `malt-ops run` prints
    assert report["comparisons"]["tests"][0]["name"] == "MALT vs SA"
    assert report["comparisons"]["tests"][0]["test"]["questions"] == 6  # 2 seeds x 3, disjoint
    # the console: our lines and the summary; the libraries' output is in the log file
    # lines a terminal keeps: a progress bar redraws one line with '\r', which the captured
    # text (universal newlines) turns into a line per redraw
    bar = re.compile(r"\|\s*\d+/\d+ \[")
    console = [
        line
        for line in finished_run["done"].stdout.splitlines()
        if line.strip() and not bar.search(line)
    ]
    assert len(console) <= 300, f"{len(console)} console lines"
    assert any(line.strip().startswith("train refiner done in ") for line in console)
    assert "see it in MLflow: open http://127.0.0.1:" in finished_run["done"].stdout
    assert "DAG bundles loaded" not in finished_run["done"].stdout
    assert "| MALT vs SA |" in finished_run["done"].stdout
    assert (
        "| MALT |" in finished_run["done"].stdout
        and "outputs in s3://" in finished_run["done"].stdout
    )


def test_mlflow_has_models_aliases_metrics_and_artifacts(finished_run, mlflow_server):
    client = MlflowClient(mlflow_server["url"])
    store = finished_run["store"]
    for role in ROLES:
        champion = client.get_model_version_by_alias(f"e2e-{role}", "champion")
        challenger = client.get_model_version_by_alias(f"e2e-{role}", "challenger")
        assert champion.version == challenger.version  # cycle 2 was promoted (forced)
        trained = output(store, "e2e-c2", "train", role)
        assert champion.source == store.uri(trained.key(f"adapters/{role}"))
    experiment = client.get_experiment_by_name("malt-ops")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`malt_ops.run_id` = 'e2e-c1'"
    )
    by_stage = {
        r.data.tags.get("malt_ops.stage", "") + r.data.tags.get("malt_ops.unit", ""): r
        for r in runs
    }
    parent = next(r for r in runs if r.data.tags["malt_ops.kind"] == "pipeline")
    assert parent.info.status == "FINISHED" and parent.data.params["sampling.n"] == "2"
    evaluate = by_stage["evaluate"]
    assert {"MALT.mean", "MALT.std", "SA.mean", "MA_MV.mean"} <= set(evaluate.data.metrics)
    logged = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    assert "per_question.json" in logged, logged  # mlflow.log_table: MLflow's table view
    assert {"MALT_vs_SA.p_value", "MALT_vs_SA.effect", "comparisons.target_met"} <= set(
        evaluate.data.metrics
    )
    headline = {"MALT.mean", "SA.mean", "MALT_vs_SA.p_value", "comparisons.target_met"}
    assert headline | {"promote.promoted"} <= set(parent.data.metrics)
    assert "leaf_accuracy" in by_stage["sampleshard-0"].data.metrics
    assert "refiner.pairs" in by_stage["label"].data.metrics
    history = client.get_metric_history(by_stage["trainrefiner"].info.run_id, "sft_loss")
    assert history and all(p.value > 0 for p in history)
    table = client.download_artifacts(evaluate.info.run_id, "table.md")
    assert "| MALT |" in Path(table).read_text()
    assert (
        Path(client.download_artifacts(by_stage["label"].info.run_id, "plots/values.png"))
        .stat()
        .st_size
        > 1000
    )


def test_cycle_two_samples_with_cycle_one_champion_and_rollback(finished_run, env, mlflow_server):
    store = finished_run["store"]
    first = output(store, "e2e-c1", "promote").read_json("decision.json")
    second = output(store, "e2e-c2", "promote").read_json("decision.json")
    assert first["promoted"] and first["reference"].startswith("untrained base")
    policy_c1 = output(store, "e2e-c1", "sample", "shard-0").manifest()["summary"]["policy"]
    policy_c2 = output(store, "e2e-c2", "sample", "shard-0").manifest()["summary"]["policy"]
    assert policy_c1 == dict.fromkeys(ROLES)
    for role in ROLES:  # the champion adapters (from S3) are what cycle 2 sampled with
        trained = output(store, "e2e-c1", "train", role)
        assert (Path(policy_c2[role]) / "adapter_config.json").read_bytes() == trained.read_bytes(
            f"adapters/{role}/adapter_config.json"
        )
    assert (
        second["reference"].startswith("champion")
        and second["champion_before"] == first["challenger"]
    )
    assert finished_run["done"].stdout.count("promotion: PROMOTED") == 2

    back = cli(env, "rollback", "--recipe", str(finished_run["recipe"]))
    assert back.returncode == 0, back.stderr[-2000:]
    client = MlflowClient(mlflow_server["url"])
    for role in ROLES:
        assert (
            client.get_model_version_by_alias(f"e2e-{role}", "champion").version
            == first["challenger"][role]
        )


def test_no_secret_in_xcom_airflow_logs_or_local_state(finished_run):
    """The run had the S3 secret in its environment: XCom, task logs and local state never show it."""
    import sqlite3

    state = finished_run["tmp"] / "state"
    with sqlite3.connect(state / "airflow" / "airflow.db") as db:
        rows = db.execute("select task_id, key, value from xcom").fetchall()
    assert rows, "the DAG pushed no XCom at all"
    for task_id, _key, value in rows:
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        assert S3_SECRET_KEY not in text, task_id
        # Only run ids and malt-ops argument lists travel through XCom.
        assert "e2e" in text, (task_id, text[:200])
    leaked = [
        path
        for path in state.rglob("*")
        if path.is_file() and S3_SECRET_KEY.encode() in path.read_bytes()
    ]
    assert leaked == []
    done = finished_run["done"]
    assert S3_SECRET_KEY not in done.stdout + done.stderr


@pytest.mark.slow  # a second `malt-ops run` of the same cycle (about 30 s)
def test_rerun_skips_finished_stages(finished_run, env):
    store = finished_run["store"]
    before = output(store, "e2e-c1", "evaluate").read_bytes("report.json")
    again = cli(
        env,
        "run",
        "--recipe",
        str(finished_run["recipe"]),
        "--run-id",
        "e2e-c1",
        *sets(TINY + FORCED),
    )
    assert again.returncode == 0
    logs = finished_run["tmp"] / "state" / "logs" / "e2e-c1.log"  # the libraries' output
    assert logs.read_text().count("already done") >= 10
    assert output(store, "e2e-c1", "evaluate").read_bytes("report.json") == before


def corrupt_copy(store, source_run: str, target_run: str, corrupt: bool) -> None:
    """Copy a finished run's prepare and train outputs; optionally overwrite its LoRA weights with noise."""
    for stage in ("prepare", "train"):
        for key in store.list(f"runs/{source_run}/{stage}"):
            store.write_bytes(
                key.replace(f"runs/{source_run}/", f"runs/{target_run}/", 1), store.read_bytes(key)
            )
    if not corrupt:
        return
    torch.manual_seed(0)
    for role in (*ROLES, "star"):
        # The noise is committed as the adapter's bytes (its manifest sha256 updated), so
        # readers take it as the trained set and evaluate measures it.
        trained = output(store, target_run, "train", role)
        name = f"adapters/{role}/adapter_model.safetensors"
        local = trained.local_dir(f"adapters/{role}") / "adapter_model.safetensors"
        weights = {k: torch.randn_like(v) * 5 for k, v in load_file(local).items()}
        noisy = local.with_suffix(".noisy")
        save_file(weights, str(noisy))
        data = noisy.read_bytes()
        store.write_bytes(trained.key(name), data)
        manifest = trained.manifest()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        store.write_bytes(trained.manifest_key, json.dumps(manifest).encode())


@pytest.mark.slow
def test_promotion_gate_refuses_worse_and_accepts_better(finished_run, env, mlflow_server):
    """Real evaluations: a set with noise for weights loses to the champion; a good set beats it."""
    store, recipe = finished_run["store"], str(finished_run["recipe"])
    client = MlflowClient(mlflow_server["url"])
    corrupt_copy(store, "e2e-c1", "gate-worse", corrupt=True)
    for stage in ("evaluate", "register", "promote"):
        done = cli(env, stage, "--recipe", recipe, "--run-id", "gate-worse", *sets(TINY + GATE))
        assert done.returncode == 0, done.stderr[-2000:]
    worse = output(store, "gate-worse", "promote").read_json("decision.json")
    assert not worse["promoted"] and worse["reference"].startswith("champion")
    assert worse["challenger_accuracy"] < worse["reference_accuracy"]

    # Make the corrupted set the champion (the system alias; the role aliases mirror it), then
    # a good set must win against it.
    from malt_ops.config import load_recipe
    from malt_ops.registry import CHAMPION, move_set

    move_set(load_recipe(Path(recipe)), CHAMPION, worse["challenger_system"], client)
    for role in ROLES:
        assert (
            client.get_model_version_by_alias(f"e2e-{role}", "champion").version
            == worse["challenger"][role]
        )
    corrupt_copy(store, "e2e-c1", "gate-better", corrupt=False)
    for stage in ("evaluate", "register", "promote"):
        done = cli(env, stage, "--recipe", recipe, "--run-id", "gate-better", *sets(TINY + GATE))
        assert done.returncode == 0, done.stderr[-2000:]
    better = output(store, "gate-better", "promote").read_json("decision.json")
    assert better["promoted"], better
    assert better["reference_accuracy"] == pytest.approx(worse["challenger_accuracy"]), better
    system = client.get_model_version_by_alias("e2e-system", "champion")
    assert system.version == better["challenger_system"]
    for role in ROLES:
        assert (
            client.get_model_version_by_alias(f"e2e-{role}", "champion").version
            == better["challenger"][role]
        )
