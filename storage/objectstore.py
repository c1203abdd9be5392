"""The object store (S3 API through the `minio` SDK): content-addressed adapter blobs.

A blob lives at `blobs/sha256/<hex>`; its key is its hash, so writes are idempotent and every read is
verified: bytes that do not hash to their key raise `ObjectCorrupted` and are never handed out.
The SDK is synchronous; async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable
from typing import BinaryIO, TypeVar

import urllib3
from minio import Minio
from minio.error import S3Error

from storage.errors import ObjectCorrupted, ObjectMissing, StorageUnavailable
from storage.settings import ObjectStoreSettings

BLOB_PREFIX = "blobs/sha256/"
_PART_SIZE = 16 << 20

ProgressCallback = Callable[[int], None]
T = TypeVar("T")


def _translating(method: Callable[..., T]) -> Callable[..., T]:
    """Turn transport failures (refused connections, timeouts) into StorageUnavailable."""

    @functools.wraps(method)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            return method(*args, **kwargs)
        except urllib3.exceptions.HTTPError as e:
            raise StorageUnavailable("object store", str(e)) from e

    return wrapper


def blob_key(sha256: str) -> str:
    """Object key of the blob whose content hashes to `sha256`."""
    return f"{BLOB_PREFIX}{sha256}"


class _ProgressReader(io.RawIOBase):
    """A readable stream over bytes that reports how many bytes were read (for upload progress bars)."""

    def __init__(self, data: bytes, progress: ProgressCallback | None) -> None:
        self._buf = io.BytesIO(data)
        self._progress = progress

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._buf.read(size)
        if self._progress is not None and chunk:
            self._progress(len(chunk))
        return chunk


class ObjectStore:
    """Adapter blobs in one bucket of an S3-compatible store. Connection failures raise StorageUnavailable."""

    def __init__(self, settings: ObjectStoreSettings) -> None:
        self.bucket = settings.bucket
        self.client = Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key.get_secret_value(),
            secure=settings.secure,
            region=settings.region,
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=5.0, read=60.0),
                retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
                maxsize=16,
            ),
        )

    @_translating
    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent)."""
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as e:
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    @_translating
    def has_blob(self, sha256: str) -> bool:
        try:
            self.client.stat_object(self.bucket, blob_key(sha256))
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return False
            raise
        return True

    @_translating
    def put_blob(self, blob: bytes, *, progress: ProgressCallback | None = None) -> tuple[str, bool]:
        """Store `blob` under its sha256. Returns (sha256, created): False when it was already there."""
        sha = hashlib.sha256(blob).hexdigest()
        if self.has_blob(sha):
            if progress is not None:
                progress(len(blob))
            return sha, False
        stream: BinaryIO = _ProgressReader(blob, progress)  # type: ignore[assignment]
        self.client.put_object(
            self.bucket,
            blob_key(sha),
            stream,
            length=len(blob),
            content_type="application/octet-stream",
            metadata={"x-amz-meta-sha256": sha},
            part_size=_PART_SIZE,
        )
        return sha, True

    @_translating
    def get_blob(self, sha256: str) -> bytes:
        """Read the blob stored under `sha256` and check that it hashes to it."""
        key = blob_key(sha256)
        try:
            response = self.client.get_object(self.bucket, key)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                raise ObjectMissing(key) from e
            raise
        try:
            data = response.read()
        finally:
            response.close()
            response.release_conn()
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ObjectCorrupted(key, expected=sha256, actual=actual)
        return data

    @_translating
    def delete_blob(self, sha256: str) -> None:
        """Remove a blob (idempotent)."""
        self.client.remove_object(self.bucket, blob_key(sha256))

    @_translating
    def list_blobs(self) -> list[str]:
        """sha256 of every blob in the bucket."""
        return [
            o.object_name[len(BLOB_PREFIX) :]
            for o in self.client.list_objects(self.bucket, prefix=BLOB_PREFIX, recursive=True)
            if o.object_name
        ]
