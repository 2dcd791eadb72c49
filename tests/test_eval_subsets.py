"""Evaluation test subsets: disjoint across seeds when the pool allows, and reported when not."""

import pytest

from malt_ops import evaluation  # not `test_subsets` itself: pytest would collect it
from malt_ops.config import load_recipe
from malt_ops.evaluation import question_repeats
from malt_ops.stages.common import stage_output
from malt_ops.stages.evaluate import format_table


def prepared(recipe_file, pool: int, seeds: list[int], size: int, run_id: str = "subsets"):
    recipe = load_recipe(recipe_file(evaluation={"seeds": seeds, "subset_size": size}))
    out = stage_output(recipe, run_id, "prepare")
    out.write_jsonl("problems/test.jsonl", [{"id": f"t{i:03d}"} for i in range(pool)])
    out.commit({})
    return recipe, run_id


def ids(subsets):
    return {seed: [q["id"] for q in questions] for seed, questions in subsets.items()}


def test_seeds_draw_disjoint_subsets_when_the_pool_is_large_enough(recipe_file):
    recipe, run = prepared(recipe_file, pool=16, seeds=[0, 1, 2, 3], size=4)
    drawn = ids(evaluation.test_subsets(recipe, run))
    every = [q for questions in drawn.values() for q in questions]
    assert all(len(questions) == 4 for questions in drawn.values())
    assert len(set(every)) == len(every) == 16
    repeats = question_repeats(evaluation.test_subsets(recipe, run))
    assert repeats == {"distinct_questions": 16, "items": 16, "max_repeats": 1}


@pytest.mark.parametrize("alone", [0, 2, 3])
def test_a_seeds_subset_does_not_depend_on_the_other_seeds(recipe_file, alone):
    recipe, run = prepared(recipe_file, pool=16, seeds=[0, 1, 2, 3], size=4)
    together = ids(evaluation.test_subsets(recipe, run))
    single = load_recipe(recipe_file(evaluation={"seeds": [alone], "subset_size": 4}))
    assert ids(evaluation.test_subsets(single, run)) == {alone: together[alone]}


def test_a_small_pool_repeats_questions_evenly_and_the_report_says_so(recipe_file):
    recipe, run = prepared(recipe_file, pool=10, seeds=[0, 1, 2, 3], size=4)
    drawn = evaluation.test_subsets(recipe, run)
    assert all(len({q["id"] for q in questions}) == 4 for questions in drawn.values())
    repeats = question_repeats(drawn)
    # 16 items on 10 questions: each question drawn once or twice, never more
    assert repeats == {"distinct_questions": 10, "items": 16, "max_repeats": 2}
    table = format_table({"settings": [], "turnwise": {}, "flips": {}, "question_repeats": repeats})
    assert "repeat across seeds" in table and "10 distinct questions in 16" in table
