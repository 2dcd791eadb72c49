"""What each stage's output is made from: the recipe keys it reads and the manifests it consumed.

A committed manifest records both (``provenance``), so a rerun under the same run id can tell
"this output was made from what the recipe now says" from "it was made from something else"
(issue 22 item 6). The table below is the one place that says which recipe keys matter to
which stage; a stage's record also holds every key of the stages before it, because its
output depends on theirs (label's datasets change with ``sampling.n`` as much as the trees do).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from malt_ops.config import TRAINED, Recipe

ORDER = ("prepare", "sample", "label", "train", "evaluate", "register", "promote")
"""Stage order: a stage's output depends on every stage before it."""

_LABEL_TRAINING = tuple(
    f"training.{role}.{key}" for role in TRAINED for key in ("max_length", "dpo")
)

STAGE_READS: dict[str, tuple[str, ...]] = {
    # The data source, split and seed decide the problems.
    "prepare": ("data",),
    # checkpoint_every only sets the checkpoint size: the trees are the same (see sample.py).
    "sample": (
        "model",
        "inference",
        *(f"sampling.{key}" for key in ("n", "m", "l", "temperature", "top_p")),
        "sampling.role_temperatures",
        "sampling.max_new_tokens",
        "sampling.num_shards",
        "sampling.seed",
        "sampling.policy",
        "sampling.adapters",
    ),
    # The label rules, and the token budget it checks per trained role.
    "label": ("labeling", *_LABEL_TRAINING),
    # One role's hyperparameters ("{unit}" is the role) and the shared training seed.
    "train": ("training.{unit}", "training.seed"),
    "evaluate": ("evaluation",),
    # The registered models' names.
    "register": ("tracking.model_prefix",),
    "promote": ("promotion",),
}
"""The recipe keys (sections or dotted keys) each stage reads itself; ``{unit}`` is filled
with the unit (the role of a train unit). A stage's provenance adds all earlier stages'."""


def _expand(stage: str, unit: str | None) -> list[str]:
    keys = []
    for key in STAGE_READS[stage]:
        if "{unit}" in key:
            # A stage after train depends on every role's training (evaluate loads them all).
            units = [unit] if stage == "train" and unit else list(TRAINED)
            keys += [key.format(unit=u) for u in units]
        else:
            keys.append(key)
    return keys


def read_keys(stage: str, unit: str | None = None) -> list[str]:
    """Every recipe key the output of ``stage`` (``unit``) depends on, its own and upstream."""
    keys: list[str] = []
    for earlier in ORDER[: ORDER.index(stage) + 1]:
        keys += _expand(earlier, unit if earlier == stage else None)
    return keys


def _flatten(prefix: str, value: Any, into: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, child in value.items():
            _flatten(f"{prefix}.{key}", child, into)
    else:
        into[prefix] = value


def recipe_values(recipe: Recipe, stage: str, unit: str | None = None) -> dict[str, Any]:
    """Dotted key -> value of every recipe value that ``stage`` depends on."""
    dumped = recipe.model_dump(mode="json")
    values: dict[str, Any] = {}
    for key in read_keys(stage, unit):
        node: Any = dumped
        for part in key.split("."):
            node = node[part]
        _flatten(key, node, values)
    return values


def digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def input_units(recipe: Recipe, stage: str) -> list[tuple[str, str | None]]:
    """The (stage, unit) manifests that ``stage`` consumes."""
    train = [("train", role) for role in TRAINED]
    return {
        "prepare": [],
        "sample": [("prepare", None)],
        "label": [
            ("prepare", None),
            *(("sample", f"shard-{k}") for k in range(recipe.sampling.num_shards)),
        ],
        "train": [("label", None)],
        "evaluate": [("prepare", None), *train],
        "register": [("prepare", None), ("evaluate", None), *train],
        "promote": [("prepare", None), ("evaluate", None), ("register", None)],
    }[stage]


def changed_keys(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: old -> new' for each recipe value that differs. A key only one side has counts,
    unless the other side's value is null: a key added to the recipe later with a null
    default means what outputs made before it were made with."""
    missing = "(unset)"

    def value(side: dict[str, Any], key: str) -> Any:
        return side.get(key, missing)

    return [
        f"{key}: {json.dumps(value(recorded, key))} -> {json.dumps(value(current, key))}"
        for key in sorted(set(recorded) | set(current))
        if value(recorded, key) != value(current, key)
        and not _added_as_null(value(recorded, key), value(current, key), missing)
    ]


def _added_as_null(old: Any, new: Any, missing: str) -> bool:
    return (old == missing and new is None) or (old is None and new == missing)


def first_stage(changes: list[str]) -> str:
    """The earliest stage that reads one of the changed keys (``changed_keys`` lines): the one
    to redo, the rest following it."""
    keys = [change.split(": ", 1)[0] for change in changes]
    for stage in ORDER:
        own = [k.replace("{unit}", "") for k in STAGE_READS[stage]]
        if any(
            key == k or key.startswith(k if k.endswith(".") else f"{k}.")
            for key in keys
            for k in own
        ):
            return stage
    return ORDER[-1]


def later_stages(stage: str) -> tuple[str, ...]:
    return ORDER[ORDER.index(stage) + 1 :]
