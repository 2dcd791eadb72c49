"""Issue 19: the embedded default (recipes/local.yaml, what `make run` trains) trains enough
that its generator changes behaviour: its greedy answers on the test questions differ from
the base model's, and its SFT loss falls.

A shortened run: prepare as the recipe says, and a label output holding one correct worked
answer per training question (what sample and label leave for the generator when it is
right), then the real train stage with the recipe's generator settings.
"""

from __future__ import annotations

import pytest

from malt_ops.backends import SamplingParams
from malt_ops.config import load_recipe
from malt_ops.prompts import generator_messages
from malt_ops.stages import prepare, train
from malt_ops.stages.common import stage_output

# a real train stage at the recipe's settings, and two greedy passes (a few minutes)
pytestmark = [pytest.mark.model, pytest.mark.slow]

RUN = "first"


def test_the_default_generator_learns_enough_to_change_its_answers(recipe_file, hf_backend):
    recipe = load_recipe(recipe_file(tracking={"enabled": False}))
    prepare.run(recipe, RUN)
    prepared = stage_output(recipe, RUN, "prepare")
    rows = [
        {
            "messages": [
                *generator_messages(problem),
                {
                    "role": "assistant",
                    "content": f"{problem['question']} The result is {problem['answer']}.\n"
                    f"Final answer: {problem['answer']}",
                },
            ],
            "question_id": problem["id"],
            "node_id": "g0",
            "value": 1.0,
        }
        for problem in prepared.iter_jsonl("problems/train.jsonl")
    ]
    labeled = stage_output(recipe, RUN, "label")
    labeled.write_jsonl("datasets/generator_sft.jsonl", rows)
    labeled.write_jsonl("datasets/generator_dpo.jsonl", [])  # label writes every role's
    labeled.commit({})
    summary = train.run(recipe, RUN, "generator")
    assert summary["trained"]

    trained = stage_output(recipe, RUN, "train", "generator")
    history = trained.read_json("metrics/generator.json")["history"]["sft"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) >= 2 and losses[-1] < 0.8 * losses[0], losses

    test = list(prepared.iter_jsonl("problems/test.jsonl"))
    prompts = [generator_messages(p) for p in test]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=32)
    hf_backend.add_adapter("first-run-generator", str(trained.local_dir("adapters/generator")))
    base = [row[0].text for row in hf_backend.generate(prompts, greedy)]
    tuned = [
        row[0].text for row in hf_backend.generate(prompts, greedy, adapter="first-run-generator")
    ]
    changed = sum(a != b for a, b in zip(base, tuned, strict=True))
    assert changed >= len(test) // 2, f"{changed} of {len(test)} greedy answers changed"
