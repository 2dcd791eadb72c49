"""Training checkpoints that outlive a killed pod: the Trainer's own checkpoints, mirrored to
the store, and restored before a rerun resumes.

transformers' Trainer saves everything a resume needs (adapter weights, optimizer, scheduler,
RNG states, the global step, from which it skips the batches already seen) into
``output_dir/checkpoint-N``, and ``train(resume_from_checkpoint=...)`` restores it. What it
lacks is a durable place: a stage pod's disk dies with the pod. A callback therefore copies
each new checkpoint into the store, below the stage (every attempt sees it), each file's
sha256 in a marker written last, and the previous checkpoint's files are removed after the
marker moved on. The prefix carries a fingerprint of everything the training depends on, so
a rerun with another recipe or other data never resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from malt_ops.storage import Store

log = logging.getLogger("malt_ops")

MARKER = "latest.json"


@dataclass
class CheckpointMirror:
    store: Store
    prefix: str
    """``runs/<run>/train/checkpoints/<role>-<fingerprint>``; one folder per phase below it."""

    def _marker_key(self, phase: str) -> str:
        return f"{self.prefix}/{phase}/{MARKER}"

    def latest(self, phase: str) -> dict[str, Any] | None:
        key = self._marker_key(phase)
        return self.store.read_json(key) if self.store.exists(key) else None

    def upload(self, phase: str, local: Path, step: int) -> None:
        """Mirror ``local`` (a checkpoint folder, or a finished adapter) as ``phase``."""
        previous = self.latest(phase)
        folder = f"{self.prefix}/{phase}/step-{step:08d}"
        files: dict[str, str] = {}
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            data = path.read_bytes()
            rel = path.relative_to(local).as_posix()
            self.store.write_bytes(f"{folder}/{rel}", data)
            files[rel] = hashlib.sha256(data).hexdigest()
        self.store.write_bytes(
            self._marker_key(phase),
            (
                json.dumps({"step": step, "folder": folder, "files": files}, indent=2) + "\n"
            ).encode(),
        )
        if previous and previous.get("folder") != folder:
            self.store.delete_prefix(previous["folder"] + "/")
        log.info("train: checkpoint %s step %d saved to %s", phase, step, self.store.uri(folder))

    def download(self, phase: str, target: Path) -> tuple[Path, int] | None:
        """The newest mirrored ``phase`` as a local folder (every file checked), or None."""
        marker = self.latest(phase)
        if marker is None:
            return None
        local = target / f"checkpoint-{marker['step']}"
        for rel, sha in marker["files"].items():
            data = self.store.read_bytes(f"{marker['folder']}/{rel}")
            if hashlib.sha256(data).hexdigest() != sha:
                log.warning(
                    "train: checkpoint %s step %d is damaged; not resumed", phase, marker["step"]
                )
                return None
            path = local / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return local, int(marker["step"])

    def clear(self) -> None:
        self.store.delete_prefix(self.prefix + "/")


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def mirror_callback(mirror: CheckpointMirror, phase: str) -> Any:
    """A TrainerCallback that mirrors each checkpoint the Trainer saves (main process only)."""
    from transformers import TrainerCallback

    class MirrorCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                mirror.upload(phase, local, state.global_step)

    return MirrorCheckpoints()
