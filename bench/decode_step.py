"""One decode step of the hf backend, before and after issue 17's sampler change, side by side.

- attention, tried and not taken: transformers' sdpa path copies each KV head once per query
  head of its group (repeat_kv) when a mask is passed; ``TRANSFORMERS_SDPA_FORCE_GQA=1`` lets
  torch's sdpa read the grouped heads in place (enable_gqa). On a quiet 2-core machine it gained
  nothing (0.93x to 1.03x over two runs) and moved bfloat16 logits, so the backend leaves it off.
- sampling: Gumbel-max (one Exp(1) draw per vocabulary entry, row and token) against
  ``sampler.sample_rows`` (one uniform per row and token on the cumulative softmax).

For each recipe's model: a real forward of one token for ``--rows`` rows over a cache of
``--context`` tokens, the masked way the continuous scheduler calls it, timed with the switch
off and on (best of ``--repeats``), with the largest logit difference between the two; then the
two samplers on that step's logits.

    python bench/decode_step.py [--recipes recipes/local.yaml,recipes/science-test.yaml]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from baseline import gumbel_rows
from common import report, table

REPO = Path(__file__).resolve().parents[1]


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def measure(recipe_path: str, rows: int, context: int, repeats: int) -> list[list[object]]:
    import torch

    from malt_ops.backends.hf import HFBackend
    from malt_ops.backends.sampler import sample_rows
    from malt_ops.config import load_recipe
    from malt_ops.models import resolve_model_dir

    recipe = load_recipe(REPO / recipe_path)
    backend = HFBackend(resolve_model_dir(recipe.model), dtype=recipe.model.dtype)
    model = backend.model
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (rows, context))
    mask = torch.ones(rows, context + 1, dtype=torch.long)
    mask[: rows // 2, : context // 4] = 0  # left padding in half the rows, as in a real batch
    with torch.no_grad():
        prefill = model(input_ids=ids, attention_mask=mask[:, :-1], use_cache=True)
    cache = prefill.past_key_values
    step_ids = ids[:, -1:]
    positions = (mask.cumsum(-1) - 1)[:, -1:]

    def step():
        with torch.no_grad():
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        cache.crop(-1)  # drop the step's token: every timed step sees the same cache
        return out.logits[:, -1, :].float()

    results = {}
    for label, switch in (("repeat_kv (before)", "0"), ("enable_gqa (tried)", "1")):
        os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = switch
        results[label] = (best_ms(step, repeats), step())
    (before_ms, before_logits), (now_ms, now_logits) = results.values()
    diff = (before_logits - now_logits).abs().max().item()
    step_ms = before_ms  # the backend keeps repeat_kv (see the docstring)
    generators = [torch.Generator().manual_seed(seed) for seed in range(rows)]
    scores = now_logits / recipe.evaluation.temperature
    gumbel_ms = best_ms(lambda: gumbel_rows(scores, generators), repeats)
    inverse_ms = best_ms(lambda: sample_rows(scores, generators), repeats)
    name = f"{recipe.model.name} ({recipe.model.dtype}, vocab {vocab})"
    return [
        [
            name,
            "forward (attention)",
            f"{before_ms:.0f}",
            f"{now_ms:.0f}",
            f"{before_ms / now_ms:.2f}x",
            f"{diff:.1e}",
        ],
        [
            name,
            "sampling",
            f"{gumbel_ms:.0f}",
            f"{inverse_ms:.0f}",
            f"{gumbel_ms / inverse_ms:.2f}x",
            "-",
        ],
        [
            name,
            "step (as the backend runs it now)",
            f"{before_ms + gumbel_ms:.0f}",
            f"{step_ms + inverse_ms:.0f}",
            f"{(before_ms + gumbel_ms) / (step_ms + inverse_ms):.2f}x",
            "-",
        ],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="recipes/local.yaml,recipes/science-test.yaml")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    import torch

    rows = []
    for recipe in args.recipes.split(","):
        rows += measure(recipe, args.rows, args.context, args.repeats)
    body = (
        f"One decode step: {args.rows} rows over a {args.context}-token cache (half the rows "
        f"left-padded by a quarter), masked as the continuous scheduler calls the model; best "
        f"of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads.\n\n"
        + table(["model", "part", "before ms", "now ms", "speed-up", "max |logit diff|"], rows)
    )
    verdict = (
        "enable_gqa is measured, not used: the backend keeps repeat_kv. "
        "The sampled distribution is the same softmax either way (tests/test_sampler.py); the "
        "draws differ, so sampled outputs change through randomness only."
    )
    report("bench/decode_step.py", body, verdict, append=not args.no_append)


if __name__ == "__main__":
    main()
