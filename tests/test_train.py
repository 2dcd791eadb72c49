"""TRL training on the real model: DPO's reference is the SFT adapter; empty roles are skipped."""

import math
from pathlib import Path

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
    sft_model = sft.trainer.model
    sft_weights = load_file(sft.adapter_dir / "adapter_model.safetensors")
    assert sft_weights and all(torch.isfinite(t).all() for t in sft_weights.values())

    # 3 steps of 2 draw 6 of the 4 pairs, so the reference log-probs are precomputed.
    dpo = train_dpo(sft, PAIRS, cfg, tmp_path, seed=0)
    assert dpo.trainer.model is sft_model  # continued in memory, not reloaded
    assert dpo.trainer.args.precompute_ref_log_probs
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


@pytest.fixture(scope="module")
def dpo_setup(model_dir, tmp_path_factory):
    """A DPO trainer set up (not trained) on a just-trained SFT adapter."""
    tmp = tmp_path_factory.mktemp("dpo")
    cfg = RoleTrainingConfig(
        rank=4, alpha=8, batch_size=2, gradient_checkpointing=False, max_length=128, max_steps=1
    )
    sft = train_sft(model_dir, SFT_ROWS, cfg, tmp, seed=0)
    from malt_ops.training import dpo_trainer

    policy, tokenizer = sft.trainer.model, sft.trainer.processing_class
    return dpo_trainer(policy, tokenizer, PAIRS, cfg, tmp, seed=0), sft.adapter_dir


LONG_ANSWER = "Let me add the numbers one at a time, carefully. " * 12 + "Final answer: 3"


def test_token_budget_counts_what_trl_truncates(model_dir, tmp_path):
    # Regression (issue 16 item 7): rows longer than max_length were cut by TRL without a word.
    # The budget's token counts must be TRL's own, so compare them with the datasets TRL built.
    from malt_ops.models import load_tokenizer
    from malt_ops.training import dpo_trainer, sequence_lengths, sft_rows, sft_trainer

    cfg = RoleTrainingConfig(rank=4, alpha=8, max_length=96, gradient_checkpointing=False)
    rows = [*SFT_ROWS, {"messages": conversation("What is 1 + 2?", LONG_ANSWER)}]
    pairs = [*PAIRS, {**PAIRS[0], "rejected": [{"role": "assistant", "content": LONG_ANSWER}]}]
    tokenizer = load_tokenizer(model_dir)
    sft_lengths = [
        sequence_lengths(tokenizer, r["prompt"], r["completion"]) for r in sft_rows(rows)
    ]
    assert sft_lengths[-1][1] > cfg.max_length >= max(full for _, full in sft_lengths[:-1])
    sft = sft_trainer(model_dir, rows, cfg, tmp_path, seed=0)
    built = sft.train_dataset
    assert [len(r["input_ids"]) for r in built] == [
        min(full, cfg.max_length) for _, full in sft_lengths
    ]

    built = dpo_trainer(sft.model, sft.processing_class, pairs, cfg, tmp_path, seed=0).train_dataset
    for pair, row in zip(pairs, built, strict=True):
        prompt, chosen = sequence_lengths(tokenizer, pair["prompt"], pair["chosen"])
        _, rejected = sequence_lengths(tokenizer, pair["prompt"], pair["rejected"])
        assert len(row["prompt_ids"]) == prompt
        assert len(row["prompt_ids"]) + len(row["chosen_ids"]) == chosen
        assert len(row["prompt_ids"]) + len(row["rejected_ids"]) == rejected
    assert rejected > cfg.max_length  # the last pair is the one TRL's collator cuts


def test_reference_adapter_check_passes_on_trls_copy(dpo_setup):
    from malt_ops.training import check_reference_adapter

    trainer, sft_adapter = dpo_setup
    check_reference_adapter(trainer.model, sft_adapter)


def test_reference_adapter_check_fails_when_ref_differs(dpo_setup):
    # Regression (issue 16 item 8): nothing checked that DPO's reference was the SFT adapter.
    from malt_ops.errors import MaltError
    from malt_ops.training import check_reference_adapter

    trainer, sft_adapter = dpo_setup
    param = next(p for n, p in trainer.model.named_parameters() if ".ref." in n)
    saved = param.data.clone()
    try:
        param.data.add_(1e-3)
        with pytest.raises(MaltError, match="reference adapter 'ref' differs from the SFT adapter"):
            check_reference_adapter(trainer.model, sft_adapter)
        param.data.copy_(saved)
        param.requires_grad_(True)
        with pytest.raises(MaltError, match="'ref' adapter is trainable"):
            check_reference_adapter(trainer.model, sft_adapter)
    finally:
        param.data.copy_(saved)
        param.requires_grad_(False)


def test_reference_adapter_check_fails_without_ref(model_dir, dpo_setup):
    from peft import PeftModel

    from malt_ops.errors import MaltError
    from malt_ops.models import load_model
    from malt_ops.training import check_reference_adapter

    _, sft_adapter = dpo_setup
    # What an older TRL (or a peft_config path) leaves: the policy alone, so the reference
    # log-probs would come from the bare base model.
    policy = PeftModel.from_pretrained(load_model(model_dir), sft_adapter, is_trainable=True)
    with pytest.raises(MaltError, match="no frozen 'ref' adapter"):
        check_reference_adapter(policy, sft_adapter)


def test_train_refuses_a_prompt_over_the_budget_before_loading_the_model(recipe_file):
    # Regression (issue 16 item 7): where label had no tokenizer (the light image), nothing
    # checked the budget; train does it for its role. 64 new tokens cannot follow the
    # generator's ~100-token prompt within 100.
    from malt_ops.config import load_recipe
    from malt_ops.errors import MaltError
    from malt_ops.prompts import generator_messages
    from malt_ops.stages import train
    from malt_ops.stages.common import stage_output

    recipe = load_recipe(recipe_file(), ["training.generator.max_length=100"])
    problem = {"id": "q0", "question": "What is 2 + 2?", "answer": "4", "benchmark": "gsm8k"}
    labeled = stage_output(recipe, "budget", "label")
    row = [*generator_messages(problem), {"role": "assistant", "content": "Final answer: 4"}]
    labeled.write_jsonl("datasets/generator_sft.jsonl", [{"messages": row}])
    labeled.write_jsonl("datasets/generator_dpo.jsonl", [])
    labeled.commit({})
    with pytest.raises(MaltError, match=r"training\.generator\.max_length \(100\) is too short"):
        train.run(recipe, "budget", "generator")
    assert not stage_output(recipe, "budget", "train", unit="generator").done()


def test_dpo_steps_see_exactly_batch_size_pairs():
    # Regression (issue 22 item 10): batch_size 5 ran 2 pairs per pass x round(2.5) = 2 passes,
    # 4 pairs per step; 7 gave 6.
    from malt_ops.training import dpo_micro_batches

    for batch_size in range(1, 17):
        per_forward, passes = dpo_micro_batches(batch_size)
        assert per_forward * passes == batch_size, batch_size
        assert per_forward <= max(1, batch_size // 2)
    assert dpo_micro_batches(8) == (4, 2) and dpo_micro_batches(5) == (1, 5)


def test_train_stage_continues_dpo_from_the_sft_model_in_memory(
    recipe_file, model_dir, monkeypatch
):
    # Issue 17 item 4: after SFT, DPO loaded the base model from disk a second time.
    from peft import PeftModel
    from transformers import PreTrainedModel

    from malt_ops.config import load_recipe
    from malt_ops.models import load_model
    from malt_ops.stages import train
    from malt_ops.stages.common import stage_output

    recipe = load_recipe(
        recipe_file(),
        ["training.verifier.batch_size=2", "training.verifier.dpo_max_steps=2"],
    )
    labeled = stage_output(recipe, "memory", "label")
    labeled.write_jsonl("datasets/verifier_sft.jsonl", SFT_ROWS)
    labeled.write_jsonl("datasets/verifier_dpo.jsonl", PAIRS)
    labeled.commit({})
    loads: list[str] = []
    from_pretrained = PreTrainedModel.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(cls.__name__)
        return from_pretrained(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counted))
    summary = train.run(recipe, "memory", "verifier")
    monkeypatch.undo()
    assert summary["phases"] == ["sft", "dpo"]
    assert len(loads) == 1, f"base model loaded {len(loads)} times: {loads}"

    out = stage_output(recipe, "memory", "train", unit="verifier")
    adapter = out.store.local_dir(out.key("adapters/verifier"))
    metrics = out.store.read_json(out.key("metrics/verifier.json"))
    dpo_losses = [h["loss"] for h in metrics["history"]["dpo"] if "loss" in h]
    assert len(dpo_losses) == 2 and abs(dpo_losses[0] - math.log(2)) < 1e-2
    # The saved adapter is the policy alone and loads onto a fresh base model.
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and not any(".ref." in k for k in saved)
    loaded = PeftModel.from_pretrained(load_model(model_dir), adapter)
    weights = lora_weights(loaded.state_dict(), "default")
    assert weights.keys() == saved.keys()
    assert all(torch.equal(weights[k], saved[k]) for k in saved)


def test_dpo_in_memory_gives_what_reloading_gave(model_dir, tmp_path):
    # Issue 17 item 4: continuing in memory and precomputing the reference log-probs must not
    # change the result. The old path: a fresh base model with the SFT adapter loaded from disk,
    # the reference recomputed at every step.
    from peft import PeftModel

    from malt_ops.models import load_model, load_tokenizer
    from malt_ops.training import dpo_trainer

    cfg = RoleTrainingConfig(
        rank=4,
        alpha=8,
        batch_size=2,
        gradient_checkpointing=False,
        max_length=128,
        max_steps=1,
        learning_rate=1e-3,
        dpo_learning_rate=5e-3,
        dpo_max_steps=2,
    )
    sft = train_sft(model_dir, SFT_ROWS, cfg, tmp_path / "sft", seed=0)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "right"
    reloaded = PeftModel.from_pretrained(load_model(model_dir), sft.adapter_dir, is_trainable=True)
    old = dpo_trainer(reloaded, tokenizer, PAIRS, cfg, tmp_path / "old", seed=0, precompute=False)
    old.train()
    new = train_dpo(sft, PAIRS, cfg, tmp_path / "new", seed=0, precompute=True)
    assert new.trainer.args.precompute_ref_log_probs

    def losses(history: list[dict]) -> list[float]:
        return [h["loss"] for h in history if "loss" in h]

    assert len(losses(new.history)) == 2
    assert losses(new.history) == pytest.approx(losses(old.state.log_history), abs=1e-6)
    before = lora_weights(old.model.state_dict(), "default")
    after = load_file(new.adapter_dir / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        torch.testing.assert_close(after[key], tensor, rtol=0, atol=1e-6, msg=key)


def test_reference_is_precomputed_only_when_training_draws_a_pair_twice():
    from malt_ops.errors import MaltError
    from malt_ops.training import TrainResult, precompute_reference

    by_steps = RoleTrainingConfig(batch_size=4, grad_accum=2, dpo_max_steps=3)  # draws 24
    assert not precompute_reference(by_steps, 24) and precompute_reference(by_steps, 23)
    by_epochs = RoleTrainingConfig(dpo_epochs=1.0)
    assert not precompute_reference(by_epochs, 10)
    assert precompute_reference(RoleTrainingConfig(dpo_epochs=2.0), 10)
    with pytest.raises(MaltError, match="no longer in memory"):
        train_dpo(TrainResult(Path("sft"), [], 0), PAIRS, by_steps, Path("out"))
