"""Credit assignment on hand-built trees."""

from malt_ops.tree import assign_values, sibling_pairs


def build(rewards: list[list[list[int]]]) -> list[dict]:
    """rewards[g][v][r] -> a full tree with those leaf rewards."""
    nodes = []
    for gi, verifiers in enumerate(rewards):
        gid = f"g{gi}"
        nodes.append({"id": gid, "role": "generator", "parent": None})
        for vi, refiners in enumerate(verifiers):
            vid = f"{gid}.v{vi}"
            nodes.append({"id": vid, "role": "verifier", "parent": gid})
            for ri, reward in enumerate(refiners):
                nodes.append(
                    {"id": f"{vid}.r{ri}", "role": "refiner", "parent": vid, "reward": reward}
                )
    return nodes


def test_global_pooling_means_of_leaves_and_strict_threshold():
    nodes = build([[[1, 0], [1, 1]], [[1, 0], [0, 1]]])
    labels = assign_values(nodes, "global", 0.5)
    assert labels["g0.v0"].value == 0.5 and not labels["g0.v0"].positive  # a tie is negative
    assert labels["g0.v1"].value == 1.0 and labels["g0.v1"].positive
    assert labels["g0"].value == 0.75 and labels["g0"].positive
    assert labels["g1"].value == 0.5 and not labels["g1"].positive
    assert labels["g0.v0.r0"].positive and not labels["g0.v0.r1"].positive


def test_all_correct_and_all_wrong_subtrees():
    nodes = build([[[1, 1], [1, 1]], [[0, 0], [0, 0]]])
    labels = assign_values(nodes)
    assert all(labels[n["id"]].positive for n in nodes if n["id"].startswith("g0"))
    assert not any(labels[n["id"]].positive for n in nodes if n["id"].startswith("g1"))
    pairs = sibling_pairs(nodes, labels, "generator", max_per_parent=4)
    assert [(p["id"], n["id"]) for p, n in pairs] == [("g0", "g1")]
    # No mixed siblings below the generators: no verifier or refiner pairs.
    assert sibling_pairs(nodes, labels, "verifier", 4) == []
    assert sibling_pairs(nodes, labels, "refiner", 4) == []


def test_local_and_global_pooling_disagree():
    # Verifier values 1.0, 1/3, 1/3 -> global mean 5/9 (positive);
    # locally only one of three verifiers is positive -> 1/3 (negative).
    nodes = build([[[1, 1, 1], [1, 0, 0], [0, 1, 0]]])
    global_labels = assign_values(nodes, "global", 0.5)
    local_labels = assign_values(nodes, "local", 0.5)
    assert global_labels["g0"].positive
    assert abs(global_labels["g0"].value - 5 / 9) < 1e-9
    assert not local_labels["g0"].positive
    assert abs(local_labels["g0"].value - 1 / 3) < 1e-9


def test_threshold_is_configurable():
    nodes = build([[[1, 0, 0]]])
    assert not assign_values(nodes, "global", 0.5)["g0.v0"].positive
    assert assign_values(nodes, "global", 0.3)["g0.v0"].positive


def test_pairs_respect_parent_quota_and_usable_set():
    nodes = build([[[1, 1, 0, 0]]])
    labels = assign_values(nodes)
    pairs = sibling_pairs(nodes, labels, "refiner", max_per_parent=3)
    assert len(pairs) == 3
    assert all(p["parent"] == n["parent"] for p, n in pairs)
    assert {p["id"] for p, _ in pairs} == {"g0.v0.r0", "g0.v0.r1"}  # round-robin over positives
    only_second = sibling_pairs(nodes, labels, "refiner", 4, usable={"g0.v0.r1"})
    assert {p["id"] for p, _ in only_second} == {"g0.v0.r1"}


def test_a_value_at_the_threshold_is_counted_left_of_it():
    # Regression (issue 22 item 10): V = 0.5 is negative (positive needs V > 0.5) but its bin
    # was [0.5, 0.6), drawn right of the threshold line at 0.5.
    from malt_ops.stages.label import value_bin

    assert value_bin(0.5) == 4  # (0.4, 0.5]: left of the line, with the other negatives
    assert value_bin(0.51) == 5
    assert value_bin(0.0) == 0 and value_bin(1.0) == 9 and value_bin(0.1) == 0


def test_label_counts_the_corrections_the_refiner_leaves_offer():
    """Issue 18: of the refiner leaves under a wrong generator answer, how many fixed it; of
    those under a right one, how many broke it."""
    from malt_ops.stages.label import _correction_shares, _refiner_flips

    nodes = build([[[1, 0], [0, 0]], [[1, 0], [1, 1]]])
    generator_right = {"g0": False, "g1": True}
    for node in nodes:
        gen = node["id"].split(".")[0]
        node["correct"] = (
            bool(node["reward"]) if node["role"] == "refiner" else generator_right[gen]
        )
    shares = _correction_shares(_refiner_flips(nodes, {n["id"]: n for n in nodes}))
    assert shares == {
        "leaves_under_wrong": 4,
        "fixed": 1,
        "fixed_share": 0.25,
        "leaves_under_right": 4,
        "broken": 1,
        "broken_share": 0.25,
    }
