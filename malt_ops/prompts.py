"""Role prompts per benchmark family, as chat messages (TRL's conversational format).

Each role is asked to do its own job, and only that (docs/prompts.md):

- the generator solves the problem and ends with a ``Final answer:`` line;
- the verifier checks the solution step by step, names the first wrong step or says there
  is none, and ends with a ``Verdict: correct|incorrect`` line (read by :func:`verdict`).
  It is not asked to restate or give an answer: asking for one invited the verifier, and
  after it the refiner, to copy the generator's answer;
- the refiner rewrites the solution from the critique (from the first wrong step on, with
  the error fixed) and ends with a ``Final answer:`` line.
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
    "You check another assistant's solution; you do not solve the problem yourself. Go through "
    "the solution one step at a time and check each step against the problem and the steps "
    "before it. Name the first wrong step and say what is wrong in it, or say that there is "
    "no wrong step. End with one line: 'Verdict: correct' if the solution is right, or "
    "'Verdict: incorrect' if it is not."
)
_REFINER = (
    "You correct a solution. You are given a problem, a first attempt and a critique of it. "
    "If the critique names a wrong step and it is really wrong, keep the steps before it, "
    "redo that step with the error fixed and work out every later step again, so that your "
    "answer comes from the corrected steps and not from the first attempt. If the critique "
    "finds no error, check the steps yourself. Write the corrected solution step by step and "
    "end with one line '{marker} <answer>' where <answer> is {fmt}."
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


# The verdict is asked for last, in the words it must be written in: small models stop after
# the first sentence they can copy, and a critique without the line has no verdict to read.
_VERDICT_REMINDER = (
    "\n\nCheck the solution step by step: name the first wrong step and what is wrong in it, "
    "or say that every step is right. Then write the last line, exactly "
    "'Verdict: correct' or 'Verdict: incorrect'."
)


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
            f"Solution to check:\n{answer}{_VERDICT_REMINDER}",
        },
    ]


def refiner_messages(problem: dict[str, Any], answer: str, critique: str) -> Messages:
    return [
        _system(_REFINER, problem),
        {
            "role": "user",
            "content": f"Problem:\n{format_question(problem)}\n\n"
            f"First attempt:\n{answer}\n\nCritique:\n{critique}\n\n"
            f"Write the corrected solution.{_reminder(problem)}",
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
