"""Archive segments without any server: round trip, checks against the manifest, chain gaps/overlaps."""

from __future__ import annotations

import dataclasses

import pytest

from streams._consumer import Record
from streams.archive import Manifest, SegmentFormatError, build_segment, chain_problems, open_segment
from streams.archive._segment import first_offset_of, manifest_name, segment_name


def _records(first: int, n: int, partition: int = 2) -> list[Record]:
    return [
        Record(
            "t",
            partition,
            first + i,
            None if i == 3 else f"conv-{i % 7}".encode(),
            b"" if i == 4 else f"value {i} 你好".encode() * 5,
            1_700_000_000_000 + i * 10,
            (("sb-type", b"message_received"), ("traceparent", f"00-{i:032x}-01".encode())),
        )
        for i in range(n)
    ]


def test_a_segment_gives_back_exactly_its_records() -> None:
    records = _records(100, 50)
    stored, manifest = build_segment("archive", "t", 2, 100, 149, records)
    assert open_segment(stored, manifest) == records
    assert (manifest.first_offset, manifest.last_offset, manifest.count) == (100, 149, 50)
    assert manifest.min_timestamp_ms == records[0].timestamp_ms
    assert manifest.max_timestamp_ms == records[-1].timestamp_ms
    assert manifest.stored_bytes < manifest.raw_bytes  # repetitive values compress
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_names_depend_on_partition_and_first_offset_only() -> None:
    assert segment_name("a", "t", 3, 42) == "a/t/00003/00000000000000000042.seg.zst"
    assert first_offset_of(manifest_name("a", "t", 3, 42)) == 42


def test_a_changed_byte_or_a_wrong_count_is_caught() -> None:
    stored, manifest = build_segment("archive", "t", 2, 0, 9, _records(0, 10))
    corrupt = stored[:-1] + bytes([stored[-1] ^ 1])
    with pytest.raises(SegmentFormatError, match="SHA-256"):
        open_segment(corrupt, manifest)
    with pytest.raises(SegmentFormatError, match="records"):
        open_segment(stored, dataclasses.replace(manifest, count=11))


def test_a_range_may_hold_offsets_without_records_but_not_records_outside_it() -> None:
    records = _records(10, 5)
    _, manifest = build_segment("archive", "t", 2, 5, 20, records)  # 5..9 and 15..20 hold nothing
    assert (manifest.first_offset, manifest.last_offset) == (5, 20)
    with pytest.raises(ValueError, match="outside"):
        build_segment("archive", "t", 2, 11, 20, records)


def test_chain_reports_gaps_and_overlaps() -> None:
    def m(first: int, last: int) -> Manifest:
        return build_segment("a", "t", 0, first, last, _records(first, last - first + 1, 0))[1]

    assert chain_problems([m(0, 9), m(10, 19), m(20, 20)]) == []
    gap = chain_problems([m(0, 9), m(12, 19)])
    assert len(gap) == 1 and "gap, offsets 10..11" in gap[0]
    overlap = chain_problems([m(0, 9), m(5, 19)])
    assert len(overlap) == 1 and "overlap" in overlap[0]


def test_offsets_gone_from_kafka_and_missing_in_the_archive_are_reported() -> None:
    from streams.archive import PartitionReport, kafka_coverage_problems

    archived = PartitionReport(0, first_offset=0, last_offset=99)
    late = PartitionReport(1, first_offset=10, last_offset=99)
    assert kafka_coverage_problems([archived], {0: 100}) == []
    assert kafka_coverage_problems([archived], {0: 0}) == []
    assert kafka_coverage_problems([archived], {0: 150}) == [
        "partition 0: offsets 100..149 are gone from Kafka and not archived"
    ]
    assert kafka_coverage_problems([late, PartitionReport(2)], {1: 50, 2: 5}) == [
        "partition 1: offsets 0..9 are gone from Kafka and not archived",
        "partition 2: offsets 0..4 are gone from Kafka and not archived",
    ]
