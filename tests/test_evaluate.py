"""Evaluation scoring: votes, turn-wise accuracy, flips and the ten-setting report."""

import pytest

from malt_ops.metrics import majority_vote, mean_std
from malt_ops.stages.evaluate import (
    SETTINGS,
    build_report,
    chain_records,
    format_table,
    score_question,
)


def node(node_id, role, parent, answer, correct, tokens=10):
    return {
        "id": node_id,
        "role": role,
        "parent": parent,
        "answer": answer,
        "correct": correct,
        "completion_tokens": tokens,
    }


def tree(outcomes):
    """outcomes: per chain (g_answer, g_ok, v_answer, v_ok, r_answer, r_ok)."""
    nodes = []
    for i, (ga, gc, va, vc, ra, rc) in enumerate(outcomes):
        nodes += [
            node(f"g{i}", "generator", None, ga, gc),
            node(f"g{i}.v0", "verifier", f"g{i}", va, vc),
            node(f"g{i}.v0.r0", "refiner", f"g{i}.v0", ra, rc),
        ]
    return {"problem": {"id": "q"}, "nodes": nodes}


def test_majority_vote_and_mean_std():
    assert majority_vote(["3", "4", "4"]) == 1
    assert majority_vote(["3", None, "5"]) == 0  # tie: the earliest
    assert majority_vote([None, None]) is None
    mean, std = mean_std([0.5, 1.0])
    assert mean == 0.75 and abs(std - 0.3535533905932738) < 1e-12
    assert mean_std([0.4]) == (0.4, 0.0)


def test_score_question_votes_turns_and_flips():
    chains = chain_records(
        tree(
            [
                ("1", False, "2", True, "2", True),  # wrong -> right
                ("2", True, "2", True, "1", False),  # right -> wrong
                ("1", False, "1", False, "2", True),  # wrong -> right
            ]
        )
    )
    scored = score_question(chains)
    assert scored["generator"] is False and scored["generator_mv"] is False  # "1" wins the G vote
    assert scored["refiner"] is True and scored["refiner_mv"] is True  # "2" wins the R vote
    assert scored["turns"] == [1 / 3, 2 / 3, 2 / 3]
    assert scored["wrong_to_right"] == 2 and scored["right_to_wrong"] == 1
    assert scored["tokens"]["generator"] == 10 and scored["tokens"]["refiner_mv"] == 90


def test_report_has_all_ten_settings_and_table():
    good = score_question(chain_records(tree([("2", True, "2", True, "2", True)] * 3)))
    bad = score_question(chain_records(tree([("1", False, "1", False, "1", False)] * 3)))
    results = {
        "base": {0: [bad, bad], 1: [good, bad]},
        "star": {0: [good, bad], 1: [good, bad]},
        "malt": {0: [good, good], 1: [good, good]},
    }
    report = build_report(results, [0, 1], {"untrained": []})
    names = [s["setting"] for s in report["settings"]]
    assert names == [name for name, *_ in SETTINGS] and len(names) == 10
    by_name = {s["setting"]: s for s in report["settings"]}
    assert by_name["SA"]["per_seed"] == [0.0, 0.5]
    assert by_name["MALT"]["mean"] == 1.0 and by_name["MALT"]["std"] == 0.0
    assert by_name["STaR MA+MV"]["mean"] == 0.5
    table = format_table(report)
    assert "| MALT | 100.00 ± 0.00 |" in table and "| SA | 25.00 ± 35.36 |" in table
    assert report["turnwise"]["malt"] == [1.0, 1.0, 1.0]


@pytest.mark.model
def test_seed_results_do_not_depend_on_the_other_seeds(hf_backend):
    """seeds: [0] reproduces seed 0 of a seeds: [0, 1] run, question by question."""
    from malt_ops.config import ROLES, Recipe
    from malt_ops.data import make_problem
    from malt_ops.stages.evaluate import run_system

    questions = [
        make_problem("gsm8k", "q1", "Tom has 3 apples and buys 4 more. How many now?", "7"),
        make_problem("gsm8k", "q2", "A box holds 12 pens. How many pens in 2 boxes?", "24"),
        make_problem("gsm8k", "q3", "What is 9 + 10?", "19"),
    ]
    evaluation = {
        "votes": 2,
        "temperature": 1.0,
        "max_new_tokens": dict.fromkeys(ROLES, 10),
    }

    def per_question(seeds: list[int], subsets: dict[int, list]) -> list[dict]:
        recipe = Recipe.model_validate({"evaluation": {**evaluation, "seeds": seeds}})
        return run_system(subsets, hf_backend, dict.fromkeys(ROLES), recipe, "base")[0]

    # Seed 1 repeats question q1 (test subsets overlap across seeds) and adds another.
    both = per_question([0, 1], {0: questions[:2], 1: [questions[0], questions[2]]})
    alone = per_question([0], {0: questions[:2]})
    assert [q["question_id"] for q in alone] == ["q1", "q2"]
    assert both == alone
    # The digest covers every chain's texts, so equal digests mean equal samples.
    assert all(q["samples_sha256"] for q in alone)
