"""The ``parquet`` layout: shards of encoded images (``*.parquet`` under the prefix) with a key
column and a bytes column; one task per row group.

Shards and manifests are listed in chunks (``SHARD_CHUNK_ROWS``, ``MANIFEST_CHUNK_ROWS``) by
separate tasks, so no task sees every row: before the job starts,
:func:`restorer.pipeline.sources.listing.plan_outputs` reads their key (and uri) columns once in the
driver, tallies every row's output in an SQLite table on local disk (:class:`OutputClaims`: memory
bounded by its page cache) and hands the outputs that two or more rows would write to the listing
tasks (:attr:`SourceConfig.collisions`): every one of those rows fails with ``OutputCollision``,
wherever the chunks cut.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from restorer.errors import StorageError
from restorer.io import storage
from restorer.pipeline.sources.tasks import (
    SHARD_CHUNK_ROWS,
    ListingTask,
    SourceConfig,
    chunked,
    row_groups,
    task_rows,
)
from restorer.pipeline.sources.units import cut_units, input_row, mark_job_collisions


def listing_tasks(uri: str, config: SourceConfig) -> list[ListingTask]:
    """A task per ``SHARD_CHUNK_ROWS`` rows of each row group of each shard under ``uri``."""
    options = config.options
    shards = sorted(n for n in storage.list_names(uri, options) if n.endswith(".parquet"))
    if not shards:
        raise StorageError(f"No .parquet shards under {uri}")
    tasks = []
    for name in shards:
        shard = storage.join(uri, name)
        tasks.extend(chunked("parquet", shard, row_groups(shard, options), SHARD_CHUNK_ROWS))
    return tasks


def planned_rows(task: ListingTask, config: SourceConfig) -> Iterator[dict[str, Any]]:
    """What plan_outputs tallies of one shard task: its rows from the key column alone (the
    bytes are not read)."""
    fs, path = storage.filesystem(task.uri, config.options)
    with fs.open(path, "rb") as f:
        table = task_rows(pq.ParquetFile(f).read_row_group(task.row_group,
                                                        columns=[config.key_column]), task)
    return (input_row(key or "", "", config)
            for key in table.column(config.key_column).to_pylist())


def expand(task: ListingTask, config: SourceConfig,
           done: frozenset[str] = frozenset()) -> Iterator[list[dict[str, Any]]]:
    """The units of one shard chunk: its rows carry their encoded bytes inline."""
    fs, path = storage.filesystem(task.uri, config.options)
    with fs.open(path, "rb") as f:
        table = task_rows(pq.ParquetFile(f).read_row_group(
            task.row_group, columns=[config.key_column, config.bytes_column]), task)
    shard = posixpath.basename(task.uri)
    rows = [input_row(key or "", f"{shard}#{task.offset + index}", config, data=data or b"")
            for index, (key, data) in enumerate(zip(
                table.column(config.key_column).to_pylist(),
                table.column(config.bytes_column).to_pylist()))]
    mark_job_collisions(rows, config)
    yield from cut_units(rows, done)
