"""Which rows claimed which outputs, for listings too large to hold: a SQLite table on the
task's local disk, its memory bounded by SQLite's page cache.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any


class OutputClaims:
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
