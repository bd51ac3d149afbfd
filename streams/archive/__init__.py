"""The cold archive: closed segments of the event log, zstd-compressed, in S3, with manifests."""

from streams.archive._archiver import (
    ArchiverProcessor,
    ArchiverStats,
    archiver_consumer,
    run_archiver,
    serve_archiver,
)
from streams.archive._segment import (
    Manifest,
    SegmentFormatError,
    build_segment,
    chain_problems,
    decode_records,
    encode_records,
    open_segment,
)
from streams.archive._store import ArchiveStore, ArchiveUnavailableError, PartitionListing, s3_client
from streams.archive._verify import PartitionReport, kafka_coverage_problems, verify_archive

__all__ = [
    "ArchiveStore",
    "ArchiveUnavailableError",
    "ArchiverProcessor",
    "ArchiverStats",
    "Manifest",
    "PartitionListing",
    "PartitionReport",
    "SegmentFormatError",
    "archiver_consumer",
    "build_segment",
    "chain_problems",
    "decode_records",
    "encode_records",
    "kafka_coverage_problems",
    "open_segment",
    "run_archiver",
    "s3_client",
    "serve_archiver",
    "verify_archive",
]
