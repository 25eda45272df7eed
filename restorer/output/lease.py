"""One job per output: a fenced lease on ``OUTPUT/_restorer/lease.json``, taken before anything
is written, kept alive by a heartbeat and checked before every unit commit.

**Generations.** Each taking of the lease is a *generation* ``N``, claimed by a create-only
write of ``_restorer/lease-generations/<N>.json`` (a local hard link; a conditional PUT on S3,
see :func:`restorer.io.storage.write_bytes`): of two jobs claiming the same generation exactly one
succeeds, so a takeover is race-free, and generations only grow. The highest generation holds
the output; ``lease.json`` is its live record: holder (job id, host, pid, start), generation
and a ``heartbeat`` time that a background thread renews every ``heartbeat_seconds``.

**Fencing.** Before each unit commit the holder lists the generations and reads
``lease.json``: a generation above its own, or a ``lease.json`` that names another job (or is
gone), means another job took the lease, and it raises :class:`LeaseLostError` naming the new
holder: the job stops committing and exits 1. (A read-compare right before the commit: a PUT
cannot be made conditional on another object's version on S3.) The heartbeat renews
``lease.json`` only over the version it wrote last (:func:`restorer.io.storage.replace_if`: an
``If-Match`` PUT on S3, a compare under ``flock`` locally), so it never overwrites a taker's
record; it survives any error and stops only when the lease is lost (or released), and the
driver then fails at its next batch without waiting for a commit.

A second job finding a generation whose heartbeat is younger than ``stale_seconds`` is refused,
naming the holder; an older one (its job was killed, its machine lost) is taken over, and the
log says so, as is one whose holder ran on this host in a process that no longer exists (a
crashed or killed run, rerun at once). With ``overwrite`` (which deletes the ledger) a stale
holder on another host is not taken over: it may still be running. At its end a job marks its
generation released and removes ``lease.json``.

Clocks: staleness compares the holder's heartbeat with this machine's clock; keep
``stale_seconds`` well above the heartbeat and any clock skew between job hosts (default 120 s
vs a 15 s heartbeat).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Self

from restorer.errors import LeaseLostError, OutputConflictError, StorageError
from restorer.io import storage

log = logging.getLogger(__name__)

LEASE_FORMAT_VERSION = 2  # 2: generations (lease-generations/), fencing at every commit
GENERATIONS_KEPT = 3  # tickets kept below the newest (older ones are pruned at a takeover)


@dataclass
class Holder:
    job_id: str
    host: str
    pid: int
    started: float
    heartbeat: float
    version: int = LEASE_FORMAT_VERSION
    generation: int = 0  # 0: a lease written before generations (no ticket)
    released: bool = False  # set on the generation's ticket when its job ended

    def describe(self, now: float) -> str:
        return (f"job {self.job_id} on {self.host} (pid {self.pid}, lease generation "
                f"{self.generation}), started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, last "
                f"heartbeat {now - self.heartbeat:.0f} s ago")


class Lease:
    """The lease of one output; use as a context manager around the whole job, and call
    :meth:`check` before every commit."""

    def __init__(self, uri: str, options: storage.StorageOptions = storage.StorageOptions(),
                 stale_seconds: float = 120.0, heartbeat_seconds: float = 15.0,
                 overwrite: bool = False):
        self.uri = uri
        self.options = options
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.overwrite = overwrite
        parent, _, name = uri.rstrip("/").rpartition("/")
        self.generations_uri = f"{parent}/{name.removesuffix('.json')}-generations"
        now = time.time()
        self.holder = Holder(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: LeaseLostError | None = None
        self._version: str | None = None  # of lease.json as this job last wrote it

    # --- taking and giving back ------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease, or raise :class:`OutputConflictError` naming the live holder."""
        for _ in range(5):  # another job may claim the generation we looked at first
            generation = self._newest()
            holder = self._state(generation)
            now = time.time()
            if holder is not None and not holder.released:
                dead_here = self._dead_here(holder)
                if now - holder.heartbeat < self.stale_seconds and not dead_here:
                    raise OutputConflictError(
                        f"Another job is writing into {self._output()}: "
                        f"{holder.describe(now)}. Wait for it, stop it, or choose another "
                        f"output (a lease without heartbeat for {self.stale_seconds:.0f} s is "
                        "taken over)")
                if self.overwrite and not dead_here:
                    raise OutputConflictError(
                        f"--overwrite deletes the ledger of {self._output()}, whose lease "
                        f"was last held by {holder.describe(now)}: that job may still be "
                        "committing. Make sure it is stopped, then rerun without --overwrite "
                        "(it takes the lease over and resumes) or, if it is gone for good, "
                        f"delete {self.generations_uri} and {self.uri} and rerun")
                log.warning("taking over the output's lease from %s: %s", holder.describe(now),
                            "its process is gone" if dead_here else
                            f"no heartbeat for {now - holder.heartbeat:.0f} s (its job is gone)")
            self.holder.generation = generation + 1
            self.holder.heartbeat = time.time()
            if self._claim():
                self._version = storage.replace_if(self.uri, self._bytes(), self.options)
                self._prune(generation)
                self._start_heartbeat()
                return
        raise OutputConflictError(f"Could not take the lease {self.uri}: other jobs keep taking "
                                  "it; start one job per output")

    def release(self) -> None:
        """End the heartbeat; mark this job's generation released and remove ``lease.json``
        (unless the lease was lost: then nothing of the new holder's is touched)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_seconds)
            self._thread = None
        if self._lost is not None or self.holder.generation == 0:
            return
        try:
            if self._newest() != self.holder.generation:
                return
            self.holder.released = True
            storage.write_bytes(self._ticket(self.holder.generation), self._bytes(),
                                self.options)
            current = self.read()
            if current is not None and current.job_id == self.holder.job_id:
                storage.delete(self.uri, self.options)
        except Exception as e:  # noqa: BLE001 - the next job takes it over once stale
            log.warning("could not release the lease %s: %s", self.uri, e)

    # --- fencing -----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`LeaseLostError` (naming the new holder) if another job has taken the
        lease since this job took it: a newer generation was claimed, or ``lease.json`` names
        another job (or is gone). Call right before every commit: one listing of the
        generations folder and one read of ``lease.json``."""
        self.raise_if_lost()
        newest = self._newest()
        current = self.read()
        if (newest != self.holder.generation or current is None
                or current.job_id != self.holder.job_id):
            self._lose(newest, current)
            self.raise_if_lost()

    def raise_if_lost(self) -> None:
        """Raise :class:`LeaseLostError` if the heartbeat (or a check) found the lease lost
        (no storage request)."""
        if self._lost is not None:
            raise self._lost

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def _lose(self, newest: int, current: Holder | None = None) -> None:
        try:
            if current is None:
                current = self.read()
            if current is not None and current.job_id != self.holder.job_id:
                who = current.describe(time.time())  # lease.json names the new holder
            elif newest != self.holder.generation and (taker := self._ticket_holder(newest)):
                who = taker.describe(time.time())
            else:
                who = f"nobody ({self.uri} was removed)"
        except Exception as e:  # noqa: BLE001 - the loss stands, whoever holds it
            who = f"generation {newest} (its record could not be read: {e})"
        self._lost = LeaseLostError(
            f"This job (job {self.holder.job_id}, lease generation {self.holder.generation}) "
            f"lost the lease of {self._output()} to {who}; it stopped committing (the units "
            "it committed stay committed). Do not run two jobs on one output: let that job "
            "finish, or stop it and rerun this command to resume")
        log.error("%s", self._lost)

    # --- the pieces --------------------------------------------------------------------------

    def read(self) -> Holder | None:
        """The holder recorded in ``lease.json`` (None when there is none)."""
        return self._holder_at(self.uri)

    def _holder_at(self, uri: str) -> Holder | None:
        try:
            data = json.loads(storage.read_bytes(uri, self.options))
        except StorageError:
            if not storage.exists(uri, self.options):
                return None
            raise
        fields = {k: data[k] for k in Holder.__dataclass_fields__ if k in data}
        return Holder(**fields)

    def _ticket(self, generation: int) -> str:
        return storage.join(self.generations_uri, f"{generation:012d}.json")

    def _ticket_holder(self, generation: int) -> Holder | None:
        return self._holder_at(self._ticket(generation)) if generation else None

    def _generations(self) -> list[int]:
        return sorted(int(n[:-len(".json")]) for n in storage.list_names(self.generations_uri,
                                                                         self.options)
                      if n.endswith(".json") and n[:-len(".json")].isdigit())

    def _newest(self) -> int:
        """The newest generation claimed (0: none yet)."""
        generations = self._generations()
        return generations[-1] if generations else 0

    def _state(self, generation: int) -> Holder | None:
        """Who holds ``generation``, with its latest heartbeat: ``lease.json`` when it records
        that generation (generation 0: a lease written before generations), else the ticket
        (its claim time: a taker between its claim and its first ``lease.json``)."""
        current = self.read()
        ticket = self._ticket_holder(generation)
        if current is not None and current.generation == generation:
            if ticket is not None:
                current.released = ticket.released
            return current
        return ticket

    def _claim(self) -> bool:
        """Claim ``self.holder.generation`` (create-only); False if another job did first."""
        ticket = self._ticket(self.holder.generation)
        try:
            storage.write_bytes(ticket, self._bytes(), self.options, create=True)
            return True
        except StorageError:
            if storage.exists(ticket, self.options):
                return False
            raise

    def _prune(self, below: int) -> None:
        """Delete tickets older than the last few (a fenced job compares only the newest)."""
        for generation in self._generations():
            if generation < below - GENERATIONS_KEPT + 1:
                try:
                    storage.delete(self._ticket(generation), self.options)
                except StorageError as e:
                    log.debug("could not prune lease generation %d: %s", generation, e)

    def _dead_here(self, holder: Holder) -> bool:
        """Whether ``holder`` ran on this host in a process that no longer exists (a killed
        job: its lease need not wait to go stale)."""
        if holder.host != self.holder.host or holder.pid == self.holder.pid:
            return False
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def _output(self) -> str:
        return self.uri.rsplit("/", 2)[0]

    def _bytes(self) -> bytes:
        return json.dumps(asdict(self.holder), indent=2).encode()

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_seconds):
                try:
                    newest = self._newest()
                    if newest != self.holder.generation:
                        self._lose(newest)
                        return
                    self.holder.heartbeat = time.time()
                    try:  # only over this job's own record: a replaced lease.json is a loss
                        self._version = storage.replace_if(self.uri, self._bytes(),
                                                           self.options, self._version)
                    except storage.VersionChanged:
                        current = self.read()
                        if current is None or current.job_id != self.holder.job_id:
                            self._lose(newest, current)
                            return
                        self._version = None  # ours (a retried write): rewrite it next beat
                except Exception as e:  # noqa: BLE001 - any passing fault: beat again later
                    log.warning("lease heartbeat failed (%s: %s); retrying", type(e).__name__, e)

        self._thread = threading.Thread(target=beat, name="restorer-lease", daemon=True)
        self._thread.start()

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
