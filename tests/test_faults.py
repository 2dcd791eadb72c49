"""Faults: concurrent promotions on a real MLflow server, a full disk, S3 killed under a stage.

Two more faults of RELIABILITY.md have their tests beside the code they exercise:
tests/test_s3.py::test_upload_survives_a_server_restart and
tests/test_tracking.py::test_mlflow_down_does_not_lose_the_stage.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from mlflow.exceptions import MlflowException

from malt_ops import cli
from malt_ops.config import load_recipe
from malt_ops.errors import MaltError
from malt_ops.registry import (
    CHALLENGER,
    CHAMPION,
    LOCK_EXPIRES_TAG,
    LOCK_OWNER_TAG,
    LOCK_PROCESS_TAG,
    lock_name,
    model_name,
    move_set,
    promote_set,
    registry_lock,
    resolve_set,
    rollback_set,
)
from tests.conftest import (
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    _free_port,
    _register,
    _set_of,
    commit_prepared,
    start_weed,
    stop,
)
from tests.conftest import (
    committed as committed_path,
)

ROUNDS = 5
"""Rounds of the promotion race; each has two threads (or processes) promoting two sets."""


# ------------------------------------------------------------------ registry alias race


def _warm_up(_: int) -> None:
    """Import what a promotion needs before the race starts."""
    import mlflow.tracking  # noqa: F401

    time.sleep(0.5)  # keep this worker busy so that the other one starts too


def _contend(job: tuple[str, str, str, str | None, float]) -> str:
    """One promotion, in its own process: challenger moves, then the champion (if still expected)."""
    url, recipe_path, versions, expected, start_at = job
    os.environ["MLFLOW_TRACKING_URI"] = url
    recipe = load_recipe(recipe_path)
    time.sleep(max(0.0, start_at - time.time()))
    move_set(recipe, CHALLENGER, versions)
    try:
        promote_set(recipe, versions, expected)
    except MaltError as exc:
        return f"refused: {exc}"
    return "promoted"


@pytest.mark.parametrize(
    "workers",
    [
        # Both in `make test-slow` (about a minute each): the system alias makes one move a
        # single write, and tests/test_registry_faults.py checks half-finished moves quickly.
        pytest.param("threads", marks=pytest.mark.slow),
        # The same race between two processes (each imports MLflow first: slower).
        pytest.param("processes", marks=pytest.mark.slow),
    ],
)
def test_concurrent_promotions_end_with_one_consistent_champion(registry, workers):
    recipe, client = registry["recipe"], registry["client"]
    history: list[tuple[str, str]] = []
    if workers == "threads":  # each promotion has its own MlflowClient and lock owner
        pool = ThreadPoolExecutor(max_workers=2)
    else:
        pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
        list(pool.map(_warm_up, range(2)))
    with pool:
        for round_ in range(ROUNDS):
            sets = {run: _register(registry, run) for run in (f"r{round_}a", f"r{round_}b")}
            expected = history[-1][1] if history else None
            start_at = time.time() + 0.3  # both start together
            jobs = [
                (registry["url"], registry["path"], v, expected, start_at) for v in sets.values()
            ]
            outcomes = dict(zip(sets, pool.map(_contend, jobs), strict=True))

            winner, champion, previous = _set_of(registry, CHAMPION)
            assert winner in sets and champion == sets[winner]
            assert outcomes[winner] == "promoted", outcomes
            loser = next(run for run in sets if run != winner)
            # Both compared with the same champion; once one moved it, the other's test is void.
            assert outcomes[loser].startswith("refused: the champion moved to "), outcomes
            assert previous == (expected or ""), "rollback metadata"
            challenger_run, challenger, _ = _set_of(registry, CHALLENGER)
            assert challenger == sets[challenger_run]
            history.append((winner, champion))

    with pytest.raises(MlflowException):  # every holder released the lock
        client.get_registered_model(lock_name(recipe))
    assert rollback_set(recipe, client).version == history[-2][1]
    assert _set_of(registry, CHAMPION)[:2] == history[-2]


def test_a_dead_holders_lock_expires_and_its_mirrors_are_finished(registry):
    recipe, client = registry["recipe"], registry["client"]
    first, second = _register(registry, "old"), _register(registry, "new")
    promote_set(recipe, first, None, client)
    # A promotion that died half-way: the lock is still there, the system alias moved and
    # one mirror too; the other mirrors still name the old set.
    client.create_registered_model(
        lock_name(recipe),
        tags={LOCK_OWNER_TAG: "gone-host:1:dead", LOCK_EXPIRES_TAG: str(time.time() - 1)},
    )
    client.set_registered_model_alias(f"{recipe.tracking.model_prefix}-system", CHAMPION, second)
    new_set = resolve_set(recipe, CHAMPION, client)
    client.set_registered_model_alias(
        model_name(recipe, "generator"), CHAMPION, new_set.role_versions["generator"]
    )
    started = time.monotonic()
    move_set(recipe, CHALLENGER, second, client)
    assert time.monotonic() - started < 10
    assert _set_of(registry, CHAMPION)[:2] == ("new", second)  # the mirrors, finished
    assert _set_of(registry, CHALLENGER)[:2] == ("new", second)
    with pytest.raises(MlflowException):
        client.get_registered_model(lock_name(recipe))


def test_a_lock_whose_process_died_on_this_host_is_taken_over_at_once(registry):
    """A killed local run need not wait for the TTL: its pid is visibly gone."""
    import sys

    from malt_ops.registry import _this_process

    recipe, client = registry["recipe"], registry["client"]
    versions = _register(registry, "after-kill")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    host, namespace, _ = _this_process().split("|")
    client.create_registered_model(
        lock_name(recipe),
        tags={
            LOCK_OWNER_TAG: "killed-run",
            LOCK_EXPIRES_TAG: str(time.time() + 600),
            LOCK_PROCESS_TAG: f"{host}|{namespace}|{gone.stdout.strip()}",
        },
    )
    started = time.monotonic()
    move_set(recipe, CHALLENGER, versions, client)
    assert time.monotonic() - started < 10
    assert _set_of(registry, CHALLENGER)[:2] == ("after-kill", versions)


def test_a_held_lock_times_out_with_one_line(registry, monkeypatch):
    import malt_ops.registry
    from malt_ops.registry import _this_process

    recipe, client = registry["recipe"], registry["client"]
    client.create_registered_model(
        lock_name(recipe),
        tags={
            LOCK_OWNER_TAG: "busy-host:2:alive",
            LOCK_EXPIRES_TAG: str(time.time() + 600),
            LOCK_PROCESS_TAG: _this_process(),  # this very process: alive
        },
    )
    with pytest.raises(MaltError) as info, registry_lock(recipe, client, timeout=1):
        pytest.fail("took a lock that another process holds")
    message = str(info.value)
    assert "\n" not in message
    assert lock_name(recipe) in message and "busy-host:2:alive" in message
    assert (
        client.get_registered_model(lock_name(recipe)).tags[LOCK_OWNER_TAG] == "busy-host:2:alive"
    )
    monkeypatch.setattr(malt_ops.registry, "LOCK_TIMEOUT_SECONDS", 1)
    with pytest.raises(MaltError, match="held by busy-host"):
        rollback_set(recipe, client)  # rollback waits for the same lock
    client.delete_registered_model(lock_name(recipe))


# ------------------------------------------------------------------ disk full


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: a real filesystem that fills up (skipped where mounting is not allowed)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the disk-full test needs to mount a small tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0777", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {reason}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def _fill(disk: Path) -> Path:
    """Write until the filesystem refuses: no byte left."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                while chunk:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    return filler


def _committed(run: Path) -> dict[str, str]:
    """'<stage>/<file>' -> sha256 of every file the run's manifests commit (each attempt
    writes its own folder, so the paths below it differ from run to run)."""
    files = {}
    for manifest in sorted(run.glob("*/MANIFEST*.json")):
        committed = json.loads(manifest.read_text())
        files[manifest.relative_to(run).as_posix()] = "manifest"
        for name in committed["files"]:
            path = committed_path(run, manifest.parent.name, name, committed["unit"])
            files[f"{manifest.parent.name}/{name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _files(root: Path) -> dict[str, str]:
    """Every file below root, hidden and partial ones included, with its sha256."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _recipe(tmp_path: Path, store: Path | str) -> Path:
    data = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "local.yaml").read_text())
    data["storage"] = {"root": str(store)}
    data["run"] = {"state_dir": str(tmp_path / "state")}
    data["tracking"]["enabled"] = False
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_full_store_disk_fails_cleanly_and_the_rerun_completes(tiny_disk, tmp_path, capsys):
    store = tiny_disk / "store"
    recipe = ["--recipe", str(_recipe(tmp_path, store))]
    assert cli.main(["prepare", *recipe, "--run-id", "earlier"]) == 0
    earlier = _committed(store / "runs" / "earlier")
    assert "prepare/MANIFEST.json" in earlier
    filler = _fill(tiny_disk)
    capsys.readouterr()

    assert cli.main(["prepare", *recipe, "--run-id", "full"]) == 2
    line = _one_error_line(capsys)
    assert "disk full" in line and "No space left on device" in line
    assert str(store / "runs" / "full" / "prepare") in line
    assert _files(store / "runs" / "full") == {}  # no partial file, no manifest
    assert _committed(store / "runs" / "earlier") == earlier

    filler.unlink()
    assert cli.main(["prepare", *recipe, "--run-id", "full"]) == 0
    rerun = _committed(store / "runs" / "full")
    assert set(rerun) == set(earlier) and "prepare/MANIFEST.json" in rerun
    assert rerun["prepare/problems/train.jsonl"] == earlier["prepare/problems/train.jsonl"]


def test_full_scratch_disk_fails_cleanly_and_the_rerun_completes(
    tiny_disk, tmp_path, capsys, monkeypatch
):
    """label stages its plot in the temporary directory; the store itself has room."""
    import tempfile

    from malt_ops.stages.common import stage_output

    store = tmp_path / "store"
    path = _recipe(tmp_path, store)
    recipe = ["--recipe", str(path), "--run-id", "run"]
    assert cli.main(["prepare", *recipe]) == 0
    sampled = stage_output(load_recipe(path), "run", "sample", unit="shard-0")
    trees = Path(__file__).parent / "bad_inputs" / "files" / "trees" / "good.jsonl"
    commit_prepared(load_recipe(path), "run", [json.loads(trees.read_text())["problem"]])
    sampled.write_bytes("trees/shard-0.jsonl", trees.read_bytes())
    sampled.commit({"shard": 0, "num_shards": 1})
    earlier = _files(store)
    scratch = tiny_disk / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    filler = _fill(tiny_disk)
    capsys.readouterr()

    assert cli.main(["label", *recipe]) == 2
    line = _one_error_line(capsys)
    assert "disk full" in line and str(scratch) in line and "values.png" in line
    assert not (store / "runs" / "run" / "label" / "MANIFEST.json").exists()
    assert not [p for p in store.rglob("*.partial")]
    assert {k: v for k, v in _files(store).items() if k in earlier} == earlier
    assert list(scratch.iterdir()) == []  # the temporary directory was cleaned up

    filler.unlink()
    assert cli.main(["label", *recipe]) == 0
    assert (store / "runs" / "run" / "label" / "MANIFEST.json").exists()
    assert committed_path(store / "runs" / "run", "label", "plots/values.png").stat().st_size


# ------------------------------------------------------------------ S3 killed under a stage


def test_stage_finishes_across_an_s3_server_kill_and_restart(tmp_path, monkeypatch):
    """SIGKILL the S3 server, start a stage, bring the server back: the stage commits in full.

    tests/test_s3.py::test_upload_survives_a_server_restart covers one upload; this is the
    stage's view: every output and the manifest arrive, earlier outputs stay as they were.
    """
    import threading

    from malt_ops.stages import prepare
    from malt_ops.stages.common import stage_output

    root = tmp_path / "s3"
    root.mkdir()
    port = _free_port()
    server, _ = start_weed(root, port, bucket="faults")
    monkeypatch.setenv("MALT_OPS_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    recipe = load_recipe(_recipe(tmp_path, "s3://faults/store"))
    try:
        prepare.run(recipe, "before")
        earlier = stage_output(recipe, "before", "prepare")
        before = {k: earlier.store.read_bytes(k) for k in earlier.store.list("runs/before")}
        server.kill()
        server.wait(timeout=20)
        result: dict = {}

        def stage() -> None:
            try:
                result["summary"] = prepare.run(recipe, "during")
            except Exception as exc:  # surfaced by the assertion below
                result["error"] = exc

        worker = threading.Thread(target=stage)
        worker.start()
        time.sleep(2)
        assert worker.is_alive(), f"the stage gave up while S3 was down: {result}"
        server, _ = start_weed(root, port, bucket=None)
        worker.join(timeout=150)
        assert "summary" in result, result
        out = stage_output(recipe, "during", "prepare")
        manifest = out.manifest()
        assert set(manifest["files"]) == {
            "problems/train.jsonl",
            "problems/test.jsonl",
            "stats.json",
        }
        for name, meta in manifest["files"].items():
            data = out.store.read_bytes(out.key(name))
            assert hashlib.sha256(data).hexdigest() == meta["sha256"], name
        assert {k: earlier.store.read_bytes(k) for k in before} == before
    finally:
        stop(server)
