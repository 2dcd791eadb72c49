"""S3 (or any S3-compatible server) behind the Store interface.

Endpoint, region and credentials come from the environment, never from the recipe:
``MALT_OPS_S3_ENDPOINT_URL`` (or boto3's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``),
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and boto3's usual credential chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, profiles, instance roles); or, with
``MALT_OPS_AWS_CONN_ID``, all three from that Airflow connection.
An object appears whole or not at all, so writes need no temporary names; large objects
go up in parts, and transient errors are retried with backoff by botocore.
"""

from __future__ import annotations

import io
import logging
import os
import random
import time
from functools import cached_property
from pathlib import Path

from malt_ops.errors import MaltError
from malt_ops.storage import Store

log = logging.getLogger("malt_ops")

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024
# Transient failures (connection refused or reset, timeouts, 5xx, throttling) are retried
# for up to RETRY_SECONDS, backing off exponentially from BASE_BACKOFF to MAX_BACKOFF.
RETRY_SECONDS = float(os.environ.get("MALT_OPS_S3_RETRY_SECONDS", "120"))
BASE_BACKOFF = 0.5
MAX_BACKOFF = 15.0
_TRANSIENT_CODES = {
    "500",
    "502",
    "503",
    "504",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
}


def _transient(exc: Exception) -> bool:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(
        exc,
        EndpointConnectionError | ConnectionClosedError | ConnectTimeoutError | ReadTimeoutError,
    ):
        return True
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) in _TRANSIENT_CODES
    return "S3UploadFailedError" in type(exc).__name__ and "connect" in str(exc).lower()


def split_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    if not uri.startswith("s3://"):
        raise MaltError(f"'{uri}' is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise MaltError(f"'{uri}' names no bucket: use s3://bucket/prefix")
    return bucket, key.strip("/")


def s3_client():
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 8, "mode": "adaptive"},
        connect_timeout=10,
        read_timeout=120,
        s3={"addressing_style": "path"},
    )
    conn_id = os.environ.get("MALT_OPS_AWS_CONN_ID")
    if conn_id:
        # Endpoint, region and credentials from an Airflow connection (e.g. AIRFLOW_CONN_<ID> or a
        # secrets backend), as Airflow users keep them.
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=conn_id, config=config).get_conn()
    endpoint = os.environ.get("MALT_OPS_S3_ENDPOINT_URL") or None
    # A fresh session per client: boto3's default session caches credentials for the process.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _explain(exc: Exception, bucket: str, key: str) -> MaltError:
    """Turn a botocore error into one line that says what to fix (never the credentials)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(exc, NoCredentialsError):
        return MaltError(
            f"{where}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(exc, EndpointConnectionError):
        return MaltError(f"{where}: cannot reach the S3 endpoint: check MALT_OPS_S3_ENDPOINT_URL")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return MaltError(f"bucket '{bucket}' does not exist: create it or fix the s3:// path")
        if code in ("NoSuchKey", "404", "NotFound"):
            return MaltError(f"{where} does not exist: run the stage that writes it first")
        if code in (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "403",
            "Forbidden",
        ):
            return MaltError(
                f"{where}: access denied ({code}): check the S3 credentials in the environment"
            )
        return MaltError(f"{where}: S3 error {code or type(exc).__name__}")
    # One line, but all of it: botocore puts the useful part on later lines
    # ("Parameter validation failed:\nInvalid bucket name ...").
    return MaltError(f"{where}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")


class S3Store(Store):
    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.bucket, self.prefix = split_uri(self.root)
        self._bucket_checked = False

    @cached_property
    def client(self):
        return s3_client()

    def _key(self, key: str) -> str:
        if ".." in key.split("/"):
            raise MaltError(f"store key '{key}' escapes storage.root")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _head_bucket(self) -> None:
        """Fail in one line when the bucket does not exist, before anything is written.

        Without this, a server that creates buckets on first write (SeaweedFS does) would
        quietly start a new bucket from a typo. A 403 is let through: a policy may grant
        objects under a prefix but not the bucket itself.
        """
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise MaltError(
                    f"bucket '{self.bucket}' does not exist: create it or fix the s3:// path"
                ) from None
            if code not in ("403", "AccessDenied", "Forbidden"):
                raise

    def _call(self, key: str, fn, *args, **kwargs):
        """Run one S3 operation, retrying transient failures with exponential backoff."""
        if not self._bucket_checked:
            self._bucket_checked = True
            self._retrying(key, self._head_bucket)
        return self._retrying(key, fn, *args, **kwargs)

    def _retrying(self, key: str, fn, *args, **kwargs):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + RETRY_SECONDS
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except (ClientError, BotoCoreError, Boto3Error) as exc:
                delay = min(MAX_BACKOFF, BASE_BACKOFF * 2**attempt) * (0.5 + random.random() / 2)
                if not _transient(exc) or time.monotonic() + delay > deadline:
                    raise _explain(exc, self.bucket, self._key(key)) from None
                attempt += 1
                log.warning(
                    "S3 %s: %s; retry %d in %.1fs",
                    self._key(key),
                    type(exc).__name__,
                    attempt,
                    delay,
                )
                time.sleep(delay)

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        return self._call(key, get)

    def write_bytes(self, key: str, data: bytes) -> None:
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK
        )
        # A fresh reader per attempt: a retried upload must start from the first byte.
        self._call(
            key,
            lambda: self.client.upload_fileobj(
                io.BytesIO(data), self.bucket, self._key(key), Config=transfer
            ),
        )

    def create_bytes(self, key: str, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``): S3 itself refuses to replace an
        existing object, so two attempts committing at once cannot both win."""
        from botocore.exceptions import ClientError

        def put() -> bool:
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"
                )
                return True
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("PreconditionFailed", "412"):
                    return False
                raise

        return self._call(key, put)

    def upload_file(self, key: str, path: Path) -> None:
        """Stream a local file (multipart above the threshold) without reading it into memory."""
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK
        )
        self._call(
            key, self.client.upload_file, str(path), self.bucket, self._key(key), Config=transfer
        )

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return self._call(key, head)

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix).rstrip("/")
        full = f"{full}/" if full else ""
        paginator = self.client.get_paginator("list_objects_v2")
        keys = []
        pages = self._call(
            prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full))
        )
        for page in pages:
            keys.extend(item["Key"] for item in page.get("Contents", []))
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in keys)

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        if self.exists(prefix):
            keys.append(prefix)
        for start in range(0, len(keys), 1000):
            self._delete_batch(prefix, [{"Key": self._key(k)} for k in keys[start : start + 1000]])

    def _delete_batch(self, prefix: str, batch: list[dict[str, str]]) -> None:
        """One multi-object delete; S3 reports a key it could not delete in ``Errors`` (HTTP
        200), never as an exception, so those keys are retried (transient codes) or raised."""
        deadline = time.monotonic() + RETRY_SECONDS
        attempt = 0
        while batch:
            answer = self._call(
                prefix, self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch}
            )
            errors = answer.get("Errors") or []
            delay = min(MAX_BACKOFF, BASE_BACKOFF * 2**attempt) * (0.5 + random.random() / 2)
            lasting = [e for e in errors if str(e.get("Code")) not in _TRANSIENT_CODES]
            if lasting or (errors and time.monotonic() + delay > deadline):
                first = (lasting or errors)[0]
                raise MaltError(
                    f"S3 did not delete s3://{self.bucket}/{first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message', '')}".rstrip()
                    + f" ({len(errors)} of {len(batch)} keys not deleted)"
                )
            batch = [{"Key": e["Key"]} for e in errors]
            if batch:
                attempt += 1
                log.warning(
                    "S3 delete: %d keys failed transiently; retry in %.1fs", len(batch), delay
                )
                time.sleep(delay)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def download_file(self, key: str, target: Path) -> Path:
        """Stream one object to a local file (no whole-file read into memory)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        self._call(key, self.client.download_file, self.bucket, self._key(key), str(target))
        return target


def download(uri: str, target: Path) -> Path:
    """Fetch one s3:// object to a local file (for data sources given as s3:// paths)."""
    bucket, key = split_uri(uri)
    return S3Store(f"s3://{bucket}").download_file(key, target)
