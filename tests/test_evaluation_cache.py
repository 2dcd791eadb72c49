"""The evaluation cache (issue 17 item 3): a champion is evaluated once per key.

Real parts throughout: the tiny SmolLM2 model on the hf backend, real LoRA adapters and a
local store. The backend factory counts how often a backend was asked for: the cache asks
for one only when it has to run the model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from malt_ops.config import ROLES, load_recipe
from malt_ops.data import make_problem
from malt_ops.evaluation_cache import EVAL_CACHE, cached_system_results, evaluation_key, lookup
from tests.conftest import LOCAL_RECIPE, random_lora

pytestmark = pytest.mark.model

TINY = [
    "evaluation.seeds=[0, 1]",
    "evaluation.subset_size=1",
    "evaluation.votes=1",
    "evaluation.temperature=0",
    "evaluation.max_new_tokens={generator: 4, verifier: 4, refiner: 4}",
    "inference.batch_size=16",  # the hf_backend fixture's
]
QUESTIONS = {
    0: [make_problem("gsm8k", "q1", "What is 2 + 3?", "5")],
    1: [make_problem("gsm8k", "q2", "What is 4 + 4?", "8")],
}


def scaled_lora(source: Path, target: Path, scale: float) -> Path:
    """A copy of adapter ``source`` with its LoRA B weights scaled: other content, same shape."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(source / "adapter_model.safetensors")
    save_file(
        {k: v * scale if "lora_B" in k else v for k, v in weights.items()},
        str(target / "adapter_model.safetensors"),
    )
    return target


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cache-adapters")
    first = random_lora(model_dir, root / "first")
    return {"first": first, "second": scaled_lora(first, root / "second", 0.5)}


@pytest.fixture(scope="module")
def calls() -> list[str]:
    return []


@pytest.fixture(scope="module")
def factory(hf_backend, calls):
    """A backend factory that counts its calls (one per model run the cache could not skip)."""

    def make():
        calls.append("backend")
        return hf_backend

    return make


def tiny(store: Path, *overrides: str):
    return load_recipe(LOCAL_RECIPE, [f"storage.root={store}", *TINY, *overrides])


def champion_dirs(adapters, generator="first", verifier="second") -> dict[str, Path | None]:
    return {"generator": adapters[generator], "verifier": adapters[verifier], "refiner": None}


@pytest.fixture(scope="module")
def cold(adapters, factory, calls, tmp_path_factory):
    """One evaluation of a set, cached in a store of its own."""
    store = tmp_path_factory.mktemp("eval-cache") / "store"
    recipe = tiny(store)
    before = len(calls)
    scored, key, source = cached_system_results(
        recipe, QUESTIONS, champion_dirs(adapters), factory, "champion"
    )
    assert (source, len(calls)) == ("evaluated", before + 1)
    return {"recipe": recipe, "store": store, "scored": scored, "key": key}


def test_a_repeat_evaluation_of_an_unchanged_set_does_not_run_the_model(
    cold, adapters, factory, calls
):
    before = len(calls)
    warm, key, source = cached_system_results(
        cold["recipe"], QUESTIONS, champion_dirs(adapters), factory, "champion"
    )
    assert (source, len(calls)) == ("cache", before), "the repeat evaluation ran the model"
    assert key == cold["key"] and warm == cold["scored"]
    assert [[q["question_id"] for q in warm[seed]] for seed in (0, 1)] == [["q1"], ["q2"]]
    entry = cold["store"] / EVAL_CACHE / key.digest
    assert sorted(p.name for p in entry.iterdir()) == ["entry.json", "results.jsonl"]


def test_a_changed_adapter_question_or_setting_runs_the_model_again(cold, adapters, factory, calls):
    recipe, dirs = cold["recipe"], champion_dirs(adapters)
    changes = {
        "versions (the generator adapter's content)": (
            recipe,
            QUESTIONS,
            champion_dirs(adapters, generator="second"),
        ),
        "questions (one question's text)": (
            recipe,
            {**QUESTIONS, 1: [make_problem("gsm8k", "q2", "What is 4 + 5?", "9")]},
            dirs,
        ),
        "settings (evaluation.max_new_tokens)": (
            tiny(cold["store"], "evaluation.max_new_tokens.refiner=3"),
            QUESTIONS,
            dirs,
        ),
    }
    for what, (changed, questions, changed_dirs) in changes.items():
        before = len(calls)
        _, key, source = cached_system_results(changed, questions, changed_dirs, factory, "x")
        assert (source, len(calls)) == ("evaluated", before + 1), f"{what}: served from cache"
        assert key.digest != cold["key"].digest
    # Each changed evaluation has an entry of its own; the first is still served.
    before = len(calls)
    assert cached_system_results(recipe, QUESTIONS, dirs, factory, "champion")[2] == "cache"
    assert len(calls) == before
    assert len(list((cold["store"] / EVAL_CACHE).iterdir())) == 1 + len(changes)


def test_a_corrupt_or_half_written_entry_is_ignored_and_computed_again(
    cold, adapters, factory, calls, tmp_path, caplog
):
    store = tmp_path / "store"
    shutil.copytree(cold["store"], store)
    recipe, dirs, key = tiny(store), champion_dirs(adapters), cold["key"]
    entry = store / EVAL_CACHE / key.digest
    results = entry / "results.jsonl"
    results.write_bytes(results.read_bytes().replace(b'"generator": ', b'"generator": 1 or ', 1))
    before = len(calls)
    with caplog.at_level(logging.WARNING, logger="malt_ops"):
        again, _, source = cached_system_results(recipe, QUESTIONS, dirs, factory, "champion")
    assert (source, len(calls)) == ("evaluated", before + 1)
    assert again == cold["scored"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("does not match its recorded sha256" in w for w in warnings), warnings
    # The recomputed entry replaced the corrupt one.
    assert cached_system_results(recipe, QUESTIONS, dirs, factory, "champion")[2] == "cache"
    # Results without their entry record (a write cut short before entry.json) are no entry.
    (entry / "entry.json").unlink()
    from malt_ops.storage import open_store

    assert lookup(open_store(str(store)), key, QUESTIONS) is None


def test_every_key_family_changes_the_key(model_dir, tmp_path):
    """Keys the model runs above do not reach: the base model's content (same path, other
    config), the backend, the inference batch size and the benchmark (it picks the grader)."""
    store = tmp_path / "store"
    recipe = tiny(store)
    digests = {"generator": "a" * 64, "verifier": None, "refiner": None}
    base = evaluation_key(recipe, digests, QUESTIONS)
    local_base = tmp_path / "base"
    local_base.mkdir()
    for file in model_dir.iterdir():
        (local_base / file.name).symlink_to(file)
    at_path = tiny(store, "model.source=path", f"model.path={local_base}")
    before = evaluation_key(at_path, digests, QUESTIONS)
    (local_base / "config.json").unlink()
    config = json.loads((model_dir / "config.json").read_text())
    (local_base / "config.json").write_text(json.dumps({**config, "malt_test": 1}))
    changed = {
        "base model content": (before, evaluation_key(at_path, digests, QUESTIONS)),
        "adapter": (base, evaluation_key(recipe, {**digests, "refiner": "b" * 64}, QUESTIONS)),
        "questions swapped between seeds": (
            base,
            evaluation_key(recipe, digests, {0: QUESTIONS[1], 1: QUESTIONS[0]}),
        ),
        "temperature": (
            base,
            evaluation_key(tiny(store, "evaluation.temperature=0.5"), digests, QUESTIONS),
        ),
        "batch size": (
            base,
            evaluation_key(tiny(store, "inference.batch_size=8"), digests, QUESTIONS),
        ),
        "backend": (
            base,
            evaluation_key(tiny(store, "inference.backend=vllm"), digests, QUESTIONS),
        ),
        "benchmark": (
            base,
            evaluation_key(tiny(store, "data.benchmark=gsm8k"), digests, QUESTIONS),
        ),
    }
    for what, (old, new) in changed.items():
        assert new.digest != old.digest, f"{what} does not change the key"
    family = changed["base model content"]
    assert family[0].parts["settings"] == family[1].parts["settings"]  # only the hash moved
    # What cannot change a result leaves the key alone: the gate, the comparisons evaluate
    # reports on the results, and the store's place.
    unrelated = tiny(
        store,
        "promotion.alpha=0.1",
        "training.seed=3",
        "evaluation.comparisons=[{reference: SA, alpha: 0.01}]",
    )
    assert evaluation_key(unrelated, digests, QUESTIONS).digest == base.digest


def _trained(recipe, run_id: str, adapter: Path) -> None:
    """Train's output for ``run_id`` as evaluate and register read it: ``adapter`` in every role."""
    from malt_ops.stages.common import stage_output

    for role in (*ROLES, "star"):
        trained = stage_output(recipe, run_id, "train", role)
        trained.put_dir(f"adapters/{role}", adapter)
        trained.commit({})


@pytest.mark.slow  # two evaluate/register/promote cycles against MLflow and S3 (~80 s)
def test_promote_reads_a_new_champion_from_the_cache_its_evaluate_seeded(
    registry, s3_env, adapters, hf_backend, factory, calls, tmp_path
):
    """Cycle 1's set becomes champion: promote stores evaluate's own results for it. Cycle 2's
    promote then compares with that champion without running it; the stored results are
    the ones a fresh evaluation of the registered champion gives."""
    from malt_ops.stages import evaluate, prepare, promote, register

    recipe = load_recipe(
        registry["path"],
        [
            # In S3: register gives a remote MLflow server no local paths as sources.
            f"storage.root=s3://{s3_env['bucket']}/{tmp_path.name}",
            *TINY,
            "data.train_size=2",
            "data.test_size=2",
            "promotion.min_effect=-1",  # cycle 1 is promoted whatever its accuracy
            "promotion.require_significance=false",
        ],
    )
    decisions = {}
    for run_id, adapter in (("cycle-1", adapters["first"]), ("cycle-2", adapters["second"])):
        prepare.run(recipe, run_id)
        _trained(recipe, run_id, adapter)
        evaluate.run(recipe, run_id, backend=hf_backend)
        register.run(recipe, run_id)
        decisions[run_id] = promote.run(recipe, run_id)
    first, second = decisions["cycle-1"], decisions["cycle-2"]
    assert first["promoted"] and first["reference"].startswith("untrained base")
    assert second["reference"].startswith("champion")
    assert second["reference_results"] == "cache", "promote ran the unchanged champion"

    # The seeded entry holds what a fresh evaluation of the champion compared with (cycle 1's
    # set, as the registry serves it) gives, in a store without the entry.
    from malt_ops.evaluation import test_subsets
    from malt_ops.registry import adapter_dir, model_name
    from malt_ops.storage import open_store

    dirs = {
        role: adapter_dir(
            registry["client"].get_model_version(model_name(recipe, role), version).source
        )
        for role, version in second["champion_before"].items()
    }
    subsets = test_subsets(recipe, "cycle-2")
    elsewhere = recipe.model_copy(
        update={
            "storage": recipe.storage.model_copy(update={"root": recipe.storage.root + "-fresh"})
        }
    )
    before = len(calls)
    fresh, key, source = cached_system_results(elsewhere, subsets, dirs, factory, "champion")
    assert (source, len(calls)) == ("evaluated", before + 1)
    assert key.digest == second["evaluation_key"]
    assert lookup(open_store(recipe.storage.root), key, subsets) == fresh


def test_dtype_auto_keys_results_by_the_precision_it_resolves_to(monkeypatch):
    """A store shared by a GPU (bfloat16) and an AVX2 CPU (float32) under `model.dtype: auto`
    must not hand one machine's results to the other."""
    import torch

    from malt_ops import models
    from malt_ops.evaluation_cache import settings_part

    recipe = load_recipe(LOCAL_RECIPE, ["model.dtype=auto"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2"})
    on_avx2 = settings_part(recipe)["model"]
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512_bf16"})
    on_bf16 = settings_part(recipe)["model"]
    assert on_avx2 != on_bf16
    assert on_avx2["dtype"] == "float32" and on_bf16["dtype"] == "bfloat16"
