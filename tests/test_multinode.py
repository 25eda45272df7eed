"""A restore on a three-node Ray cluster: actors spread over nodes, and a node lost mid-job.

The cluster (``ray.cluster_utils.Cluster``: a head and two worker nodes of 2 CPUs each, on this
machine) lives in a subprocess that runs this file as a script, so its Ray never mixes with the
test session's. The subprocess gets its own token file and Ray temp dir (``RAY_TMPDIR``), so it
cannot disturb another Ray on the machine, and stops every process it started when it exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import free_port

# first: before any test starts Ray in the pytest process (see conftest's collection hook)
pytestmark = [pytest.mark.slow, pytest.mark.first]

NODES = 3  # the head and two workers
CPUS_PER_NODE = 2
IMAGES = 40
SCRIPT_TIMEOUT_S = 400


def _write_images(root: Path, count: int, size: int, seed: int) -> list[str]:
    """``count`` gray PNGs in folders of 5, so that a job has several work units."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    keys = []
    for i in range(count):
        key = f"part{i // 5}/img{i:03d}.png"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / key)
        keys.append(key)
    return keys


def _restore_spec(input_uri: str, output_uri: str, shared_filesystem: bool = True):
    from restorer.job.specs import spec_from_dict

    return spec_from_dict({
        "kind": "restore", "name": "multinode",
        "input": {"uri": input_uri}, "output": {"uri": output_uri, "format": "png"},
        # the nodes of this cluster share this machine's disk: the check at start passes
        "storage": {"shared_filesystem": shared_filesystem},
        "model": {"tile": 64},
        "resources": {"workers": NODES, "gpus_per_worker": 0.0, "cpus_per_worker": 1.0,
                      "threads_per_worker": 1, "batch_size": 2},
    }).validate()


def _restore_actors() -> list[dict]:
    """The Ray Data actors that hold a RestoreActor, with their node and state."""
    from ray.util.state import list_actors

    return [{"node_id": a.node_id, "state": a.state, "pid": a.pid}
            for a in list_actors(detail=True, limit=1000)
            if "RestoreActor" in (a.repr_name or "") + (a.class_name or "")]


def _outputs(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def run_cluster(work: Path) -> dict:
    """The subprocess: build the cluster, run both restores, return what the tests check."""
    import ray
    from ray.cluster_utils import Cluster

    from restorer.pipeline import run_restore

    def node_args(**extra):
        return {"num_cpus": CPUS_PER_NODE, "object_store_memory": 100 * 2**20, **extra}

    cluster = Cluster(initialize_head=True, head_node_args=node_args(
        include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
        dashboard_agent_listen_port=free_port()))
    workers = [cluster.add_node(**node_args()) for _ in range(NODES - 1)]
    cluster.wait_for_nodes()
    result: dict = {"head": cluster.head_node.node_id,
                    "workers": [node.node_id for node in workers]}
    try:
        ray.init(address=cluster.address, configure_logging=False)

        # 0. Local paths: refused without --shared-filesystem; with it, every other node must
        # read the driver's marker (here they do: one disk), and a marker they cannot read
        # (written elsewhere than the path they are given) fails the check naming a node.
        from restorer.errors import SpecError
        from restorer.pipeline import runtime

        _write_images(work / "in0", 5, 16, seed=2)
        try:
            run_restore(_restore_spec(str(work / "in0"), str(work / "out0"), False))
            result["unshared"] = "not refused"
        except SpecError as e:
            result["unshared"] = str(e)
        (work / "meta0").mkdir()
        result["shared_check"] = runtime.refuse_unshared_paths(
            str(work / "in0"), str(work / "out0"), str(work / "meta0"), True)
        real_write = runtime.storage.write_bytes
        runtime.storage.write_bytes = lambda uri, data, *a, **k: real_write(uri + ".x", data)
        try:
            runtime.refuse_unshared_paths(str(work / "in0"), str(work / "out0"),
                                          str(work / "meta0"), True)
            result["not_shared"] = "not refused"
        except SpecError as e:
            result["not_shared"] = str(e)
        finally:
            runtime.storage.write_bytes = real_write

        # 1. All nodes up: one actor per node.
        keys = _write_images(work / "in1", IMAGES, 48, seed=0)
        summary = run_restore(_restore_spec(str(work / "in1"), str(work / "out1")))
        result["spread"] = {"keys": keys, "outputs": _outputs(work / "out1"),
                            "succeeded": summary["succeeded"], "failed": summary["failed"],
                            "actors": _restore_actors()}

        # 2. A worker node holding a restore actor dies once the first outputs are written.
        keys = _write_images(work / "in2", IMAGES, 96, seed=1)
        removed: dict = {}

        def remove_a_node() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not _outputs(work / "out2"):
                time.sleep(0.2)
            alive = {a["node_id"] for a in _restore_actors() if a["state"] == "ALIVE"}
            victim = next((n for n in workers if n.node_id in alive), workers[0])
            removed.update(node_id=victim.node_id, had_actor=victim.node_id in alive,
                           outputs_before=len(_outputs(work / "out2")))
            cluster.remove_node(victim, allow_graceful=False)

        remover = threading.Thread(target=remove_a_node, daemon=True)
        remover.start()
        summary = run_restore(_restore_spec(str(work / "in2"), str(work / "out2")))
        remover.join(timeout=60)
        result["node_lost"] = {"keys": keys, "outputs": _outputs(work / "out2"),
                               "succeeded": summary["succeeded"], "failed": summary["failed"],
                               "removed": removed,
                               "alive_nodes": sum(1 for n in ray.nodes() if n["Alive"])}
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory) -> dict:
    """Run the cluster script once in a subprocess; returns its result."""
    import ray

    if ray.is_initialized():  # as the exclusive_ray fixture does: one cluster at a time
        ray.shutdown()
    work = tmp_path_factory.mktemp("multinode")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rm-", dir="/tmp"))  # short: socket paths
    token = ray_tmp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=str(ray_tmp),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                           env.get("PYTHONPATH", "")]))
    # A session of its own, so that its process group holds every Ray process it starts.
    script = subprocess.Popen([sys.executable, __file__, str(work)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        output, _ = script.communicate(timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(script.pid, signal.SIGKILL)
        output, _ = script.communicate()
        pytest.fail(f"cluster script timed out after {SCRIPT_TIMEOUT_S} s:\n{output[-6000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)  # anything left behind
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if script.returncode != 0:
        pytest.fail(f"cluster script failed ({script.returncode}):\n{output[-6000:]}")
    return json.loads((work / "result.json").read_text())


def test_local_paths_need_a_checked_shared_filesystem(cluster_run, exclusive_ray):
    assert "--shared-filesystem" in cluster_run["unshared"]
    assert f"the cluster has {NODES} nodes" in cluster_run["unshared"]
    assert sorted(cluster_run["shared_check"]) == sorted(cluster_run["workers"])
    assert "does not see the paths" in cluster_run["not_shared"]
    assert "is not there" in cluster_run["not_shared"]
    assert any(node in cluster_run["not_shared"] for node in cluster_run["workers"])


def test_restore_actors_spread_over_nodes(cluster_run, exclusive_ray):
    run = cluster_run["spread"]
    assert run["outputs"] == sorted(run["keys"])
    assert (run["succeeded"], run["failed"]) == (IMAGES, 0)
    # actors that were placed (one the pool asked for and never placed has no node: seen once)
    placed = [a for a in run["actors"] if a["node_id"]]
    nodes = {a["node_id"] for a in placed}
    assert len(placed) >= NODES
    assert len(nodes) > 1, run["actors"]
    assert nodes <= {cluster_run["head"], *cluster_run["workers"]}


def test_restore_survives_losing_a_node(cluster_run, exclusive_ray):
    run = cluster_run["node_lost"]
    removed = run["removed"]
    assert removed["node_id"] in cluster_run["workers"]
    assert removed["had_actor"], "the node removed held no restore actor"
    assert removed["outputs_before"] < IMAGES, "the job had finished before the node was lost"
    assert run["alive_nodes"] == NODES - 1
    assert run["outputs"] == sorted(run["keys"])
    assert (run["succeeded"], run["failed"]) == (IMAGES, 0)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work_dir = Path(sys.argv[1])
    outcome = run_cluster(work_dir)
    (work_dir / "result.json").write_text(json.dumps(outcome, indent=2))
