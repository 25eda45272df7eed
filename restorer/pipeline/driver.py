"""Restore jobs on Ray Data: list -> read+decode -> restore -> encode+write -> commit.

The graph, top to bottom (:func:`run_restore`):

1. **List** (listing tasks, streaming; see :mod:`restorer.pipeline.sources`): input keys
   become rows, grouped into *work units* of up to 64 keys of one folder (or one hash
   partition of a flat folder). Unit boundaries depend on the keys alone, so a rerun over the
   same input makes the same units. Two inputs that would write one output key become error
   records here, and neither is written.
2. **Read + decode** (CPU tasks, :func:`read_and_decode`): bytes -> pixels; any failure becomes
   an error record on that row and the row flows on.
3. **Restore** (a pool of :class:`RestoreActor`, one model per actor on its GPU or CPU): tiles
   of one shape are batched across the images of a batch.
4. **Encode + write** (CPU tasks, :func:`encode_and_write`): each output is published atomically
   at ``OUTPUT/<key with the output extension>``.
5. **Commit** (driver): when every row of a unit has come back, the unit's records are written
   as one Parquet file ``_restorer/ledger/unit-<id>.parquet`` (and its failures to
   ``_restorer/errors.parquet/unit-<id>.parquet``). A rerun skips committed units, so each
   output is produced exactly once per job; work lost to a crash is bounded by the units that
   were in flight.

``OUTPUT/_restorer/job.json`` holds the spec and the job fingerprint; ``summary.json`` is
written at the end of every run, from the runs' digests (``_restorer/digests/``,
:mod:`restorer.output.digest`), not from a re-read of the ledger.

This module is the driver, read top to bottom: :func:`run_restore` checks everything that can
fail for the whole job, :func:`_run_leased` plans workers and the fingerprint and runs the
graph, :func:`_execute` commits units as their records come back, :func:`_audit` ends the job.
The pieces live beside it: :mod:`restorer.output.records` (the rows and their schemas),
:mod:`restorer.pipeline.stages` (read + decode, encode + write), :mod:`restorer.pipeline.actor` (the
model),
:mod:`restorer.pipeline.graph` (the Ray Data graph), :mod:`restorer.output.ledger` (everything under
``_restorer/``) and :mod:`restorer.report.summary` (the run's counters). The names users import
(``restore``, ``run_restore``, ``RestoreActor``) are the faces of :mod:`restorer.pipeline`.

Size: the driver reads as one story; its helpers (signals, the result pump, unit closing) exist
only for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from restorer.errors import (
    TRANSIENT,
    JobError,
    JobStopped,
    LeaseLostError,
    OutputConflictError,
    RestorerError,
    StorageError,
    classify,
    retrying,
)
from restorer.io import storage
from restorer.job.progress import Progress
from restorer.job.specs import RestoreSpec, replace_field, spec_from_flags
from restorer.output.digest import FLUSH_SECONDS, RECORD_COLUMNS, Digest, flag, job_digest
from restorer.output.digest import write as write_digest
from restorer.output.lease import Lease
from restorer.output.ledger import (
    META_DIR,
    MISSING_RUNS,
    commit_unit,
    committed_units,
    forget_missing,
    forget_transient,
    meta_uri,
    missing_runs,
    note_missing,
    note_transient,
    prepare_output,
    refuse_foreign_output,
    transient_history,
    transient_units,
    unit_records,
    write_summary,
)
from restorer.output.records import (
    RETRY_ATTEMPTS,
)
from restorer.pipeline.actor import (
    check_strength,
    resolve_precision,
    tile_settings,
)
from restorer.pipeline.graph import (
    build_pipeline,
    poison_registry,
    source_config,
)
from restorer.pipeline.sources.files import count_listing
from restorer.pipeline.sources.listing import (
    detect_layout,
    known_total,
    listing_tasks,
    plan_outputs,
    refuse_older_units,
)
from restorer.pipeline.sources.tasks import ListingTask, SourceConfig
from restorer.report.summary import JobState, account, summarize

if TYPE_CHECKING:
    import torch

# torch (and the modules that need it: models, tiling) is imported where the driver uses it,
# not here: task workers import this module's neighbours, and torch costs a process ~1.7 s.
log = logging.getLogger(__name__)
# At the end of a job, how long the summary waits for the walk that counts a local folder's
# inputs and non-image files (begun with the job) before it goes without the non-image count
COUNT_WAIT_SECONDS = 30.0
RESULTS_THREAD = "restorer-results"  # the thread pulling the pipeline's batches (_results)
END_RAY_WAIT_SECONDS = 3.0  # a stop waits so long for that thread to leave Ray
POLL_SECONDS = 1.0  # the driver asks how far the actors' batches are at most this often


def run_restore(spec: RestoreSpec) -> dict[str, Any]:
    """Run a restore job to the end; returns (and writes) its summary.

    Everything that can fail for the whole job (spec, model, input listing, output access) is
    checked before Ray starts or any image is touched; settings left to ``auto``/0 (model,
    tile, overlap, precision) are resolved before they enter the fingerprint, so a resume on
    other hardware cannot mix outputs made differently.
    """
    from restorer.weights.zoo import DEFAULT_MODEL, get_model, resolve_model_uri

    spec = _absolute_paths(spec.validate())
    options = spec.storage.options()
    if not spec.model.name:
        spec = replace_field(spec, "model", "name", DEFAULT_MODEL)
    model_uri = resolve_model_uri(spec.model.name)
    model_sha256 = hashlib.sha256(storage.read_bytes(model_uri, options)).hexdigest()
    loaded = get_model(model_uri, options)  # fail here, before any work, if it is unusable
    net = loaded.net
    check_strength(spec.model.strength, hasattr(net, "strength"), spec.model.name)
    _refuse_input_as_output(spec)
    layout = detect_layout(spec.input.uri, spec.input.layout, options)
    config = source_config(spec, layout)
    if config.skip_prefix:
        log.warning("the output %s lies inside the input; it is left out of the listing",
                    spec.output.uri)
    tasks = listing_tasks(spec.input.uri, config)
    config = plan_outputs(tasks, config)  # shards, manifests: outputs unique across chunks
    if (layout == "files" and not storage.is_remote(spec.input.uri)
            and storage.is_dir(spec.input.uri)
            and not storage.has_local_file(spec.input.uri, spec.input.extensions,
                                           skip_dirs=(META_DIR,))):
        log.warning("no images found under %s (extensions %s)", spec.input.uri,
                    " ".join(spec.input.extensions))
        state = JobState(spec, model_uri, model_sha256, {})
        return dict(summarize(state, time.time() - state.started), status="empty")

    refuse_foreign_output(spec)  # before Ray starts (a bad bucket fails here too)
    _probe_create_only(spec)
    lease = Lease(meta_uri(spec.output.uri, "lease.json"), options,
                  spec.limits.lease_stale_seconds, overwrite=spec.output.overwrite)
    with lease:  # one job per output, from before anything is written until the end
        return _run_leased(spec, model_uri, model_sha256, net, layout, config, tasks,
                           loaded.provenance, lease)


def restore(input: str, output: str, model: str | None = None, verbose: bool = False,
            **options: Any) -> dict[str, Any]:
    """Restore every image under ``input`` into ``output``; returns the job summary.

    ``options`` are spec fields by name (``tile=256, format="png", workers=2, limit=100,
    overwrite=True, ...``; see ``jobs/README.md``). Runs on the connected Ray cluster, or starts
    an embedded one. The console is kept as quiet as the CLI's
    (:func:`restorer.job.console.quiet_ray`: Ray Data's own progress and plan logs and Ray's
    known-harmless lines are left out, for the rest of the process); ``verbose=True`` leaves Ray's
    output as it is.
    """
    if not verbose:
        from restorer.job.console import quiet_ray

        quiet_ray()
    spec = spec_from_flags(RestoreSpec, input=input, output=output, model=model, **options)
    return run_restore(spec)


def _run_leased(spec: RestoreSpec, model_uri: str, model_sha256: str, net: torch.nn.Module,
                layout: str, config: SourceConfig, tasks: list[ListingTask],
                provenance: dict[str, Any], lease: Lease | None = None) -> dict[str, Any]:
    from restorer.job.sizing import CHEAP_NET_MACS, macs_per_pixel, size_workers
    from restorer.pipeline.runtime import cluster_shape, ensure_ray, refuse_unshared_paths

    started = time.time()  # the run's start-up counts Ray's
    legacy_fingerprint = spec.fingerprint(model_sha256)  # outputs of restorer before 0.2
    tile, overlap = tile_settings(net, spec.model.tile, spec.model.overlap)
    spec = replace_field(spec, "model", "tile", tile)
    spec = replace_field(spec, "model", "overlap", overlap)
    # The checks that need no Ray come first: a refused fingerprint or a rerun with nothing
    # to do answers in a second instead of after Ray's start-up. They need the device the
    # actors will run on (it settles the precision, part of the fingerprint); where that is
    # known before Ray (given, or the GPUs of this machine for an embedded Ray) it binds the
    # plan below, else it waits for the cluster.
    gpus = _gpus_before_ray(spec, net)
    claimed = None
    if gpus is not None:
        claimed = _claim(spec, model_sha256, net, provenance, legacy_fingerprint, model_uri,
                         tasks, config, on_gpu=gpus > 0)
        spec = claimed[0]
        nothing_left = _nothing_left(claimed[0], claimed[2], claimed[3], tasks, config)
        if nothing_left is not None:
            return _finish_without_ray(claimed, model_uri, model_sha256, nothing_left)

    ours = not _ray_running()  # a Ray this run starts or connects to; it may end it
    embedded = ensure_ray(spec.resources.address, spec.resources.num_cpus,
                          spec.resources.object_store_mb)
    refuse_unshared_paths(spec.input.uri, spec.output.uri, meta_uri(spec.output.uri),
                          spec.storage.shared_filesystem)
    plan = size_workers(spec.resources.workers,
                        spec.resources.gpus_per_worker if gpus is None else gpus,
                        spec.resources.cpus_per_worker, spec.resources.threads_per_worker,
                        *cluster_shape(), can_autoscale=not embedded,
                        cheap_net=macs_per_pixel(net) < CHEAP_NET_MACS)
    log.info("worker plan: %s", plan)
    if claimed is None:
        claimed = _claim(spec, model_sha256, net, provenance, legacy_fingerprint, model_uri,
                         tasks, config, on_gpu=plan.gpus_per_worker > 0)
    spec, fingerprint, resumed, done, with_errors = claimed
    state = JobState(spec, model_uri, model_sha256, fingerprint, started=started)
    state.transient_units = transient_units(spec)
    log.info("input %s (%s layout): %d listing tasks; %d units already committed",
             spec.input.uri, layout, len(tasks), len(done))

    total = known_total(tasks)
    if spec.input.limit:
        total = min(total or spec.input.limit, spec.input.limit)
    stop_signal: dict[str, str] = {}
    with _stop_on_signals(stop_signal) as stop, Progress("restore", total) as progress:
        counting = None
        if total is None and layout == "files":  # a folder or a prefix of object storage
            counting = _count_in_background(tasks, config, progress, state)
        registry = poison_registry()
        try:
            _execute(spec, state, build_pipeline(spec, plan, tasks, config, frozenset(done),
                                                 resumed, model_sha256, registry),
                     with_errors, stop, progress, lease, _WorkerProgress(registry, progress))
        except LeaseLostError:
            stop.set()  # the pump thread of _results stops pulling batches
            raise
        if counting is not None:  # the walk began with the job: it is done, or nearly
            counting.join(timeout=COUNT_WAIT_SECONDS)
    return _end_of_job(spec, state, resumed, stop, stop_signal, registry, ours)


def _end_of_job(spec: RestoreSpec, state: JobState, resumed: bool, stop: threading.Event,
                stop_signal: dict[str, str], registry: Any, ours: bool) -> dict[str, Any]:
    """The job's summary once its pipeline ended: audited and written in full when it ran to
    the end; from the counters in hand (within a pod's grace period) when it was stopped, its
    Ray ended first if the job started it, and then :class:`JobStopped` raised with it."""
    if not stop.is_set():
        _release(registry)  # every batch is in: no actor asks it any more
    state.total = state.succeeded + state.failed + state.skipped
    summary = summarize(state, time.time() - state.started)
    summary["resumed"] = resumed
    if state.total == 0:
        summary["status"] = "empty"
    if stop.is_set():
        # The stop must end within the pod's grace period: the summary comes from the counters
        # held here (and one read of the ledger's output keys, to count what was in flight);
        # `restorer inspect OUTPUT --report` rebuilds the whole-job figures and the report
        # page later.
        if ours:
            _end_ray()  # then no task of this run writes: what is there is what a rerun finds
        else:
            _release(registry)
        state.in_flight_written = _settled_count(spec)
        summary = dict(summarize(state, time.time() - state.started), resumed=resumed)
        summary["status"] = "stopped"
        summary["report"] = None
        _write_run_digest(spec, state.digest)  # its counters are in hand: nothing is re-read
        write_summary(spec, summary, attempts=2)
    else:
        _audit(spec, summary, state.digest)
    if summary["status"] == "incomplete":
        log.warning("%d units (%d images failing transiently, %d inputs missing) were left "
                    "uncommitted; rerun the same command to finish them",
                    state.incomplete_units, state.transient, state.missing)
    if stop.is_set():
        raise JobStopped(_stopped_paragraph(state, stop_signal.get("name", "a stop request")),
                         summary)
    return summary


def _release(registry: Any) -> None:
    """End the job's registry actor. In a Ray the job did not start (a cluster, a user's
    own) nothing else would: Ray Data keeps references to the job's actor arguments after
    it ends, so each job left one registry process behind (seen: three after three jobs)."""
    import ray

    try:
        ray.kill(registry, no_restart=True)
    except Exception as e:  # noqa: BLE001 - Ray already down, or the actor already gone
        log.debug("the registry actor could not be ended: %s", e)


def _gpus_before_ray(spec: RestoreSpec, net: torch.nn.Module) -> float | None:
    """GPUs per actor when known before Ray starts: given (``--gpus-per-worker``) for a
    cluster; for an embedded Ray, from the plan on this machine's CPUs and CUDA devices (what
    Ray finds), which refuses an impossible plan here already. None when only the cluster can
    tell (a cluster with ``auto``) or Ray runs in this process already (nothing to save)."""
    import os
    import sys

    from restorer.job.sizing import CHEAP_NET_MACS, macs_per_pixel, size_workers

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # a Ray the caller started: it can tell
        return None
    if spec.resources.address or os.environ.get("RAY_ADDRESS"):
        return None if spec.resources.gpus_per_worker == -1.0 else spec.resources.gpus_per_worker
    import torch

    cpus = float(spec.resources.num_cpus or os.cpu_count() or 1)
    gpus = float(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    return size_workers(spec.resources.workers, spec.resources.gpus_per_worker,
                        spec.resources.cpus_per_worker, spec.resources.threads_per_worker,
                        cpus, gpus, cpus, 1, can_autoscale=False,
                        cheap_net=macs_per_pixel(net) < CHEAP_NET_MACS).gpus_per_worker


def _claim(spec: RestoreSpec, model_sha256: str, net: torch.nn.Module,
           provenance: dict[str, Any], legacy_fingerprint: dict[str, Any], model_uri: str,
           tasks: list[ListingTask], config: SourceConfig, on_gpu: bool
           ) -> tuple[RestoreSpec, dict[str, Any], bool, set[str], set[str]]:
    """Resolve the precision, compare the fingerprint with the output's job (refusing a
    different job) and claim the output: (spec, fingerprint, resumed, units to skip, units
    with errors). Needs no Ray."""
    from restorer.image import flat

    spec = replace_field(spec, "model", "precision",
                         resolve_precision(spec.model.precision, on_gpu, net))
    # Since fingerprint version 2, images are padded by reflection at their bottom/right edges
    # (version 1 replicated edge pixels): part of how outputs are made.
    fingerprint = {**spec.fingerprint(model_sha256), "edge_padding": "reflect"}
    if flat.wanted(spec.model.flat_fill, provenance, net.scale):
        # Flat regions filled with the image's noise (restorer.image.flat): part of how outputs are
        # made; absent when off, so that jobs of other models keep their fingerprints.
        fingerprint["flat_fill"] = f"noise-{flat.FLAT_WINDOW}"
    refuse_older_units(spec, tasks, config)
    resumed = (prepare_output(spec, fingerprint, model_uri, legacy_fingerprint)
               and not spec.output.overwrite)
    done, with_errors = committed_units(spec)
    if spec.output.overwrite:
        done = set()
    elif spec.output.retry_failed:
        done -= with_errors
    return spec, fingerprint, resumed, done, with_errors


def _nothing_left(spec: RestoreSpec, resumed: bool, done: set[str], tasks: list[ListingTask],
                  config: SourceConfig) -> tuple[int, int] | None:
    """(images, units) when a rerun has nothing to do: every unit of the listing is committed
    (listed here, in the driver, stopping at the first unit left to do). Only tried after a
    run that ended complete (its summary.json says so), so that a stopped or growing job is
    not listed twice; None: there is work, or it was not tried."""
    from restorer.pipeline.sources.listing import expand

    if not resumed or spec.input.limit:
        return None
    try:
        last = json.loads(storage.read_bytes(meta_uri(spec.output.uri, "summary.json"),
                                             spec.storage.options()))
    except (RestorerError, OSError, ValueError):
        return None
    if last.get("status") not in ("ok", "failed_images"):
        return None
    images = units = 0
    frozen = frozenset(done)
    for task in tasks:
        for unit in expand(task, config, frozen):
            if any(row["status"] != "skipped" for row in unit):
                return None
            images += unit[0]["unit_size"]
            units += 1
    return images, units


def _finish_without_ray(claimed: tuple, model_uri: str, model_sha256: str,
                        nothing_left: tuple[int, int]) -> dict[str, Any]:
    """The summary of a rerun that found every unit committed (Ray never started)."""
    spec, fingerprint, resumed = claimed[:3]
    state = JobState(spec, model_uri, model_sha256, fingerprint)
    state.skipped, state.skipped_units = nothing_left
    state.total = state.skipped
    log.info("every one of the %d units (%d images) under %s is already committed: nothing "
             "to do", state.skipped_units, state.skipped, spec.output.uri)
    summary = summarize(state, time.time() - state.started)
    summary["resumed"] = resumed
    if state.total == 0:
        summary["status"] = "empty"
    _audit(spec, summary, state.digest)
    return summary


def _execute(spec: RestoreSpec, state: JobState, ds: Any, with_errors: set[str],
             stop: threading.Event | None = None, progress: Progress | None = None,
             lease: Lease | None = None, idle: Callable[[], None] | None = None) -> None:
    """Consume the pipeline's records in the driver and commit units as they complete.

    Only the units in flight are held here, so driver memory does not grow with the job.
    Every commit is fenced by the ``lease`` (:meth:`Lease.check`): a job whose lease another
    job took raises :class:`LeaseLostError` and commits nothing more. ``idle`` is called while
    no records come (default: ``progress.tick``).
    """
    open_units: dict[str, list[dict[str, Any]]] = {}
    flushed = time.time()
    if stop is None:
        stop = threading.Event()  # never set: the pump below still gives idle ticks
    if idle is None and progress is not None:
        idle = progress.tick
    for batch in _results(ds, stop, idle):
        arrived = time.time()  # before this batch's commits: start-up ends at the first result
        if lease is not None:
            lease.raise_if_lost()  # found by the heartbeat: stop without waiting for a commit
        processed = 0
        for record in batch.to_pylist():
            if record["status"] == "skipped":
                state.skipped += record["unit_size"]
                state.skipped_units += 1
                if progress is not None:
                    progress.update(record["unit_size"])
                continue
            processed += 1
            account(state, record)
            if progress is not None:  # image by image, before the unit's commit
                progress.update(1, failed=state.failed)
            unit = open_units.setdefault(record["unit"], [])
            unit.append(record)
            if len(unit) == record["unit_size"]:
                redone = record["unit"] in with_errors
                committed = _close_unit(spec, state, record["unit"], unit, redone,
                                        lease.check if lease is not None else None)
                del open_units[record["unit"]]
                if committed and (redone or time.time() - flushed > FLUSH_SECONDS):
                    _write_run_digest(spec, state.digest)
                    flushed = time.time()
        if processed:
            state.arrivals += 1
            if state.first_result is None:
                state.first_result, state.first_count = arrived, processed
            state.last_result = arrived
        if stop.is_set():
            break
    if stop.is_set():
        state.abandoned = sum(len(rows) for rows in open_units.values())
        return
    if open_units:
        raise JobError(f"{len(open_units)} work units did not complete; rerun to finish them")


class _WorkerProgress:
    """The idle tick of a job's progress that also shows the images restored in the batches
    the actors are on (the registry's count, asked every :data:`POLL_SECONDS` without
    waiting for the answer): the display moves image by image, not batch by batch. An answer
    is dropped when records came after it was asked for (``progress.done`` moved): it may count
    images those records brought."""

    def __init__(self, registry: Any, progress: Progress):
        self.registry, self.progress = registry, progress
        self.pending: Any = None  # the ObjectRef of the question in flight
        self.asked = 0.0
        self.done_when_asked = 0

    def __call__(self) -> None:
        import ray

        now = time.monotonic()
        if self.pending is not None:
            ready, _ = ray.wait([self.pending], timeout=0)
            if ready:
                with contextlib.suppress(Exception):  # progress only: never fails the job
                    restored = ray.get(self.pending)
                    if self.progress.done == self.done_when_asked:
                        self.progress.ahead(restored)
                self.pending = None
        if self.pending is None and now - self.asked >= POLL_SECONDS:
            self.asked, self.done_when_asked = now, self.progress.done
            with contextlib.suppress(Exception):
                self.pending = self.registry.restored_in_flight.remote()
        self.progress.tick()


def _results(ds: Any, stop: threading.Event,
             idle: Callable[[], None] | None = None) -> Iterator[pa.Table]:
    """The pipeline's record batches; on a stop request this returns within a fraction of a
    second, even while no batch is coming (a slow or stalled store), so that a stop ends
    within a pod's grace period. The batches are pulled by a daemon thread; ``idle`` is
    called every 0.2 s while none comes (progress lines during a long first batch)."""
    batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    results: queue.Queue = queue.Queue(maxsize=4)
    end = object()

    def pull() -> None:
        pulled = iter(batches)
        try:
            for batch in pulled:
                while not stop.is_set():
                    with contextlib.suppress(queue.Full):
                        results.put(batch, timeout=0.2)
                        break
                if stop.is_set():
                    return
            results.put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the driver thread, raised there
            if not stop.is_set():  # after a stop nobody reads the queue: end quietly
                results.put(e)
        finally:
            # Ends Ray Data's execution here, while Ray is still up (a stop shuts Ray down next,
            # :func:`_end_ray`, which waits for this thread first)
            with contextlib.suppress(Exception):
                pulled.close()

    threading.Thread(target=pull, name=RESULTS_THREAD, daemon=True).start()
    while not stop.is_set():
        try:
            item = results.get(timeout=0.2)
        except queue.Empty:
            if idle is not None:
                idle()
            continue
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _close_unit(spec: RestoreSpec, state: JobState, unit: str, records: list[dict[str, Any]],
                had_errors: bool, fence: Callable[[], None] | None = None) -> bool:
    """Commit a complete unit and add its records to the run's digest; return whether it was
    committed. Not committed: a unit where an image in it failed transiently (then the unit stays
    uncommitted and the next run redoes it, until the image has failed so in
    ``limits.transient_runs`` runs: then it is quarantined, :func:`_quarantine_repeats`) or its
    input vanished (``missing``): that unit
    stays open for :data:`MISSING_RUNS` runs, counted in ``_restorer/missing/unit-<id>.json``,
    and is committed with those images quarantined in the run after. A commit that still fails
    transiently after its retries leaves the unit for the next run too. A unit redone by
    ``--retry-failed`` (``had_errors``) takes its earlier records out of the digests' sums
    (one unit file read, before it is replaced)."""
    if any(r["status"] == "transient" for r in records) and not _quarantine_repeats(
            spec, state, unit, records):
        state.incomplete_units += 1
        return False
    missing = [r for r in records if r["status"] == "missing"]
    if missing:
        runs = missing_runs(spec, unit)
        if runs < MISSING_RUNS:
            note_missing(spec, unit, runs + 1, [r["key"] for r in missing])
            state.incomplete_units += 1
            return False
        for record in missing:  # gone for MISSING_RUNS runs and this one: quarantine
            _quarantine(state, record, f"{record['message']} (missing in {runs + 1} runs)",
                        "missing")
    earlier = _earlier_records(spec, unit) if had_errors else None
    try:
        retrying(lambda: commit_unit(spec, unit, records, had_errors, fence), RETRY_ATTEMPTS,
                 what=f"commit unit {unit}")
    except Exception as e:
        if classify(e) != TRANSIENT:
            raise
        log.warning("unit %s was not committed (%s: %s); the next run redoes it", unit,
                    type(e).__name__, e)
        state.incomplete_units += 1
        return False
    state.committed_units += 1
    state.committed_images += len(records)
    if earlier is not None:  # --retry-failed: its earlier records leave the job's digest
        state.digest.retract(earlier, unit)
    for record in records:  # committed records only: a stop or a retry leaves open units out
        state.digest.add(record)
    state.digest.commit(unit, len(records))
    if missing:
        forget_missing(spec, unit)
    if unit in state.transient_units:
        forget_transient(spec, unit)
    return True


def _quarantine_repeats(spec: RestoreSpec, state: JobState, unit: str,
                        records: list[dict[str, Any]]) -> bool:
    """Quarantine the images of ``unit`` that failed transiently in ``limits.transient_runs``
    runs (this one included), their faults' history in the message; record the others' faults
    in ``_restorer/transient/unit-<id>.json``. Returns whether the unit can commit (no image
    of it is still waiting for another run)."""
    history = transient_history(spec, unit) if unit in state.transient_units else {}
    waiting: dict[str, list[dict[str, Any]]] = {}
    for record in (r for r in records if r["status"] == "transient"):
        faults = history.get(record["key"], []) + [{
            "run": state.digest.run, "stage": record["stage"],
            "error_class": record["error_class"], "message": record["message"][:300]}]
        if len(faults) < spec.limits.transient_runs:
            waiting[record["key"]] = faults
            continue
        told = "; ".join(f"run {f['run']}: {f['stage']} {f['error_class']}: "
                         f"{f['message'][:160]}" for f in faults)
        _quarantine(state, record, f"failed transiently in {len(faults)} runs, quarantined: "
                                   f"{told}", "transient")
    if waiting:
        note_transient(spec, unit, waiting)
        state.transient_units.add(unit)
        return False
    return True


def _audit(spec: RestoreSpec, summary: dict[str, Any], run: Digest | None = None) -> None:
    """Count the whole job (every run so far) and flag outliers into the summary from the runs'
    digests (:mod:`restorer.output.digest`: one GET per run, plus the ledger units no digest
    covers), never by reading every ledger unit file; write summary.json, then the report page.

    A report that cannot be written is logged, never a failed job.
    """
    from restorer.report import MIN_RECORDS, MIN_SPREAD, OUTLIER_K, write_report

    options = spec.storage.options()
    if run is not None:
        _write_run_digest(spec, run)
    job = job_digest(spec.output.uri, options)
    summary["job"] = {"records": job.records, "succeeded": job.succeeded, "failed": job.failed}
    summary["flagged"] = flag(job, OUTLIER_K, MIN_SPREAD, MIN_RECORDS, limit=20)[0]
    summary["report"] = storage.join(spec.output.uri, f"{META_DIR}/report.html")
    write_summary(spec, summary)
    try:
        write_report(spec.output.uri, options, digest=job)
    except (RestorerError, OSError, ValueError) as e:
        log.warning("could not write the report page: %s", e)
        summary["report"] = None


def _quarantine(state: JobState, record: dict[str, Any], message: str, counted_as: str) -> None:
    """Turn a record that kept failing (a missing input, a transient fault) into a permanent
    failure: its message says why, and it moves from ``state.<counted_as>`` to the failures."""
    record.update(status="failed", message=message[:2000])
    setattr(state, counted_as, getattr(state, counted_as) - 1)
    state.failed += 1
    state.errors_by_class[record["error_class"]] = (
        state.errors_by_class.get(record["error_class"], 0) + 1)


def _count_in_background(tasks: list[ListingTask], config: SourceConfig,
                         progress: Progress, state: JobState) -> threading.Thread:
    """Give a folder's (or an object store prefix's) progress bar its total once a counting
    walk has finished, and the summary the non-image files the listing skipped
    (``skipped_non_images``). On object storage the walk lists the prefix a second time (one
    LIST request per 1,000 keys); the summary waits at most :data:`COUNT_WAIT_SECONDS` for
    it."""
    def count() -> None:
        try:
            counted = count_listing(tasks, config)
        except (OSError, RestorerError) as e:  # progress only: the listing reports errors
            log.debug("could not count the inputs: %s", e)
            return
        progress.set_total(counted.inputs)
        state.non_images, state.non_image_examples = (counted.non_images,
                                                      counted.non_image_examples)
        if counted.non_images:
            log.info("%d files of the input are not images (by extension: input.extensions) "
                     "and are skipped, e.g. %s", counted.non_images,
                     ", ".join(counted.non_image_examples[:3]))

    thread = threading.Thread(target=count, name="restorer-count", daemon=True)
    thread.start()
    return thread


def _ray_running() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _end_ray() -> None:
    """Shut this run's Ray down after a stop (an embedded one ends, a connected one ends this
    job's workers), waiting until its tasks can write no more."""
    import ray

    # Ray Data's executor thread, still running, then warns with tracebacks ("Ray is not
    # initialized", "SIGTERM handler is not set"): noise after a stop asked for, so Ray's
    # loggers keep only critical lines for the rest of this (ending) process.
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with contextlib.suppress(ImportError, AttributeError):  # nor may it start a new Ray
        import ray._private.auto_init_hook as auto_init  # (its ray.init resets those levels)

        auto_init.enable_auto_connect = False
    with contextlib.suppress(ImportError, AttributeError):  # nor the lines its workers and
        # raylet print about the actors ended below ("... will be retried. Error: The actor is
        # dead because it was killed by `ray.kill`"): the forwarded worker logs and the
        # cluster's error messages, both printed through this one function
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
        ray_worker.print_to_stdstream = lambda data, ignore_prefix: None
    # Ray Data's execution ends first, while Ray is up: its actors are killed and its tasks
    # cancelled, and the thread pulling results leaves Ray. A thread still inside Ray's client
    # when ray.shutdown() runs makes Ray end the whole process with exit code 1 ("the core
    # worker has already been shutdown"), so the stop would not exit 4.
    with contextlib.suppress(ImportError):
        from ray.data._internal.execution.streaming_executor import StreamingExecutor

        for thread in threading.enumerate():
            if isinstance(thread, StreamingExecutor):
                with contextlib.suppress(Exception):
                    thread.shutdown(force=True)
    deadline = time.monotonic() + END_RAY_WAIT_SECONDS
    for thread in threading.enumerate():
        if thread.name == RESULTS_THREAD:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    with contextlib.suppress(Exception):  # a stop must end calmly, whatever Ray says
        ray.shutdown()


def _settled_count(spec: RestoreSpec, step: float = 0.5, tries: int = 5) -> int | None:
    """:func:`_written_uncommitted` once two counts ``step`` s apart agree (the workers of a
    connected cluster end a moment after this driver leaves it)."""
    count = _written_uncommitted(spec)
    for _ in range(tries):
        if count is None:
            return None
        time.sleep(step)
        again = _written_uncommitted(spec)
        if again == count:
            return count
        count = again
    return count


def _written_uncommitted(spec: RestoreSpec) -> int | None:
    """Outputs present under the output but in no committed unit: what a rerun redoes and
    reports as ``replaced_outputs``. One listing of the output and one read of the ledger's
    output keys; None for the Parquet layout or when the output cannot be read now."""
    from restorer.output.ledger import ledger_records

    if spec.output.layout != "files":
        return None
    options = spec.storage.options()
    try:
        committed = {r["out_key"] for r in ledger_records(spec.output.uri, ["out_key"], options)}
        written = 0
        for folder in storage.walk_files(spec.output.uri, options=options):
            written += sum(1 for entry in folder if entry.key not in committed)
        return written
    except (RestorerError, OSError, ValueError) as e:
        log.warning("could not count the outputs left uncommitted: %s", e)
        return None


def _stopped_paragraph(state: JobState, why: str) -> str:
    """What a stop left, in one paragraph: what is kept, what will be redone, how to resume
    (the CLI adds the command)."""
    text = (f"Stopped by {why}. This run committed {state.committed_images} images in "
            f"{state.committed_units} work units; they are kept and a rerun skips them.")
    if state.in_flight_written is not None:
        text += (f" {state.in_flight_written} images were in flight: written but in units not "
                 "yet committed; the rerun restores them again and replaces those files "
                 "(its summary counts them as replaced_outputs).")
    else:
        text += (f" {state.abandoned} images had come back in units not yet committed; the "
                 "rerun restores them and any other image of an unfinished unit again.")
    return text + " To finish the job, rerun the same command."


@contextlib.contextmanager
def _stop_on_signals(received: dict[str, str] | None = None):
    """Turn SIGTERM (pre-emption, ``restorer jobs stop``) and a first Ctrl-C (SIGINT) into a
    stop request while running: the driver commits the units that are complete and returns. A
    second Ctrl-C aborts at once (``KeyboardInterrupt``); a rerun still resumes."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s: stopping; units already committed are kept, unfinished ones are redone "
                    "by the next run%s", name,
                    " (Ctrl-C again to abort now)" if signum == signal.SIGINT else "")
        if received is not None:
            received.setdefault("name", name)
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _probe_create_only(spec: RestoreSpec) -> None:
    """Warn, saying what exactly-once then means, when the output store does not refuse a
    second create-only write (the lease's generations and the ledger's entries rely on it)."""
    folder = meta_uri(spec.output.uri)
    if storage.create_only_honoured(folder, spec.storage.options()):
        return
    log.warning(
        "the output store at %s does not refuse a second create-only write (it ignores "
        "If-None-Match, or has no hard links): two jobs started on this output at the same "
        "moment could both take its lease, and a unit committed twice is replaced rather than "
        "refused. Exactly-once then holds only while one job at a time writes into this "
        "output: start one job per output (a job whose lease is taken over later still stops "
        "committing at once)", spec.output.uri)


def _absolute_paths(spec: RestoreSpec) -> RestoreSpec:
    """``spec`` with its local input, output and model file paths made absolute: Ray's workers
    do not share the driver's working folder (a connected cluster's run in its own), so a
    relative path would name another folder there."""
    import os

    from restorer.weights.zoo import bundled

    for section, name in (("input", "uri"), ("output", "uri"), ("model", "name")):
        value = getattr(getattr(spec, section), name)
        if not value or storage.is_remote(value) or value.startswith("file://"):
            continue
        if section == "model" and (value in bundled() or not os.path.exists(value)):
            continue
        spec = replace_field(spec, section, name, os.path.abspath(value))
    return spec


def _refuse_input_as_output(spec: RestoreSpec) -> None:
    import os

    if storage.is_remote(spec.input.uri) or storage.is_remote(spec.output.uri):
        same = spec.input.uri.rstrip("/") == spec.output.uri.rstrip("/")
    else:
        same = (os.path.realpath(storage.local_path(spec.input.uri))
                == os.path.realpath(storage.local_path(spec.output.uri)))
    if same:
        raise OutputConflictError(f"Output {spec.output.uri} is the input; outputs would "
                                  "overwrite inputs. Choose another output")


def _write_run_digest(spec: RestoreSpec, run: Digest) -> None:
    """Publish this run's digest (its committed units only). One that cannot be written is
    logged: the units it covers are in the ledger, and :func:`restorer.output.digest.job_digest`
    reads them back once later."""
    run.finished = time.time()
    try:
        retrying(lambda: write_digest(spec.output.uri, run, spec.storage.options()), 2,
                 what=f"write digest of run {run.run}")
    except Exception as e:
        if classify(e) != TRANSIENT:
            raise
        log.warning("could not write this run's digest (%s: %s); the next report reads its "
                    "units from the ledger", type(e).__name__, e)


def _earlier_records(spec: RestoreSpec, unit: str) -> list[dict[str, Any]] | None:
    """The ledger records of ``unit`` before it is redone (None: it has no ledger entry, so no
    digest counted it)."""
    try:
        records, _ = retrying(lambda: unit_records(spec.output.uri, unit,
                                                   spec.storage.options(), RECORD_COLUMNS),
                              what=f"read unit {unit}")
    except StorageError:
        return None
    return records
