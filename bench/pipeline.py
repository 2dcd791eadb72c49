"""Pipeline end to end: wall time per stage and the share of Airflow + MLflow overhead.

Runs the embedded default (recipes/local.yaml) the way `malt-ops run` does, in this process:
the Airflow DAG through ``dag.test()`` with MLflow tracking on, in a temporary state dir and
store (never the repo's .state). Every stage unit's own work is its manifest's
started_at..finished_at; every MLflow client call is timed by wrapping
``malt_ops.tracking.client_for``. Then:

- stage work: the union of the stage units' intervals;
- MLflow: all client calls (logging after each stage commits, the parent run, and the registry
  calls inside the stages: the champion lookup, register, promote);
- Airflow: the rest of the pipeline's wall time (airflow import, DAG parse, the plan / shards /
  roles tasks, task bookkeeping in its SQLite database, XCom);
- overhead = pipeline wall - (stage work - MLflow calls inside stages).

One-off costs of a fresh state dir (``airflow db migrate``, creating the MLflow database, each
in its own process) are reported apart: a second run in the same state dir does not pay them.

``--direct`` also runs prepare -> sample -> label -> train -> evaluate with ``cli.run_stage``
in a fresh process and a second store, tracking off (register and promote need MLflow, so
they are left out), and compares those stages' walls and their total with the DAG's.

    python bench/pipeline.py [--recipe recipes/local.yaml] [--set key=value ...] [--direct]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report, table

REPO = Path(__file__).resolve().parents[1]
DIRECT_STAGES = ("prepare", "sample", "label", "train", "evaluate")
SCIENCE_STAGES = ("sample", "label", "train", "evaluate")


def sections(script: str) -> list[tuple[str, str]]:
    """(heading, text) of each RESULTS.md section that ``script`` appended, oldest first."""
    from common import RESULTS

    found, heading, lines = [], None, []
    for line in [*RESULTS.read_text(encoding="utf-8").splitlines(), "## end"]:
        if line.startswith("## "):
            if heading and heading.startswith(f"## {script}"):
                found.append((heading[3:], "\n".join(lines)))
            heading, lines = line, []
        else:
            lines.append(line)
    return found


def stage_walls(text: str) -> dict[str, float]:
    """Seconds per stage (units summed) from a bench/pipeline.py section's stage table."""
    walls: dict[str, float] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"[0-9.]+", cells[1]) and cells[0] != "part":
            stage = cells[0].split(" [")[0]
            walls[stage] = walls.get(stage, 0.0) + float(cells[1])
    return walls


def science_minutes(text: str) -> dict[str, float]:
    """Minutes per stage of the whole science cycle, as bench/science.py's section states them
    ("sample 18.4 min, ... train 37.3 min", "evaluate 94.5 min"): the first figure per stage."""
    minutes: dict[str, float] = {}
    for stage, value in re.findall(r"\b(sample|label|train|evaluate) ([0-9.]+) min\b", text):
        minutes.setdefault(stage, float(value))
    return minutes


def before_after(recipe: str, walls: dict[str, float]) -> str:
    """This run's stage walls beside the last earlier bench/pipeline.py table of the same
    recipe, and the science cycle of bench/science.py's last science-test table scaled stage by
    stage with those measured ratios (an estimate, labelled as one)."""
    name = Path(recipe).name
    earlier = [(h, t) for h, t in sections("bench/pipeline.py") if f"\n{name} (" in t]
    if not earlier:
        return f"No earlier bench/pipeline.py table of {name} in RESULTS.md to compare with."
    heading, text = earlier[-1]
    before = stage_walls(text)
    rows, ratios = [], {}
    for stage in walls:
        if stage in before and before[stage] > 0:
            ratios[stage] = walls[stage] / before[stage]
            rows.append(
                [stage, f"{before[stage]:.1f}", f"{walls[stage]:.1f}", f"{1 / ratios[stage]:.2f}x"]
            )
    total_before, total_now = sum(before.values()), sum(walls.values())
    rows.append(
        [
            "all stages",
            f"{total_before:.1f}",
            f"{total_now:.1f}",
            f"{total_before / total_now:.2f}x",
        ]
    )
    out = (
        f"Before / after, measured: {name} stage walls against the table of {heading} "
        "(the same bench, same recipe, same machine kind; two runs on different days, so "
        "small ratios are noise):\n\n" + table(["stage", "before s", "now s", "speed-up"], rows)
    )
    science = [t for h, t in sections("bench/science.py") if "science-test" in h]
    minutes = science_minutes(science[-1]) if science else {}
    if not all(stage in minutes for stage in SCIENCE_STAGES):
        return out + "\n\nNo bench/science.py science-test table with stage minutes to scale."
    scaled = {s: minutes[s] * ratios.get(s, 1.0) for s in SCIENCE_STAGES}
    science_rows = [
        [s, f"{minutes[s]:.1f}", f"{ratios.get(s, 1.0):.2f}", f"{scaled[s]:.1f}"]
        for s in SCIENCE_STAGES
    ]
    science_rows.append(
        [
            "science cycle",
            f"{sum(minutes.values()):.1f}",
            "",
            f"{sum(scaled.values()):.1f} (estimated)",
        ]
    )
    return (
        out
        + "\n\nScience cycle (science-test.yaml, Qwen2.5-0.5B), ESTIMATED: its measured minutes "
        "per stage before (bench/science.py's last science-test table) x this table's "
        "now/before ratio of the same stage on local.yaml. The science model is larger and its "
        "prompts longer, so the ratio carries over only roughly:\n\n"
        + table(["stage", "before min (measured)", "x ratio", "now min (estimated)"], science_rows)
    )


class MlflowCalls:
    """Wall-clock intervals of every MLflow client call (and client creation)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float, str]] = []

    def install(self) -> None:
        import malt_ops.tracking
        from malt_ops import cli, registry  # noqa: F401  (the modules that import client_for)

        original = malt_ops.tracking.client_for
        timed = self._factory(original)
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("malt_ops") and (
                getattr(module, "client_for", None) is original
            ):
                module.client_for = timed

    def _factory(self, factory):
        def client_for(*args, **kwargs):
            start = time.time()
            client = factory(*args, **kwargs)
            self.calls.append((start, time.time(), "client_for"))
            return _TimedClient(client, self.calls)

        return client_for


class _TimedClient:
    def __init__(self, client, calls: list) -> None:
        self._client, self._calls = client, calls

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            start = time.time()
            try:
                return attribute(*args, **kwargs)
            finally:
                self._calls.append((start, time.time(), name))

        return call


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, finish in sorted(intervals):
        if finish <= end:
            continue
        total += finish - max(start, end)
        end = finish
    return total


def overlap(interval: tuple[float, float], others: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(interval[1], b) - max(interval[0], a)) for a, b in others)


def manifests(store_root: Path, run_id: str) -> list[dict]:
    found = []
    for path in sorted((store_root / "runs" / run_id).glob("*/MANIFEST*.json")):
        manifest = json.loads(path.read_text())
        found.append(
            {
                "stage": manifest["stage"],
                "unit": manifest["unit"] or "",
                "start": manifest["started_at"],
                "end": manifest["finished_at"],
            }
        )
    return sorted(found, key=lambda m: m["start"])


def through_airflow(args: argparse.Namespace, state: Path) -> dict:
    from malt_ops.config import load_recipe
    from malt_ops.pipeline import load_dag, prepare_airflow_home, run_pipeline

    overrides = [*args.overrides, f"run.state_dir={state}", f"storage.root={state / 'store'}"]
    recipe = load_recipe(args.recipe, overrides)
    one_off = {}
    start = time.perf_counter()
    prepare_airflow_home(recipe.run.state_dir)
    one_off["airflow db migrate"] = time.perf_counter() - start
    # In another process, so that this one imports mlflow during the run, as `malt-ops run` does.
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from malt_ops.tracking import tracking_uri; "
            "from malt_ops.config import load_recipe; tracking_uri(load_recipe(sys.argv[1], sys.argv[2:]))",
            args.recipe,
            *overrides,
        ],
        check=True,
    )
    one_off["MLflow database (python start included)"] = time.perf_counter() - start

    mlflow = MlflowCalls()
    mlflow.install()
    wall_start = time.time()
    load_dag()  # airflow's import and the first DAG parse, as `malt-ops run` pays them
    parsed = time.time()
    run_pipeline(recipe, args.recipe, overrides, args.run_id)
    wall_end = time.time()
    return {
        "one_off": one_off,
        "wall": wall_end - wall_start,
        "parse": parsed - wall_start,
        "units": manifests(state / "store", args.run_id),
        "mlflow": mlflow.calls,
    }


def direct(args: argparse.Namespace, state: Path) -> dict[str, float]:
    """The same stages with cli.run_stage in a fresh process, tracking off: stage -> seconds."""
    job = state.with_suffix(".json")
    state.mkdir(parents=True, exist_ok=True)
    job.write_text(json.dumps({**vars(args), "state": str(state)}))
    done = subprocess.run(
        [sys.executable, __file__, "--direct-worker", str(job)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def direct_worker(job: str) -> None:
    from malt_ops.cli import run_stage
    from malt_ops.config import TRAINED

    args = argparse.Namespace(**json.loads(Path(job).read_text()))
    state = Path(args.state)
    common = ["--recipe", args.recipe, "--run-id", args.run_id]
    for override in [
        *args.overrides,
        f"run.state_dir={state}",
        f"storage.root={state / 'store'}",
        "tracking.enabled=false",
        "sampling.policy=adapters",
    ]:
        common += ["--set", override]
    walls: dict[str, float] = {}
    for stage in DIRECT_STAGES:
        for extra in [["--role", r] for r in TRAINED] if stage == "train" else [[]]:
            start = time.perf_counter()
            run_stage([stage, *common, *extra])
            walls[stage] = walls.get(stage, 0.0) + time.perf_counter() - start
    print(json.dumps(walls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "local.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--run-id", default="bench")
    parser.add_argument("--direct", action="store_true", help="also run the stages directly")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state dir")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--direct-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct_worker:
        direct_worker(args.direct_worker)
        return
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    scratch = Path(tempfile.mkdtemp(prefix="malt-bench-pipeline-"))
    result = through_airflow(args, scratch / "airflow-run")
    direct_walls = direct(args, scratch / "direct-run") if args.direct else None
    if not args.keep:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"state kept in {scratch}")

    wall, units = result["wall"], result["units"]
    intervals = [(u["start"], u["end"]) for u in units]
    stage_work = union_seconds(intervals)
    calls = [(a, b) for a, b, _ in result["mlflow"]]
    mlflow_total = union_seconds(calls)
    mlflow_inside = sum(overlap(c, intervals) for c in calls)
    mlflow_outside = mlflow_total - mlflow_inside
    airflow = wall - stage_work - mlflow_outside
    overhead = wall - (stage_work - mlflow_inside)

    rows = []
    for unit in units:
        seconds = unit["end"] - unit["start"]
        inside = sum(overlap(c, [(unit["start"], unit["end"])]) for c in calls)
        row = [
            unit["stage"] + (f" [{unit['unit']}]" if unit["unit"] else ""),
            f"{seconds:.1f}",
            f"{inside:.1f}",
            f"{seconds / wall:.1%}",
        ]
        rows.append(row)
    stage_table = table(["stage unit", "wall s", "of it MLflow s", "share of pipeline"], rows)
    parts = [
        [
            "stage work (union of manifest intervals)",
            f"{stage_work:.1f}",
            f"{stage_work / wall:.1%}",
        ],
        [
            "  of it MLflow calls inside stages",
            f"{mlflow_inside:.1f}",
            f"{mlflow_inside / wall:.1%}",
        ],
        [
            "MLflow calls between stages (stage logging)",
            f"{mlflow_outside:.1f}",
            f"{mlflow_outside / wall:.1%}",
        ],
        [
            f"Airflow (import + DAG parse {result['parse']:.1f} s, tasks, bookkeeping)",
            f"{airflow:.1f}",
            f"{airflow / wall:.1%}",
        ],
        ["pipeline wall (`malt-ops run` after setup)", f"{wall:.1f}", "100%"],
        ["Airflow + MLflow overhead", f"{overhead:.1f}", f"{overhead / wall:.1%}"],
    ]
    parts_table = table(["part", "seconds", "share"], parts)
    one_off = ", ".join(f"{k} {v:.1f} s" for k, v in result["one_off"].items())
    overrides = " ".join(f"--set {o}" for o in args.overrides) or "no overrides"
    body = (
        f"{Path(args.recipe).name} ({overrides}), `malt-ops run` in-process: the Airflow DAG "
        "via dag.test(), MLflow on (SQLite), a fresh temporary state dir and store. All figures "
        "from this 2-core CPU; no GPU.\n\n"
        f"{stage_table}\n\n{parts_table}\n\n"
        f"One-off for a fresh state dir, not in the wall: {one_off}. Stage unit walls are each "
        "manifest's started_at..finished_at; MLflow is every MlflowClient call, timed. "
        "Overhead = wall - (stage work - MLflow inside stages): everything that is not a "
        "stage's own non-MLflow work."
    )
    if direct_walls is not None:
        by_stage: dict[str, float] = {}
        for unit in units:
            by_stage[unit["stage"]] = by_stage.get(unit["stage"], 0.0) + unit["end"] - unit["start"]
        direct_rows = [
            [stage, f"{by_stage.get(stage, 0.0):.1f}", f"{seconds:.1f}"]
            for stage, seconds in direct_walls.items()
        ]
        registry = by_stage.get("register", 0.0) + by_stage.get("promote", 0.0)
        direct_total = sum(direct_walls.values())
        direct_rows.append(
            [
                "pipeline wall without register + promote",
                f"{wall - registry:.1f}",
                f"{direct_total:.1f}",
            ]
        )
        by_difference = wall - registry - direct_total
        body += (
            "\n\nThe same stages run directly (`cli.run_stage` in one fresh process, tracking "
            "off, no Airflow), against the stage units' walls above; register and promote need "
            "MLflow and are left out of both totals:\n\n"
            + table(["stage", "via Airflow + MLflow, s", "direct, s"], direct_rows)
            + f"\n\nOverhead by difference: {by_difference:.1f} s "
            f"({by_difference / (wall - registry):.1%} of the DAG's wall without register + promote)."
        )
    by_stage_now: dict[str, float] = {}
    for unit in units:
        seconds = unit["end"] - unit["start"]
        by_stage_now[unit["stage"]] = by_stage_now.get(unit["stage"], 0.0) + seconds
    body += "\n\n" + before_after(args.recipe, by_stage_now)
    share = overhead / wall
    verdict = (
        f"Target: Airflow + MLflow overhead <= 10% of the pipeline -> "
        f"{'met' if share <= 0.10 else 'NOT met'} ({overhead:.1f} s of {wall:.1f} s = {share:.1%}).\n"
        f"Target: `make run` after setup <= 5 min -> {'met' if wall <= 300 else 'NOT met'} "
        f"({wall / 60:.1f} min)."
    )
    report("bench/pipeline.py", body, verdict, append=not args.no_append)


if __name__ == "__main__":
    main()
