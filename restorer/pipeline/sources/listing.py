"""A job's input as a whole: its layout, its listing tasks (each layout's own module makes
them), the units of a task, the outputs only the whole input tells (:func:`plan_outputs`), and
whether an older output's units are still this restorer's (:func:`refuse_older_units`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from restorer.errors import JobError, SpecError
from restorer.io import storage
from restorer.job.specs import RestoreSpec
from restorer.output.ledger import LEDGER_FORMAT_VERSION, ledger_format
from restorer.pipeline.sources import files, manifest, parquet
from restorer.pipeline.sources.claims import OutputClaims
from restorer.pipeline.sources.tasks import (
    MANIFEST_SUFFIXES,
    ListingTask,
    SourceConfig,
    flat_partitions,
    is_input,
)


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


LAYOUTS = {"files": files, "parquet": parquet, "manifest": manifest}  # each: tasks, expand


def listing_tasks(uri: str, config: SourceConfig) -> list[ListingTask]:
    """The listing tasks of an input (cheap: the top level, shard files, row-group counts)."""
    if config.layout not in LAYOUTS:
        raise SpecError(f"input.layout = {config.layout!r}; use auto, files, parquet or manifest")
    return LAYOUTS[config.layout].listing_tasks(uri, config)


def expand(task: ListingTask, config: SourceConfig,
           done: frozenset[str] = frozenset()) -> Iterator[list[dict[str, Any]]]:
    """The units of one listing task, in a stable order; units in ``done`` (committed) come
    through as one ``skipped`` marker row each."""
    yield from LAYOUTS[task.layout].expand(task, config, done)


def known_total(tasks: list[ListingTask]) -> int | None:
    """How many rows the tasks list, when that is known without listing (Parquet shards and
    manifests, from their footers); ``None`` for folders, prefixes and text manifests."""
    if tasks and all(t.row_group >= 0 for t in tasks):
        return sum(t.length for t in tasks)
    return None


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
        config = manifest.with_bucket_keys(tasks, config)
    layout = LAYOUTS[config.layout]
    claims = OutputClaims()
    try:
        for task in tasks:
            claims.tally(layout.planned_rows(task, config))
        collisions = tuple(claims.shared())
    finally:
        claims.close()
    return replace(config, collisions=collisions)


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
            count = sum(is_input(e.name, config) for page in storage.scan_folder(
                task.uri, config.options, config.page_size) for e in page if not e.is_dir)
            if flat_partitions(count, config.partition_keys) > 1:
                return (f"its units of a flat S3 prefix of more than {config.partition_keys} "
                        "objects were cut by hash partitions (this restorer cuts them from "
                        "the prefix's key order, as it lists)")
    return ""


def refuse_older_units(spec: RestoreSpec, tasks: list[ListingTask],
                       config: SourceConfig) -> None:
    """Refuse to resume an output of an older ledger format whose units this restorer would
    cut differently (:func:`units_changed`): resuming would redo (and count twice) committed
    images."""
    version = ledger_format(spec)
    if version is None or version >= LEDGER_FORMAT_VERSION:
        return
    why = units_changed(version, tasks, config)
    if why:
        raise JobError(f"{spec.output.uri} holds a job of ledger format {version}: {why}; "
                       "finish it with the restorer that started it, or pass --overwrite to "
                       "redo it")
