"""Where a restore job's inputs come from, and how they become rows in work units.

Three layouts, one row shape (``key``, ``uri`` or inline ``data``, ``unit``, ``unit_size``),
each in its own module: ``files`` (a folder or an S3 prefix), ``parquet`` (shards of encoded
images), ``manifest`` (a list of URIs). They share the pieces of listing work (``tasks``), the
unit rules (``units``: stable ids, collisions, skipped units) and, for listings too large to
hold, a table of claimed outputs on local disk (``claims``). ``listing`` puts them together:
the layout of an input, its tasks, the units of a task, the outputs only the whole input
tells, and whether an older output's units are this restorer's.

Modules: ``tasks`` < ``units``, ``claims`` < ``files``, ``parquet``, ``manifest`` < ``listing``.
"""

from restorer import faces

HOMES = {
    "ListingTask": "tasks",
    "SourceConfig": "tasks",
    "MANIFEST_CHUNK_ROWS": "tasks",
    "SHARD_CHUNK_ROWS": "tasks",
    "UNIT_MAX_KEYS": "tasks",
    "FLAT_PARTITION_KEYS": "tasks",
    "flat_partitions": "tasks",
    "partition_of": "tasks",
    "output_key": "units",
    "count_listing": "files",
    "count_inputs": "files",
    "InputCount": "files",
    "detect_layout": "listing",
    "listing_tasks": "listing",
    "expand": "listing",
    "known_total": "listing",
    "plan_outputs": "listing",
    "units_changed": "listing",
    "refuse_older_units": "listing",
}
__getattr__ = faces(__name__, HOMES)
__all__ = sorted(HOMES)
