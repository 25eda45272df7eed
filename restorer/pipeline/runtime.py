"""Connecting to Ray, the shape of the cluster it finds, and checks of its nodes (the sizing
of work from that shape is Ray-free: :mod:`restorer.job.sizing`).

The embedded default is a single-node Ray started in this process with explicit CPUs and object
store size. ``RAY_AUTH_MODE`` is set deliberately: token authentication stays on (Ray's default
since 2.59; the token lives in ``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``) unless the caller set
the variable already.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from restorer.errors import SpecError
from restorer.io import storage

log = logging.getLogger(__name__)


def ensure_ray(address: str = "", num_cpus: int = 0, object_store_mb: int = 0) -> bool:
    """Start an embedded Ray (``address == ""``) or connect to ``address``; no-op if connected.

    Returns whether the Ray in use is embedded (started here, by this call or an earlier one):
    an embedded Ray has no autoscaler, so resources it lacks never come.
    """
    import ray  # RAY_AUTH_MODE is settled in restorer/__init__.py, before Ray is imported

    if ray.is_initialized():
        return _started_here()
    if address or os.environ.get("RAY_ADDRESS"):
        # Inside a submitted job (RAY_ADDRESS is set) or pointed at a cluster: connect only.
        kwargs: dict[str, Any] = {}
        if shadowing_folder() is not None:
            # Ray's workers can only be told at their start; a hook in the job's runtime
            # environment imports this package there before the driver's folder is on sys.path.
            kwargs["runtime_env"] = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
        ray.init(address=address or None, log_to_driver=True, **kwargs)
        return False
    kwargs = {"include_dashboard": False, "configure_logging": True,
              "logging_level": logging.WARNING,
              # every worker imports this package when it starts, before Ray puts the driver's
              # working folder first on its sys.path (see shadowing_folder): free, so always
              "_system_config": {"preload_python_modules": [PACKAGE]}}
    if num_cpus:
        kwargs["num_cpus"] = num_cpus
    if object_store_mb:
        kwargs["object_store_memory"] = object_store_mb * 1024 * 1024
    # "local": a new Ray of this process's own, even where other Rays run on the machine. With
    # no address Ray would connect to the one `ray start` made last (where num_cpus is refused)
    # or fail with "Found multiple active Ray instances".
    ray.init(address="local", **kwargs)
    return True


PACKAGE = __name__.partition(".")[0]  # "restorer"
WORKER_SETUP_HOOK = f"{__name__}.pin_package"


def shadowing_folder() -> str | None:
    """The driver's working folder, when something in it is named like this package and is not
    it (``restorer/``, the clone of this repository, from its parent folder); else None.

    Ray puts the driver's working folder first on every worker's ``sys.path`` (when the job
    has no ``working_dir``), so there a clone's root folder - no ``__init__.py``, a ``jobs/``
    folder - is imported as the package ``restorer`` (a namespace package, which wins over an
    editable install's import hook), where ``restorer.jobs`` was its ``jobs/`` folder: "cannot
    import name 'RestoreSpec' from 'restorer.jobs' (unknown location)" on every task, and no
    wing (``restorer.job``, ``restorer.pipeline``...) is found at all.
    """
    folder = os.path.abspath(os.curdir)
    ours = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in (PACKAGE, f"{PACKAGE}.py"):
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate) and os.path.realpath(candidate) != ours:
            return folder
    return None


def pin_package() -> None:
    """Ray's ``worker_process_setup_hook``: importing this module (done by Ray to find this
    function, when a worker starts) put the installed package in ``sys.modules``, before the
    driver's folder comes onto the worker's ``sys.path``; nothing more to do."""


def _started_here() -> bool:
    """Whether this process started the Ray head it is connected to (an embedded Ray)."""
    import ray._private.worker

    node = ray._private.worker._global_node
    return bool(node is not None and getattr(node, "head", False))


def cluster_shape() -> tuple[float, float, float, int]:
    """(total CPUs, total GPUs, largest node's CPUs, nodes alive) of the connected cluster."""
    import ray

    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    return total.get("CPU", 0.0), total.get("GPU", 0.0), node_cpus, len(nodes)


# --- local paths on a multi-node cluster -------------------------------------------------------

SHARED_CHECK_SECONDS = 120.0  # a node that does not answer the check in this time fails it


def refuse_unshared_paths(input_uri: str, output_uri: str, marker_folder: str,
                          shared_filesystem: bool) -> list[str]:
    """Refuse local input/output paths on a multi-node cluster unless they are on a shared
    file system; returns the ids of the other nodes that confirmed it (empty: nothing to check).

    Without ``shared_filesystem`` each node would read and write its own disk while the
    driver's ledger records the units as done: refused (:class:`SpecError`). With it, the
    driver writes a marker file under ``marker_folder`` (the output's ``_restorer/``) and a
    task pinned to every other alive node must read it back, and see the input as the driver
    does (a file's size, a folder's first names); a node that does not is named in the error.
    """
    import ray

    local = [uri for uri in (input_uri, output_uri) if not storage.is_remote(uri)]
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not local or len(nodes) < 2:
        return []
    if not shared_filesystem:
        raise SpecError(
            f"{' and '.join(local)} {'is a local path' if len(local) == 1 else 'are local paths'}"
            f" and the cluster has {len(nodes)} nodes: each node would read and write its own "
            "disk while this driver's ledger records the work as done. Use s3:// URIs, or, if "
            "the paths are on a file system every node mounts at the same path, pass "
            "--shared-filesystem (storage.shared_filesystem = true; it is checked)")
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    marker = storage.join(marker_folder, f".shared-check-{token}")
    storage.write_bytes(marker, token.encode())
    expected = _local_view(input_uri) if not storage.is_remote(input_uri) else None
    here = ray.get_runtime_context().get_node_id()
    probe = ray.remote(num_cpus=0, max_retries=0)(_local_check)
    try:
        pending = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(marker, token, input_uri, expected)
            for n in nodes if n["NodeID"] != here}
        for node, ref in pending.items():
            try:
                found = ray.get(ref, timeout=SHARED_CHECK_SECONDS)
            except Exception as e:  # noqa: BLE001 - a node that cannot answer fails the check
                found = f"it did not answer ({type(e).__name__}: {e})"
            if found:
                raise SpecError(f"--shared-filesystem: node {node} does not see the paths as "
                                f"this driver does: {found}. Mount them at the same path on "
                                "every node, or use s3:// URIs")
    finally:
        storage.delete(marker)
    return list(pending)


def _local_view(uri: str) -> tuple[str, int | list[str]]:
    """What a node sees at a local path: a file's size, a folder's first names, or nothing."""
    path = storage.local_path(uri)
    if os.path.isfile(path):
        return "file", os.path.getsize(path)
    if os.path.isdir(path):
        with os.scandir(path) as entries:
            return "folder", sorted(e.name for e in entries)[:32]
    return "missing", 0


def _local_check(marker: str, token: str, input_uri: str,
                 expected: tuple[str, int | list[str]] | None) -> str:
    """Run on another node: "" when it sees the driver's marker and the input as the driver
    does, else what differs."""
    try:
        with open(storage.local_path(marker), "rb") as f:
            if f.read().decode() != token:
                return f"the marker {marker} holds other contents"
    except OSError as e:
        return f"the marker {marker} written by the driver is not there ({e.strerror})"
    if expected is not None:
        seen = _local_view(input_uri)
        if tuple(seen) != tuple(expected):
            return f"the input {input_uri} looks different there ({seen[0]})"
    return ""
