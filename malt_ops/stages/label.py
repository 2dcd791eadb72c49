"""label: trees -> per-role SFT sets and DPO pairs (TRL conversational format) + stats.

The token budget is checked here, on the rows as written: per trained role and dataset, the
rows that TRL would cut at ``training.<role>.max_length`` are counted (stats.json
``token_budget``, MLflow ``truncated.<dataset>``), and a role whose longest prompt leaves no
room for ``sampling.max_new_tokens`` more tokens fails the stage before anything is written.
That needs the base model's tokenizer (transformers); where it is not installed (the light
image) the check is skipped, logged and counted (``token_budget.unchecked_rows``), and the
train stage, which has the tokenizer, runs the same check for its role before training. The
recipe itself is checked earlier against a bound that needs no tokenizer (config.py).
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from malt_ops.config import ROLES, TRAINED, LabelingConfig, Recipe
from malt_ops.errors import MaltError
from malt_ops.grading import MAX_OUTPUT_CHARS
from malt_ops.plots import value_histograms
from malt_ops.prompts import Messages, generator_messages, refiner_messages, verifier_messages
from malt_ops.stages.common import already_done, check_made_with, log, require_done, stage_output
from malt_ops.tracking import log_stage, stage_artifacts
from malt_ops.tree import assign_values, sibling_pairs

STAGE = "label"
HISTOGRAM_BINS = 10
HELP = (
    "Propagate leaf rewards up each tree (value iteration) and write per-role SFT and DPO datasets."
)


def role_prompt(problem: dict[str, Any], node: dict[str, Any], by_id: dict[str, dict]) -> Messages:
    """The exact chat prompt the role saw when it produced ``node``."""
    if node["role"] == "generator":
        return generator_messages(problem)
    if node["role"] == "verifier":
        return verifier_messages(problem, by_id[node["parent"]]["text"])
    verifier = by_id[node["parent"]]
    return refiner_messages(problem, by_id[verifier["parent"]]["text"], verifier["text"])


_PARENT_ROLE = {"generator": None, "verifier": "generator", "refiner": "verifier"}


def _check_tree(tree: Any) -> str | None:
    """Reason to skip a malformed tree, or None."""
    if not isinstance(tree, dict):
        return "tree is not a JSON object"
    if not isinstance(tree.get("problem"), dict):
        return "tree without a problem"
    problem = tree["problem"]
    if not all(isinstance(problem.get(k), str) for k in ("id", "question", "benchmark")):
        return "problem without id, question or benchmark"
    nodes = tree.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        return "tree without nodes"
    roles: dict[str, str] = {}
    for node in nodes:
        if (
            not isinstance(node, dict)
            or node.get("role") not in ROLES
            or not isinstance(node.get("id"), str)
        ):
            return "node without id or with an unknown role"
        if node["id"] in roles:
            return "duplicate node id"
        parent = node.get("parent")
        if parent is not None and parent not in roles:
            return "node whose parent is missing"
        if (roles[parent] if parent is not None else None) != _PARENT_ROLE[node["role"]]:
            return "node under a parent of the wrong role"
        if node.get("text") is not None and not isinstance(node["text"], str):
            return "node text is not a string"
        reward = node.get("reward")
        if reward is not None and (
            isinstance(reward, bool) or not isinstance(reward, int | float) or not 0 <= reward <= 1
        ):
            return "reward is not a number from 0 to 1"
        roles[node["id"]] = node["role"]
    return None


def value_bin(value: float) -> int:
    """The histogram bin of a node value: right-closed bins (0.4, 0.5], so a value equal to
    the default threshold (negative: positives need V > threshold) is drawn left of it."""
    return min(HISTOGRAM_BINS - 1, max(0, math.ceil(value * HISTOGRAM_BINS - 1e-9) - 1))


def _usable(node: dict[str, Any]) -> bool:
    """A finished, non-empty output of sane length: the only kind ever taught as good."""
    text = node.get("text") or ""
    return bool(node.get("finished", True) and text.strip() and len(text) <= MAX_OUTPUT_CHARS)


def _has_ancestor_in(node: dict[str, Any], by_id: dict[str, dict], ids: set[str]) -> bool:
    parent = node.get("parent")
    while parent is not None:
        if parent in ids:
            return True
        parent = by_id[parent].get("parent")
    return False


def _star_rows(problem: dict[str, Any], nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """STaR rows: the base generator's own samples whose answer is right."""
    return [
        {
            "messages": [
                *generator_messages(problem),
                {"role": "assistant", "content": node["text"]},
            ],
            "question_id": problem["id"],
            "node_id": node["id"],
            "value": 1.0,
        }
        for node in nodes
        if node["role"] == "generator" and node.get("correct") and _usable(node)
    ]


def label_trees(
    trees: list[dict[str, Any]],
    cfg: LabelingConfig,
    star_trees: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, list], dict[str, Any]]:
    """Datasets ``{role}_sft`` / ``{role}_dpo`` and the label statistics.

    ``star_trees``: the base generator's own samples per question (sample's ``star/``
    files), which the STaR baseline trains on. None: the trees' generator nodes (right only
    when the trees were sampled with the base generator).
    """
    datasets: dict[str, list] = {f"{role}_{kind}": [] for role in ROLES for kind in ("sft", "dpo")}
    # STaR baseline: generator outputs whose own answer is right, regardless of the chain.
    datasets["star_sft"] = []
    per_role = {role: Counter() for role in (*ROLES, "star")}
    histograms = {role: [0] * HISTOGRAM_BINS for role in ROLES}
    skipped: Counter = Counter()
    no_positive = 0
    flips: Counter = Counter()
    for tree in trees:
        if reason := _check_tree(tree):
            skipped[reason] += 1
            continue
        problem, nodes = tree["problem"], tree["nodes"]
        by_id = {n["id"]: n for n in nodes}
        flips.update(_refiner_flips(nodes, by_id))
        labels = assign_values(nodes, cfg.pooling, cfg.threshold)
        for node in nodes:
            histograms[node["role"]][value_bin(labels[node["id"]].value)] += 1
        # A truncated, empty or runaway output is never taught as good, though it may be the
        # rejected side.
        # A node under a runaway parent saw that parent's text in its prompt: its rows would
        # be cut to max_length (or refused by the token budget), so it is not taught either.
        runaway = {n["id"] for n in nodes if len(n.get("text") or "") > MAX_OUTPUT_CHARS}
        under_runaway = {n["id"] for n in nodes if _has_ancestor_in(n, by_id, runaway)}
        usable = {n["id"] for n in nodes if _usable(n) and n["id"] not in under_runaway}
        if not any(label.positive for label in labels.values()):
            no_positive += 1
        if star_trees is None:
            datasets["star_sft"].extend(_star_rows(problem, nodes))
        for node in nodes:
            label = labels[node["id"]]
            stats = per_role[node["role"]]
            stats["nodes"] += 1
            stats["positives" if label.positive else "negatives"] += 1
            if label.positive and node["id"] not in usable:
                stats["positives_unusable"] += 1
                continue
            if label.positive:
                datasets[f"{node['role']}_sft"].append(
                    {
                        "messages": [
                            *role_prompt(problem, node, by_id),
                            {"role": "assistant", "content": node["text"]},
                        ],
                        "question_id": problem["id"],
                        "node_id": node["id"],
                        "value": label.value,
                    }
                )
        for role in ROLES:
            for chosen, rejected in sibling_pairs(
                nodes, labels, role, cfg.max_pairs_per_parent, usable
            ):
                datasets[f"{role}_dpo"].append(
                    {
                        "prompt": role_prompt(problem, chosen, by_id),
                        "chosen": [{"role": "assistant", "content": chosen["text"]}],
                        "rejected": [{"role": "assistant", "content": rejected["text"] or ""}],
                        "question_id": problem["id"],
                        "chosen_id": chosen["id"],
                        "rejected_id": rejected["id"],
                    }
                )
                per_role[role]["pairs"] += 1
    for star_tree in star_trees or []:
        if reason := _check_tree(star_tree):
            skipped[f"STaR samples: {reason}"] += 1
            continue
        datasets["star_sft"].extend(_star_rows(star_tree["problem"], star_tree["nodes"]))
    per_role["star"]["positives"] = len(datasets["star_sft"])
    stats = {
        "pooling": cfg.pooling,
        "threshold": cfg.threshold,
        "questions": len(trees) - sum(skipped.values()),
        "questions_without_positive": no_positive,
        "skipped": dict(skipped),
        "value_histograms": histograms,
        "roles": {
            role: {
                k: per_role[role].get(k, 0)
                for k in ("nodes", "positives", "negatives", "pairs", "positives_unusable")
            }
            for role in ROLES
        },
        "star": {"positives": per_role["star"].get("positives", 0)},
        "corrections": _correction_shares(flips),
    }
    return datasets, stats


def _refiner_flips(nodes: list[dict[str, Any]], by_id: dict[str, dict]) -> Counter:
    """Refiner leaves by (their generator's answer right?, their own right?)."""
    flips: Counter = Counter()
    for node in nodes:
        if node["role"] != "refiner":
            continue
        verifier = by_id.get(node.get("parent"))
        generator = verifier and by_id.get(verifier.get("parent"))
        if generator:
            flips[(bool(generator.get("correct")), bool(node.get("correct")))] += 1
    return flips


def _correction_shares(flips: Counter) -> dict[str, Any]:
    """What the refiner leaves offer DPO (issue 18): of the leaves under a wrong generator
    answer, the share that fixed it; of those under a right one, the share that broke it."""
    under_wrong = flips[(False, True)] + flips[(False, False)]
    under_right = flips[(True, True)] + flips[(True, False)]
    return {
        "leaves_under_wrong": under_wrong,
        "fixed": flips[(False, True)],
        "fixed_share": flips[(False, True)] / under_wrong if under_wrong else None,
        "leaves_under_right": under_right,
        "broken": flips[(True, False)],
        "broken_share": flips[(True, False)] / under_right if under_right else None,
    }


def training_datasets(recipe: Recipe, role: str) -> list[str]:
    """The label datasets the train stage fits ``role`` on."""
    cfg = getattr(recipe.training, role)
    return [f"{role}_sft", *([f"{role}_dpo"] if cfg.dpo and role != "star" else [])]


def check_token_budget(recipe: Recipe, datasets: dict[str, list]) -> dict[str, Any]:
    """stats.json's ``token_budget``; raises MaltError when a role's prompt leaves no room."""
    used = {role: training_datasets(recipe, role) for role in TRAINED}
    try:
        import transformers  # noqa: F401 - only whether it is there
    except ImportError:
        unchecked = sum(len(datasets[name]) for names in used.values() for name in names)
        reason = "transformers is not installed here (light image): no tokenizer"
        log.warning(
            "label: token budget not checked (%s); %d rows unchecked, train checks its role",
            reason,
            unchecked,
        )
        return {"checked": False, "skip_reason": reason, "unchecked_rows": unchecked}
    from malt_ops.models import load_tokenizer, resolve_model_dir
    from malt_ops.training import token_budget

    tokenizer = load_tokenizer(resolve_model_dir(recipe.model))
    roles = {
        role: token_budget(tokenizer, recipe, role, {name: datasets[name] for name in names})
        for role, names in used.items()
    }
    return {"checked": True, "skip_reason": None, "unchecked_rows": 0, "roles": roles}


def check_coverage(
    run_id: str, questions: list[str], by_shard: dict[int, list[dict[str, Any]]]
) -> None:
    """The shards hold one tree per training question: none twice, none missing, none extra.

    Shards of two splits (``sampling.num_shards`` changed between attempts) would otherwise
    teach some questions twice and others not at all. A tree without a readable problem id
    is not counted here; label skips and counts it."""
    seen: dict[str, int] = {}
    for shard, shard_trees in sorted(by_shard.items()):
        for tree in shard_trees:
            problem = tree.get("problem") if isinstance(tree, dict) else None
            qid = problem.get("id") if isinstance(problem, dict) else None
            if not isinstance(qid, str):
                continue
            if qid in seen:
                raise MaltError(
                    f"question {qid} is in sample shards {seen[qid]} and {shard} of run "
                    f"'{run_id}': resample every shard with --force, or use a new --run-id"
                )
            seen[qid] = shard
    expected = set(questions)
    if missing := sorted(expected - set(seen)):
        raise MaltError(
            f"{len(missing)} of {len(expected)} training questions (first {missing[0]}) are in "
            f"no sample shard of run '{run_id}': resample every shard with --force, or use a "
            "new --run-id"
        )
    if extra := sorted(set(seen) - expected):
        raise MaltError(
            f"sample shard {seen[extra[0]]} of run '{run_id}' holds question {extra[0]}, which "
            "is not a training question of prepare: resample with --force, or use a new --run-id"
        )


def run(recipe: Recipe, run_id: str) -> dict[str, Any]:
    out = stage_output(recipe, run_id, STAGE)
    if (done := already_done(out)) is not None:
        return done
    num_shards = recipe.sampling.num_shards
    trees, star_trees = [], []
    by_shard: dict[int, list[dict[str, Any]]] = {}
    shards = [stage_output(recipe, run_id, "sample", f"shard-{k}") for k in range(num_shards)]
    for shard, sampled in enumerate(shards):
        if not sampled.done():
            raise MaltError(
                f"sample shard {shard} of {num_shards} has not finished for run '{run_id}': "
                f"run `malt-ops sample --shard {shard} --num-shards {num_shards}` first"
            )
    for shard, sampled in enumerate(shards):
        check_made_with(sampled, recipe)
        manifest = sampled.manifest()
        made = manifest["summary"].get("num_shards")
        if made is not None and (made, manifest["summary"].get("shard")) != (num_shards, shard):
            raise MaltError(
                f"sample shard {shard} of run '{run_id}' was sampled as shard "
                f"{manifest['summary'].get('shard')} of {made}, not of {num_shards}: resample "
                f"every shard with --force, or use a new --run-id"
            )
        by_shard[shard] = list(sampled.iter_jsonl(f"trees/shard-{shard}.jsonl"))
        trees.extend(by_shard[shard])
        if sampled.has(f"star/shard-{shard}.jsonl"):
            star_trees.extend(sampled.iter_jsonl(f"star/shard-{shard}.jsonl"))
        elif (manifest["summary"].get("policy") or {}).get("generator") is None:
            # A shard without STaR samples (an older malt-ops) sampled with the base
            # generator: its trees' generator nodes are exactly those samples.
            star_trees.extend(
                {
                    "problem": t["problem"],
                    "nodes": [n for n in t["nodes"] if n.get("role") == "generator"],
                }
                for t in by_shard[shard]
                if _check_tree(t) is None  # a malformed tree is skipped (and counted) once
            )
        else:
            raise MaltError(
                f"sample shard {shard} of run '{run_id}' was sampled with a trained generator "
                "and holds no base-generator samples for STaR (an older malt-ops): rerun "
                "sample under a new --run-id"
            )
    prepared = require_done(recipe, run_id, "prepare")
    check_coverage(run_id, [p["id"] for p in prepared.iter_jsonl("problems/train.jsonl")], by_shard)
    datasets, stats = label_trees(trees, recipe.labeling, star_trees)
    stats["token_budget"] = check_token_budget(recipe, datasets)
    for name, rows in datasets.items():
        out.write_jsonl(f"datasets/{name}.jsonl", rows)
    out.write_json("stats.json", stats)
    with tempfile.TemporaryDirectory() as scratch:
        plot = value_histograms(
            stats["value_histograms"], recipe.labeling.threshold, Path(scratch) / "values.png"
        )
        out.write_bytes("plots/values.png", plot.read_bytes())
    metrics = {
        f"{role}.{kind}": s[kind]
        for role, s in stats["roles"].items()
        for kind in ("positives", "negatives", "pairs")
    }
    metrics |= {
        "star.positives": stats["star"]["positives"],
        "questions_without_positive": stats["questions_without_positive"],
        "token_budget.unchecked_rows": stats["token_budget"]["unchecked_rows"],
    }
    metrics |= {
        f"corrections.{key}": value
        for key, value in stats["corrections"].items()
        if value is not None
    }
    for budget in stats["token_budget"].get("roles", {}).values():
        metrics |= {f"truncated.{name}": d["truncated"] for name, d in budget["datasets"].items()}
    if truncated := {k: v for k, v in metrics.items() if k.startswith("truncated.") and v}:
        log.warning(
            "label: rows longer than training.<role>.max_length, which TRL will truncate: %s",
            ", ".join(f"{k.removeprefix('truncated.')} {v}" for k, v in truncated.items()),
        )
    out.commit(stats)
    log_stage(recipe, run_id, STAGE, metrics=metrics, artifacts=stage_artifacts(out))
    rows = [
        f"{role:<10} {s['nodes']:>6} {s['positives']:>6} {s['negatives']:>6} {s['pairs']:>6}"
        for role, s in stats["roles"].items()
    ]
    corrections = stats["corrections"]
    log.info(
        "label: refiner leaves fixed %d of %d wrong generator answers, broke %d of %d right ones",
        corrections["fixed"],
        corrections["leaves_under_wrong"],
        corrections["broken"],
        corrections["leaves_under_right"],
    )
    log.info(
        "label: %d questions (%d without any positive)\n%-10s %6s %6s %6s %6s\n%s",
        stats["questions"],
        stats["questions_without_positive"],
        "role",
        "nodes",
        "pos",
        "neg",
        "pairs",
        "\n".join(rows),
    )
    return stats
