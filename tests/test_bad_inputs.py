"""The bad-input corpus (tests/bad_inputs/cases.yaml): every case is rejected cleanly.

Each case breaks one input (a data file, a recipe, a model or adapter, a stage's input
file, S3, MLflow) and says what must happen: a one-line error with exit code 2, or a
counted skip that the stage's manifest reports. Every case also checks what must never
happen: a traceback, a manifest from a failed stage, or a change to what earlier stages
wrote. Stages run in this process through ``malt_ops.cli.main``; no case loads a model.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from malt_ops import cli
from malt_ops.backends.base import Completion, InferenceBackend, Usage
from malt_ops.config import load_recipe
from malt_ops.stages import sample
from malt_ops.stages.common import stage_output
from malt_ops.storage import open_store
from tests.conftest import LOCAL_RECIPE

CORPUS = Path(__file__).parent / "bad_inputs"
FILES = CORPUS / "files"
CASES: list[dict[str, Any]] = yaml.safe_load((CORPUS / "cases.yaml").read_text())["cases"]
RUN = "case"
EARLIER = "earlier"
GOOD_TREES = FILES / "trees" / "good.jsonl"


def _expand(value: Any, places: dict[str, str]) -> Any:
    if isinstance(value, str):
        for name, text in places.items():
            value = value.replace("{" + name + "}", text)
        return value
    if isinstance(value, list):
        return [_expand(v, places) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, places) for k, v in value.items()}
    return value


def _text(spec: Any) -> str:
    """A text given inline, or as {text, repeat, head, tail} for large generated inputs."""
    if isinstance(spec, str):
        return spec
    return spec.get("head", "") + spec["text"] * spec.get("repeat", 1) + spec.get("tail", "")


class ScriptedBackend(InferenceBackend):
    """Returns the case's generations per role, cycling, instead of running a model."""

    def __init__(self, generations: dict[str, list[Any]]) -> None:
        self.outputs = generations
        self.usage = Usage()
        self.adapters: dict[str, str] = {}

    @property
    def tokenizer(self):
        return None

    def add_adapter(self, name: str, path: str) -> None:
        self.adapters[name] = path

    def generate(self, prompts, params, adapter=None, desc="generate"):
        script = self.outputs[desc]
        results, index = [], 0
        for _ in prompts:
            row = []
            for _ in range(params.n):
                spec = script[index % len(script)]
                index += 1
                finished = spec.get("finished", True) if isinstance(spec, dict) else True
                text = _text(spec)
                row.append(Completion(text, 40, max(1, len(text) // 4), finished))
                self.usage.completion_tokens += row[-1].completion_tokens
            results.append(row)
        self.usage.seconds += 0.01
        return results


def _snapshot(root: str) -> dict[str, bytes]:
    store = open_store(root)
    return {key: store.read_bytes(key) for key in store.list("runs")}


def _manifests(root: str) -> set[str]:
    with contextlib.suppress(Exception):  # e.g. a bucket that does not exist
        return {k for k in open_store(root).list("runs") if "/MANIFEST" in k}
    return set()


def _summary(root: str, where: str) -> dict[str, Any]:
    """The committed summary of 'prepare', 'label' or 'sample[shard-0]' in the case's run."""
    stage, _, unit = where.partition("[")
    manifest = open_store(root).read_json(
        f"runs/{RUN}/{stage}/MANIFEST{'-' + unit.rstrip(']') if unit else ''}.json"
    )
    return manifest["summary"]


def _run_cli(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse refuses the command line itself
        return int(exc.code or 0)


def _write_finished_run(recipe_path: Path) -> None:
    """What train and evaluate leave behind, so that register has its inputs."""
    recipe = load_recipe(recipe_path)
    for role in ("generator", "verifier", "refiner"):
        trained = stage_output(recipe, RUN, "train", unit=role)
        trained.write_json(f"adapters/{role}/adapter_config.json", {"peft_type": "LORA", "r": 8})
        trained.commit({})
    evaluated = stage_output(recipe, RUN, "evaluate")
    evaluated.write_json("report.json", {"settings": [{"setting": "MALT", "mean": 0.5, "std": 0}]})
    evaluated.commit({})


def _write_trees(recipe_path: Path, trees: Path) -> None:
    """A committed sample shard holding the case's trees file, as the sample stage leaves it."""
    recipe = load_recipe(recipe_path)
    # The trees' questions are the prepared ones (label checks that the shards cover them).
    problems = {}
    for line in trees.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            tree = json.loads(line)
            problem = tree.get("problem") if isinstance(tree, dict) else None
            if isinstance(problem, dict) and isinstance(problem.get("id"), str):
                problems.setdefault(problem["id"], problem)
    prepared = stage_output(recipe, RUN, "prepare")
    prepared.replace = True  # over the prepare of the setup
    prepared.write_jsonl("problems/train.jsonl", list(problems.values()))
    prepared.write_jsonl("problems/test.jsonl", [])
    prepared.commit({})
    sampled = stage_output(recipe, RUN, "sample", unit="shard-0")
    sampled.write_bytes("trees/shard-0.jsonl", trees.read_bytes())
    sampled.commit({"shard": 0, "num_shards": 1})


def _recipes(tmp_path: Path, case: dict[str, Any], root: str) -> tuple[Path, Path]:
    """The good recipe (recipes/local.yaml, store under tmp) and the case's (with its fragment)."""
    data = yaml.safe_load(LOCAL_RECIPE.read_text())
    data["storage"] = {"root": root}
    data["run"] = {"state_dir": str(tmp_path / "state")}
    # Nothing reaches MLflow or the registry unless the case asks for it.
    data["tracking"]["enabled"] = False
    data["sampling"]["policy"] = "adapters"
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(data))
    if "fragment" in case:
        for section, values in yaml.safe_load(Path(case["fragment"]).read_text()).items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return good, path


def _data_overrides(case: dict[str, Any]) -> list[str]:
    if "train_file" not in case:
        return []
    return [
        "data.source=file",
        f"data.benchmark={case.get('benchmark', 'gsm8k')}",
        f"data.train_path={case['train_file']}",
        "data.train_size=null",
        "data.test_size=null",
    ]


TALLY: dict[str, list[int]] = {}
"""category -> [cases run, cases rejected cleanly]"""


@pytest.fixture(scope="module", autouse=True)
def tally(request):
    """Print the corpus tally after the run (for the RELIABILITY table)."""
    yield TALLY
    if not TALLY:
        return
    cases = sum(n for n, _ in TALLY.values())
    clean = sum(c for _, c in TALLY.values())
    by_category = ", ".join(f"{k} {c}/{n}" for k, (n, c) in sorted(TALLY.items()))
    line = f"bad-input corpus: {clean} of {cases} cases rejected cleanly ({by_category})"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line("")
            reporter.write_line(line)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_is_rejected_cleanly(case, tmp_path, monkeypatch, capsys, caplog, request):
    counts = TALLY.setdefault(case["category"], [0, 0])
    counts[0] += 1
    places = {"files": str(FILES), "tmp": str(tmp_path)}
    if case.get("s3"):
        s3 = request.getfixturevalue("s3_env")
        places["bucket"] = s3["bucket"]
        places["prefix"] = f"bad-{tmp_path.name[-12:]}".replace("_", "-")
    case = _expand(case, places)
    for name, spec in case.get("write", {}).items():
        (tmp_path / name).write_text(_text(spec))
    root = case.get("storage_root", str(tmp_path / "store"))
    good_recipe, recipe_path = _recipes(tmp_path, case, root)
    common = ["--recipe", str(recipe_path), "--run-id", case.get("run_id", RUN)]
    overrides = [*_data_overrides(case), *case.get("set", [])]
    stage = case["stage"]

    # Earlier stages, written with a good recipe: the case must leave them as they are.
    setup = case.get("setup", ["prepare-other-run"] if stage == "prepare" else ["prepare"])
    good = ["--recipe", str(good_recipe)]
    for step in setup:
        if step == "prepare-other-run":
            assert _run_cli(["prepare", *good, "--run-id", EARLIER]) == 0
        elif step == "prepare":  # the case's data, or the setup_set's
            data = [*_data_overrides(case), *case.get("setup_set", [])]
            assert _run_cli(["prepare", *good, *(f"--set={o}" for o in data), "--run-id", RUN]) == 0
        elif step == "trees":
            _write_trees(good_recipe, Path(case.get("trees", GOOD_TREES)))
        elif step == "finished-run":
            _write_finished_run(good_recipe)
    before = _snapshot(root) if setup else {}
    manifests_before = _manifests(root)
    capsys.readouterr()
    caplog.clear()

    if "recipe" in case:  # a whole recipe file, as it is
        common[1] = case["recipe"]
    argv = [*case.get("argv", [])]
    with monkeypatch.context() as env:
        for name, value in case.get("env", {}).items():
            env.setenv(name, str(value))
        for target, value in case.get("patch", {}).items():
            env.setattr(target, value)
        if stage == "scripted-sample":
            recipe = load_recipe(recipe_path, overrides)
            sample.run(recipe, RUN, backend=ScriptedBackend(case["generations"]))
            code = _run_cli(["label", *common, *(f"--set={o}" for o in overrides)])
        else:
            code = _run_cli([stage, *common, *(f"--set={o}" for o in overrides), *argv])
    out, err = capsys.readouterr()

    expect = case["expect"]
    assert "Traceback" not in out + err + caplog.text
    if "error" in expect:
        assert code == expect.get("exit", 2), err
        error_lines = [line for line in err.splitlines() if "error:" in line]
        assert len(error_lines) == 1, err
        assert expect["error"] in error_lines[0], error_lines[0]
        assert _manifests(root) == manifests_before, "a failed stage committed a manifest"
    else:
        assert code == expect.get("exit", 0), err
        assert "error:" not in err
    for where, count in expect.get("counted", {}).items():
        manifest, *path = where.split("/")
        value: Any = _summary(root, manifest)
        for part in path:
            value = value.get(part, 0) if isinstance(value, dict) else value
        assert value == count, f"{where}: {value} != {count}"
    if "log" in expect:
        assert expect["log"] in caplog.text
    if setup:
        after = _snapshot(root)
        changed = [k for k in before if after.get(k) != before[k]]
        assert not changed, f"earlier outputs changed or lost: {changed}"
    counts[1] += 1
