"""Answer extraction and grading: pure functions of (gold, response).

Every role prompt asks the model to end with ``Final answer: ...``; extraction takes the
last such marker, else the last ``\\boxed{...}``. MATH answers are compared with
Math-Verify, which uses signal-based timeouts, so it runs in worker processes.
"""

from __future__ import annotations

import atexit
import math
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

FINAL_MARKER = "Final answer:"

_MARKER_RE = re.compile(r"final\s+answer\s*(?:is)?\s*[:：]?\s*", re.IGNORECASE)
# Small models often write "The answer is X." or "The answer to the problem is X." instead
# of the marker they were asked for.
_FALLBACK_RE = re.compile(
    r"\banswer(?:\s+(?:to|for|of)\s+(?:the|this)\s+(?:problem|question))?\s+is\s*[:：]?\s*",
    re.IGNORECASE,
)
_PLACEHOLDER_RE = re.compile(r"[*'\"`]*<[^<>\n]{0,40}>")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_LETTER_RE = re.compile(r"(?<![A-Za-z])\(?([A-E])\)?(?![A-Za-z])")
_MAX_ANSWER_CHARS = 200
MAX_OUTPUT_CHARS = 50_000
"""A model output longer than this is degenerate (a loop, not an answer): counted by sample,
never taught by label."""


@dataclass(frozen=True)
class Grade:
    answer: str | None
    correct: bool


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        rest = text[start:].split(None, 1)
        return rest[1].split("$")[0].strip() if len(rest) > 1 else None
    depth = 0
    for index in range(brace, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : index].strip()
    return None


def _is_placeholder(answer: str) -> bool:
    """The prompt's own template ('<answer>' where ...), echoed by the model: not an answer."""
    return bool(_PLACEHOLDER_RE.match(answer.lstrip()))


def _strip_math_delimiters(line: str) -> str:
    """'$-2$', '\\(-2\\)', '\\[ -2 \\]' (closed or cut off) -> '-2'."""
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]"), ("$$", "$$"), ("$", "$")):
        if line.startswith(opener):
            line = line[len(opener) :]
            if line.endswith(closer):
                line = line[: -len(closer)]
            return line.strip()
    return line


def _answer_after(tail: str) -> str | None:
    """The answer written right after a marker: a \\boxed{} in it, else the rest of its line."""
    boxed = last_boxed(tail)
    if boxed is not None:
        return boxed or None
    line = tail.splitlines()[0].strip() if tail else ""
    line = line.strip("*\"'`").strip().rstrip(".").strip()
    line = _strip_math_delimiters(line)
    line = line.rstrip(".").strip("*\"'` ")
    return line[:_MAX_ANSWER_CHARS] or None


def extract_final_answer(text: str | None) -> str | None:
    """The answer after the last 'Final answer:' marker, else the last \\boxed{}; None if absent.

    A marker followed by the prompt's own template ('Final answer: <answer>', which small
    models echo from the instructions) is not an answer: the marker before it is read instead.
    """
    if not text or not text.strip():
        return None
    matches = []
    for pattern in (_MARKER_RE, _FALLBACK_RE):
        matches = [m for m in pattern.finditer(text) if not _is_placeholder(text[m.end() :])]
        if matches:
            break
    if matches:
        answer = _answer_after(text[matches[-1].end() :].strip())
        if answer is not None:
            return answer
    boxed = last_boxed(text)
    return boxed[:_MAX_ANSWER_CHARS] if boxed else None


def gsm8k_gold(solution: str) -> str | None:
    """Gold answer of a GSM8K solution: the text after '####', without ',' and '$'."""
    if "####" not in solution:
        return None
    value = parse_number(solution.rsplit("####", 1)[1])
    return format_number(value) if value is not None else None


def math_gold(solution: str) -> str | None:
    """Gold answer of a MATH solution: its last \\boxed{}."""
    return last_boxed(solution)


def parse_number(text: str | None) -> float | None:
    """The last number in ``text`` ('1,000' -> 1000.0, '$18.00' -> 18.0); None if there is none."""
    if not text:
        return None
    cleaned = text.replace("$", "").replace("\\!", "")
    frac = re.search(r"\\d?frac\{(-?\d+)\}\{(-?\d+)\}", cleaned)
    if frac and int(frac.group(2)) != 0:
        return int(frac.group(1)) / int(frac.group(2))
    found = _NUMBER_RE.findall(cleaned)
    if not found:
        return None
    try:
        value = float(found[-1].replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def numeric_answer(text: str | None) -> str | None:
    value = parse_number(text)
    return format_number(value) if value is not None else None


def letter_answer(text: str | None) -> str | None:
    """A multiple-choice letter A-E from an extracted answer ('(B)', 'B. bank', '\\boxed{B}')."""
    if not text:
        return None
    text = last_boxed(text) or text
    match = _LETTER_RE.search(text.strip())
    return match.group(1) if match else None


def grade_gsm8k(gold: str, response: str | None) -> Grade:
    answer = numeric_answer(extract_final_answer(response))
    gold_value = parse_number(gold)
    correct = (
        answer is not None and gold_value is not None and abs(float(answer) - gold_value) < 1e-6
    )
    return Grade(answer, correct)


def grade_csqa(gold: str, response: str | None) -> Grade:
    answer = letter_answer(extract_final_answer(response))
    return Grade(answer, answer is not None and answer == gold.strip().upper())


def _math_verify_pair(gold: str, answer: str) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$", parsing_timeout=5)
    answer_parsed = parse(f"${answer}$", parsing_timeout=5)
    if not gold_parsed or not answer_parsed:
        return gold.strip() == answer.strip()
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=5))


_POOL: ProcessPoolExecutor | None = None


def _math_pool() -> ProcessPoolExecutor:
    global _POOL
    if _POOL is None:
        import multiprocessing

        # spawn, not fork: the parent may hold torch threads, and Math-Verify needs each
        # worker's main thread for its SIGALRM timeouts.
        _POOL = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
        atexit.register(_POOL.shutdown, cancel_futures=True)
    return _POOL


def grade_math_many(golds: Sequence[str], responses: Sequence[str | None]) -> list[Grade]:
    answers = [extract_final_answer(r) for r in responses]
    todo = [(i, g, a) for i, (g, a) in enumerate(zip(golds, answers, strict=True)) if a is not None]
    verdicts = [False] * len(answers)
    if todo:
        pool = _math_pool()
        futures = [(i, pool.submit(_math_verify_pair, g, a)) for i, g, a in todo]
        for index, future in futures:
            try:
                verdicts[index] = future.result(timeout=30)
            except Exception:
                verdicts[index] = False
    return [Grade(a, v) for a, v in zip(answers, verdicts, strict=True)]


def grade_math(gold: str, response: str | None) -> Grade:
    return grade_math_many([gold], [response])[0]


_RG_SCORERS: dict[str, Any] = {}
_PLAIN_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def _same_number(gold: str, answer: str) -> bool:
    """Both are plain numbers (no units, no expression) with the same value."""
    gold, answer = gold.strip(), answer.replace(",", "").strip()
    if not (_PLAIN_NUMBER_RE.fullmatch(gold) and _PLAIN_NUMBER_RE.fullmatch(answer)):
        return False
    return abs(float(gold) - float(answer)) < 1e-9


def grade_reasoning_gym(task: str, entry: dict[str, Any], response: str | None) -> Grade:
    """Score with the task's own scorer; reward 1 only for a full score."""
    import reasoning_gym

    answer = extract_final_answer(response)
    if answer is None:
        return Grade(None, False)
    if _same_number(str(entry.get("answer", "")), answer):  # '17.0' or '1,700' for a gold '17'
        return Grade(answer, True)
    scorer = _RG_SCORERS.get(task)
    if scorer is None:
        scorer = _RG_SCORERS[task] = reasoning_gym.get_score_answer_fn(task)
    try:
        score = float(scorer(answer, entry))
    except Exception:
        score = 0.0
    return Grade(answer, score >= 1.0 - 1e-9)


def grade_many(problems: Sequence[dict[str, Any]], responses: Sequence[str | None]) -> list[Grade]:
    """Grade each response against its problem record (see malt_ops.data.Problem)."""
    grades: list[Grade | None] = [None] * len(responses)
    math_items = [i for i, p in enumerate(problems) if p["benchmark"] == "math"]
    if math_items:
        results = grade_math_many(
            [problems[i]["answer"] for i in math_items], [responses[i] for i in math_items]
        )
        for index, grade in zip(math_items, results, strict=True):
            grades[index] = grade
    for index, (problem, response) in enumerate(zip(problems, responses, strict=True)):
        if grades[index] is not None:
            continue
        benchmark = problem["benchmark"]
        if benchmark == "gsm8k":
            grades[index] = grade_gsm8k(problem["answer"], response)
        elif benchmark == "csqa":
            grades[index] = grade_csqa(problem["answer"], response)
        elif benchmark == "reasoning_gym":
            meta = problem.get("meta") or {}
            entry = {
                "question": problem["question"],
                "answer": problem["answer"],
                "metadata": meta.get("metadata", {}),
            }
            grades[index] = grade_reasoning_gym(meta["task"], entry, response)
        else:
            raise ValueError(f"unknown benchmark {benchmark!r}")
    return [g for g in grades if g is not None]
