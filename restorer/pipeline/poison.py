"""Poison isolation: an image that kills its restore actor's process is quarantined alone.

A process can die on one image without any Python exception to catch: the OOM killer, a
fatal CUDA fault (:meth:`restorer.pipeline.actor.RestoreActor._survive` ends the process on those on
purpose), a crash in native code. Ray then restarts the actor and retries its batch (the
actor pool's ``max_restarts``, bounded here and set in :mod:`restorer.pipeline.graph`).
Retrying the whole batch would kill it again, for ever; so each batch is announced to a
:class:`PoisonRegistry` (one small actor per job, on the driver's node) before it is
restored:

1. First attempt: the batch is restored as usual; at its end the registry forgets it.
2. The registry already knew the batch: its first attempt died. The batch is restored image
   by image, each one announced before it starts.
3. Known again, with an image announced and never finished: that image killed the process
   alone. It becomes a ``failed`` record (``WorkerDiedError``, naming the process and node
   that died) and the rest of the batch goes on, image by image.

So one killing image costs two restarts, and its batch's other images are restored. The
registry holds only the batches in flight (a finished batch is forgotten). It also holds how
far each of them is (the share of its tiles restored, in images): the driver's progress moves
image by image while a batch is restored, not only when the batch comes back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from restorer.errors import PERMANENT, RestorerError
from restorer.output.records import RESTORED_SCHEMA, fail, to_rows, to_table
from restorer.pipeline.actor import RestoreActor

log = logging.getLogger(__name__)

ACTOR_MAX_RESTARTS = 64  # restarts of one restore actor over a job (Ray Data's default: for
# ever): each killing image costs two, so an actor outlives 32 of them, not a device that kills
# every batch
ACTOR_MAX_TASK_RETRIES = -1  # a batch is retried while its actor can restart: after a death it
# goes image by image and each further death quarantines one more image, so the retries of one
# batch end by themselves; a finite count here fails a batch whose node was lost (a call to an
# actor that is not reachable yet counts as a retry: seen with 4 in tests/test_multinode.py)

PROGRESS_SECONDS = 0.5  # an actor tells the registry how far its batch is at most this often


class WorkerDiedError(RestorerError):
    """The restore actor's process died while restoring this one image alone."""


class PoisonRegistry:
    """The batches in flight and, for a batch whose actor died, the image it was restoring
    alone (a Ray actor, created by the driver; see the module docstring)."""

    def __init__(self) -> None:
        self._batches: dict[str, dict[str, Any]] = {}

    def begin(self, batch: str) -> dict[str, Any] | None:
        """Announce an attempt at ``batch``: None for a first attempt, else what the earlier
        attempts left (``deaths``, ``killers``: key -> where it killed its process)."""
        state = self._batches.get(batch)
        if state is None:
            self._batches[batch] = {"deaths": 0, "current": None, "killers": {}, "restored": 0}
            return None
        state["deaths"] += 1
        state["restored"] = 0  # a new attempt restores them again
        if state["current"] is not None:
            key, where = state["current"]
            state["killers"][key] = where
            state["current"] = None
        return {"deaths": state["deaths"], "killers": dict(state["killers"])}

    def mark(self, batch: str, key: str, where: str) -> None:
        """``key`` of ``batch`` is being restored alone by the process ``where``."""
        self._batches[batch]["current"] = (key, where)

    def restored(self, batch: str, images: int) -> None:
        """``images`` of ``batch`` are restored (its attempt goes on)."""
        if batch in self._batches:
            self._batches[batch]["restored"] = images

    def end(self, batch: str) -> None:
        self._batches.pop(batch, None)

    def in_flight(self) -> int:
        return len(self._batches)

    def restored_in_flight(self) -> int:
        """Images restored in the batches not ended yet (their records are not on their way)."""
        return sum(state["restored"] for state in self._batches.values())


class IsolatingRestoreActor(RestoreActor):
    """:class:`RestoreActor` whose batches are announced to a :class:`PoisonRegistry`, so that
    a batch whose process died is retried image by image and a killing image quarantined."""

    def __init__(self, registry: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._registry = registry

    def __call__(self, batch):
        if self._registry is None or not isinstance(batch, pa.Table):
            return super().__call__(batch)
        import ray

        keys = batch.column("key").to_pylist()
        statuses = batch.column("status").to_pylist()
        if "decoded" not in statuses:
            return super().__call__(batch)
        batch_id = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]
        try:
            earlier = ray.get(self._registry.begin.remote(batch_id))
        except Exception as e:  # noqa: BLE001 - no registry: restore without isolation
            log.warning("the poison registry did not answer (%s: %s); restoring this batch "
                        "without isolation", type(e).__name__, e)
            return super().__call__(batch)
        if earlier is None:
            self.on_progress = self._reporter(batch_id, statuses.count("decoded"))
            try:
                result = super().__call__(batch)
            finally:
                self.on_progress = None
        else:
            log.warning("a restore process died on a batch of %d images (%d deaths): "
                        "restoring it image by image", len(keys), earlier["deaths"])
            result = self._one_by_one(batch, batch_id, earlier)
        self._registry.end.remote(batch_id)
        return result

    def _reporter(self, batch_id: str, images: int) -> Callable[[float], None]:
        """Tells the registry how many of the batch's ``images`` are restored, from the share
        of its tiles done; at most every :data:`PROGRESS_SECONDS` (one small call, not
        awaited)."""
        last = [time.monotonic(), 0]

        def report(share: float) -> None:
            now, done = time.monotonic(), int(share * images)
            if done > last[1] and (now - last[0] >= PROGRESS_SECONDS or done == images):
                last[:] = [now, done]
                self._registry.restored.remote(batch_id, done)

        return report

    def _one_by_one(self, batch: pa.Table, batch_id: str, earlier: dict[str, Any]) -> pa.Table:
        import ray

        where = f"pid {os.getpid()} on {socket.gethostname()}"
        parts = []
        for index in range(batch.num_rows):
            row = batch.slice(index, 1)
            key = row.column("key")[0].as_py()
            if row.column("status")[0].as_py() != "decoded":
                parts.append(super().__call__(row))
                continue
            if key in earlier["killers"]:
                parts.append(self._quarantined(row, earlier["killers"][key], earlier["deaths"]))
                continue
            ray.get(self._registry.mark.remote(batch_id, key, where))
            parts.append(super().__call__(row))
        return pa.concat_tables(parts)

    @staticmethod
    def _quarantined(row: pa.Table, where: str, deaths: int) -> pa.Table:
        rows = to_rows(row)
        log.error("%s killed its restore process (%s) when restored alone: quarantined",
                  rows[0]["key"], where)
        fail(rows[0], "restore", WorkerDiedError(
            f"the restore process ({where}) died while restoring {rows[0]['key']} alone, after "
            f"its batch had killed a process too ({deaths} deaths in all): the out-of-memory "
            "killer, a fatal device fault or a crash in native code (see that worker's log); "
            "quarantined alone, the other images of its batch were restored"), PERMANENT)
        rows[0]["pixels"] = rows[0]["alpha"] = b""
        return to_table(rows, RESTORED_SCHEMA)
