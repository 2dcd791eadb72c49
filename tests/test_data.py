"""Loaders: packaged copies, files, bad rows counted, limits and seeds."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from malt_ops.config import DataConfig
from malt_ops.data import load_splits
from malt_ops.errors import MaltError


def test_packaged_sizes_and_records():
    gsm = load_splits(DataConfig(benchmark="gsm8k"))
    assert len(gsm.train) + len(gsm.test) == 1319
    assert not {p["id"] for p in gsm.train} & {p["id"] for p in gsm.test}
    math = load_splits(DataConfig(benchmark="math"))
    assert len(math.test) == 500
    assert len(math.train) == 4500  # MATH test (5,000) minus MATH-500
    assert not {p["question"] for p in math.train} & {p["question"] for p in math.test}
    csqa = load_splits(DataConfig(benchmark="csqa"))
    assert len(csqa.train) + len(csqa.test) == 1221
    record = csqa.test[0]
    assert set(record) == {"id", "question", "answer", "benchmark", "choices", "meta"}
    assert record["answer"] in "ABCDE" and len(record["choices"]) == 5


def test_limit_and_seed_are_reproducible():
    a = load_splits(DataConfig(benchmark="gsm8k", train_size=5, test_size=3, seed=1))
    b = load_splits(DataConfig(benchmark="gsm8k", train_size=5, test_size=3, seed=1))
    c = load_splits(DataConfig(benchmark="gsm8k", train_size=5, test_size=3, seed=2))
    assert [p["id"] for p in a.train] == [p["id"] for p in b.train]
    assert len(a.train) == 5 and len(a.test) == 3
    assert [p["id"] for p in a.train] != [p["id"] for p in c.train]


def test_reasoning_gym_task_and_config():
    splits = load_splits(
        DataConfig(
            benchmark="reasoning_gym",
            task="basic_arithmetic",
            train_size=6,
            test_size=4,
            task_config={"min_terms": 2, "max_terms": 2},
        )
    )
    assert len(splits.train) == 6
    assert all(p["meta"]["task"] == "basic_arithmetic" for p in splits.train)
    assert not {p["question"] for p in splits.train} & {p["question"] for p in splits.test}
    with pytest.raises(MaltError, match="not a reasoning-gym task"):
        load_splits(DataConfig(benchmark="reasoning_gym", task="no_such_task"))
    with pytest.raises(MaltError, match="task_config"):
        load_splits(
            DataConfig(
                benchmark="reasoning_gym",
                task="basic_arithmetic",
                task_config={"no_such_option": 1},
            )
        )


def test_reasoning_gym_validation_split_is_disjoint_from_train_and_test():
    base = {
        "benchmark": "reasoning_gym",
        "task": "basic_arithmetic",
        "train_size": 20,
        "test_size": 20,
        "task_config": {"min_terms": 2, "max_terms": 2, "max_digits": 1},
    }
    test = load_splits(DataConfig(**base))
    validation = load_splits(DataConfig(**base, eval_split="validation"))
    assert [p["id"] for p in validation.train] == [p["id"] for p in test.train]
    held = {p["question"] for p in test.train} | {p["question"] for p in test.test}
    assert validation.test and not held & {p["question"] for p in validation.test}
    assert all("-validation-" in p["id"] for p in validation.test)
    # One-digit sums repeat: the overlap is dropped and counted, never silently kept.
    assert validation.skipped["validation question also in train or test"] > 0
    with pytest.raises(ValueError, match="reasoning_gym only"):
        DataConfig(benchmark="gsm8k", eval_split="validation")


def test_jsonl_file_with_bad_rows_counts_skips(tmp_path):
    rows = [
        {"id": "a", "question": "What is 2+2?", "answer": "#### 4"},
        {"id": "b", "question": "", "answer": "#### 1"},
        {"id": "c", "question": "Q?"},
        {"id": "a", "question": "Duplicate?", "answer": "#### 3"},
        {"id": "d", "question": "Unparseable gold?", "answer": "#### lots"},
        {"id": "e", "question": 12, "answer": "#### 1"},
        {"id": "f", "question": "What is 10*10?", "answer": "100"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits = load_splits(DataConfig(benchmark="gsm8k", source="file", train_path=str(path)))
    assert [p["id"] for p in splits.train] == ["a", "f"]
    assert splits.train[0]["answer"] == "4"
    assert splits.skipped == {
        "missing question": 1,
        "question is not text": 1,
        "missing gold answer": 1,
        "duplicate id": 1,
        "gold answer does not parse": 1,
    }


def test_parquet_file_with_field_map(tmp_path):
    path = tmp_path / "test.parquet"
    pq.write_table(
        pa.table({"qid": ["x1", "x2"], "problem": ["1+1?", "2+2?"], "gold": ["2", "4"]}), path
    )
    cfg = DataConfig(
        benchmark="gsm8k",
        source="file",
        test_path=str(path),
        fields={"id": "qid", "question": "problem", "answer": "gold"},
    )
    splits = load_splits(cfg)
    assert [p["id"] for p in splits.test] == ["x1", "x2"] and splits.test[1]["answer"] == "4"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"id": 1, "question": "q", "answer": "1"}\n{broken\n', "line 2: not valid JSON"),
        (b'{"id": 1, "question": "q\xff\xfe", "answer": "1"}\n', "line 1: not UTF-8"),
        (b"[1, 2]\n", "line 1: expected a JSON object"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(MaltError, match=needle):
        load_splits(DataConfig(benchmark="gsm8k", source="file", train_path=str(path)))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(MaltError, match="does not exist"):
        load_splits(
            DataConfig(benchmark="gsm8k", source="file", train_path=str(tmp_path / "none.jsonl"))
        )


def test_question_normalisation():
    from malt_ops.data import normalise_question

    assert (
        normalise_question("  What is\n 2+2?  ")
        == normalise_question("what is 2+2")
        == ("what is 2+2")
    )
    assert normalise_question("«Who?»") == "who"
    assert normalise_question("2+2") != normalise_question("2-2")


def test_train_test_overlap_is_refused_at_plan_and_at_prepare(recipe_file, tmp_path):
    from types import SimpleNamespace

    from malt_ops.config import load_recipe
    from malt_ops.orchestration import plan_run
    from malt_ops.stages import prepare

    rows = {
        "train": [("t1", "What is 3+4?"), ("t2", "What is 5*6?")],
        "test": [("s1", "  what is 5*6 "), ("s2", "What is 9-1?")],  # s1 is t2 again
    }
    paths = {}
    for split, items in rows.items():
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text(
            "".join(json.dumps({"id": i, "question": q, "answer": "1"}) + "\n" for i, q in items)
        )
    path = recipe_file(
        data={
            "benchmark": "gsm8k",
            "source": "file",
            "train_path": str(paths["train"]),
            "test_path": str(paths["test"]),
            "train_size": None,
            "test_size": None,
        }
    )
    context = {
        "params": {"recipe": str(path), "run_id": "overlap", "overrides": []},
        "dag_run": SimpleNamespace(run_id="manual__overlap"),
    }
    for attempt in (lambda: plan_run(context), lambda: prepare.run(load_recipe(path), "overlap")):
        with pytest.raises(MaltError) as refused:
            attempt()
        line = str(refused.value)
        assert "\n" not in line and "1 of the 2 test questions" in line and "s1" in line, line
