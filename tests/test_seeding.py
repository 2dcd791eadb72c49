"""Request seeds: derived from identity, spaced so that vLLM's per-sample seeds never meet."""

import pytest

from malt_ops.backends import SamplingParams
from malt_ops.errors import MaltError
from malt_ops.seeding import SEED_STRIDE, derive_seed


def test_seeds_are_spaced_stable_and_distinct():
    keys = [
        ("evaluate", s, q, path, role)
        for s in range(4)
        for q in ("q1", "q2")
        for path in ("", "g0", "g0.v0")
        for role in ("generator", "refiner")
    ]
    seeds = [derive_seed(*key) for key in keys]
    assert all(seed % SEED_STRIDE == 0 and 0 <= seed + SEED_STRIDE <= 2**63 for seed in seeds)
    assert len(set(seeds)) == len(seeds)
    assert derive_seed(*keys[0]) == seeds[0]
    # The encoding keeps parts apart: neither concatenation nor a type change collides.
    assert derive_seed("a", 1) != derive_seed("a1")
    assert derive_seed(1) != derive_seed("1")


def test_prompt_seeds_one_per_prompt():
    assert SamplingParams(seeds=(0, SEED_STRIDE)).prompt_seeds(2) == (0, SEED_STRIDE)
    assert SamplingParams(seed=3).prompt_seeds(2) == (derive_seed(3, 0), derive_seed(3, 1))
    with pytest.raises(MaltError, match="one per prompt"):
        SamplingParams(seeds=(0,)).prompt_seeds(2)
    with pytest.raises(MaltError, match="samples per prompt"):
        SamplingParams(n=SEED_STRIDE + 1).prompt_seeds(1)
