"""train: per-role LoRA adapters from the label datasets (mapped over roles, STaR beside them).

generator and star: SFT. verifier and refiner: SFT on positives, then DPO on pairs with the
SFT adapter as the reference. A role with nothing to learn from is skipped with a reason;
the run goes on with that role untrained.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from malt_ops.checkpoints import CheckpointMirror, fingerprint
from malt_ops.config import TRAINED, Recipe
from malt_ops.distributed import barrier, is_main, per_device_batch, world_size
from malt_ops.errors import MaltError
from malt_ops.stages.common import already_done, log, require_done, stage_output
from malt_ops.storage import dumps_jsonl
from malt_ops.tracking import log_stage, stage_artifacts

STAGE = "train"
HELP = (
    "Train one role's LoRA adapter with TRL: SFT (generator, star) or SFT then DPO against the "
    "SFT adapter (verifier, refiner); writes train/adapters/<role>/."
)


def _final_loss(history: list[dict[str, Any]]) -> float | None:
    losses = [h["loss"] for h in history if "loss" in h]
    return losses[-1] if losses else None


def _stable_adapter_config(path: Path) -> None:
    """Sort the set-valued fields PEFT writes in hash order (``target_modules``), which
    changes from one process to the next, so a retrained adapter is byte-identical."""
    config = json.loads(path.read_text())
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))  # as PEFT writes it


def checkpoint_mirror(
    recipe: Recipe, out: Any, role: str, positives: list[dict], pairs: list[dict]
) -> CheckpointMirror | None:
    """Where this role's checkpoints live, keyed by everything the training depends on (its
    settings, the model, the rows), or None when the recipe takes no checkpoints."""
    if recipe.training.checkpoint_steps <= 0:
        return None
    from malt_ops.models import model_identity

    key = fingerprint(
        {
            "role": role,
            "training": getattr(recipe.training, role).model_dump(mode="json"),
            "seed": recipe.training.seed,
            "every": recipe.training.checkpoint_steps,
            "model": model_identity(recipe.model),
            "rows": hashlib.sha256(dumps_jsonl([*positives, *pairs])).hexdigest(),
        }
    )
    return CheckpointMirror(out.store, out.shared_key(f"checkpoints/{role}-{key}"))


def run(recipe: Recipe, run_id: str, role: str) -> dict[str, Any]:
    if role not in TRAINED:
        raise MaltError(f"--role '{role}' is not one of {', '.join(TRAINED)}")
    out = stage_output(recipe, run_id, STAGE, unit=role)
    if (done := already_done(out)) is not None:
        return done
    labeled = require_done(recipe, run_id, "label")
    cfg = getattr(recipe.training, role)
    positives = list(labeled.iter_jsonl(f"datasets/{role}_sft.jsonl"))
    pairs = [] if role == "star" else list(labeled.iter_jsonl(f"datasets/{role}_dpo.jsonl"))
    summary: dict[str, Any] = {
        "role": role,
        "sft_rows": len(positives),
        "dpo_rows": len(pairs) if cfg.dpo else 0,
        "trained": False,
        "phases": [],
        "skipped_reason": None,
    }
    if not positives:
        summary["skipped_reason"] = (
            f"no positive {role} samples to fine-tune on; {role} stays untrained"
        )
        log.warning("train %s: %s", role, summary["skipped_reason"])
        out.write_json(f"metrics/{role}.json", summary)
        out.commit(summary)
        log_stage(recipe, run_id, STAGE, role, metrics=summary, artifacts=stage_artifacts(out))
        return summary

    from malt_ops.models import load_tokenizer, resolve_model_dir
    from malt_ops.plots import loss_curves
    from malt_ops.training import TrainOptions, finished_sft, token_budget, train_dpo, train_sft

    per_device_batch(cfg.batch_size, f"training.{role}.batch_size")  # before the model loads
    model_dir = resolve_model_dir(recipe.model)
    # label checks the budget where it has a tokenizer (not in the light image); this stage
    # always has one, so the role's rows are checked again here, before the model loads.
    budget = token_budget(
        load_tokenizer(model_dir),
        recipe,
        role,
        {f"{role}_sft": positives, **({f"{role}_dpo": pairs} if cfg.dpo else {})},
    )
    for name, counted in budget["datasets"].items():
        summary[f"truncated.{name}"] = counted["truncated"]
        if counted["truncated"]:
            log.warning(
                "train %s: %d of %d %s rows are longer than training.%s.max_length (%d) and "
                "are truncated",
                role,
                counted["truncated"],
                counted["rows"],
                name,
                role,
                cfg.max_length,
            )
    histories: dict[str, list] = {}
    started = time.perf_counter()
    mirror = checkpoint_mirror(recipe, out, role, positives, pairs)
    options = TrainOptions(mirror, recipe.training.checkpoint_steps, recipe.training.strategy)
    with tempfile.TemporaryDirectory(prefix=f"malt-train-{role}-") as scratch:
        scratch_dir = Path(scratch)
        result = None
        if mirror is not None and cfg.dpo and pairs:
            result = finished_sft(
                model_dir, len(positives), mirror, scratch_dir / "sft-resumed", recipe.model.dtype
            )
        if result is None:
            log.info("train %s: SFT on %d positives", role, len(positives))
            result = train_sft(
                model_dir,
                positives,
                cfg,
                scratch_dir,
                seed=recipe.training.seed,
                dtype=recipe.model.dtype,
                options=options,
            )
        histories["sft"] = result.history
        summary["phases"].append("sft")
        summary["sft_final_loss"] = _final_loss(result.history)
        final = result.adapter_dir
        if cfg.dpo and pairs:
            log.info(
                "train %s: DPO on %d pairs (beta %.2f, reference = SFT adapter)",
                role,
                len(pairs),
                cfg.beta,
            )
            # Continues from the SFT model in memory; the base model is not loaded again.
            dpo = train_dpo(
                result,
                pairs,
                cfg,
                scratch_dir,
                seed=recipe.training.seed,
                options=options,
            )
            histories["dpo"] = dpo.history
            summary["phases"].append("dpo")
            summary["dpo_final_loss"] = _final_loss(dpo.history)
            final = dpo.adapter_dir
            del dpo
        elif cfg.dpo:
            summary["skipped_reason"] = (
                f"no preference pairs for {role}: DPO skipped, SFT adapter kept"
            )
            log.warning("train %s: %s", role, summary["skipped_reason"])
        del result
        (final / "README.md").unlink(missing_ok=True)
        _stable_adapter_config(final / "adapter_config.json")
        (final / "training_summary.json").write_text(
            json.dumps(
                {
                    "role": role,
                    "base_model": recipe.model.name
                    if recipe.model.source == "packaged"
                    else recipe.model.path,
                    "recipe_digest": recipe.digest(),
                    "phases": summary["phases"],
                },
                indent=2,
            )
        )
        summary["trained"] = True
        summary["processes"] = world_size()
        summary["wall_seconds"] = time.perf_counter() - started
        if not is_main():
            barrier()  # the main process writes and commits; wait for it, then stop
            return summary
        # adapter_config.json last: evaluate and register take it as "the adapter is there".
        out.put_dir(f"adapters/{role}", final, last="adapter_config.json")
        plot = loss_curves(histories, f"{role} training loss", scratch_dir / f"{role}_loss.png")
        out.write_bytes(f"plots/{role}_loss.png", plot.read_bytes())
        shutil.rmtree(scratch_dir / "checkpoints", ignore_errors=True)
    out.write_json(f"metrics/{role}.json", {**summary, "history": histories})
    series = {
        f"{phase}_loss": [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        for phase, history in histories.items()
    }
    out.commit(summary)
    barrier()
    if mirror is not None:
        mirror.clear()  # committed: the adapter is in the manifest, the checkpoints are spent
    log_stage(
        recipe, run_id, STAGE, role, metrics=summary, series=series, artifacts=stage_artifacts(out)
    )
    log.info(
        "train %s: done in %.0fs (%s), adapter in %s",
        role,
        summary["wall_seconds"],
        " + ".join(summary["phases"]),
        out.store.uri(out.key(f"adapters/{role}")),
    )
    return summary
