"""The archive in S3 (any S3-compatible store; SeaweedFS locally) through the `minio` client.

Blocking calls: async callers run them in a thread. Every failure to reach the store is raised as
`ArchiveUnavailableError`, a `ConnectionError`, so the consumer treats it as an outage (retried,
never dead-lettered).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from services.settings import Settings
from streams._consumer import Record
from streams.archive._segment import (
    Manifest,
    first_offset_of,
    manifest_name,
    open_segment,
    partition_prefix,
)

T = TypeVar("T")


class ArchiveUnavailableError(ConnectionError):
    """The S3 store could not be reached or refused a request (retry later)."""


@dataclass(frozen=True, slots=True)
class PartitionListing:
    partition: int
    manifests: list[Manifest]
    # Segments whose manifest was never written (a crash between the two PUTs): ignored by readers
    # and overwritten when the archiver writes that range again.
    orphans: list[str]
    # Manifest objects that could not be read or parsed.
    unreadable: list[str]


def s3_client(settings: Settings) -> Minio:
    return Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=settings.s3_secure,
        region=settings.s3_region,
        # Fail fast and let the caller's retry loop decide (the default retries for minutes).
        http_client=urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=60),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            maxsize=8,
        ),
    )


class ArchiveStore:
    """Segments and manifests under ``<bucket>/<prefix>/<topic>/<partition>/``."""

    def __init__(self, settings: Settings, prefix: str | None = None, client: Minio | None = None) -> None:
        self.bucket = settings.s3_bucket
        self.prefix = (prefix if prefix is not None else settings.archive_prefix).strip("/")
        self._client = client or s3_client(settings)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except S3Error:
            raise
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise ArchiveUnavailableError(f"S3 {what} failed: {exc!r}") from exc

    def ensure_bucket(self) -> None:
        if not self._call("bucket_exists", lambda: self._client.bucket_exists(self.bucket)):
            self._call("make_bucket", lambda: self._client.make_bucket(self.bucket))

    def put(self, name: str, data: bytes, content_type: str) -> None:
        # One PUT per object: S3 makes it visible whole or not at all.
        self._call(
            f"PUT {name}",
            lambda: self._client.put_object(
                self.bucket, name, io.BytesIO(data), len(data), content_type=content_type
            ),
        )

    def get(self, name: str) -> bytes:
        def fetch() -> bytes:
            response = self._client.get_object(self.bucket, name)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return self._call(f"GET {name}", fetch)

    def remove(self, name: str) -> None:
        self._call(f"DELETE {name}", lambda: self._client.remove_object(self.bucket, name))

    def names(self, prefix: str) -> Iterator[str]:
        objects = self._call(
            "LIST", lambda: list(self._client.list_objects(self.bucket, prefix=prefix, recursive=True))
        )
        for obj in objects:
            if obj.object_name is not None:
                yield obj.object_name

    def partitions(self, topic: str) -> list[int]:
        found: set[int] = set()
        for name in self.names(f"{self.prefix}/{topic}/"):
            part = name.rsplit("/", 2)[-2]
            if part.isdigit():
                found.add(int(part))
        return sorted(found)

    def listing(self, topic: str, partition: int) -> PartitionListing:
        names = sorted(self.names(partition_prefix(self.prefix, topic, partition)))
        manifest_names = [n for n in names if n.endswith(".manifest.json")]
        segments = {first_offset_of(n): n for n in names if n.endswith(".seg.zst")}
        manifests: list[Manifest] = []
        unreadable: list[str] = []
        for name in manifest_names:
            try:
                manifests.append(Manifest.from_json(self.get(name)))
            except (ValueError, KeyError, TypeError):
                unreadable.append(name)
        manifests.sort(key=lambda m: m.first_offset)
        described = {m.first_offset for m in manifests}
        orphans = [name for first, name in sorted(segments.items()) if first not in described]
        return PartitionListing(partition, manifests, orphans, unreadable)

    def next_offset(self, topic: str, partition: int) -> int | None:
        """Where the archive of a partition continues: after the last manifest's range; None when
        nothing is archived yet. The archive's position is what S3 holds, nothing else."""
        names = sorted(
            n
            for n in self.names(partition_prefix(self.prefix, topic, partition))
            if n.endswith(".manifest.json")
        )
        if not names:
            return None
        return Manifest.from_json(self.get(names[-1])).last_offset + 1

    def write_segment(self, stored: bytes, manifest: Manifest) -> None:
        """The segment first, then its manifest: a crash in between leaves an orphan segment that
        no reader trusts and the next write of the range overwrites."""
        self.put(manifest.segment, stored, "application/zstd")
        self.put(
            manifest_name(self.prefix, manifest.topic, manifest.partition, manifest.first_offset),
            manifest.to_json(),
            "application/json",
        )

    def read_segment(self, manifest: Manifest) -> list[Record]:
        return open_segment(self.get(manifest.segment), manifest)
