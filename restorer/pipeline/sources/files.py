"""The ``files`` layout: a folder or prefix, listed recursively. The driver reads only the top
level, page by page (:func:`storage.scan_folder`), counting its files and noting its folders; each
top-level folder is then listed by its own Ray task, so restoring starts while a huge tree is
still being listed (Ray's ``read_images`` expands every path in the driver first,
ray-project/ray#40686). All files of one sub-folder are listed by one task, which detects
output name collisions there. The files directly under the input (a *flat* folder or prefix,
possibly millions) are listed so that no task and not the driver ever holds all of them, and
names that would write one output (``a.png``/``A.bmp``: same lower-cased stem) are caught
across the whole folder:

- *Local folder*: ``os.scandir`` lists in no useful order, so the files are split into
  ``partitions`` by a hash of their lower-cased stem: each partition task pages through the
  folder keeping its share (at most about ``FLAT_PARTITION_KEYS`` files), sorts it and cuts
  it into units. Units do not depend on the listing order, and colliding names meet in one
  partition, where all of them fail.
- *S3 prefix*: ``ListObjectsV2`` gives keys in key order, the same order every time, so the
  prefix is one *stream* task whose units are consecutive runs of keys cut where
  :func:`.units.cut_units` cuts (the units of one sorted listing: those of ledger format 1, and of
  format 2 up to ``FLAT_PARTITION_KEYS`` keys). Rows flow on after the first page. The
  driver reads at most two pages: if the top level fits in one, its folders get their own
  tasks; if not, the stream task also lists each folder it meets (exactly as a folder task
  would: the same units), so that the driver never pages through the prefix. Key order does
  not group colliding names (``Photo.JPG`` and ``photo.png`` lie far apart: every key from
  ``Q`` to ``o`` may sort between them), and a unit boundary that no collision straddles
  cannot be proved without seeing every later key; so rows are not held back: each row's
  lower-cased output key is claimed in a table on the task's local disk
  (:class:`.claims.OutputClaims`, SQLite: memory bounded by its page cache, whatever the prefix
  holds), and a key whose output an earlier key already claimed fails with
  ``OutputCollision`` naming that key. The first key in key order wins; key order is fixed,
  so every rerun decides the same way. (Locally all colliding names fail: a partition is
  complete before any of its rows go.) Folders directly under the input whose names differ
  only in case (``Raw/``, ``raw/``) are listed by one task, which compares all their rows
  (it holds them at once: they are meant to be rare) and then cuts each folder's units as
  a task of its own would; deeper down (``a/Raw/``, ``a/raw/``) they are not compared, nor
  on S3 when the top level is longer than a page and the two names fall on different pages.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from restorer.errors import NotFoundError
from restorer.io import storage
from restorer.pipeline.sources.claims import OutputClaims
from restorer.pipeline.sources.tasks import (
    ListingTask,
    SourceConfig,
    flat_partitions,
    folder_listed,
    is_input,
    partition_of,
)
from restorer.pipeline.sources.units import (
    cut_units,
    ends_unit,
    input_row,
    mark_collisions,
    unit_rows,
)


def listing_tasks(uri: str, config: SourceConfig) -> list[ListingTask]:
    """The listing tasks of a folder or prefix (or of one image: its folder, that name only)."""
    options = config.options
    if not storage.is_dir(uri, options):
        if storage.is_file(uri, options):  # one image: its folder, listing only that name
            parent, _, name = uri.rstrip("/").rpartition("/")
            return [ListingTask("files", parent or ".", recursive=False, name=name)]
        where = ("check the path" if not storage.is_remote(uri) else
                 "check the bucket, prefix and credentials" + storage.CREDENTIALS_HINT)
        raise NotFoundError(f"Input {uri} does not exist ({where})")
    if storage.is_remote(uri):
        return _stream_tasks(uri, config)
    folders, files = [], 0
    for page in storage.scan_folder(uri, options, config.page_size):  # one page held at a time
        for entry in page:
            if entry.is_dir:
                if folder_listed(entry.name, config):
                    folders.append(entry.name)
            else:
                files += is_input(entry.name, config)
    partitions = flat_partitions(files, config.partition_keys)
    tasks = [ListingTask("files", uri, recursive=False, partition=p, partitions=partitions)
             for p in range(partitions if files else 0)]
    return tasks + _folder_tasks(uri, folders)


def _stream_tasks(uri: str, config: SourceConfig) -> list[ListingTask]:
    """An S3 prefix: one stream task for its files, after at most two pages of its top level
    (a flat prefix of millions of keys is not paged through before its first rows)."""
    pages = storage.scan_folder(uri, config.options, config.page_size)
    first, more = next(pages, []), next(pages, None)
    pages.close()
    if more is not None:  # the top level is longer than a page: the stream lists it all
        return [ListingTask("files", uri, recursive=False, stream=True, folders=True)]
    folders = [e.name for e in first if e.is_dir and folder_listed(e.name, config)]
    stream = ([ListingTask("files", uri, recursive=False, stream=True)]
              if any(not e.is_dir and is_input(e.name, config) for e in first) else [])
    return stream + _folder_tasks(uri, folders)


def _folder_tasks(uri: str, folders: Iterable[str]) -> list[ListingTask]:
    """One task per folder, except that folders whose names differ only in case (``Raw/``,
    ``raw/``) share one: the task of the first name lists the others too (``variants``)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(folders):
        groups.setdefault(name.lower(), []).append(name)
    return [ListingTask("files", storage.join(uri, names[0]), key_prefix=names[0] + "/",
                        variants=tuple(names[1:])) for names in groups.values()]


def _flat_entries(task: ListingTask, config: SourceConfig) -> list[storage.Entry]:
    """The files of one partition of a flat folder, sorted by key (one page held at a time
    while listing, then the partition's share)."""
    entries = []
    for page in storage.scan_folder(task.uri, config.options, config.page_size):
        for entry in page:
            if (not entry.is_dir and partition_of(entry.name, task.partitions) == task.partition
                    and is_input(entry.name, config)):
                size = entry.size
                if size < 0:
                    try:
                        size = os.stat(entry.uri).st_size
                    except OSError:
                        continue  # gone since it was listed
                entries.append(storage.Entry(entry.name, entry.uri, size))
    entries.sort(key=lambda e: e.key)
    return entries


def _stream(task: ListingTask, config: SourceConfig,
            done: frozenset[str]) -> Iterator[list[dict[str, Any]]]:
    """The units of an S3 prefix listed as one stream (see the module docstring): its files'
    units as their pages come (the units :func:`cut_units` cuts from the sorted listing) and,
    with ``task.folders``, each sub-folder's units, as its folder task would make them, when
    the listing meets it (a unit of files stays open meanwhile)."""
    claims = OutputClaims()
    unit: list[dict[str, Any]] = []
    try:
        for page in storage.scan_folder(task.uri, config.options, config.page_size):
            listed = [input_row(e.name, e.uri, config, e.size) for e in page
                      if not e.is_dir and is_input(e.name, config)]
            claims.claim(listed)
            for row in listed:
                unit.append(row)
                if ends_unit(row, len(unit)):
                    yield unit_rows(unit, done)
                    unit = []
            folders = [e.name for e in page
                       if e.is_dir and task.folders and folder_listed(e.name, config)]
            for folder in _folder_tasks(task.uri, folders):
                yield from expand(folder, config, done)
        if unit:
            yield unit_rows(unit, done)
    finally:
        claims.close()


def _folder_rows(task: ListingTask, config: SourceConfig) -> Iterator[list[dict[str, Any]]]:
    """The rows of a ``files`` task (not a stream), folder by folder (a flat partition: one
    list), collisions not yet marked."""
    walk = ([_flat_entries(task, config)] if task.partitions else
            storage.walk_files(task.uri, config.extensions, (), (), options=config.options,
                               recursive=task.recursive))
    for entries in walk:
        rows = []
        for entry in entries:
            key = task.key_prefix + entry.key
            if task.name and entry.key != task.name:
                continue
            if config.skip_prefix and key.startswith(config.skip_prefix):
                continue
            if storage.matches(key, config.include, config.exclude):
                rows.append(input_row(key, entry.uri, config, entry.size))
        yield rows


def expand(task: ListingTask, config: SourceConfig,
           done: frozenset[str] = frozenset()) -> Iterator[list[dict[str, Any]]]:
    """The units of one ``files`` task, in a stable order."""
    if task.stream:
        yield from _stream(task, config, done)
        return
    if task.variants:  # Raw/ and raw/: all their rows compared, then cut as before
        parent = task.uri[: len(task.uri) - len(task.key_prefix.rstrip("/"))]
        folders = [task] + [replace(
            task, uri=storage.join(parent, name), key_prefix=name + "/", variants=())
            for name in task.variants]
        chunks = [rows for folder in folders for rows in _folder_rows(folder, config)]
        mark_collisions([row for rows in chunks for row in rows])
        for rows in chunks:
            yield from cut_units(rows, done)
        return
    for rows in _folder_rows(task, config):
        mark_collisions(rows)
        yield from cut_units(rows, done)


@dataclass(frozen=True)
class InputCount:
    """What a walk of a ``files`` input found: the inputs it lists, and the files it leaves
    out because their extension is not an image's (``input.extensions``)."""

    inputs: int
    non_images: int  # files the job will not read (text, RAW, video, ...); hidden files aside
    non_image_examples: tuple[str, ...]  # the first few of them, by key


NON_IMAGE_EXAMPLES = 10


def count_listing(tasks: list[ListingTask], config: SourceConfig,
                  examples: int = NON_IMAGE_EXAMPLES) -> InputCount:
    """Count the inputs the listing tasks of a folder will list (the same filters as
    :func:`expand`, counting only), and the non-image files they skip (those the include /
    exclude globs keep but whose extension is not an image's). Costs one more walk of the
    tree: for progress totals and the summary."""
    extensions = tuple(e.lower() for e in config.extensions)
    inputs, skipped, names = 0, 0, []

    def tally(key: str) -> None:
        nonlocal inputs, skipped
        if config.skip_prefix and key.startswith(config.skip_prefix):
            return
        if not storage.matches(key, config.include, config.exclude):
            return
        if key.lower().endswith(extensions):
            inputs += 1
        else:
            skipped += 1
            if len(names) < examples:
                names.append(key)

    for task in tasks:
        if task.partitions:  # the flat folder, counted once (by its first partition)
            if task.partition == 0:
                for page in storage.scan_folder(task.uri, config.options, config.page_size):
                    for entry in page:
                        if not entry.is_dir:
                            tally(entry.name)
            continue
        for entries in storage.walk_files(task.uri, ("",), (), (), options=config.options,
                                          recursive=task.recursive):
            for entry in entries:
                if not task.name or entry.key == task.name:
                    tally(task.key_prefix + entry.key)
    return InputCount(inputs, skipped, tuple(sorted(names)))


def count_inputs(tasks: list[ListingTask], config: SourceConfig) -> int:
    """How many inputs the listing tasks of a folder will list (see :func:`count_listing`)."""
    return count_listing(tasks, config, examples=0).inputs
