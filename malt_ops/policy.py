"""The sampling policy of one pipeline run: resolved once, recorded, read by every shard.

With ``sampling.policy: champion`` the policy is whatever set the registry's system alias
``champion`` names when the run is planned. It is resolved once (the DAG's plan task, or
the first ``malt-ops sample`` of a run started from the CLI) and written to
``runs/<run_id>/plan/policy.json``; every shard reads that record, so the shards of one
run never sample with different sets, and a champion promoted mid-run does not leak in.
"No champion" is only what a reachable registry says: a registry that cannot answer
raises ``RegistryUnavailable`` and nothing is recorded, so the task fails and is retried.
"""

from __future__ import annotations

from typing import Any

from malt_ops.config import ROLES, Recipe
from malt_ops.storage import open_store, run_prefix

POLICY_FILE = "policy.json"


def policy_key(run_id: str) -> str:
    return f"{run_prefix(run_id, 'plan')}/{POLICY_FILE}"


def resolve_policy(recipe: Recipe) -> dict[str, Any]:
    """What the recipe's sampling policy names right now (reads the registry once)."""
    if recipe.sampling.policy != "champion":
        paths = {role: getattr(recipe.sampling.adapters, role) for role in ROLES}
        return {"kind": "adapters", "system_version": None, "roles": paths}
    from malt_ops.registry import champion_adapters

    champion = champion_adapters(recipe)
    if champion is None:
        return {"kind": "champion", "system_version": None, "roles": dict.fromkeys(ROLES)}
    return {
        "kind": "champion",
        "system_version": champion.version,
        "roles": {role: champion.roles[role].source for role in ROLES},
        "role_versions": champion.role_versions,
        "base_model_sha256": champion.tags.get("base_model_sha256"),
    }


def run_policy(recipe: Recipe, run_id: str) -> dict[str, Any]:
    """The policy recorded for ``run_id``, resolving and recording it on first use."""
    store = open_store(recipe.storage.root)
    key = policy_key(run_id)
    if store.exists(key):
        return store.read_json(key)
    policy = resolve_policy(recipe)
    store.write_json(key, policy)
    return policy


def _check_base_model(recipe: Recipe, policy: dict[str, Any]) -> None:
    """LoRA adapters of another base model of the same shape load without an error and
    sample nonsense, so the champion's recorded base model hash must be this recipe's."""
    import logging

    from malt_ops.errors import MaltError
    from malt_ops.models import base_model_sha256

    recorded = policy.get("base_model_sha256")
    if not recorded:
        logging.getLogger("malt_ops").warning(
            "sample: champion system v%s records no base model hash; cannot check that its "
            "adapters were trained on this base model",
            policy["system_version"],
        )
        return
    ours = base_model_sha256(recipe.model)
    if recorded != ours:
        raise MaltError(
            f"the champion system v{policy['system_version']} was trained on another base model "
            f"(sha {recorded[:12]}, this recipe's model is {ours[:12]}): sample with the base "
            "model (--set sampling.policy=adapters) or use the champion's model.*"
        )


def policy_adapter_paths(recipe: Recipe, policy: dict[str, Any]) -> dict[str, str | None]:
    """role -> local adapter directory for a recorded policy (None = the base model)."""
    if policy["kind"] != "champion":
        return dict(policy["roles"])
    from malt_ops.registry import adapter_dir

    if policy["system_version"] is not None:
        _check_base_model(recipe, policy)

    return {
        role: str(adapter_dir(source)) if source is not None else None
        for role, source in policy["roles"].items()
    }
