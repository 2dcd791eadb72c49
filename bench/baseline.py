"""The hf decode path as issue 17 found it, kept only so that benches can run it beside today's.

What changed since in the decode step is the per-row sampler (Gumbel-max, one Exp(1) draw per
vocabulary entry, replaced by ``malt_ops.backends.sampler.sample_rows``). The static scheduler
is still in the backend (``scheduler="static"``).
"""

from __future__ import annotations

import contextlib


def gumbel_rows(scores, generators):
    """argmax(scores - log E), E ~ Exp(1) per vocabulary entry, one generator per row."""
    import torch

    noise = torch.stack(
        [torch.empty(scores.shape[1]).exponential_(generator=g) for g in generators]
    )
    return (scores.float() - noise.log()).argmax(-1)


@contextlib.contextmanager
def issue17_baseline():
    """Inside: the Gumbel-max sampler, as before issue 17."""
    import malt_ops.backends.continuous as continuous
    import malt_ops.backends.hf as hf

    saved = hf.sample_rows, continuous.sample_rows
    hf.sample_rows = continuous.sample_rows = gumbel_rows
    try:
        yield
    finally:
        hf.sample_rows, continuous.sample_rows = saved
