"""sample: expand a G -> V -> R tree per training question (one shard of them).

Each level is batched across the questions of a checkpoint batch (``sampling.checkpoint_every``
questions): every generator prompt, then every verifier prompt, then every refiner prompt.
Leaves are graded against the gold answer.

Checkpoints: each batch's trees are written under ``sample/parts/shard-K/`` with a small
marker written after them; the marker makes the part complete. A rerun of the shard reuses
every complete part whose inputs are unchanged and samples only the rest, then assembles the
trees file from the parts and commits the manifest. Each request's randomness comes from
(sampling.seed, question id, node path, role) alone (``malt_ops.chains``), never from the
shard or batch it falls in, so an interrupted and resumed shard ends with the same trees as
an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from malt_ops.backends import InferenceBackend, create_backend
from malt_ops.chains import expand_trees
from malt_ops.config import ROLES, Recipe
from malt_ops.errors import MaltError
from malt_ops.grading import MAX_OUTPUT_CHARS
from malt_ops.models import model_identity
from malt_ops.policy import policy_adapter_paths, run_policy
from malt_ops.prompts import generator_messages, verdict
from malt_ops.seeding import SEED_SCHEME
from malt_ops.stages.common import already_done, log, require_done, stage_output
from malt_ops.storage import Store, dumps_jsonl, open_store
from malt_ops.tracking import log_stage

STAGE = "sample"
HELP = "Sample n generator x m verifier x l refiner trajectories per training question (one shard) into trees/shard-K.jsonl."


def shard_of(problems: list[dict[str, Any]], shard: int, num_shards: int) -> list[dict[str, Any]]:
    return [p for i, p in enumerate(problems) if i % num_shards == shard]


def load_policy_adapters(
    backend: InferenceBackend, paths: dict[str, str | None]
) -> dict[str, str | None]:
    """Load the sampling policy's role adapters; returns role -> adapter name (None = base model)."""
    names: dict[str, str | None] = {}
    for role in ROLES:
        path = paths[role]
        if path is None:
            names[role] = None
            continue
        name = f"{role}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
        if name not in getattr(backend, "adapters", {}):
            backend.add_adapter(name, path)
        names[role] = name
    return names


STAR_CACHE = "cache/star-samples"
"""Under storage.root: the base generator's own samples per shard, keyed by what made them."""


def _star_cache_key(recipe: Recipe, problems: list[dict[str, Any]]) -> str:
    """Everything the base generator's samples of these questions depend on."""
    sampling = recipe.sampling
    blob = {
        "model": model_identity(recipe.model),
        "backend": recipe.inference.backend,
        "n": sampling.n,
        "temperature": sampling.temperature_of("generator"),
        "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens.generator,
        "seed": sampling.seed,
        "seed_scheme": SEED_SCHEME,
        "prompts": [generator_messages(p) for p in problems],
        "problems": problems,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def star_samples(
    recipe: Recipe,
    problems: list[dict[str, Any]],
    trees: list[dict[str, Any]],
    policy: dict[str, str | None],
    backend_factory,
) -> tuple[bytes, str]:
    """The STaR baseline's training samples of this shard: the BASE generator's own n samples
    per question, whatever the sampling policy (issue 16 item 6: from cycle 2 the trees'
    generator is the champion's, and STaR trained on them would no longer be STaR).

    With the base generator as the policy's generator the trees already hold exactly these
    samples (same prompts, same request seeds). Otherwise they are sampled here, with the
    base model, and cached in the store under a key of everything they depend on, so the
    cycles of a retraining schedule over the same training questions sample them once.
    Returns the JSONL bytes and where they came from ("trees", "cache" or "sampled").
    """
    store = open_store(recipe.storage.root)
    key = f"{STAR_CACHE}/{_star_cache_key(recipe, problems)}.jsonl"
    if policy["generator"] is None:
        star = [
            {"problem": t["problem"], "nodes": [n for n in t["nodes"] if n["role"] == "generator"]}
            for t in trees
        ]
        data, source = dumps_jsonl(star), "trees"
    elif store.exists(key):
        return store.read_bytes(key), "cache"
    else:
        backend = backend_factory()
        seeds = [("sample", recipe.sampling.seed)] * len(problems)
        base = dict.fromkeys(ROLES)
        star = expand_trees(problems, backend, recipe.sampling, base, seeds, generator_only=True)
        data, source = dumps_jsonl(star), "sampled"
    if not store.exists(key):
        store.write_bytes(key, data)  # a whole file or nothing (the store writes atomically)
    return data, source


def output_counts(nodes: list[dict[str, Any]]) -> dict[str, int]:
    """Degenerate model outputs, counted (they stay in the trees; label never teaches them)."""
    return {
        "unfinished_outputs": sum(not n["finished"] for n in nodes),
        "empty_outputs": sum(not (n["text"] or "").strip() for n in nodes),
        "overlong_outputs": sum(len(n["text"] or "") > MAX_OUTPUT_CHARS for n in nodes),
        # The verifier is asked for a verdict, not an answer: only G and R must answer.
        "no_answer_outputs": sum(n["role"] != "verifier" and n["answer"] is None for n in nodes),
        "fallback_answer_outputs": sum(bool(n.get("fallback")) for n in nodes),  # no marker
        "no_verdict_outputs": sum(
            n["role"] == "verifier" and verdict(n["text"]) is None for n in nodes
        ),
    }


def _adapter_digest(path: str | None) -> str | None:
    """Content hash of a policy adapter directory (its local path may be a fresh scratch copy)."""
    if path is None or not Path(path).is_dir():
        return path
    from malt_ops.models import adapter_digest

    return adapter_digest(Path(path))


def _inputs_digest(recipe: Recipe, policy: dict[str, str | None]) -> str:
    """What every batch of this shard depends on besides its own questions and seed."""
    blob = {
        "model": recipe.model.model_dump(mode="json"),
        "inference": recipe.inference.model_dump(mode="json"),
        "sampling": recipe.sampling.model_dump(mode="json"),
        "policy": {role: _adapter_digest(path) for role, path in policy.items()},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _complete_part(store: Store, data_key: str, marker_key: str, fingerprint: str) -> bytes | None:
    """A checkpoint part's bytes if it is complete and was sampled from the same inputs."""
    if not store.exists(marker_key):
        return None
    marker = store.read_json(marker_key)
    if marker.get("fingerprint") != fingerprint or not store.exists(data_key):
        return None
    data = store.read_bytes(data_key)
    return data if hashlib.sha256(data).hexdigest() == marker.get("sha256") else None


def run(
    recipe: Recipe,
    run_id: str,
    shard: int = 0,
    num_shards: int | None = None,
    backend: InferenceBackend | None = None,
) -> dict[str, Any]:
    if num_shards is not None and num_shards < 1:
        raise MaltError(f"--num-shards {num_shards}: give 1 or more")
    num_shards = num_shards or recipe.sampling.num_shards
    if not 0 <= shard < num_shards:
        raise MaltError(
            f"--shard {shard} is outside 0..{num_shards - 1} (--num-shards {num_shards})"
        )
    out = stage_output(recipe, run_id, STAGE, unit=f"shard-{shard}")
    if (done := already_done(out)) is not None:
        return done
    prepared = require_done(recipe, run_id, "prepare")
    problems = shard_of(list(prepared.iter_jsonl("problems/train.jsonl")), shard, num_shards)
    recorded = run_policy(recipe, run_id)
    policy = policy_adapter_paths(recipe, recorded)
    if recorded["kind"] == "champion" and recorded["system_version"] is None:
        log.info("sample: no champion set yet; sampling with the base model")
    from malt_ops.models import check_adapter_dir

    for path in policy.values():  # a broken adapter fails here, before the base model loads
        if path is not None and "://" not in path:
            check_adapter_dir(path)
    size = recipe.sampling.checkpoint_every
    batches = [problems[i : i + size] for i in range(0, len(problems), size)]
    inputs = _inputs_digest(recipe, policy)
    seed_base = (STAGE, recipe.sampling.seed)
    # Checkpoints outlive an attempt (a retry resumes from them): below the stage, not the
    # attempt, each part checked by its own marker.
    store, parts_prefix = out.store, out.shared_key(f"parts/shard-{shard}")
    adapters: dict[str, str | None] | None = None
    parts: list[bytes] = []
    reused = fresh_tokens = 0
    fresh_seconds = 0.0
    started = time.perf_counter()
    for index, batch in enumerate(batches):
        # The seed scheme is part of what a part was sampled from: parts sampled under
        # another scheme are not reused.
        fingerprint = hashlib.sha256(
            f"{inputs}/{SEED_SCHEME}/".encode() + dumps_jsonl(batch)
        ).hexdigest()
        data_key = f"{parts_prefix}/batch-{index:05d}.jsonl"
        marker_key = f"{parts_prefix}/batch-{index:05d}.done.json"
        data = _complete_part(store, data_key, marker_key, fingerprint)
        if data is not None:
            reused += 1
        else:
            if adapters is None:  # the model loads only when there is something left to sample
                backend = backend or create_backend(recipe)
                adapters = load_policy_adapters(backend, policy)
            before = (backend.usage.completion_tokens, backend.usage.seconds)
            data = dumps_jsonl(
                expand_trees(batch, backend, recipe.sampling, adapters, [seed_base] * len(batch))
            )
            fresh_tokens += backend.usage.completion_tokens - before[0]
            fresh_seconds += backend.usage.seconds - before[1]
            store.write_bytes(data_key, data)
            # The marker goes last: only a part whose marker exists counts as complete.
            store.write_json(
                marker_key,
                {
                    "batch": index,
                    "questions": len(batch),
                    "fingerprint": fingerprint,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data),
                },
            )
            log.info("sample shard %d: batch %d of %d written", shard, index + 1, len(batches))
        parts.append(data)
    if reused:
        log.info(
            "sample shard %d: resumed, %d of %d batches reused from checkpoints",
            shard,
            reused,
            len(batches),
        )
    trees = [json.loads(line) for part in parts for line in part.decode().split("\n") if line]
    nodes = [n for t in trees for n in t["nodes"]]
    leaves = [n for n in nodes if n["role"] == "refiner"]
    summary = {
        "shard": shard,
        "num_shards": num_shards,
        "questions": len(trees),
        "nodes": len(nodes),
        "leaf_accuracy": sum(n["reward"] for n in leaves) / len(leaves) if leaves else 0.0,
        "generated_tokens": sum(n["completion_tokens"] for n in nodes),
        "tokens_per_second": fresh_tokens / fresh_seconds if fresh_seconds else 0.0,
        **output_counts(nodes),
        "batches": len(batches),
        "batches_reused": reused,
        "wall_seconds": time.perf_counter() - started,
        "policy": policy,
        "policy_system_version": recorded.get("system_version"),
    }
    star, summary["star_source"] = star_samples(
        recipe, problems, trees, policy, lambda: backend or create_backend(recipe)
    )
    out.write_bytes(f"trees/shard-{shard}.jsonl", b"".join(parts))
    out.write_bytes(f"star/shard-{shard}.jsonl", star)
    out.commit(summary)
    try:  # the parts are in the committed trees file now
        store.delete_prefix(parts_prefix)
    except Exception as exc:
        log.warning("sample shard %d: could not delete %s: %s", shard, parts_prefix, exc)
    log_stage(recipe, run_id, STAGE, f"shard-{shard}", metrics=summary)
    log.info(
        "sample shard %d/%d: %d questions, %d nodes, leaf accuracy %.3f, %d tokens at %.1f tok/s",
        shard,
        num_shards,
        summary["questions"],
        summary["nodes"],
        summary["leaf_accuracy"],
        summary["generated_tokens"],
        summary["tokens_per_second"],
    )
    return summary
