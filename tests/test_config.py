"""Recipe loading, overrides and one-line errors."""

import pytest

from malt_ops.config import Recipe, load_recipe
from malt_ops.errors import MaltError
from tests.conftest import LOCAL_RECIPE


def test_local_recipe_loads_and_overrides_apply():
    recipe = load_recipe(
        LOCAL_RECIPE, ["sampling.n=3", "labeling.pooling=local", "data.task_config.max_terms=3"]
    )
    assert isinstance(recipe, Recipe)
    assert recipe.sampling.n == 3
    assert recipe.labeling.pooling == "local"
    assert recipe.data.task_config["max_terms"] == 3
    assert recipe.digest() != load_recipe(LOCAL_RECIPE).digest()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("sampling.nn=3", "unknown key 'sampling.nn'"),
        ("sampling.n=-1", "sampling.n"),
        ("labeling.threshold=1.5", "labeling.threshold"),
        ("labeling.threshold=0", "labeling.threshold"),
        ("data.benchmark=imagenet", "data.benchmark"),
        ("labeling.pooling=median", "labeling.pooling"),
        ("name=../etc", "name"),
        ("sampling=3", "sampling"),
        ("novalue", "expected dotted.key=value"),
    ],
)
def test_bad_values_fail_with_one_line(override, needle):
    with pytest.raises(MaltError) as info:
        load_recipe(LOCAL_RECIPE, [override])
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_missing_and_broken_recipe_files(tmp_path):
    with pytest.raises(MaltError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("sampling: {n: [\n")
    with pytest.raises(MaltError, match="not valid YAML"):
        load_recipe(broken)
    reasoning_gym_without_task = tmp_path / "rg.yaml"
    reasoning_gym_without_task.write_text("data: {benchmark: reasoning_gym}\n")
    with pytest.raises(MaltError, match=r"data\.task is required"):
        load_recipe(reasoning_gym_without_task)


@pytest.mark.parametrize("path", sorted(LOCAL_RECIPE.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
