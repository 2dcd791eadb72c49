"""The MLflow model registry: a system model that is the source of truth, and role mirrors.

A "set" is the three role versions registered from one pipeline run (tag
``malt_ops.run_id``). Register also creates a version of ``<prefix>-system`` that records
those three role versions (tag ``malt_ops.roles``). The aliases that decide anything
(``challenger``, ``champion``) live on the system model: one alias write is atomic in
MLflow, so a set is never half moved, and every reader resolves the system alias once and
takes the role versions from the version it names. The role models' aliases are mirrors
for people browsing the registry; they are written after the system alias, repaired by
the next move if a write fails, and never read for a decision.

Alias moves are serialised by the registry lock, a registered model
``<prefix>-registry-lock`` that exists only while someone holds it. Creating a registered
model is atomic on every MLflow backend (the name is unique), so of several processes or
pods racing for the lock exactly one creates it. A lock left by a dead process is taken
over at once by a waiter on the same host (and pid namespace), which can see that the
process is gone; elsewhere it expires after ``LOCK_TTL_SECONDS`` by its holder's clock.
Taking over is itself a race that only one waiter may win: the waiter must first create
a takeover marker named after the stale holder (atomic, like the lock), so of two waiters
that saw the same expired lock only one deletes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from malt_ops.config import ROLES, Recipe
from malt_ops.errors import MaltError, RegistryUnavailable, redact
from malt_ops.tracking import client_for, tracking_uri

log = logging.getLogger("malt_ops")

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_TAG = "malt_ops.previous_champion"
ROLES_TAG = "malt_ops.roles"
"""On a system version: JSON role -> role model version it is made of."""

LOCK_OWNER_TAG = "malt_ops.lock.owner"
LOCK_EXPIRES_TAG = "malt_ops.lock.expires_at"
LOCK_PROCESS_TAG = "malt_ops.lock.process"
"""host|pid namespace|pid of the holder: a waiter on the same host sees at once that it died."""
LOCK_TTL_SECONDS = float(os.environ.get("MALT_OPS_REGISTRY_LOCK_TTL", "300"))
"""A lock older than this is taken to belong to a dead process and is broken."""
LOCK_TIMEOUT_SECONDS = float(os.environ.get("MALT_OPS_REGISTRY_LOCK_TIMEOUT", "360"))
"""How long to wait for the lock before failing (longer than the TTL: outlasts a dead holder)."""
MISSING_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
"""What a reachable registry answers for a model or alias that does not exist."""


def model_name(recipe: Recipe, role: str) -> str:
    return f"{recipe.tracking.model_prefix}-{role}"


def system_model_name(recipe: Recipe) -> str:
    """The registered model whose aliases are the source of truth for a set."""
    return model_name(recipe, "system")


def lock_name(recipe: Recipe) -> str:
    return f"{recipe.tracking.model_prefix}-registry-lock"


def _code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", "") or "")


def _unavailable(recipe: Recipe, exc: Exception) -> RegistryUnavailable:
    return RegistryUnavailable(
        f"the model registry at {tracking_uri(recipe)} did not answer "
        f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}): "
        "retry when it is back"
    )


@dataclass(frozen=True)
class SystemSet:
    """One system version and the three role versions it records."""

    version: str
    roles: dict[str, Any]
    """role -> role ModelVersion."""
    tags: dict[str, str]

    @property
    def role_versions(self) -> dict[str, str]:
        return {role: str(self.roles[role].version) for role in ROLES}

    def describe(self) -> str:
        return f"system v{self.version} (" + _describe(self.role_versions) + ")"


def _read_set(recipe: Recipe, client, system_version) -> SystemSet:
    record = json.loads(system_version.tags.get(ROLES_TAG) or "{}")
    if sorted(record) != sorted(ROLES):
        raise MaltError(
            f"{system_model_name(recipe)} v{system_version.version} records no role versions "
            f"(tag {ROLES_TAG}); register it again with this malt-ops"
        )
    roles = {
        role: client.get_model_version(model_name(recipe, role), str(record[role]))
        for role in ROLES
    }
    return SystemSet(str(system_version.version), roles, dict(system_version.tags))


def resolve_set(recipe: Recipe, alias: str, client=None) -> SystemSet | None:
    """The set ``alias`` names on the system model, read once; None only when a reachable
    registry says there is no such model or alias. Any other failure raises
    RegistryUnavailable: an outage must not read as "no champion"."""
    from mlflow.exceptions import MlflowException

    client = client or client_for(recipe)
    try:
        version = client.get_model_version_by_alias(system_model_name(recipe), alias)
        return _read_set(recipe, client, version)
    except MlflowException as exc:
        if _code(exc) in MISSING_CODES:
            return None
        raise _unavailable(recipe, exc) from None
    except MaltError:
        raise
    except Exception as exc:  # connection errors surface as requests/urllib3/OSError types
        raise _unavailable(recipe, exc) from None


def alias_versions(recipe: Recipe, alias: str, client=None) -> dict[str, Any] | None:
    """role -> ModelVersion of the set ``alias`` names (resolved through the system model)."""
    found = resolve_set(recipe, alias, client)
    return dict(found.roles) if found is not None else None


def sync_mirrors(recipe: Recipe, alias: str, client=None) -> None:
    """Point ``alias`` on each role model at the set the system alias names.

    Called after every system alias write and at the start of every move, so a mirror
    write that failed last time is finished by the retry or the next move.
    """
    client = client or client_for(recipe)
    current = resolve_set(recipe, alias, client)
    if current is None:
        return
    for role in ROLES:
        name = model_name(recipe, role)
        with suppress(Exception):  # reading a mirror is only to skip a redundant write
            if (
                str(client.get_model_version_by_alias(name, alias).version)
                == current.role_versions[role]
            ):
                continue
        client.set_registered_model_alias(name, alias, current.role_versions[role])


def _move_system_alias(recipe: Recipe, alias: str, version: str, client) -> None:
    """The one write that moves a set (atomic), then its mirrors."""
    client.set_registered_model_alias(system_model_name(recipe), alias, str(version))
    sync_mirrors(recipe, alias, client)


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

    def _create(self, name: str, tags: dict[str, str], description: str) -> bool:
        """Create registered model ``name``; False when it exists (someone else won)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, tags=tags, description=description)
            return True
        except MlflowException as exc:
            # DOES_NOT_EXIST: the holder released it between our insert and the server's lookup.
            if _code(exc) in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                return False
            raise

    def _delete(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model(name)
        except MlflowException as exc:
            if _code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise

    def _try_create(self) -> bool:
        return self._create(
            self.name,
            {
                LOCK_OWNER_TAG: self.owner,
                LOCK_EXPIRES_TAG: f"{time.time() + self.ttl:.3f}",
                LOCK_PROCESS_TAG: _this_process(),
            },
            "malt-ops registry lock: exists only while an alias move runs",
        )

    def takeover_name(self, stale_owner: str) -> str:
        """The marker a waiter must create before it may delete ``stale_owner``'s lock."""
        digest = hashlib.sha256(stale_owner.encode()).hexdigest()[:16]
        return f"{self.name}-takeover-{digest}"

    def _break(self, stale: dict[str, str]) -> None:
        """Delete a dead holder's lock, if this waiter wins the takeover.

        Check-then-delete alone lets a slow waiter delete the lock a fast one has just
        created; so a waiter first creates the takeover marker for this stale owner (atomic:
        one winner), checks that the stale lock is still there, deletes it, and only then
        removes the marker. A waiter that creates the marker after the winner removed it
        finds the lock no longer the stale one and leaves it alone. A marker left by a
        waiter that died is itself taken over after the TTL.
        """
        stale_owner = stale.get(LOCK_OWNER_TAG, "")
        marker = self.takeover_name(stale_owner)
        if not self._create(
            marker,
            {LOCK_OWNER_TAG: self.owner, LOCK_EXPIRES_TAG: f"{time.time() + self.ttl:.3f}"},
            "malt-ops registry lock takeover in progress",
        ):
            with suppress(Exception):
                expires = float(self.client.get_registered_model(marker).tags[LOCK_EXPIRES_TAG])
                if time.time() > expires:
                    self._delete(marker)
            return
        try:
            current = self._holder()
            if current is None or current.get(LOCK_OWNER_TAG) != stale_owner:
                return  # released, or already broken and taken by someone else
            log.warning(
                "registry lock %s of %s %s; taking it over",
                self.name,
                stale_owner or "an unknown holder",
                "whose process is gone" if _dead_here(stale.get(LOCK_PROCESS_TAG)) else "expired",
            )
            self._delete(self.name)
        finally:
            self._delete(marker)

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
        # Whatever an earlier holder left half-mirrored is finished before anything moves.
        for alias in (CHALLENGER, CHAMPION):
            sync_mirrors(recipe, alias, lock.client)
        yield lock
    finally:
        lock.release()


def register_system_version(
    recipe: Recipe,
    run_id: str,
    role_versions: dict[str, str],
    source: str,
    client=None,
    tags: dict[str, str] | None = None,
    source_run_id: str | None = None,
) -> str:
    """The ``<prefix>-system`` version recording ``role_versions`` (reused on a rerun).

    ``source_run_id``: the MLflow run holding a ``runs:/`` source (the server refuses such a
    source without it)."""
    from mlflow.exceptions import MlflowException

    client = client or client_for(recipe)
    name = system_model_name(recipe)
    try:
        client.create_registered_model(
            name, description="MALT system: generator, verifier and refiner versions, as one set"
        )
    except MlflowException as exc:
        if _code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise
    record = json.dumps({role: str(role_versions[role]) for role in ROLES}, sort_keys=True)
    found = client.search_model_versions(f"name = '{name}' and tags.`malt_ops.run_id` = '{run_id}'")
    for version in sorted(found, key=lambda v: int(v.version)):
        if version.tags.get(ROLES_TAG) == record:
            return str(version.version)
    version = client.create_model_version(
        name,
        source=source,
        run_id=source_run_id,
        tags={"malt_ops.run_id": run_id, ROLES_TAG: record, **(tags or {})},
        description=f"from pipeline run {run_id}: {_describe(json.loads(record))}",
    )
    return str(version.version)


def move_set(recipe: Recipe, alias: str, system_version: str, client=None) -> None:
    """Point ``alias`` at one system version (and its mirrors), under the registry lock."""
    with registry_lock(recipe, client) as lock:
        _move_system_alias(recipe, alias, system_version, lock.client)


def promote_set(
    recipe: Recipe, system_version: str, expected: str | None, client=None
) -> str | None:
    """Make ``system_version`` the champion, if the champion is still ``expected``.

    ``expected`` is the system version the challenger was compared with (None: there was
    none). If another promotion moved the champion in the meantime, the comparison no
    longer holds: nothing moves and the error says to rerun promote. A retry after this
    very move went through (a failed mirror write) only finishes the mirrors. The new
    version records the one it replaces (tag ``malt_ops.previous_champion``) for rollback.
    Returns the replaced system version.
    """
    client = client or client_for(recipe)
    system_version = str(system_version)
    with registry_lock(recipe, client) as lock:
        current = resolve_set(recipe, CHAMPION, lock.client)
        now = current.version if current else None
        if now == system_version:
            return current.tags.get(PREVIOUS_TAG) or None
        if now != (str(expected) if expected else None):
            raise MaltError(
                f"the champion moved to {current.describe() if current else 'no champion'} while "
                f"this run was compared with system v{expected or '-'}: rerun promote to compare "
                "with the new champion"
            )
        lock.client.set_model_version_tag(
            system_model_name(recipe), system_version, PREVIOUS_TAG, now or ""
        )
        _move_system_alias(recipe, CHAMPION, system_version, lock.client)
    return now


def rollback_set(recipe: Recipe, client=None) -> SystemSet:
    """Move ``champion`` back to the system version it replaced, under the registry lock."""
    client = client or client_for(recipe)
    with registry_lock(recipe, client) as lock:
        champion = resolve_set(recipe, CHAMPION, lock.client)
        if champion is None:
            raise MaltError("there is no champion set to roll back")
        previous = champion.tags.get(PREVIOUS_TAG, "")
        if not previous:
            raise MaltError(f"the champion {champion.describe()} has no previous champion")
        _move_system_alias(recipe, CHAMPION, previous, lock.client)
        return resolve_set(recipe, CHAMPION, lock.client)


def adapter_dir(source: str, required: str = "adapter_config.json") -> Path:
    """A local directory with the files a model version points at (an adapter, or the
    system pyfunc with ``required="MLmodel"``)."""
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
    if not (path / required).exists():
        raise MaltError(f"registered model files {source} are missing (no {required} there)")
    return path


def champion_adapters(recipe: Recipe, client=None) -> SystemSet | None:
    """The current champion set, or None when a reachable registry has none (tracking off:
    None). An unreachable registry raises RegistryUnavailable."""
    if not recipe.tracking.enabled:
        return None
    return resolve_set(recipe, CHAMPION, client)
