"""promote: move `champion` to the challenger set only if it wins a paired test.

The challenger (this run's MALT system) and the current champion are evaluated on the same
test questions and seeds; with no champion yet, the challenger must beat the untrained base
model's baseline setting (MA+MV). The three roles move together or not at all.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import suppress
from pathlib import Path
from typing import Any

from malt_ops.config import PromotionConfig, Recipe
from malt_ops.data import TRAIN_QUESTIONS, question_hash
from malt_ops.errors import MaltError
from malt_ops.evaluation import setting_key, test_subsets
from malt_ops.evaluation_cache import (
    EVALUATION_KEY,
    cached_system_results,
    seed_from_evaluation,
)
from malt_ops.registry import (
    CHAMPION,
    SystemSet,
    promote_set,
    registry_lock,
    resolve_set,
    rollback_set,
    system_model_name,
)
from malt_ops.significance import paired_by_question
from malt_ops.stages.common import already_done, log, require_done, stage_output
from malt_ops.tracking import client_for, finish_pipeline, log_stage, registry_errors

STAGE = "promote"
CHALLENGER_SYSTEM = "malt"
"""The evaluate system that register registers (and promote may make the champion)."""
HELP = (
    "Compare the challenger set with the current champion on the same test questions and seeds "
    "(paired test); move alias 'champion' only if the challenger wins."
)


def _per_question(
    recipe: Recipe, run_id: str, system: str, key: str
) -> dict[tuple[int, str], bool]:
    evaluated = require_done(recipe, run_id, "evaluate")
    outcomes: dict[tuple[int, str], bool] = {}
    for r in evaluated.iter_jsonl("per_question.jsonl"):
        if r["system"] != system:
            continue
        item = (r["seed"], r["question_id"])
        if item in outcomes:  # a silent overwrite would drop one of the two outcomes
            raise MaltError(
                f"evaluate/per_question.jsonl lists {system} seed {item[0]} question {item[1]} "
                "twice: rerun evaluate"
            )
        outcomes[item] = bool(r[key])
    return outcomes


def _champion_per_question(
    recipe: Recipe, run_id: str, champion: dict, key: str
) -> tuple[dict[tuple[int, str], bool], dict[str, str]]:
    """The champion set on this run's test subsets (same questions, same seeds): from the
    evaluation cache when it was evaluated before under the same key, else run now.
    Returns the outcomes and where they came from (the cache key and "cache"/"evaluated")."""
    from malt_ops.backends import create_backend
    from malt_ops.registry import adapter_dir

    scored, cache_key, source = cached_system_results(
        recipe,
        test_subsets(recipe, run_id),
        {role: adapter_dir(version.source) for role, version in champion.items()},
        lambda: create_backend(recipe),
        "champion",
        origin={"computed_by": f"promote of run {run_id}"},
    )
    outcomes = {
        (seed, q["question_id"]): bool(q[key]) for seed, rows in scored.items() for q in rows
    }
    return outcomes, {"evaluation_key": cache_key.digest, "reference_results": source}


def passes(effect: float, p_value: float, cfg: PromotionConfig) -> bool:
    """The gate: a gain above min_effect that is significant (unless significance is waived)."""
    return effect > cfg.min_effect and (p_value < cfg.alpha or not cfg.require_significance)


def decide(
    challenger: dict[tuple[int, str], bool], reference: dict[tuple[int, str], bool], recipe: Recipe
) -> dict[str, Any]:
    """The promotion decision from (seed, question id) -> correct of both systems.

    Items are paired by (seed, question id); the question is the test's unit (see
    malt_ops.significance), so a question drawn under several seeds counts once.
    """
    result = paired_by_question(challenger, reference)
    if not result.questions:
        raise MaltError("challenger and reference share no evaluated questions: rerun evaluate")
    cfg = recipe.promotion
    gain, p_value = result.effect, result.p_value
    promote = passes(gain, p_value, cfg)
    sample = f"{result.questions} questions"
    if result.repeated_questions:
        sample += f", {result.repeated_questions} of them under several seeds"
    if promote:
        why = f"challenger wins by {gain * 100:+.1f} points (p={p_value:.3g}, {cfg.test}, {sample})"
    elif gain <= cfg.min_effect:
        why = (
            f"challenger does not beat the reference ({gain * 100:+.1f} points, "
            f"p={p_value:.3g}, {sample})"
        )
    else:
        why = (
            f"gain {gain * 100:+.1f} points is not significant "
            f"(p={p_value:.3g} >= alpha {cfg.alpha}, {sample})"
        )
    return {
        "promoted": promote,
        **result.as_dict(),
        "test": cfg.test,
        "alpha": cfg.alpha,
        "reason": why,
    }


def _recorded_train_questions(source: str) -> tuple[bytes | None, str]:
    """The champion's train_questions.json (bytes, or None when it has none) and where it was
    looked for. ``source`` is its system version's source: a store directory (local or s3)
    or, with a local store and a remote server, an MLflow artifact."""
    where = f"{source.rstrip('/')}/{TRAIN_QUESTIONS}"
    if source.startswith("s3://"):
        from malt_ops.s3 import S3Store, split_uri

        bucket, key = split_uri(where)
        store = S3Store(f"s3://{bucket}")
        return (store.read_bytes(key) if store.exists(key) else None), where
    if not source.startswith(("/", "file://")):  # runs:/, models:/, mlflow-artifacts:/...
        import tempfile

        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        try:
            path = download_artifacts(artifact_uri=where, dst_path=tempfile.mkdtemp())
        except MlflowException:
            return None, where
        return Path(path).read_bytes(), where
    path = Path(source.removeprefix("file://")) / TRAIN_QUESTIONS
    return (path.read_bytes() if path.is_file() else None), where


def incomparable(
    recipe: Recipe, run_id: str, champion: SystemSet, challenger_system: str, client
) -> str | None:
    """Why the champion cannot be compared fairly with this run's challenger, or None.

    Fair means the same base model by content hash (the name can hide another checkpoint)
    and no test question of this run among the champion's training questions (it would be
    graded on questions it learned)."""
    name = system_model_name(recipe)
    ours = client.get_model_version(name, str(challenger_system)).tags.get("base_model_sha256")
    theirs = champion.tags.get("base_model_sha256")
    if not theirs:
        return (
            f"not compared: the champion {champion.describe()} records no base model hash "
            "(registered before malt-ops recorded one)"
        )
    if theirs != ours:
        return (
            f"not compared: different base model (champion sha {theirs[:12]} vs {str(ours)[:12]})"
        )
    recorded, where = _recorded_train_questions(
        client.get_model_version(name, champion.version).source
    )
    if recorded is None:
        return f"not compared: the champion records no training questions ({where} is missing)"
    if hashlib.sha256(recorded).hexdigest() != champion.tags.get("train_questions_sha256"):
        return f"not compared: {where} does not match the champion's train_questions_sha256"
    trained_on = set(json.loads(recorded)["normalised_question_sha256"])
    prepared = require_done(recipe, run_id, "prepare")
    test = [question_hash(p["question"]) for p in prepared.iter_jsonl("problems/test.jsonl")]
    shared = sum(h in trained_on for h in test)
    if shared:
        return (
            f"not compared: the champion was trained on {shared} of this run's "
            f"{len(test)} test questions"
        )
    return None


def _decision(
    recipe: Recipe, run_id: str, versions: dict, system_version: str | None, client
) -> dict[str, Any]:
    """Compare the challenger set with the champion (or the base model): the decision.

    The champion is read once, from the system alias, so it is always one whole set."""
    system, key = setting_key(recipe.promotion.gate_setting)
    found = resolve_set(recipe, CHAMPION, client)
    champion = found.roles if found else None
    if not versions or not system_version:
        decision = {
            "promoted": False,
            "compared": False,
            "reason": "no complete challenger set was registered",
            "reference": None,
        }
    elif found and found.version == str(system_version):
        decision = {
            "promoted": False,
            "compared": False,
            "reason": "the challenger already is the champion",
            "reference": "champion",
        }
    elif found and (why := incomparable(recipe, run_id, found, system_version, client)):
        anyway = recipe.promotion.on_incomparable == "promote"
        decision = {
            "promoted": anyway,
            "compared": False,
            "reason": why
            + ("; promoted anyway (promotion.on_incomparable: promote)" if anyway else ""),
            "reference": f"champion {found.describe()}",
        }
    else:
        challenger = _per_question(recipe, run_id, system, key)
        if champion:
            reference, provenance = _champion_per_question(recipe, run_id, champion, key)
            label = f"champion {found.describe()}"
        else:
            base_system, base_key = setting_key(recipe.promotion.baseline_setting)
            reference = _per_question(recipe, run_id, base_system, base_key)
            label = f"untrained base ({recipe.promotion.baseline_setting})"
            provenance = {"reference_results": "evaluate"}
        decision = {
            **decide(challenger, reference, recipe),
            "compared": True,
            "reference": label,
            "gate_setting": recipe.promotion.gate_setting,
            **provenance,
        }
    decision["challenger"] = versions
    decision["challenger_system"] = system_version
    decision["champion_before"] = found.role_versions if found else None
    decision["champion_before_system"] = found.version if found else None
    return decision


def _apply(recipe: Recipe, decision: dict[str, Any], client, store, pending: str) -> None:
    """Make the challenger the champion (under the registry lock, and only if the champion is
    still the one compared with). A retry after the system alias moved but a mirror write
    failed only finishes the mirrors; the task fails until every alias names one set."""
    target = decision["challenger_system"]
    current = resolve_set(recipe, CHAMPION, client)
    if current is not None and current.version == str(target):
        with registry_lock(recipe, client):  # taking the lock finishes unfinished mirrors
            return
    try:
        promote_set(recipe, target, decision["champion_before_system"], client)
    except MaltError as exc:
        if "the champion moved to" not in str(exc):
            raise
        store.delete_prefix(pending)  # the champion moved on: the next attempt decides anew
        raise


def _seed_cache(recipe: Recipe, run_id: str, system_version: str, client) -> None:
    """The new champion was just evaluated by this run's evaluate: store those results in the
    evaluation cache, so the next cycle's promote does not run the set again. Only when
    evaluate's key matches the one computed from the registry's adapters exactly; a failure
    here costs that promote one evaluation, never this promotion."""
    from malt_ops.registry import adapter_dir

    evaluated = require_done(recipe, run_id, "evaluate")
    if not evaluated.has(EVALUATION_KEY):
        log.info("promote: evaluate recorded no evaluation key; the cache is not seeded")
        return
    try:
        current = resolve_set(recipe, CHAMPION, client)
        if current is None or current.version != str(system_version):
            return  # the champion moved on meanwhile: nothing to seed for it
        rows = [
            r
            for r in evaluated.iter_jsonl("per_question.jsonl")
            if r["system"] == CHALLENGER_SYSTEM
        ]
        outcome = seed_from_evaluation(
            recipe,
            evaluated.read_json(EVALUATION_KEY)[CHALLENGER_SYSTEM],
            rows,
            test_subsets(recipe, run_id),
            {role: adapter_dir(v.source) for role, v in current.roles.items()},
            {"computed_by": f"evaluate of run {run_id}", "system_version": str(system_version)},
        )
    except Exception as exc:  # an optimisation: the promotion itself has happened
        log.warning("promote: could not seed the evaluation cache (%s)", exc)
        return
    log.info("promote: evaluation cache for the new champion: %s", outcome)


def run(recipe: Recipe, run_id: str) -> dict[str, Any]:
    with registry_errors(recipe):
        return _run(recipe, run_id)


def _run(recipe: Recipe, run_id: str) -> dict[str, Any]:
    out = stage_output(recipe, run_id, STAGE)
    if (done := already_done(out)) is not None:
        return done
    registered = require_done(recipe, run_id, "register")
    summary = registered.manifest()["summary"]
    versions = summary.get("versions") or {}
    client = client_for(recipe)
    # The decision is written down before the registry moves, so a rerun after a crash
    # applies the same decision instead of finding its own set already champion.
    pending = out.shared_key("pending/decision.json")  # outlives the attempt, by design
    if out.store.exists(pending):
        log.info("promote: applying the decision taken before an interruption")
    else:
        out.store.write_json(
            pending, _decision(recipe, run_id, versions, summary.get("system_version"), client)
        )
    decision = out.store.read_json(pending)
    if decision["promoted"]:
        _apply(recipe, decision, client, out.store, pending)
        _seed_cache(recipe, run_id, decision["challenger_system"], client)
    out.write_json("decision.json", decision)
    out.commit(decision)
    with suppress(Exception):  # committed: the pending copy has done its job
        out.store.delete_prefix(out.shared_key("pending"))
    decided = {
        k: decision[k]
        for k in ("effect", "p_value", "questions", "repeated_questions")
        if k in decision
    } | {"promoted": float(decision["promoted"])}
    log_stage(
        recipe,
        run_id,
        STAGE,
        metrics=decided,
        artifacts={"decision.json": out.store.read_bytes(out.key("decision.json"))},
        headline={f"promote.{k}": v for k, v in decided.items() if v is not None},
    )
    finish_pipeline(recipe, run_id)
    verdict = "PROMOTED" if decision["promoted"] else "not promoted"
    print(
        f"\npromote: {verdict} — {decision['reason']}"
        + (f" vs {decision['reference']}" if decision.get("reference") else "")
    )
    return decision


def rollback(recipe: Recipe) -> dict[str, str]:
    """Move `champion` back to the set it replaced (all three roles or none)."""
    with registry_errors(recipe):
        return _rollback(recipe)


def _rollback(recipe: Recipe) -> dict[str, str]:
    previous = rollback_set(recipe)
    log.info("rollback: champion moved back to %s", previous.describe())
    return previous.role_versions
