"""Kill and resume: every stage, SIGKILLed at seeded-random moments and rerun with the same
run id, ends with the outputs of an uninterrupted run; so does `malt-ops run` killed mid-way.

Two "worlds" (store + state dir: MLflow's SQLite, Airflow's metadata) take turns at the one
path the recipe names, so both see the same recipe (its digest is in the adapters and the
model-version tags) and each has its own registry. For each stage the reference world runs
it uninterrupted (timed); the kill world runs the real CLI process, SIGKILLs its whole
process group at random fractions of that time, checks that nothing half-written is visible,
reruns it to completion and compares every committed file with the reference's.

Compared byte for byte: every file a manifest lists, adapter weights included (same seeds,
same CPU threads: torch training is deterministic here). Normalised first, because they
are legitimately time-dependent: manifests' started_at / finished_at, summaries'
wall_seconds and tokens_per_second, sample's batches_reused (it is the resume counter), and
TRL's train_runtime / *_per_second in train/metrics/<role>.json (losses are compared exactly).
Trained in the kill world with kills: generator (SFT) and verifier (SFT + DPO); refiner and
star are trained once, in the reference world, and copied (evaluate needs them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from malt_ops.backends.base import Completion, InferenceBackend, Usage
from malt_ops.config import ROLES, load_recipe
from malt_ops.registry import CHAMPION, alias_versions
from malt_ops.stages import prepare, promote, register, sample
from malt_ops.stages.common import stage_output
from malt_ops.storage import StageOutput
from malt_ops.tracking import client_for
from tests.conftest import committed


def slow(test):
    """Kill tests: real CLI processes on SmolLM2 (`make test-slow`)."""
    for mark in (pytest.mark.slow, pytest.mark.model, pytest.mark.timeout(1500, method="signal")):
        test = mark(test)
    return test


def tally(test):
    """The kill tally: every stage killed twice, and `malt-ops run` once (about half an hour
    on 2 cores): `make test-nightly`, not CI's `make test-slow`."""
    return pytest.mark.nightly(slow(test))


REPO = Path(__file__).resolve().parents[1]
LOCAL_RECIPE = REPO / "recipes" / "local.yaml"
RUN = "resume"
SEED = 7
KILLS = 2  # per stage, at random moments; sample: one at random, one once it checkpointed a batch
TRAIN = yaml.safe_load(LOCAL_RECIPE.read_text())["training"]
TINY = {
    "data": {
        "train_size": 3,
        "test_size": 2,
        "task_config": {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 1,
            "operators": ["+"],
            "allow_negation": False,
            "allow_parentheses": False,
        },
    },
    # One question per checkpoint batch: three batches to be killed between.
    "sampling": {
        "n": 2,
        "m": 2,
        "l": 2,
        "max_new_tokens": {"generator": 32, "verifier": 32, "refiner": 32},
        "checkpoint_every": 1,
    },
    "labeling": {"threshold": 0.01},
    # max_length holds the refiner's prompt (two earlier turns of 32 tokens in the issue-16
    # role prompts, about 260 tokens) and its own 32: label refuses a budget that cannot.
    "training": {
        role: {**values, "max_steps": 1, "max_length": 384} if isinstance(values, dict) else values
        for role, values in TRAIN.items()
    },
    "evaluation": {
        "seeds": [0],
        "subset_size": 1,
        "votes": 1,
        "max_new_tokens": {"generator": 16, "verifier": 16, "refiner": 16},
    },
    # Promotion forced, so that the kills meet the champion move too.
    "promotion": {"require_significance": False, "min_effect": -1},
    "schedule": {"cron": None, "retries": 0, "retry_delay_minutes": 0},
}
BATCHES = TINY["data"]["train_size"]
# stage step -> (CLI arguments, the manifest that commits it)
STEPS = {
    "prepare": (["prepare"], "prepare/MANIFEST.json"),
    "sample": (["sample", "--shard", "0"], "sample/MANIFEST-shard-0.json"),
    "label": (["label"], "label/MANIFEST.json"),
    "train generator": (["train", "--role", "generator"], "train/MANIFEST-generator.json"),
    "train verifier": (["train", "--role", "verifier"], "train/MANIFEST-verifier.json"),
    "evaluate": (["evaluate"], "evaluate/MANIFEST.json"),
    "register": (["register"], "register/MANIFEST.json"),
    "promote": (["promote"], "promote/MANIFEST.json"),
}
TIME_KEYS = {"started_at", "finished_at", "wall_seconds", "tokens_per_second", "batches_reused"}
# Which attempt committed a unit differs from world to world, and with it the digests of the
# input manifests a later unit records (their bytes name the attempt).
TIME_KEYS |= {"attempt", "inputs"}
TALLY: dict[str, dict] = {}


def _time_dependent(key: str) -> bool:
    return key in TIME_KEYS or key.endswith(("_runtime", "_per_second"))


def normalise(value):
    """The value with its time-dependent fields blanked (see the module docstring)."""
    if isinstance(value, dict):
        return {k: "<time>" if _time_dependent(k) else normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def _normalised_file(name: str) -> bool:
    return name.startswith("metrics/") and name.endswith(".json")


class World:
    """A store and state dir that take turns at the path the recipe points at."""

    def __init__(self, root: Path, name: str, active: Path) -> None:
        self.home = root / name
        self.home.mkdir()
        self.active_path = active

    @contextlib.contextmanager
    def active(self):
        os.rename(self.home, self.active_path)
        try:
            yield self.active_path
        finally:
            os.rename(self.active_path, self.home)

    def run_dir(self, stage: str = "") -> Path:
        return self.home / "store" / "runs" / RUN / stage


class Harness:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.active = root / "active"
        self.logs = root / "logs"
        self.logs.mkdir()
        data = yaml.safe_load(LOCAL_RECIPE.read_text())
        for section, values in TINY.items():
            data[section] = {**data.get(section, {}), **values}
        data["storage"] = {"root": str(self.active / "store")}
        data["run"] = {"state_dir": str(self.active / "state")}
        self.recipe = root / "recipe.yaml"
        self.recipe.write_text(yaml.safe_dump(data))
        self.ref = World(root, "ref", self.active)
        self.kill = World(root, "kill", self.active)
        self.rng = random.Random(SEED)
        self.durations: dict[str, float] = {}
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self._count = 0

    def start(self, args: list[str]) -> tuple[subprocess.Popen, Path]:
        """`malt-ops ARGS` in its own process group (so a kill takes its children too)."""
        self._count += 1
        log = self.logs / f"{self._count:03d}-{args[0]}.log"
        command = [sys.executable, "-m", "malt_ops.cli", *args]
        if args[0] != "run" or "--recipe" not in args:
            command += ["--recipe", str(self.recipe), "--run-id", RUN]
        with open(log, "wb") as handle:
            proc = subprocess.Popen(
                command,
                cwd=REPO,
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return proc, log

    def complete(self, args: list[str], timeout: float = 900) -> tuple[float, str]:
        started = time.monotonic()
        proc, log = self.start(args)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            _kill_group(proc)
        text = log.read_text(errors="replace")
        assert code == 0, f"malt-ops {' '.join(args)} failed ({code}):\n{text[-3000:]}"
        return time.monotonic() - started, text

    def killed_at(self, args: list[str], seconds: float, until=None) -> float | None:
        """Start the stage and SIGKILL it after ``seconds`` (or once ``until()`` holds);
        the seconds it ran, or None when it finished first."""
        started = time.monotonic()
        proc, log = self.start(args)
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            if (until is None and elapsed >= seconds) or (until is not None and until()):
                _kill_group(proc)
                return elapsed
            if elapsed > 900:
                _kill_group(proc)
                pytest.fail(f"malt-ops {args[0]} hung: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        _kill_group(proc)
        text = log.read_text(errors="replace")
        assert proc.returncode == 0, f"malt-ops {args[0]} failed:\n{text[-3000:]}"
        return None


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a child may leave our process group, not the session)."""
    members = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if entry.name.isdigit() and int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started, as a lost node would."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in _session(proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def harness(tmp_path_factory, request):
    harness = Harness(tmp_path_factory.mktemp("resume"))
    yield harness
    if not TALLY:
        return
    lines = [
        "",
        "kill-and-resume tally (SIGKILL of the whole process group, then a rerun):",
        f"{'stage':<16} {'uninterrupted':>13} {'kills':>5} {'survived':>8}  killed at (s)",
    ]
    for name, row in TALLY.items():
        at = ", ".join(f"{s:.1f}" for s in row["at"]) or "-"
        took = "-" if row["seconds"] is None else f"{row['seconds']:.1f}s"
        lines.append(
            f"{name:<16} {took:>13} {len(row['at']):>5} {row['survived']:>8}  {at}"
            + (f"  ({row['note']})" if row.get("note") else "")
        )
    total = sum(len(r["at"]) for r in TALLY.values())
    lines.append(
        f"{'total':<16} {'':>13} {total:>5} {sum(r['survived'] for r in TALLY.values()):>8}"
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            for line in lines:
                reporter.write_line(line)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_nothing_half_written(run: Path) -> int:
    """After a kill: every manifest's files are whole, every JSON file parses, every
    sampling checkpoint with a marker matches it. Returns the complete checkpoint parts."""
    for manifest in run.glob("*/MANIFEST*.json"):
        committed = json.loads(manifest.read_text())
        for name, meta in committed["files"].items():
            path = _unit_dir(manifest.parent, committed) / name
            assert sha256(path) == meta["sha256"], (manifest, name)
    if not run.exists():
        return 0
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            for line in path.read_text().split("\n") if path.suffix == ".jsonl" else []:
                if line:
                    json.loads(line)
            if path.suffix == ".json":
                json.loads(path.read_text())
    parts = 0
    for marker in run.glob("sample/parts/shard-*/*.done.json"):
        data = marker.with_name(marker.name.replace(".done.json", ".jsonl"))
        assert sha256(data) == json.loads(marker.read_text())["sha256"], marker
        parts += 1
    return parts


def assert_same_outputs(reference: Path, other: Path, manifest: str) -> None:
    """The unit's manifest and every file it lists are the same in both runs (normalised
    where time-dependent)."""
    stage = manifest.split("/")[0]
    ours, theirs = (json.loads((p / manifest).read_text()) for p in (reference, other))
    for files in (ours["files"], theirs["files"]):
        for name in files:
            if _normalised_file(name):
                files[name] = "<time-dependent file, compared below>"
    assert normalise(ours) == normalise(theirs), manifest
    for name in ours["files"]:
        a = _unit_dir(reference / stage, ours) / name
        b = _unit_dir(other / stage, theirs) / name
        if _normalised_file(name):
            assert normalise(json.loads(a.read_text())) == normalise(json.loads(b.read_text())), (
                name
            )
        else:
            assert a.read_bytes() == b.read_bytes(), f"{stage}/{name} differs after the kills"


def _unit_dir(stage_dir: Path, manifest: dict) -> Path:
    """Where a committed unit's files lie: below the attempt its manifest names."""
    attempt = manifest.get("attempt")
    return stage_dir / "attempts" / attempt if attempt else stage_dir


def _copy_unit(source: Path, target: Path, stage: str, unit: str) -> None:
    """Copy one committed unit (its manifest and files) between worlds."""
    manifest = json.loads((source / stage / f"MANIFEST-{unit}.json").read_text())
    here, there = _unit_dir(source / stage, manifest), _unit_dir(target / stage, manifest)
    for name in manifest["files"]:
        (there / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(here / name, there / name)
    shutil.copy2(source / stage / f"MANIFEST-{unit}.json", target / stage / f"MANIFEST-{unit}.json")


@tally
@pytest.mark.parametrize("step", list(STEPS))
def test_stage_survives_kills(harness, step):
    args, manifest = STEPS[step]
    h = harness
    if step == "evaluate":  # refiner and star: trained once in the reference, copied over
        with h.ref.active():
            for role in ("refiner", "star"):
                h.complete(["train", "--role", role])
        for role in ("refiner", "star"):
            _copy_unit(h.ref.run_dir(), h.kill.run_dir(), "train", role)
    with h.ref.active():
        seconds, _ = h.complete(args)
    h.durations[step] = seconds
    row = TALLY.setdefault(step, {"seconds": seconds, "at": [], "survived": 0, "note": ""})
    with h.kill.active() as active:
        run = active / "store" / "runs" / RUN
        for _ in range(KILLS - (step == "sample")):
            at = h.killed_at(args, seconds * h.rng.uniform(0.1, 0.8))
            if at is None:
                row["note"] = "finished before a kill"
                break
            row["at"].append(at)
            assert_nothing_half_written(run)
        parts = assert_nothing_half_written(run)
        if step == "sample" and parts < BATCHES - 1 and not (run / manifest).exists():
            # One more kill, as soon as this process has checkpointed a batch of its own.
            def checkpointed() -> bool:
                return len(list(run.glob("sample/parts/shard-0/*.done.json"))) > parts

            at = h.killed_at(args, 0, until=checkpointed)
            if at is not None:
                row["at"].append(at)
            parts = assert_nothing_half_written(run)
        resumed = not (run / manifest).exists()
        _, output = h.complete(args)
    assert_same_outputs(h.ref.run_dir(), h.kill.run_dir(), manifest)
    if step == "sample" and resumed:
        summary = json.loads((h.kill.run_dir() / manifest).read_text())["summary"]
        assert summary["batches"] == BATCHES
        assert summary["batches_reused"] == parts >= 1, (summary, parts)
        assert f"{parts} of {BATCHES} batches reused" in output
        assert not (h.kill.run_dir() / "sample" / "parts" / "shard-0").exists()
    row["survived"] = len(row["at"])


@tally
def test_whole_run_killed_mid_way(harness):
    """`malt-ops run` (the DAG in-process) killed once mid-way, rerun: the reference's outputs."""
    h = harness
    world = World(h.root, "dag", h.active)
    args = ["run", "--recipe", str(h.recipe), "--run-id", RUN]
    sampled = world.active_path / "store" / "runs" / RUN / STEPS["sample"][1]
    delay = h.rng.uniform(0, h.durations["label"] + h.durations["train generator"])
    state: dict[str, float] = {}

    def mid_way() -> bool:  # a random moment after sampling, before the end
        if "sampled" not in state and sampled.exists():
            state["sampled"] = time.monotonic()
        return "sampled" in state and time.monotonic() - state["sampled"] >= delay

    with world.active() as active:
        at = h.killed_at(args, 0, until=mid_way)
        assert at is not None, "the run finished before the kill"
        run = active / "store" / "runs" / RUN
        assert_nothing_half_written(run)
        assert not (run / STEPS["promote"][1]).exists()
        done_before = sorted(p.relative_to(run).as_posix() for p in run.glob("*/MANIFEST*.json"))
        _, output = h.complete(args)
        assert "already done" in output
    TALLY["malt-ops run"] = {
        "seconds": None,
        "at": [at],
        "survived": 0,
        "note": f"committed before the kill: {', '.join(done_before)}",
    }
    manifests = sorted(
        p.relative_to(h.ref.run_dir()).as_posix() for p in h.ref.run_dir().glob("*/MANIFEST*.json")
    )
    assert (
        sorted(
            p.relative_to(world.run_dir()).as_posix()
            for p in world.run_dir().glob("*/MANIFEST*.json")
        )
        == manifests
    )
    for manifest in manifests:
        assert_same_outputs(h.ref.run_dir(), world.run_dir(), manifest)
    TALLY["malt-ops run"]["survived"] = 1


class Crash(BaseException):
    """A process dying mid-sample, as far as the stage can tell."""


class SeededBackend(InferenceBackend):
    """Outputs that depend only on the prompt, its request seed and the sample index, as a
    real sampler's do; ``crash_after`` generate calls, it dies."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.usage = Usage()
        self.adapters: dict[str, str] = {}
        self.calls = 0
        self.crash_after = crash_after

    @property
    def tokenizer(self):
        return None

    def add_adapter(self, name: str, path: str) -> None:
        self.adapters[name] = path

    def generate(self, prompts, params, adapter=None, desc="generate"):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise Crash
        self.calls += 1
        results = []
        for prompt, seed in zip(prompts, params.prompt_seeds(len(prompts)), strict=True):
            row = []
            for k in range(params.n):
                key = f"{seed}/{k}/{json.dumps(prompt)}".encode()
                answer = int(hashlib.sha256(key).hexdigest(), 16) % 3
                text = f"Verdict: correct\nFinal answer: {answer}"
                row.append(Completion(text, 10, 5, True))
                self.usage.completion_tokens += 5
            results.append(row)
        self.usage.seconds += 0.01
        return results


def test_sample_resumes_from_the_last_checkpointed_batch(recipe_file):
    """In process, no model: a shard that dies in its second batch resumes from it, and ends
    with the trees of a run that never died."""
    recipe = load_recipe(
        recipe_file(
            data={"train_size": 5},
            sampling={"checkpoint_every": 2, "policy": "adapters"},
            tracking={"enabled": False},
        )
    )
    store = Path(recipe.storage.root)
    for run in ("whole", "crashed"):
        prepare.run(recipe, run)
    whole = sample.run(recipe, "whole", backend=SeededBackend())
    assert whole["batches"] == 3 and whole["batches_reused"] == 0

    with pytest.raises(Crash):  # dies in batch 1, after its generator level
        sample.run(recipe, "crashed", backend=SeededBackend(crash_after=4))
    parts = store / "runs" / "crashed" / "sample" / "parts" / "shard-0"
    assert not (parts.parents[1] / "MANIFEST-shard-0.json").exists()
    assert sorted(p.name for p in parts.iterdir()) == [
        "batch-00000.done.json",
        "batch-00000.jsonl",
    ]
    rerun = SeededBackend()
    resumed = sample.run(recipe, "crashed", backend=rerun)
    assert rerun.calls == 2 * 3  # batches 1 and 2, three levels each; batch 0 reused
    assert resumed["batches_reused"] == 1 and not parts.exists()
    trees = [
        committed(store / "runs" / run, "sample", "trees/shard-0.jsonl", "shard-0")
        for run in ("whole", "crashed")
    ]
    assert trees[0].read_bytes() == trees[1].read_bytes()
    assert normalise(resumed) == normalise(whole)


def test_sample_checkpoints_from_other_inputs_are_not_reused(recipe_file):
    recipe = load_recipe(
        recipe_file(
            data={"train_size": 4},
            sampling={"checkpoint_every": 2, "policy": "adapters"},
            tracking={"enabled": False},
        )
    )
    prepare.run(recipe, "r")
    with pytest.raises(Crash):
        sample.run(recipe, "r", backend=SeededBackend(crash_after=3))
    hotter = recipe.model_copy(
        update={"sampling": recipe.sampling.model_copy(update={"temperature": 0.9})}
    )
    rerun = SeededBackend()
    assert sample.run(hotter, "r", backend=rerun)["batches_reused"] == 0
    assert rerun.calls == 2 * 3


def _evaluated_run(recipe, run_id: str) -> None:
    """What prepare, train and evaluate leave for register and promote (no model needed)."""
    prepared = stage_output(recipe, run_id, "prepare")
    prepared.write_jsonl("problems/train.jsonl", [{"id": "q", "question": "What is 1+1?"}])
    prepared.commit({})
    for role in ROLES:
        trained = stage_output(recipe, run_id, "train", role)
        trained.write_json(f"adapters/{role}/adapter_config.json", {"r": 8, "role": role})
        trained.commit({})
    evaluated = stage_output(recipe, run_id, "evaluate")
    evaluated.write_json("report.json", {"settings": [{"setting": "MALT", "mean": 1, "std": 0}]})
    evaluated.write_jsonl(
        "per_question.jsonl",
        [
            {"system": system, "seed": 0, "question_id": f"q{i}", "refiner_mv": system == "malt"}
            for system in ("malt", "base")
            for i in range(4)
        ],
    )
    evaluated.commit({})


def test_register_and_promote_resume_after_dying_mid_way(recipe_file, monkeypatch):
    """In process, on the default SQLite registry: register dies after one model version,
    promote after moving the champion; their reruns finish the same set and decision."""
    recipe = load_recipe(recipe_file(tracking={"enabled": True}))
    _evaluated_run(recipe, "r")
    create, created = register._create_version, []

    def create_once(*args, **kwargs):
        if created:
            raise Crash
        created.append(create(*args, **kwargs))
        return created[-1]

    monkeypatch.setattr(register, "_create_version", create_once)
    with pytest.raises(Crash):
        register.run(recipe, "r")
    monkeypatch.setattr(register, "_create_version", create)
    versions = register.run(recipe, "r")["versions"]
    # The generator's version reused, not registered twice.
    assert {r: str(v) for r, v in versions.items()} == dict.fromkeys(ROLES, "1")
    client = client_for(recipe)
    for role in ROLES:
        assert len(client.search_model_versions(f"name = 'malt-{role}'")) == 1

    commit = StageOutput.commit

    def die_before_promote_commits(self, summary=None):
        if self.prefix.endswith("/promote"):
            raise Crash
        return commit(self, summary)

    monkeypatch.setattr(StageOutput, "commit", die_before_promote_commits)
    with pytest.raises(Crash):
        promote.run(recipe, "r")
    champion = alias_versions(recipe, CHAMPION)
    assert {r: str(v.version) for r, v in champion.items()} == dict.fromkeys(ROLES, "1")
    monkeypatch.setattr(StageOutput, "commit", commit)
    decision = promote.run(recipe, "r")
    assert decision["promoted"] and decision["champion_before"] is None
    assert decision["reference"].startswith("untrained base") and decision["challenger"] == versions
    assert not Path(recipe.storage.root, "runs/r/promote/pending").exists()


# ----------------------------------------------- training killed between two checkpoints


def _labeled_run(recipe, run_id: str) -> None:
    """prepare as the recipe says, then label's datasets made by hand: eight worked answers
    per role to fine-tune on, and four preference pairs for the verifier's DPO."""
    from malt_ops.prompts import generator_messages

    prepare.run(recipe, run_id)
    problems = list(stage_output(recipe, run_id, "prepare").iter_jsonl("problems/train.jsonl"))
    rows, pairs = [], []
    for i in range(8):
        problem = problems[i % len(problems)]
        prompt = generator_messages(problem)
        answer = problem["answer"]
        good = {
            "role": "assistant",
            "content": f"Step {i}: the sum is {answer}.\nFinal answer: {answer}",
        }
        bad = {"role": "assistant", "content": f"Step {i}: I think it is 0.\nFinal answer: 0"}
        rows.append({"messages": [*prompt, good], "question_id": problem["id"], "node_id": f"n{i}"})
        if i < 4:
            pairs.append({"prompt": prompt, "chosen": [good], "rejected": [bad]})
    labeled = stage_output(recipe, run_id, "label")
    for role in ("generator", "verifier"):
        labeled.write_jsonl(f"datasets/{role}_sft.jsonl", rows)
        labeled.write_jsonl(f"datasets/{role}_dpo.jsonl", pairs)
    labeled.commit({})


def _train_process(recipe_path: Path, run_id: str, role: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "malt_ops.cli",
            "train",
            "--recipe",
            str(recipe_path),
            "--run-id",
            run_id,
            "--role",
            role,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@slow
@pytest.mark.parametrize("role, phase", [("generator", "sft"), ("verifier", "dpo")])
def test_training_killed_midway_resumes_to_the_same_weights(role, phase, recipe_file, tmp_path):
    """A kill after a checkpoint loses at most checkpoint_steps steps: the rerun restores
    the optimizer, scheduler, RNG states and data position from the store's checkpoint and
    ends with the weights of an uninterrupted run, bit for bit (CPU, same threads)."""
    steps = {"max_steps": 3, "dpo_max_steps": 3, "batch_size": 2, "max_length": 256}
    path = recipe_file(
        tracking={"enabled": False},
        training={
            **TRAIN,
            "checkpoint_steps": 1,
            role: {**TRAIN[role], **steps, "gradient_checkpointing": False},
        },
    )
    recipe = load_recipe(path)
    for run_id in ("straight", "killed"):
        _labeled_run(recipe, run_id)
    straight = _train_process(path, "straight", role)
    assert straight.wait(timeout=900) == 0, straight.stdout.read()[-3000:]

    killed = _train_process(path, "killed", role)
    store = stage_output(recipe, "killed", "train", unit=role).store
    prefix = "runs/killed/train/checkpoints/"
    deadline = time.monotonic() + 900
    marker = None
    while time.monotonic() < deadline and killed.poll() is None:
        found = [k for k in store.list(prefix) if k.endswith(f"/{phase}/latest.json")]
        if found and role in found[0] and store.read_json(found[0])["step"] >= 1:
            marker = found[0]
            break
        time.sleep(0.2)
    assert marker is not None, (
        f"no checkpoint before the run ended: {killed.communicate()[0][-3000:]}"
    )
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    out = stage_output(recipe, "killed", "train", unit=role)
    assert not out.done()

    rerun = _train_process(path, "killed", role)
    log = rerun.communicate(timeout=900)[0]
    assert rerun.returncode == 0, log[-3000:]
    assert f"resuming {phase} from its checkpoint at step" in log, log[-3000:]
    weights = f"adapters/{role}/adapter_model.safetensors"
    reference = stage_output(recipe, "straight", "train", unit=role)
    assert out.read_bytes(weights) == reference.read_bytes(weights)
    assert not store.list(prefix)  # committed: the checkpoints are gone
