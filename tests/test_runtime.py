import pytest

from restorer.errors import SpecError
from restorer.job.sizing import size_workers


def test_two_cpu_laptop_leaves_a_cpu_for_io_and_uses_both_cores():
    plan = size_workers(0, -1.0, 0.0, 0, total_cpus=2, total_gpus=0, node_cpus=2, nodes=1)
    assert (plan.workers, plan.cpus_per_worker, plan.gpus_per_worker) == (1, 1, 0.0)
    assert plan.threads_per_worker == 2


def test_gpu_cluster_gets_one_actor_per_gpu():
    plan = size_workers(0, -1.0, 0.0, 0, total_cpus=64, total_gpus=8, node_cpus=16, nodes=4)
    assert (plan.workers, plan.gpus_per_worker, plan.cpus_per_worker) == (8, 1.0, 1.0)
    half = size_workers(0, 0.5, 0.0, 0, total_cpus=64, total_gpus=2, node_cpus=16, nodes=1)
    assert half.workers == 4


def test_cpu_cluster_gets_one_actor_per_node():
    plan = size_workers(0, 0.0, 0.0, 0, total_cpus=48, total_gpus=0, node_cpus=16, nodes=3)
    assert (plan.workers, plan.cpus_per_worker, plan.threads_per_worker) == (3, 8, 16)


@pytest.mark.parametrize("args,match", [
    ((2, 0.0, 1.0, 0, 2, 0, 2, 1), "leave fewer than 1"),
    ((0, 1.0, 0.0, 0, 8, 0, 8, 1), "cluster has 0 GPUs"),
])
def test_impossible_plans_are_refused_not_hung(args, match):
    with pytest.raises(SpecError, match=match):
        size_workers(*args)


def test_explicit_gpu_workers_wait_for_an_autoscaling_cluster():
    plan = size_workers(4, 1.0, 0.0, 0, total_cpus=8, total_gpus=0, node_cpus=8, nodes=1)
    assert (plan.workers, plan.gpus_per_worker) == (4, 1.0)


def test_cheap_nets_get_single_thread_actors_unless_configured():
    from restorer.job.sizing import CHEAP_NET_MACS, WorkerPlan, macs_per_pixel
    from restorer.nets import build_net

    cheap = build_net({"arch": "dncnn", "channels": 3, "num_layers": 2, "num_features": 4})
    costly = build_net({"arch": "dncnn", "channels": 3, "num_layers": 6, "num_features": 32})
    assert macs_per_pixel(cheap) == 2 * 3 * 4 * 9
    assert macs_per_pixel(costly) == 2 * 3 * 32 * 9 + 4 * 32 * 32 * 9
    assert macs_per_pixel(cheap) < CHEAP_NET_MACS <= macs_per_pixel(costly)
    spec = {"arch": "unet", "channels": 1, "num_features": [4, 8], "num_blocks": 1}
    colour = build_net({"arch": "opponent", "trunk": spec})  # its trunk runs on three planes
    assert macs_per_pixel(colour) == 3 * macs_per_pixel(build_net(spec))
    two = size_workers(0, 0.0, 0.0, 0, 2.0, 0.0, 2.0, 1)  # a 2-CPU node: 1 actor of 1 CPU
    assert two == WorkerPlan(1, 1.0, 0.0, 2)
    assert size_workers(0, 0.0, 0.0, 0, 2.0, 0.0, 2.0, 1, cheap_net=True) == WorkerPlan(
        2, 0.5, 0.0, 1)
    sixteen = (0, 0.0, 0.0, 0, 32.0, 0.0, 16.0, 2)  # 2 nodes of 16
    assert size_workers(*sixteen, cheap_net=True) == WorkerPlan(16, 1.0, 0.0, 1)
    configured = size_workers(3, 0.0, 1.0, 2, 32.0, 0.0, 16.0, 2, cheap_net=True)
    assert configured == WorkerPlan(3, 1.0, 0.0, 2)  # configured: kept
    assert size_workers(3, 0.0, 1.0, 0, 32.0, 0.0, 16.0, 2, cheap_net=True).threads_per_worker == 1
    gpu = size_workers(0, 1.0, 0.0, 0, 16.0, 1.0, 16.0, 1, cheap_net=True)
    assert gpu == size_workers(0, 1.0, 0.0, 0, 16.0, 1.0, 16.0, 1)  # GPU plans: untouched
