"""bfloat16 against float32 on this CPU: prefill and decode time of the recipe's model.

Decides what ``model.dtype: auto`` picks (malt_ops.models.resolve_dtype). On CPUs with native
bfloat16 (avx512_bf16, AMX) bfloat16 halves the time; without them PyTorch emulates it and
it is several times slower. Both dtypes run in one process on the same prompts, alternating,
so that the ratio is measured side by side.

    python bench/dtype.py [--recipe recipes/science-test.yaml] [--batch 8] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import report, table

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch

    from malt_ops.config import load_recipe
    from malt_ops.models import (
        BF16_CPU_FLAGS,
        cpu_flags,
        load_model,
        load_tokenizer,
        resolve_dtype,
        resolve_model_dir,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "science-test.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    model_dir = resolve_model_dir(recipe.model)
    tokenizer = load_tokenizer(model_dir)
    ids = torch.randint(100, tokenizer.vocab_size - 100, (args.batch, args.prompt_tokens))
    models = {dtype: load_model(model_dir, dtype).eval() for dtype in ("float32", "bfloat16")}
    seconds = {dtype: {"prefill": [], "decode": []} for dtype in models}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for dtype, model in models.items():  # alternating: both see the same machine load
                start = time.perf_counter()
                out = model(input_ids=ids, use_cache=True)
                seconds[dtype]["prefill"].append(time.perf_counter() - start)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                start = time.perf_counter()
                for _ in range(args.new_tokens):
                    out = model(input_ids=token, past_key_values=past, use_cache=True)
                    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                seconds[dtype]["decode"].append(time.perf_counter() - start)
    best = {d: {k: min(v) for k, v in phases.items()} for d, phases in seconds.items()}
    rows = [
        [
            dtype,
            f"{best[dtype]['prefill']:.2f}",
            f"{best[dtype]['decode'] / args.new_tokens * 1000:.0f}",
            f"{best[dtype]['prefill'] / best['float32']['prefill']:.2f}x",
            f"{best[dtype]['decode'] / best['float32']['decode']:.2f}x",
        ]
        for dtype in models
    ]
    native = [f for f in BF16_CPU_FLAGS if f in cpu_flags()] or ["none"]
    body = (
        f"Model {recipe.model.name}, batch {args.batch}, {args.prompt_tokens} prompt tokens, "
        f"{args.new_tokens} decode steps, best of {args.repeats}. Native bfloat16 flags: "
        f"{', '.join(native)}; `model.dtype: auto` picks {resolve_dtype('auto')} here.\n\n"
        + table(["dtype", "prefill s", "decode ms/step", "prefill vs fp32", "decode vs fp32"], rows)
    )
    faster = min(models, key=lambda d: best[d]["prefill"] + best[d]["decode"])
    verdict = f"faster here: {faster}; auto picks {resolve_dtype('auto')}" + (
        "" if faster == resolve_dtype("auto") else " (MISMATCH: check BF16_CPU_FLAGS)"
    )
    report("bench/dtype.py", body, verdict, append=not args.no_append)


if __name__ == "__main__":
    main()
