"""evaluate: the paper's Table 1 settings on random test subsets, over several seeds.

Three systems are run as ``votes`` independent G -> V -> R chains per question:
base (untrained, role prompts), STaR (the STaR generator adapter in every role) and
MALT (the trained role adapters). From the same chains:
SA = the first chain's generator answer, SA+MV = majority vote of the generator answers,
MA = the first chain's refiner answer, MA+MV = majority vote of the refiner answers.
Then the paired comparisons of ``evaluation.comparisons`` (malt_ops.comparisons): relative
gains, question-level tests and answer flips, in report.json, table.md and MLflow metrics.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from malt_ops.backends import InferenceBackend, create_backend
from malt_ops.comparisons import compare, format_comparisons
from malt_ops.comparisons import metrics as comparison_metrics
from malt_ops.config import ROLES, Recipe
from malt_ops.evaluation import question_repeats, run_system, test_subsets
from malt_ops.evaluation_cache import EVALUATION_KEY, adapter_digests, evaluation_key
from malt_ops.metrics import mean_std
from malt_ops.stages.common import already_done, stage_output, trained_adapter
from malt_ops.storage import library_name
from malt_ops.table1 import SETTINGS
from malt_ops.tracking import log_stage, stage_artifacts

STAGE = "evaluate"
HELP = (
    "Evaluate SA, SA+MV, MA, MA+MV, the STaR rows, MALT w/o MV and MALT on random test subsets "
    "over several seeds, with paired comparisons; writes evaluate/report.json, table.md and plots."
)

SYSTEMS = {"base": "", "star": "STaR ", "malt": "MALT"}


def system_adapters(recipe: Recipe, run_id: str, backend: InferenceBackend) -> tuple[dict, dict]:
    """role -> adapter name for each system, and which trained adapters were missing."""
    loaded: dict[str, str | None] = {}
    untrained = []
    for trained in (*ROLES, "star"):
        unit = trained_adapter(recipe, run_id, trained)
        if unit is not None:
            name = library_name(run_id, trained)
            if name not in getattr(backend, "adapters", {}):
                backend.add_adapter(name, str(unit.local_dir(f"adapters/{trained}")))
            loaded[trained] = name
        else:
            loaded[trained] = None
            untrained.append(trained)
    systems = {
        "base": dict.fromkeys(ROLES),
        "star": dict.fromkeys(ROLES, loaded["star"]),
        "malt": {role: loaded[role] for role in ROLES},
    }
    return systems, {"untrained": untrained}


def build_report(
    results: dict[str, dict[int, list[dict]]], seeds: list[int], notes: dict
) -> dict[str, Any]:
    settings = []
    for name, system, turn, vote in SETTINGS:
        key = f"{turn}_mv" if vote else turn
        per_seed = [
            sum(q[key] for q in results[system][s]) / max(1, len(results[system][s])) for s in seeds
        ]
        mean, std = mean_std(per_seed)
        settings.append(
            {
                "setting": name,
                "system": system,
                "mean": mean,
                "std": std,
                "per_seed": per_seed,
                "n_questions": len(results[system][seeds[0]]),
                "seeds": seeds,
                "tokens": sum(q["tokens"][key] for s in seeds for q in results[system][s]),
            }
        )
    turnwise, flips, fallbacks = {}, {}, {}
    for system, by_seed in results.items():
        questions = [q for s in seeds for q in by_seed[s]]
        turnwise[system] = [
            sum(q["turns"][i] for q in questions) / max(1, len(questions)) for i in range(3)
        ]
        flips[system] = {
            "wrong_to_right": sum(q["wrong_to_right"] for q in questions),
            "right_to_wrong": sum(q["right_to_wrong"] for q in questions),
            "chains": sum(q["chains"] for q in questions),
        }
    copying = {}
    for system, by_seed in results.items():
        questions = [q for s in seeds for q in by_seed[s]]
        copies = sum(q.get("copies", 0) for q in questions)
        answers = sum(q.get("refiner_answers", 0) for q in questions)
        copying[system] = {
            "copies": copies,
            "refiner_answers": answers,
            "rate": copy_rate(copies, answers),
        }
        fallbacks[system] = {
            "fallbacks": sum(q.get("extraction_fallbacks", 0) for q in questions),
            "outputs": 3 * sum(q["chains"] for q in questions),
        }
    return {
        "settings": settings,
        "turnwise": turnwise,
        "flips": flips,
        "extraction_fallbacks": fallbacks,
        "copying": copying,
        **notes,
    }


def copy_rate(copies: int, answers: int) -> float | None:
    """Share of refiner answers equal to the generator's; None when no refiner answered."""
    return copies / answers if answers else None


def format_table(report: dict[str, Any]) -> str:
    lines = [
        "| setting | accuracy % (mean ± std) | per seed | questions | tokens |",
        "|---|---|---|---|---|",
    ]
    for s in report["settings"]:
        seeds = ", ".join(f"{v * 100:.1f}" for v in s["per_seed"])
        lines.append(
            f"| {s['setting']} | {s['mean'] * 100:.2f} ± {s['std'] * 100:.2f} | {seeds} | "
            f"{s['n_questions']} | {s['tokens']} |"
        )
    lines += [
        "",
        "| system | after G % | after V % | after R % | wrong→right | right→wrong | chains "
        "| R copies G % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for system, turns in report["turnwise"].items():
        flips = report["flips"][system]
        rate = report.get("copying", {}).get(system, {}).get("rate")
        lines.append(
            f"| {system} | "
            + " | ".join(f"{t * 100:.1f}" for t in turns)
            + f" | {flips['wrong_to_right']} | {flips['right_to_wrong']} | {flips['chains']} | "
            + ("-" if rate is None else f"{rate * 100:.1f}")
            + " |"
        )
    if report.get("untrained"):
        lines += [
            "",
            f"Untrained (no data to learn from; base model used): {', '.join(report['untrained'])}.",
        ]
    if repeats := report.get("question_repeats"):
        if repeats["max_repeats"] > 1:
            lines += [
                "",
                f"Questions repeat across seeds: {repeats['distinct_questions']} distinct questions "
                f"in {repeats['items']} (seed, question) items, each drawn up to "
                f"{repeats['max_repeats']} times (the test pool is smaller than seeds x "
                "subset_size); the paired tests count each question once.",
            ]
        else:
            lines += ["", f"Each seed drew a disjoint subset ({repeats['items']} questions)."]
    return "\n".join(lines) + "\n"


def run(recipe: Recipe, run_id: str, backend: InferenceBackend | None = None) -> dict[str, Any]:
    out = stage_output(recipe, run_id, STAGE)
    if (done := already_done(out)) is not None:
        return done
    problems_by_seed = test_subsets(recipe, run_id)
    size = len(next(iter(problems_by_seed.values())))
    ev = recipe.evaluation
    backend = backend or create_backend(recipe)
    systems, notes = system_adapters(recipe, run_id, backend)
    results: dict[str, dict[int, list[dict]]] = {}
    computed: dict[tuple, dict] = {}
    for system, adapters in systems.items():
        signature = tuple(adapters[r] for r in ROLES)
        if signature not in computed:  # an untrained system is the base system: run it once
            computed[signature] = run_system(problems_by_seed, backend, adapters, recipe, system)
        results[system] = computed[signature]
    report = build_report(results, list(ev.seeds), notes)
    report["questions_per_seed"] = size
    report["question_repeats"] = question_repeats(problems_by_seed)
    report["benchmark"] = recipe.data.benchmark
    per_question = [
        {"system": system, "seed": seed, **q}
        for system, by_seed in results.items()
        for seed, questions in by_seed.items()
        for q in questions
    ]
    report["comparisons"] = compare(report, per_question, ev.comparisons)
    table = format_table(report) + "\n" + format_comparisons(report["comparisons"])
    out.write_json("report.json", report)
    out.write_bytes("table.md", table.encode())
    out.write_jsonl("per_question.jsonl", per_question)
    if all(systems["malt"][role] for role in ROLES):
        # promote stores these results in the evaluation cache if this set becomes champion
        dirs = {
            role: trained_adapter(recipe, run_id, role).local_dir(f"adapters/{role}")  # type: ignore[union-attr]
            for role in ROLES
        }
        key = evaluation_key(recipe, adapter_digests(dirs), problems_by_seed)
        out.write_json(EVALUATION_KEY, {"malt": key.as_dict()})
    from malt_ops.plots import accuracy_bars, turnwise_lines

    with tempfile.TemporaryDirectory() as scratch:
        bars = accuracy_bars(
            [(s["setting"], s["mean"], s["std"]) for s in report["settings"]],
            f"{recipe.data.benchmark}: accuracy per setting",
            Path(scratch) / "accuracy.png",
        )
        lines = turnwise_lines(
            report["turnwise"], "turn-wise accuracy", Path(scratch) / "turnwise.png"
        )
        out.write_bytes("plots/accuracy.png", bars.read_bytes())
        out.write_bytes("plots/turnwise.png", lines.read_bytes())
    summary = {s["setting"]: {"mean": s["mean"], "std": s["std"]} for s in report["settings"]}
    metrics = {
        f"{s['setting']}.{stat}": s[stat] for s in report["settings"] for stat in ("mean", "std")
    }
    metrics |= {
        f"turnwise.{system}.{turn}": value
        for system, values in report["turnwise"].items()
        for turn, value in zip(("after_G", "after_V", "after_R"), values, strict=True)
    }
    metrics |= {
        f"flips.{system}.{kind}": count
        for system, flips in report["flips"].items()
        for kind, count in flips.items()
    }
    metrics |= {
        f"copy_rate.{system}": copying["rate"]
        for system, copying in report["copying"].items()
        if copying["rate"] is not None
    }
    metrics |= {
        f"extraction_fallbacks.{system}": counts["fallbacks"]
        for system, counts in report["extraction_fallbacks"].items()
    }
    metrics |= comparison_metrics(report["comparisons"])
    out.commit({"settings": summary, "untrained": notes["untrained"], "questions_per_seed": size})
    headline = {f"{s['setting']}.mean": s["mean"] for s in report["settings"]}
    headline |= comparison_metrics(report["comparisons"])
    log_stage(
        recipe,
        run_id,
        STAGE,
        metrics=metrics,
        artifacts=stage_artifacts(out),
        headline=headline,
        tables={"per_question.json": per_question},
    )
    print(
        f"\nEvaluation ({recipe.data.benchmark}, {size} questions x {len(ev.seeds)} seeds):\n\n{table}"
    )
    return report
