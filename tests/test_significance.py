"""The per-question sign-flip test used by promotion and the science benchmark."""

import numpy as np
import pytest
from scipy.stats import binomtest, permutation_test

from malt_ops.significance import paired_by_question, sign_flip_p_value


def scipy_exact(differences):
    """scipy's exact sign-flip p-value (it enumerates all 2^n sign patterns)."""
    return permutation_test(
        (np.asarray(differences, dtype=float),),
        lambda x, axis: np.sum(x, axis=axis),
        permutation_type="samples",
        alternative="greater",
        n_resamples=np.inf,
    ).pvalue


@pytest.mark.parametrize("seeds", [2, 3, 4])
def test_sign_flip_equals_scipys_exact_permutation_test(seeds):
    rng = np.random.default_rng(seeds)
    for n in (2, 5, 9, 13):
        # per-question differences of mean correctness over `seeds` seeds: k / seeds
        steps = rng.integers(-seeds, seeds + 1, size=n)
        steps[0] = max(steps[0], 1)  # not all zero
        assert sign_flip_p_value(steps) == pytest.approx(scipy_exact(steps / seeds), rel=1e-9)


def test_mixed_denominators_equal_scipy_through_the_pairing():
    # Questions seen under 1, 2, 3 or 4 seeds: differences in units of 1/1 ... 1/4.
    rng = np.random.default_rng(7)
    challenger, reference, by_question = {}, {}, {}
    for q in range(12):
        seen = rng.integers(1, 5)
        for seed in range(seen):
            challenger[(seed, f"q{q}")] = bool(rng.random() < 0.7)
            reference[(seed, f"q{q}")] = bool(rng.random() < 0.4)
        by_question[f"q{q}"] = (
            sum(challenger[(s, f"q{q}")] - reference[(s, f"q{q}")] for s in range(seen)) / seen
        )
    result = paired_by_question(challenger, reference)
    assert result.questions == 12 and result.items == len(challenger)
    assert result.effect == pytest.approx(np.mean(list(by_question.values())))
    assert result.p_value == pytest.approx(scipy_exact(list(by_question.values())), rel=1e-9)


def test_one_seed_equals_scipys_binomial_test():
    # Every |d| is 1: the sign-flip test is the sign test, at sizes scipy cannot enumerate.
    for wins, losses, ties in ((170, 110, 220), (3, 0, 9), (40, 60, 0), (0, 5, 1)):
        steps = np.array([1] * wins + [-1] * losses + [0] * ties)
        expected = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue
        assert sign_flip_p_value(steps) == pytest.approx(expected, rel=1e-9)


def test_large_mixed_sample_is_a_distribution_and_ordered():
    rng = np.random.default_rng(0)
    steps = rng.integers(-12, 13, size=2000)
    p = sign_flip_p_value(steps)
    assert 0 < p < 1
    assert sign_flip_p_value(steps + 1) < p  # shifting every difference up lowers the p-value
    assert sign_flip_p_value(np.zeros(5, dtype=int)) == 1.0
    with pytest.raises(ValueError, match="integer"):
        sign_flip_p_value(np.array([0.5, 1.0]))


def test_pairing_uses_only_items_both_systems_answered():
    challenger = {(0, "a"): True, (1, "a"): True, (0, "b"): True, (2, "c"): True}
    reference = {(0, "a"): False, (1, "a"): True, (0, "b"): False}
    result = paired_by_question(challenger, reference)
    assert (result.questions, result.repeated_questions, result.items) == (2, 1, 3)
    assert result.challenger_accuracy == 1.0 and result.reference_accuracy == 0.25
    assert result.effect == pytest.approx(0.75)
    # d = (1/2, 1): patterns with sum >= 1.5 are only (+, +) of four
    assert result.p_value == pytest.approx(0.25)
