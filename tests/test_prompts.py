"""Role prompts: each role is asked for its own job, and what its output is counted as."""

from malt_ops.grading import FINAL_MARKER, grade_many
from malt_ops.prompts import generator_messages, refiner_messages, verdict, verifier_messages
from malt_ops.stages.sample import output_counts

PROBLEM = {"id": "q", "benchmark": "gsm8k", "question": "What is 2 + 3?", "answer": "5"}
FIRST = "2 + 3 = 6.\nFinal answer: 6"
CRITIQUE = "Step 1 is wrong: 2 + 3 is 5, not 6.\nVerdict: incorrect"


def text(messages):
    return "\n".join(m["content"] for m in messages)


def test_verifier_is_asked_for_steps_and_a_verdict_not_an_answer():
    prompt = text(verifier_messages(PROBLEM, FIRST))
    assert FIRST in prompt and PROBLEM["question"] in prompt
    assert "first wrong step" in prompt
    assert prompt.rstrip().endswith("'Verdict: correct' or 'Verdict: incorrect'.")
    # Asking the verifier for the answer invited it to copy the generator's.
    assert FINAL_MARKER not in prompt.replace(FIRST, "")


def test_refiner_rewrites_from_the_critique_and_ends_with_an_answer():
    prompt = text(refiner_messages(PROBLEM, FIRST, CRITIQUE))
    assert FIRST in prompt and CRITIQUE in prompt
    assert "corrected solution" in prompt and "not from the first attempt" in prompt
    assert f"'{FINAL_MARKER} <answer>'" in prompt
    assert f"'{FINAL_MARKER} <answer>'" in text(generator_messages(PROBLEM))


def test_verdict_line_is_read():
    assert verdict(CRITIQUE) == "incorrect"
    assert verdict("No wrong step.\n**Verdict: correct**") == "correct"
    assert verdict("Step 2 looks odd.") is None


def test_a_verifier_with_a_verdict_and_no_answer_is_not_counted_answerless():
    texts = {"generator": FIRST, "verifier": CRITIQUE, "refiner": "Step 1: 2 + 3 = 5."}
    grades = grade_many([PROBLEM] * 3, list(texts.values()))
    nodes = [
        {"role": role, "text": t, "answer": g.answer, "finished": True}
        for (role, t), g in zip(texts.items(), grades, strict=True)
    ]
    counts = output_counts(nodes)
    # The refiner gave no answer; the verifier is not asked for one.
    assert counts["no_answer_outputs"] == 1
    assert counts["no_verdict_outputs"] == 0


def test_prompt_bench_summary_scores_each_chain_against_its_question():
    """bench/prompts.py summarised with the old one-argument score_question and crashed."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from prompts import summarize

    def node(answer, correct):
        return {
            "text": f"Final answer: {answer}",
            "answer": answer,
            "correct": correct,
            "finished": True,
            "completion_tokens": 4,
        }

    problems = [
        {"benchmark": "gsm8k", "question": "1+1?", "answer": "2"},
        {"benchmark": "gsm8k", "question": "2+2?", "answer": "4"},
    ]
    chains = [
        {"g": node("3", False), "v": node(None, False), "r": node("2", True)},
        {"g": node("4", True), "v": node(None, False), "r": node("4", True)},
    ]
    summary = summarize(problems, chains)
    assert summary["wrong_to_right"] == 1 and summary["right_to_wrong"] == 0
    assert summary["copies"] == 1 and summary["refiner_answers"] == 2
    assert summary["turns"][2] == 1.0
