"""The pieces of listing work and the settings they share: a :class:`ListingTask` is one Ray
task's share of an input (a folder, a flat folder's partition, an S3 stream, a chunk of a
shard or manifest); :class:`SourceConfig` is what every task reads of the job's spec.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pyarrow.parquet as pq

from restorer.errors import StorageError
from restorer.io import storage

UNIT_MAX_KEYS = 64
UNIT_BOUNDARY_MODULUS = 16  # a unit also ends after a key whose crc32 is 0 modulo this
MANIFEST_CHUNK_ROWS = 512  # rows of a manifest listed by one task
SHARD_CHUNK_ROWS = 64  # rows (encoded images) of a Parquet shard listed by one task
MANIFEST_SUFFIXES = (".parquet", ".txt", ".lst", ".csv")
FLAT_PARTITION_KEYS = 16384  # files of a flat folder per partition task (a power of two of
# partitions is used: a folder of up to this many files is one partition, listed as before)


@dataclass(frozen=True)
class ListingTask:
    """One piece of listing work, run in a Ray task (or the driver when a limit is set)."""

    layout: str  # files | parquet | manifest
    uri: str  # folder/prefix, shard file or manifest file
    recursive: bool = True  # files: walk below uri, or only the files directly in it
    key_prefix: str = ""  # files: key of uri relative to the input root
    row_group: int = -1  # parquet/manifest parquet: which row group
    offset: int = 0  # parquet/manifest parquet: first row of this task within the row group
    length: int = 0  # ... and how many rows (0 = to the end of the row group)
    name: str = ""  # files: list only this file of the folder (an input that is one file)
    partition: int = 0  # files, flat (recursive=False): keep the files whose stem hashes here
    partitions: int = 0  # ... out of this many (0: not a partitioned listing)
    stream: bool = False  # files, S3 (recursive=False): the prefix's files in key order
    folders: bool = False  # stream: also list the sub-folders it meets (the driver did not)
    # files: folders beside uri whose names differ from its name only in case (``raw/`` beside
    # ``Raw/``): their outputs could collide with this folder's, so this task lists them too
    variants: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceConfig:
    layout: str
    extensions: tuple[str, ...]
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    output_format: str
    key_column: str
    bytes_column: str
    uri_column: str
    options: storage.StorageOptions
    skip_prefix: str = ""  # files: keys under this prefix are not listed (the output, when
    # it lies inside the input: a rerun must not restore the last run's outputs again)
    page_size: int = storage.LIST_PAGE_SIZE  # entries per listing page of a flat folder
    partition_keys: int = FLAT_PARTITION_KEYS  # files per partition of a flat folder
    # parquet/manifest: lower-cased output key -> the keys of the rows that would all write it,
    # found across every chunk by plan_outputs (those rows fail with OutputCollision)
    collisions: tuple[tuple[str, tuple[str, ...]], ...] = ()
    bucket_keys: bool = False  # manifest: default keys keep the bucket (URIs span buckets)


def is_input(name: str, config: SourceConfig) -> bool:
    """Whether a file directly under the input is an input (the filters of :func:`expand`)."""
    return (name.lower().endswith(tuple(e.lower() for e in config.extensions))
            and not (config.skip_prefix and name.startswith(config.skip_prefix))
            and storage.matches(name, config.include, config.exclude))


def folder_listed(name: str, config: SourceConfig) -> bool:
    """Whether a folder directly under the input is listed (not ours, not the output)."""
    return name != storage.META_DIR and config.skip_prefix != name + "/"


def flat_partitions(files: int, partition_keys: int = FLAT_PARTITION_KEYS) -> int:
    """Partitions of a flat folder of ``files`` files: the least power of two that gives each
    at most ``partition_keys`` files on average (1 up to ``partition_keys``)."""
    if partition_keys < 1:
        raise ValueError(f"partition_keys = {partition_keys}; need 1 or more")
    return 1 << max(0, math.ceil(math.log2(max(1, math.ceil(files / partition_keys)))))


def partition_of(name: str, partitions: int) -> int:
    """The partition of a file ``name`` of a flat folder: a hash of its lower-cased stem, so
    that names which would write one output (``a.PNG``, ``a.bmp``) share a partition."""
    stem = (name.rpartition(".")[0] or name).lower()
    return zlib.crc32(stem.encode()) % partitions if partitions > 1 else 0


def chunked(layout: str, uri: str, row_counts: list[int], chunk: int) -> list[ListingTask]:
    """Tasks of at most ``chunk`` rows, so that no task emits one huge block of rows."""
    return [ListingTask(layout, uri, row_group=group, offset=offset,
                        length=min(chunk, rows - offset))
            for group, rows in enumerate(row_counts) for offset in range(0, rows, chunk)]


def row_groups(uri: str, options: storage.StorageOptions) -> list[int]:
    """Rows in each row group of a Parquet file (from its footer only)."""
    fs, path = storage.filesystem(uri, options)
    try:
        with fs.open(path, "rb") as f:
            metadata = pq.ParquetFile(f).metadata
            return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    except FileNotFoundError as e:
        raise StorageError(f"{uri} does not exist") from e
    except PermissionError as e:
        raise StorageError(f"No permission to read {uri}; check your credentials") from e


def task_rows(table, task: ListingTask):
    """The rows of a row group's ``table`` that ``task`` lists (its offset and length)."""
    return table.slice(task.offset, task.length or None)
