"""A real prepare -> sample -> label run through the CLI with SmolLM2-135M on this CPU."""

import json
from pathlib import Path

import pytest

from malt_ops.backends import Completion, InferenceBackend
from malt_ops.chains import expand_trees
from malt_ops.config import ROLES, SamplingConfig
from malt_ops.prompts import verifier_messages
from malt_ops.tree import assign_values
from tests.conftest import commit_prepared, committed, run_cli

pytestmark = pytest.mark.model

OVERRIDES = [
    "data.train_size=2",
    "sampling.n=2",
    "sampling.m=2",
    "sampling.l=2",
    "sampling.max_new_tokens.generator=48",
    "sampling.max_new_tokens.verifier=48",
    "sampling.max_new_tokens.refiner=48",
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("run")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(
        Path("recipes/local.yaml")
        .read_text()
        .replace(".state/store", str(tmp / "store"))
        .replace("state_dir: .state", f"state_dir: {tmp / 'state'}")
    )
    sets = [arg for override in OVERRIDES for arg in ("--set", override)]
    for stage in ("prepare", "sample", "label"):
        done = run_cli(stage, "--recipe", str(recipe), "--run-id", "t1", *sets)
        assert done.returncode == 0, done.stderr[-2000:]
    return recipe, tmp / "store" / "runs" / "t1", sets


def test_tree_shape_and_rewards(sampled_run):
    _, run, _ = sampled_run
    trees = read_jsonl(committed(run, "sample", "trees/shard-0.jsonl", "shard-0"))
    assert len(trees) == 2
    for tree in trees:
        nodes = tree["nodes"]
        assert len(nodes) == 2 + 4 + 8
        roles = [n["role"] for n in nodes]
        assert (
            roles.count("generator") == 2
            and roles.count("verifier") == 4
            and roles.count("refiner") == 8
        )
        ids = {n["id"] for n in nodes}
        assert all(n["parent"] is None or n["parent"] in ids for n in nodes)
        for leaf in (n for n in nodes if n["role"] == "refiner"):
            assert leaf["reward"] == (1.0 if leaf["correct"] else 0.0)
            assert leaf["completion_tokens"] <= 49
    manifest = json.loads((run / "sample" / "MANIFEST-shard-0.json").read_text())
    assert manifest["summary"]["nodes"] == 28
    assert manifest["summary"]["generated_tokens"] > 0
    fallbacks = sum(n["fallback"] for tree in trees for n in tree["nodes"])
    assert manifest["summary"]["fallback_answer_outputs"] == fallbacks


def test_datasets_match_labels(sampled_run):
    _, run, _ = sampled_run
    trees = read_jsonl(committed(run, "sample", "trees/shard-0.jsonl", "shard-0"))
    stats = json.loads(committed(run, "label", "stats.json").read_text())
    expected_sft, expected_positive, expected_negative = {}, {}, {}
    for tree in trees:
        labels = assign_values(tree["nodes"], "global", 0.5)
        for node in tree["nodes"]:
            role = node["role"]
            bucket = expected_positive if labels[node["id"]].positive else expected_negative
            bucket[role] = bucket.get(role, 0) + 1
            if labels[node["id"]].positive and node["finished"] and node["text"].strip():
                expected_sft.setdefault(role, set()).add((tree["problem"]["id"], node["id"]))
    for role in ("generator", "verifier", "refiner"):
        sft = read_jsonl(committed(run, "label", f"datasets/{role}_sft.jsonl"))
        assert {(r["question_id"], r["node_id"]) for r in sft} == expected_sft.get(role, set())
        assert all(r["messages"][-1]["role"] == "assistant" for r in sft)
        assert stats["roles"][role]["positives"] == expected_positive.get(role, 0)
        assert stats["roles"][role]["negatives"] == expected_negative.get(role, 0)
        pairs = read_jsonl(committed(run, "label", f"datasets/{role}_dpo.jsonl"))
        assert stats["roles"][role]["pairs"] == len(pairs)
        by_question = {t["problem"]["id"]: t for t in trees}
        for pair in pairs:
            tree = by_question[pair["question_id"]]
            labels = assign_values(tree["nodes"], "global", 0.5)
            nodes = {n["id"]: n for n in tree["nodes"]}
            chosen, rejected = nodes[pair["chosen_id"]], nodes[pair["rejected_id"]]
            assert labels[chosen["id"]].positive and not labels[rejected["id"]].positive
            assert (
                chosen["parent"] == rejected["parent"]
                and chosen["role"] == rejected["role"] == role
            )
            assert pair["chosen"][0]["content"] == chosen["text"]
    # STaR: the generator's own correct, finished answers, whatever happened after them.
    star = read_jsonl(committed(run, "label", "datasets/star_sft.jsonl"))
    expected_star = {
        (t["problem"]["id"], n["id"])
        for t in trees
        for n in t["nodes"]
        if n["role"] == "generator" and n["correct"] and n["finished"] and n["text"].strip()
    }
    assert {(r["question_id"], r["node_id"]) for r in star} == expected_star
    assert stats["star"]["positives"] == len(expected_star)
    # The verifier's prompt in its SFT rows is the one it was sampled with.
    for row in read_jsonl(committed(run, "label", "datasets/verifier_sft.jsonl")):
        tree = by_question[row["question_id"]]
        nodes = {n["id"]: n for n in tree["nodes"]}
        parent = nodes[nodes[row["node_id"]]["parent"]]
        assert row["messages"][:-1] == verifier_messages(tree["problem"], parent["text"])


def test_rerun_skips_finished_stages(sampled_run):
    recipe, run, sets = sampled_run
    before = (committed(run, "sample", "trees/shard-0.jsonl", "shard-0")).read_bytes()
    done = run_cli("sample", "--recipe", str(recipe), "--run-id", "t1", *sets)
    assert done.returncode == 0
    assert "already done" in done.stderr
    assert (committed(run, "sample", "trees/shard-0.jsonl", "shard-0")).read_bytes() == before


def test_label_before_sampling_fails_clearly(sampled_run):
    recipe, _, sets = sampled_run
    done = run_cli("label", "--recipe", str(recipe), "--run-id", "t1-local", *sets)
    assert done.returncode == 2
    assert "sample shard 0 of 1 has not finished for run 't1-local'" in done.stderr
    assert "Traceback" not in done.stderr


class EchoBackend(InferenceBackend):
    """Each completion names its role, sample index and the prompt it answered."""

    tokenizer = None

    def add_adapter(self, name: str, path: str) -> None:
        raise NotImplementedError

    def generate(self, prompts, params, adapter=None, desc="generate"):
        return [
            [
                Completion(f"{desc}{k} <{messages[-1]['content']}>", 1, 1, True)
                for k in range(params.n)
            ]
            for messages in prompts
        ]


def test_every_role_sees_its_own_question_and_parents():
    # Regression: node ids repeat across trees (each has a g0), and refiners were once shown
    # the generator answer of the last question in the batch instead of their own.
    problems = [
        {"id": f"q{i}", "question": f"Question {i}?", "answer": "1", "benchmark": "gsm8k"}
        for i in range(3)
    ]
    trees = expand_trees(
        problems,
        EchoBackend(),
        SamplingConfig(n=2, m=2, l=1),
        dict.fromkeys(ROLES),
        [("sample", 0)] * len(problems),
    )
    for problem, tree in zip(problems, trees, strict=True):
        by_id = {n["id"]: n for n in tree["nodes"]}
        for node in tree["nodes"]:
            assert f"Question {problem['id'][1:]}?" in node["text"]
            if node["role"] == "refiner":
                verifier = by_id[node["parent"]]
                generator = by_id[verifier["parent"]]
                shown = f"First attempt:\n{generator['text']}\n\nCritique:\n{verifier['text']}"
                assert shown in node["text"]


def budget_trees(long_text: str) -> list[dict]:
    """One question whose first generator answer is long; every node right (all positives)."""
    problem = {"id": "q0", "question": "What is 2 + 2?", "answer": "4", "benchmark": "gsm8k"}
    short = "2 + 2 = 4.\nFinal answer: 4"
    nodes = [
        {"id": "g0", "role": "generator", "parent": None, "text": long_text, "correct": True},
        {"id": "g1", "role": "generator", "parent": None, "text": short, "correct": True},
    ]
    for g in ("g0", "g1"):
        nodes.append({"id": f"{g}.v0", "role": "verifier", "parent": g, "text": short})
        nodes.append({"id": f"{g}.v0.r0", "role": "refiner", "parent": f"{g}.v0", "text": short})
        nodes[-1]["reward"] = 1.0
    return [{"problem": problem, "nodes": nodes}]


def sampled_store(recipe_file, trees: list[dict], overrides: list[str]):
    from malt_ops.config import load_recipe
    from malt_ops.stages.common import stage_output

    recipe = load_recipe(recipe_file(), overrides)
    commit_prepared(recipe, "budget", [tree["problem"] for tree in trees])
    sampled = stage_output(recipe, "budget", "sample", unit="shard-0")
    sampled.write_jsonl("trees/shard-0.jsonl", trees)
    sampled.commit({})
    return recipe


def test_label_counts_rows_over_the_token_budget(recipe_file, model_dir):
    # Regression (issue 16 item 7): a row longer than training.<role>.max_length was truncated
    # by TRL without a word. The long generator answer is in generator_sft and star_sft, and in
    # the prompt of every verifier and refiner row of its branch.
    from mlflow import MlflowClient

    from malt_ops.models import load_tokenizer
    from malt_ops.stages import label
    from malt_ops.training import sequence_lengths

    long_text = "Two and two make four, as counting shows. " * 8 + "Final answer: 4"
    recipe = sampled_store(
        recipe_file,
        budget_trees(long_text),
        ["training.generator.max_length=160", "sampling.max_new_tokens.generator=32"],
    )
    stats = label.run(recipe, "budget")
    budget = stats["token_budget"]
    assert budget["checked"] is True
    # Expected counts from the tokenizer itself, not from the code under test.
    tokenizer = load_tokenizer(model_dir)
    datasets = committed(Path(recipe.storage.root) / "runs" / "budget", "label", "datasets")
    for role, name, column in [
        ("generator", "generator_sft", "messages"),
        ("star", "star_sft", "messages"),
        ("verifier", "verifier_sft", "messages"),
        ("verifier", "verifier_dpo", None),
    ]:
        max_length = getattr(recipe.training, role).max_length
        rows = read_jsonl(datasets / f"{name}.jsonl")
        if column:
            fulls = [sequence_lengths(tokenizer, r[column][:-1], r[column][-1:])[1] for r in rows]
        else:
            fulls = [
                max(
                    sequence_lengths(tokenizer, r["prompt"], r[side])[1]
                    for side in ("chosen", "rejected")
                )
                for r in rows
            ]
        counted = budget["roles"][role]["datasets"][name]
        assert counted["rows"] == len(rows)
        assert counted["truncated"] == sum(full > max_length for full in fulls), name
    assert budget["roles"]["generator"]["datasets"]["generator_sft"]["truncated"] == 1
    assert budget["roles"]["star"]["datasets"]["star_sft"]["truncated"] == 0  # max_length 384
    stored = json.loads((datasets.parent / "stats.json").read_text())
    assert stored["token_budget"] == budget
    client = MlflowClient(f"sqlite:///{Path(recipe.run.state_dir) / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name(recipe.tracking.experiment).experiment_id],
        filter_string="tags.`malt_ops.stage` = 'label'",
    )
    assert run.data.metrics["truncated.generator_sft"] == 1
    assert run.data.metrics["truncated.star_sft"] == 0


def test_label_refuses_a_prompt_that_leaves_no_room(recipe_file, model_dir):
    # Regression (issue 16 item 7): a refiner prompt (system + question + first attempt +
    # critique) longer than max_length minus the refiner's max_new_tokens was cut or dropped.
    from malt_ops.errors import MaltError
    from malt_ops.stages import label
    from malt_ops.stages.common import stage_output

    recipe = sampled_store(
        recipe_file,
        budget_trees("2 + 2 = 4.\nFinal answer: 4"),
        [
            "sampling.max_new_tokens.generator=16",
            "sampling.max_new_tokens.verifier=16",
            "sampling.max_new_tokens.refiner=16",
            "training.refiner.max_length=120",
        ],
    )
    with pytest.raises(MaltError) as info:
        label.run(recipe, "budget")
    message = str(info.value)
    assert "training.refiner.max_length" in message and "\n" not in message
    assert "sampling.max_new_tokens.refiner (16)" in message
    assert not stage_output(recipe, "budget", "label").done()


def test_label_without_a_tokenizer_skips_the_budget_and_counts_it(recipe_file, monkeypatch, caplog):
    # The light image has no transformers: label still writes its datasets, and says so.
    import sys

    from malt_ops.stages import label

    monkeypatch.setitem(sys.modules, "transformers", None)
    recipe = sampled_store(recipe_file, budget_trees("2 + 2 = 4.\nFinal answer: 4"), [])
    stats = label.run(recipe, "budget")
    trained_on = ["generator_sft", "verifier_sft", "verifier_dpo", "refiner_sft", "refiner_dpo"]
    datasets = committed(Path(recipe.storage.root) / "runs" / "budget", "label", "datasets")
    rows = sum(len(read_jsonl(datasets / f"{name}.jsonl")) for name in [*trained_on, "star_sft"])
    assert stats["token_budget"] == {
        "checked": False,
        "skip_reason": "transformers is not installed here (light image): no tokenizer",
        "unchecked_rows": rows,
    }
    assert rows > 0
    assert any("token budget not checked" in r.getMessage() for r in caplog.records)


def test_star_trains_on_the_base_generators_own_samples(
    recipe_file, hf_backend, model_dir, tmp_path
):
    """Issue 16 item 6: from cycle 2 the trees' generator is the champion's, so STaR rows taken
    from the trees were the champion's outputs. STaR's samples come from the base generator,
    whatever the policy, and a later cycle over the same questions reuses them."""
    from malt_ops.config import load_recipe
    from malt_ops.stages import label, prepare, sample
    from tests.conftest import random_lora

    random_lora(model_dir, tmp_path / "policy-generator")
    path = recipe_file(
        data={"train_size": 2, "test_size": 1},
        sampling={
            "n": 2,
            "m": 1,
            "l": 1,
            "temperature": 0.8,
            "policy": "adapters",
            "adapters": {"generator": str(tmp_path / "policy-generator")},
            "max_new_tokens": {"generator": 12, "verifier": 8, "refiner": 8},
        },
        tracking={"enabled": False},
    )
    recipe = load_recipe(path)
    prepare.run(recipe, "c2")
    summary = sample.run(recipe, "c2", backend=hf_backend)
    assert summary["star_source"] == "sampled"
    shard = committed(tmp_path / "store" / "runs" / "c2", "sample", "", "shard-0")
    trees = read_jsonl(shard / "trees" / "shard-0.jsonl")
    star = read_jsonl(shard / "star" / "shard-0.jsonl")
    problems = [t["problem"] for t in trees]
    base = expand_trees(
        problems,
        hf_backend,
        recipe.sampling,
        dict.fromkeys(ROLES),
        [("sample", recipe.sampling.seed)] * len(problems),
        generator_only=True,
    )

    def texts(rows):
        return [[n["text"] for n in t["nodes"] if n["role"] == "generator"] for t in rows]

    assert texts(star) == texts(base)  # the base generator's own samples
    assert texts(star) != texts(trees)  # not the policy generator's
    # Label's STaR rows are the right ones among them, never a tree's generator node.
    for tree in star:
        for node in tree["nodes"]:
            node["correct"] = node["finished"] = True
    (shard / "star" / "shard-0.jsonl").write_text("".join(json.dumps(t) + "\n" for t in star))
    datasets, _ = label.label_trees(trees, recipe.labeling, star)
    star_texts = sorted(row["messages"][-1]["content"] for row in datasets["star_sft"])
    assert star_texts == sorted(n["text"] for t in star for n in t["nodes"])
    # The next cycle over the same questions: the STaR samples come from the cache.
    prepare.run(recipe, "c3")
    assert sample.run(recipe, "c3", backend=hf_backend)["star_source"] == "cache"
