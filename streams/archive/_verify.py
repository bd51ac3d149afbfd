"""`switchboard archive verify`: re-read every segment and check it and the chain of ranges."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from streams.archive._segment import SegmentFormatError, chain_problems
from streams.archive._store import ArchiveStore


@dataclass(slots=True)
class PartitionReport:
    partition: int
    segments: int = 0
    records: int = 0
    first_offset: int | None = None
    last_offset: int | None = None
    raw_bytes: int = 0
    stored_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    # Segments without a manifest (a crash between the two writes): not part of the archive.
    orphans: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_archive(
    store: ArchiveStore,
    topic: str,
    partitions: list[int] | None = None,
    on_segment: Callable[[int, int], None] | None = None,
) -> list[PartitionReport]:
    """Check each partition: every manifest's segment exists, has the manifest's checksum, decodes,
    holds `count` records in offset order within its range and time range; consecutive ranges
    neither leave a gap nor overlap. Blocking (S3 reads)."""
    reports: list[PartitionReport] = []
    for p in partitions if partitions is not None else store.partitions(topic):
        listing = store.listing(topic, p)
        report = PartitionReport(p, orphans=list(listing.orphans))
        report.problems.extend(f"unreadable manifest {name}" for name in listing.unreadable)
        report.problems.extend(chain_problems(listing.manifests))
        for manifest in listing.manifests:
            try:
                records = store.read_segment(manifest)
            except SegmentFormatError as exc:
                report.problems.append(str(exc))
                continue
            except Exception as exc:
                report.problems.append(f"{manifest.segment}: cannot read: {exc!r}")
                continue
            report.segments += 1
            report.records += len(records)
            report.raw_bytes += manifest.raw_bytes
            report.stored_bytes += manifest.stored_bytes
            if on_segment is not None:
                on_segment(p, len(records))
        if listing.manifests:
            report.first_offset = listing.manifests[0].first_offset
            report.last_offset = listing.manifests[-1].last_offset
        reports.append(report)
    return reports


def kafka_coverage_problems(reports: list[PartitionReport], kafka_starts: dict[int, int]) -> list[str]:
    """Offsets that are neither archived nor in Kafka any more: Kafka's retention dropped records
    before the archiver wrote them. Pure."""
    problems: list[str] = []
    by_partition = {r.partition: r for r in reports}
    for p, start in sorted(kafka_starts.items()):
        if start == 0:
            continue
        report = by_partition.get(p)
        if report is None or report.first_offset is None:
            problems.append(f"partition {p}: offsets 0..{start - 1} are gone from Kafka and not archived")
            continue
        if report.first_offset > 0:
            problems.append(
                f"partition {p}: offsets 0..{report.first_offset - 1} are gone from Kafka and not archived"
            )
        assert report.last_offset is not None
        if report.last_offset + 1 < start:
            problems.append(
                f"partition {p}: offsets {report.last_offset + 1}..{start - 1} are gone from Kafka and not archived"
            )
    return problems
