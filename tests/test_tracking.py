"""MLflow tracking and the registry against a real `mlflow server` whose artifacts live in S3."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from malt_ops.config import ROLES, load_recipe
from malt_ops.errors import MaltError
from malt_ops.registry import CHALLENGER, CHAMPION, alias_versions
from malt_ops.stages import label, prepare, promote, register, sample
from malt_ops.stages.common import stage_output
from malt_ops.storage import dumps_jsonl
from malt_ops.tracking import RUN_TAG, metric_name, queued, replay_queue

# Imported here, not inside a test: a first import of tests.conftest clears the S3 and MLflow
# environment variables, which would undo what the fixtures set.
from tests.conftest import S3_SECRET_KEY, _free_port, start_mlflow_server, stop
from tests.test_resume import SeededBackend


@pytest.fixture
def tracked_recipe(recipe_file, mlflow_server, s3_env, monkeypatch, tmp_path):
    """The production shape: an MLflow server and the store in S3 (credentials from the environment)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
    prefix = f"t{tmp_path.name[-8:]}".replace("_", "")
    # The recipe points elsewhere on purpose: the environment must win.
    path = recipe_file(
        tracking={
            "uri": "sqlite:////nonexistent/dir/mlflow.db",
            "experiment": prefix,
            "model_prefix": prefix,
        },
        storage={"root": f"s3://{s3_env['bucket']}/{prefix}"},
    )
    return load_recipe(path)


def test_stage_is_a_nested_run_with_params_metrics_and_s3_artifacts(tracked_recipe, mlflow_server):
    prepare.run(tracked_recipe, "track-1")
    client = MlflowClient(mlflow_server["url"])
    experiment = client.get_experiment_by_name(tracked_recipe.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_TAG}` = 'track-1'"
    )
    parent = next(r for r in runs if r.data.tags["malt_ops.kind"] == "pipeline")
    child = next(r for r in runs if r.data.tags["malt_ops.kind"] == "stage")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["malt_ops.stage"] == "prepare"
    assert parent.data.params["sampling.n"] == str(tracked_recipe.sampling.n)
    assert parent.data.params["labeling.threshold"] == "0.5"
    assert child.data.metrics["train_problems"] == tracked_recipe.data.train_size
    assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["stats.json"]
    # the splits are the run's inputs, with their store URI and content digest
    inputs = {
        d.tags[0].value: d.dataset for d in client.get_run(child.info.run_id).inputs.dataset_inputs
    }
    assert set(inputs) == {"train", "test"}
    files = stage_output(tracked_recipe, "track-1", "prepare").manifest()["files"]
    assert inputs["train"].digest == files["problems/train.jsonl"]["sha256"][:16]
    assert json.loads(inputs["train"].profile)["num_rows"] == tracked_recipe.data.train_size
    # the stage run spans the stage's work (its manifest's times), not the moment it was logged
    manifest = stage_output(tracked_recipe, "track-1", "prepare").manifest()
    assert child.info.start_time == int(manifest["started_at"] * 1000)
    assert child.info.end_time == int(manifest["finished_at"] * 1000)
    objects = mlflow_server["s3"].list_objects_v2(
        Bucket=mlflow_server["bucket"], Prefix="mlflow-artifacts/"
    )
    assert any(o["Key"].endswith("stats.json") for o in objects.get("Contents", []))


def fake_finished_run(
    recipe,
    run_id,
    malt_correct: list[bool],
    base_correct: list[bool],
    train: tuple[str, ...] = ("What is 1+1?",),
    test: tuple[str, ...] = ("What is 2+2?",),
) -> None:
    """The store state that evaluate leaves: the splits, adapters, a report and per-question
    outcomes."""
    prepared = stage_output(recipe, run_id, "prepare")
    for split, questions in (("train", train), ("test", test)):
        prepared.write_jsonl(
            f"problems/{split}.jsonl",
            [{"id": f"{split}{i}", "question": q} for i, q in enumerate(questions)],
        )
    prepared.commit({})
    for role in ROLES:
        trained = stage_output(recipe, run_id, "train", role)
        trained.write_json(f"adapters/{role}/adapter_config.json", {"r": 8, "role": role})
        trained.commit({})
    evaluated = stage_output(recipe, run_id, "evaluate")
    evaluated.write_json(
        "report.json", {"settings": [{"setting": "MALT", "mean": 0.5, "std": 0.1}]}
    )
    rows = [
        {"system": system, "seed": 0, "question_id": f"q{i}", "refiner_mv": ok}
        for system, outcomes in (("malt", malt_correct), ("base", base_correct))
        for i, ok in enumerate(outcomes)
    ]
    evaluated.write_bytes("per_question.jsonl", dumps_jsonl(rows))
    evaluated.commit({})


def test_register_then_promote_against_the_base(tracked_recipe, mlflow_server, capsys):
    fake_finished_run(tracked_recipe, "reg-1", [True] * 12, [False] * 12)
    summary = register.run(tracked_recipe, "reg-1")
    assert summary["registered"] and set(summary["versions"]) == set(ROLES)
    client = MlflowClient(mlflow_server["url"])
    challengers = alias_versions(tracked_recipe, CHALLENGER, client)
    for role, version in challengers.items():
        committed = stage_output(tracked_recipe, "reg-1", "train", role)
        assert version.source == committed.store.uri(committed.key(f"adapters/{role}"))
        assert f"/runs/reg-1/train/attempts/{role}-" in version.source
        assert (
            version.tags["malt_ops.run_id"] == "reg-1"
            and version.tags["recipe_digest"] == tracked_recipe.digest()
        )
        assert "data_sha256" in version.tags
        # numbers are metrics of the run the version links to, never version tags
        assert not any(k.startswith("eval.") for k in version.tags)
        assert client.get_run(version.run_id).data.tags["malt_ops.kind"] == "pipeline"
    system = client.get_model_version_by_alias(
        f"{tracked_recipe.tracking.model_prefix}-system", CHALLENGER
    )
    assert client.get_run(system.run_id).data.tags[RUN_TAG] == "reg-1"
    decision = promote.run(tracked_recipe, "reg-1")
    assert decision["promoted"] and decision["p_value"] == 0.5**12
    assert "PROMOTED" in capsys.readouterr().out
    champion = alias_versions(tracked_recipe, CHAMPION, client)
    assert {r: v.version for r, v in champion.items()} == summary["versions"]
    # the decision is on the pipeline's parent run too: the runs list compares cycles
    experiment = client.get_experiment_by_name(tracked_recipe.tracking.experiment)
    (parent,) = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{RUN_TAG}` = 'reg-1' and tags.`malt_ops.kind` = 'pipeline'",
    )
    assert parent.data.metrics["promote.promoted"] == 1.0
    assert parent.data.metrics["promote.p_value"] == 0.5**12
    decision_file = stage_output(tracked_recipe, "reg-1", "promote").key("decision.json")
    assert json.loads(
        stage_output(tracked_recipe, "reg-1", "promote").store.read_text(decision_file)
    )["promoted"]


def test_no_promotion_without_a_significant_win(tracked_recipe, mlflow_server):
    fake_finished_run(
        tracked_recipe, "reg-2", [True, False, True, False], [False, True, True, False]
    )
    register.run(tracked_recipe, "reg-2")
    decision = promote.run(tracked_recipe, "reg-2")
    assert not decision["promoted"]
    assert "does not beat" in decision["reason"]
    assert alias_versions(tracked_recipe, CHAMPION) is None
    from malt_ops.errors import MaltError

    with pytest.raises(MaltError, match="no champion set to roll back"):
        promote.rollback(tracked_recipe)


def test_mlflow_down_does_not_lose_the_stage(recipe_file, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    recipe = load_recipe(recipe_file())
    summary = prepare.run(recipe, "offline")
    assert summary["train"] == recipe.data.train_size
    out = stage_output(recipe, "offline", "prepare")
    assert out.done()
    for name in ("problems/train.jsonl", "problems/test.jsonl", "stats.json"):
        assert out.store.exists(out.key(name)), name
    # Fails clearly: one warning line naming the stage, no traceback, outputs said to be kept.
    (warning,) = [r for r in caplog.records if "MLflow tracking of prepare" in r.getMessage()]
    assert "\n" not in warning.getMessage() and warning.exc_info is None
    assert "the stage's outputs are committed in the store" in warning.getMessage()


def test_default_store_keeps_artifacts_under_the_state_dir(recipe_file, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    recipe = load_recipe(recipe_file())
    prepare.run(recipe, "local-artifacts")
    client = MlflowClient(f"sqlite:///{Path(recipe.run.state_dir) / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(recipe.tracking.experiment)
    assert experiment.artifact_location == (Path(recipe.run.state_dir) / "mlartifacts").as_uri()
    assert list((Path(recipe.run.state_dir) / "mlartifacts").rglob("*.json"))
    assert not (workdir / "mlruns").exists()


def test_no_secret_reaches_mlflow_manifests_or_logs(
    tracked_recipe, mlflow_server, s3_env, monkeypatch, caplog
):
    sentinel = "sentinel-9f3b2c-do-not-log"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN_SENTINEL", sentinel)
    monkeypatch.setenv("HF_TOKEN", sentinel)
    prepare.run(tracked_recipe, "secrets-1")
    fake_finished_run(tracked_recipe, "secrets-2", [True] * 3, [False] * 3)
    register.run(tracked_recipe, "secrets-2")
    promote.run(tracked_recipe, "secrets-2")
    client = MlflowClient(mlflow_server["url"])
    experiment = client.get_experiment_by_name(tracked_recipe.tracking.experiment)
    seen = [caplog.text]
    for run in client.search_runs([experiment.experiment_id]):
        seen += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        for artifact in client.list_artifacts(run.info.run_id):
            if not artifact.is_dir:
                local = client.download_artifacts(run.info.run_id, artifact.path)
                seen.append(Path(local).read_text(encoding="utf-8", errors="replace"))
    for role in ROLES:
        for version in client.search_model_versions(
            f"name = '{tracked_recipe.tracking.model_prefix}-{role}'"
        ):
            seen += [json.dumps(version.tags), version.source]
    store = stage_output(tracked_recipe, "secrets-2", "prepare").store
    for key in store.list("runs"):
        if key.rsplit("/", 1)[-1].startswith("MANIFEST") or key.endswith(".json"):
            seen.append(store.read_text(key))
    blob = "\n".join(seen)
    assert "stats.json" in blob or "train" in blob  # something was actually scanned
    assert S3_SECRET_KEY not in blob
    assert sentinel not in blob


def test_credentials_in_an_unreachable_tracking_uri_are_never_printed(
    recipe_file, monkeypatch, caplog
):
    sentinel = "pw-7c1e-do-not-print"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bot:{sentinel}@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    recipe = load_recipe(recipe_file())
    prepare.run(recipe, "creds-offline")
    assert "MLflow tracking of prepare" in caplog.text and sentinel not in caplog.text
    with pytest.raises(MaltError) as caught:
        promote.rollback(recipe)
    assert "127.0.0.1:9" in str(caught.value) and sentinel not in str(caught.value)


def test_credentials_in_the_tracking_uri_are_not_logged_as_params(
    recipe_file, mlflow_server, monkeypatch
):
    sentinel = "pw-2b9d-do-not-log"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with_credentials = mlflow_server["url"].replace("://", f"://bot:{sentinel}@", 1)
    recipe = load_recipe(recipe_file(tracking={"uri": with_credentials, "experiment": "creds"}))
    prepare.run(recipe, "creds-params")
    client = MlflowClient(mlflow_server["url"])
    experiment = client.get_experiment_by_name("creds")
    params = [run.data.params for run in client.search_runs([experiment.experiment_id])]
    assert any("tracking.uri" in p for p in params)
    assert sentinel not in json.dumps(params)


def _champion_system(recipe, client) -> str:
    from malt_ops.registry import resolve_set

    return resolve_set(recipe, CHAMPION, client).version


def test_champion_trained_on_the_test_questions_is_not_compared(tracked_recipe, mlflow_server):
    client = MlflowClient(mlflow_server["url"])
    seen = ("What is 3+4?", "What is 5*6?", "What is 7-2?")
    fake_finished_run(tracked_recipe, "fair-a", [True] * 8, [False] * 8, train=seen)
    register.run(tracked_recipe, "fair-a")
    assert promote.run(tracked_recipe, "fair-a")["promoted"]
    champion = _champion_system(tracked_recipe, client)
    # Two of run b's four test questions were run a's training questions (case and spacing
    # differ): the champion would be graded on what it learned.
    test = ("what is 3+4", "  What is  5*6?", "What is 8+8?", "What is 9+9?")
    fake_finished_run(tracked_recipe, "fair-b", [True] * 8, [False] * 8, test=test)
    register.run(tracked_recipe, "fair-b")
    decision = promote.run(tracked_recipe, "fair-b")
    assert not decision["promoted"] and decision["compared"] is False
    assert decision["reason"] == (
        "not compared: the champion was trained on 2 of this run's 4 test questions"
    )
    assert _champion_system(tracked_recipe, client) == champion
    assert (
        alias_versions(tracked_recipe, CHAMPION, client)["generator"].tags["malt_ops.run_id"]
        == "fair-a"
    )
    # promotion.on_incomparable: promote replaces it anyway.
    anyway = tracked_recipe.model_copy(
        update={
            "promotion": tracked_recipe.promotion.model_copy(update={"on_incomparable": "promote"})
        }
    )
    fake_finished_run(anyway, "fair-c", [True] * 8, [False] * 8, test=test)
    register.run(anyway, "fair-c")
    decision = promote.run(anyway, "fair-c")
    assert decision["promoted"] and decision["compared"] is False
    assert "promoted anyway" in decision["reason"]
    assert _champion_system(tracked_recipe, client) == decision["challenger_system"] != champion


def test_champion_of_another_base_model_is_not_compared_nor_sampled(tracked_recipe, mlflow_server):
    from malt_ops.errors import MaltError
    from malt_ops.policy import policy_adapter_paths, resolve_policy
    from malt_ops.registry import system_model_name

    client = MlflowClient(mlflow_server["url"])
    fake_finished_run(tracked_recipe, "base-a", [True] * 8, [False] * 8)
    register.run(tracked_recipe, "base-a")
    assert promote.run(tracked_recipe, "base-a")["promoted"]
    champion = _champion_system(tracked_recipe, client)
    # Same name, other weights: what a re-quantised or fine-tuned checkpoint under one name is.
    client.set_model_version_tag(
        system_model_name(tracked_recipe), champion, "base_model_sha256", "0" * 64
    )
    fake_finished_run(tracked_recipe, "base-b", [True] * 8, [False] * 8)
    register.run(tracked_recipe, "base-b")
    decision = promote.run(tracked_recipe, "base-b")
    assert not decision["promoted"] and decision["compared"] is False
    assert decision["reason"].startswith(
        "not compared: different base model (champion sha 000000000000"
    )
    assert _champion_system(tracked_recipe, client) == champion
    with pytest.raises(MaltError, match="trained on another base model"):
        policy_adapter_paths(tracked_recipe, resolve_policy(tracked_recipe))


def _stage_runs(client, recipe, run_id: str) -> list:
    experiment = client.get_experiment_by_name(recipe.tracking.experiment)
    return [
        r
        for r in client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'"
        )
        if r.data.tags["malt_ops.kind"] == "stage"
    ]


@pytest.mark.slow  # two server starts: about 3 min on 2 cores
def test_an_mlflow_outage_mid_run_is_queued_and_logged_once_it_is_back(
    recipe_file, monkeypatch, tmp_path
):
    root = tmp_path / "mlflow"
    root.mkdir()
    port = _free_port()
    artifacts = (root / "artifacts").as_uri()
    server, url = start_mlflow_server(root, port, artifacts)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # a refused connection fails at once
    # sampling from the base model: the registry is not read (with the champion policy an
    # unreachable registry stops sample, by design)
    recipe = load_recipe(recipe_file(sampling={"policy": "adapters"}))
    try:
        prepare.run(recipe, "outage")
        stop(server)
        sampled = sample.run(recipe, "outage", backend=SeededBackend())
        assert len(queued(recipe, "outage")) == 1, "the offline stage's log waits in the store"
        server, _ = start_mlflow_server(root, port, artifacts)
        labeled = label.run(recipe, "outage")  # logs itself, then the queue
        assert queued(recipe, "outage") == []
        assert replay_queue(recipe, "outage") == (0, 0)
        client = MlflowClient(url)
        runs = _stage_runs(client, recipe, "outage")
        assert sorted(r.data.tags["malt_ops.stage"] for r in runs) == ["label", "prepare", "sample"]
        by_stage = {r.data.tags["malt_ops.stage"]: r for r in runs}
        assert labeled["questions"] == recipe.data.train_size
        assert by_stage["label"].info.status == "FINISHED"
        for stage, summary in (("sample", sampled),):
            numbers = {
                metric_name(k): float(v)
                for k, v in summary.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            logged = by_stage[stage].data.metrics
            assert numbers and {k: logged.get(k) for k in numbers} == pytest.approx(numbers), stage
            assert by_stage[stage].info.status == "FINISHED"
        # the replayed run spans the stage's work, not the replay
        manifest = stage_output(recipe, "outage", "sample", "shard-0").manifest()
        assert by_stage["sample"].info.start_time == int(manifest["started_at"] * 1000)
        assert by_stage["sample"].info.end_time == int(manifest["finished_at"] * 1000)
    finally:
        stop(server)


def test_a_log_cut_off_midway_is_redone_whole_never_twice(
    tracked_recipe, mlflow_server, monkeypatch
):
    """The server fails between the stage run's metrics and its artifacts: the run is left
    half-logged and the entry queued (in S3). The replay replaces the half run."""
    calls = {"n": 0}
    real = MlflowClient.log_artifacts

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("server went away")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_artifacts", flaky)
    prepare.run(tracked_recipe, "cut-off")
    assert len(queued(tracked_recipe, "cut-off")) == 1
    client = MlflowClient(mlflow_server["url"])
    (half,) = _stage_runs(client, tracked_recipe, "cut-off")
    assert half.info.status == "RUNNING"
    assert replay_queue(tracked_recipe, "cut-off") == (1, 0)
    assert replay_queue(tracked_recipe, "cut-off") == (0, 0)
    (whole,) = _stage_runs(client, tracked_recipe, "cut-off")
    assert whole.info.status == "FINISHED" and whole.info.run_id != half.info.run_id
    assert [a.path for a in client.list_artifacts(whole.info.run_id)] == ["stats.json"]
    assert whole.data.metrics["train_problems"] == tracked_recipe.data.train_size
    parent = client.get_run(whole.data.tags["mlflow.parentRunId"])
    for key in parent.data.metrics:  # headline metrics: one point each, whatever replayed
        assert len(client.get_metric_history(parent.info.run_id, key)) == 1, key
