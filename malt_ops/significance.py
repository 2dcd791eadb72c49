"""Paired significance of one system over another, with the question as the unit.

Items are (seed, question) pairs. A question drawn under several evaluation seeds is one
observation, not several: each system's correctness is averaged over the seeds in which both
systems answered the question, and the per-question differences are tested with an exact
one-sided sign-flip permutation test (H1: the challenger is better). Treating the items as
independent would count a question's difficulty once per seed and make p-values too small.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Item = tuple[Hashable, Hashable]
"""(seed, question id)."""


@dataclass(frozen=True)
class PairedResult:
    questions: int
    """Distinct questions both systems answered (the test's sample size)."""
    repeated_questions: int
    """Questions among them that appear under more than one seed."""
    items: int
    """(seed, question) pairs both systems answered."""
    wins: int
    """Questions on which the challenger's mean correctness is higher."""
    losses: int
    challenger_accuracy: float
    """Mean over questions of the challenger's per-question accuracy."""
    reference_accuracy: float
    effect: float
    """Mean per-question difference (challenger - reference)."""
    p_value: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_by_question(
    challenger: Mapping[Item, bool], reference: Mapping[Item, bool]
) -> PairedResult:
    """Pair the two systems on their common items, aggregate per question, and test."""
    wins: dict[Hashable, int] = defaultdict(int)  # challenger right minus reference right
    right_c: dict[Hashable, int] = defaultdict(int)
    right_r: dict[Hashable, int] = defaultdict(int)
    seen: dict[Hashable, int] = defaultdict(int)
    for item in challenger.keys() & reference.keys():
        question = item[1]
        c, r = bool(challenger[item]), bool(reference[item])
        wins[question] += int(c) - int(r)
        right_c[question] += c
        right_r[question] += r
        seen[question] += 1
    if not seen:
        return PairedResult(0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 1.0)
    questions = sorted(seen, key=str)
    counts = [seen[q] for q in questions]
    # d_q = wins_q / seen_q; in units of 1/lcm(seen) every d_q is an integer, so the exact
    # distribution is computed on integers (no rounding of fractions like 1/3).
    unit = math.lcm(*counts)
    steps = [wins[q] * (unit // seen[q]) for q in questions]
    n = len(questions)
    return PairedResult(
        questions=n,
        repeated_questions=sum(c > 1 for c in counts),
        items=sum(counts),
        wins=sum(s > 0 for s in steps),
        losses=sum(s < 0 for s in steps),
        challenger_accuracy=sum(right_c[q] / seen[q] for q in questions) / n,
        reference_accuracy=sum(right_r[q] / seen[q] for q in questions) / n,
        effect=sum(steps) / unit / n,
        p_value=sign_flip_p_value(steps),
    )


def sign_flip_p_value(steps: Any) -> float:
    """Exact one-sided p-value P(T* >= T) of T = sum(steps) under independent sign flips.

    ``steps`` are the paired differences as integers (the differences in units of their
    common denominator; the test is invariant to that scale). scipy.stats.permutation_test
    is exact only while it can enumerate all 2^n sign patterns (n of about 20) and samples
    beyond that; binomtest covers only differences of one magnitude (a single seed or
    disjoint subsets). So the null distribution is built here by convolution: the
    questions with |d| = m contribute m times a Binomial(count, 1/2) of positive signs.
    """
    values = np.asarray(steps)
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError("sign_flip_p_value needs integer steps (differences x a common unit)")
    values = values[values != 0].astype(np.int64)
    if not values.size:
        return 1.0
    magnitudes = np.abs(values)
    magnitudes //= np.gcd.reduce(magnitudes)
    observed = int(magnitudes[values > 0].sum())  # the positive part of T, as T = 2X - sum|d|
    # Imported here: scipy.stats costs ~2 s at import, and every CLI command imports this.
    from scipy.stats import binom

    dist = np.ones(1)  # pmf of X = sum of the magnitudes given a positive sign
    for m, count in zip(*np.unique(magnitudes, return_counts=True), strict=True):
        m, count = int(m), int(count)
        weights = binom.pmf(np.arange(count + 1), count, 0.5)
        grown = np.zeros(dist.size + m * count)
        # Convolving with weights spaced m apart is m dense convolutions, one per residue.
        for residue in range(min(m, dist.size)):
            grown[residue::m] = np.convolve(dist[residue::m], weights)
        dist = grown
    return float(min(1.0, dist[observed:].sum()))
