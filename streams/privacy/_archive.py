"""Removing records from the S3 archive: erasures and per-tenant retention.

A segment that holds records to remove is rewritten without them, crash-safe:

1. the new segment is written under a new name (`<first offset>.<generation>.seg.zst`),
2. the manifest (same name, one PUT, so S3 swaps it atomically) is rewritten to point at it,
   with the new count, time range, sizes and SHA-256,
3. the old segment object is deleted.

A crash after 1 leaves an unreferenced new segment, after 2 an unreferenced old one: readers
follow manifests only, and the next rewrite of the partition deletes any segment object whose
first offset a manifest describes but which that manifest does not name. The offset range of a
segment never changes (offsets without a record inside a range are allowed: Kafka skips offsets
too), so the chain of ranges stays without gaps or overlaps and `archive verify` passes. A
segment left with no record keeps its manifest (count 0) for the same reason.

Segments without any manifest (the archiver crashed between its two PUTs, or is writing one right
now) are left alone: the archiver overwrites them when it writes that range, and it drops erased
records itself (streams/archive/_archiver.py).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import zstandard

from streams._consumer import Record
from streams.archive._segment import (
    Manifest,
    build_segment,
    encode_records,
    first_offset_of,
    manifest_name,
    partition_prefix,
    segment_name,
)
from streams.archive._store import ArchiveStore


@dataclass(slots=True)
class RewriteStats:
    segments_read: int = 0
    segments_rewritten: int = 0
    records_removed: int = 0
    leftovers_deleted: int = 0


def segment_for(
    prefix: str,
    topic: str,
    partition: int,
    first_offset: int,
    last_offset: int,
    records: Sequence[Record],
    level: int,
    name: str | None = None,
) -> tuple[bytes, Manifest]:
    """A segment of `records` (possibly none) covering first..last, stored as `name` (default:
    the archiver's name for the range). Pure."""
    if records:
        stored, manifest = build_segment(prefix, topic, partition, first_offset, last_offset, records, level)
    else:
        raw = encode_records([])
        stored = zstandard.ZstdCompressor(level=level).compress(raw)
        manifest = Manifest(
            topic=topic,
            partition=partition,
            first_offset=first_offset,
            last_offset=last_offset,
            count=0,
            first_timestamp_ms=0,
            last_timestamp_ms=0,
            min_timestamp_ms=0,
            max_timestamp_ms=0,
            raw_bytes=len(raw),
            stored_bytes=len(stored),
            sha256=hashlib.sha256(stored).hexdigest(),
            segment="",
        )
    return stored, replace(manifest, segment=name or segment_name(prefix, topic, partition, first_offset))


def generation_name(prefix: str, topic: str, partition: int, first_offset: int) -> str:
    return f"{partition_prefix(prefix, topic, partition)}{first_offset:020d}.g{uuid.uuid4().hex[:12]}.seg.zst"


def rewrite_partition(
    store: ArchiveStore,
    topic: str,
    partition: int,
    drop: Callable[[Record], bool],
    level: int = 3,
    skip_segment: Callable[[Manifest], bool] | None = None,
) -> RewriteStats:
    """Rewrite every segment of the partition that holds a record `drop` selects (blocking)."""
    stats = RewriteStats()
    listing = store.listing(topic, partition)
    for manifest in listing.manifests:
        if skip_segment is not None and skip_segment(manifest):
            continue
        records = store.read_segment(manifest)
        stats.segments_read += 1
        kept = [r for r in records if not drop(r)]
        if len(kept) == len(records):
            continue
        name = generation_name(store.prefix, topic, partition, manifest.first_offset)
        stored, new = segment_for(
            store.prefix, topic, partition, manifest.first_offset, manifest.last_offset, kept, level, name
        )
        store.put(new.segment, stored, "application/zstd")
        store.put(
            manifest_name(store.prefix, topic, partition, manifest.first_offset),
            new.to_json(),
            "application/json",
        )
        store.remove(manifest.segment)
        stats.segments_rewritten += 1
        stats.records_removed += len(records) - len(kept)
    stats.leftovers_deleted += delete_leftovers(store, topic, partition)
    return stats


def delete_leftovers(store: ArchiveStore, topic: str, partition: int) -> int:
    """Delete segment objects a crashed rewrite left: a manifest describes their first offset but
    names another object. (Segments whose range no manifest describes are the archiver's.)"""
    listing = store.listing(topic, partition)
    named = {m.segment for m in listing.manifests}
    described = {m.first_offset for m in listing.manifests}
    removed = 0
    for name in store.names(partition_prefix(store.prefix, topic, partition)):
        if name.endswith(".seg.zst") and name not in named and first_offset_of(name) in described:
            store.remove(name)
            removed += 1
    return removed


def rewrite_archive(
    store: ArchiveStore,
    topic: str,
    drop: Callable[[Record], bool],
    level: int = 3,
    skip_segment: Callable[[Manifest], bool] | None = None,
) -> RewriteStats:
    total = RewriteStats()
    for p in store.partitions(topic):
        got = rewrite_partition(store, topic, p, drop, level, skip_segment)
        total.segments_read += got.segments_read
        total.segments_rewritten += got.segments_rewritten
        total.records_removed += got.records_removed
        total.leftovers_deleted += got.leftovers_deleted
    return total
