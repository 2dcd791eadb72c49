"""Graders on real benchmark rows and on tricky answers."""

import pytest

from malt_ops.config import DataConfig
from malt_ops.data import load_splits, make_problem
from malt_ops.grading import (
    answer_classes,
    extract_final_answer,
    grade_csqa,
    grade_gsm8k,
    grade_many,
    grade_math,
    grade_math_many,
    gsm8k_gold,
    last_boxed,
)


@pytest.fixture(scope="module")
def gsm8k():
    return load_splits(DataConfig(benchmark="gsm8k", test_size=20))


@pytest.fixture(scope="module")
def math500():
    return load_splits(DataConfig(benchmark="math", train_size=10, test_size=20))


@pytest.fixture(scope="module")
def csqa():
    return load_splits(DataConfig(benchmark="csqa", test_size=20))


def test_gsm8k_real_rows(gsm8k):
    for problem in gsm8k.test:
        gold = problem["answer"]
        assert grade_gsm8k(gold, f"Some steps.\nFinal answer: {gold}").correct
        assert not grade_gsm8k(gold, f"Final answer: {float(gold) + 1}").correct
        assert not grade_gsm8k(gold, "I am not sure.").correct


def test_gsm8k_gold_and_tricky_numbers():
    assert gsm8k_gold("He pays 500 + 500 = <<500+500=1000>>1000\n#### 1,000") == "1000"
    assert grade_gsm8k("1000", "Final answer: 1,000").correct
    assert grade_gsm8k("18", "Final answer: $18.00").correct
    assert grade_gsm8k("18", "so the total is 18 dollars.\nFinal answer: **18**").correct
    assert grade_gsm8k("-4", "The answer is -4.").correct
    assert not grade_gsm8k("18", "Final answer: 81").correct
    assert grade_gsm8k(
        "7", "Final answer: 3\nWait, recheck.\nFinal answer: 7"
    ).correct  # last marker wins


def test_math_real_rows_with_boxed_gold(math500):
    problems = math500.test
    assert all(p["answer"] for p in problems)
    grades = grade_math_many(
        [p["answer"] for p in problems],
        [f"Work.\nFinal answer: \\boxed{{{p['answer']}}}" for p in problems],
    )
    assert all(g.correct for g in grades)
    wrong = grade_math_many([p["answer"] for p in problems[:5]], ["Final answer: 123456789"] * 5)
    assert not any(g.correct for g in wrong)


def test_math_equivalent_forms():
    assert grade_math("\\frac{1}{2}", "Final answer: 0.5").correct
    assert grade_math("\\frac{1}{2}", "so \\boxed{\\frac12}").correct
    assert grade_math("\\left( 3, \\frac{\\pi}{2} \\right)", "Final answer: (3, \\pi/2)").correct
    assert not grade_math("\\frac{1}{2}", "Final answer: \\frac{1}{3}").correct
    assert not grade_math("2", "no answer here").correct


def test_csqa_real_rows(csqa):
    for problem in csqa.test:
        gold = problem["answer"]
        assert grade_csqa(gold, f"Reasoning.\nFinal answer: {gold}").correct
        assert grade_csqa(
            gold, f"Final answer: ({gold}) {problem['choices'][ord(gold) - 65]}"
        ).correct
        other = "A" if gold != "A" else "B"
        assert not grade_csqa(gold, f"Final answer: {other}").correct


def test_csqa_boxed_letter():
    assert grade_csqa("B", "The best option is \\boxed{B}.").correct
    assert not grade_csqa("B", "Final answer: banana").correct


def test_extraction():
    assert extract_final_answer("Final answer: 42.") == "42"
    assert extract_final_answer("FINAL ANSWER: \\boxed{x^2}") == "x^2"
    assert extract_final_answer("") is None
    assert extract_final_answer("   \n ") is None
    assert extract_final_answer("no marker") is None
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{3}") == "3"
    assert (
        last_boxed("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}")
        == "\\left( 3, \\frac{\\pi}{2} \\right)"
    )
    assert extract_final_answer("x" * 100_000) is None  # a 100k-character rambling output


def test_extraction_skips_the_prompt_template_echoed_by_the_model():
    # Small models repeat the instruction ("End with 'Final answer: <answer>' where ...")
    # after their answer, or instead of one: the template is never the answer.
    echo = "End with 'Final answer: <answer>' where <answer> is the final result only."
    assert extract_final_answer(f"3 + 4 = 7\nFinal answer: 7\n{echo}") == "7"
    assert extract_final_answer(echo) is None
    assert extract_final_answer(f"{echo}\nThe answer is 12.") == "12"
    assert extract_final_answer("The answer to the problem is 11.") == "11"
    assert extract_final_answer("The answer to this question is -3.") == "-3"
    assert extract_final_answer("**Final answer:** <answer>\n\\boxed{5}") == "5"
    assert grade_gsm8k("7", f"Final answer: 7\n{echo}").correct


def test_extraction_strips_inline_math_delimiters():
    assert extract_final_answer("The final answer is \\(-2\\).") == "-2"
    assert extract_final_answer("The final answer is \\(-2") == "-2"  # cut off at the token limit
    assert extract_final_answer("Final answer: $5$") == "5"
    assert extract_final_answer("Final answer: \\[ 3/4 \\]") == "3/4"


def test_reasoning_gym_uses_task_scorer():
    rg = load_splits(
        DataConfig(benchmark="reasoning_gym", task="basic_arithmetic", train_size=5, test_size=2)
    )
    problem = rg.train[0]
    good, bad = grade_many(
        [problem, problem], [f"Final answer: {problem['answer']}", "Final answer: 99999"]
    )
    assert good.correct and not bad.correct


def test_reasoning_gym_numeric_answer_in_another_form():
    rg = load_splits(
        DataConfig(benchmark="reasoning_gym", task="basic_arithmetic", train_size=5, test_size=2)
    )
    problem = {**rg.train[0], "answer": "-84"}
    same, wrong, text = grade_many(
        [problem] * 3, ["Final answer: -84.0", "Final answer: -83.0", "Final answer: minus 84"]
    )
    assert same.correct and not wrong.correct
    assert not text.correct  # no number in it: left to the task's own scorer


def test_gsm8k_takes_the_first_number_after_the_marker():
    # Issue 16 item 2: the last number on the answer line was read ("9", "3").
    assert grade_gsm8k("18", "9 + 9 = 18\nFinal answer: 18 (from 9 + 9)").correct
    assert grade_gsm8k("18", "Final answer: 18 apples in 3 baskets").correct
    assert grade_gsm8k("1700", "Final answer: $1,700 in total, i.e. 2 payments").correct
    assert grade_gsm8k("-4.5", "Final answer: -4.5 degrees, down 3").correct
    assert grade_gsm8k("0.75", "Final answer: 3/4 of the cake").correct
    assert grade_gsm8k("18", "Final answer: 9 + 9 = 18 apples").correct  # the result of a sum
    assert grade_gsm8k("18", "Final answer: \\boxed{18} (9 + 9)").correct
    assert not grade_gsm8k("3", "Final answer: 18 apples in 3 baskets").correct
    assert gsm8k_gold("#### $1,700") == "1700"


def test_gsm8k_fallback_without_a_marker_is_kept_and_flagged():
    marked = grade_gsm8k("18", "Final answer: 18")
    phrase = grade_gsm8k("18", "So the answer is 18 apples.")
    boxed = grade_gsm8k("18", "9 + 9 = \\boxed{18}")
    assert marked.correct and not marked.fallback
    assert phrase.correct and phrase.fallback
    assert boxed.correct and boxed.fallback
    assert not grade_gsm8k("18", "no answer at all").fallback  # nothing was extracted


def _csqa_problem(gold: str, choices: list[str]) -> dict:
    return make_problem("csqa", "q1", "Where do you keep money?", gold, choices)


def test_csqa_answer_given_as_option_text():
    # Issue 16 item 3: "Final answer: bank" with option B "bank" graded wrong.
    choices = ["river", "bank", "Money Box", "wallet", "purse"]
    problem = _csqa_problem("B", choices)
    texts = ["Final answer: bank", "Final answer: **  BANK. **", "Final answer: \\boxed{bank}"]
    grades = grade_many([problem] * len(texts), texts)
    assert [(g.answer, g.correct) for g in grades] == [("B", True)] * len(texts)
    money_box = grade_csqa("C", "Final answer: money   box", choices)
    assert money_box.answer == "C" and money_box.correct
    # No option matches, or several do: stays wrong.
    assert not grade_csqa("B", "Final answer: piggy bank", choices).correct
    twice = ["bank", "river", "Bank", "wallet", "purse"]
    assert not grade_csqa("A", "Final answer: bank", twice).correct
    assert grade_csqa("B", "Final answer: (B) bank", choices).correct  # a letter still counts


def test_reasoning_gym_numeric_gold_reads_the_first_number():
    rg = load_splits(
        DataConfig(benchmark="reasoning_gym", task="basic_arithmetic", train_size=5, test_size=2)
    )
    problem = {**rg.train[0], "answer": "18"}
    first, words, wrong = grade_many(
        [problem] * 3,
        ["Final answer: 18 (from 9 + 9)", "Final answer: 18 apples", "Final answer: 9 + 9"],
    )
    assert first.correct and words.correct and not wrong.correct


def test_answer_classes_use_the_graders_equality():
    gsm = make_problem("gsm8k", "g", "How many?", "17")
    assert answer_classes(gsm, ["5", "17", "17.0", None, "$17"]) == [0, 1, 1, None, 1]
    csqa = _csqa_problem("B", ["river", "bank", "money box"])
    assert answer_classes(csqa, ["B", "bank", "(A) river", None, "nothing"]) == [
        0,
        0,
        1,
        None,
        None,
    ]
    rg = make_problem("reasoning_gym", "r", "1+1?", "2", meta={"task": "basic_arithmetic"})
    assert answer_classes(rg, ["2.0", "2 (1 + 1)", "3", "two", "two "]) == [0, 0, 1, 2, 2]
    text_gold = make_problem("reasoning_gym", "w", "Sort", "a, b", meta={"task": "word_sorting"})
    assert answer_classes(text_gold, ["a, b", "a,  b", "A, b"]) == [0, 0, 1]
    math = make_problem("math", "m", "Half?", "\\frac{1}{2}")
    assert answer_classes(math, ["0.5", "\\frac12", "1/3", None, "\\dfrac{1}{2}"]) == [
        0,
        0,
        1,
        None,
        0,
    ]
