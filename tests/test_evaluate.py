"""Evaluation scoring: votes, turn-wise accuracy, flips and the ten-setting report."""

from malt_ops.metrics import majority_vote, mean_std
from malt_ops.stages.evaluate import (
    SETTINGS,
    build_report,
    chain_records,
    format_table,
    score_question,
    verifier_correct,
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


def test_after_verifier_is_the_endorsed_or_stated_answer():
    def chain(g_ok, v_text, v_answer, v_ok):
        return {
            "g": {"answer": "2" if g_ok else "1", "correct": g_ok},
            "v": {"text": v_text, "answer": v_answer, "correct": v_ok},
        }

    # A 'correct' verdict stands for the generator's answer, right or wrong.
    assert verifier_correct(chain(True, "No wrong step.\nVerdict: correct", None, False))
    assert not verifier_correct(chain(False, "No wrong step.\nVerdict: correct", None, False))
    # 'incorrect' without an answer of its own says nothing right; with a corrected one, it counts.
    assert not verifier_correct(chain(True, "Step 1 is wrong.\nVerdict: incorrect", None, False))
    assert verifier_correct(chain(False, "Verdict: incorrect\nFinal answer: 2", "2", True))


def test_copy_rate_counts_refiner_answers_equal_to_their_generator():
    chains = chain_records(
        tree(
            [
                ("17", True, None, False, "17.0", True),  # copied (the same number)
                ("5", False, None, False, "17", True),  # changed
                ("5", False, None, False, None, False),  # no refiner answer: not counted
            ]
        )
    )
    scored = score_question(chains)
    assert scored["copies"] == 1 and scored["refiner_answers"] == 2
    report = build_report(
        {"base": {0: [scored]}, "star": {0: [scored]}, "malt": {0: [scored]}}, [0], {}
    )
    assert report["copying"]["malt"] == {"copies": 1, "refiner_answers": 2, "rate": 0.5}
    assert "| R copies G % |" in format_table(report) and "| 50.0 |" in format_table(report)
