"""`malt-ops` command line: one subcommand per stage, plus `run` for the whole pipeline."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from malt_ops.config import TRAINED, Recipe, load_recipe
from malt_ops.errors import CONFIG_ERROR_EXIT, MaltError, RegistryUnavailable, redact
from malt_ops.stages import evaluate, label, prepare, promote, register, sample, train
from malt_ops.stages.common import forcing
from malt_ops.storage import disk_full, validate_run_id

RETRYABLE_EXIT = 75
"""EX_TEMPFAIL: a service did not answer; the same command may succeed when retried."""

DEFAULT_RECIPE = "recipes/local.yaml"


def _common(parser: argparse.ArgumentParser, run_id_required: bool = True) -> None:
    parser.add_argument(
        "--recipe", default=DEFAULT_RECIPE, help=f"recipe YAML (default {DEFAULT_RECIPE})"
    )
    parser.add_argument(
        "--run-id",
        required=run_id_required,
        help="pipeline run id; outputs go to <storage.root>/runs/<run-id>/",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="where the recipe changed since this run's outputs were made, redo the stage "
        "(and, as their inputs change, every stage after it) instead of refusing",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set sampling.n=2 (repeatable)",
    )


def _recipe(args: argparse.Namespace) -> Recipe:
    return load_recipe(args.recipe, args.overrides)


def cmd_prepare(args: argparse.Namespace) -> dict[str, Any]:
    return prepare.run(_recipe(args), validate_run_id(args.run_id))


def cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    return sample.run(_recipe(args), validate_run_id(args.run_id), args.shard, args.num_shards)


def cmd_label(args: argparse.Namespace) -> dict[str, Any]:
    return label.run(_recipe(args), validate_run_id(args.run_id))


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    recipe = _recipe(args)
    run_id = validate_run_id(args.run_id)
    from malt_ops import distributed

    processes = recipe.training.processes
    if processes > 1 and not distributed.launched():
        return _launch_training(args, recipe, run_id, processes)
    return train.run(recipe, run_id, args.role)


def _launch_training(
    args: argparse.Namespace, recipe: Recipe, run_id: str, processes: int
) -> dict[str, Any]:
    """Run this same `malt-ops train` in ``processes`` processes under torchrun."""
    import subprocess

    from malt_ops import distributed
    from malt_ops.stages.common import stage_output

    arguments = ["train", "--recipe", args.recipe, "--run-id", run_id, "--role", args.role]
    arguments += [item for override in args.overrides for item in ("--set", override)]
    arguments += ["--force"] if getattr(args, "force", False) else []
    logging.getLogger("malt_ops").info(
        "train %s: %d processes (%s) under torchrun", args.role, processes, recipe.training.strategy
    )
    done = subprocess.run(distributed.launcher_command(processes, arguments), check=False)
    if done.returncode == RETRYABLE_EXIT:
        raise RegistryUnavailable(f"train {args.role}: a service did not answer; retry")
    if done.returncode != 0:
        raise MaltError(
            f"train {args.role}: the {processes} training processes failed (exit "
            f"{done.returncode}); their log above says why"
        )
    return stage_output(recipe, run_id, "train", unit=args.role).manifest().get("summary", {})


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    return evaluate.run(_recipe(args), validate_run_id(args.run_id))


def cmd_register(args: argparse.Namespace) -> dict[str, Any]:
    return register.run(_recipe(args), validate_run_id(args.run_id))


def cmd_promote(args: argparse.Namespace) -> dict[str, Any]:
    return promote.run(_recipe(args), validate_run_id(args.run_id))


def cmd_rollback(args: argparse.Namespace) -> dict[str, Any]:
    previous = promote.rollback(_recipe(args))
    print(
        "champion is now " + ", ".join(f"{role} v{version}" for role, version in previous.items())
    )
    return previous


def cmd_answer(args: argparse.Namespace) -> dict[str, Any]:
    from malt_ops import system_model

    recipe = _recipe(args)
    questions = system_model.read_questions(args.questions, args.file)
    if args.run_id:
        rows = system_model.run_answers(recipe, validate_run_id(args.run_id), questions)
    else:
        rows = system_model.registered_answers(recipe, args.alias, questions)
    for question, row in zip(questions, rows, strict=True):
        print(system_model.format_answer(question, row) + "\n", flush=True)
    return {"answers": rows}


def cmd_estimate(args: argparse.Namespace) -> dict[str, Any]:
    from malt_ops.estimate import estimate, format_estimate, load_hardware

    if args.gpus is not None and args.gpus < 1:
        raise MaltError(f"--gpus {args.gpus}: give 1 or more")
    result = estimate(
        _recipe(args),
        gpus=args.gpus,
        device=args.gpu_type,
        hardware=load_hardware(args.hardware),
        recipe_name=args.recipe,
    )
    print(format_estimate(result))
    return {"wall_seconds": result.total.wall_seconds, "gpu_seconds": result.total.gpu_seconds}


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    recipe = _recipe(args)
    run_id = validate_run_id(args.run_id or f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    from malt_ops.console import log_path, quiet
    from malt_ops.pipeline import run_pipeline

    if args.cycles < 1:
        raise MaltError(f"--cycles {args.cycles}: give 1 or more")
    logs = log_path(recipe.run.state_dir, run_id)
    if not args.verbose:
        print(f"malt-ops run {run_id}: full logs in {logs} (-v shows them here)", flush=True)
    with quiet(logs, args.verbose):
        return run_pipeline(
            recipe, args.recipe, args.overrides, run_id, cycles=args.cycles, force=args.force
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="malt-ops",
        description=(
            "MALT multi-agent post-training pipeline: prepare -> sample -> label (-> train -> evaluate)."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, handler: Callable, run_id_required: bool = True):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _common(sub, run_id_required)
        sub.set_defaults(handler=handler)
        return sub

    add("prepare", prepare.HELP, cmd_prepare)
    sub = add("sample", sample.HELP, cmd_sample)
    sub.add_argument(
        "--shard", type=int, default=0, help="which shard of the training questions (default 0)"
    )
    sub.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="number of shards (default sampling.num_shards)",
    )
    add("label", label.HELP, cmd_label)
    sub = add("train", train.HELP, cmd_train)
    sub.add_argument("--role", required=True, choices=TRAINED, help="which adapter to train")
    add("evaluate", evaluate.HELP, cmd_evaluate)
    add("register", register.HELP, cmd_register)
    add("promote", promote.HELP, cmd_promote)
    add(
        "rollback",
        "Move alias 'champion' back to the set it replaced (all three roles together).",
        cmd_rollback,
        run_id_required=False,
    )
    sub = add(
        "answer",
        "Ask the MALT system: print each turn of the chain and the final answer. Reads "
        "models:/<prefix>-system@<alias> from the registry, or a run's own adapters "
        "with --run-id.",
        cmd_answer,
        run_id_required=False,
    )
    sub.add_argument("questions", nargs="*", help="questions to ask (quote each one)")
    sub.add_argument(
        "--alias",
        default="champion",
        choices=("champion", "challenger"),
        help="which registered system to ask (default champion)",
    )
    sub.add_argument(
        "--file", help='JSONL file of questions, one {"question": ...} object per line'
    )
    sub = add(
        "estimate",
        "Print what one cycle of the recipe costs before it runs: tokens to generate, prefill "
        "and train, GPU hours and wall time per stage, and the assumptions behind them.",
        cmd_estimate,
        run_id_required=False,
    )
    sub.add_argument(
        "--gpus", type=int, help="GPUs the cycle may use (default: one vLLM engine's worth)"
    )
    sub.add_argument(
        "--gpu-type",
        help="a device of the hardware table, e.g. h100-80gb, h200, a100-80gb, l40s, cpu-2core "
        "(default kubernetes.gpu.gpu_type, else h100-80gb)",
    )
    sub.add_argument("--hardware", help="your own hardware table (default: malt_ops/hardware.yaml)")
    sub = add(
        "run",
        "Run the whole pipeline: the Airflow DAG in dags/, in-process with Airflow's "
        "dag.test(); finished stages are skipped on rerun.",
        cmd_run,
        run_id_required=False,
    )
    sub.add_argument(
        "--cycles",
        type=int,
        default=1,
        help="retraining cycles back to back (run ids <run-id>-c1, -c2, ...); each "
        "samples with the champion the previous one left",
    )
    return parser


STAGE_COMMANDS = ("prepare", "sample", "label", "train", "evaluate", "register", "promote")


def run_stage(arguments: list[str]) -> dict[str, Any]:
    """Run one stage from its ``malt-ops`` argument list in this process (Airflow's local mode).

    The same list is what a stage pod runs; errors raise MaltError instead of exiting.
    """
    if not arguments or arguments[0] not in STAGE_COMMANDS:
        raise MaltError(f"not a stage command: {arguments[:1]}; expected one of {STAGE_COMMANDS}")
    from malt_ops.console import say, take_skipped

    args = build_parser().parse_args(arguments)
    name = args.command + (f" {args.role}" if args.command == "train" else "")
    if args.command == "sample":
        name += f" shard {args.shard}"
    say(f"  {name} ...")
    started = time.monotonic()
    take_skipped()
    try:
        with forcing(getattr(args, "force", False)):
            result = args.handler(args) or {}
        took = _took(time.monotonic() - started)
        say(f"  {name} already done (skipped)" if take_skipped() else f"  {name} done in {took}")
        return result
    except BaseException as exc:
        reason = (redact(str(exc)).splitlines() or [type(exc).__name__])[0][:300]
        say(f"  {name} FAILED after {_took(time.monotonic() - started)}: {reason}")
        if isinstance(exc, OSError) and (error := _disk_full(exc)) is not None:
            raise error from None
        raise


def _took(seconds: float) -> str:
    return (
        f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"
    )


def _disk_full(exc: OSError) -> MaltError | None:
    """A full disk anywhere (store, temporary files, caches) as one line naming the file."""
    import tempfile

    where = exc.filename or f"a file (temporary files go to {tempfile.gettempdir()})"
    return disk_full(exc, where)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with forcing(getattr(args, "force", False)):
            args.handler(args)
    except RegistryUnavailable as exc:
        print(f"malt-ops {args.command}: error: {exc}", file=sys.stderr)
        return RETRYABLE_EXIT
    except MaltError as exc:
        print(f"malt-ops {args.command}: error: {redact(str(exc))}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    except OSError as exc:
        error = _disk_full(exc)
        if error is None:
            raise
        print(f"malt-ops {args.command}: error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    except KeyboardInterrupt:
        print(
            f"malt-ops {args.command}: interrupted; rerun with the same --run-id to resume",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
