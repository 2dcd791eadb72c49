"""Inference backends behind one interface (see base.InferenceBackend)."""

from __future__ import annotations

from malt_ops.backends.base import Completion, InferenceBackend, SamplingParams
from malt_ops.config import TRAINED, Recipe
from malt_ops.errors import MaltError

__all__ = ["Completion", "InferenceBackend", "SamplingParams", "create_backend"]


def create_backend(recipe: Recipe) -> InferenceBackend:
    """The configured backend with the recipe's base model loaded."""
    from malt_ops.models import resolve_model_dir

    if recipe.inference.backend == "vllm":
        from malt_ops.backends.vllm import require_vllm

        require_vllm()  # before the model is resolved, which may convert or download it
    model_dir = resolve_model_dir(recipe.model)
    if recipe.inference.backend == "hf":
        from malt_ops.backends.hf import HFBackend

        return HFBackend(
            model_dir,
            dtype=recipe.model.dtype,
            batch_size=recipe.inference.batch_size,
            scheduler=recipe.inference.scheduler,
        )
    if recipe.inference.backend == "vllm":
        from malt_ops.backends.vllm import VLLMBackend, lora_rank_for

        ranks = [getattr(recipe.training, role).rank for role in TRAINED]
        return VLLMBackend(
            model_dir,
            recipe.inference.vllm,
            dtype=recipe.model.dtype,
            max_lora_rank=recipe.inference.vllm.max_lora_rank or lora_rank_for(ranks),
        )
    raise MaltError(f"inference.backend '{recipe.inference.backend}' is unknown: use hf or vllm")
