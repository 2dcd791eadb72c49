"""TRL training on the real model: DPO's reference is the SFT adapter; empty roles are skipped."""

import math

import pytest
import torch
from safetensors.torch import load_file

from malt_ops.config import RoleTrainingConfig
from malt_ops.training import train_dpo, train_sft

pytestmark = pytest.mark.model


def conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


SFT_ROWS = [
    {
        "messages": conversation(
            f"What is {a} + {b}?", f"{a} + {b} = {a + b}.\nFinal answer: {a + b}"
        )
    }
    for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]
]
PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
        "chosen": [{"role": "assistant", "content": f"Final answer: {a + b}"}],
        "rejected": [{"role": "assistant", "content": f"Final answer: {a + b + 3}"}],
    }
    for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]
]


def lora_weights(state: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """LoRA tensors of one named adapter, keyed like a saved adapter file."""
    marker = f".{adapter}."
    return {
        k.replace(marker, "."): v.detach().clone()
        for k, v in state.items()
        if "lora_" in k and marker in k
    }


def test_dpo_reference_is_the_sft_adapter(model_dir, tmp_path):
    cfg = RoleTrainingConfig(
        rank=4,
        alpha=8,
        batch_size=2,
        gradient_checkpointing=False,
        max_length=128,
        max_steps=1,
        learning_rate=1e-3,
        dpo=True,
        dpo_learning_rate=5e-3,
        dpo_max_steps=3,
        beta=0.2,
    )
    sft = train_sft(model_dir, SFT_ROWS, cfg, tmp_path, seed=0)
    sft_weights = load_file(sft.adapter_dir / "adapter_model.safetensors")
    assert sft_weights and all(torch.isfinite(t).all() for t in sft_weights.values())

    dpo = train_dpo(model_dir, sft.adapter_dir, PAIRS, cfg, tmp_path, seed=0)
    state = dpo.trainer.model.state_dict()
    reference, policy = lora_weights(state, "ref"), lora_weights(state, "default")
    assert reference.keys() == policy.keys() and len(reference) == len(sft_weights)
    # The reference is exactly the SFT adapter and did not move during DPO ...
    for key, tensor in sft_weights.items():
        assert torch.equal(reference[key], tensor), key
    # ... while the policy moved away from it.
    assert any(not torch.equal(policy[k], sft_weights[k]) for k in sft_weights)
    # At the first step policy == reference, so the DPO loss starts at ln 2.
    losses = [h["loss"] for h in dpo.history if "loss" in h]
    assert abs(losses[0] - math.log(2)) < 1e-2
    saved = load_file(dpo.adapter_dir / "adapter_model.safetensors")
    assert saved.keys() == sft_weights.keys()  # only the policy adapter is saved, not "ref"
    assert any(not torch.equal(saved[k], sft_weights[k]) for k in saved)


def test_role_without_positives_is_skipped(recipe_file):
    from malt_ops.config import load_recipe
    from malt_ops.stages import train
    from malt_ops.stages.common import stage_output

    recipe = load_recipe(recipe_file())
    labeled = stage_output(recipe, "empty", "label")
    for name in ("verifier_sft", "verifier_dpo"):
        labeled.write_jsonl(f"datasets/{name}.jsonl", [])
    labeled.commit({})
    summary = train.run(recipe, "empty", "verifier")
    assert summary["trained"] is False
    assert "no positive verifier samples" in summary["skipped_reason"]
    out = stage_output(recipe, "empty", "train", unit="verifier")
    assert out.done()
    assert not out.store.exists(out.key("adapters/verifier/adapter_config.json"))
