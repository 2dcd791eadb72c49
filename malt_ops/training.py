"""TRL + PEFT LoRA training: SFT on positives, then DPO against the SFT adapter.

DPO keeps one base model in memory: the policy is the SFT adapter (trainable) and TRL
adds a frozen copy of it as the ``ref`` adapter, so the reference is the SFT adapter,
not the base model and not a second full model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from malt_ops.config import RoleTrainingConfig

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    adapter_dir: Path
    history: list[dict[str, Any]]
    rows: int
    trainer: Any = None


def _common_args(
    cfg: RoleTrainingConfig,
    out_dir: Path,
    seed: int,
    learning_rate: float,
    epochs: float,
    max_steps: int,
) -> dict[str, Any]:
    import torch

    return {
        "output_dir": str(out_dir / "checkpoints"),
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "learning_rate": learning_rate,
        "num_train_epochs": epochs,
        "max_steps": max_steps,
        "max_length": cfg.max_length,
        "logging_steps": 1,
        "save_strategy": "no",
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
    }


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


def train_sft(
    model_dir: Path,
    rows: list[dict[str, Any]],
    cfg: RoleTrainingConfig,
    out_dir: Path,
    seed: int = 0,
    dtype: str = "float32",
) -> TrainResult:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model, tokenizer = _load(model_dir, dtype)
    args = SFTConfig(
        **_common_args(cfg, out_dir, seed, cfg.learning_rate, cfg.epochs, cfg.max_steps),
        completion_only_loss=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(sft_rows(rows)),
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
    )
    trainer.train()
    adapter_dir = out_dir / "sft"
    trainer.model.save_pretrained(adapter_dir)
    return TrainResult(adapter_dir, list(trainer.state.log_history), len(rows), trainer)


def train_dpo(
    model_dir: Path,
    sft_adapter: Path,
    pairs: list[dict[str, Any]],
    cfg: RoleTrainingConfig,
    out_dir: Path,
    seed: int = 0,
    dtype: str = "float32",
) -> TrainResult:
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = _load(model_dir, dtype)
    policy = PeftModel.from_pretrained(model, sft_adapter, is_trainable=True)
    common = _common_args(
        cfg, out_dir, seed, cfg.dpo_learning_rate, cfg.dpo_epochs, cfg.dpo_max_steps
    )
    # A pair is two sequences (chosen, rejected): run half as many pairs per forward pass and
    # accumulate twice as often, so a DPO step holds as many sequences in memory as an SFT step
    # while each optimizer step still sees batch_size pairs.
    pairs_per_forward = max(1, cfg.batch_size // 2)
    common["per_device_train_batch_size"] = pairs_per_forward
    common["gradient_accumulation_steps"] = cfg.grad_accum * max(
        1, round(cfg.batch_size / pairs_per_forward)
    )
    args = DPOConfig(**common, beta=cfg.beta)
    rows = [
        {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs
    ]
    # ref_model=None with a PEFT policy: TRL copies the loaded (SFT) adapter into a frozen "ref" adapter.
    trainer = DPOTrainer(
        model=policy,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    adapter_dir = out_dir / "dpo"
    trainer.model.save_pretrained(adapter_dir, selected_adapters=["default"])
    return TrainResult(adapter_dir, list(trainer.state.log_history), len(rows), trainer)
