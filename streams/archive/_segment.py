"""Archive segments and their manifests. Pure: bytes in, bytes out; no S3, no Kafka, no clock.

A segment is a contiguous offset range of one partition of a topic: the records' bytes exactly as
Kafka held them (offset, timestamp, key, value, headers), zstd-compressed. Its manifest says what
is in it (partition, first/last offset, time range, record count, sizes, SHA-256 of the stored
bytes). Both are named by (topic, partition, first offset) only, so writing a segment again after
a crash overwrites the same objects and two segments can never overlap by name.

Offset ranges, not record counts, are what join segments: a segment covers
``first_offset..last_offset`` inclusive, the next one starts at ``last_offset + 1``. Offsets Kafka
skipped (transaction markers, compaction) simply have no record inside the range.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import zstandard

from streams._consumer import Record

MAGIC = b"SBSEG1\n"
FORMAT_VERSION = 1
_RECORD = struct.Struct(">qqiiH")  # offset, timestamp_ms, key length, value length, header count
_HEADER_NAME = struct.Struct(">H")
_LENGTH = struct.Struct(">i")


class SegmentFormatError(ValueError):
    """A segment's bytes are not what its manifest or the format says."""


@dataclass(frozen=True, slots=True)
class Manifest:
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    count: int
    first_timestamp_ms: int
    last_timestamp_ms: int
    min_timestamp_ms: int
    max_timestamp_ms: int
    raw_bytes: int
    stored_bytes: int
    sha256: str
    segment: str
    format: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        data: dict[str, Any] = json.loads(raw)
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**fields)

    def covers(self, offset: int) -> bool:
        return self.first_offset <= offset <= self.last_offset


def partition_prefix(prefix: str, topic: str, partition: int) -> str:
    return f"{prefix}/{topic}/{partition:05d}/"


def segment_name(prefix: str, topic: str, partition: int, first_offset: int) -> str:
    return f"{partition_prefix(prefix, topic, partition)}{first_offset:020d}.seg.zst"


def manifest_name(prefix: str, topic: str, partition: int, first_offset: int) -> str:
    return f"{partition_prefix(prefix, topic, partition)}{first_offset:020d}.manifest.json"


def first_offset_of(name: str) -> int:
    """The first offset in a segment's or manifest's object name."""
    return int(name.rsplit("/", 1)[1].split(".", 1)[0])


def encode_records(records: Iterable[Record]) -> bytes:
    """The uncompressed segment body."""
    parts = [MAGIC]
    for r in records:
        key, value = r.key, r.value
        parts.append(
            _RECORD.pack(
                r.offset,
                r.timestamp_ms,
                -1 if key is None else len(key),
                -1 if value is None else len(value),
                len(r.headers),
            )
        )
        if key is not None:
            parts.append(key)
        if value is not None:
            parts.append(value)
        for name, header_value in r.headers:
            encoded = name.encode()
            parts.append(_HEADER_NAME.pack(len(encoded)))
            parts.append(encoded)
            parts.append(_LENGTH.pack(-1 if header_value is None else len(header_value)))
            if header_value is not None:
                parts.append(header_value)
    return b"".join(parts)


def decode_records(raw: bytes, topic: str, partition: int) -> Iterator[Record]:
    if not raw.startswith(MAGIC):
        raise SegmentFormatError("not a Switchboard segment (bad magic)")
    view = memoryview(raw)
    pos, end = len(MAGIC), len(raw)
    try:
        while pos < end:
            offset, ts, key_len, value_len, n_headers = _RECORD.unpack_from(view, pos)
            pos += _RECORD.size
            key = None if key_len < 0 else bytes(view[pos : pos + key_len])
            pos += max(key_len, 0)
            value = None if value_len < 0 else bytes(view[pos : pos + value_len])
            pos += max(value_len, 0)
            headers: list[tuple[str, bytes]] = []
            for _ in range(n_headers):
                (name_len,) = _HEADER_NAME.unpack_from(view, pos)
                pos += _HEADER_NAME.size
                name = bytes(view[pos : pos + name_len]).decode()
                pos += name_len
                (hv_len,) = _LENGTH.unpack_from(view, pos)
                pos += _LENGTH.size
                headers.append((name, b"" if hv_len < 0 else bytes(view[pos : pos + hv_len])))
                pos += max(hv_len, 0)
            if pos > end:
                raise SegmentFormatError("segment truncated inside a record")
            yield Record(topic, partition, offset, key, value, ts, tuple(headers))
    except struct.error as exc:
        raise SegmentFormatError(f"segment truncated: {exc}") from None


def build_segment(
    prefix: str,
    topic: str,
    partition: int,
    first_offset: int,
    last_offset: int,
    records: Sequence[Record],
    level: int = 3,
) -> tuple[bytes, Manifest]:
    """The compressed segment for `records` (offset order, all within first..last) and its manifest."""
    if not records:
        raise ValueError("a segment holds at least one record")
    if records[0].offset < first_offset or records[-1].offset > last_offset:
        raise ValueError(
            f"records {records[0].offset}..{records[-1].offset} outside {first_offset}..{last_offset}"
        )
    raw = encode_records(records)
    stored = zstandard.ZstdCompressor(level=level).compress(raw)
    stamps = [r.timestamp_ms for r in records]
    manifest = Manifest(
        topic=topic,
        partition=partition,
        first_offset=first_offset,
        last_offset=last_offset,
        count=len(records),
        first_timestamp_ms=stamps[0],
        last_timestamp_ms=stamps[-1],
        min_timestamp_ms=min(stamps),
        max_timestamp_ms=max(stamps),
        raw_bytes=len(raw),
        stored_bytes=len(stored),
        sha256=hashlib.sha256(stored).hexdigest(),
        segment=segment_name(prefix, topic, partition, first_offset),
    )
    return stored, manifest


def open_segment(stored: bytes, manifest: Manifest) -> list[Record]:
    """The records of a stored segment, checked against its manifest (raises SegmentFormatError)."""
    digest = hashlib.sha256(stored).hexdigest()
    if digest != manifest.sha256:
        raise SegmentFormatError(
            f"{manifest.segment}: SHA-256 {digest[:12]}… differs from the manifest's {manifest.sha256[:12]}…"
        )
    try:
        raw = zstandard.ZstdDecompressor().decompress(stored)
    except zstandard.ZstdError as exc:
        raise SegmentFormatError(f"{manifest.segment}: not zstd: {exc}") from None
    records = list(decode_records(raw, manifest.topic, manifest.partition))
    problems = check_records(records, manifest)
    if problems:
        raise SegmentFormatError(f"{manifest.segment}: " + "; ".join(problems))
    return records


def check_records(records: Sequence[Record], manifest: Manifest) -> list[str]:
    problems: list[str] = []
    if len(records) != manifest.count:
        problems.append(f"{len(records)} records, manifest says {manifest.count}")
    previous = manifest.first_offset - 1
    for r in records:
        if r.offset <= previous:
            problems.append(f"offset {r.offset} not after {previous}")
            break
        previous = r.offset
    if records and records[-1].offset > manifest.last_offset:
        problems.append(f"offset {records[-1].offset} past the range's end {manifest.last_offset}")
    if records:
        stamps = [r.timestamp_ms for r in records]
        if (min(stamps), max(stamps)) != (manifest.min_timestamp_ms, manifest.max_timestamp_ms):
            problems.append("time range differs from the manifest")
    return problems


def chain_problems(manifests: Sequence[Manifest]) -> list[str]:
    """Gaps and overlaps between consecutive segments of one partition (sorted by first offset)."""
    problems: list[str] = []
    for before, after in itertools.pairwise(manifests):
        if after.first_offset > before.last_offset + 1:
            problems.append(
                f"partition {after.partition}: gap, offsets {before.last_offset + 1}..{after.first_offset - 1} "
                "are in no segment"
            )
        elif after.first_offset <= before.last_offset:
            problems.append(
                f"partition {after.partition}: overlap, segments at {before.first_offset} and "
                f"{after.first_offset} both hold offset {after.first_offset}"
            )
    return problems
