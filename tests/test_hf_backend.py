"""The hf backend on the real SmolLM2 model: batching, padding, seeds, adapters, token counts."""

from dataclasses import replace

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


@pytest.fixture(params=["continuous", "static"])
def scheduled(request, hf_backend):
    """The session backend under each scheduler (restored afterwards)."""
    before = hf_backend.scheduler
    hf_backend.scheduler = request.param
    yield hf_backend
    hf_backend.scheduler = before


def test_left_padded_batch_matches_single_prompts(scheduled):
    hf_backend = scheduled
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
    hf_backend.scheduler = "static"  # the switch belongs to the static path
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
    hf_backend.scheduler = "continuous"


def test_each_sample_depends_only_on_its_own_seed(scheduled):
    """A prompt's samples are the same alone, in a batch with others, at any batch size."""
    hf_backend = scheduled
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


# ------------------------------------------------------------------ continuous scheduler (issue 17)


def _problems():
    questions = [
        "What is 2 + 3?",
        "Tom has 5 apples and eats 2 of them. How many apples does he have left?",
        "A train goes 60 km in one hour. How far does it go in 3 hours at the same speed?",
    ]
    return [{"id": i, "benchmark": "gsm8k", "question": q} for i, q in enumerate(questions)]


def _chain_prompts():
    """Prompts shaped like one chain level: generator prompts of three questions, and two
    verifier prompts per question (a shared system prompt and question, then different
    answers), plus a short chat turn; lengths from ~10 to ~150 tokens."""
    from malt_ops.prompts import generator_messages, verifier_messages

    problems = _problems()
    answers = ("The answer is 5.", "Step 1: 5 - 2 = 3. Final answer: 3")
    return (
        [generator_messages(p) for p in problems]
        + [verifier_messages(p, a) for p in problems for a in answers]
        + PROMPTS[2:]
    )


@pytest.fixture(scope="module")
def hf_small(model_dir, tmp_path_factory):
    """A backend whose batch (2) is smaller than the prompts given it, so rows are refilled,
    with a random LoRA adapter loaded."""
    from malt_ops.backends.hf import HFBackend
    from tests.conftest import random_lora

    backend = HFBackend(model_dir, batch_size=2)
    backend.add_adapter("lora", str(random_lora(model_dir, tmp_path_factory.mktemp("lora"))))
    return backend


def _texts(backend, scheduler, prompts, params, adapter=None):
    backend.scheduler = scheduler
    try:
        return [[c.text for c in cs] for cs in backend.generate(prompts, params, adapter=adapter)]
    finally:
        backend.scheduler = "continuous"


# The adapter with one sample stays in `make test`; the other three (about 70 s) are slow.
@pytest.mark.parametrize(
    ("adapter", "n"),
    [
        ("lora", 1),
        pytest.param(None, 1, marks=pytest.mark.slow),
        pytest.param(None, 2, marks=pytest.mark.slow),
        pytest.param("lora", 2, marks=pytest.mark.slow),
    ],
)
def test_continuous_greedy_matches_static(hf_small, adapter, n):
    """Greedy: token-identical to the static generate() path, base model and adapter alike."""
    prompts = _chain_prompts()
    params = SamplingParams(n=n, temperature=0.0, max_new_tokens=16)
    static = _texts(hf_small, "static", prompts, params, adapter)
    assert _texts(hf_small, "continuous", prompts, params, adapter) == static
    assert all(len(set(samples)) == 1 for samples in static)


def test_continuous_adapter_honoured_per_call(hf_small):
    """Each call runs the adapter it names: base, adapter, base again, in one backend."""
    prompts = _chain_prompts()[:4]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    base = _texts(hf_small, "continuous", prompts, params)
    tuned = _texts(hf_small, "continuous", prompts, params, "lora")
    assert _texts(hf_small, "continuous", prompts, params) == base
    assert all(b != t for b, t in zip(base, tuned, strict=True))


@pytest.mark.slow  # about 45 s
def test_continuous_sampling_reproducible_per_item(hf_small):
    """Sample k of prompt i depends on its seed only: alone, reordered, at any batch size;
    and it is the static path's sample (the same per-row draws)."""
    from malt_ops.seeding import derive_seed

    prompts = _chain_prompts()
    seeds = [derive_seed("test-continuous", i) for i in range(len(prompts))]

    def sample(indices, scheduler="continuous"):
        params = SamplingParams(
            n=2,
            temperature=1.0,
            top_p=0.95,
            max_new_tokens=10,
            seeds=tuple(seeds[i] for i in indices),
        )
        return _texts(hf_small, scheduler, [prompts[i] for i in indices], params)

    every = list(range(len(prompts)))
    together = sample(every)
    assert sample([4]) == [together[4]]
    assert sample(every[::-1]) == together[::-1]
    try:
        hf_small.batch_size = 16
        assert sample(every) == together
    finally:
        hf_small.batch_size = 2
    assert len({t for texts in together for t in texts}) > len(prompts)  # samples do differ
    static = sample(every, "static")
    pairs = [
        (a, b) for x, y in zip(together, static, strict=True) for a, b in zip(x, y, strict=True)
    ]
    # The same draws; allow a float-rounding flip in a near tie, as the static path's own test.
    assert sum(a == b for a, b in pairs) >= len(pairs) - 2, pairs


@pytest.mark.slow  # about 45 s
def test_continuous_refills_rows_and_encodes_shared_prefixes_once(hf_small):
    """Finished rows leave the batch (no decode step is spent on a finished or padding row)
    and the verifier prompts' shared prefix is encoded once: fewer prompt tokens and decode
    rows than the static path, for the same completions."""
    from malt_ops.backends.continuous import ContinuousScheduler

    prompts = _chain_prompts()
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    counts = {}
    for scheduler in ("static", "continuous"):
        hf_small.scheduler = scheduler
        before = replace(hf_small.usage, by_adapter={})
        out = hf_small.generate(prompts, params)
        hf_small.scheduler = "continuous"
        usage = hf_small.usage
        counts[scheduler] = {
            "texts": [cs[0].text for cs in out],
            "encoded": usage.encoded_tokens - before.encoded_tokens,
            "decode_rows": usage.decode_rows - before.decode_rows,
            "generated": sum(cs[0].completion_tokens for cs in out),
            "prompt_tokens": usage.prompt_tokens - before.prompt_tokens,
        }
    static, continuous = counts["static"], counts["continuous"]
    assert continuous["texts"] == static["texts"]
    assert continuous["prompt_tokens"] == static["prompt_tokens"]  # full prompt lengths
    assert static["encoded"] == static["prompt_tokens"]
    assert continuous["encoded"] < 0.7 * static["encoded"]
    # Every decode row makes a token of a live row; the first token comes from the prefill.
    assert continuous["decode_rows"] <= continuous["generated"] - len(prompts)
    assert static["decode_rows"] > continuous["decode_rows"]
    lengths = sorted({c for c in (len(t) for t in continuous["texts"])})
    assert len(lengths) > 1  # rows did finish at different steps

    # Refill: with two slots, a waiting row is admitted whenever one finishes.
    tokenizer = hf_small.tokenizer
    from malt_ops.prompts import render

    encoded = [
        tokenizer(render(tokenizer, m), add_special_tokens=False)["input_ids"] for m in prompts
    ]
    admitted = []
    scheduler = ContinuousScheduler(
        hf_small.model,
        encoded,
        n=1,
        seeds=[0] * len(encoded),
        max_new_tokens=24,
        temperature=0.0,
        top_p=1.0,
        stop_ids=hf_small._stop_ids,
        pad_id=tokenizer.pad_token_id,
        slots=2,
    )
    original = scheduler._prefill
    scheduler._prefill = lambda ids: (admitted.append(list(ids)), original(ids))[1]
    scheduler.run()
    # Two prompts first, then one (or two) each time rows finish: never more than two slots.
    assert len(admitted) >= len(prompts) // 2 and max(len(batch) for batch in admitted) <= 2
    assert sorted(i for batch in admitted for i in batch) == list(range(len(prompts)))
