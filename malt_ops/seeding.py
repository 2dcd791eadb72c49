"""Sampling seeds derived from what a request is, never from where it sits in a batch.

A request's seed is a hash of its identity: the run seed and stage, the question id, the node
path of its parent in the tree and the role. The same request gets the same samples whatever
else is batched with it, in whatever order, and two requests get unrelated samples.

vLLM fans a request with ``n`` samples out into children seeded ``seed + 0 ... seed + n - 1``
(and the hf backend seeds sample ``k`` the same way), so request seeds are multiples of
``SEED_STRIDE``: the children of one request never meet those of another.
"""

from __future__ import annotations

import hashlib
import json

from malt_ops.errors import MaltError

SEED_STRIDE = 2**16
"""Request seeds are multiples of this; no request may ask for more samples."""
SEED_SCHEME = "sha256-json-stride65536"
"""Names how seeds are derived; checkpoints record it (change it when derive_seed changes)."""
SEED_BITS = 63
"""vLLM and torch take signed 64-bit seeds: stay below 2**63, children included."""


def stable_seed(*parts: str | int | None) -> int:
    """A 64-bit seed from ``parts`` that is the same in every process (Python's hash() of a
    string changes with PYTHONHASHSEED). The parts are encoded as a JSON list, so
    ``("a", 1)`` and ``("a1",)`` or ``(1,)`` and ``("1",)`` give different seeds."""
    blob = json.dumps(list(parts), separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def derive_seed(*parts: str | int | None) -> int:
    """A request seed in [0, 2**63) that is a multiple of ``SEED_STRIDE``, from ``parts``."""
    value = stable_seed(*parts)
    slots = 2**SEED_BITS // SEED_STRIDE
    return (value % slots) * SEED_STRIDE


def check_samples(n: int) -> None:
    """Fail when ``n`` samples per request would run into the next request's seeds."""
    if n > SEED_STRIDE:
        raise MaltError(
            f"{n} samples per prompt is above the {SEED_STRIDE} that request seeds are spaced "
            "apart: lower sampling.n/m/l or evaluation.votes"
        )
