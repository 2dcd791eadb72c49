"""Promotion gate: its false-promotion rate and power, measured by simulation.

Each trial draws a fresh set of questions with true accuracies p_i spread uniformly ±0.25
around a common accuracy. Both systems share p_i (or the challenger gets p_i + gain); their
correctness is drawn independently per (question, seed) item, with the items laid out as
evaluate lays out a recipe's test subsets (questions that several seeds draw repeat). Each
trial then goes through the gate promote uses: the per-question sign-flip p-value and
malt_ops.stages.promote.passes, with significance required.

    python bench/gate.py [--trials 2000] [--recipes local science-test cluster]

The figures are in RELIABILITY.md; tests/test_gate.py runs the same simulation.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binom

from malt_ops.config import PromotionConfig, load_recipe
from malt_ops.data import load_splits
from malt_ops.estimate import load_hardware
from malt_ops.evaluation import subset_positions
from malt_ops.significance import sign_flip_p_value
from malt_ops.stages.promote import passes

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SPREAD = 0.25
ACCURACY = 0.5
"""The common accuracy; at 0.5 the spread stays inside [0, 1] (no clipping)."""
GAIN = 0.05
"""The power is measured at +5 accuracy points."""


@dataclass(frozen=True)
class Layout:
    """Which (seed, question) items an evaluation holds."""

    name: str
    seeds: list[int]
    questions_per_seed: int
    items: list[tuple[int, int]]
    """(seed, question position in the pool), sorted by question."""

    @property
    def questions(self) -> int:
        return len({q for _, q in self.items})


def layout(name: str, pool: int, seeds: list[int], size: int) -> Layout:
    items = sorted(
        ((s, q) for s in seeds for q in subset_positions(pool, size, s)), key=lambda x: x[1]
    )
    return Layout(name, list(seeds), min(size, pool), items)


def test_pool(recipe) -> int:
    """Test questions the recipe's evaluation draws from: its own splits where they are here
    (packaged or local files), else the benchmark's documented test size (malt_ops/hardware.yaml)
    for a cluster's S3 or hub split."""
    data = recipe.data
    remote = data.source == "hub" or any(
        "://" in (path or "") for path in (data.train_path, data.test_path)
    )
    if not remote:
        return len(load_splits(data).test)
    size = load_hardware().benchmarks[data.benchmark].test
    return min(size, data.test_size) if data.test_size else size


def recipe_layout(name: str) -> tuple[Layout, PromotionConfig]:
    """A recipe's evaluation layout (its real test pool) and its gate, significance required."""
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    pool = test_pool(recipe)
    ev = recipe.evaluation
    gate = recipe.promotion.model_copy(update={"require_significance": True})
    return layout(name, pool, ev.seeds, ev.subset_size), gate


def draw(
    where: Layout, trials: int, gain: float, rng: np.random.Generator, shared: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Per-item correctness of challenger and reference, each of shape (trials, items).

    shared: both systems have the same true accuracy on each question. Otherwise each
    system's per-question accuracies are drawn independently, uniform on [0, 1]: equal
    accuracy on average, but each system is good at different questions, so the items of a
    question repeated across seeds are correlated (the case an item-level test gets wrong).
    """
    question = np.array([q for _, q in where.items])
    _, first, seen = np.unique(question, return_index=True, return_counts=True)
    shape = (trials, first.size)
    if shared:
        true = other = ACCURACY + rng.uniform(-SPREAD, SPREAD, size=shape)
    else:
        true, other = rng.uniform(0, 1, size=shape), rng.uniform(0, 1, size=shape)
    reference = rng.random((trials, question.size)) < np.repeat(true, seen, axis=1)
    boosted = np.clip(np.repeat(other, seen, axis=1) + gain, 0, 1)
    challenger = rng.random((trials, question.size)) < boosted
    return challenger, reference


def gate_decisions(
    where: Layout, challenger: np.ndarray, reference: np.ndarray, gate: PromotionConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(promoted, effect, p-value) per trial: per-question means over the seeds, as promote."""
    question = np.array([q for _, q in where.items])
    _, first, seen = np.unique(question, return_index=True, return_counts=True)
    wins = np.add.reduceat(challenger.astype(np.int64) - reference, first, axis=1)
    unit = math.lcm(*seen.tolist())
    steps = wins * (unit // seen)
    effects = (wins / seen).mean(axis=1)
    p_values = np.array([sign_flip_p_value(row) for row in steps])
    promoted = np.array([passes(e, p, gate) for e, p in zip(effects, p_values, strict=True)])
    return promoted, effects, p_values


def promotion_rate(
    where: Layout,
    gate: PromotionConfig,
    gain: float,
    trials: int,
    seed: int,
    shared: bool = True,
) -> tuple[float, float]:
    """Share of trials promoted, and its standard error."""
    rng = np.random.default_rng(seed)
    promoted, _, _ = gate_decisions(where, *draw(where, trials, gain, rng, shared), gate)
    rate = float(promoted.mean())
    return rate, math.sqrt(max(rate, gate.alpha) * (1 - max(rate, gate.alpha)) / trials)


def item_level_rate(where: Layout, gate: PromotionConfig, trials: int, seed: int) -> float:
    """For comparison: the gate before issue 16, an exact McNemar test on the (seed, question)
    items as if independent, on systems right on different questions."""
    challenger, reference = draw(where, trials, 0.0, np.random.default_rng(seed), shared=False)
    wins = (challenger & ~reference).sum(axis=1)
    losses = (reference & ~challenger).sum(axis=1)
    p_values = binom.sf(wins - 1, wins + losses, 0.5)
    return float(((wins > losses) & (p_values < gate.alpha)).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--recipes", nargs="+", default=["local", "science-test", "cluster"])
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    rows = [recipe_layout(name) for name in args.recipes]
    rows.append((layout("200 questions, one seed", 200, [0], 200), PromotionConfig()))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import report, table

    out = []
    for i, (where, gate) in enumerate(rows):
        repeats = Counter(q for _, q in where.items).most_common(1)[0][1]
        null, null_se = promotion_rate(where, gate, 0.0, args.trials, seed=i)
        power, power_se = promotion_rate(where, gate, GAIN, args.trials, seed=1000 + i)
        apart, apart_se = promotion_rate(where, gate, 0.0, args.trials, 2000 + i, shared=False)
        items = item_level_rate(where, gate, args.trials, 2000 + i)
        out.append(
            [
                where.name,
                f"{where.questions_per_seed} x {len(where.seeds)}",
                where.questions,
                repeats,
                gate.alpha,
                f"{null:.4f} ± {null_se:.4f}",
                f"{apart:.4f} ± {apart_se:.4f}",
                f"{items:.4f}",
                f"{power:.3f} ± {power_se:.3f}",
            ]
        )
    intro = (
        f"Promotion gate, {args.trials} trials per cell, significance required. Equal accuracy "
        f"and power: per-question true accuracies {ACCURACY} ± {SPREAD} (uniform), shared by "
        "both systems. Right on different questions: each system's per-question accuracies "
        "drawn independently, uniform on [0, 1].\n"
    )
    headers = [
        "layout",
        "questions/seed x seeds",
        "distinct questions",
        "max draws of a question",
        "alpha",
        "false promotions (equal accuracy)",
        "false promotions (right on different questions)",
        "same, item-level McNemar (old gate)",
        f"power at +{GAIN * 100:.0f} points",
    ]
    bound = "bound for false promotions: alpha + 3 x the simulation's standard error"
    report("bench/gate.py", intro + "\n" + table(headers, out), bound, not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
