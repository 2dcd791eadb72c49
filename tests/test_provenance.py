"""Issue 22 items 6 and 7: a manifest says what it was made from, and one attempt made it.

A rerun under another recipe is refused in one line (or, with --force, redone together with
every stage after it); label checks that its shards cover each question once; two attempts
of one unit never mix their files; a file changed after its commit is refused by its reader.

Sampling runs in process with a seeded stand-in backend (no model; label loads the real
tokenizer of the tiny packaged model for its token budget).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import replace

import pytest

from malt_ops import cli
from malt_ops.config import load_recipe
from malt_ops.errors import MaltError
from malt_ops.orchestration import stage_arguments
from malt_ops.stages import label, prepare, sample
from malt_ops.stages.common import stage_output
from malt_ops.storage import StageOutput, open_store
from tests.test_resume import SeededBackend

pytestmark = pytest.mark.model

RUN = "prov"
BASE = {
    "data": {"train_size": 4, "test_size": 2},
    "sampling": {
        "n": 2,
        "m": 1,
        "l": 1,
        "num_shards": 1,
        "policy": "adapters",
        "max_new_tokens": {"generator": 16, "verifier": 16, "refiner": 16},
    },
    "tracking": {"enabled": False},
}


class SaltedBackend(SeededBackend):
    """Outputs of one attempt: the same prompts give other texts under another salt, so a
    file of one attempt can be told from the other's."""

    def __init__(self, salt: str) -> None:
        super().__init__()
        self.salt = salt

    def generate(self, prompts, params, adapter=None, desc="generate"):
        rows = super().generate(prompts, params, adapter, desc)
        for row in rows:
            for i, completion in enumerate(row):
                row[i] = replace(completion, text=f"{self.salt}: {completion.text}")
        return rows


def _recipe(recipe_file, *overrides: str):
    return load_recipe(recipe_file(**BASE), list(overrides))


def _attempt(recipe, stage: str, unit: str | None = None) -> str | None:
    """The attempt the unit's committed manifest names (None: not committed)."""
    out = stage_output(recipe, RUN, stage, unit)
    return out.manifest().get("attempt", out.manifest()["finished_at"]) if out.done() else None


def _pipeline(recipe) -> dict[str, str | None]:
    """prepare, every sample shard, label; the attempt each unit's manifest names after."""
    prepare.run(recipe, RUN)
    shards = [f"shard-{k}" for k in range(recipe.sampling.num_shards)]
    for k in range(recipe.sampling.num_shards):
        sample.run(recipe, RUN, shard=k, backend=SeededBackend())
    label.run(recipe, RUN)
    units = [("prepare", None), *(("sample", s) for s in shards), ("label", None)]
    return {f"{stage}{unit or ''}": _attempt(recipe, stage, unit) for stage, unit in units}


@pytest.mark.parametrize(
    ("override", "refused_by", "redone"),
    [
        ("sampling.n=3", "sample", {"sampleshard-0", "label"}),
        ("sampling.num_shards=2", "sample", {"sampleshard-0", "sampleshard-1", "label"}),
        ("labeling.threshold=0.3", "label", {"label"}),
        ("model.dtype=bfloat16", "sample", {"sampleshard-0", "label"}),
        ("sampling.role_temperatures.refiner=1.0", "sample", {"sampleshard-0", "label"}),
    ],
)
def test_changed_recipe_is_refused_and_force_redoes_the_stage_and_after(
    recipe_file, override, refused_by, redone
):
    before = _pipeline(_recipe(recipe_file))
    changed = _recipe(recipe_file, override)
    key, value = override.split("=")
    with pytest.raises(MaltError) as refused:
        _pipeline(changed)
    line = str(refused.value)
    assert "\n" not in line
    assert f"{key}: " in line and (f"-> {value}" in line or f'-> "{value}"' in line), line
    assert line.startswith(f"{refused_by}"), line
    assert "--run-id" in line and f"--force to redo {refused_by}" in line, line

    with cli.forcing():
        after = _pipeline(changed)
    assert {unit for unit in after if after[unit] != before.get(unit)} == redone
    trees = sum(
        stage_output(changed, RUN, "sample", f"shard-{k}").manifest()["summary"]["questions"]
        for k in range(changed.sampling.num_shards)
    )
    stats = stage_output(changed, RUN, "label").manifest()["summary"]
    assert trees == stats["questions"] == 4
    assert stats["threshold"] == changed.labeling.threshold
    assert _pipeline(changed) == after  # and now it is done: a rerun skips every unit


def test_cli_force_redoes_prepare_and_the_stages_after_follow(recipe_file, capsys):
    path = recipe_file(**BASE)
    args = ["--recipe", str(path), "--run-id", RUN]
    recipe = load_recipe(path)
    assert cli.main(["prepare", *args]) == 0
    sample.run(recipe, RUN, backend=SeededBackend())
    first = _attempt(recipe, "sample", "shard-0")
    capsys.readouterr()
    assert cli.main(["prepare", *args, "--set", "data.train_size=3"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "data.train_size: 4 -> 3" in errors[0], errors
    assert "--force to redo prepare and every stage after it" in errors[0]
    assert cli.main(["prepare", *args, "--set", "data.train_size=3", "--force"]) == 0
    smaller = load_recipe(path, ["data.train_size=3"])
    assert sample.run(smaller, RUN, backend=SeededBackend())["questions"] == 3  # input redone
    assert _attempt(recipe, "sample", "shard-0") != first
    # `malt-ops run --force` reaches every stage through the plan's argument lists.
    context = {"params": {"recipe": str(path), "run_id": RUN, "force": True}}
    assert "--force" in stage_arguments("label", context)


def _sampled_shards(recipe_file):
    recipe = _recipe(recipe_file, "sampling.num_shards=2")
    prepare.run(recipe, RUN)
    for k in (0, 1):
        sample.run(recipe, RUN, shard=k, num_shards=2, backend=SeededBackend())
    return recipe


def _recommit_shard(recipe, shard: int, trees: bytes, summary: dict) -> None:
    """Shard ``shard`` committed again by hand with these trees (what a mix-up leaves)."""
    out = stage_output(recipe, RUN, "sample", f"shard-{shard}")
    summary = {**out.manifest()["summary"], **summary}
    redo = StageOutput(out.store, RUN, "sample", f"shard-{shard}")
    redo.replace = True  # over the committed shard, as a redo does
    redo.write_bytes(f"trees/shard-{shard}.jsonl", trees)
    redo.commit(summary)


def _trees(recipe, shard: int) -> bytes:
    out = stage_output(recipe, RUN, "sample", f"shard-{shard}")
    return out.store.read_bytes(out.key(f"trees/shard-{shard}.jsonl"))


@pytest.mark.parametrize("case", ["question twice", "question missing", "other split"])
def test_label_refuses_shards_that_do_not_cover_each_question_once(recipe_file, case):
    recipe = _sampled_shards(recipe_file)
    if case == "question twice":  # shard 1 holds shard 0's trees as well as its own
        _recommit_shard(recipe, 1, _trees(recipe, 0) + _trees(recipe, 1), {})
        expected = "is in sample shards 0 and 1"
    elif case == "question missing":
        first = _trees(recipe, 1).split(b"\n")[0] + b"\n"
        _recommit_shard(recipe, 1, first, {"questions": 1})
        expected = "1 of 4 training questions"
    else:  # shard 1 of a four-way split stands in for shard 1 of two
        _recommit_shard(recipe, 1, _trees(recipe, 1), {"num_shards": 4})
        expected = "was sampled as shard 1 of 4, not of 2"
    with pytest.raises(MaltError, match=expected) as refused:
        label.run(recipe, RUN)
    assert "\n" not in str(refused.value)
    assert not stage_output(recipe, RUN, "label").done()


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    s3 = request.getfixturevalue("s3_env")
    return f"s3://{s3['bucket']}/prov-{uuid.uuid4().hex[:12]}"


def _committed_files(reader: StageOutput) -> dict[str, bytes]:
    """Every file the unit's manifest lists, each checked against its recorded sha256."""
    files = {}
    for name, meta in reader.manifest()["files"].items():
        data = reader.store.read_bytes(reader.key(name))
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], f"{name} is not as committed"
        files[name] = data
    return files


def test_two_attempts_at_once_commit_one_attempts_files(store_root):
    """A zombie (A) and its retry (B) of one unit: A writes, B writes and commits, A commits."""
    store = open_store(store_root)
    zombie, retry = StageOutput(store, RUN, "evaluate"), StageOutput(store, RUN, "evaluate")
    zombie.write_json("report.json", {"attempt": "A"})
    retry.write_json("report.json", {"attempt": "B"})
    retry.write_json("table.json", {"attempt": "B"})
    retry.commit({"attempt": "B"})
    zombie.write_json("table.json", {"attempt": "A"})
    zombie.commit({"attempt": "A"})
    manifest = store.read_json(f"runs/{RUN}/evaluate/MANIFEST.json")
    files = _committed_files(StageOutput(store, RUN, "evaluate"))
    assert {json.loads(data)["attempt"] for data in files.values()} == {
        manifest["summary"]["attempt"]
    }
    assert sorted(files) == ["report.json", "table.json"]


def test_two_sample_attempts_interleaved_leave_one_attempts_trees(recipe_file, monkeypatch):
    """A real sample shard: the retry runs whole while the zombie waits to commit."""
    recipe = _recipe(recipe_file)
    prepare.run(recipe, RUN)
    commit = StageOutput.commit

    def retry_first(self, summary=None):
        monkeypatch.setattr(StageOutput, "commit", commit)
        # The retry starts without the zombie's checkpoints (it samples afresh) and commits
        # while the zombie still holds its trees, not yet committed.
        self.store.delete_prefix(self.prefix + "/parts")
        sample.run(recipe, RUN, backend=SaltedBackend("retry"))
        return commit(self, summary)

    monkeypatch.setattr(StageOutput, "commit", retry_first)
    sample.run(recipe, RUN, backend=SaltedBackend("zombie"))
    files = _committed_files(stage_output(recipe, RUN, "sample", "shard-0"))
    texts = {
        node["text"].split(":")[0]
        for name in ("trees/shard-0.jsonl", "star/shard-0.jsonl")
        for line in files[name].splitlines()
        for node in json.loads(line)["nodes"]
    }
    assert texts == {"retry"}  # the first commit stands, whole
    assert label.run(recipe, RUN)["questions"] == 4


def test_a_file_changed_after_commit_is_refused_by_its_reader(store_root, recipe_file):
    recipe = load_recipe(recipe_file(**BASE), [f"storage.root={store_root}"])
    prepare.run(recipe, RUN)
    prepared = stage_output(recipe, RUN, "prepare")
    key = prepared.key("problems/train.jsonl")
    rows = prepared.store.read_bytes(key).split(b"\n")
    prepared.store.write_bytes(key, b"\n".join(rows[1:]))  # one question dropped
    with pytest.raises(MaltError) as refused:
        sample.run(recipe, RUN, backend=SeededBackend())
    line = str(refused.value)
    assert "\n" not in line and prepared.store.uri(key) in line, line
    assert "changed after prepare committed" in line and "--force" in line, line
    assert not stage_output(recipe, RUN, "sample", "shard-0").done()


def test_a_key_added_later_with_a_null_default_leaves_older_outputs_current(recipe_file):
    """A manifest committed before ``sampling.role_temperatures`` existed (its record lacks
    the key) was made with what the key's null default means: the rerun skips it."""
    recipe = _recipe(recipe_file)
    before = _pipeline(recipe)
    # label's record holds the sampling keys too (upstream), and nothing reads label's digest
    out = stage_output(recipe, RUN, "label")
    manifest = out.manifest()
    recorded = manifest["provenance"]["recipe"]
    added = [k for k in recorded if k.startswith("sampling.role_temperatures.")]
    assert added and all(recorded[k] is None for k in added)
    for key in added:
        del recorded[key]
    out.store.write_json(out.manifest_key, manifest)
    assert _pipeline(recipe) == before
    with pytest.raises(MaltError, match=r"sampling\.role_temperatures\.refiner"):
        label.run(_recipe(recipe_file, "sampling.role_temperatures.refiner=1.0"), RUN)


def test_a_role_temperature_is_what_that_role_samples_at():
    from malt_ops.chains import expand_trees
    from malt_ops.config import SamplingConfig

    seen: dict[str, float] = {}

    class Recording(SeededBackend):
        def generate(self, prompts, params, adapter=None, desc="generate"):
            seen[desc] = params.temperature
            return super().generate(prompts, params, adapter, desc)

    sampling = SamplingConfig(n=1, m=1, l=1, temperature=0.4, role_temperatures={"refiner": 1.1})
    problem = {"id": "q1", "question": "1+1?", "answer": "2", "benchmark": "gsm8k"}
    adapters = {"generator": None, "verifier": None, "refiner": None}
    expand_trees([problem], Recording(), sampling, adapters, [("sample", 0)])
    assert seen == {"generator": 0.4, "verifier": 0.4, "refiner": 1.1}
