"""Sizing a job's workers from the shape of a cluster (its CPUs, GPUs and nodes) and the cost of
its net, refusing plans that cannot be scheduled. Plain arithmetic: the shape comes from
:func:`restorer.pipeline.runtime.cluster_shape` (Ray) or from a test.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from restorer.errors import SpecError
from restorer.nets import RestorationNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlan:
    workers: int  # actors (restore) or train workers
    cpus_per_worker: float
    gpus_per_worker: float
    threads_per_worker: int  # torch intra-op threads


def size_workers(workers: int, gpus_per_worker: float, cpus_per_worker: float,
                 threads_per_worker: int, total_cpus: float, total_gpus: float,
                 node_cpus: float, nodes: int, reserve_cpus: float = 1.0,
                 can_autoscale: bool = True, cheap_net: bool = False) -> WorkerPlan:
    """Size the worker pool from the cluster, refusing plans that cannot be scheduled.

    A plan that takes every CPU would starve the decode/encode tasks and hang the pipeline
    forever, so ``reserve_cpus`` always stay free. CPU workers ask for half a node's CPUs but
    run ``threads_per_worker`` torch threads (default: all the node's cores), because decode and
    encode tasks only use their share in bursts.

    A ``cheap_net`` (under :data:`CHEAP_NET_MACS` per pixel, see :func:`macs_per_pixel`) on
    CPUs is different: torch threads cost it more in hand-offs than they save (measured
    in-process on a 2-core machine, a 2-layer, 4-feature DnCNN: 7.8 ms of CPU per image on one
    thread, 12.2 on two), and one actor's Python work per image (tiles, audit, Arrow), not the
    net, bounds it. So it gets one thread per actor and, unless ``workers`` or
    ``cpus_per_worker`` are given, several actors per node in the same half of the node (2
    CPUs: 2 actors of 0.5; 16 CPUs: 8 of 1).
    """
    if gpus_per_worker == -1.0:
        gpus_per_worker = 1.0 if total_gpus >= 1 else 0.0
    if gpus_per_worker > 0:
        if not can_autoscale and total_gpus < max(workers, 1) * gpus_per_worker:
            raise SpecError(f"{max(workers, 1)} workers x {gpus_per_worker:g} GPUs requested, but "
                            f"this local Ray has {total_gpus:g} GPUs and no autoscaler to add "
                            "any; use --gpus-per-worker 0 to run on CPUs, or --address a "
                            "cluster with GPUs")
        if workers and total_gpus < workers * gpus_per_worker:
            # Explicit GPU workers on a cluster that has fewer GPUs now: an autoscaling cluster
            # (min GPU workers 0) adds them when the actors ask; say so instead of refusing.
            log.warning("%d workers x %g GPUs requested; the cluster has %g GPUs now and must "
                        "autoscale to start them", workers, gpus_per_worker, total_gpus)
            return WorkerPlan(workers, cpus_per_worker or 1.0, gpus_per_worker,
                              threads_per_worker or 2)
        if total_gpus < gpus_per_worker:
            raise SpecError(f"gpus_per_worker = {gpus_per_worker} but the cluster has "
                            f"{total_gpus:g} GPUs; use --gpus-per-worker 0 to run on CPUs, or "
                            "give --workers to wait for an autoscaling cluster's GPU nodes")
        workers = workers or max(1, math.floor(total_gpus / gpus_per_worker + 1e-9))
        cpus_per_worker = cpus_per_worker or 1.0
        threads_per_worker = threads_per_worker or 2
        if workers * gpus_per_worker > total_gpus + 1e-9:
            raise SpecError(f"{workers} workers x {gpus_per_worker:g} GPUs need more than the "
                            f"cluster's {total_gpus:g} GPUs; lower --workers")
    else:
        if cheap_net and not workers and not cpus_per_worker and node_cpus >= 2:
            per_node = max(2, int(node_cpus // 2))
            workers, cpus_per_worker = per_node * nodes, (node_cpus // 2) / per_node
        cpus_per_worker = cpus_per_worker or max(0.5, math.floor(node_cpus / 2))
        workers = workers or max(1, nodes if total_cpus - nodes * cpus_per_worker >= reserve_cpus
                                 else 1)
        threads_per_worker = threads_per_worker or (1 if cheap_net else max(1, int(node_cpus)))
    if workers * cpus_per_worker > total_cpus - reserve_cpus + 1e-9:
        if reserve_cpus > 0:
            why = (f"leave fewer than {reserve_cpus:g} of the cluster's {total_cpus:g} CPUs "
                   "for reading and writing, and the job would hang")
        else:
            why = f"need more than the cluster's {total_cpus:g} CPUs"
        raise SpecError(f"{workers} workers x {cpus_per_worker:g} CPUs {why}; lower --workers "
                        "or resources.cpus_per_worker")
    return WorkerPlan(workers, cpus_per_worker, gpus_per_worker, threads_per_worker)


CHEAP_NET_MACS = 10_000  # multiply-adds per pixel under which a net is cheap (size_workers)


def macs_per_pixel(net: RestorationNet) -> int:
    """Multiply-adds per input pixel of ``net``'s convolutions, counted at full resolution (an
    upper bound for nets that pool: a U-Net's deeper levels run on fewer pixels), times the
    times a net runs its layers per pixel (``runs_per_pixel``: an opponent net's trunk, 3)."""
    import torch

    per_run = sum(m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                  // m.groups for m in net.modules()
                  if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d))
    return net.runs_per_pixel * per_run
