"""Small pure helpers for evaluation: majority vote, mean and std."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the chain whose answer wins the vote (ties: the earliest); None if no chain answered."""
    counted = Counter(a for a in answers if a is not None)
    if not counted:
        return None
    best = max(counted.values())
    for index, answer in enumerate(answers):
        if answer is not None and counted[answer] == best:
            return index
    return None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
