"""Where a restore job's inputs come from, and how they become rows in work units.

Three layouts, one row shape (``key``, ``uri`` or inline ``data``, ``unit``, ``unit_size``):

- ``files``: a folder or prefix, listed recursively. The driver reads only the top level, page
  by page (:func:`storage.scan_folder`), counting its files and noting its folders; each
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
    :func:`_units` cuts (the units of one sorted listing: those of ledger format 1, and of
    format 2 up to ``FLAT_PARTITION_KEYS`` keys). Rows flow on after the first page. The
    driver reads at most two pages: if the top level fits in one, its folders get their own
    tasks; if not, the stream task also lists each folder it meets (exactly as a folder task
    would: the same units), so that the driver never pages through the prefix. Key order does
    not group colliding names (``Photo.JPG`` and ``photo.png`` lie far apart: every key from
    ``Q`` to ``o`` may sort between them), and a unit boundary that no collision straddles
    cannot be proved without seeing every later key; so rows are not held back: each row's
    lower-cased output key is claimed in a table on the task's local disk
    (:class:`_OutputClaims`, SQLite: memory bounded by its page cache, whatever the prefix
    holds), and a key whose output an earlier key already claimed fails with
    ``OutputCollision`` naming that key. The first key in key order wins; key order is fixed,
    so every rerun decides the same way. (Locally all colliding names fail: a partition is
    complete before any of its rows go.) Folders directly under the input whose names differ
    only in case (``Raw/``, ``raw/``) are listed by one task, which compares all their rows
    (it holds them at once: they are meant to be rare) and then cuts each folder's units as
    a task of its own would; deeper down (``a/Raw/``, ``a/raw/``) they are not compared, nor
    on S3 when the top level is longer than a page and the two names fall on different pages.
- ``parquet``: shards of encoded images (``*.parquet`` under the prefix) with a key column and a
  bytes column; one task per row group.
- ``manifest``: a Parquet file with a ``uri`` column (and optional ``key`` column) read one row
  group per task, or a text file with one URI per line. The default key is the URI's path after
  the bucket (or after the leading ``/`` of a local path); when the URIs span buckets it keeps
  the bucket (``s3://a/x.png`` -> ``a/x.png``), so that two buckets' ``x.png`` stay apart.

Shards and manifests are listed in chunks (``SHARD_CHUNK_ROWS``, ``MANIFEST_CHUNK_ROWS``) by
separate tasks, so no task sees every row: before the job starts, :func:`plan_outputs` reads
their key (and uri) columns once in the driver, tallies every row's output in an SQLite table
on local disk (:class:`_OutputClaims`: memory bounded by its page cache) and hands the outputs
that two or more rows would write to the listing tasks (:attr:`SourceConfig.collisions`): every
one of those rows fails with ``OutputCollision``, wherever the chunks cut.

A *work unit* is up to 64 consecutive rows of one listing task (folder, flat partition or S3
stream, row group or text file); its id depends only on its keys, so a rerun over the same input makes the same units.
Units that the output's ledger already holds are not expanded again: they come through as one
``skipped`` marker row, so the driver can count them without the job holding every key.

Size: the three input layouts share the unit rules (stable ids, collisions, skipped units);
apart they would repeat them.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import sqlite3
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pyarrow.parquet as pq

from restorer import codec, storage
from restorer.errors import NotFoundError, SpecError, StorageError

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


def detect_layout(uri: str, layout: str, options: storage.StorageOptions) -> str:
    """``auto`` -> ``manifest`` for a single manifest file, ``parquet`` for a prefix holding
    ``.parquet`` files at its top, else ``files``."""
    if layout != "auto":
        return layout
    if uri.lower().endswith(MANIFEST_SUFFIXES) and not storage.is_dir(uri, options):
        return "manifest"
    # The first page only (a flat prefix may hold millions of objects): shards sit at the top.
    first = next(storage.scan_folder(uri, options), [])
    if any(not e.is_dir and e.name.lower().endswith(".parquet") for e in first):
        return "parquet"
    return "files"


def listing_tasks(uri: str, config: SourceConfig) -> list[ListingTask]:
    """The listing tasks of an input (cheap: the top level, shard files, row-group counts)."""
    options = config.options
    if config.layout == "manifest":
        if uri.lower().endswith(".parquet"):
            return _chunked("manifest", uri, _row_groups(uri, options), MANIFEST_CHUNK_ROWS)
        return [ListingTask("manifest", uri)]
    if config.layout == "parquet":
        shards = sorted(n for n in storage.list_names(uri, options) if n.endswith(".parquet"))
        if not shards:
            raise StorageError(f"No .parquet shards under {uri}")
        tasks = []
        for name in shards:
            shard = storage.join(uri, name)
            tasks.extend(_chunked("parquet", shard, _row_groups(shard, options),
                                  SHARD_CHUNK_ROWS))
        return tasks
    if config.layout != "files":
        raise SpecError(f"input.layout = {config.layout!r}; use auto, files, parquet or manifest")
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
                if _folder_listed(entry.name, config):
                    folders.append(entry.name)
            else:
                files += _listed(entry.name, config)
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
    folders = [e.name for e in first if e.is_dir and _folder_listed(e.name, config)]
    stream = ([ListingTask("files", uri, recursive=False, stream=True)]
              if any(not e.is_dir and _listed(e.name, config) for e in first) else [])
    return stream + _folder_tasks(uri, folders)


def _folder_tasks(uri: str, folders: Iterable[str]) -> list[ListingTask]:
    """One task per folder, except that folders whose names differ only in case (``Raw/``,
    ``raw/``) share one: the task of the first name lists the others too (``variants``)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(folders):
        groups.setdefault(name.lower(), []).append(name)
    return [ListingTask("files", storage.join(uri, names[0]), key_prefix=names[0] + "/",
                        variants=tuple(names[1:])) for names in groups.values()]


def _folder_listed(name: str, config: SourceConfig) -> bool:
    """Whether a folder directly under the input is listed (not ours, not the output)."""
    return name != storage.META_DIR and config.skip_prefix != name + "/"


def flat_partitions(files: int, partition_keys: int = FLAT_PARTITION_KEYS) -> int:
    """Partitions of a flat folder of ``files`` files: the least power of two that gives each
    at most ``partition_keys`` files on average (1 up to ``partition_keys``)."""
    if partition_keys < 1:
        raise ValueError(f"partition_keys = {partition_keys}; need 1 or more")
    return 1 << max(0, math.ceil(math.log2(max(1, math.ceil(files / partition_keys)))))


def units_changed(version: int, tasks: list[ListingTask], config: SourceConfig) -> str:
    """Why an output of ledger format ``version`` holds units other than those ``tasks`` make
    ("" when they are the same). Format 1 cut a flat folder or prefix as one sorted listing;
    format 2 cut one of more than ``partition_keys`` files by hash partitions; format 3 cuts
    a local folder by partitions (as format 2) and an S3 prefix as one sorted listing (as
    format 1). Only a format 2 output read from a flat S3 prefix costs a pass over the prefix
    here, counting (what every format 2 run did), once: the resume upgrades it to format 3.
    Format 4 keeps the bucket in the default keys of a manifest whose URIs span buckets."""
    if version < 4 and config.bucket_keys:
        return ("its manifest's URIs span buckets, and its keys dropped the bucket (this "
                "restorer keeps it, so that two buckets' objects never write one output)")
    if version < 2 and any(t.partitions > 1 for t in tasks):
        return (f"its units of a flat folder of more than {config.partition_keys} files were "
                "cut from one sorted listing (this restorer cuts them by hash partitions)")
    if version == 2:
        for task in (t for t in tasks if t.stream):
            files = sum(_listed(e.name, config) for page in storage.scan_folder(
                task.uri, config.options, config.page_size) for e in page if not e.is_dir)
            if flat_partitions(files, config.partition_keys) > 1:
                return (f"its units of a flat S3 prefix of more than {config.partition_keys} "
                        "objects were cut by hash partitions (this restorer cuts them from "
                        "the prefix's key order, as it lists)")
    return ""


def partition_of(name: str, partitions: int) -> int:
    """The partition of a file ``name`` of a flat folder: a hash of its lower-cased stem, so
    that names which would write one output (``a.PNG``, ``a.bmp``) share a partition."""
    stem = (name.rpartition(".")[0] or name).lower()
    return zlib.crc32(stem.encode()) % partitions if partitions > 1 else 0


def _listed(name: str, config: SourceConfig) -> bool:
    """Whether a file directly under the input is an input (the filters of :func:`expand`)."""
    return (name.lower().endswith(tuple(e.lower() for e in config.extensions))
            and not (config.skip_prefix and name.startswith(config.skip_prefix))
            and storage.matches(name, config.include, config.exclude))


def _flat_entries(task: ListingTask, config: SourceConfig) -> list[storage.Entry]:
    """The files of one partition of a flat folder, sorted by key (one page held at a time
    while listing, then the partition's share)."""
    entries = []
    for page in storage.scan_folder(task.uri, config.options, config.page_size):
        for entry in page:
            if (not entry.is_dir and partition_of(entry.name, task.partitions) == task.partition
                    and _listed(entry.name, config)):
                size = entry.size
                if size < 0:
                    try:
                        size = os.stat(entry.uri).st_size
                    except OSError:
                        continue  # gone since it was listed
                entries.append(storage.Entry(entry.name, entry.uri, size))
    entries.sort(key=lambda e: e.key)
    return entries


def _chunked(layout: str, uri: str, row_counts: list[int], chunk: int) -> list[ListingTask]:
    """Tasks of at most ``chunk`` rows, so that no task emits one huge block of rows."""
    return [ListingTask(layout, uri, row_group=group, offset=offset,
                        length=min(chunk, rows - offset))
            for group, rows in enumerate(row_counts) for offset in range(0, rows, chunk)]


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


def known_total(tasks: list[ListingTask]) -> int | None:
    """How many rows the tasks list, when that is known without listing (Parquet shards and
    manifests, from their footers); ``None`` for folders, prefixes and text manifests."""
    if tasks and all(t.row_group >= 0 for t in tasks):
        return sum(t.length for t in tasks)
    return None


def _row_groups(uri: str, options: storage.StorageOptions) -> list[int]:
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


def _unit_id(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]


def _mark_collisions(rows: list[dict[str, Any]]) -> None:
    targets: dict[str, list[str]] = {}
    for row in rows:
        if row["status"] != "failed":
            targets.setdefault(row["out_key"].lower(), []).append(row["key"])
    for row in rows:
        others = targets.get(row["out_key"].lower(), [])
        if len(others) > 1:
            row.update(status="failed", stage="plan", error_class="OutputCollision",
                       message=f"inputs {others} would all be written to {row['out_key']!r} "
                               "(names differ only in extension or case); rename them or "
                               "choose another --format")


def output_key(key: str, requested_format: str) -> tuple[str, str]:
    """(output key, output format) for an input key: same folder and stem, format's extension.

    With format ``same`` an input keeps its extension (``a.JPEG`` stays ``a.JPEG``), except GIF
    and BMP, which become PNG.
    """
    source = codec.format_from_name(key)
    fmt = codec.output_format(source, requested_format)
    if requested_format == "same" and source not in ("GIF", "BMP"):
        return key, fmt
    stem = key.rpartition(".")[0] or key
    return stem + codec.EXTENSIONS[fmt], fmt


def _row(key: str, uri: str, config: SourceConfig, size: int = 0, data: bytes = b"") -> dict:
    row = {"key": key, "uri": uri, "data": data, "size": size or len(data), "status": "",
           "stage": "", "error_class": "", "message": "", "out_key": "", "format": ""}
    try:
        storage.check_key(key)
        row["out_key"], row["format"] = output_key(key, config.output_format)
    except (StorageError, ValueError) as e:
        row.update(status="failed", stage="plan", error_class=type(e).__name__, message=str(e))
    return row


def _units(rows: Iterable[dict[str, Any]],
           done: frozenset[str]) -> Iterator[list[dict[str, Any]]]:
    """Cut ``rows`` into units; a unit ends after
    ``UNIT_MAX_KEYS`` rows or after a key whose crc32 is 0 modulo ``UNIT_BOUNDARY_MODULUS``.
    A committed unit becomes one ``skipped`` marker row."""
    unit: list[dict[str, Any]] = []
    for row in rows:
        unit.append(row)
        if _ends_unit(row, len(unit)):
            yield _unit(unit, done)
            unit = []
    if unit:
        yield _unit(unit, done)


def _ends_unit(row: dict[str, Any], size: int) -> bool:
    return (size >= UNIT_MAX_KEYS
            or zlib.crc32(row["key"].encode()) % UNIT_BOUNDARY_MODULUS == 0)


def _unit(rows: list[dict[str, Any]], done: frozenset[str]) -> list[dict[str, Any]]:
    unit_id = _unit_id([r["key"] for r in rows])
    if unit_id in done:
        return [{"key": "", "uri": "", "data": b"", "size": 0, "status": "skipped",
                 "stage": "", "error_class": "", "message": "", "out_key": "",
                 "format": "", "unit": unit_id, "unit_size": len(rows)}]
    for r in rows:
        r["unit"], r["unit_size"] = unit_id, len(rows)
    return rows


class _OutputClaims:
    """The outputs (lower-cased output keys) that earlier rows of a stream claimed, and by
    which key: a SQLite table in a temporary folder of the task, so its memory stays within
    SQLite's page cache however many keys the stream lists."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="restorer-claims-")
        self._db = sqlite3.connect(os.path.join(self._folder.name, "claims.sqlite"))
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "cache_size = -16384"):
            self._db.execute(f"PRAGMA {pragma}")  # a scratch table: no journal, 16 MiB cache
        self._db.execute("CREATE TABLE claims (target TEXT PRIMARY KEY, key TEXT NOT NULL) "
                         "WITHOUT ROWID")
        self._tallying = False

    def close(self) -> None:
        self._db.close()
        self._folder.cleanup()

    def claim(self, rows: list[dict[str, Any]]) -> None:
        """Claim the outputs of ``rows`` (in order); a row whose output an earlier row
        claimed fails with ``OutputCollision``."""
        live = [r for r in rows if r["status"] != "failed"]
        targets = list({r["out_key"].lower() for r in live})
        owners: dict[str, str] = {}
        for start in range(0, len(targets), 500):  # SQLite's bound on ? parameters
            chunk = targets[start:start + 500]
            owners.update(self._db.execute(
                f"SELECT target, key FROM claims WHERE target IN ({','.join('?' * len(chunk))})",
                chunk))
        claimed: dict[str, str] = {}
        for row in live:
            target = row["out_key"].lower()
            owner = owners.get(target) or claimed.get(target)
            if owner is None:
                claimed[target] = row["key"]
                continue
            row.update(status="failed", stage="plan", error_class="OutputCollision",
                       message=f"input {row['key']!r} would be written to {row['out_key']!r}, "
                               f"which {owner!r} (listed before it) writes (names differ only "
                               "in extension or case); rename it or choose another --format")
        self._db.executemany("INSERT INTO claims VALUES (?, ?)", claimed.items())

    def tally(self, rows: Iterable[dict[str, Any]]) -> None:
        """Count the outputs of ``rows`` (all of them, in a table of their own: every row that
        shares an output is wanted, not only the later ones; see :meth:`shared`)."""
        if not self._tallying:
            self._db.execute("CREATE TABLE outputs (target TEXT NOT NULL, key TEXT NOT NULL)")
            self._tallying = True
        self._db.executemany("INSERT INTO outputs VALUES (?, ?)",
                             ((r["out_key"].lower(), r["key"]) for r in rows
                              if r["status"] != "failed"))

    def shared(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """(lower-cased output, the keys of every row that would write it) for each output
        tallied more than once, in output order (one sort on disk)."""
        if not self._tallying:
            return
        self._db.execute("CREATE INDEX outputs_target ON outputs (target)")
        cursor = self._db.execute(
            "SELECT target, key FROM outputs WHERE target IN (SELECT target FROM outputs "
            "GROUP BY target HAVING count(*) > 1) ORDER BY target, rowid")
        target, keys = None, []
        for found, key in cursor:
            if found != target and keys:
                yield target, tuple(keys)
                keys = []
            target = found
            keys.append(key)
        if keys:
            yield target, tuple(keys)


def _stream(task: ListingTask, config: SourceConfig,
            done: frozenset[str]) -> Iterator[list[dict[str, Any]]]:
    """The units of an S3 prefix listed as one stream (see the module docstring): its files'
    units as their pages come (the units :func:`_units` cuts from the sorted listing) and,
    with ``task.folders``, each sub-folder's units, as its folder task would make them, when
    the listing meets it (a unit of files stays open meanwhile)."""
    claims = _OutputClaims()
    unit: list[dict[str, Any]] = []
    try:
        for page in storage.scan_folder(task.uri, config.options, config.page_size):
            listed = [_row(e.name, e.uri, config, e.size) for e in page
                      if not e.is_dir and _listed(e.name, config)]
            claims.claim(listed)
            for row in listed:
                unit.append(row)
                if _ends_unit(row, len(unit)):
                    yield _unit(unit, done)
                    unit = []
            folders = [e.name for e in page
                       if e.is_dir and task.folders and _folder_listed(e.name, config)]
            for folder in _folder_tasks(task.uri, folders):
                yield from expand(folder, config, done)
        if unit:
            yield _unit(unit, done)
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
                rows.append(_row(key, entry.uri, config, entry.size))
        yield rows


def _slice(table, task: ListingTask):
    return table.slice(task.offset, task.length or None)


def _manifest_key(uri: str, bucket: bool = False) -> str:
    """A manifest row's default key: the URI's path after the bucket (``bucket``: with it),
    or a local path without its leading ``/``."""
    if "://" in uri:
        path = uri.split("://", 1)[1]
        return path if bucket else (path.split("/", 1)[1] if "/" in path else path)
    return uri.lstrip("/")


def _bucket_of(uri: str) -> str:
    """The scheme and bucket of a URI ("" for a local path)."""
    if "://" not in uri:
        return ""
    scheme, path = uri.split("://", 1)
    return f"{scheme}://{path.split('/', 1)[0]}"


def _manifest_entries(task: ListingTask, config: SourceConfig
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
            table = _slice(parquet.read_row_group(task.row_group, columns=columns), task)
        uris = [u or "" for u in table.column(config.uri_column).to_pylist()]
        keys = (table.column(config.key_column).to_pylist() if config.key_column in columns
                else [None] * len(uris))
        return uris, keys
    lines = storage.read_bytes(task.uri, config.options).decode("utf-8").splitlines()
    uris = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return uris, [None] * len(uris)


def _manifest_rows(task: ListingTask, config: SourceConfig) -> list[dict[str, Any]]:
    uris, keys = _manifest_entries(task, config)
    return [_row(key if key is not None else _manifest_key(uri, config.bucket_keys), uri, config)
            for uri, key in zip(uris, keys)]


def _shard_keys(task: ListingTask, config: SourceConfig) -> list[str]:
    """The key column of one shard task's rows (the bytes are not read)."""
    fs, path = storage.filesystem(task.uri, config.options)
    with fs.open(path, "rb") as f:
        table = _slice(pq.ParquetFile(f).read_row_group(task.row_group,
                                                        columns=[config.key_column]), task)
    return [key or "" for key in table.column(config.key_column).to_pylist()]


def plan_outputs(tasks: list[ListingTask], config: SourceConfig) -> SourceConfig:
    """``config`` with what only the whole input tells (shards and manifests, whose rows are
    listed in chunks by separate tasks): :attr:`SourceConfig.bucket_keys` (a manifest whose
    URIs span buckets) and :attr:`SourceConfig.collisions` (every output that two or more rows
    would write, wherever the chunks cut them). Reads the key and uri columns once, in the
    driver; the outputs are tallied in SQLite on local disk, so memory stays bounded however
    many rows the input has (only the colliding rows' keys are held). Folders and prefixes
    are returned as they are: their listing tasks cannot write one output from two tasks
    (see the module docstring)."""
    if config.layout not in ("manifest", "parquet"):
        return config
    if config.layout == "manifest":
        buckets: set[str] = set()
        for task in tasks:
            uris, keys = _manifest_entries(task, config)
            buckets.update(_bucket_of(u) for u, k in zip(uris, keys) if k is None)
            if len(buckets) > 1:
                config = replace(config, bucket_keys=True)
                break
    claims = _OutputClaims()
    try:
        for task in tasks:
            if task.layout == "manifest":
                claims.tally(_manifest_rows(task, config))
            else:
                claims.tally(_row(key, "", config) for key in _shard_keys(task, config))
        collisions = tuple(claims.shared())
    finally:
        claims.close()
    return replace(config, collisions=collisions)


def _mark_job_collisions(rows: list[dict[str, Any]], config: SourceConfig) -> None:
    """Fail the rows whose output another row of the job writes too (found by
    :func:`plan_outputs`); without its findings, compare the rows of this chunk."""
    if not config.collisions:
        _mark_collisions(rows)
        return
    shared = dict(config.collisions)
    for row in rows:
        keys = shared.get(row["out_key"].lower()) if row["status"] != "failed" else None
        if keys:
            named = list(keys[:8]) + ([f"... {len(keys) - 8} more"] if len(keys) > 8 else [])
            row.update(status="failed", stage="plan", error_class="OutputCollision",
                       message=f"inputs {named} would all be written to {row['out_key']!r} "
                               "(the same key, or names that differ only in extension or "
                               "case); give them distinct keys, or choose another --format")


def expand(task: ListingTask, config: SourceConfig,
           done: frozenset[str] = frozenset()) -> Iterator[list[dict[str, Any]]]:
    """The units of one listing task, in a stable order."""
    options = config.options
    if task.layout == "files" and task.stream:
        yield from _stream(task, config, done)
        return
    if task.layout == "files":
        if task.variants:  # Raw/ and raw/: all their rows compared, then cut as before
            parent = task.uri[: len(task.uri) - len(task.key_prefix.rstrip("/"))]
            folders = [task] + [replace(
                task, uri=storage.join(parent, name), key_prefix=name + "/", variants=())
                for name in task.variants]
            chunks = [rows for folder in folders for rows in _folder_rows(folder, config)]
            _mark_collisions([row for rows in chunks for row in rows])
            for rows in chunks:
                yield from _units(rows, done)
            return
        for rows in _folder_rows(task, config):
            _mark_collisions(rows)
            yield from _units(rows, done)
        return
    if task.layout == "parquet":
        fs, path = storage.filesystem(task.uri, options)
        with fs.open(path, "rb") as f:
            table = _slice(pq.ParquetFile(f).read_row_group(
                task.row_group, columns=[config.key_column, config.bytes_column]), task)
        shard = posixpath.basename(task.uri)
        rows = [_row(key or "", f"{shard}#{task.offset + index}", config, data=data or b"")
                for index, (key, data) in enumerate(zip(
                    table.column(config.key_column).to_pylist(),
                    table.column(config.bytes_column).to_pylist()))]
        _mark_job_collisions(rows, config)
        yield from _units(rows, done)
        return
    # manifest
    rows = _manifest_rows(task, config)
    _mark_job_collisions(rows, config)
    yield from _units(rows, done)
