"""The evaluation cache: a system's per-question results, stored under what made them.

promote compares the challenger with the champion on this run's test subsets. The champion
is usually the same set cycle after cycle, so its results are kept in the store under
``<storage.root>/cache/evaluations/<key>/`` and a later promote reads them instead of running
the model again. The key is a hash of everything a result depends on, in three families:

- models: the base model's content hash and each role adapter's content hash (not the
  registry's version numbers: a re-created registry reuses them for other weights);
- questions: a digest of each evaluation seed's subset, every field of every question, in order;
- settings: the evaluation section (votes, temperature, top_p, max_new_tokens, seeds,
  subset size), the benchmark (it picks the grader), the model and inference sections (dtype,
  backend, batch size, engine options), the seed scheme, the source of the code that builds
  prompts, grades answers and runs the backends, and the versions of torch, transformers,
  peft (and vLLM with that backend).

Anything not in the key cannot change a result; anything that might is in it, so a change
costs one evaluation and never serves stale results.

An entry is ``results.jsonl`` and then ``entry.json``, which records the key and the results'
sha256; each file is written atomically and the entry exists only once ``entry.json`` does.
A reader checks the key and the digest, and that the rows are exactly the questions asked
for; an entry that fails is ignored with a warning and computed again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from malt_ops.backends import InferenceBackend
from malt_ops.config import ROLES, Recipe
from malt_ops.evaluation import SEED_BASE, run_system
from malt_ops.models import model_identity
from malt_ops.seeding import SEED_SCHEME
from malt_ops.storage import Store, dumps_jsonl, open_store

log = logging.getLogger("malt_ops")

EVAL_CACHE = "cache/evaluations"
"""Under storage.root: one directory per evaluation key."""
EVALUATION_KEY = "evaluation_key.json"
"""In evaluate's output: system -> the key of its results there (``EvaluationKey.as_dict``)."""
CACHE_FORMAT = 1
"""Bump when the layout or meaning of an entry changes: old entries then miss."""

RESULT_MODULES = (
    "malt_ops.evaluation",
    "malt_ops.chains",
    "malt_ops.prompts",
    "malt_ops.grading",
    "malt_ops.seeding",
    "malt_ops.models",
    "malt_ops.backends.base",
)
"""Modules whose code decides a result whatever the backend; the backend's own module is
added to these. Their source is hashed rather than versioned by hand: a forgotten version
bump would serve results of the old code."""
BACKEND_MODULES = {"hf": "malt_ops.backends.hf", "vllm": "malt_ops.backends.vllm"}
LIBRARIES = {"hf": ("torch", "transformers", "peft"), "vllm": ("torch", "vllm", "peft")}


@dataclass(frozen=True)
class EvaluationKey:
    """The cache key of one system's evaluation: its digest and the record it hashes."""

    digest: str
    parts: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "parts": self.parts}


def _json_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _source_digest(module: str) -> str:
    spec = importlib.util.find_spec(module)
    origin = getattr(spec, "origin", None)
    if not origin or not Path(origin).is_file():
        return "unknown"  # no source to hash: the library versions still key the entry
    return hashlib.sha256(Path(origin).read_bytes()).hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def settings_part(recipe: Recipe) -> dict[str, Any]:
    """Every recipe key and piece of code that can change an evaluation result."""
    backend = recipe.inference.backend
    inference = recipe.inference.model_dump(mode="json")
    if backend != "vllm":
        inference.pop("vllm", None)  # engine options of a backend that is not used
    modules = (*RESULT_MODULES, BACKEND_MODULES[backend])
    return {
        # The comparisons only read the results (malt_ops.comparisons): a new list reuses them.
        "evaluation": recipe.evaluation.model_dump(mode="json", exclude={"comparisons"}),
        "benchmark": recipe.data.benchmark,
        "model": model_identity(recipe.model),
        "inference": inference,
        "seed_scheme": SEED_SCHEME,
        "seed_base": SEED_BASE,
        "code": {module: _source_digest(module) for module in modules},
        "libraries": {package: _version(package) for package in LIBRARIES[backend]},
    }


def questions_part(problems_by_seed: dict[int, list[dict[str, Any]]]) -> dict[str, str]:
    """Evaluation seed -> digest of its subset (every field of every question, in order)."""
    return {str(seed): _json_digest(problems) for seed, problems in problems_by_seed.items()}


def adapter_digests(adapter_dirs: dict[str, Path | None]) -> dict[str, str | None]:
    """Role -> content hash of its adapter directory (None: the base model in that role)."""
    from malt_ops.models import adapter_digest

    return {
        role: None if adapter_dirs[role] is None else adapter_digest(Path(adapter_dirs[role]))
        for role in ROLES
    }


def evaluation_key(
    recipe: Recipe,
    digests: dict[str, str | None],
    problems_by_seed: dict[int, list[dict[str, Any]]],
) -> EvaluationKey:
    """The key of evaluating the system with role adapters ``digests`` on these subsets."""
    from malt_ops.models import base_model_sha256

    parts = {
        "format": CACHE_FORMAT,
        "models": {
            "base_model_sha256": base_model_sha256(recipe.model),
            "adapters": {role: digests[role] for role in ROLES},
        },
        "questions": questions_part(problems_by_seed),
        "settings": settings_part(recipe),
    }
    return EvaluationKey(_json_digest(parts), parts)


def _entry_keys(key: EvaluationKey) -> tuple[str, str]:
    prefix = f"{EVAL_CACHE}/{key.digest}"
    return f"{prefix}/results.jsonl", f"{prefix}/entry.json"


def _rows(scored: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"seed": seed, **q} for seed, questions in scored.items() for q in questions]


def _by_seed(
    rows: list[dict[str, Any]], problems_by_seed: dict[int, list[dict[str, Any]]]
) -> dict[int, list[dict[str, Any]]]:
    """Rows (each with its ``seed``) as seed -> per-question results; ValueError unless they
    are exactly the subsets' questions, in order."""
    scored: dict[int, list[dict[str, Any]]] = {seed: [] for seed in problems_by_seed}
    for row in rows:
        seed = row.get("seed")
        if seed not in scored:
            raise ValueError(f"it holds evaluation seed {seed}, which was not asked for")
        scored[seed].append({k: v for k, v in row.items() if k not in ("seed", "system")})
    for seed, problems in problems_by_seed.items():
        if [q.get("question_id") for q in scored[seed]] != [p["id"] for p in problems]:
            raise ValueError(f"its seed {seed} rows are not that subset's questions")
    return scored


def lookup(
    store: Store, key: EvaluationKey, problems_by_seed: dict[int, list[dict[str, Any]]]
) -> dict[int, list[dict[str, Any]]] | None:
    """The cached results under ``key`` (seed -> per-question rows, in the subsets' order),
    or None when there is no entry or the entry is unusable (then with a warning)."""
    results_key, entry_key = _entry_keys(key)
    if not store.exists(entry_key):
        return None
    try:
        entry = store.read_json(entry_key)
        data = store.read_bytes(results_key)
        if entry.get("key") != key.parts:
            raise ValueError("its recorded key differs from its directory's")
        if hashlib.sha256(data).hexdigest() != entry.get("results_sha256"):
            raise ValueError("results.jsonl does not match its recorded sha256")
        rows = [json.loads(line) for line in data.decode("utf-8").split("\n") if line.strip()]
        scored = _by_seed(rows, problems_by_seed)
    except Exception as exc:  # any unreadable entry is a miss, never a failed promote
        log.warning(
            "evaluation cache entry %s is unusable (%s): ignoring it and evaluating again",
            store.uri(entry_key),
            exc,
        )
        return None
    return scored


def store_results(
    store: Store,
    key: EvaluationKey,
    scored: dict[int, list[dict[str, Any]]],
    origin: dict[str, Any],
) -> None:
    """Write an entry: the results first, the entry record (with their sha256) last, so an
    interrupted write leaves no entry. ``origin`` says who computed them (for people)."""
    results_key, entry_key = _entry_keys(key)
    data = dumps_jsonl(_rows(scored))
    store.write_bytes(results_key, data)
    store.write_json(
        entry_key,
        {
            "key": key.parts,
            "results_sha256": hashlib.sha256(data).hexdigest(),
            "items": sum(len(q) for q in scored.values()),
            "origin": origin,
        },
    )


def cached_system_results(
    recipe: Recipe,
    problems_by_seed: dict[int, list[dict[str, Any]]],
    adapter_dirs: dict[str, Path | None],
    backend_factory: Callable[[], InferenceBackend],
    desc: str,
    origin: dict[str, Any] | None = None,
) -> tuple[dict[int, list[dict[str, Any]]], EvaluationKey, str]:
    """A system's per-question results on these subsets, from the cache when it has them.

    ``adapter_dirs``: role -> local adapter directory, or None for the base model. The
    backend is created only on a miss. Returns (results, key, "cache" or "evaluated").
    """
    digests = adapter_digests(adapter_dirs)
    key = evaluation_key(recipe, digests, problems_by_seed)
    store = open_store(recipe.storage.root)
    if (cached := lookup(store, key, problems_by_seed)) is not None:
        log.info("evaluate %s: results from the evaluation cache (%s)", desc, key.digest[:12])
        return cached, key, "cache"
    backend = backend_factory()
    names: dict[str, str | None] = dict.fromkeys(ROLES)
    for role in ROLES:
        if (digest := digests[role]) is None:
            continue
        # Named by content: a backend that already holds this name holds these weights.
        names[role] = f"{desc}-{role}-{digest[:12]}"
        if names[role] not in getattr(backend, "adapters", {}):
            backend.add_adapter(names[role], str(adapter_dirs[role]))
    scored = run_system(problems_by_seed, backend, names, recipe, desc)
    try:
        store_results(store, key, scored, origin or {"computed_for": desc})
    except Exception as exc:  # the results are in hand: a failed cache write costs a rerun
        log.warning("evaluation cache: could not write %s (%s)", key.digest[:12], exc)
    return scored, key, "evaluated"


def seed_from_evaluation(
    recipe: Recipe,
    recorded: dict[str, Any],
    rows: list[dict[str, Any]],
    problems_by_seed: dict[int, list[dict[str, Any]]],
    adapter_dirs: dict[str, Path | None],
    origin: dict[str, Any],
) -> str:
    """Store evaluate's own results for a set that just became champion, so the next
    cycle's promote reads them instead of running the set again.

    ``recorded``: the key evaluate computed for its system (``EvaluationKey.as_dict``), from
    the adapters it loaded; ``adapter_dirs``: the champion's adapters as the registry serves
    them; ``rows``: evaluate's per-question rows of that system (with ``seed``). Only an
    exact key match is stored. Returns what happened, for the log.
    """
    key = evaluation_key(recipe, adapter_digests(adapter_dirs), problems_by_seed)
    if recorded.get("digest") != key.digest:
        differs = [
            family
            for family in key.parts
            if recorded.get("parts", {}).get(family) != key.parts[family]
        ]
        return f"not seeded: evaluate's key differs in {', '.join(differs) or 'its digest'}"
    store = open_store(recipe.storage.root)
    if lookup(store, key, problems_by_seed) is not None:
        return f"already cached ({key.digest[:12]})"
    try:
        scored = _by_seed(rows, problems_by_seed)
    except ValueError as exc:
        return f"not seeded: evaluate's per-question rows do not fit ({exc})"
    store_results(store, key, scored, origin)
    return f"seeded {key.digest[:12]} from evaluate"
