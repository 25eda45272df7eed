"""Keep Ray's own noise off a person's console (``restorer`` without ``--verbose``).

Ray prints lines on every successful run that read like failures to a person, and that are
known not to be: an error-level ``core_worker.cc`` line for every Ray Data actor pool ("has
constructor arguments in the object store and max_restarts > 0", ray-project/ray#57733: Ray
Data's own actors; actor restarts, which fault handling relies on, stay on), Ray Train's
``PlacementGroupCleaner`` repeating "Failed to query Ray Train Controller actor state" while a
finished run's controller goes away, and Ray Data's per-operator progress log blocks, which
this package replaces with one progress bar (:mod:`restorer.job.progress`).

:func:`quiet_ray` filters exactly those: Ray's console log handlers show warnings and errors
only (:func:`console_worthy`, installed by :mod:`restorer.pipeline.graph` when it configures
Ray Data) and the two C++/worker lines are dropped from the process's stderr (file descriptor
2, where Ray's C++ core and its forwarded worker logs write) by a small filter thread.
Everything else passes unchanged; ``restorer --verbose`` installs nothing. Ray's log files keep
every line.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading

from restorer.job import progress

# Lines that Ray prints on healthy runs (see the module docstring); matched anywhere in a line.
BENIGN_RAY_LINES = re.compile(
    r"has constructor arguments in the object store and max_restarts > 0"
    r"|Failed to query Ray Train Controller actor state"
    # the Train controller's and workers' INFO lines about the worker group and each report
    # (restorer.train.distributed shows the run's progress and checkpoints on the driver instead)
    r"|\(TrainController pid=\d+\)\S* (Started training worker group of size|- \(ip="
    r"|Requesting resources: |Attempting to start training worker group )"
    r"|\(RayTrainWorker pid=\d+\)\S* (Setting up process group for: |Moving model to device: "
    r"|Reporting training result \d+: )"
)
# Ray loggers whose console handlers get :func:`console_worthy` (INFO is progress chatter).
RAY_LOGGERS = ("ray.data", "ray.train", "ray.tune", "ray.air")

quiet = False  # set by quiet_ray(); read by the pipeline when it configures Ray Data


def quiet_ray() -> None:
    """Filter Ray's known-benign console output for the rest of this process (idempotent)."""
    global quiet
    if quiet:
        return
    quiet = True
    progress.remember_tty(progress.stderr_is_tty())
    _filter_stderr_fd()


def console_worthy(record: logging.LogRecord) -> bool:
    """Warnings and errors, except Ray Data's note that we turned its progress bars off."""
    return (record.levelno >= logging.WARNING
            and not record.getMessage().startswith(("Progress bars disabled",
                                                    "Progress bars for operators disabled")))


def _filter_stderr_fd() -> None:
    """Route fd 2 through a thread that drops :data:`BENIGN_RAY_LINES` (only when fd 2 is the
    process's real stderr: not under a test runner's capture)."""
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):
        return
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as source:
            while chunk := source.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                kept = [line for line in lines
                        if not BENIGN_RAY_LINES.search(line.decode("utf-8", "replace"))]
                out = b"".join(line + b"\n" for line in kept)
                if b"\r" in pending:  # progress bars redraw with \r: pass them on at once
                    head, _, pending = pending.rpartition(b"\r")
                    out += head + b"\r"
                if out:
                    os.write(original, out)
        if pending:
            os.write(original, pending)

    thread = threading.Thread(target=pump, name="restorer-stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes our end of the pipe; children may still hold theirs
        thread.join(timeout=1.0)

    atexit.register(restore)
