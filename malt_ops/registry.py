"""The MLflow model registry: one registered model per role, aliases challenger and champion.

A "set" is the three role versions registered from one pipeline run (tag
``malt_ops.run_id``); sets move between aliases together or not at all.

Alias moves take the registry lock, a registered model ``<prefix>-registry-lock`` that
exists only while someone holds it. Creating a registered model is atomic on every MLflow
backend (the name is unique), so of several processes or pods racing for the lock exactly
one creates it; the others wait and retry. The holder records which aliases it is about to
move before moving them, so a holder that dies half-way leaves enough behind for the next
one to finish the move. A lock left by a dead process is broken at once by a waiter on
the same host (and pid namespace), which can see that the process is gone; elsewhere it
expires after ``LOCK_TTL_SECONDS`` by its holder's clock (hosts are assumed to keep their
clocks in sync, as NTP does).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from malt_ops.config import ROLES, Recipe
from malt_ops.errors import MaltError, redact
from malt_ops.tracking import client_for, tracking_uri

log = logging.getLogger("malt_ops")

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_TAG = "malt_ops.previous_champion"

LOCK_OWNER_TAG = "malt_ops.lock.owner"
LOCK_EXPIRES_TAG = "malt_ops.lock.expires_at"
LOCK_INTENT_TAG = "malt_ops.lock.intent"
LOCK_PROCESS_TAG = "malt_ops.lock.process"
"""host|pid namespace|pid of the holder: a waiter on the same host sees at once that it died."""
LOCK_TTL_SECONDS = float(os.environ.get("MALT_OPS_REGISTRY_LOCK_TTL", "300"))
"""A lock older than this is taken to belong to a dead process and is broken."""
LOCK_TIMEOUT_SECONDS = float(os.environ.get("MALT_OPS_REGISTRY_LOCK_TIMEOUT", "360"))
"""How long to wait for the lock before failing (longer than the TTL: outlasts a dead holder)."""


def model_name(recipe: Recipe, role: str) -> str:
    return f"{recipe.tracking.model_prefix}-{role}"


def lock_name(recipe: Recipe) -> str:
    return f"{recipe.tracking.model_prefix}-registry-lock"


def alias_versions(
    recipe: Recipe, alias: str, client=None, *, strict: bool = False
) -> dict[str, Any] | None:
    """role -> ModelVersion holding ``alias``; None unless all three roles have it.

    ``strict``: only a missing model or alias means None; any other registry error raises.
    """
    from mlflow.exceptions import MlflowException

    client = client or client_for(recipe)
    found = {}
    for role in ROLES:
        try:
            found[role] = client.get_model_version_by_alias(model_name(recipe, role), alias)
        except MlflowException as exc:
            missing = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
            if strict and _code(exc) not in missing:
                raise
            return None
    return found


def move_alias(recipe: Recipe, alias: str, versions: dict[str, str], client=None) -> None:
    """Point ``alias`` of each role at ``versions`` (no lock: callers hold the registry lock)."""
    client = client or client_for(recipe)
    for role in ROLES:
        client.set_registered_model_alias(model_name(recipe, role), alias, versions[role])


def _code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", "") or "")


def _this_process() -> str:
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""  # no /proc: only the TTL tells a dead holder
    return f"{socket.gethostname()}|{namespace}|{os.getpid()}"


def _dead_here(process: str | None) -> bool:
    """True only for a holder in this host's pid namespace whose process no longer exists."""
    parts = (process or "").split("|")
    if len(parts) != 3 or not parts[1] or not parts[2].isdigit():
        return False
    host, namespace, pid = parts
    if [host, namespace] != _this_process().split("|")[:2]:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by someone else
    return False


def _describe(versions: dict[str, str] | None) -> str:
    if not versions:
        return "no champion"
    return ", ".join(f"{role} v{versions[role]}" for role in ROLES)


class RegistryLock:
    """Mutual exclusion for alias moves across processes and machines sharing one registry."""

    def __init__(
        self,
        recipe: Recipe,
        client=None,
        *,
        timeout: float | None = None,
        ttl: float | None = None,
    ) -> None:
        self.recipe = recipe
        self.client = client or client_for(recipe)
        self.name = lock_name(recipe)
        self.timeout = LOCK_TIMEOUT_SECONDS if timeout is None else timeout
        self.ttl = LOCK_TTL_SECONDS if ttl is None else ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def _holder(self) -> dict[str, str] | None:
        """The lock's tags, or None when nobody holds it."""
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_registered_model(self.name).tags)
        except MlflowException as exc:
            if _code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _try_create(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.name,
                tags={
                    LOCK_OWNER_TAG: self.owner,
                    LOCK_EXPIRES_TAG: f"{time.time() + self.ttl:.3f}",
                    LOCK_PROCESS_TAG: _this_process(),
                },
                description="malt-ops registry lock: exists only while an alias move runs",
            )
            return True
        except MlflowException as exc:
            # DOES_NOT_EXIST: the holder released it between our insert and the server's lookup.
            if _code(exc) in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                return False
            raise

    def _break(self, stale: dict[str, str]) -> None:
        """Finish the dead holder's recorded alias moves, then delete its lock."""
        from mlflow.exceptions import MlflowException

        current = self._holder()
        if current is None or current.get(LOCK_OWNER_TAG) != stale.get(LOCK_OWNER_TAG):
            return  # released or broken by someone else meanwhile
        log.warning(
            "registry lock %s of %s %s; taking it over",
            self.name,
            stale.get(LOCK_OWNER_TAG, "an unknown holder"),
            "whose process is gone" if _dead_here(stale.get(LOCK_PROCESS_TAG)) else "expired",
        )
        intent = current.get(LOCK_INTENT_TAG)
        if intent:
            for alias, versions in json.loads(intent).items():
                log.warning("finishing its move of alias %s to %s", alias, _describe(versions))
                move_alias(self.recipe, alias, versions, self.client)
        try:
            self.client.delete_registered_model(self.name)
        except MlflowException as exc:
            if _code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise

    def acquire(self) -> None:
        started = time.monotonic()
        delay = 0.05
        while not self._try_create():
            holder = self._holder()
            expires = 0.0
            if holder is not None:
                with suppress(ValueError):  # an unreadable expiry counts as expired
                    expires = float(holder.get(LOCK_EXPIRES_TAG, "0"))
                if time.time() > expires or _dead_here(holder.get(LOCK_PROCESS_TAG)):
                    self._break(holder)
                    continue
            waited = time.monotonic() - started
            if waited + delay > self.timeout:
                who = (holder or {}).get(LOCK_OWNER_TAG, "other processes")
                raise MaltError(
                    f"registry lock '{self.name}' at {redact(tracking_uri(self.recipe))} is held by "
                    f"{who} for another {max(expires - time.time(), 0):.0f}s (waited "
                    f"{waited:.0f}s): retry later, or delete registered model '{self.name}' "
                    "if that process is gone"
                )
            if holder is not None:  # None: released just now, so try again at once
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)

    def record_intent(self, moves: dict[str, dict[str, str]]) -> None:
        """Write down the alias moves about to happen, for whoever breaks this lock if we die."""
        self.client.set_registered_model_tag(
            self.name, LOCK_INTENT_TAG, json.dumps(moves, sort_keys=True)
        )

    def move(self, alias: str, versions: dict[str, str]) -> None:
        self.record_intent({alias: versions})
        move_alias(self.recipe, alias, versions, self.client)

    def release(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            holder = self._holder()
            if holder is None or holder.get(LOCK_OWNER_TAG) != self.owner:
                log.warning(
                    "registry lock %s was taken over while held (held longer than %.0fs)",
                    self.name,
                    self.ttl,
                )
                return
            self.client.delete_registered_model(self.name)
        except MlflowException as exc:
            log.warning(
                "could not release registry lock %s (%s); it expires in %.0fs",
                self.name,
                redact(str(exc).splitlines()[0][:200]),
                self.ttl,
            )


@contextmanager
def registry_lock(
    recipe: Recipe, client=None, *, timeout: float | None = None, ttl: float | None = None
) -> Iterator[RegistryLock]:
    lock = RegistryLock(recipe, client, timeout=timeout, ttl=ttl)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def move_set(recipe: Recipe, alias: str, versions: dict[str, str], client=None) -> None:
    """Move ``alias`` of all three roles to one set, under the registry lock."""
    with registry_lock(recipe, client) as lock:
        lock.move(alias, {role: str(versions[role]) for role in ROLES})


def promote_set(
    recipe: Recipe, versions: dict[str, str], expected: dict[str, str] | None, client=None
) -> dict[str, str] | None:
    """Make ``versions`` the champion set, if the champion is still ``expected``.

    ``expected`` is the champion the challenger was compared with (None: there was none).
    If another promotion moved the champion in the meantime, the comparison no longer
    holds: nothing moves and the error says to rerun promote. The new versions record the
    set they replace (tag ``malt_ops.previous_champion``) for rollback. Returns that set.
    """
    client = client or client_for(recipe)
    versions = {role: str(versions[role]) for role in ROLES}
    expected = {role: str(expected[role]) for role in ROLES} if expected else None
    with registry_lock(recipe, client) as lock:
        current = alias_versions(recipe, CHAMPION, client, strict=True)
        now = {role: str(current[role].version) for role in ROLES} if current else None
        if now != expected:
            raise MaltError(
                f"the champion moved to {_describe(now)} while this run was compared with "
                f"{_describe(expected)}: rerun promote to compare with the new champion"
            )
        for role in ROLES:
            client.set_model_version_tag(
                model_name(recipe, role), versions[role], PREVIOUS_TAG, (now or {}).get(role, "")
            )
        lock.move(CHAMPION, versions)
    return now


def rollback_set(recipe: Recipe, client=None) -> dict[str, str]:
    """Move ``champion`` back to the set it replaced, under the registry lock."""
    client = client or client_for(recipe)
    with registry_lock(recipe, client) as lock:
        champion = alias_versions(recipe, CHAMPION, client, strict=True)
        if champion is None:
            raise MaltError("there is no champion set to roll back")
        previous = {r: champion[r].tags.get(PREVIOUS_TAG, "") for r in ROLES}
        if not all(previous.values()):
            raise MaltError("the champion set has no previous champion to roll back to")
        lock.move(CHAMPION, previous)
    return previous


def adapter_dir(source: str) -> Path:
    """A local directory with the adapter files a model version points at."""
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
        import tempfile

        from mlflow.artifacts import download_artifacts

        return Path(
            download_artifacts(
                artifact_uri=source, dst_path=tempfile.mkdtemp(prefix="malt-adapter-")
            )
        )
    if source.startswith("s3://"):
        from malt_ops.s3 import S3Store, split_uri

        bucket, key = split_uri(source)
        return S3Store(f"s3://{bucket}").local_dir(key)
    path = Path(source.removeprefix("file://"))
    if not (path / "adapter_config.json").exists():
        raise MaltError(f"registered adapter {source} is missing or not a PEFT directory")
    return path


def champion_adapters(recipe: Recipe) -> dict[str, str] | None:
    """role -> local adapter directory of the current champion set, or None when there is none."""
    if not recipe.tracking.enabled:
        return None
    versions = alias_versions(recipe, CHAMPION)
    if versions is None:
        return None
    return {role: str(adapter_dir(v.source)) for role, v in versions.items()}
