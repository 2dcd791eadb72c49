import pytest

from malt_ops.config import load_recipe
from malt_ops.errors import MaltError
from malt_ops.stages.promote import decide
from tests.conftest import LOCAL_RECIPE


def test_decide_counts_a_question_once_however_many_seeds_drew_it():
    # 3 questions, each drawn under all 4 seeds: 12 items but only 3 independent observations.
    # As items, 12 wins and no loss is p = 0.5**12; as questions it is 3 wins, p = 1/8.
    recipe = load_recipe(LOCAL_RECIPE, ["promotion.require_significance=true"])
    challenger = {(seed, f"q{i}"): True for seed in range(4) for i in range(3)}
    reference = dict.fromkeys(challenger, False)
    decision = decide(challenger, reference, recipe)
    assert decision["p_value"] == pytest.approx(1 / 8)
    assert not decision["promoted"]
    assert decision["questions"] == 3 and decision["repeated_questions"] == 3
    assert decision["items"] == 12


def test_removed_test_names_fail_with_the_new_value(recipe_file):
    for value in ("mcnemar", "bootstrap"):
        with pytest.raises(MaltError, match="sign_flip") as error:
            load_recipe(recipe_file(promotion={"test": value}))
        assert "\n" not in str(error.value)
    with pytest.raises(MaltError, match="bootstrap_samples") as error:
        load_recipe(recipe_file(promotion={"test": "sign_flip", "bootstrap_samples": 100}))
    assert "\n" not in str(error.value)
