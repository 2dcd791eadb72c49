"""The local store: atomic writes, manifests last, listing."""

import pytest

from malt_ops.errors import MaltError
from malt_ops.storage import LocalStore, StageOutput, iter_jsonl, validate_run_id


def test_stage_output_commits_manifest_last(tmp_path):
    store = LocalStore(str(tmp_path))
    out = StageOutput(store, "r1", "label")
    out.write_jsonl("datasets/x.jsonl", [{"a": 1}, {"a": 2}])
    assert not out.done()  # files alone do not make a stage done
    manifest = out.commit({"rows": 2})
    assert out.done()
    assert manifest["files"]["datasets/x.jsonl"]["bytes"] > 0
    assert [r["a"] for r in iter_jsonl(store, out.key("datasets/x.jsonl"))] == [1, 2]
    assert store.list("runs/r1/label") == [
        "runs/r1/label/MANIFEST.json",
        f"runs/r1/label/attempts/{manifest['attempt']}/datasets/x.jsonl",
    ]
    reader = StageOutput(store, "r1", "label")  # resolves the file through the manifest
    assert [r["a"] for r in reader.iter_jsonl("datasets/x.jsonl")] == [1, 2]
    shard = StageOutput(store, "r1", "sample", unit="shard-3")
    assert shard.manifest_key == "runs/r1/sample/MANIFEST-shard-3.json"


def test_write_leaves_no_partial_files(tmp_path):
    store = LocalStore(str(tmp_path))
    store.write_bytes("a/b.txt", b"hello")
    store.write_bytes("a/b.txt", b"world")
    assert store.read_bytes("a/b.txt") == b"world"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.txt"]


def test_keys_and_run_ids_cannot_escape(tmp_path):
    store = LocalStore(str(tmp_path / "root"))
    with pytest.raises(MaltError, match="escapes"):
        store.write_bytes("../outside.txt", b"x")
    for bad in ("../x", "a/b", "a b", "", "x;rm"):
        with pytest.raises(MaltError):
            validate_run_id(bad)
    assert validate_run_id("manual__2026-11-21T10:00:00+00:00")


def test_missing_key_says_which_stage(tmp_path):
    with pytest.raises(MaltError, match="does not exist"):
        LocalStore(str(tmp_path)).read_bytes("runs/x/prepare/problems/train.jsonl")
