"""The store: where every stage reads its inputs and writes its outputs.

Layout: ``<root>/runs/<run_id>/<stage>/...``. A unit of work (a whole stage, or one shard
or role of a mapped stage) is done when its manifest exists; the manifest is written
last, names the attempt that made it (its files are below ``<stage>/attempts/<attempt>/``)
and lists every file with its size and sha256. Files are written to a temporary name and
renamed into place, so no reader ever sees half a file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from malt_ops.errors import MaltError

_UMASK = os.umask(0)
os.umask(_UMASK)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def disk_full(exc: OSError, path: object) -> MaltError | None:
    """The one-line error for a full disk (or exhausted quota) while writing ``path``; else None."""
    if exc.errno not in _DISK_FULL:
        return None
    return MaltError(
        f"disk full: cannot write {path} ({exc.strerror or os.strerror(exc.errno)}): "
        "free space on that filesystem and rerun"
    )


@contextmanager
def reporting_disk_full(path: object) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into a MaltError naming it."""
    try:
        yield
    except OSError as exc:
        error = disk_full(exc, path)
        if error is None:
            raise
        raise error from None


class Store(ABC):
    """Byte-level access to a storage root. Keys are '/'-separated paths below the root."""

    root: str

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write atomically: readers see the old object, or none, or the whole new one."""

    @abstractmethod
    def create_bytes(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist yet, atomically; False if it existed."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys below ``prefix`` (recursively), sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def uri(self, key: str) -> str: ...

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_text(key))

    def write_json(self, key: str, value: Any) -> None:
        self.write_text(key, json.dumps(value, indent=2, sort_keys=True) + "\n")

    def put_dir(self, key: str, local_dir: Path) -> list[str]:
        written = []
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            self.write_bytes(f"{key}/{rel}", path.read_bytes())
            written.append(f"{key}/{rel}")
        return written

    def local_dir(self, key: str) -> Path:
        """A local directory with the files below ``key`` (downloaded to a scratch dir if remote)."""
        return self.get_dir(key, Path(tempfile.mkdtemp(prefix="malt-ops-")))

    def get_dir(self, key: str, local_dir: Path) -> Path:
        local_dir = Path(local_dir)
        for name in self.list(key):
            target = local_dir / name[len(key) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(name))
        return local_dir


class LocalStore(Store):
    def __init__(self, root: str) -> None:
        self.root = root
        self._base = Path(os.path.expanduser(root)).resolve()
        try:
            self._base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise disk_full(exc, self._base) or MaltError(
                f"storage.root '{root}' cannot be created: {exc.strerror}"
            ) from exc

    def _path(self, key: str) -> Path:
        path = (self._base / key).resolve()
        if self._base not in path.parents and path != self._base:
            raise MaltError(f"store key '{key}' escapes storage.root")
        return path

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise MaltError(
                f"{self.uri(key)} does not exist: run the stage that writes it first"
            ) from None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with reporting_disk_full(path):
            self._write(path, data)

    @staticmethod
    def _write(path: Path, data: bytes, replace: bool = True) -> bool:
        """A whole temporary file beside ``path``, then moved into place; with ``replace``
        False a link instead of a rename, which never replaces an existing file (False then)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; stored files follow the umask
            if replace:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def create_bytes(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        with reporting_disk_full(path):
            return self._write(path, data, replace=False)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self._base).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".partial")
        )

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def uri(self, key: str) -> str:
        return str(self._base / key)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def local_dir(self, key: str) -> Path:
        return self._path(key)


def open_store(root: str) -> Store:
    if root.startswith("s3://"):
        from malt_ops.s3 import S3Store

        return S3Store(root)
    return LocalStore(root)


def run_prefix(run_id: str, stage: str) -> str:
    return f"runs/{run_id}/{stage}"


def validate_run_id(run_id: str) -> str:
    """A run id names a directory (or S3 prefix) and appears in MLflow filters: keep it plain."""
    ascii_alnum = run_id[:1].isascii() and run_id[:1].isalnum()
    if (
        not ascii_alnum
        or len(run_id) > 200
        or ".." in run_id
        or not all(c.isascii() and (c.isalnum() or c in "-_.:+") for c in run_id)
    ):
        raise MaltError(
            f"run id '{run_id}': use letters, digits and - _ . : + only, starting with a "
            "letter or digit, at most 200 characters"
        )
    return run_id


def library_name(run_id: str, role: str) -> str:
    """A name for a run's ``role`` that PEFT, torch, vLLM and Kubernetes all accept.

    A run id may hold '.', ':' and '+' (Airflow's ``manual__2026-12-02T00:41:07.532118+00:00``,
    a recipe called ``qwen2.5``), which PEFT adapter names (torch module names) refuse; a hash
    of the run id keeps the name unique per run and free of them.
    """
    return f"r{hashlib.sha256(run_id.encode()).hexdigest()[:12]}-{role}"


def dumps_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(
        json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in rows
    ).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def iter_jsonl(store: Store, key: str) -> Iterator[dict[str, Any]]:
    return parse_jsonl(store.read_bytes(key), store.uri(key))


def parse_jsonl(data: bytes, where: str) -> Iterator[dict[str, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise MaltError(f"{where} line {line}: not UTF-8 text") from None
    # Only "\n" ends a row: model text may hold U+2028 or U+0085, which splitlines() would cut at.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise MaltError(f"{where} line {number}: not valid JSON ({exc.msg})") from None


ATTEMPTS = "attempts"
"""Each attempt of a unit writes below ``<stage>/attempts/<attempt id>/``; its manifest names it."""


def new_attempt_id(unit: str | None) -> str:
    """Unique per attempt (time, host process, random), readable in a listing."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{unit + '-' if unit else ''}{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class StageOutput:
    """One unit of a stage (the whole stage, or one shard/role): written by one attempt, or
    read through its committed manifest.

    ``unit`` names the manifest: ``<stage>/MANIFEST.json`` for a whole stage, or
    ``<stage>/MANIFEST-<unit>.json`` for one part of a mapped stage.

    Writing: every file goes below the attempt's own folder, ``<stage>/attempts/<id>/``, and
    :meth:`commit` writes the manifest last, naming that attempt and each file's sha256. Two
    attempts of one unit (a zombie task and its retry, the CLI and the DAG at once) never
    write the same key, so a manifest always describes files of exactly one attempt.

    Reading (an object that has not started writing): :meth:`key` resolves a file name
    through the committed manifest, and :meth:`read_bytes` and the readers built on it check
    the bytes against the manifest's sha256. The manifest is read once and kept, so all
    files read through one object come from one commit.
    """

    def __init__(self, store: Store, run_id: str, stage: str, unit: str | None = None) -> None:
        self.store = store
        self.prefix = run_prefix(validate_run_id(run_id), stage)
        self.stage = stage
        self.unit = unit
        self.files: dict[str, dict[str, Any]] = {}
        self.provenance: dict[str, Any] | None = None
        """What this attempt is made from (see malt_ops.provenance); recorded at commit."""
        self.replace = False
        """Commit over an existing manifest (a forced redo) instead of yielding to it."""
        self.attempt: str | None = None
        self._manifest: dict[str, Any] | None = None
        self._manifest_sha256: str | None = None
        self._started = time.time()

    @property
    def name(self) -> str:
        return f"{self.stage}[{self.unit}]" if self.unit else self.stage

    @property
    def manifest_key(self) -> str:
        name = "MANIFEST.json" if self.unit is None else f"MANIFEST-{self.unit}.json"
        return f"{self.prefix}/{name}"

    def done(self) -> bool:
        return self.store.exists(self.manifest_key)

    def _load(self) -> dict[str, Any]:
        if self._manifest is None:
            data = self.store.read_bytes(self.manifest_key)
            try:
                manifest = json.loads(data)
            except ValueError:
                raise MaltError(
                    f"{self.store.uri(self.manifest_key)} is not valid JSON: redo {self.stage} "
                    "with --force, or use a new --run-id"
                ) from None
            self._manifest, self._manifest_sha256 = manifest, hashlib.sha256(data).hexdigest()
        return self._manifest

    def manifest(self) -> dict[str, Any]:
        return self._load()

    def manifest_sha256(self) -> str:
        """sha256 of the committed manifest's bytes: what a later stage records as its input."""
        self._load()
        assert self._manifest_sha256 is not None
        return self._manifest_sha256

    def begin(self) -> str:
        """Start this object's attempt: from here on, :meth:`key` names its own files."""
        if self.attempt is None:
            self.attempt = new_attempt_id(self.unit)
        return self.attempt

    def _attempt_prefix(self, attempt: str | None) -> str:
        # A manifest without an attempt is from before attempt folders: its files sit
        # directly below the stage.
        return self.prefix if attempt is None else f"{self.prefix}/{ATTEMPTS}/{attempt}"

    def key(self, name: str) -> str:
        """The store key of file ``name``: this attempt's, once writing has begun; otherwise
        the committed one, through the manifest."""
        if self.attempt is not None:
            return f"{self._attempt_prefix(self.attempt)}/{name}"
        return f"{self._attempt_prefix(self._load().get('attempt'))}/{name}"

    def shared_key(self, name: str) -> str:
        """A key below the stage that every attempt sees (checkpoints, a pending decision):
        for state that is checked by its own markers, never listed in a manifest."""
        return f"{self.prefix}/{name}"

    def has(self, name: str) -> bool:
        """Whether the committed manifest lists file ``name``."""
        return name in self._load().get("files", {})

    def _entry(self, name: str) -> dict[str, Any]:
        entry = self._load().get("files", {}).get(name)
        if entry is None:
            raise MaltError(
                f"{self.store.uri(self.manifest_key)} lists no {name}: redo {self.stage} "
                "with --force, or use a new --run-id"
            )
        return entry

    def _verified(self, name: str, data: bytes) -> bytes:
        expected = self._entry(name).get("sha256")
        actual = hashlib.sha256(data).hexdigest()
        if expected != actual:
            raise MaltError(
                f"{self.store.uri(self.key(name))} has sha256 {actual[:12]}, but "
                f"{self.store.uri(self.manifest_key)} committed {str(expected)[:12]}: the file "
                f"changed after {self.name} committed; redo {self.stage} with --force, or use "
                "a new --run-id"
            )
        return data

    def read_bytes(self, name: str) -> bytes:
        """A committed file's bytes, checked against the manifest's sha256."""
        if self.attempt is not None:
            return self.store.read_bytes(self.key(name))
        self._entry(name)  # one line naming the manifest, before a missing-file error
        return self._verified(name, self.store.read_bytes(self.key(name)))

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def iter_jsonl(self, name: str) -> Iterator[dict[str, Any]]:
        return parse_jsonl(self.read_bytes(name), self.store.uri(self.key(name)))

    def local_dir(self, name: str) -> Path:
        """A local directory holding the committed files below ``name``, each checked."""
        names = [f for f in self._load().get("files", {}) if f.startswith(f"{name}/")]
        if not names:
            raise MaltError(
                f"{self.store.uri(self.manifest_key)} lists no files below {name}/: redo "
                f"{self.stage} with --force, or use a new --run-id"
            )
        if isinstance(self.store, LocalStore):
            for file in names:  # read in place: a local copy would hide a changed file
                self._verified(file, self.store.local_path(self.key(file)).read_bytes())
            return self.store.local_path(self.key(name))
        target = Path(tempfile.mkdtemp(prefix="malt-ops-"))
        for file in names:
            path = target / file[len(name) + 1 :]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.read_bytes(file))
        return target

    def write_bytes(self, name: str, data: bytes) -> str:
        self.begin()
        key = self.key(name)
        self.store.write_bytes(key, data)
        self.files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return key

    def write_jsonl(self, name: str, rows: Iterable[dict[str, Any]]) -> str:
        return self.write_bytes(name, dumps_jsonl(rows))

    def write_json(self, name: str, value: Any) -> str:
        text = json.dumps(value, indent=2, sort_keys=True, default=_json_default) + "\n"
        return self.write_bytes(name, text.encode())

    def put_dir(self, name: str, local_dir: Path, last: str | None = None) -> None:
        """Write a directory's files; ``last`` (a file name in it) goes after all the others,
        so a reader that takes that file's presence as "the directory is there" never sees
        the directory without its other files."""
        paths = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        for path in sorted(paths, key=lambda p: p.relative_to(local_dir).as_posix() == last):
            self.write_bytes(f"{name}/{path.relative_to(local_dir).as_posix()}", path.read_bytes())

    def commit(self, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the manifest, naming this attempt and its files: the unit is done.

        If another attempt committed the unit meanwhile, that commit stands (unless this is
        a forced redo): this attempt's files stay unreferenced, and this object reads the
        winner's from here on. Either way the manifest names the files of one attempt.
        """
        self.begin()
        provenance = dict(self.provenance or {})
        if provenance.get("inputs"):
            self._check_inputs_unchanged(provenance["inputs"])
        manifest = {
            "stage": self.stage,
            "unit": self.unit,
            "attempt": self.attempt,
            "files": self.files,
            "summary": summary or {},
            "provenance": provenance or None,
            "started_at": self._started,
            "finished_at": time.time(),
        }
        data = (
            json.dumps(manifest, indent=2, sort_keys=True, default=_json_default) + "\n"
        ).encode()
        if self.replace:
            self.store.write_bytes(self.manifest_key, data)
        elif not self.store.create_bytes(self.manifest_key, data):
            self._manifest = self._manifest_sha256 = None
            winner = self._load()
            logging.getLogger("malt_ops").warning(
                "%s: another attempt (%s) committed first; its outputs stand, this attempt's "
                "(%s) are left unreferenced",
                self.name,
                winner.get("attempt"),
                self.attempt,
            )
            self.attempt, self.files = None, dict(winner.get("files", {}))
            return winner
        self._manifest, self._manifest_sha256 = manifest, hashlib.sha256(data).hexdigest()
        return manifest

    def _check_inputs_unchanged(self, inputs: dict[str, str | None]) -> None:
        """The input manifests must be the ones recorded when this attempt began: one that was
        redone meanwhile may have been half read."""
        run = self.prefix.rsplit("/", 1)[0]
        for name, recorded in inputs.items():
            key = f"{run}/{name}"
            current = (
                hashlib.sha256(self.store.read_bytes(key)).hexdigest()
                if self.store.exists(key)
                else None
            )
            if current != recorded:
                raise MaltError(
                    f"{self.store.uri(key)} changed while {self.name} ran (an earlier stage "
                    f"was redone meanwhile): rerun {self.stage}"
                )
