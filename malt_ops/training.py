"""TRL + PEFT LoRA training: SFT on positives, then DPO against the SFT adapter.

DPO continues from the model SFT left in memory (the base model is loaded once per role):
the policy is the SFT adapter (trainable) and TRL adds a frozen copy of it as the ``ref``
adapter, so the reference is the SFT adapter, not the base model and not a second full
model. That copy is TRL-version specific (an older TRL, or PEFT < 0.20 with
``target_parameters``, computes the reference with adapters disabled, i.e. from the base
model), so ``check_reference_adapter`` verifies it before training starts.

The token budget: TRL tokenizes a conversational row with the tokenizer's chat template and
cuts it to ``max_length`` (SFT while preparing the dataset, DPO in its collator), and drops a
row whose prompt alone fills ``max_length``, all without a word. ``token_budget`` counts
those rows from the same tokenization, for label's stats and the train stage.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from malt_ops.checkpoints import CheckpointMirror, mirror_callback
from malt_ops.config import Recipe, RoleTrainingConfig
from malt_ops.errors import MaltError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOptions:
    """How a role trains beyond its own settings: checkpoints, and the multi-process strategy."""

    mirror: CheckpointMirror | None = None
    checkpoint_steps: int = 0
    strategy: str = "ddp"


@dataclass
class TrainResult:
    adapter_dir: Path
    history: list[dict[str, Any]]
    rows: int
    trainer: Any = None


def dpo_micro_batches(batch_size: int) -> tuple[int, int]:
    """(pairs per forward pass, forward passes per step) for ``batch_size`` pairs per step.

    A pair is two sequences (chosen, rejected), so a forward pass takes at most half as many
    pairs as an SFT step takes rows, and a step holds as many sequences in memory as an SFT
    step. The pairs per pass divide ``batch_size``, so a step sees exactly ``batch_size``
    pairs (5 is 5 x 1, never the 2 x 2 that rounding gave).
    """
    limit = max(1, batch_size // 2)
    per_forward = max(d for d in range(1, limit + 1) if batch_size % d == 0)
    return per_forward, batch_size // per_forward


def _common_args(
    cfg: RoleTrainingConfig,
    out_dir: Path,
    seed: int,
    learning_rate: float,
    epochs: float,
    max_steps: int,
    checkpoint_steps: int = 0,
    strategy: str = "ddp",
) -> dict[str, Any]:
    import torch

    from malt_ops.distributed import per_device_batch, world_size

    saving: dict[str, Any] = {"save_strategy": "no"}
    if checkpoint_steps > 0:
        # the newest checkpoint is all a resume needs; the store keeps its mirror
        saving = {"save_strategy": "steps", "save_steps": checkpoint_steps, "save_total_limit": 1}
    return {
        **saving,
        "output_dir": str(out_dir / "checkpoints"),
        "per_device_train_batch_size": per_device_batch(cfg.batch_size, "batch_size"),
        "gradient_accumulation_steps": cfg.grad_accum,
        "learning_rate": learning_rate,
        "num_train_epochs": epochs,
        "max_steps": max_steps,
        "max_length": cfg.max_length,
        "logging_steps": 1,
        "report_to": "none",
        "seed": seed,
        "data_seed": seed,
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
        "disable_tqdm": False,
        "lr_scheduler_type": "cosine",
        "warmup_steps": cfg.warmup_ratio,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        **(_fsdp_args() if strategy == "fsdp" and world_size() > 1 else {}),
    }


def _fsdp_args() -> dict[str, Any]:
    # parameters, gradients and optimizer state sharded; each decoder layer its own unit
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": {"use_orig_params": True}}


def lora_config(cfg: RoleTrainingConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )


def _load(model_dir: Path, dtype: str):
    from malt_ops.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "right"
    # The frozen base weights in model.dtype (bfloat16 halves a CPU step on CPUs with
    # avx512_bf16); PEFT keeps the trainable LoRA weights in float32.
    return load_model(model_dir, dtype), tokenizer


def sft_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conversational prompt/completion rows: the loss falls on the role's answer only."""
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]


def dpo_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conversational preference rows, without label's bookkeeping columns."""
    return [
        {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs
    ]


def sequence_lengths(
    tokenizer: Any, prompt: list[dict[str, str]], completion: list[dict[str, str]]
) -> tuple[int, int]:
    """Tokens of the prompt (with the generation prompt) and of prompt + completion.

    As TRL 1.16 tokenizes a conversational row (``trl.data_utils._tokenize``, private, and
    absent where there is no TRL): the chat template applied by the tokenizer, no tools.
    """

    def tokens(messages: list[dict[str, str]], **kwargs: Any) -> int:
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
        return len(encoded["input_ids"])

    return tokens(prompt, add_generation_prompt=True), tokens(prompt + completion)


def token_budget(
    tokenizer: Any, recipe: Recipe, role: str, datasets: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Rows of each dataset that TRL would truncate at ``training.<role>.max_length``; refuses
    a prompt that leaves no room for a completion of the sampler's full length.

    ``role``: one of TRAINED (STaR's completions are the generator's samples). ``datasets``:
    name -> label's SFT rows (``messages``) or DPO rows (``prompt``, ``chosen``,
    ``rejected``); a DPO row is truncated when either of its sequences is.
    """
    max_length = getattr(recipe.training, role).max_length
    sampled_as = "generator" if role == "star" else role
    key = f"sampling.max_new_tokens.{sampled_as}"
    new_tokens = getattr(recipe.sampling.max_new_tokens, sampled_as)
    report: dict[str, Any] = {"max_length": max_length, "longest_prompt": 0, "datasets": {}}
    for name, rows in datasets.items():
        truncated = longest = 0
        for row in rows:
            if "messages" in row:
                prompt, completions = row["messages"][:-1], [row["messages"][-1:]]
            else:
                prompt, completions = row["prompt"], [row["chosen"], row["rejected"]]
            lengths = [sequence_lengths(tokenizer, prompt, c) for c in completions]
            report["longest_prompt"] = max(report["longest_prompt"], lengths[0][0])
            full = max(length for _, length in lengths)
            longest = max(longest, full)
            truncated += full > max_length
        report["datasets"][name] = {"rows": len(rows), "truncated": truncated, "longest": longest}
    needed = report["longest_prompt"] + new_tokens
    if report["longest_prompt"] and needed > max_length:
        raise MaltError(
            f"training.{role}.max_length ({max_length}) is too short: the longest {role} prompt "
            f"is {report['longest_prompt']} tokens and {key} ({new_tokens}) more must fit after "
            f"it; raise training.{role}.max_length to at least {needed} or lower {key}"
        )
    return report


def sft_trainer(
    model_dir: Path,
    rows: list[dict[str, Any]],
    cfg: RoleTrainingConfig,
    out_dir: Path,
    seed: int = 0,
    dtype: str = "float32",
    options: TrainOptions = TrainOptions(),
) -> Any:
    """TRL's SFTTrainer with a fresh LoRA adapter, set up (dataset tokenized), not trained."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model, tokenizer = _load(model_dir, dtype)
    common = _common_args(
        cfg,
        out_dir,
        seed,
        cfg.learning_rate,
        cfg.epochs,
        cfg.max_steps,
        options.checkpoint_steps,
        options.strategy,
    )
    args = SFTConfig(**common, completion_only_loss=True)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(sft_rows(rows)),
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        callbacks=[mirror_callback(options.mirror, "sft")] if options.mirror else None,
    )


def _train(trainer: Any, mirror: CheckpointMirror | None, phase: str, out_dir: Path) -> None:
    """``trainer.train()``, resumed from the store's newest checkpoint of ``phase`` if any."""
    found = mirror.download(phase, out_dir / f"resume-{phase}") if mirror else None
    if found is not None:
        log.info("train: resuming %s from its checkpoint at step %d", phase, found[1])
    trainer.train(resume_from_checkpoint=str(found[0]) if found else None)
    from malt_ops.distributed import weights_agree, world_size

    if not weights_agree(trainer.model):
        raise MaltError(
            f"train: the {world_size()} training processes ended {phase} with different weights "
            "(DDP out of step): nothing is saved; rerun the role"
        )


def train_sft(
    model_dir: Path,
    rows: list[dict[str, Any]],
    cfg: RoleTrainingConfig,
    out_dir: Path,
    seed: int = 0,
    dtype: str = "float32",
    options: TrainOptions = TrainOptions(),
) -> TrainResult:
    """SFT; with ``options.mirror``, it resumes a killed run from its checkpoint, and leaves the
    finished adapter (and its loss history) in the store for a DPO phase that is killed."""
    trainer = sft_trainer(model_dir, rows, cfg, out_dir, seed, dtype, options)
    _train(trainer, options.mirror, "sft", out_dir)
    mirror = options.mirror
    adapter_dir = out_dir / "sft"
    trainer.model.save_pretrained(adapter_dir)
    history = list(trainer.state.log_history)
    if mirror is not None and trainer.is_world_process_zero():
        (adapter_dir / HISTORY_FILE).write_text(json.dumps(history))
        mirror.upload(SFT_ADAPTER, adapter_dir, trainer.state.global_step)
        (adapter_dir / HISTORY_FILE).unlink()  # the history is the mirror's, not the adapter's
    return TrainResult(adapter_dir, history, len(rows), trainer)


HISTORY_FILE = "log_history.json"
SFT_ADAPTER = "sft-adapter"
"""The mirror phase holding SFT's finished adapter: a DPO phase killed later starts from it."""


def finished_sft(
    model_dir: Path,
    rows: int,
    mirror: CheckpointMirror,
    out_dir: Path,
    dtype: str = "float32",
) -> TrainResult | None:
    """SFT's finished adapter from the store, loaded trainable on the base model as DPO's
    policy (what ``train_sft`` leaves in memory), or None when SFT never finished."""
    found = mirror.download(SFT_ADAPTER, out_dir)
    if found is None:
        return None
    from types import SimpleNamespace

    from peft import PeftModel

    adapter_dir, _ = found
    model, tokenizer = _load(model_dir, dtype)
    policy = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    history = json.loads((adapter_dir / HISTORY_FILE).read_text())
    (adapter_dir / HISTORY_FILE).unlink()
    log.info("train: SFT finished before the interruption; DPO starts from its adapter")
    return TrainResult(
        adapter_dir, history, rows, SimpleNamespace(model=policy, processing_class=tokenizer)
    )


def check_reference_adapter(model: Any, sft_adapter: Path) -> None:
    """DPO's reference log-probs come from a frozen, exact copy of the SFT adapter.

    TRL computes the reference with the ``ref`` adapter when the model has one and with all
    adapters disabled (the base model) when it has none, so both the adapter's presence and
    its weights are checked, against the SFT adapter as saved.
    """
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    if "ref" not in getattr(model, "peft_config", {}):
        raise MaltError(
            "DPO: the trainer set up no frozen 'ref' adapter, so its reference log-probs would "
            "come from the base model, not the SFT adapter: install the tested trl/peft "
            "versions (requirements/lock.txt)"
        )
    trainable = [n for n, p in model.named_parameters() if ".ref." in n and p.requires_grad]
    if trainable:
        raise MaltError(
            f"DPO: the 'ref' adapter is trainable ({trainable[0]}), so the reference would move "
            "with the policy: install the tested trl/peft versions (requirements/lock.txt)"
        )
    reference = get_peft_model_state_dict(model, adapter_name="ref")
    saved = load_file(sft_adapter / "adapter_model.safetensors")
    differ = sorted(reference.keys() ^ saved.keys()) or [
        key
        for key, tensor in saved.items()
        if not torch.equal(reference[key].detach().cpu(), tensor.to(reference[key].dtype))
    ]
    if differ:
        raise MaltError(
            f"DPO: the reference adapter 'ref' differs from the SFT adapter in {sft_adapter} "
            f"({len(differ)} tensors, first {differ[0]}): the reference log-probs would not be "
            "the SFT model's; install the tested trl/peft versions (requirements/lock.txt)"
        )


def dpo_trainer(
    policy: Any,
    tokenizer: Any,
    pairs: list[dict[str, Any]],
    cfg: RoleTrainingConfig,
    out_dir: Path,
    seed: int = 0,
    precompute: bool = False,
    options: TrainOptions = TrainOptions(),
) -> Any:
    """TRL's DPOTrainer continuing from ``policy``, a PEFT model whose ``default`` adapter is
    the SFT adapter; set up (``ref`` adapter added), not trained.

    ``precompute``: TRL's ``precompute_ref_log_probs`` (one reference pass over all pairs
    before training instead of one per step); ``precompute_reference`` says when it pays.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    common = _common_args(
        cfg,
        out_dir,
        seed,
        cfg.dpo_learning_rate,
        cfg.dpo_epochs,
        cfg.dpo_max_steps,
        options.checkpoint_steps,
        options.strategy,
    )
    from malt_ops.distributed import per_device_batch

    pairs_per_forward, accumulate = dpo_micro_batches(
        per_device_batch(cfg.batch_size, "batch_size")
    )
    common["per_device_train_batch_size"] = pairs_per_forward
    common["gradient_accumulation_steps"] = cfg.grad_accum * accumulate
    args = DPOConfig(**common, beta=cfg.beta, precompute_ref_log_probs=precompute)
    # ref_model=None with a PEFT policy: TRL copies its adapter (the SFT one) into a frozen "ref" adapter.
    return DPOTrainer(
        model=policy,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(dpo_rows(pairs)),
        processing_class=tokenizer,
        callbacks=[mirror_callback(options.mirror, "dpo")] if options.mirror else None,
    )


def precompute_reference(cfg: RoleTrainingConfig, pairs: int) -> bool:
    """Whether TRL's ``precompute_ref_log_probs`` saves time for ``pairs`` pairs.

    Precomputing runs the reference once over every pair (also those a ``dpo_max_steps`` cut
    never reaches), where training runs it once per pair it draws; it pays only when training
    draws more pairs than there are (more than one pass over the data). The results agree
    either way (tests/test_train.py); bench/training.py measures the time.
    """
    if cfg.dpo_max_steps > 0:
        drawn = cfg.dpo_max_steps * cfg.batch_size * cfg.grad_accum
    else:
        drawn = cfg.dpo_epochs * pairs
    return drawn > pairs


def train_dpo(
    sft: TrainResult,
    pairs: list[dict[str, Any]],
    cfg: RoleTrainingConfig,
    out_dir: Path,
    seed: int = 0,
    precompute: bool | None = None,
    options: TrainOptions = TrainOptions(),
) -> TrainResult:
    """DPO on the model ``train_sft`` left in memory, against its SFT adapter; no reload.

    Takes ``sft``'s model over: its trainer (optimizer state, dataset) is released first, and
    the model goes on with a second ``ref`` adapter. ``precompute``: None decides by
    ``precompute_reference``.
    """
    import gc

    if sft.trainer is None:
        raise MaltError(f"DPO: the SFT model of {sft.adapter_dir} is no longer in memory")
    policy, tokenizer = sft.trainer.model, sft.trainer.processing_class
    sft.trainer = None
    gc.collect()
    if precompute is None:
        precompute = precompute_reference(cfg, len(pairs))
    trainer = dpo_trainer(policy, tokenizer, pairs, cfg, out_dir, seed, precompute, options)
    check_reference_adapter(trainer.model, sft.adapter_dir)
    _train(trainer, options.mirror, "dpo", out_dir)
    adapter_dir = out_dir / "dpo"
    trainer.model.save_pretrained(adapter_dir, selected_adapters=["default"])
    return TrainResult(adapter_dir, list(trainer.state.log_history), len(pairs), trainer)
