"""Prompt benchmark: copy rate and flips of the untrained chain, old role prompts against new.

Runs one G -> V -> R chain per question with the base model and each prompt set, side by side
on the same VALIDATION questions (the recipe must have ``data.eval_split: validation``; test
questions are never used), and reports per prompt set:

- turn-wise accuracy after G, V and R (after V as evaluate scores it: a 'correct' verdict
  stands for the generator's answer, otherwise only an answer the verifier states counts);
- the copy rate: the share of refiner answers equal to the generator's answer in the chain;
- the flips wrong->right and right->wrong between G and R;
- how often the verifier gave a verdict, said 'incorrect', and the refiner gave an answer.

The generator prompt is the same in both sets, so its samples are drawn once and shared:
the two sets differ only in what V and R are asked, on the same first attempts.

    flock /tmp/cpu.lock .venv/bin/python bench/prompts.py --questions 30

"before" is the role prompts at --before (a git ref; the default is the last commit with the
prompts that asked the verifier and the refiner to restate the answer), "after" the checkout's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

from common import report as print_report

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from malt_ops.errors import MaltError  # noqa: E402

BEFORE = "b49fd96"
ROLES = ("generator", "verifier", "refiner")


def prompt_sets(before: str) -> dict[str, Any]:
    """{'before': the prompts module at git ref ``before``, 'after': this checkout's}."""
    import malt_ops.prompts as after

    try:
        source = subprocess.run(
            ["git", "show", f"{before}:malt_ops/prompts.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise MaltError(
            f"--before {before}: cannot read malt_ops/prompts.py there ({exc})"
        ) from exc
    old = types.ModuleType("prompts_before")
    exec(compile(source, f"{before}:malt_ops/prompts.py", "exec"), old.__dict__)
    return {"before": old, "after": after}


def validation_questions(recipe: Any, count: int) -> list[dict[str, Any]]:
    from malt_ops.data import load_splits

    if recipe.data.eval_split != "validation":
        raise MaltError(
            "bench/prompts.py measures on validation questions only: give a recipe with "
            "data.eval_split: validation (e.g. recipes/science-validation.yaml)"
        )
    pool = load_splits(recipe.data).test  # the held-out split: validation here
    return random.Random(0).sample(pool, min(count, len(pool)))


def run_chains(backend: Any, problems: list[dict], prompts: Any, params: dict, cache: dict):
    """One chain per problem: {'g','v','r'} nodes with text, answer, correct, tokens, verdict."""
    from malt_ops.grading import grade_many

    def turn(role: str, messages: list) -> list[dict[str, Any]]:
        key = (role, json.dumps(messages))
        if key not in cache:
            outputs = backend.generate(messages, params[role], desc=role)
            completions = [c[0] for c in outputs]
            grades = grade_many(problems, [c.text for c in completions])
            cache[key] = [
                {
                    "text": c.text,
                    "answer": g.answer,
                    "correct": g.correct,
                    "finished": c.finished,
                    "completion_tokens": c.completion_tokens,
                }
                for c, g in zip(completions, grades, strict=True)
            ]
        return cache[key]

    gens = turn("generator", [prompts.generator_messages(p) for p in problems])
    vers = turn(
        "verifier",
        [prompts.verifier_messages(p, g["text"]) for p, g in zip(problems, gens, strict=True)],
    )
    refs = turn(
        "refiner",
        [
            prompts.refiner_messages(p, g["text"], v["text"])
            for p, g, v in zip(problems, gens, vers, strict=True)
        ],
    )
    return [{"g": g, "v": v, "r": r} for g, v, r in zip(gens, vers, refs, strict=True)]


def summarize(problems: list[dict[str, Any]], chains: list[dict[str, Any]]) -> dict[str, Any]:
    from malt_ops.evaluation import score_question
    from malt_ops.prompts import verdict
    from malt_ops.stages.evaluate import copy_rate

    # One chain per question: nothing to vote on, so the tie seed never decides.
    scored = [
        score_question(problem, [chain], tie_seed=0)
        for problem, chain in zip(problems, chains, strict=True)
    ]
    n = len(chains)
    verdicts = [verdict(c["v"]["text"]) for c in chains]
    copies = sum(q["copies"] for q in scored)
    answers = sum(q["refiner_answers"] for q in scored)
    return {
        "chains": n,
        "turns": [sum(q["turns"][i] for q in scored) / n for i in range(3)],
        "copies": copies,
        "refiner_answers": answers,
        "copy_rate": copy_rate(copies, answers),
        "wrong_to_right": sum(q["wrong_to_right"] for q in scored),
        "right_to_wrong": sum(q["right_to_wrong"] for q in scored),
        "verdicts": sum(v is not None for v in verdicts),
        "incorrect_verdicts": sum(v == "incorrect" for v in verdicts),
        "verifier_answers": sum(c["v"]["answer"] is not None for c in chains),
        "unfinished_verifier": sum(not c["v"]["finished"] for c in chains),
        "tokens": {t: sum(c[t]["completion_tokens"] for c in chains) for t in "gvr"},
    }


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}"


def format_body(summaries: dict[str, dict], args: argparse.Namespace, meta: dict) -> str:
    from common import table

    rows = []
    for name, s in summaries.items():
        n = s["chains"]
        rows.append(
            [
                name,
                *(pct(t) for t in s["turns"]),
                f"{pct(s['copy_rate'])} ({s['copies']}/{s['refiner_answers']})",
                s["wrong_to_right"],
                s["right_to_wrong"],
                f"{s['verdicts']}/{n}",
                f"{s['incorrect_verdicts']}/{n}",
                f"{s['verifier_answers']}/{n}",
                f"{s['unfinished_verifier']}/{n}",
                "/".join(str(s["tokens"][t]) for t in "gvr"),
            ]
        )
    headers = [
        "prompts",
        "after G %",
        "after V %",
        "after R %",
        "R copies G % (n)",
        "wrong→right",
        "right→wrong",
        "V verdict",
        "V 'incorrect'",
        "V states answer",
        "V truncated",
        "tokens G/V/R",
    ]
    return (
        f"Recipe {args.recipe} ({meta['model']}, {meta['benchmark']} validation questions), "
        f"{meta['questions']} questions x 1 chain, temperature {meta['temperature']}, "
        f"max_new_tokens G/V/R {meta['max_new_tokens']}; before = prompts at {args.before}, "
        f"after = this checkout's; {meta['seconds']:.0f} s.\n\n" + table(headers, rows)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/science-validation.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--before", default=BEFORE, help="git ref of the old prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write every chain's texts here (JSON)")
    parser.add_argument("--no-append", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from malt_ops.backends import SamplingParams, create_backend
        from malt_ops.config import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        sets = prompt_sets(args.before)
        problems = validation_questions(recipe, args.questions)
        ev = recipe.evaluation
        params = {
            role: SamplingParams(
                n=1,
                temperature=ev.temperature,
                top_p=ev.top_p,
                max_new_tokens=getattr(ev.max_new_tokens, role),
                seed=args.seed * 10 + level,  # as evaluate's chains: one seed per level
            )
            for level, role in enumerate(ROLES)
        }
        start = time.perf_counter()
        backend = create_backend(recipe)
        cache: dict = {}
        chains = {name: run_chains(backend, problems, p, params, cache) for name, p in sets.items()}
        seconds = time.perf_counter() - start
    except MaltError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summaries = {name: summarize(problems, c) for name, c in chains.items()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"questions": [p["question"] for p in problems], "chains": chains}, indent=1)
        )
    meta = {
        "model": recipe.model.name,
        "benchmark": recipe.data.benchmark,
        "questions": len(problems),
        "temperature": ev.temperature,
        "max_new_tokens": "/".join(str(getattr(ev.max_new_tokens, r)) for r in ROLES),
        "seconds": seconds,
    }
    before, after = summaries["before"], summaries["after"]
    verdict = (
        f"Copy rate {pct(before['copy_rate'])}% -> {pct(after['copy_rate'])}%; flips wrong→right/right→wrong "
        f"{before['wrong_to_right']}/{before['right_to_wrong']} -> "
        f"{after['wrong_to_right']}/{after['right_to_wrong']} on the same first attempts."
    )
    print_report(
        "bench/prompts.py", format_body(summaries, args, meta), verdict, not args.no_append
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
