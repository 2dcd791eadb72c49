"""Role prompts per benchmark family, as chat messages (TRL's conversational format).

Every role ends with a clearly marked ``Final answer:`` line so that an answer can be
read after each turn (turn-wise accuracy). The verifier also gives a verdict.
"""

from __future__ import annotations

from typing import Any

from malt_ops.grading import FINAL_MARKER

Messages = list[dict[str, str]]

_FORMATS = {
    "math": "the final result only (a number or expression)",
    "choice": "the letter of the correct option (A-E)",
}

_GENERATOR = (
    "You solve problems step by step. Show your reasoning briefly, then end with one line "
    "'{marker} <answer>' where <answer> is {fmt}."
)
_VERIFIER = (
    "You check another assistant's solution. Go through it step by step, point out the first "
    "mistake if there is one, and say how to fix it. End with two lines: "
    "'Verdict: correct' or 'Verdict: incorrect', then '{marker} <answer>' with the answer you "
    "believe is right, where <answer> is {fmt}."
)
_REFINER = (
    "You write the final solution. You are given a problem, a first attempt and a critique of it. "
    "Use the critique where it is right, ignore it where it is wrong, solve the problem step by "
    "step, and end with one line '{marker} <answer>' where <answer> is {fmt}."
)


def family(benchmark: str) -> str:
    return "choice" if benchmark == "csqa" else "math"


def format_question(problem: dict[str, Any]) -> str:
    if problem.get("choices"):
        options = "\n".join(f"{chr(65 + i)}. {text}" for i, text in enumerate(problem["choices"]))
        return f"{problem['question']}\n\nOptions:\n{options}"
    return problem["question"]


def _system(template: str, problem: dict[str, Any]) -> dict[str, str]:
    return {
        "role": "system",
        "content": template.format(marker=FINAL_MARKER, fmt=_FORMATS[family(problem["benchmark"])]),
    }


def _reminder(problem: dict[str, Any]) -> str:
    return f"\n\nEnd with '{FINAL_MARKER} <answer>' where <answer> is {_FORMATS[family(problem['benchmark'])]}."


def generator_messages(problem: dict[str, Any]) -> Messages:
    return [
        _system(_GENERATOR, problem),
        {"role": "user", "content": f"Problem:\n{format_question(problem)}{_reminder(problem)}"},
    ]


def verifier_messages(problem: dict[str, Any], answer: str) -> Messages:
    return [
        _system(_VERIFIER, problem),
        {
            "role": "user",
            "content": f"Problem:\n{format_question(problem)}\n\n"
            f"Solution to check:\n{answer}{_reminder(problem)}",
        },
    ]


def refiner_messages(problem: dict[str, Any], answer: str, critique: str) -> Messages:
    return [
        _system(_REFINER, problem),
        {
            "role": "user",
            "content": f"Problem:\n{format_question(problem)}\n\n"
            f"First attempt:\n{answer}\n\nCritique:\n{critique}{_reminder(problem)}",
        },
    ]


def verdict(text: str | None) -> str | None:
    """'correct', 'incorrect' or None when the verifier gave no verdict."""
    if not text:
        return None
    lowered = text.lower()
    position = lowered.rfind("verdict:")
    if position < 0:
        return None
    word = lowered[position + len("verdict:") :].strip().split()[:1]
    if word and word[0].strip(".*") in ("correct", "incorrect"):
        return word[0].strip(".*")
    return None


def render(tokenizer: Any, messages: Messages) -> str:
    """Apply the model's chat template, ready for the assistant turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
