"""Credit assignment on MALT trees: pure functions, no I/O.

A tree is the list of nodes sampled for one question. Each node is a dict with ``id``,
``role``, ``parent`` (None for generator outputs) and, for refiner leaves, ``reward``.
Values propagate bottom-up (value iteration); a node is positive when its value is
strictly above the threshold.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import product
from typing import Any, Literal

Pooling = Literal["global", "local"]


@dataclass(frozen=True)
class NodeLabel:
    value: float
    positive: bool


def children_of(nodes: list[dict[str, Any]]) -> dict[str | None, list[dict[str, Any]]]:
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for node in nodes:
        children[node["parent"]].append(node)
    return children


def assign_values(
    nodes: list[dict[str, Any]], pooling: Pooling = "global", threshold: float = 0.5
) -> dict[str, NodeLabel]:
    """Value and label of every node.

    global: V(leaf) = reward, V(node) = mean of its children's values (for a full tree,
    the mean of its leaves). local: V(node) = share of its children that are positive
    (a majority vote of the direct children).
    """
    children = children_of(nodes)
    labels: dict[str, NodeLabel] = {}

    def visit(node: dict[str, Any]) -> NodeLabel:
        kids = children.get(node["id"], [])
        if not kids:
            value = float(node.get("reward") or 0.0)
        else:
            kid_labels = [visit(kid) for kid in kids]
            if pooling == "global":
                value = sum(k.value for k in kid_labels) / len(kid_labels)
            else:
                value = sum(k.positive for k in kid_labels) / len(kid_labels)
        label = NodeLabel(value, value > threshold)
        labels[node["id"]] = label
        return label

    for root in children.get(None, []):
        visit(root)
    return labels


def sibling_pairs(
    nodes: list[dict[str, Any]],
    labels: dict[str, NodeLabel],
    role: str,
    max_per_parent: int,
    usable: set[str] | None = None,
) -> list[tuple[dict, dict]]:
    """(positive, negative) pairs of ``role`` nodes under the same parent.

    ``usable`` limits which nodes may be the chosen side (e.g. finished, non-empty outputs).
    Pairs are taken round-robin over positives so one positive does not fill the quota.
    """
    groups: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for node in nodes:
        if node["role"] == role:
            groups[node["parent"]].append(node)
    pairs = []
    for siblings in groups.values():
        positives = [
            n
            for n in siblings
            if labels[n["id"]].positive and (usable is None or n["id"] in usable)
        ]
        negatives = [n for n in siblings if not labels[n["id"]].positive]
        combos = sorted(
            product(range(len(positives)), range(len(negatives))), key=lambda ij: (ij[1], ij[0])
        )
        pairs.extend((positives[i], negatives[j]) for i, j in combos[:max_per_parent])
    return pairs
