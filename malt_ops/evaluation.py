"""Evaluation shared by the evaluate and promote stages: test subsets, chains, scores.

evaluate runs every system of a run on its test subsets; promote runs (or reads from the
evaluation cache, ``malt_ops.evaluation_cache``) the champion set on the same subsets. Both
go through :func:`run_system`, so a champion's results are comparable item by item with a
challenger's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from typing import Any

from malt_ops.backends import InferenceBackend
from malt_ops.chains import expand_trees
from malt_ops.config import Recipe, SamplingConfig
from malt_ops.errors import MaltError
from malt_ops.grading import answer_classes
from malt_ops.metrics import majority_vote
from malt_ops.prompts import verdict
from malt_ops.seeding import stable_seed
from malt_ops.storage import StageOutput, open_store
from malt_ops.table1 import SETTINGS

log = logging.getLogger("malt_ops")

SEED_BASE = "evaluate"
"""What every evaluation chain's seed starts from (with the evaluation seed): the evaluate
stage's name, kept so that results stay those of earlier malt-ops versions."""


def chain_records(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """Each independent chain (one generator sample, its verifier, its refiner) of a tree."""
    nodes = tree["nodes"]
    chains = []
    for gen in (n for n in nodes if n["role"] == "generator"):
        ver = next(n for n in nodes if n["parent"] == gen["id"])
        ref = next(n for n in nodes if n["parent"] == ver["id"])
        chains.append({"g": gen, "v": ver, "r": ref})
    return chains


def verifier_correct(chain: dict[str, Any]) -> bool:
    """Turn-wise correctness after V. The verifier is asked for a verdict, not an answer: a
    'correct' verdict stands for the generator's answer; otherwise only an answer the
    verifier states itself (a corrected one) counts, and none is wrong."""
    if verdict(chain["v"].get("text")) == "correct":
        return bool(chain["g"]["correct"])
    return bool(chain["v"]["correct"])


def same_answer(problem: dict[str, Any], first: str | None, second: str | None) -> bool:
    """Two extracted answers that the grader counts as one ('17' and '17.0' too)."""
    if first is None or second is None:
        return False
    classes = answer_classes(problem, [first, second])
    return classes[0] is not None and classes[0] == classes[1]


def score_question(
    problem: dict[str, Any], chains: list[dict[str, Any]], tie_seed: int
) -> dict[str, Any]:
    """Per-question outcomes for SA/SA+MV/MA/MA+MV, turn-wise correctness and flips.

    +MV votes on answer classes under the grader's equality (``grading.answer_classes``):
    '17' and '17.0' are one answer; a chain without an answer does not vote. The winner's
    correctness is its class's (the class's first chain's grade). A tie is broken by
    ``tie_seed`` (``seeding.stable_seed(evaluation seed, question id)``), separately per turn.
    """

    def voted(turn: str) -> bool:
        classes = answer_classes(problem, [c[turn]["answer"] for c in chains])
        winner = majority_vote(classes, seed=stable_seed(tie_seed, turn))
        return winner is not None and bool(chains[winner][turn]["correct"])

    tokens_first = sum(chains[0][t]["completion_tokens"] for t in "gvr")
    return {
        "generator": bool(chains[0]["g"]["correct"]),
        "generator_mv": voted("g"),
        "refiner": bool(chains[0]["r"]["correct"]),
        "refiner_mv": voted("r"),
        "turns": [
            sum(verifier_correct(c) if t == "v" else bool(c[t]["correct"]) for c in chains)
            / len(chains)
            for t in "gvr"
        ],
        "wrong_to_right": sum(not c["g"]["correct"] and c["r"]["correct"] for c in chains),
        "right_to_wrong": sum(c["g"]["correct"] and not c["r"]["correct"] for c in chains),
        "chains": len(chains),
        # The copy rate's parts: refiner answers equal to their own chain's generator answer.
        "copies": sum(same_answer(problem, c["g"]["answer"], c["r"]["answer"]) for c in chains),
        "refiner_answers": sum(c["r"]["answer"] is not None for c in chains),
        # Outputs of all three turns whose answer was read without a 'Final answer:' marker.
        "extraction_fallbacks": sum(bool(c[t].get("fallback")) for c in chains for t in "gvr"),
        "tokens": {
            "generator": chains[0]["g"]["completion_tokens"],
            "generator_mv": sum(c["g"]["completion_tokens"] for c in chains),
            "refiner": tokens_first,
            "refiner_mv": sum(c[t]["completion_tokens"] for c in chains for t in "gvr"),
        },
    }


def samples_digest(tree: dict[str, Any]) -> str:
    """A short hash of every sampled text of a tree: shows which runs drew the same samples."""
    texts = json.dumps([[n["id"], n["text"]] for n in tree["nodes"]]).encode()
    return hashlib.sha256(texts).hexdigest()[:16]


def run_system(
    problems_by_seed: dict[int, list[dict]],
    backend: InferenceBackend,
    adapters: dict,
    recipe: Recipe,
    desc: str,
) -> dict[int, list[dict[str, Any]]]:
    """Chains for every (seed, question) in one batched expansion; scored per question.

    Every chain is seeded from (evaluation seed, question id, node path, role), so one seed's
    results are the same whichever other seeds are evaluated with it.
    """
    ev = recipe.evaluation
    sampling = SamplingConfig(
        n=ev.votes,
        m=1,
        l=1,
        temperature=ev.temperature,
        top_p=ev.top_p,
        max_new_tokens=ev.max_new_tokens,
    )
    flat = [(seed, p) for seed, problems in problems_by_seed.items() for p in problems]
    log.info("evaluate %s: %d questions x %d chains", desc, len(flat), ev.votes)
    trees = expand_trees(
        [p for _, p in flat], backend, sampling, adapters, [(SEED_BASE, seed) for seed, _ in flat]
    )
    scored: dict[int, list[dict[str, Any]]] = {seed: [] for seed in problems_by_seed}
    for (seed, problem), tree in zip(flat, trees, strict=True):
        scored[seed].append(
            {
                "question_id": problem["id"],
                "samples_sha256": samples_digest(tree),
                **score_question(problem, chain_records(tree), stable_seed(seed, problem["id"])),
            }
        )
    return scored


SUBSET_ORDER_SEED = "malt-ops evaluation subsets"
"""Seeds the one shuffle of the test pool that every evaluation seed's subset is cut from."""


def subset_positions(pool: int, size: int, seed: int) -> list[int]:
    """Positions (in the pool sorted by question id) of evaluation seed ``seed``'s subset.

    The pool is shuffled once, by a fixed seed; seed s takes the ``size`` questions starting
    at position s x size of that order, wrapping around at its end. So seeds 0, 1, ... k-1
    draw disjoint subsets whenever the pool holds k x size questions; with a smaller pool
    each question is drawn floor or ceil(k x size / pool) times; and a seed's subset depends
    only on the pool, the size and the seed itself, never on which other seeds are run.
    """
    order = list(range(pool))
    random.Random(SUBSET_ORDER_SEED).shuffle(order)
    start = seed * size
    return [order[(start + j) % pool] for j in range(min(size, pool))]


def test_subsets(recipe: Recipe, run_id: str) -> dict[int, list[dict[str, Any]]]:
    """The test subset of each evaluation seed (the same for every system compared)."""
    prepared = StageOutput(open_store(recipe.storage.root), run_id, "prepare")
    if not prepared.done():
        raise MaltError(
            f"prepare has not finished for run '{run_id}': run `malt-ops prepare` first"
        )
    test = list(prepared.iter_jsonl("problems/test.jsonl"))
    if not test:
        raise MaltError("the test split is empty: set data.test_size or data.test_path")
    test.sort(key=lambda q: str(q["id"]))  # the draw depends on the questions, not file order
    size = recipe.evaluation.subset_size
    return {
        seed: [test[i] for i in subset_positions(len(test), size, seed)]
        for seed in recipe.evaluation.seeds
    }


def question_repeats(problems_by_seed: dict[int, list[dict[str, Any]]]) -> dict[str, int]:
    """How often questions recur across the seeds' subsets (max_repeats 1: all disjoint)."""
    drawn = Counter(q["id"] for questions in problems_by_seed.values() for q in questions)
    return {
        "distinct_questions": len(drawn),
        "items": sum(drawn.values()),
        "max_repeats": max(drawn.values(), default=0),
    }


def setting_key(setting: str) -> tuple[str, str]:
    """(system, per-question key) of a Table 1 setting name, e.g. 'MALT' -> ('malt', 'refiner_mv')."""
    for name, system, turn, vote in SETTINGS:
        if name == setting:
            return system, f"{turn}_mv" if vote else turn
    raise MaltError(
        f"'{setting}' is not a Table 1 setting (one of {', '.join(n for n, *_ in SETTINGS)})"
    )
