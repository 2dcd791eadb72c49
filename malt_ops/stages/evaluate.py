"""evaluate: the paper's Table 1 settings on random test subsets, over several seeds.

Three systems are run as ``votes`` independent G -> V -> R chains per question:
base (untrained, role prompts), STaR (the STaR generator adapter in every role) and
MALT (the trained role adapters). From the same chains:
SA = the first chain's generator answer, SA+MV = majority vote of the generator answers,
MA = the first chain's refiner answer, MA+MV = majority vote of the refiner answers.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from malt_ops.backends import InferenceBackend, create_backend
from malt_ops.chains import expand_trees
from malt_ops.config import ROLES, Recipe, SamplingConfig
from malt_ops.errors import MaltError
from malt_ops.grading import answer_classes
from malt_ops.metrics import majority_vote, mean_std
from malt_ops.prompts import verdict
from malt_ops.seeding import stable_seed
from malt_ops.stages.common import (
    already_done,
    log,
    require_done,
    stage_output,
    trained_adapter,
)
from malt_ops.storage import library_name
from malt_ops.table1 import SETTINGS
from malt_ops.tracking import log_stage, stage_artifacts

STAGE = "evaluate"
HELP = (
    "Evaluate SA, SA+MV, MA, MA+MV, the STaR rows, MALT w/o MV and MALT on random test subsets "
    "over several seeds; writes evaluate/report.json, table.md and plots."
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


def chain_records(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """Each independent chain (one generator sample, its verifier, its refiner) of a tree."""
    nodes = tree["nodes"]
    chains = []
    for gen in (n for n in nodes if n["role"] == "generator"):
        ver = next(n for n in nodes if n["parent"] == gen["id"])
        ref = next(n for n in nodes if n["parent"] == ver["id"])
        chains.append({"g": gen, "v": ver, "r": ref})
    return chains


def verifier_correct(chain: dict[str, Any]) -> bool:
    """Turn-wise correctness after V. The verifier is asked for a verdict, not an answer: a
    'correct' verdict stands for the generator's answer; otherwise only an answer the
    verifier states itself (a corrected one) counts, and none is wrong."""
    if verdict(chain["v"].get("text")) == "correct":
        return bool(chain["g"]["correct"])
    return bool(chain["v"]["correct"])


def same_answer(problem: dict[str, Any], first: str | None, second: str | None) -> bool:
    """Two extracted answers that the grader counts as one ('17' and '17.0' too)."""
    if first is None or second is None:
        return False
    classes = answer_classes(problem, [first, second])
    return classes[0] is not None and classes[0] == classes[1]


def score_question(
    problem: dict[str, Any], chains: list[dict[str, Any]], tie_seed: int
) -> dict[str, Any]:
    """Per-question outcomes for SA/SA+MV/MA/MA+MV, turn-wise correctness and flips.

    +MV votes on answer classes under the grader's equality (``grading.answer_classes``):
    '17' and '17.0' are one answer; a chain without an answer does not vote. The winner's
    correctness is its class's (the class's first chain's grade). A tie is broken by
    ``tie_seed`` (``seeding.stable_seed(evaluation seed, question id)``), separately per turn.
    """

    def voted(turn: str) -> bool:
        classes = answer_classes(problem, [c[turn]["answer"] for c in chains])
        winner = majority_vote(classes, seed=stable_seed(tie_seed, turn))
        return winner is not None and bool(chains[winner][turn]["correct"])

    tokens_first = sum(chains[0][t]["completion_tokens"] for t in "gvr")
    return {
        "generator": bool(chains[0]["g"]["correct"]),
        "generator_mv": voted("g"),
        "refiner": bool(chains[0]["r"]["correct"]),
        "refiner_mv": voted("r"),
        "turns": [
            sum(verifier_correct(c) if t == "v" else bool(c[t]["correct"]) for c in chains)
            / len(chains)
            for t in "gvr"
        ],
        "wrong_to_right": sum(not c["g"]["correct"] and c["r"]["correct"] for c in chains),
        "right_to_wrong": sum(c["g"]["correct"] and not c["r"]["correct"] for c in chains),
        "chains": len(chains),
        # The copy rate's parts: refiner answers equal to their own chain's generator answer.
        "copies": sum(same_answer(problem, c["g"]["answer"], c["r"]["answer"]) for c in chains),
        "refiner_answers": sum(c["r"]["answer"] is not None for c in chains),
        # Outputs of all three turns whose answer was read without a 'Final answer:' marker.
        "extraction_fallbacks": sum(bool(c[t].get("fallback")) for c in chains for t in "gvr"),
        "tokens": {
            "generator": chains[0]["g"]["completion_tokens"],
            "generator_mv": sum(c["g"]["completion_tokens"] for c in chains),
            "refiner": tokens_first,
            "refiner_mv": sum(c[t]["completion_tokens"] for c in chains for t in "gvr"),
        },
    }


def samples_digest(tree: dict[str, Any]) -> str:
    """A short hash of every sampled text of a tree: shows which runs drew the same samples."""
    texts = json.dumps([[n["id"], n["text"]] for n in tree["nodes"]]).encode()
    return hashlib.sha256(texts).hexdigest()[:16]


def run_system(
    problems_by_seed: dict[int, list[dict]],
    backend: InferenceBackend,
    adapters: dict,
    recipe: Recipe,
    desc: str,
) -> dict[int, list[dict[str, Any]]]:
    """Chains for every (seed, question) in one batched expansion; scored per question.

    Every chain is seeded from (evaluation seed, question id, node path, role), so one seed's
    results are the same whichever other seeds are evaluated with it.
    """
    ev = recipe.evaluation
    sampling = SamplingConfig(
        n=ev.votes,
        m=1,
        l=1,
        temperature=ev.temperature,
        top_p=ev.top_p,
        max_new_tokens=ev.max_new_tokens,
    )
    flat = [(seed, p) for seed, problems in problems_by_seed.items() for p in problems]
    log.info("evaluate %s: %d questions x %d chains", desc, len(flat), ev.votes)
    trees = expand_trees(
        [p for _, p in flat], backend, sampling, adapters, [(STAGE, seed) for seed, _ in flat]
    )
    scored: dict[int, list[dict[str, Any]]] = {seed: [] for seed in problems_by_seed}
    for (seed, problem), tree in zip(flat, trees, strict=True):
        scored[seed].append(
            {
                "question_id": problem["id"],
                "samples_sha256": samples_digest(tree),
                **score_question(problem, chain_records(tree), stable_seed(seed, problem["id"])),
            }
        )
    return scored


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


SUBSET_ORDER_SEED = "malt-ops evaluation subsets"
"""Seeds the one shuffle of the test pool that every evaluation seed's subset is cut from."""


def subset_positions(pool: int, size: int, seed: int) -> list[int]:
    """Positions (in the pool sorted by question id) of evaluation seed ``seed``'s subset.

    The pool is shuffled once, by a fixed seed; seed s takes the ``size`` questions starting
    at position s x size of that order, wrapping around at its end. So seeds 0, 1, ... k-1
    draw disjoint subsets whenever the pool holds k x size questions; with a smaller pool
    each question is drawn floor or ceil(k x size / pool) times; and a seed's subset depends
    only on the pool, the size and the seed itself, never on which other seeds are run.
    """
    order = list(range(pool))
    random.Random(SUBSET_ORDER_SEED).shuffle(order)
    start = seed * size
    return [order[(start + j) % pool] for j in range(min(size, pool))]


def test_subsets(recipe: Recipe, run_id: str) -> dict[int, list[dict[str, Any]]]:
    """The test subset of each evaluation seed (the same for every system compared)."""
    prepared = require_done(recipe, run_id, "prepare")
    test = list(prepared.iter_jsonl("problems/test.jsonl"))
    if not test:
        raise MaltError("the test split is empty: set data.test_size or data.test_path")
    test.sort(key=lambda q: str(q["id"]))  # the draw depends on the questions, not file order
    size = recipe.evaluation.subset_size
    return {
        seed: [test[i] for i in subset_positions(len(test), size, seed)]
        for seed in recipe.evaluation.seeds
    }


def question_repeats(problems_by_seed: dict[int, list[dict[str, Any]]]) -> dict[str, int]:
    """How often questions recur across the seeds' subsets (max_repeats 1: all disjoint)."""
    drawn = Counter(q["id"] for questions in problems_by_seed.values() for q in questions)
    return {
        "distinct_questions": len(drawn),
        "items": sum(drawn.values()),
        "max_repeats": max(drawn.values(), default=0),
    }


def setting_key(setting: str) -> tuple[str, str]:
    """(system, per-question key) of a Table 1 setting name, e.g. 'MALT' -> ('malt', 'refiner_mv')."""
    for name, system, turn, vote in SETTINGS:
        if name == setting:
            return system, f"{turn}_mv" if vote else turn
    raise MaltError(
        f"'{setting}' is not a Table 1 setting (one of {', '.join(n for n, *_ in SETTINGS)})"
    )


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
    table = format_table(report)
    out.write_json("report.json", report)
    out.write_bytes("table.md", table.encode())
    out.write_jsonl(
        "per_question.jsonl",
        [
            {"system": system, "seed": seed, **q}
            for system, by_seed in results.items()
            for seed, questions in by_seed.items()
            for q in questions
        ],
    )
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
    out.commit({"settings": summary, "untrained": notes["untrained"], "questions_per_seed": size})
    log_stage(recipe, run_id, STAGE, metrics=metrics, artifacts=stage_artifacts(out))
    print(
        f"\nEvaluation ({recipe.data.benchmark}, {size} questions x {len(ev.seeds)} seeds):\n\n{table}"
    )
    return report
