"""Answer extraction, grading and answer equivalence: pure functions of (gold, response).

Every role prompt asks the model to end with ``Final answer: ...``; extraction reads the
answer after the last such marker. Without one it falls back to the last "the answer is ..."
phrase, else the last ``\\boxed{...}``, and the grade says so (``Grade.fallback``) so that
how often the fallback decides a grade can be counted.

A numeric answer (GSM8K, and reasoning_gym tasks with a numeric gold) is the first number
of the extracted answer, so ``18 (from 9 + 9)`` and ``18 apples in 3 baskets`` read 18; a
leading sum that ends in ``=`` is skipped (``9 + 9 = 18`` reads 18). A CSQA answer is an
option letter, or the text of exactly one option. MATH answers are compared with
Math-Verify, which uses signal-based timeouts, so it runs in worker processes.

``answer_classes`` groups one question's answers with the same equality, for the vote.
"""

from __future__ import annotations

import atexit
import math
import re
from collections.abc import Callable, Sequence
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
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
# The first number-like token of an answer: a LaTeX fraction, a plain fraction, a number.
_NUMBER_RE = re.compile(
    rf"\\d?frac\{{(?P<num>-?\d+)\}}\{{(?P<den>-?\d+)\}}"
    rf"|(?P<a>-?\d+)\s*/\s*(?P<b>\d+)(?!\d|\.\d)"
    rf"|(?P<plain>{_NUM})"
)
# "9 + 9 = 18": a leading sum ending in "=" is working, its result is the answer.
_LEADING_SUM_RE = re.compile(
    rf"^\s*(?:{_NUM})(?:\s*(?:[-+*/x×÷]|\\times|\\cdot|\\div)\s*(?:{_NUM}))+\s*=\s*"
)
_CURRENCY_RE = re.compile(r"\\?[$€£¥₹]|\\!")
_LETTER_RE = re.compile(r"(?<![A-Za-z])\(?([A-E])\)?(?![A-Za-z])")
_MAX_ANSWER_CHARS = 200
MAX_OUTPUT_CHARS = 50_000
"""A model output longer than this is degenerate (a loop, not an answer): counted by sample,
never taught by label."""


@dataclass(frozen=True)
class Grade:
    answer: str | None
    correct: bool
    fallback: bool = False
    """The answer was read without a 'Final answer:' marker ('the answer is', or a \\boxed{})."""


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


def extract_answer(text: str | None) -> tuple[str | None, bool]:
    """(answer, fallback): the answer after the last 'Final answer:' marker (fallback False),
    else after the last 'the answer is' phrase, else the last \\boxed{} (fallback True).

    A marker followed by the prompt's own template ('Final answer: <answer>', which small
    models echo from the instructions) is not an answer: the marker before it is read instead.
    """
    if not text or not text.strip():
        return None, False
    for pattern, fallback in ((_MARKER_RE, False), (_FALLBACK_RE, True)):
        matches = [m for m in pattern.finditer(text) if not _is_placeholder(text[m.end() :])]
        if matches:
            answer = _answer_after(text[matches[-1].end() :].strip())
            if answer is not None:
                return answer, fallback
            break
    boxed = last_boxed(text)
    return (boxed[:_MAX_ANSWER_CHARS], True) if boxed else (None, False)


def extract_final_answer(text: str | None) -> str | None:
    """The extracted answer of ``extract_answer``, without its fallback flag."""
    return extract_answer(text)[0]


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
    """The first number of an answer; None if there is none.

    '$1,700 in total' -> 1700.0, '18 (from 9 + 9)' -> 18.0, '9 + 9 = 18 apples' -> 18.0,
    '\\frac{3}{4}' and '3/4 of it' -> 0.75. The first, not the last: words and working
    after the answer ('apples in 3 baskets') are not the answer.
    """
    if not text:
        return None
    cleaned = _CURRENCY_RE.sub("", text).replace("\u2212", "-")  # U+2212 is a minus sign
    while (leading := _LEADING_SUM_RE.match(cleaned)) is not None:
        cleaned = cleaned[leading.end() :]
    match = _NUMBER_RE.search(cleaned)
    if match is None:
        return None
    if match["plain"] is not None:
        value = float(match["plain"].replace(",", ""))
    else:
        num, den = (
            (match["num"], match["den"]) if match["num"] is not None else match.group("a", "b")
        )
        if int(den) == 0:
            return None
        value = int(num) / int(den)
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


def _normalised(text: str) -> str:
    """Case, surrounding punctuation and runs of whitespace do not matter: ' Money  Box.' ~ 'money box'."""
    return " ".join(text.split()).strip(".*\"'` ").casefold()


def csqa_letter(answer: str | None, choices: Sequence[str] | None) -> str | None:
    """The option letter an extracted CSQA answer names: the text of exactly one option
    ('bank' -> 'B'), else a letter written in it ('(B) bank', '\\boxed{B}'); None otherwise.

    An answer equal to several options (duplicate option texts) names none of them.
    """
    if not answer:
        return None
    text = _normalised(last_boxed(answer) or answer)
    same = [i for i, option in enumerate(choices or []) if _normalised(str(option)) == text]
    if len(same) == 1:
        return chr(ord("A") + same[0])
    return letter_answer(answer)


def _same_value(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) < 1e-6


def grade_gsm8k(gold: str, response: str | None) -> Grade:
    extracted, fallback = extract_answer(response)
    value = parse_number(extracted)
    answer = format_number(value) if value is not None else None
    return Grade(answer, _same_value(value, parse_number(gold)), fallback and answer is not None)


def grade_csqa(gold: str, response: str | None, choices: Sequence[str] | None = None) -> Grade:
    """Grade a CSQA response; with ``choices``, an option's text counts as its letter."""
    extracted, fallback = extract_answer(response)
    answer = csqa_letter(extracted, choices)
    correct = answer is not None and answer == gold.strip().upper()
    return Grade(answer, correct, fallback and answer is not None)


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


def _verify_pairs(pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """Math-Verify each (reference, answer) pair in the worker pool; a timeout or crash is False."""
    if not pairs:
        return []
    pool = _math_pool()
    futures = [pool.submit(_math_verify_pair, reference, answer) for reference, answer in pairs]
    verdicts = []
    for future in futures:
        try:
            verdicts.append(bool(future.result(timeout=30)))
        except Exception:
            verdicts.append(False)
    return verdicts


def grade_math_many(golds: Sequence[str], responses: Sequence[str | None]) -> list[Grade]:
    extracted = [extract_answer(r) for r in responses]
    todo = [i for i, (answer, _) in enumerate(extracted) if answer is not None]
    verdicts = [False] * len(extracted)
    results = _verify_pairs([(golds[i], extracted[i][0]) for i in todo])
    for index, verdict in zip(todo, results, strict=True):
        verdicts[index] = verdict
    return [
        Grade(answer, verdict, fallback)
        for (answer, fallback), verdict in zip(extracted, verdicts, strict=True)
    ]


def grade_math(gold: str, response: str | None) -> Grade:
    return grade_math_many([gold], [response])[0]


_RG_SCORERS: dict[str, Any] = {}
_PLAIN_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def _numeric_gold(gold: Any) -> float | None:
    """The value of a gold that is a plain number ('17', '-4.5'); None for any other gold."""
    gold = str(gold).strip()
    return float(gold) if _PLAIN_NUMBER_RE.fullmatch(gold) else None


def grade_reasoning_gym(task: str, entry: dict[str, Any], response: str | None) -> Grade:
    """A numeric gold is compared as GSM8K's is (the answer's first number: '17.0', '1,700',
    '18 (from 9 + 9)'); any other answer is scored by the task's own scorer, reward 1 only
    for a full score."""
    import reasoning_gym

    answer, fallback = extract_answer(response)
    if answer is None:
        return Grade(None, False)
    if _same_value(parse_number(answer), _numeric_gold(entry.get("answer", ""))):
        return Grade(answer, True, fallback)
    scorer = _RG_SCORERS.get(task)
    if scorer is None:
        scorer = _RG_SCORERS[task] = reasoning_gym.get_score_answer_fn(task)
    try:
        score = float(scorer(answer, entry))
    except Exception:
        score = 0.0
    return Grade(answer, score >= 1.0 - 1e-9, fallback)


def _group(present: Sequence[bool], same: Callable[[int, int], bool]) -> list[int | None]:
    """Class ids by first appearance: each item joins the first class whose first member
    (its representative) it is the same as; absent items get None."""
    representatives: list[int] = []
    classes: list[int | None] = []
    for index, here in enumerate(present):
        if not here:
            classes.append(None)
            continue
        found = next((c for c, rep in enumerate(representatives) if same(rep, index)), None)
        if found is None:
            found = len(representatives)
            representatives.append(index)
        classes.append(found)
    return classes


def answer_classes(problem: dict[str, Any], answers: Sequence[str | None]) -> list[int | None]:
    """Equivalence classes of one question's extracted answers, under the grader's equality.

    GSM8K: numeric value. reasoning_gym: numeric value when the gold is a number and the
    answer has one, else the whitespace-normalised string. CSQA: the option letter (or the
    text of one option). MATH: Math-Verify, pairwise in the worker pool. Class ids number
    the classes by their first member; an answer with nothing readable in it is None. Each
    class's first member is its representative, which the others were compared with.
    """
    benchmark = problem["benchmark"]
    if benchmark == "math":
        present = [bool(a and a.strip()) for a in answers]
        pairs = [
            (i, j)
            for j in range(len(answers))
            for i in range(j)
            if present[i] and present[j] and answers[i].strip() != answers[j].strip()
        ]
        verdicts = dict(
            zip(pairs, _verify_pairs([(answers[i], answers[j]) for i, j in pairs]), strict=True)
        )
        return _group(
            present,
            lambda i, j: answers[i].strip() == answers[j].strip() or verdicts[(i, j)],
        )
    keys: list[Any]
    if benchmark == "gsm8k":
        keys = [parse_number(a) for a in answers]
    elif benchmark == "csqa":
        keys = [csqa_letter(a, problem.get("choices")) for a in answers]
    elif benchmark == "reasoning_gym":
        # A question without a gold answer (one a user asks) votes by value where it can.
        numeric = problem["answer"] is None or _numeric_gold(problem["answer"]) is not None
        keys = []
        for answer in answers:
            value = parse_number(answer) if numeric else None
            text = " ".join(answer.split()) if answer else None
            keys.append(value if value is not None else text or None)
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}")

    def same(i: int, j: int) -> bool:
        a, b = keys[i], keys[j]
        if isinstance(a, float) and isinstance(b, float):
            return _same_value(a, b)
        return type(a) is type(b) and a == b

    return _group([k is not None for k in keys], same)


def read_answer(benchmark: str, response: str | None, choices: Sequence[str] | None) -> Grade:
    """The answer of a response to a question without a gold answer (one a user asks), read
    as the grader reads it; ``correct`` is always False: nothing to compare with."""
    extracted, fallback = extract_answer(response)
    if benchmark == "gsm8k":
        value = parse_number(extracted)
        extracted = format_number(value) if value is not None else None
    elif benchmark == "csqa":
        extracted = csqa_letter(extracted, choices)
    return Grade(extracted, False, fallback and extracted is not None)


def grade_many(problems: Sequence[dict[str, Any]], responses: Sequence[str | None]) -> list[Grade]:
    """Grade each response against its problem record (see malt_ops.data.Problem)."""
    grades: list[Grade | None] = [None] * len(responses)
    for index, (problem, response) in enumerate(zip(problems, responses, strict=True)):
        if problem.get("answer") is None:
            grades[index] = read_answer(problem["benchmark"], response, problem.get("choices"))
    math_items = [
        i for i, p in enumerate(problems) if p["benchmark"] == "math" and grades[i] is None
    ]
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
            grades[index] = grade_csqa(problem["answer"], response, problem.get("choices"))
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
