"""Poison isolation: an image that kills its restore actor's process (here: ``os._exit`` when
the actor meets it) is quarantined alone; the rest of its batch, and of the job, is restored,
and the actor's restarts are bounded."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from restorer.pipeline.poison import IsolatingRestoreActor, PoisonRegistry

pytestmark = pytest.mark.slow

POISON = "poison.png"


class KillingActor(IsolatingRestoreActor):
    """Ends its own process, as the OOM killer or a fatal CUDA fault would, whenever it is
    given the poison image (whatever else is in its batch)."""

    def _restore_rows(self, rows):
        if any(r["key"] == POISON for r in rows):
            os._exit(1)
        super()._restore_rows(rows)


def test_the_registry_names_the_image_a_process_died_on():
    registry = PoisonRegistry()
    assert registry.begin("b") is None  # first attempt
    assert registry.begin("b") == {"deaths": 1, "killers": {}}  # died with the whole batch
    registry.mark("b", "a.png", "pid 1")
    registry.mark("b", "p.png", "pid 1")
    assert registry.begin("b") == {"deaths": 2, "killers": {"p.png": "pid 1"}}
    registry.end("b")
    assert registry.in_flight() == 0


def test_an_image_that_kills_its_actor_is_quarantined_alone(ray_session, tmp_path,
                                                            tiny_model, monkeypatch):
    import ray.cloudpickle

    from restorer.pipeline import graph, restore

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import us
    monkeypatch.setattr(graph, "RESTORE_ACTOR", KillingActor)
    source = tmp_path / "in"
    source.mkdir()
    rng = np.random.default_rng(2)
    names = [f"img{i}.png" for i in range(7)] + [POISON]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (24, 32), dtype=np.uint8)).save(source / name)
    out = tmp_path / "out"
    results: dict = {}
    job = threading.Thread(target=lambda: results.update(summary=restore(
        str(source), str(out), model=tiny_model, batch_size=4, workers=1)))
    job.start()
    job.join(timeout=300)
    assert not job.is_alive(), "the job kept retrying the batch that kills its actor"
    summary = results["summary"]
    assert (summary["succeeded"], summary["failed"]) == (7, 1)
    errors = pq.read_table(out / "_restorer" / "errors.parquet").to_pylist()
    assert [(e["key"], e["stage"], e["error_class"]) for e in errors] == [
        (POISON, "restore", "WorkerDiedError")]
    assert "died while restoring poison.png alone" in errors[0]["message"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names[:-1])


def test_actor_restarts_are_bounded(monkeypatch):
    """Ray Data restarts a dead actor for ever unless told otherwise."""
    from restorer.job.specs import RestoreSpec, spec_from_flags
    from restorer.pipeline import graph

    captured = {}

    class Dataset:
        def map_batches(self, fn, **kwargs):
            if isinstance(fn, type):
                captured.update(kwargs)
            return self

    monkeypatch.setattr(graph, "listing_dataset", lambda *args: Dataset())

    class Plan:
        workers, gpus_per_worker, cpus_per_worker, threads_per_worker = 1, 0, 1, 1

    monkeypatch.setattr(graph, "poison_registry", lambda: "registry")
    spec = spec_from_flags(RestoreSpec, input="in", output="out")
    graph.build_pipeline(spec, Plan(), [], None, frozenset())
    assert 0 < captured["max_restarts"] <= 100  # Ray Data's default (-1): for ever
    assert captured["max_task_retries"] == -1  # ends by itself: each death isolates more
    assert captured["fn_constructor_kwargs"]["registry"] == "registry"
