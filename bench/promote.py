"""promote's champion evaluation with a cold and a warm evaluation cache, against one evaluate.

On the recipe (default recipes/local.yaml), in a temporary store: prepare a run, give it a
LoRA set (random weights: the timing does not depend on what they learned), then time

- evaluate: the whole stage (base, STaR and MALT systems; model load included);
- promote, cold cache: the champion's results as promote gets them on a miss (backend
  created, adapters loaded, the set run on the run's test subsets, the entry written);
- promote, warm cache: the same call again (adapter digests, key, entry read and checked).

Both promote rows time ``evaluation_cache.cached_system_results``, the call promote makes;
the registry round trips around it (resolving the champion, downloading its adapters) are
the same with or without the cache and are not in either row.

    python bench/promote.py [--recipe recipes/local.yaml] [--set key=value ...] [--no-append]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import report, table

REPO = Path(__file__).resolve().parents[1]


def random_set(recipe, run_id: str, scratch: Path) -> dict[str, Path]:
    """Train's output for ``run_id``: one random LoRA adapter in every role (and STaR)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from malt_ops.config import ROLES
    from malt_ops.models import load_model, resolve_model_dir
    from malt_ops.stages.common import stage_output

    torch.manual_seed(0)
    model = get_peft_model(
        load_model(resolve_model_dir(recipe.model)),
        LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj"]),
    )
    model.save_pretrained(scratch / "adapter")
    units = {}
    for role in (*ROLES, "star"):
        units[role] = stage_output(recipe, run_id, "train", role)
        units[role].put_dir(f"adapters/{role}", scratch / "adapter")
        units[role].commit({})
    return {role: units[role].local_dir(f"adapters/{role}") for role in ROLES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "local.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    from malt_ops.backends import create_backend
    from malt_ops.config import load_recipe
    from malt_ops.evaluation import test_subsets
    from malt_ops.evaluation_cache import cached_system_results
    from malt_ops.stages import evaluate, prepare

    with tempfile.TemporaryDirectory(prefix="bench-promote-") as scratch:
        recipe = load_recipe(
            args.recipe,
            [f"storage.root={scratch}/store", "tracking.enabled=false", *args.overrides],
        )
        run_id = "bench-promote"
        prepare.run(recipe, run_id)
        dirs = random_set(recipe, run_id, Path(scratch))
        start = time.perf_counter()
        evaluate.run(recipe, run_id)
        evaluate_s = time.perf_counter() - start
        subsets = test_subsets(recipe, run_id)
        rows, results = [], {}
        for label in ("cold", "warm"):
            start = time.perf_counter()
            scored, key, source = cached_system_results(
                recipe, subsets, dirs, lambda: create_backend(recipe), "champion"
            )
            seconds = time.perf_counter() - start
            results[label] = scored
            rows.append(
                [
                    f"promote, {label} cache",
                    source,
                    f"{seconds:.2f}",
                    f"{seconds / evaluate_s * 100:.1f}%",
                ]
            )
        assert results["cold"] == results["warm"], "the cache served other results"
    items = sum(len(q) for q in subsets.values())
    ev = recipe.evaluation
    body = (
        f"Recipe {Path(args.recipe).name} ({recipe.model.name}, {recipe.inference.backend}): "
        f"{items} (seed, question) items x {ev.votes} chains, max_new_tokens "
        f"{ev.max_new_tokens.generator}/{ev.max_new_tokens.verifier}/"
        f"{ev.max_new_tokens.refiner}; cache key {key.digest[:12]}.\n\n"
        + table(
            ["step", "champion results from", "wall s", "of one evaluate"],
            [["evaluate (3 systems)", "model", f"{evaluate_s:.2f}", "100%"], *rows],
        )
    )
    warm = float(rows[1][2]) / evaluate_s
    verdict = (
        f"Repeat promote, unchanged champion: {warm * 100:.1f}% of one evaluate "
        f"(target <= 10%: {'met' if warm <= 0.10 else 'MISSED'}); warm and cold results equal."
    )
    report("bench/promote.py", body, verdict, append=not args.no_append)


if __name__ == "__main__":
    main()
