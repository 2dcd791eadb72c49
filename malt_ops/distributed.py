"""Multi-process training: who launched us, which rank we are, and the launcher command.

`malt-ops train` trains one role in ``training.processes`` processes (one per GPU; gloo on
CPU) under torchrun, DDP by default, FSDP where ``training.strategy: fsdp``. The Trainer
(through accelerate) does the data-parallel work from torchrun's environment; the stage is
rank-aware around it: only the main process writes outputs, commits the manifest and logs to
MLflow, and the others wait for it at a barrier, so a rerun never sees a half-written role.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from malt_ops.errors import MaltError

LAUNCHED_ENV = "WORLD_SIZE"
"""Set by torchrun (and accelerate launch) in every process it starts."""


def world_size() -> int:
    return int(os.environ.get(LAUNCHED_ENV, "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    return LAUNCHED_ENV in os.environ


def launcher_command(processes: int, arguments: list[str]) -> list[str]:
    """torchrun running ``malt-ops <arguments>`` in ``processes`` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "malt_ops.cli",
        *arguments,
    ]


def per_device_batch(batch_size: int, key: str) -> int:
    """The per-process batch that keeps the recipe's batch (per optimizer step, before
    gradient accumulation) whatever the process count."""
    world = world_size()
    if batch_size % world:
        raise MaltError(
            f"{key} ({batch_size}) must be a multiple of the {world} training processes, so "
            "that every step sees the batch the recipe states"
        )
    return batch_size // world


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def weights_agree(model: Any) -> bool:
    """Whether every rank holds the same trainable weights (DDP keeps them in step; a rank
    that diverged would make rank 0's adapter a lie). Three float64 checksums per rank."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    total = torch.zeros(3, dtype=torch.float64)
    for parameter in model.parameters():
        if parameter.requires_grad:
            values = parameter.detach().double().flatten().cpu()
            positions = torch.arange(1, values.numel() + 1, dtype=torch.float64)
            total += torch.stack(
                [values.sum(), (values * values).sum(), (values * positions).sum()]
            )
    gathered = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, total)
    return all(torch.equal(g, gathered[0]) for g in gathered)
