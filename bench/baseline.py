"""The hf decode path as issue 17 found it, kept only so that benches can run it beside today's.

Two things changed since: the per-row sampler (Gumbel-max, one Exp(1) draw per vocabulary
entry, replaced by ``malt_ops.backends.sampler.sample_rows``) and masked attention (repeat_kv,
replaced by torch's enable_gqa through ``TRANSFORMERS_SDPA_FORCE_GQA``). The static scheduler
is still in the backend (``scheduler="static"``).
"""

from __future__ import annotations

import contextlib
import os


def gumbel_rows(scores, generators):
    """argmax(scores - log E), E ~ Exp(1) per vocabulary entry, one generator per row."""
    import torch

    noise = torch.stack(
        [torch.empty(scores.shape[1]).exponential_(generator=g) for g in generators]
    )
    return (scores.float() - noise.log()).argmax(-1)


@contextlib.contextmanager
def issue17_baseline():
    """Inside: the Gumbel-max sampler and repeat_kv attention, as before issue 17."""
    import malt_ops.backends.continuous as continuous
    import malt_ops.backends.hf as hf

    saved = hf.sample_rows, continuous.sample_rows, os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    hf.sample_rows = continuous.sample_rows = gumbel_rows
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "0"
    try:
        yield
    finally:
        hf.sample_rows, continuous.sample_rows, switch = saved
        if switch is None:
            os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
        else:
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = switch
