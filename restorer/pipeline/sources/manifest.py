"""The ``manifest`` layout: a list of image URIs, in a Parquet file with a ``uri`` column (and
optional ``key`` column) read one row group per task, or a text file with one URI per line. The
default key is the URI's path after the bucket (or after the leading ``/`` of a local path); when
the URIs span buckets it keeps the bucket (``s3://a/x.png`` -> ``a/x.png``), so that two buckets'
``x.png`` stay apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pyarrow.parquet as pq

from restorer.errors import SpecError
from restorer.io import storage
from restorer.pipeline.sources.tasks import (
    MANIFEST_CHUNK_ROWS,
    ListingTask,
    SourceConfig,
    chunked,
    row_groups,
    task_rows,
)
from restorer.pipeline.sources.units import cut_units, input_row, mark_job_collisions


def listing_tasks(uri: str, config: SourceConfig) -> list[ListingTask]:
    """A Parquet manifest: a task per ``MANIFEST_CHUNK_ROWS`` rows of each row group; a text
    manifest: one task."""
    if uri.lower().endswith(".parquet"):
        return chunked("manifest", uri, row_groups(uri, config.options), MANIFEST_CHUNK_ROWS)
    return [ListingTask("manifest", uri)]


def manifest_key(uri: str, bucket: bool = False) -> str:
    """A manifest row's default key: the URI's path after the bucket (``bucket``: with it),
    or a local path without its leading ``/``."""
    if "://" in uri:
        path = uri.split("://", 1)[1]
        return path if bucket else (path.split("/", 1)[1] if "/" in path else path)
    return uri.lstrip("/")


def bucket_of(uri: str) -> str:
    """The scheme and bucket of a URI ("" for a local path)."""
    if "://" not in uri:
        return ""
    scheme, path = uri.split("://", 1)
    return f"{scheme}://{path.split('/', 1)[0]}"


def manifest_entries(task: ListingTask, config: SourceConfig
                     ) -> tuple[list[str], list[str | None]]:
    """(uris, keys: None where the manifest names none) of one manifest task's rows."""
    if task.row_group >= 0:
        fs, path = storage.filesystem(task.uri, config.options)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if config.uri_column not in names:
                raise SpecError(f"Manifest {task.uri} has no {config.uri_column!r} column "
                                f"(columns: {names}); set input.uri_column")
            columns = [config.uri_column] + ([config.key_column] if config.key_column in names
                                             else [])
            table = task_rows(parquet.read_row_group(task.row_group, columns=columns), task)
        uris = [u or "" for u in table.column(config.uri_column).to_pylist()]
        keys = (table.column(config.key_column).to_pylist() if config.key_column in columns
                else [None] * len(uris))
        return uris, keys
    lines = storage.read_bytes(task.uri, config.options).decode("utf-8").splitlines()
    uris = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return uris, [None] * len(uris)


def manifest_rows(task: ListingTask, config: SourceConfig) -> list[dict[str, Any]]:
    """The rows of one manifest task (the images are not read)."""
    uris, keys = manifest_entries(task, config)
    return [input_row(key if key is not None else manifest_key(uri, config.bucket_keys), uri,
                      config)
            for uri, key in zip(uris, keys)]


planned_rows = manifest_rows  # what plan_outputs tallies: the rows themselves


def with_bucket_keys(tasks: list[ListingTask], config: SourceConfig) -> SourceConfig:
    """``config`` with :attr:`SourceConfig.bucket_keys` set when the URIs that name no key span
    more than one bucket (their default keys must then keep the bucket)."""
    buckets: set[str] = set()
    for task in tasks:
        uris, keys = manifest_entries(task, config)
        buckets.update(bucket_of(u) for u, k in zip(uris, keys) if k is None)
        if len(buckets) > 1:
            return replace(config, bucket_keys=True)
    return config


def expand(task: ListingTask, config: SourceConfig,
           done: frozenset[str] = frozenset()) -> Iterator[list[dict[str, Any]]]:
    """The units of one manifest task."""
    rows = manifest_rows(task, config)
    mark_job_collisions(rows, config)
    yield from cut_units(rows, done)
