"""Paired tests used by promotion."""

from malt_ops.significance import effect, mcnemar_exact, paired_bootstrap


def test_mcnemar_exact_counts_only_discordant_pairs():
    challenger = [True] * 10 + [True] * 20
    reference = [False] * 10 + [True] * 20
    assert abs(mcnemar_exact(challenger, reference) - 0.5**10) < 1e-12
    assert mcnemar_exact([True, False], [False, True]) == 0.75
    assert mcnemar_exact([True, True], [True, True]) == 1.0
    assert mcnemar_exact([False] * 5, [True] * 5) == 1.0


def test_bootstrap_agrees_in_direction():
    better = [True] * 40 + [False] * 10
    worse = [False] * 30 + [True] * 10 + [False] * 10
    assert paired_bootstrap(better, worse, samples=2000) < 0.01
    assert paired_bootstrap(worse, better, samples=2000) > 0.99
    assert effect(better, worse) == (40 - 10) / 50
