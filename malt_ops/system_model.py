"""The MALT system as one MLflow model (issue 19): ``<prefix>-system`` versions are pyfunc
models, written as models-from-code (``malt_ops/system_model_code.py`` is the file MLflow
loads), that answer a DataFrame of questions with the G -> V -> R chain.

What a version holds:
- ``model_config``: the base model's reference and content hash, the benchmark (it picks the
  prompts' answer format), the inference section (hf, or vllm where the user sets it), the
  chain (roles, sampling settings, number of chains, majority vote on or off), the question
  token budget and the role prompts as rendered for a placeholder question;
- ``artifacts``: the three role adapters (copied in, so the version is whole by itself);
- a signature, an input example and pip requirements pinned to the installed versions (those
  of ``requirements/lock.txt`` when installed from it), and malt_ops itself as code.

Saving needs no model load: the version is saved with ``save_model`` (which does not run the
input example) into register's store output, and the version's source points there, as the
role models' sources do.
"""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from malt_ops.config import ROLES, TRAINED, Recipe
from malt_ops.errors import MaltError

FORMAT = 1
"""model_config layout version; a loader refuses one it does not know."""
CODE_FILE = Path(__file__).with_name("system_model_code.py")
OUTPUT_COLUMNS = (
    "answer",
    "generator",
    "verifier",
    "refiner",
    "generator_answer",
    "verifier_verdict",
    "verifier_answer",
    "refiner_answer",
    "chains",
    "votes",
)
"""One row per question: the final answer (the refiners' majority vote when on), the texts of
the chain whose answer won, the answer read from each turn, the chains run and the votes the
winner got."""
EXAMPLE_QUESTION = "Calculate 12 + 30."
# What the served model needs at run time (and MLflow to serve it); pinned to what is installed.
RUNTIME_PACKAGES = (
    "mlflow",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "tokenizers",
    "pandas",
    "pydantic",
    "pyyaml",
    "math-verify",
    "reasoning-gym",
    "gguf",
)


def question_budget(recipe: Recipe) -> int:
    """The most question tokens a chain may hold: the refiner's training length less what the
    three turns may write (the longest prompt the refiner was trained to read)."""
    new = recipe.evaluation.max_new_tokens
    return recipe.training.refiner.max_length - new.generator - new.verifier - new.refiner


def system_config(recipe: Recipe, base_sha256: str) -> dict[str, Any]:
    """The ``model_config`` of a system version made from ``recipe``."""
    from malt_ops.prompts import generator_messages, refiner_messages, verifier_messages

    ev = recipe.evaluation
    placeholder = {"id": "q", "question": "<question>", "benchmark": recipe.data.benchmark}
    return {
        "format": FORMAT,
        "base_model": {**recipe.model.model_dump(mode="json"), "sha256": base_sha256},
        "benchmark": recipe.data.benchmark,
        "inference": recipe.inference.model_dump(mode="json"),
        "lora_ranks": {role: getattr(recipe.training, role).rank for role in TRAINED},
        "chain": {
            "roles": list(ROLES),
            "chains": ev.votes,
            "majority_vote": ev.votes > 1,
            "temperature": ev.temperature,
            "top_p": ev.top_p,
            "max_new_tokens": ev.max_new_tokens.model_dump(),
            "seed": 0,
        },
        "max_question_tokens": question_budget(recipe),
        "prompts": {
            "generator": generator_messages(placeholder),
            "verifier": verifier_messages(placeholder, "<generator's answer>"),
            "refiner": refiner_messages(placeholder, "<generator's answer>", "<critique>"),
        },
    }


def pip_requirements() -> list[str]:
    pinned = []
    for name in RUNTIME_PACKAGES:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return pinned


def save_system_model(path: Path, config: dict[str, Any], adapters: dict[str, Path]) -> Path:
    """Write the pyfunc of one system version to ``path`` (a new directory)."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    example = pd.DataFrame({"question": [EXAMPLE_QUESTION]})
    counts = ("chains", "votes")
    # 'question' is declared optional: MLflow's own check of a missing column answers with a
    # multi-line message, ours (_questions) with one line saying what to send.
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "question", required=False)]),
        outputs=Schema(
            [
                ColSpec("long" if c in counts else "string", c, required=False)
                for c in OUTPUT_COLUMNS
            ]
        ),
    )
    import json
    import shutil
    import tempfile
    import uuid

    import yaml

    with tempfile.TemporaryDirectory() as scratch:
        # malt_ops's sources only: compiled caches differ from process to process
        code = Path(scratch) / "malt_ops"
        shutil.copytree(Path(__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(CODE_FILE),
            artifacts={role: str(adapters[role]) for role in ROLES},
            model_config=config,
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(),
            code_paths=[str(code)],
        )
    # A rerun of register (after a kill) must write the same bytes: MLmodel's creation time,
    # random uuid and source paths give way to a uuid of what the model is made of.
    mlmodel = path / "MLmodel"
    meta = yaml.safe_load(mlmodel.read_text())
    meta.pop("utc_time_created", None)
    # where the adapters were copied from (a scratch or store path) is not part of the model
    for entry in meta["flavors"]["python_function"].get("artifacts", {}).values():
        entry.pop("uri", None)
    contents = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p != mlmodel):
        contents.update(file.relative_to(path).as_posix().encode() + file.read_bytes())
    meta["model_uuid"] = uuid.uuid5(uuid.NAMESPACE_URL, contents.hexdigest()).hex
    mlmodel.write_text(yaml.safe_dump(meta, sort_keys=True))
    return path


class RequestError(ValueError):
    """A request the system cannot answer as sent: one line saying what to fix."""


def _questions(model_input: Any) -> list[str]:
    import pandas as pd

    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame) or "question" not in model_input.columns:
        raise RequestError("the request needs a 'question' column (one question per row)")
    questions = []
    for index, question in enumerate(model_input["question"].tolist()):
        if not isinstance(question, str) or not question.strip():
            raise RequestError(f"row {index}: the question is empty; send the question's text")
        questions.append(question.strip())
    if not questions:
        raise RequestError("the request holds no rows: send at least one question")
    return questions


def question_id(question: str) -> str:
    """A question's id: the same text is the same question, and so gets the same seeds."""
    return "ask-" + hashlib.sha256(question.encode()).hexdigest()[:16]


class MaltSystem:
    """The chain behind one system version. A plain class, wrapped by the pyfunc in
    system_model_code.py and used directly by ``malt-ops answer --run-id``."""

    def __init__(self, config: dict[str, Any], adapters: dict[str, str]) -> None:
        from malt_ops.backends import create_backend
        from malt_ops.config import SamplingConfig

        if config.get("format") != FORMAT:
            raise MaltError(
                f"system model format {config.get('format')!r} is not {FORMAT}: load it with "
                "the malt-ops version that registered it"
            )
        self.config = config
        recipe = Recipe.model_validate(
            {
                "model": {k: v for k, v in config["base_model"].items() if k != "sha256"},
                "inference": config["inference"],
                "training": {role: {"rank": rank} for role, rank in config["lora_ranks"].items()},
            }
        )
        self.backend = create_backend(recipe)
        self.adapters = {}
        for role in ROLES:
            name = f"system-{role}"
            self.backend.add_adapter(name, adapters[role])
            self.adapters[role] = name
        chain = config["chain"]
        self.sampling = SamplingConfig(
            n=chain["chains"],
            m=1,
            l=1,
            temperature=chain["temperature"],
            top_p=chain["top_p"],
            max_new_tokens=chain["max_new_tokens"],
        )

    def _check_budget(self, questions: list[str]) -> None:
        tokenizer = self.backend.tokenizer
        budget = self.config["max_question_tokens"]
        if tokenizer is None:
            return
        for index, question in enumerate(questions):
            tokens = len(tokenizer(question)["input_ids"])
            if tokens > budget:
                raise RequestError(
                    f"row {index}: the question is {tokens} tokens, over this system's budget "
                    f"of {budget}: shorten it"
                )

    def answer(self, questions: list[str]) -> list[dict[str, Any]]:
        from malt_ops.chains import expand_trees
        from malt_ops.evaluation import chain_records
        from malt_ops.grading import answer_classes
        from malt_ops.metrics import majority_vote
        from malt_ops.prompts import verdict
        from malt_ops.seeding import stable_seed

        self._check_budget(questions)
        benchmark = self.config["benchmark"]
        seed = self.config["chain"]["seed"]
        problems = [
            {"id": question_id(q), "question": q, "answer": None, "benchmark": benchmark}
            for q in questions
        ]
        trees = expand_trees(
            problems, self.backend, self.sampling, self.adapters, [("answer", seed)] * len(problems)
        )
        rows = []
        for problem, tree in zip(problems, trees, strict=True):
            chains = chain_records(tree)
            classes = answer_classes(problem, [c["r"]["answer"] for c in chains])
            winner = 0
            if self.config["chain"]["majority_vote"]:
                voted = majority_vote(classes, seed=stable_seed(seed, problem["id"]))
                winner = 0 if voted is None else voted
            chain = chains[winner]
            said = verdict(chain["v"]["text"])
            rows.append(
                {
                    "answer": chain["r"]["answer"],
                    "generator": chain["g"]["text"],
                    "verifier": chain["v"]["text"],
                    "refiner": chain["r"]["text"],
                    "generator_answer": chain["g"]["answer"],
                    "verifier_verdict": said,
                    # a 'correct' verdict stands for the generator's answer (evaluation's rule)
                    "verifier_answer": (
                        chain["g"]["answer"] if said == "correct" else chain["v"]["answer"]
                    ),
                    "refiner_answer": chain["r"]["answer"],
                    "chains": len(chains),
                    "votes": sum(c is not None and c == classes[winner] for c in classes),
                }
            )
        return rows


def local_system(recipe: Recipe, adapters: dict[str, Path]) -> MaltSystem:
    """A run's system straight from its committed adapters (``malt-ops answer --run-id``)."""
    from malt_ops.models import base_model_sha256

    config = system_config(recipe, base_model_sha256(recipe.model))
    return MaltSystem(config, {role: str(path) for role, path in adapters.items()})


def read_questions(questions: list[str], file: str | None) -> list[str]:
    """The questions given on the command line, then those of a JSONL file (one object with a
    ``question`` per line); one line naming the bad line of the file."""
    import json

    asked = list(questions)
    if file:
        path = Path(file)
        if not path.is_file():
            raise MaltError(f"--file {file}: no such file")
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("question"), str):
                raise MaltError(
                    f"--file {file} line {number}: expected a JSON object with a 'question' "
                    'string, e.g. {"question": "Calculate 12 + 30."}'
                )
            asked.append(record["question"])
    if not asked:
        raise MaltError("give a question (\"malt-ops answer 'Calculate 12 + 30.'\") or --file")
    return asked


def registered_answers(recipe: Recipe, alias: str, questions: list[str]) -> list[dict[str, Any]]:
    """The rows of ``models:/<prefix>-system@<alias>`` for ``questions``."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from malt_ops.errors import redact
    from malt_ops.registry import adapter_dir, resolve_set, system_model_name
    from malt_ops.tracking import client_for

    client = client_for(recipe)
    found = resolve_set(recipe, alias, client)
    name = system_model_name(recipe)
    if found is None:
        hint = " or --alias challenger" if alias == "champion" else ""
        raise MaltError(
            f"no {alias} in the registry at {redact(client.tracking_uri)} ({name}@{alias}): "
            f"run `malt-ops run` first, or give --run-id{hint}"
        )
    # The version the alias named when it was resolved, read through this recipe's client:
    # mlflow.set_tracking_uri / set_registry_uri would also change the process's environment.
    source = client.get_model_version(name, found.version).source
    model = mlflow.pyfunc.load_model(str(adapter_dir(source, required="MLmodel")))
    try:
        return model.predict(pd.DataFrame({"question": questions})).to_dict("records")
    except MlflowException as exc:
        raise MaltError(exc.message) from None


def check_champion(recipe: Recipe) -> dict[str, Any]:
    """Load ``<prefix>-system@champion`` and ask it promotion.check_question: a champion that
    does not load, or answers without every turn of its chain, fails the check."""
    question = recipe.promotion.check_question
    (row,) = registered_answers(recipe, "champion", [question])
    missing = [role for role in ROLES if not str(row.get(role) or "").strip()]
    if missing:
        raise MaltError(
            f"the champion answered {question!r} without a {', '.join(missing)} turn: check "
            "its adapters"
        )
    return row


def run_answers(recipe: Recipe, run_id: str, questions: list[str]) -> list[dict[str, Any]]:
    """The rows of a run's own trained adapters (``--run-id``), without the registry."""
    from malt_ops.stages.common import trained_adapter

    adapters = {}
    for role in ROLES:
        unit = trained_adapter(recipe, run_id, role)
        if unit is None:
            raise MaltError(
                f"run '{run_id}' has no trained {role} adapter: run `malt-ops train --role "
                f"{role} --run-id {run_id}` (or the whole `malt-ops run`) first"
            )
        adapters[role] = unit.local_dir(f"adapters/{role}")
    try:
        return local_system(recipe, adapters).answer(questions)
    except RequestError as exc:
        raise MaltError(str(exc)) from None


def format_answer(question: str, row: dict[str, Any]) -> str:
    """What `malt-ops answer` prints for one question: each turn, then the final answer."""

    def said(value: Any) -> str:
        return "none" if value is None else str(value)

    lines = [f"Question: {question}"]
    turns = (
        ("generator", f"answer: {said(row['generator_answer'])}"),
        ("verifier", f"verdict: {said(row['verifier_verdict'])}"),
        ("refiner", f"answer: {said(row['refiner_answer'])}"),
    )
    for role, note in turns:
        lines += [f"--- {role} ({note})", (row[role] or "").strip()]
    lines.append(
        f"=== Final answer: {said(row['answer'])} ({row['votes']} of {row['chains']} chains agree)"
    )
    return "\n".join(lines)
