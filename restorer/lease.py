"""One job per output: a lease on ``OUTPUT/_restorer/lease.json``, taken before anything is
written and kept alive by a heartbeat.

The lease is created with a create-only write (a local hard link; a conditional PUT on S3, see
:func:`restorer.storage.write_bytes`), so of two jobs starting on one output exactly one gets
it. It names its holder (job id, host, pid, start) and carries a ``heartbeat`` time that a
background thread renews every ``heartbeat_seconds``. A second job finding a lease whose
heartbeat is younger than ``stale_seconds`` is refused, naming the holder; an older one (its
job was killed, its machine lost) is taken over, and the log says so, as is one whose holder
ran on this host in a process that no longer exists (a crashed or killed run, rerun at once). The lease is removed when
the job ends, whatever the ending.

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

from restorer import storage
from restorer.errors import OutputConflictError, StorageError

log = logging.getLogger(__name__)

LEASE_FORMAT_VERSION = 1


@dataclass
class Holder:
    job_id: str
    host: str
    pid: int
    started: float
    heartbeat: float
    version: int = LEASE_FORMAT_VERSION

    def describe(self, now: float) -> str:
        return (f"job {self.job_id} on {self.host} (pid {self.pid}), started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, last "
                f"heartbeat {now - self.heartbeat:.0f} s ago")


class Lease:
    """The lease of one output; use as a context manager around the whole job."""

    def __init__(self, uri: str, options: storage.StorageOptions = storage.StorageOptions(),
                 stale_seconds: float = 120.0, heartbeat_seconds: float = 15.0):
        self.uri = uri
        self.options = options
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        now = time.time()
        self.holder = Holder(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease, or raise :class:`OutputConflictError` naming the live holder."""
        for _ in range(3):  # a stale lease removed by us may be created by another job first
            if self._create():
                self._start_heartbeat()
                return
            current = self.read()
            now = time.time()
            if current is None:
                continue  # released between our attempt and the read: try again
            if now - current.heartbeat < self.stale_seconds and not self._dead_here(current):
                raise OutputConflictError(
                    f"Another job is writing into {self.uri.rsplit('/', 2)[0]}: "
                    f"{current.describe(now)}. Wait for it, stop it, or choose another output "
                    f"(a lease without heartbeat for {self.stale_seconds:.0f} s is taken over)")
            log.warning("taking over the output's lease from %s: %s", current.describe(now),
                        "its process is gone" if self._dead_here(current) else
                        f"no heartbeat for {now - current.heartbeat:.0f} s (its job is gone)")
            storage.delete(self.uri, self.options)
        raise OutputConflictError(f"Could not take the lease {self.uri}: other jobs keep taking "
                                  "it; start one job per output")

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

    def read(self) -> Holder | None:
        try:
            data = json.loads(storage.read_bytes(self.uri, self.options))
        except StorageError:
            if not storage.exists(self.uri, self.options):
                return None
            raise
        fields = {k: data[k] for k in Holder.__dataclass_fields__ if k in data}
        return Holder(**fields)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_seconds)
            self._thread = None
        try:
            current = self.read()
            if current is not None and current.job_id == self.holder.job_id:
                storage.delete(self.uri, self.options)
        except StorageError as e:  # the next job takes it over once stale
            log.warning("could not release the lease %s: %s", self.uri, e)

    def _create(self) -> bool:
        try:
            storage.write_bytes(self.uri, self._bytes(), self.options, create=True)
            return True
        except StorageError:
            if storage.exists(self.uri, self.options):
                return False
            raise

    def _bytes(self) -> bytes:
        return json.dumps(asdict(self.holder), indent=2).encode()

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_seconds):
                try:
                    current = self.read()
                    if current is None or current.job_id != self.holder.job_id:
                        log.error("the output's lease %s was taken by %s; this job's "
                                  "remaining commits will be refused", self.uri,
                                  current.describe(time.time()) if current else "nobody")
                        return
                    self.holder.heartbeat = time.time()
                    storage.write_bytes(self.uri, self._bytes(), self.options)
                except StorageError as e:  # a passing storage fault: beat again later
                    log.warning("lease heartbeat failed (%s); retrying", e)

        self._thread = threading.Thread(target=beat, name="restorer-lease", daemon=True)
        self._thread.start()

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
