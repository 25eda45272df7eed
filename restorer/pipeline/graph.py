"""The Ray Data graph of a restore job: the one pipeline builder (:func:`build_pipeline`).

list (:func:`expand_task` over :mod:`restorer.pipeline.sources`' listing tasks) -> read + decode
(:func:`restorer.pipeline.stages.read_and_decode`) -> restore (a pool of
:class:`restorer.pipeline.poison.IsolatingRestoreActor`, a
:class:`restorer.pipeline.actor.RestoreActor` that isolates an image killing its process) -> encode
+ write (:func:`restorer.pipeline.stages.encode_and_write`). The driver
(:mod:`restorer.pipeline.driver`) consumes the records it yields.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from restorer.errors import TRANSIENT, backoff_delays, classify
from restorer.io import codec, storage
from restorer.job import console
from restorer.job.specs import RestoreSpec
from restorer.output.records import RETRY_ATTEMPTS
from restorer.pipeline.poison import (
    ACTOR_MAX_RESTARTS,
    ACTOR_MAX_TASK_RETRIES,
    IsolatingRestoreActor,
    PoisonRegistry,
)
from restorer.pipeline.sources.listing import expand
from restorer.pipeline.sources.tasks import ListingTask, SourceConfig
from restorer.pipeline.sources.units import truncate_unit
from restorer.pipeline.stages import encode_and_write, read_and_decode

log = logging.getLogger(__name__)

BLOCK_BYTES = 8 << 20  # Ray Data's target_max_block_size for a job's graph (see listing_dataset)
LISTING_CPUS = 0.25  # a listing task mostly waits on storage
RESTORE_ACTOR = IsolatingRestoreActor  # the restore stage's class (restorer.pipeline.poison)


def build_pipeline(spec: RestoreSpec, plan, tasks: list, config: SourceConfig,
                   done: frozenset[str], resumed: bool = False, model_sha256: str = "",
                   registry: Any = None) -> Any:
    """The Ray Data graph of a restore job (the one pipeline builder).

    With ``input.limit`` the (small) listing runs in the driver; otherwise each listing task
    runs in a Ray task and its rows stream on in small blocks, so decoding starts while
    listing goes on. ``registry``: the job's :class:`restorer.pipeline.poison.PoisonRegistry` actor
    (:func:`poison_registry`; made here if not given).
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    _configure_ray_data()
    options = spec.storage.options()
    encode_options = codec.EncodeOptions(spec.output.format, spec.output.jpeg_quality,
                                         spec.output.jpeg_subsampling,
                                         spec.output.png_compress_level)
    if spec.input.limit:
        rows: list[dict[str, Any]] = []
        for task in tasks:
            for unit in expand(task, config, done):
                real = sum(1 for r in unit if r["status"] != "skipped") or unit[0]["unit_size"]
                if len(rows) + real > spec.input.limit:
                    unit = truncate_unit(unit, spec.input.limit - len(rows), done)
                rows.extend(unit)
                if sum(1 if r["status"] != "skipped" else r["unit_size"] for r in rows) >= \
                        spec.input.limit:
                    break
            else:
                continue
            break
        ds = ray.data.from_items(rows or [], override_num_blocks=max(1, math.ceil(len(rows) / 8)))
    else:
        ds = listing_dataset(tasks, config, done)
    ds = ds.map_batches(
        read_and_decode, batch_format="pyarrow", batch_size=8, num_cpus=0.5,
        fn_kwargs={"storage_options": options, "max_pixels": spec.limits.max_pixels,
                   "max_input_bytes": spec.limits.max_input_mb * 1024 * 1024})
    # OpenMP threads that spin between parallel regions take the cores that decode and encode
    # need: on a 2-core machine a CPU actor with 2 torch threads used ~9x the CPU per image of
    # a small net (and ~2x of the default U-Net) for the same or a longer wall time.
    actor_env = {} if plan.gpus_per_worker else {"runtime_env": {"env_vars": {
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}}
    # Bounded restarts (Ray Data's default is for ever, for actors and their batches): a batch
    # whose actor died is retried image by image and the image that kills it quarantined
    # (restorer.pipeline.poison); the registry is a small actor of this job.
    if registry is None:
        registry = poison_registry()
    ds = ds.map_batches(
        RESTORE_ACTOR, batch_format="pyarrow", batch_size=spec.resources.batch_size,
        compute=ActorPoolStrategy(size=plan.workers), num_cpus=plan.cpus_per_worker,
        num_gpus=plan.gpus_per_worker, max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_TASK_RETRIES, **actor_env,
        fn_constructor_kwargs={
            "registry": registry, "model": spec.model.name or None, "tile": spec.model.tile,
            "overlap": spec.model.overlap, "precision": spec.model.precision,
            "channels_last": spec.model.channels_last, "strength": spec.model.strength,
            "tile_batch": spec.resources.tile_batch, "threads": plan.threads_per_worker,
            "storage_options": options, "compile": spec.model.compile,
            "model_sha256": model_sha256, "flat_fill": spec.model.flat_fill})
    return ds.map_batches(
        encode_and_write, batch_format="pyarrow", batch_size=8, num_cpus=0.5,
        fn_kwargs={"output_uri": spec.output.uri, "options": encode_options,
                   "storage_options": options, "layout": spec.output.layout,
                   "resumed": resumed})


def _configure_ray_data() -> None:
    """In quiet mode, Ray Data shows no progress of its own (ours replaces it) and no plan."""
    if not console.quiet:
        return
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in console.RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(
                    handler, "stream", None) in (sys.stderr, sys.stdout):
                handler.addFilter(console.console_worthy)


def poison_registry() -> Any:
    """The job's :class:`restorer.pipeline.poison.PoisonRegistry` actor, on the driver's node (it
    lives as long as the job; a worker node lost mid-job must not take it along)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(num_cpus=0)(PoisonRegistry).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True)).remote()


def listing_dataset(tasks: list[ListingTask], config: SourceConfig, done: frozenset[str]) -> Any:
    """The listing stage: one Ray task per listing task, its rows flowing on as they are made."""
    import ray.data

    ds = ray.data.from_items([dataclasses.asdict(task) for task in tasks],
                             override_num_blocks=max(1, len(tasks)))
    # A map task's output leaves it when a block is full (Ray's default: 128 MiB, some 500k
    # listing rows) or at the task's end: a flat prefix of millions of keys, listed by one task,
    # would reach the decoders only once listed. Blocks of 8 MiB (some 30k rows) let its rows
    # flow after its first ~100k keys (Ray hands a task's blocks on about three behind it). The
    # context is this job's own copy (from_items takes one) and governs the whole graph built
    # on it, and a block is a unit of Ray Data's scheduling: with 1 or 2 MiB a decode batch of 8
    # small images left in blocks of 1-3 and the job ran at 56-71% of its speed
    # (bench_pipeline_overhead: 62.5 / 79.2 images/s against 111.0 at 128 MiB, 111.5 at 4 MiB,
    # 111.8 at 8 MiB).
    ds.context.target_max_block_size = BLOCK_BYTES
    ds = ds.map_batches(expand_tasks, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"config": config, "done": done}, num_cpus=LISTING_CPUS)
    if config.layout == "files":
        # A folder is listed by one task, whatever its size: cut its blocks into 32 rows so
        # that many decode tasks share them. Manifests and shards are listed in chunks.
        ds = _rows_in_blocks_of(ds, 32)
    return ds


def _rows_in_blocks_of(ds: Any, rows: int) -> Any:
    """``ds.repartition(target_num_rows_per_block=rows)``, run inside the listing tasks.

    Ray Data 2.60 fuses a map_batches with the streaming repartition after it only when both
    ask the same resources (``operator_fusion.are_remote_args_compatible``), and the public
    ``repartition`` asks 1 CPU: unfused, every block of listing rows waits for a 1-CPU task of
    its own, which a small node's decode tasks and actors hold (the listing stalls behind
    them). Given the listing's ``LISTING_CPUS`` the two fuse and rows leave the listing task
    in blocks of ``rows``. Built from Ray Data's logical operator, as ``repartition`` builds it;
    a Ray without it gets the public call.
    """
    try:
        from ray.data._internal.logical.interfaces import LogicalPlan
        from ray.data._internal.logical.operators import StreamingRepartition
        from ray.data.dataset import Dataset

        op = StreamingRepartition(target_num_rows_per_block=rows,
                                  input_dependencies=[ds._logical_plan.dag],
                                  ray_remote_args={"num_cpus": LISTING_CPUS})
    except (ImportError, TypeError, AttributeError) as e:
        log.warning("Ray Data has no StreamingRepartition as 2.60 had (%s): listing rows are "
                    "cut into blocks by 1-CPU tasks", e)
        return ds.repartition(target_num_rows_per_block=rows)
    return Dataset._from_parent(ds, LogicalPlan(op, ds.context))


def expand_tasks(batch: pa.Table, config: SourceConfig,
                 done: frozenset[str]) -> Iterator[pa.Table]:
    """Ray Data map_batches: the rows of each listing task in ``batch``, in tables of up to 32
    rows as they are made (they would leave the task at once if fused with the repartition
    after it; see :func:`listing_dataset`)."""
    for row in batch.to_pylist():
        rows: list[dict[str, Any]] = []
        for listed in expand_task(row, config, done):
            rows.append(listed)
            if len(rows) >= 32:
                yield pa.Table.from_pylist(rows)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows)


def expand_task(row: dict[str, Any], config: SourceConfig,
                 done: frozenset[str]) -> Iterator[dict[str, Any]]:
    """The rows of one listing task, unit by unit (a generator: :func:`expand_tasks` hands
    them on in small tables as they are made)."""
    task = ListingTask(**{f.name: row[f.name] for f in dataclasses.fields(ListingTask)})
    delays = backoff_delays(RETRY_ATTEMPTS)
    yielded = 0  # units handed on; a retried listing skips them (units come in a stable order)
    for attempt in range(RETRY_ATTEMPTS):
        try:
            for index, unit in enumerate(expand(task, config, done)):
                if index >= yielded:
                    yield from unit
                    yielded += 1
            return
        except Exception as e:  # classified here; permanent ones are re-raised
            if attempt == RETRY_ATTEMPTS - 1 or classify(e) != TRANSIENT:
                raise
            log.info("list %s: %s: %s; retry %d of %d in %.1f s", task.uri, type(e).__name__,
                     e, attempt + 1, RETRY_ATTEMPTS - 1, delays[attempt])
            time.sleep(delays[attempt])




def source_config(spec: RestoreSpec, layout: str) -> SourceConfig:
    return SourceConfig(layout, spec.input.extensions, spec.input.include, spec.input.exclude,
                        spec.output.format, spec.input.key_column, spec.input.bytes_column,
                        spec.input.uri_column, spec.storage.options(),
                        skip_prefix=output_inside_input(spec))


def output_inside_input(spec: RestoreSpec) -> str:
    """The output's key prefix inside the input folder ("" when it lies elsewhere)."""
    import os

    source, target = spec.input.uri, spec.output.uri
    if storage.is_remote(source) != storage.is_remote(target):
        return ""
    if storage.is_remote(source):
        source, target = source.rstrip("/") + "/", target.rstrip("/") + "/"
        return target[len(source):] if target.startswith(source) and target != source else ""
    source = os.path.realpath(storage.local_path(source))
    target = os.path.realpath(storage.local_path(target))
    if target != source and target.startswith(source.rstrip(os.sep) + os.sep):
        return os.path.relpath(target, source).replace(os.sep, "/") + "/"
    return ""
