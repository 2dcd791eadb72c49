"""The paired comparisons evaluate reports: relative gains, question-level tests, answer flips.

Each comparison in ``evaluation.comparisons`` pits a challenger setting (MALT by default)
against a reference setting on the same (seed, question) items of ``per_question.jsonl``.
Its relative gain is on the Table 1 means (mean over seeds of the per-seed accuracy), the
number the paper reports; its test is ``significance.paired_by_question``, with the question
as the unit (a question drawn under several seeds is averaged over them, not counted once per
seed). The flips say whether the trained verifier and refiner change answers for the better:
per system, the chains whose refiner turned a wrong generator answer right, or a right one
wrong.

Below the stages, so evaluate writes them and bench scripts read them back from report.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from malt_ops.config import Comparison
from malt_ops.errors import MaltError
from malt_ops.evaluation import setting_key
from malt_ops.significance import paired_by_question

TEST = "sign_flip"
"""The exact one-sided sign-flip test on per-question differences (malt_ops.significance)."""


def correctness(per_question: Iterable[dict[str, Any]], setting: str) -> dict[tuple, bool]:
    """(seed, question id) -> correct, for one Table 1 setting, from per_question.jsonl rows."""
    system, key = setting_key(setting)
    outcomes: dict[tuple, bool] = {}
    for row in per_question:
        if row["system"] != system:
            continue
        item = (row["seed"], row["question_id"])
        if item in outcomes:  # a silent overwrite would drop one of the two outcomes
            raise MaltError(
                f"per_question.jsonl lists {system} seed {item[0]} question {item[1]} twice: "
                "rerun evaluate"
            )
        outcomes[item] = bool(row[key])
    return outcomes


def relative_gain(challenger: float, reference: float) -> float | None:
    """(challenger - reference) / reference; None when the reference is 0 (no ratio exists)."""
    if reference > 0:
        return (challenger - reference) / reference
    return None


def name(comparison: Comparison) -> str:
    return f"{comparison.challenger} vs {comparison.reference}"


def compare_one(
    comparison: Comparison, means: dict[str, float], per_question: list[dict[str, Any]]
) -> dict[str, Any]:
    challenger, reference = means[comparison.challenger], means[comparison.reference]
    gain = relative_gain(challenger, reference)
    test = paired_by_question(
        correctness(per_question, comparison.challenger),
        correctness(per_question, comparison.reference),
    )
    # A zero reference has no ratio: any higher challenger then clears every margin.
    margin = gain >= comparison.min_gain if gain is not None else challenger > 0
    significant = comparison.alpha is None or test.p_value < comparison.alpha
    return {
        "name": name(comparison),
        "challenger": comparison.challenger,
        "reference": comparison.reference,
        "challenger_mean": challenger,
        "reference_mean": reference,
        "relative_gain": gain,
        "min_gain": comparison.min_gain,
        "alpha": comparison.alpha,
        "test": test.as_dict(),
        "met": challenger > reference and margin and significant,
    }


def flips(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per system, in the report's order (a list, so report.json keeps it): the refiner's
    wrong->right and right->wrong changes over the system's chains."""
    return [
        {
            "system": system,
            **counts,
            "net": counts["wrong_to_right"] - counts["right_to_wrong"],
            "more_fixed_than_broken": counts["wrong_to_right"] > counts["right_to_wrong"],
        }
        for system, counts in report["flips"].items()
    ]


def compare(
    report: dict[str, Any], per_question: list[dict[str, Any]], comparisons: list[Comparison]
) -> dict[str, Any]:
    """The "comparisons" section of evaluate's report.json.

    ``report`` is evaluate's report (its Table 1 settings and flips); ``per_question`` the
    rows of its per_question.jsonl.
    """
    means = {s["setting"]: s["mean"] for s in report["settings"]}
    tests = [compare_one(c, means, per_question) for c in comparisons]
    return {
        "test": TEST,
        "unit": "question",
        "tests": tests,
        "flips": flips(report),
        "target_met": all(t["met"] for t in tests),
    }


def metrics(section: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of a comparisons section (numbers, so runs can be charted and queried)."""
    values: dict[str, float] = {"comparisons.target_met": float(section["target_met"])}
    for t in section["tests"]:
        prefix = f"{t['challenger']}_vs_{t['reference']}"
        if t["relative_gain"] is not None:
            values[f"{prefix}.relative_gain"] = t["relative_gain"]
        values[f"{prefix}.met"] = float(t["met"])
        for key in ("p_value", "effect", "questions", "repeated_questions", "items"):
            values[f"{prefix}.{key}"] = t["test"][key]
        values[f"{prefix}.wins"] = t["test"]["wins"]
        values[f"{prefix}.losses"] = t["test"]["losses"]
    for counts in section["flips"]:
        values[f"flips.{counts['system']}.net"] = counts["net"]
    return values


def _percent(value: float | None) -> str:
    return "n/a (reference 0%)" if value is None else f"{value * 100:+.1f}%"


def format_comparisons(section: dict[str, Any]) -> str:
    """Markdown for table.md and bench reports: one gain line per comparison (the first,
    ``MALT vs SA: +X% relative``, is what readers and scripts look for), then the paired tests
    with the question-level p-value, then the flips."""
    lines = []
    for t in section["tests"]:
        target = f"target ≥ {t['min_gain'] * 100:+.0f}%" if t["min_gain"] else "target > 0"
        if t["alpha"] is not None:
            target += f", p < {t['alpha']:g}"
        lines.append(
            f"{t['name']}: {_percent(t['relative_gain'])} relative "
            f"({t['challenger_mean'] * 100:.2f} vs {t['reference_mean'] * 100:.2f}; {target}: "
            f"{'met' if t['met'] else 'not met'})."
        )
    lines += [
        "",
        "| paired test | p (question-level, one-sided) | questions | under several seeds "
        "| items | wins/losses (questions) | Δ points |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in section["tests"]:
        test = t["test"]
        lines.append(
            f"| {t['name']} | {test['p_value']:.3g} | {test['questions']} | "
            f"{test['repeated_questions']} | {test['items']} | {test['wins']}/{test['losses']} | "
            f"{test['effect'] * 100:+.2f} |"
        )
    lines += [
        "",
        "The unit is the question: its correctness is averaged over the seeds that drew it "
        "(exact sign-flip test, H1: the challenger is better).",
        "",
        "| system | wrong→right | right→wrong | net | chains |",
        "|---|---|---|---|---|",
    ]
    for f in section["flips"]:
        lines.append(
            f"| {f['system']} | {f['wrong_to_right']} | {f['right_to_wrong']} | {f['net']:+d} | "
            f"{f['chains']} |"
        )
    lines += ["", f"Comparison targets: {'met' if section['target_met'] else 'not met'}."]
    return "\n".join(lines) + "\n"
