"""The hf backend on the real SmolLM2 model: batching, padding, seeds, adapters, token counts."""

import pytest

from malt_ops.backends import SamplingParams
from malt_ops.errors import MaltError

pytestmark = pytest.mark.model

PROMPTS = [
    [{"role": "user", "content": "What is 2 + 3? End with 'Final answer: <number>'."}],
    [
        {
            "role": "user",
            "content": "Name a colour of the sky on a clear day, in a long and detailed answer.",
        }
    ],
    [{"role": "user", "content": "Hi"}],
]
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)


def test_left_padded_batch_matches_single_prompts(hf_backend):
    batched = hf_backend.generate(PROMPTS, GREEDY)
    singles = [hf_backend.generate([p], GREEDY)[0] for p in PROMPTS]
    for together, alone in zip(batched, singles, strict=True):
        assert together[0].text == alone[0].text


def test_samples_per_prompt_seeds_and_token_counts(hf_backend):
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=7)
    before = hf_backend.usage.completion_tokens
    first = hf_backend.generate(PROMPTS[:2], params)
    again = hf_backend.generate(PROMPTS[:2], params)
    other = hf_backend.generate(
        PROMPTS[:2], SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=8)
    )
    assert [len(c) for c in first] == [3, 3]
    assert [[c.text for c in cs] for cs in first] == [[c.text for c in cs] for cs in again]
    assert [[c.text for c in cs] for cs in first] != [[c.text for c in cs] for cs in other]
    tokens = sum(c.completion_tokens for cs in first + again + other for c in cs)
    assert hf_backend.usage.completion_tokens - before == tokens
    assert all(1 <= c.completion_tokens <= 12 for cs in first for c in cs)
    assert all(c.prompt_tokens > 10 for cs in first for c in cs)
    long_answers = [c for c in first[1] if not c.finished]
    assert all(c.completion_tokens == 12 for c in long_answers)


def test_named_adapters_change_output_and_base_stays(hf_backend, model_dir, tmp_path):
    from tests.conftest import random_lora

    base_before = hf_backend.generate(PROMPTS[:1], GREEDY)[0][0].text
    random_lora(model_dir, tmp_path / "adapter")
    hf_backend.add_adapter("test-verifier", str(tmp_path / "adapter"))
    with_adapter = hf_backend.generate(PROMPTS[:1], GREEDY, adapter="test-verifier")[0][0].text
    base_after = hf_backend.generate(PROMPTS[:1], GREEDY)[0][0].text
    assert with_adapter != base_before
    assert base_after == base_before
    with pytest.raises(MaltError, match="already loaded"):
        hf_backend.add_adapter("test-verifier", str(tmp_path / "adapter"))
    with pytest.raises(MaltError, match="not loaded"):
        hf_backend.generate(PROMPTS[:1], GREEDY, adapter="missing")
    with pytest.raises(MaltError, match="not a PEFT adapter"):
        hf_backend.add_adapter("bad", str(tmp_path))


def test_shared_prompt_cache_matches_prompt_copies(hf_backend):
    """n > 1 encodes each prompt once and repeats its KV cache for the n samples."""
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    alone = [c[0].text for c in hf_backend.generate(PROMPTS, greedy)]
    # Greedy with n > 1 (generate() itself refuses num_return_sequences without sampling).
    shared = hf_backend.generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_new_tokens=12))
    assert [[c.text for c in cs] for cs in shared] == [[text, text] for text in alone]

    sampled = SamplingParams(n=3, temperature=0.7, max_new_tokens=12, seed=3)
    try:
        hf_backend.share_prompt_cache = False
        copies = hf_backend.generate(PROMPTS, sampled)
    finally:
        hf_backend.share_prompt_cache = True
    shared = hf_backend.generate(PROMPTS, sampled)
    assert [len(cs) for cs in shared] == [3, 3, 3]
    assert len({c.text for c in shared[1]}) > 1  # the samples of one prompt differ
    pairs = [
        (a.text, b.text)
        for x, y in zip(shared, copies, strict=True)
        for a, b in zip(x, y, strict=True)
    ]
    # One seed, the same RNG draws: the same samples, bar a float-rounding flip in a near tie.
    assert sum(a == b for a, b in pairs) >= 7, pairs


def test_each_sample_depends_only_on_its_own_seed(hf_backend):
    """A prompt's samples are the same alone, in a batch with others, at any batch size."""
    from malt_ops.seeding import derive_seed

    seeds = [derive_seed("test", i) for i in range(len(PROMPTS))]

    def sample(indices: list[int]) -> list[list[str]]:
        params = SamplingParams(
            n=2,
            temperature=1.0,
            top_p=0.95,
            max_new_tokens=8,
            seeds=tuple(seeds[i] for i in indices),
        )
        return [
            [c.text for c in cs]
            for cs in hf_backend.generate([PROMPTS[i] for i in indices], params)
        ]

    batched = sample([0, 1, 2])
    assert sample([1]) == [batched[1]]
    assert sample([2, 0]) == [batched[2], batched[0]]
    size = hf_backend.batch_size
    try:
        hf_backend.batch_size = 2  # one prompt per batch
        assert sample([0, 1, 2]) == batched
    finally:
        hf_backend.batch_size = size
    assert len({text for texts in batched for text in texts}) > 3  # the samples do differ


@pytest.fixture(scope="module")
def hf_penalised(penalised_model_dir):
    from malt_ops.backends.hf import HFBackend

    return HFBackend(penalised_model_dir, batch_size=16)


def test_model_generation_config_is_ignored(hf_backend, hf_penalised):
    """The model's generation_config.json (repetition_penalty 1.3, top_k 5) changes nothing."""
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    plain = [c[0].text for c in hf_backend.generate(PROMPTS, params)]
    assert [c[0].text for c in hf_penalised.generate(PROMPTS, params)] == plain
    sampled = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=5)
    assert hf_penalised.generate(PROMPTS[:2], sampled) == hf_backend.generate(PROMPTS[:2], sampled)
