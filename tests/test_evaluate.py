"""Evaluation scoring: votes, turn-wise accuracy, flips and the ten-setting report."""

import pytest

from malt_ops.metrics import majority_vote, mean_std
from malt_ops.stages.evaluate import (
    SETTINGS,
    build_report,
    chain_records,
    format_table,
    score_question,
)


def node(node_id, role, parent, answer, correct, tokens=10):
    return {
        "id": node_id,
        "role": role,
        "parent": parent,
        "answer": answer,
        "correct": correct,
        "completion_tokens": tokens,
    }


def tree(outcomes):
    """outcomes: per chain (g_answer, g_ok, v_answer, v_ok, r_answer, r_ok)."""
    nodes = []
    for i, (ga, gc, va, vc, ra, rc) in enumerate(outcomes):
        nodes += [
            node(f"g{i}", "generator", None, ga, gc),
            node(f"g{i}.v0", "verifier", f"g{i}", va, vc),
            node(f"g{i}.v0.r0", "refiner", f"g{i}.v0", ra, rc),
        ]
    return {"problem": {"id": "q"}, "nodes": nodes}


def test_majority_vote_and_mean_std():
    assert majority_vote(["3", "4", "4"]) == 1
    assert majority_vote(["3", None, "5"]) == 0  # tie: the earliest
    assert majority_vote([None, None]) is None
    mean, std = mean_std([0.5, 1.0])
    assert mean == 0.75 and abs(std - 0.3535533905932738) < 1e-12
    assert mean_std([0.4]) == (0.4, 0.0)


def test_score_question_votes_turns_and_flips():
    chains = chain_records(
        tree(
            [
                ("1", False, "2", True, "2", True),  # wrong -> right
                ("2", True, "2", True, "1", False),  # right -> wrong
                ("1", False, "1", False, "2", True),  # wrong -> right
            ]
        )
    )
    scored = score_question(chains)
    assert scored["generator"] is False and scored["generator_mv"] is False  # "1" wins the G vote
    assert scored["refiner"] is True and scored["refiner_mv"] is True  # "2" wins the R vote
    assert scored["turns"] == [1 / 3, 2 / 3, 2 / 3]
    assert scored["wrong_to_right"] == 2 and scored["right_to_wrong"] == 1
    assert scored["tokens"]["generator"] == 10 and scored["tokens"]["refiner_mv"] == 90


def test_report_has_all_ten_settings_and_table():
    good = score_question(chain_records(tree([("2", True, "2", True, "2", True)] * 3)))
    bad = score_question(chain_records(tree([("1", False, "1", False, "1", False)] * 3)))
    results = {
        "base": {0: [bad, bad], 1: [good, bad]},
        "star": {0: [good, bad], 1: [good, bad]},
        "malt": {0: [good, good], 1: [good, good]},
    }
    report = build_report(results, [0, 1], {"untrained": []})
    names = [s["setting"] for s in report["settings"]]
    assert names == [name for name, *_ in SETTINGS] and len(names) == 10
    by_name = {s["setting"]: s for s in report["settings"]}
    assert by_name["SA"]["per_seed"] == [0.0, 0.5]
    assert by_name["MALT"]["mean"] == 1.0 and by_name["MALT"]["std"] == 0.0
    assert by_name["STaR MA+MV"]["mean"] == 0.5
    table = format_table(report)
    assert "| MALT | 100.00 ± 0.00 |" in table and "| SA | 25.00 ± 35.36 |" in table
    assert report["turnwise"]["malt"] == [1.0, 1.0, 1.0]


AIRFLOW_RUN_IDS = [
    "manual__2026-12-02T00:41:07.532118+00:00",
    "asset_triggered__2026-12-02T00:41:07.532118+00:00",
    "qwen2.5-20261202-004107",
]


@pytest.mark.model
@pytest.mark.parametrize("run_id", AIRFLOW_RUN_IDS)
def test_trained_adapters_load_under_any_run_id(run_id, recipe_file, model_dir, tmp_path):
    """Airflow's run ids (microseconds, ':' and '+') and a dotted recipe name reach PEFT."""
    from peft import LoraConfig, get_peft_model

    from malt_ops.backends.hf import HFBackend
    from malt_ops.config import TRAINED, load_recipe
    from malt_ops.models import load_model
    from malt_ops.stages.common import stage_output
    from malt_ops.stages.evaluate import system_adapters
    from malt_ops.stages.train import adapter_key

    recipe = load_recipe(recipe_file())
    store = stage_output(recipe, run_id, "train").store
    adapter = get_peft_model(
        load_model(model_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    )
    adapter.save_pretrained(tmp_path / "adapter")
    for role in TRAINED:
        for file in (tmp_path / "adapter").iterdir():
            store.write_bytes(f"{adapter_key(run_id, role)}/{file.name}", file.read_bytes())
    backend = HFBackend(model_dir, batch_size=4)
    systems, missing = system_adapters(recipe, run_id, backend)
    assert missing == {"untrained": []}
    names = {systems["malt"][role] for role in ("generator", "verifier", "refiner")}
    assert len(names) == 3 and set(backend.adapters) == names | {systems["star"]["generator"]}
    assert all("." not in name for name in backend.adapters)
