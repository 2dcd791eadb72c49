"""Paired significance tests on per-question correctness (pure functions)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def mcnemar_exact(challenger: Sequence[bool], reference: Sequence[bool]) -> float:
    """One-sided exact McNemar p-value that the challenger is right more often than the reference."""
    wins = sum(c and not r for c, r in zip(challenger, reference, strict=True))
    losses = sum(r and not c for c, r in zip(challenger, reference, strict=True))
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def paired_bootstrap(
    challenger: Sequence[bool], reference: Sequence[bool], samples: int = 10_000, seed: int = 0
) -> float:
    """One-sided paired bootstrap p-value: share of resamples where the challenger does not win."""
    diffs = [int(c) - int(r) for c, r in zip(challenger, reference, strict=True)]
    if not diffs:
        return 1.0
    rng = random.Random(seed)
    n = len(diffs)
    not_better = sum(sum(diffs[rng.randrange(n)] for _ in range(n)) <= 0 for _ in range(samples))
    return not_better / samples


def effect(challenger: Sequence[bool], reference: Sequence[bool]) -> float:
    """Accuracy difference (challenger - reference)."""
    if not challenger:
        return 0.0
    return (sum(challenger) - sum(reference)) / len(challenger)
