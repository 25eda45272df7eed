"""DDP checks of restorer.train.core, each run by tests/test_train.py in a process of its own.

A gloo process group set up inside the pytest process hung two full CI runs (2026-12-06),
once over TCP and once on a file store over loopback, while it passed alone; in a child
process with a time limit a hang fails one test instead of holding CI to its limit.

    python tests/ddp_checks.py CHECK STORE_DIR HANG_SECONDS
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys

import torch
import torch.distributed as dist
from test_train import TINY_NET, _batch  # this folder is on the path of a script run in it

from restorer.nets import build_net
from restorer.train import core


def trainer_on_a_ddp_net_keeps_unwrapped_state() -> None:
    torch.manual_seed(0)
    net = torch.nn.parallel.DistributedDataParallel(build_net(TINY_NET))
    trainer = core.Trainer(net, torch.optim.Adam(net.parameters(), lr=1e-2), "l1",
                            core.Precision(), core.EMA(net, 0.9))
    clean, noisy = _batch()
    losses = [trainer.step(clean, noisy, lr=1e-2) for _ in range(5)]
    assert losses[-1] < losses[0], losses
    state = trainer.state_dict()
    assert not any(k.startswith("module.") for k in (*state["net"], *state["ema"]))
    assert trainer.averaged() is trainer.ema.net


def train_step_reads_the_scale_of_a_ddp_wrapped_net() -> None:
    net = torch.nn.parallel.DistributedDataParallel(
        build_net({"arch": "srnet", "channels": 1, "num_features": 4, "num_blocks": 1}))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss = core.train_step(net, optimizer, torch.rand(2, 1, 32, 32), torch.rand(2, 1, 16, 16))
    assert loss > 0, loss


CHECKS = {f.__name__: f for f in (trainer_on_a_ddp_net_keeps_unwrapped_state,
                                  train_step_reads_the_scale_of_a_ddp_wrapped_net)}

if __name__ == "__main__":
    check, store, hang_seconds = CHECKS[sys.argv[1]], sys.argv[2], float(sys.argv[3])
    # a hang prints where every thread stands and exits 1 (the caller shows it)
    faulthandler.dump_traceback_later(hang_seconds, exit=True)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        check()
    finally:
        dist.destroy_process_group()
    print(f"{check.__name__}: ok")
