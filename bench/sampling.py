"""Sampling speed: batched tree expansion vs a naive per-chain loop, and hf tok/s vs batch size.

Prints a table and appends it to bench/RESULTS.md. Ratios are measured side by side in
one run on the same questions and model; absolute times on a shared CPU are noisy.

    python bench/sampling.py [--questions 1] [--branching 3] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import time

from common import report, table

from malt_ops.backends import SamplingParams
from malt_ops.backends.hf import HFBackend
from malt_ops.config import DataConfig, ModelConfig, SamplingConfig
from malt_ops.data import load_splits
from malt_ops.models import resolve_model_dir
from malt_ops.prompts import generator_messages, refiner_messages, verifier_messages
from malt_ops.stages.sample import expand_trees


def naive_chains(backend: HFBackend, problems: list[dict], cfg: SamplingConfig) -> int:
    """Every root-to-leaf chain on its own: G, then V, then R, one sequence at a time."""
    tokens = 0
    chains = cfg.n * cfg.m * cfg.l
    for problem in problems:
        for chain in range(chains):
            params = {
                role: SamplingParams(
                    n=1,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    max_new_tokens=getattr(cfg.max_new_tokens, role),
                    seed=chain,
                )
                for role in ("generator", "verifier", "refiner")
            }
            g = backend.generate(
                [generator_messages(problem)], params["generator"], desc="naive G"
            )[0][0]
            v = backend.generate(
                [verifier_messages(problem, g.text)], params["verifier"], desc="naive V"
            )[0][0]
            r = backend.generate(
                [refiner_messages(problem, g.text, v.text)], params["refiner"], desc="naive R"
            )[0][0]
            tokens += g.completion_tokens + v.completion_tokens + r.completion_tokens
    return tokens


def throughput(
    backend: HFBackend, problems: list[dict], batch: int, max_new_tokens: int
) -> tuple[int, float]:
    prompts = [generator_messages(problems[i % len(problems)]) for i in range(batch)]
    backend.batch_size = batch
    start = time.perf_counter()
    out = backend.generate(
        prompts,
        SamplingParams(n=1, temperature=0.3, max_new_tokens=max_new_tokens),
        desc=f"batch {batch}",
    )
    seconds = time.perf_counter() - start
    return sum(c.completion_tokens for cs in out for c in cs), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=1)
    parser.add_argument("--branching", type=int, default=3, help="n = m = l")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="hf backend batch for the tree")
    parser.add_argument(
        "--no-append", action="store_true", help="print only; do not touch RESULTS.md"
    )
    args = parser.parse_args()

    problems = load_splits(
        DataConfig(benchmark="gsm8k", train_size=max(args.questions, 8), seed=3)
    ).train
    k = args.branching
    tokens = {
        "generator": args.max_new_tokens,
        "verifier": args.max_new_tokens,
        "refiner": args.max_new_tokens,
    }
    cfg = SamplingConfig(n=k, m=k, l=k, max_new_tokens=tokens)
    backend = HFBackend(resolve_model_dir(ModelConfig()), batch_size=args.batch_size)
    backend.generate([generator_messages(problems[0])], SamplingParams(max_new_tokens=4))  # warm-up

    questions = problems[: args.questions]
    start = time.perf_counter()
    trees = expand_trees(
        questions, backend, cfg, {"generator": None, "verifier": None, "refiner": None}, seed=0
    )
    tree_seconds = time.perf_counter() - start
    tree_tokens = sum(n["completion_tokens"] for t in trees for n in t["nodes"])
    start = time.perf_counter()
    naive_tokens = naive_chains(backend, questions, cfg)
    naive_seconds = time.perf_counter() - start

    rows = [
        [
            "batched tree",
            len(questions),
            f"{k}x{k}x{k}",
            tree_tokens,
            f"{tree_seconds:.1f}",
            f"{tree_tokens / tree_seconds:.1f}",
            f"{naive_seconds / tree_seconds:.2f}x",
        ],
        [
            "naive per-chain loop",
            len(questions),
            f"{k}x{k}x{k}",
            naive_tokens,
            f"{naive_seconds:.1f}",
            f"{naive_tokens / naive_seconds:.1f}",
            "1.00x",
        ],
    ]
    tree_table = table(
        [
            "method",
            "questions",
            "n x m x l",
            "generated tokens",
            "wall s",
            "tok/s",
            "speed-up (wall)",
        ],
        rows,
    )
    batch_rows = []
    for batch in (1, 8, 32):
        generated, seconds = throughput(backend, problems, batch, args.max_new_tokens)
        batch_rows.append([batch, generated, f"{seconds:.1f}", f"{generated / seconds:.1f}"])
    batch_table = table(["batch", "generated tokens", "wall s", "tok/s"], batch_rows)
    body = (
        f"SmolLM2-135M-Instruct (packaged, fp32), hf backend, GSM8K questions, "
        f"max_new_tokens={args.max_new_tokens}, temperature 0.3.\n\n{tree_table}\n\n{batch_table}"
    )
    speedup = naive_seconds / tree_seconds
    verdict = f"Target: tree >= 4x faster than the naive loop at n=m=l=3 -> {'met' if speedup >= 4 else 'NOT met'} ({speedup:.1f}x)."
    report("bench/sampling.py", body, verdict, append=not args.no_append)


if __name__ == "__main__":
    main()
