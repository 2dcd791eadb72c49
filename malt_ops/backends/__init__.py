"""Inference backends behind one interface (see base.InferenceBackend)."""

from __future__ import annotations

from malt_ops.backends.base import Completion, InferenceBackend, SamplingParams
from malt_ops.config import Recipe
from malt_ops.errors import MaltError

__all__ = ["Completion", "InferenceBackend", "SamplingParams", "create_backend"]


def create_backend(recipe: Recipe) -> InferenceBackend:
    """The configured backend with the recipe's base model loaded."""
    from malt_ops.models import resolve_model_dir

    model_dir = resolve_model_dir(recipe.model)
    if recipe.inference.backend == "hf":
        from malt_ops.backends.hf import HFBackend

        return HFBackend(
            model_dir, dtype=recipe.model.dtype, batch_size=recipe.inference.batch_size
        )
    raise MaltError(f"inference.backend '{recipe.inference.backend}' is not available yet: use hf")
