"""Training speed and memory: SFT then DPO per role on SmolLM2, old path beside the new.

Each case is one process that trains a role as the train stage does, SFT then DPO:

- ``reload``: the path before issue 17: the SFT model is dropped and DPO loads the base model
  and the saved SFT adapter from disk again (reference log-probs computed at every step);
- ``memory``: DPO continues from the SFT model in memory (``train_dpo``);
- ``memory+precompute``: the same with TRL's ``precompute_ref_log_probs``.

Cases with ``--passes 2`` give DPO half as many pairs for the same steps, so every pair is
drawn twice (where precomputing the reference can pay). Per phase: wall time (setup, model
load included), tokens/s and peak RSS (VmHWM, reset at each phase start). Data: packaged GSM8K
questions with gold solutions (chosen) and a corrupted final answer (rejected), wrapped in each
role's real prompt. Prints the tables and appends them to bench/RESULTS.md.

    python bench/training.py [--steps 4] [--batch-size 4] [--max-length 512] [--passes 1 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import report, table

ROLES = ("verifier", "refiner")
VARIANTS = ("reload", "memory", "memory+precompute")


def role_rows(role: str, count: int) -> tuple[list[dict], list[dict]]:
    from malt_ops.config import DataConfig
    from malt_ops.data import load_splits
    from malt_ops.prompts import refiner_messages, verifier_messages

    problems = load_splits(DataConfig(benchmark="gsm8k", train_size=count, seed=5)).train
    sft, pairs = [], []
    for p in problems:
        good = f"Let's compute step by step.\nFinal answer: {p['answer']}"
        bad = f"Let's compute step by step.\nFinal answer: {int(float(p['answer'])) + 7}"
        prompt = {
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


def reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM, so each phase's peak is its own.
    Path("/proc/self/clear_refs").write_text("5")


def peak_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def reload_dpo(model_dir: Path, sft_adapter: Path, pairs: list[dict], cfg: Any, out: Path):
    """What train_dpo did before issue 17, kept as the reference this bench measures against."""
    from peft import PeftModel

    from malt_ops.models import load_model, load_tokenizer
    from malt_ops.training import TrainResult, check_reference_adapter, dpo_trainer

    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "right"
    policy = PeftModel.from_pretrained(load_model(model_dir), sft_adapter, is_trainable=True)
    trainer = dpo_trainer(policy, tokenizer, pairs, cfg, out, precompute=False)
    check_reference_adapter(trainer.model, sft_adapter)
    trainer.train()
    trainer.model.save_pretrained(out / "dpo", selected_adapters=["default"])
    return TrainResult(out / "dpo", list(trainer.state.log_history), len(pairs), trainer)


def phase_figures(history: list[dict], wall: float) -> dict[str, Any]:
    final = [h for h in history if "train_runtime" in h][-1]
    return {
        "tokens": max((h.get("num_tokens", 0) for h in history), default=0),
        "train_s": final["train_runtime"],
        "wall_s": wall,
        "peak_mib": peak_mib(),
        "losses": [h["loss"] for h in history if "loss" in h],
    }


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
    pairs = pairs[: len(pairs) // args.passes[0]]
    model_dir = resolve_model_dir(ModelConfig())
    out = Path(args.workdir)
    figures = {}

    reset_peak()
    started = time.perf_counter()
    sft = train_sft(model_dir, sft_rows, cfg, out)
    figures["sft"] = phase_figures(sft.history, time.perf_counter() - started)

    reset_peak()
    started = time.perf_counter()
    if args.variant == "reload":
        adapter = sft.adapter_dir
        del sft
        gc.collect()
        dpo = reload_dpo(model_dir, adapter, pairs, cfg, out)
    else:
        dpo = train_dpo(sft, pairs, cfg, out, precompute=args.variant == "memory+precompute")
    figures["dpo"] = phase_figures(dpo.history, time.perf_counter() - started)
    figures["process_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(figures))


def run_case(args: argparse.Namespace, role: str, variant: str, passes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--variant",
            variant,
            "--role",
            role,
            "--workdir",
            workdir,
            "--passes",
            str(passes),
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--max-length",
            str(args.max_length),
        ]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{role} {variant}: the case failed\n{done.stderr[-4000:]}")
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        figures["process_s"] = time.perf_counter() - started
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES))
    parser.add_argument(
        "--passes",
        nargs="+",
        type=int,
        choices=(1, 2),
        default=[1, 2],
        help="DPO passes over the pairs; 2 runs the in-memory cases only",
    )
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    phases, summary, ratios, deltas = [], [], [], []
    for role in args.roles:
        for passes in args.passes:
            variants = VARIANTS if passes == 1 else VARIANTS[1:]
            measured = {v: run_case(args, role, v, passes) for v in variants}
            base = measured[variants[0]]
            for variant, m in measured.items():
                for phase in ("sft", "dpo"):
                    p = m[phase]
                    phases.append(
                        [
                            role,
                            passes,
                            variant,
                            phase.upper(),
                            int(p["tokens"]),
                            f"{p['wall_s'] - p['train_s']:.1f}",
                            f"{p['train_s']:.1f}",
                            f"{p['wall_s']:.1f}",
                            f"{p['tokens'] / p['wall_s']:.0f}",
                            f"{p['peak_mib']:.0f}",
                        ]
                    )
                sft_peak = m["sft"]["peak_mib"]
                worst = max(m["dpo"]["peak_mib"], m["process_peak_mib"]) / sft_peak
                ratios.append(worst)
                # Precomputed reference log-probs come from other batches (other padding), so
                # they may differ from the per-step ones in the last float bits.
                delta = max(
                    abs(a - b)
                    for a, b in zip(m["dpo"]["losses"], base["dpo"]["losses"], strict=True)
                )
                deltas.append(delta)
                summary.append(
                    [
                        role,
                        passes,
                        variant,
                        f"{m['dpo']['wall_s']:.1f}",
                        f"{m['dpo']['wall_s'] / base['dpo']['wall_s']:.2f}x",
                        f"{m['dpo']['wall_s'] / m['sft']['wall_s']:.2f}",
                        f"{m['sft']['wall_s'] + m['dpo']['wall_s']:.1f}",
                        f"{m['process_s']:.1f}",
                        f"{m['dpo']['peak_mib'] / sft_peak:.2f}x",
                        f"{m['process_peak_mib'] / sft_peak:.2f}x",
                        f"{m['dpo']['losses'][-1]:.4f}",
                        f"{delta:.1e}",
                    ]
                )
    body = (
        f"SmolLM2-135M-Instruct fp32, LoRA r=16 on q/k/v/o, batch {args.batch_size}, max length "
        f"{args.max_length}, {args.steps} optimizer steps per phase. One process per case, SFT "
        "then DPO as the train stage runs them: `reload` = DPO loads the base model and the SFT "
        "adapter again (the path before issue 17), `memory` = DPO continues from the SFT model "
        "in memory, `+precompute` = TRL's precompute_ref_log_probs. passes = DPO draws of each "
        "pair. Peak RSS per phase is VmHWM reset at the phase start; DPO s / SFT s reads "
        "through load from other processes, which slows both phases of a case. All figures "
        "from this machine's CPU; no GPU.\n\n"
        + table(
            [
                "role",
                "passes",
                "case",
                "phase",
                "tokens",
                "setup s",
                "train s",
                "phase s",
                "tokens/s",
                "peak RSS MiB",
            ],
            phases,
        )
        + "\n\n"
        + table(
            [
                "role",
                "passes",
                "case",
                "DPO phase s",
                "vs first case",
                "DPO s / SFT s",
                "SFT+DPO s",
                "process s",
                "DPO peak / SFT peak",
                "process peak / SFT peak",
                "final DPO loss",
                "max |loss - first case|",
            ],
            summary,
        )
    )
    worst = max(ratios, default=0.0)
    apart = max(deltas, default=0.0)
    verdict = (
        f"Target: peak RSS <= 1.2x SFT peak -> {'met' if worst <= 1.2 else 'NOT met'} "
        f"(highest {worst:.2f}x). DPO step losses of every case within {apart:.1e} of the "
        f"first case of its role and passes -> {'same' if apart <= 1e-4 else 'DIFFERENT'}."
    )
    report("bench/training.py", body, verdict, append=not args.no_append)


if __name__ == "__main__":
    main()
