"""G -> V -> R chains: expand one tree per question, level by level across all questions.

Shared by the sample stage (training trees) and by evaluate and promote (test chains).
Each request's seed comes from its identity alone (``malt_ops.seeding``): the caller's seed
base for the question (which stage, which run seed), the question id, the parent node's path
and the role. So a tree is the same whatever other questions are expanded with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from malt_ops.backends import InferenceBackend, SamplingParams
from malt_ops.config import SamplingConfig
from malt_ops.errors import MaltError
from malt_ops.grading import grade_many
from malt_ops.prompts import generator_messages, refiner_messages, verifier_messages
from malt_ops.seeding import derive_seed

SeedBase = tuple[str | int, ...]
"""What a question's requests are seeded from besides the question: e.g. ("sample", 0)."""
PREFIX = {"generator": "g", "verifier": "v", "refiner": "r"}


def _node(node_id: str, role: str, parent: str | None, completion, grade) -> dict[str, Any]:
    return {
        "id": node_id,
        "role": role,
        "parent": parent,
        "text": completion.text,
        "answer": grade.answer,
        "correct": grade.correct,
        "fallback": grade.fallback,
        "finished": completion.finished,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
    }


def expand_trees(
    problems: list[dict[str, Any]],
    backend: InferenceBackend,
    sampling: SamplingConfig,
    adapters: dict[str, str | None],
    seed_bases: Sequence[SeedBase],
    generator_only: bool = False,
) -> list[dict[str, Any]]:
    """One tree per problem: n + n*m + n*m*l nodes, leaves carrying their reward.

    ``generator_only``: stop after the n generator samples (the STaR baseline's own samples);
    they are seeded exactly as the generator level of a full tree.

    ``seed_bases``: one per problem; the sample stage passes ("sample", sampling.seed) for
    all, evaluate ("evaluate", evaluation seed) per problem.
    """
    if len(seed_bases) != len(problems):
        raise MaltError(f"{len(seed_bases)} seed bases for {len(problems)} problems")

    trees = [{"problem": p, "nodes": []} for p in problems]

    def grow(role: str, n: int, parents: list[tuple[int, dict | None, dict | None]]):
        """parents: (tree index, generator node, verifier node); returns the new nodes' keys."""
        prompts, seeds = [], []
        for tree_index, gen, ver in parents:
            problem = problems[tree_index]
            if role == "generator":
                prompts.append(generator_messages(problem))
            elif role == "verifier":
                prompts.append(verifier_messages(problem, gen["text"]))
            else:
                prompts.append(refiner_messages(problem, gen["text"], ver["text"]))
            parent = ver if role == "refiner" else gen
            path = parent["id"] if parent else ""
            seeds.append(derive_seed(*seed_bases[tree_index], str(problem["id"]), path, role))
        params = SamplingParams(
            n=n,
            temperature=sampling.temperature_of(role),
            top_p=sampling.top_p,
            max_new_tokens=getattr(sampling.max_new_tokens, role),
            seeds=tuple(seeds),
        )
        outputs = backend.generate(prompts, params, adapter=adapters[role], desc=role)
        flat = [
            (parent, k, c)
            for parent, completions in zip(parents, outputs, strict=True)
            for k, c in enumerate(completions)
        ]
        grades = grade_many([problems[p[0]] for p, _, _ in flat], [c.text for _, _, c in flat])
        created = []
        for ((tree_index, gen, ver), k, completion), grade in zip(flat, grades, strict=True):
            parent = ver if role == "refiner" else gen
            node_id = f"{parent['id']}.{PREFIX[role]}{k}" if parent else f"{PREFIX[role]}{k}"
            node = _node(node_id, role, parent["id"] if parent else None, completion, grade)
            if role == "refiner":
                node["reward"] = 1.0 if grade.correct else 0.0
            trees[tree_index]["nodes"].append(node)
            created.append((tree_index, node))
        return created

    gens = grow("generator", sampling.n, [(i, None, None) for i in range(len(problems))])
    if generator_only:
        return trees
    vers = grow("verifier", sampling.m, [(i, g, None) for i, g in gens])
    # Node ids repeat from tree to tree (every tree has a g0): key parents by tree too, or a
    # refiner would be shown another question's generator answer.
    parent_gen = {(i, g["id"]): g for i, g in gens}
    grow("refiner", sampling.l, [(i, parent_gen[(i, v["parent"])], v) for i, v in vers])
    return trees
