"""The per-row sampler both hf paths use: the right distribution, masked tokens never drawn,
and each row's draw a function of its own generator only."""

import torch
from scipy.stats import chisquare

from malt_ops.backends.sampler import sample_rows


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_samples_follow_the_softmax_of_the_scores():
    scores = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0])
    draws = 6000
    picked = sample_rows(scores.expand(draws, -1), _generators(range(draws)))
    observed = torch.bincount(picked, minlength=5).double()
    expected = torch.softmax(scores.double(), -1) * draws
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_masked_tokens_are_never_sampled_even_in_the_first_columns():
    scores = torch.tensor([float("-inf"), float("-inf"), 0.0, float("-inf"), 3.0, float("-inf")])
    picked = sample_rows(scores.expand(2000, -1), _generators(range(2000)))
    assert set(picked.tolist()) == {2, 4}


def test_a_rows_sample_depends_only_on_its_own_generator():
    torch.manual_seed(0)
    scores = torch.randn(4, 1000)
    together = sample_rows(scores, _generators([10, 11, 12, 13]))
    alone = [sample_rows(scores[i : i + 1], _generators([10 + i])).item() for i in range(4)]
    assert together.tolist() == alone
    torch.manual_seed(1)  # the global RNG plays no part
    assert sample_rows(scores, _generators([10, 11, 12, 13])).tolist() == together.tolist()
