"""Small pure helpers for evaluation: majority vote, a stable seed, mean and std."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Sequence


def majority_vote(classes: Sequence[Hashable | None], seed: int) -> int | None:
    """Index of the chain that wins the vote over answer classes; None if no chain answered.

    ``classes`` holds one key per chain (e.g. ``grading.answer_classes``); None is a chain
    without an answer, which does not vote. The most frequent class wins, and the winning
    index is that class's first chain, so its grade is the class's. A tie between classes is
    broken by ``random.Random(seed)``, uniformly among the tied classes: reproducible for a
    seed, and not biased towards the first chain across questions seeded differently.
    """
    counted = Counter(c for c in classes if c is not None)
    if not counted:
        return None
    best = max(counted.values())
    tied = [c for c in dict.fromkeys(c for c in classes if c is not None) if counted[c] == best]
    winner = tied[0] if len(tied) == 1 else random.Random(seed).choice(tied)
    return classes.index(winner)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
