"""Benchmark: what the pipeline costs per image outside the net, side by side in one run.

Run:  python tests/benchmarks/bench_pipeline_overhead.py [--images 1000] [--repeats 3]

On the same JPEG photos (smooth gradients, discs, stripes and noise; mixed sizes, some larger
than one 256 px tile) and with the same near-free net (DnCNN, 2 layers, 4 features, RGB):

- **plain**: the plain Ray Data batch-inference pattern: ``read_binary_files`` -> decode in
  ``map_batches`` tasks (batch 8, 0.5 CPU) -> one actor (``ActorPoolStrategy(size=1)``, 1 CPU)
  running the net image by image -> JPEG encode and a temp-file-and-rename write in tasks ->
  the driver iterates;
- **restorer**: a ``restorer`` job (ledger, audit, quarantine, tiling) on the same files.

Each repeat runs both, in one Ray (2 CPUs, a 300 MB object store); the figures are medians over
repeats. Steady rates run from the first results to reach the driver to the last (start-up
left out), as restorer's summary counts them. Restorer's CPU per image by stage comes from
``time.process_time`` around its stage functions inside the workers (a worker set-up hook
wraps them; restorer itself is unchanged) and from ``/proc`` CPU times of the driver, the
actor process, the task workers and Ray's own processes.

``--as-cli``: the job as a user runs it, on photo JPEGs as users have them::

    python tests/benchmarks/bench_pipeline_overhead.py --as-cli [--images 1100] [--repeats 3]

- images: photo-like JPEGs (quality 90) with sides drawn from 384-768 px, never a multiple of
  the 256 px tile (:func:`user_photo_sizes`); with ``--crops``, 384 x 384 crops and one
  500 x 500 photo in 11 (:func:`crop_photo_sizes`: the set the throughput issue measured);
- **restorer**: ``restorer restore IN OUT --model cheap.safetensors`` in a subprocess, every
  other setting at its default (its own embedded Ray with all CPUs and Ray's default object
  store, the output format of the input, the default audit, plan and tile); its steady
  images/s from the job's ``_restorer/summary.json``;
- **plain**: the same pattern as above in a Ray started as the CLI starts its own (all CPUs,
  Ray's default object store), started before and stopped after each repeat so that only one
  Ray runs at a time.

CPU ms per image there is that of every process of each case (``/proc``), not by stage.
``--variant '--workers 1'`` adds a run with those flags, ``--src DIR`` one of the restorer
package in DIR (another version of the code), each repeat running every case in turn.

``--in-process [--user-photos]``: no Ray; restorer's stage functions (``read_and_decode``,
``RestoreActor.__call__``, ``encode_and_write``) and the plain pattern's, run one after the
other on the same photos in this process with one torch thread: each stage's CPU per image,
best of ``--repeats``. What Ray adds (transfers, task and actor overheads) is left out.
"""

import argparse
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from memory import _descendants

from restorer.nets import build_net
from restorer.pipeline import restore
from restorer.weights.checkpoint import save_model

TICKS = os.sysconf("SC_CLK_TCK")
SIZES = [(384, 384)] * 9 + [(192, 256)] * 9 + [(480, 640)] * 2  # (height, width), cycled


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like uint8 RGB image: gradients, soft discs, a stripe band, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    for c in range(3):
        angle = rng.uniform(0, np.pi)
        plane = 0.2 + 0.5 * (np.cos(angle) * x / width + np.sin(angle) * y / height) / 1.5
        for _ in range(5):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            radius = rng.uniform(0.05, 0.3) * min(height, width)
            inside = np.clip((radius - np.hypot(y - cy, x - cx)) / 3, 0, 1)  # soft edge
            plane = plane * (1 - inside) + rng.uniform(0, 1) * inside
        band = (y > height * 0.7) & (y < height * 0.8)
        plane = np.where(band, plane + 0.15 * np.sin(x / rng.uniform(3, 9)), plane)
        image[..., c] = plane
    image += rng.normal(0, 8 / 255, image.shape)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def user_photo_sizes(count: int, tile: int = 256, seed: int = 0) -> list[tuple[int, int]]:
    """(height, width) of ``count`` user photos: each side drawn from 384-768 px, never a
    multiple of ``tile`` (a photo's sides rarely are: tiling and padding cost what they cost)."""
    rng = np.random.default_rng(seed)
    sides = [int(s) for s in rng.integers(384, 769, 4 * count) if s % tile]
    return list(zip(sides[0::2], sides[1::2]))[:count]


def crop_photo_sizes(count: int) -> list[tuple[int, int]]:
    """(height, width) of the crops-and-photos set the throughput issue measured with: ten 384 x
    384 crops to one whole 500 x 500 photo (1,000 and 100 in 1,100 images), interleaved."""
    return [(500, 500) if i % 11 == 10 else (384, 384) for i in range(count)]


def photo_sizes(args: argparse.Namespace) -> list[tuple[int, int]] | None:
    """The image sizes the flags ask for (None: the mixed small :data:`SIZES`)."""
    if args.crops:
        return crop_photo_sizes(args.images)
    return user_photo_sizes(args.images) if args.user_photos or args.as_cli else None


def write_photos(folder: Path, count: int, sizes: list[tuple[int, int]] | None = None) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        height, width = sizes[i] if sizes else SIZES[i % len(SIZES)]
        Image.fromarray(photo(height, width, i)).save(folder / f"img{i:05d}.jpg", quality=90)


# --- the plain Ray Data pattern -------------------------------------------------------------

def plain_decode(batch: dict) -> dict:
    images = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in batch["bytes"]]
    return {"path": batch["path"], "image": np.array(images + [None], dtype=object)[:-1]}


class PlainNet:
    def __init__(self, model: str):
        import torch

        from restorer.weights.zoo import get_model

        self.torch = torch
        self.net = get_model(model).net.eval()

    def __call__(self, batch: dict) -> dict:
        torch = self.torch
        out = []
        with torch.inference_mode():
            for image in batch["image"]:
                x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(255)
                y = self.net(x)[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0)
                out.append(y.numpy())
        return {"path": batch["path"], "image": np.array(out + [None], dtype=object)[:-1]}


def plain_write(batch: dict, output: str) -> dict:
    sizes = []
    for path, image in zip(batch["path"], batch["image"]):
        target = os.path.join(output, os.path.basename(path))
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=95, subsampling=0)
        with open(target + ".tmp", "wb") as f:
            f.write(buffer.getvalue())
        os.replace(target + ".tmp", target)
        sizes.append(buffer.tell())
    return {"path": batch["path"], "bytes": np.array(sizes)}


def run_plain(source: Path, output: Path, model: str) -> float:
    """The plain pattern's steady images/s (first results to last, as restorer counts)."""
    output.mkdir()
    ds = ray.data.read_binary_files(str(source), include_paths=True)
    ds = ds.map_batches(plain_decode, batch_size=8, num_cpus=0.5)
    ds = ds.map_batches(PlainNet, fn_constructor_kwargs={"model": model}, batch_size=8,
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    ds = ds.map_batches(plain_write, batch_size=8, num_cpus=0.5,
                        fn_kwargs={"output": str(output)})
    count, first, first_count, last = 0, None, 0, None
    for batch in ds.iter_batches(batch_size=None):
        count += len(batch["path"])
        now = time.time()
        if first is None:
            first, first_count = now, count
        last = now
    return (count - first_count) / (last - first)


# --- CPU accounting ----------------------------------------------------------------------------

def instrument() -> None:
    """Worker set-up hook: time restorer's stage functions (CPU seconds, rows) in this worker,
    appending ``stage cpu_seconds rows`` lines to ``$BENCH_STAGES/<pid>`` per call.

    The wrappers go in when ``restorer.pipeline.stages`` / ``restorer.pipeline.actor`` are first
    imported (a meta path finder), so a worker that never runs a restorer stage does not import them
    (nor torch) because of this."""
    import importlib.abc
    import time as clock

    path = os.path.join(os.environ["BENCH_STAGES"], str(os.getpid()))

    def timed(stage, fn, rows):
        def wrapper(*args, **kwargs):
            started = clock.process_time()
            result = fn(*args, **kwargs)
            with open(path, "a") as f:
                f.write(f"{stage} {clock.process_time() - started} {rows(args)}\n")
            return result
        return wrapper

    def patch(module) -> None:
        if module.__name__ == "restorer.pipeline.stages":
            module.read_and_decode = timed("decode", module.read_and_decode,
                                           lambda a: a[0].num_rows)
            module.encode_and_write = timed("encode_write", module.encode_and_write,
                                            lambda a: a[0].num_rows)
        else:
            actor = module.RestoreActor
            actor.__call__ = timed("actor_call", actor.__call__, lambda a: a[1].num_rows)
            actor._forward = timed("net", actor._forward, lambda a: 0)

    class PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, import_path, target=None):
            if name not in PATCHED:
                return None
            for finder in sys.meta_path:
                if finder is not self and hasattr(finder, "find_spec"):
                    spec = finder.find_spec(name, import_path, target)
                    if spec is not None:
                        break
            else:
                return None
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    for name in PATCHED:
        if name in sys.modules:
            patch(sys.modules[name])
    if not all(name in sys.modules for name in PATCHED):
        sys.meta_path.insert(0, PatchOnImport())


PATCHED = ("restorer.pipeline.stages", "restorer.pipeline.actor")  # where the stage functions and the actor live


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (OSError, ValueError, IndexError):
        return 0.0


def process_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def kind(pid: int) -> str:
    title = process_title(pid)
    if not title:
        return ""
    if "RestoreActor" in title or "PlainNet" in title:
        return "actor"
    if any(name in title for name in ("_StatsActor", "_AutoscalingCoordinatorActor",
                                      "ActorLocationTracker", "SplitCoordinator")):
        return "ray_data_actors"
    if title.startswith("ray::"):
        return "workers"
    return "ray"


class ProcessCpu:
    """CPU seconds used meanwhile by the processes below this driver, by kind, sampled every
    0.25 s (a process that exits loses at most its last interval), and by this driver."""

    def __init__(self):
        self.start: dict[int, float] = {}  # CPU seconds at __enter__; processes started later: 0
        self.last: dict[int, tuple[str, float]] = {}  # kind (an actor stays one), CPU seconds
        self.titles: dict[int, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid in _descendants(os.getpid()):
            self.titles.setdefault(pid, set()).add(process_title(pid)[:60])
            previous = self.last.get(pid, ("", 0.0))[0]
            sticky = ("actor", "ray_data_actors")
            label = previous if previous in sticky else (kind(pid) or previous)
            self.last[pid] = (label, cpu_seconds(pid))

    def _run(self):
        while not self._stop.wait(0.25):
            self._sample()

    def __enter__(self):
        self._sample()
        self.start = {pid: seconds for pid, (_, seconds) in self.last.items()}
        self.driver_start = time.process_time()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.driver = time.process_time() - self.driver_start
        self.by_kind: dict[str, float] = {}
        for pid, (label, seconds) in self.last.items():
            label = label or "ray"
            self.by_kind[label] = self.by_kind.get(label, 0.0) + seconds - self.start.get(pid, 0)


def read_stages(folder: Path) -> dict[str, tuple[float, int]]:
    totals: dict[str, list[float]] = {}
    for path in folder.iterdir():
        for line in path.read_text().splitlines():
            stage, seconds, rows = line.split()
            entry = totals.setdefault(stage, [0.0, 0])
            entry[0] += float(seconds)
            entry[1] += int(rows)
        path.unlink()
    return {k: (v[0], int(v[1])) for k, v in totals.items()}


def driver_timers() -> dict[str, float]:
    """Time the driver's record loop (its own thread: ``thread_time``) and the end-of-job audit
    and report (the whole process) by wrapping them in this process."""
    from restorer.pipeline import driver

    spent = {"execute": 0.0, "audit": 0.0}

    def timed(name, fn, clock):
        def wrapper(*args, **kwargs):
            started = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += clock() - started
        return wrapper

    driver._execute = timed("execute", driver._execute, time.thread_time)
    driver._audit = timed("audit", driver._audit, time.process_time)
    return spent


def run_restorer(source: Path, output: Path, model: str, stages: Path,
                 batch_size: int, driver: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Restorer's steady images/s and its CPU ms per image by stage."""
    driver.update(execute=0.0, audit=0.0)
    with ProcessCpu() as cpu:
        summary = restore(str(source), str(output), model=model, format="jpeg",
                          batch_size=batch_size)
    images = summary["succeeded"]
    if summary["failed"] or not images:
        raise RuntimeError(f"restorer job failed: {summary['errors_by_class']}")
    timed = read_stages(stages)
    net = timed.get("net", (0.0, 0))[0]
    call = timed.get("actor_call", (0.0, 0))[0]
    decode = timed.get("decode", (0.0, 0))[0]
    encode = timed.get("encode_write", (0.0, 0))[0]
    per_image = {
        "decode (read_and_decode)": decode,
        "actor: net (_forward)": net,
        "actor: outside the net (__call__ - net)": call - net,
        "actor process: rest (Ray transfers, idle threads)": cpu.by_kind.get("actor", 0) - call,
        "encode + write (encode_and_write)": encode,
        "task workers: rest (Ray task overhead, worker start-up)":
            cpu.by_kind.get("workers", 0) - decode - encode,
        "Ray Data's own actors (stats, autoscaling, locations)":
            cpu.by_kind.get("ray_data_actors", 0),
        "driver: records and ledger commits (_execute's thread)": driver["execute"],
        "driver: audit and report at the end": driver["audit"],
        "driver: rest (Ray Data's executor, listing, set-up)":
            cpu.driver - driver["execute"] - driver["audit"],
        "Ray system processes (raylet, GCS)": cpu.by_kind.get("ray", 0),
    }
    if os.environ.get("BENCH_PROCESSES"):
        for pid, (label, seconds) in sorted(cpu.last.items()):
            print(f"  {pid} {label} {seconds - cpu.start.get(pid, 0):.2f} s "
                  f"{sorted(cpu.titles[pid])}")
    per_image = {k: 1000 * v / images for k, v in per_image.items()}
    per_image["total"] = sum(per_image.values())
    return summary["steady_images_per_second"], per_image


def run_cli(source: Path, output: Path, model: str, extra: list[str] | None = None,
            src: str = "") -> tuple[float, float]:
    """``restorer restore SOURCE OUTPUT --model MODEL [EXTRA...]`` as a user runs it: its
    steady images/s (from the job's summary.json) and the CPU seconds of all its processes.
    ``src``: import restorer from this source folder instead (``PYTHONPATH``; Ray's workers
    inherit it), to measure another version of the code in the same run."""
    env = dict(os.environ, PYTHONPATH=src) if src else None
    with ProcessCpu() as cpu:
        done = subprocess.run([sys.executable, "-m", "restorer", "restore", str(source),
                               str(output), "--model", model, *(extra or [])],
                              capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"restorer restore exited {done.returncode}: {done.stderr[-2000:]}")
    summary = json.loads((output / "_restorer" / "summary.json").read_text())
    if summary["failed"] or not summary["succeeded"]:
        raise RuntimeError(f"restorer job failed: {summary['errors_by_class']}")
    return summary["steady_images_per_second"], sum(cpu.by_kind.values())


def main_as_cli(args: argparse.Namespace) -> None:
    """Plain Ray Data vs ``restorer restore`` with its defaults, on user-like photo JPEGs."""
    cases = {"restorer restore": ([], "")}
    for variant in args.variant:
        cases[f"restorer restore {variant}"] = (variant.split(), "")
    for src in args.src:
        cases[f"restorer restore (code in {src})"] = ([], src)
    rates: dict[str, list[float]] = {name: [] for name in ["plain", *cases]}
    cpu: dict[str, list[float]] = {name: [] for name in rates}
    with tempfile.TemporaryDirectory(prefix="bench-as-cli-") as scratch:
        root = Path(scratch)
        source = root / "in"
        sizes = photo_sizes(args)
        write_photos(source, args.images, sizes)
        net = build_net({"arch": "dncnn", "channels": 3, "num_features": 4, "num_layers": 2})
        model = str(root / "cheap.safetensors")
        save_model(model, net)
        for repeat in range(args.repeats):
            if not args.skip_plain:
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
                ray.data.DataContext.get_current().enable_progress_bars = False
                with ProcessCpu() as used:
                    rates["plain"].append(run_plain(source, root / f"plain{repeat}", model))
                cpu["plain"].append(sum(used.by_kind.values()) + used.driver)
                ray.shutdown()
            for index, (name, (extra, src)) in enumerate(cases.items()):
                rate, seconds = run_cli(source, root / f"restored{repeat}-{index}", model,
                                        extra, src)
                rates[name].append(rate)
                cpu[name].append(seconds)
            print(f"repeat {repeat}: " + ", ".join(f"{name} {values[-1]:.1f}"
                                                   for name, values in rates.items() if values)
                  + " images/s", flush=True)
    megapixels = sum(h * w for h, w in sizes) / 1e6
    print(json.dumps({"images": args.images, "megapixels": round(megapixels, 1),
                      "sides": [min(min(s) for s in sizes), max(max(s) for s in sizes)],
                      "repeats": args.repeats, "images_per_second": rates}))
    plain = statistics.median(rates["plain"]) if rates["plain"] else None
    print(f"\nsteady images/s, median of {args.repeats}; CPU ms per image of all the case's "
          "processes (median):\n")
    print("| case | steady images/s | / plain (per repeat) | CPU ms / image |")
    print("| --- | --- | --- | --- |")
    for name, values in rates.items():
        if not values:
            continue
        rate = statistics.median(values)
        ratio = "" if plain is None else (
            f"{rate / plain:.3f} ({', '.join(f'{v / p:.2f}' for v, p in zip(values, rates['plain']))})")
        print(f"| {name} | {rate:.1f} | {ratio} | "
              f"{statistics.median(1000 * c / args.images for c in cpu[name]):.1f} |")


def main_in_process(args: argparse.Namespace) -> None:
    """Each stage's CPU per image without Ray: restorer's stage functions and the plain
    pattern's on the same photos, in this process, one torch thread, best of ``--repeats``."""
    import torch

    from restorer.io import codec, storage
    from restorer.output.records import PLAN_FIELDS
    from restorer.pipeline.actor import RestoreActor
    from restorer.pipeline.stages import encode_and_write, read_and_decode

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-in-process-") as scratch:
        root = Path(scratch)
        source = root / "in"
        write_photos(source, args.images, photo_sizes(args))
        model = str(root / "cheap.safetensors")
        save_model(model, build_net({"arch": "dncnn", "channels": 3, "num_features": 4,
                                     "num_layers": 2}))
        paths = sorted(source.iterdir())
        plan = pa.Table.from_pylist([
            {"key": p.name, "uri": str(p), "out_key": p.name, "format": "jpeg", "unit": "u",
             "unit_size": len(paths), "status": "", "stage": "", "error_class": "",
             "message": "", "size": p.stat().st_size, "data": b""} for p in paths],
            schema=pa.schema(PLAN_FIELDS))
        options = storage.StorageOptions()
        encode = codec.EncodeOptions("same", 95, 3)
        actor = RestoreActor(model=model, threads=1)
        plain_net = PlainNet(model)
        raw = {"path": np.array([str(p) for p in paths]),
               "bytes": np.array([p.read_bytes() for p in paths] + [None], dtype=object)[:-1]}

        def chunks(table_or_batch, size):
            count = len(paths)
            if isinstance(table_or_batch, pa.Table):
                return [table_or_batch.slice(s, size) for s in range(0, count, size)]
            return [{k: v[s:s + size] for k, v in table_or_batch.items()}
                    for s in range(0, count, size)]

        def joined(batches):
            return {k: np.array([x for b in batches for x in b[k]] + [None], dtype=object)[:-1]
                    for k in batches[0]}

        stages = {}

        def timed(name, fn):
            fn()
            best = min(_process_seconds(fn) for _ in range(args.repeats))
            stages[name] = 1000 * best / len(paths)
            return fn()

        decoded = timed("restorer: read_and_decode", lambda: pa.concat_tables(
            [read_and_decode(b, options, 10**9, 2**30) for b in chunks(plan, 8)]))
        restored = timed("restorer: RestoreActor.__call__", lambda: pa.concat_tables(
            [actor(b) for b in chunks(decoded, args.batch_size)]))
        timed("restorer: encode_and_write", lambda: [encode_and_write(
            b, str(root / "out"), encode, options) for b in chunks(restored, 8)])
        images = timed("plain: decode", lambda: joined(
            [plain_decode(b) for b in chunks(raw, 8)]))
        outputs = timed("plain: net", lambda: joined([plain_net(b) for b in chunks(images, 8)]))
        (root / "plain").mkdir()
        timed("plain: encode + write", lambda: [plain_write(b, str(root / "plain"))
                                                 for b in chunks(outputs, 8)])
    print(f"\nCPU ms per image in one process, one torch thread, best of {args.repeats}, "
          f"{len(paths)} images:\n")
    print("| stage | CPU ms / image |\n| --- | --- |")
    for name, ms in stages.items():
        print(f"| {name} | {ms:.2f} |")
    ours = sum(v for k, v in stages.items() if k.startswith("restorer"))
    plain = sum(v for k, v in stages.items() if k.startswith("plain"))
    print(f"| restorer, all stages | {ours:.2f} |\n| plain, all stages | {plain:.2f} |")
    print(f"\nplain / restorer CPU per image: {plain / ours:.3f}")


def _process_seconds(fn) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="restorer's images per "
                        "actor call (its default)")
    parser.add_argument("--object-store-mb", type=int, default=300, help="0: Ray's default")
    parser.add_argument("--user-photos", action="store_true", help="the photos of --as-cli "
                        "(sides of 384-768 px) instead of the mixed small sizes")
    parser.add_argument("--skip-plain", action="store_true", help="restorer only (profiling)")
    parser.add_argument("--as-cli", action="store_true", help="run `restorer restore` with its "
                        "defaults on photo JPEGs of 384-768 px (see the module docstring)")
    parser.add_argument("--crops", action="store_true", help="384 x 384 crops with one "
                        "500 x 500 photo in 11 (crop_photo_sizes), in any mode, instead of "
                        "its own sizes")
    parser.add_argument("--variant", action="append", default=[], metavar="FLAGS",
                        help="--as-cli: also run `restorer restore` with these flags, e.g. "
                        "'--workers 1' (repeatable)")
    parser.add_argument("--src", action="append", default=[], metavar="DIR",
                        help="--as-cli: also run the restorer package found in DIR (e.g. "
                        "`git archive OLD restorer | tar -x -C DIR`; repeatable)")
    parser.add_argument("--in-process", action="store_true", help="no Ray: each stage's CPU "
                        "per image, restorer's and the plain pattern's, in this process")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.in_process:
        main_in_process(args)
        return
    if args.as_cli:
        main_as_cli(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as scratch:
        root = Path(scratch)
        source = root / "in"
        sizes = photo_sizes(args)
        write_photos(source, args.images, sizes)
        net = build_net({"arch": "dncnn", "channels": 3, "num_features": 4, "num_layers": 2})
        model = str(root / "cheap.safetensors")
        save_model(model, net)
        stages = root / "stages"
        stages.mkdir()
        ray.init(num_cpus=2, object_store_memory=args.object_store_mb * 1024 * 1024 or None,
                 include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"BENCH_STAGES": str(stages)},
                              "worker_process_setup_hook": instrument})
        ray.data.DataContext.get_current().enable_progress_bars = False
        plain, ours, tables, plain_cpu = [], [], [], []
        driver = driver_timers()
        for repeat in range(args.repeats):
            if not args.skip_plain:
                with ProcessCpu() as cpu:
                    plain.append(run_plain(source, root / f"plain{repeat}", model))
                plain_cpu.append({"driver": cpu.driver, **cpu.by_kind})
            rate, table = run_restorer(source, root / f"restored{repeat}", model, stages,
                                       args.batch_size, driver)
            ours.append(rate)
            tables.append(table)
            print(f"repeat {repeat}: plain {plain[-1] if plain else float('nan'):.1f}, "
                  f"restorer {rate:.1f} images/s", flush=True)
        ray.shutdown()
    shown = (["384-768 px sides (user_photo_sizes)"] if args.user_photos and not args.crops else
             sorted({f"{w}x{h}" for h, w in sizes or SIZES[:min(args.images, len(SIZES))]}))
    result = {"images": args.images, "sizes": shown, "repeats": args.repeats,
              "plain_images_per_second": plain, "restorer_images_per_second": ours}
    print(json.dumps(result))
    restorer_rate = statistics.median(ours)
    print(f"\nsteady images/s (median of {args.repeats}): restorer {restorer_rate:.1f}", end="")
    if plain:
        plain_rate = statistics.median(plain)
        print(f", plain Ray Data {plain_rate:.1f}; restorer / plain = "
              f"{restorer_rate / plain_rate:.3f} (goal >= 0.8)")
    else:
        print()
    if plain_cpu:
        kinds = ("driver", "actor", "workers", "ray_data_actors", "ray")
        per_image = {k: statistics.median(1000 * c.get(k, 0.0) / args.images for c in plain_cpu)
                     for k in kinds}
        print("plain pattern CPU ms per image (median): " + ", ".join(
            f"{k} {v:.1f}" for k, v in per_image.items()) + f"; total {sum(per_image.values()):.1f}")
    print("\nrestorer CPU ms per image by stage (median over repeats):\n")
    print("| stage | CPU ms / image |\n| --- | --- |")
    for stage in tables[0]:
        print(f"| {stage} | {statistics.median(t[stage] for t in tables):.1f} |")


if __name__ == "__main__":
    main()
