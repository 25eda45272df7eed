"""How listed rows become work units.

A *work unit* is up to 64 consecutive rows of one listing task (folder, flat partition or S3
stream, row group or text file); its id depends only on its keys, so a rerun over the same
input makes the same units. Units that the output's ledger already holds are not expanded
again: they come through as one ``skipped`` marker row, so the driver can count them without
the job holding every key.

Rows of every layout have one shape (``key``, ``uri`` or inline ``data``, ``out_key``,
``format``, ``status``..., then ``unit``, ``unit_size``): :func:`input_row` makes one, naming
its output (:func:`output_key`) or failing it at ``plan`` for a hostile key; two rows that
would write one output fail with ``OutputCollision`` (:func:`mark_collisions`, or
:func:`mark_job_collisions` with what :func:`restorer.pipeline.sources.listing.plan_outputs`
found across chunks).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

from restorer.errors import StorageError
from restorer.io import codec, storage
from restorer.pipeline.sources.tasks import UNIT_BOUNDARY_MODULUS, UNIT_MAX_KEYS, SourceConfig


def unit_id(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]


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


def input_row(key: str, uri: str, config: SourceConfig, size: int = 0, data: bytes = b"") -> dict:
    row = {"key": key, "uri": uri, "data": data, "size": size or len(data), "status": "",
           "stage": "", "error_class": "", "message": "", "out_key": "", "format": ""}
    try:
        storage.check_key(key)
        row["out_key"], row["format"] = output_key(key, config.output_format)
    except (StorageError, ValueError) as e:
        row.update(status="failed", stage="plan", error_class=type(e).__name__, message=str(e))
    return row


def cut_units(rows: Iterable[dict[str, Any]],
           done: frozenset[str]) -> Iterator[list[dict[str, Any]]]:
    """Cut ``rows`` into units; a unit ends after
    ``UNIT_MAX_KEYS`` rows or after a key whose crc32 is 0 modulo ``UNIT_BOUNDARY_MODULUS``.
    A committed unit becomes one ``skipped`` marker row."""
    unit: list[dict[str, Any]] = []
    for row in rows:
        unit.append(row)
        if ends_unit(row, len(unit)):
            yield unit_rows(unit, done)
            unit = []
    if unit:
        yield unit_rows(unit, done)


def ends_unit(row: dict[str, Any], size: int) -> bool:
    return (size >= UNIT_MAX_KEYS
            or zlib.crc32(row["key"].encode()) % UNIT_BOUNDARY_MODULUS == 0)


def unit_rows(rows: list[dict[str, Any]], done: frozenset[str]) -> list[dict[str, Any]]:
    unit = unit_id([r["key"] for r in rows])
    if unit in done:
        return [{"key": "", "uri": "", "data": b"", "size": 0, "status": "skipped",
                 "stage": "", "error_class": "", "message": "", "out_key": "",
                 "format": "", "unit": unit, "unit_size": len(rows)}]
    for r in rows:
        r["unit"], r["unit_size"] = unit, len(rows)
    return rows


def truncate_unit(unit: list[dict[str, Any]], count: int,
                   done: frozenset[str]) -> list[dict[str, Any]]:
    """The first ``count`` rows of a unit, as a unit of their own (``--limit``), or its
    ``skipped`` marker row when an earlier run with the same limit committed it."""
    rows = [r for r in unit if r["status"] != "skipped"][:count]
    short = unit_id([r["key"] for r in rows])
    if rows and short in done:
        return [dict(rows[0], key="", uri="", data=b"", size=0, out_key="", format="",
                     status="skipped", unit=short, unit_size=len(rows))]
    for r in rows:
        r["unit"], r["unit_size"] = short, len(rows)
    return rows


def mark_collisions(rows: list[dict[str, Any]]) -> None:
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


def mark_job_collisions(rows: list[dict[str, Any]], config: SourceConfig) -> None:
    """Fail the rows whose output another row of the job writes too (found by
    :func:`plan_outputs`); without its findings, compare the rows of this chunk."""
    if not config.collisions:
        mark_collisions(rows)
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
