"""``restorer restore --dry-run`` (restorer.quality.forecast) and ``restorer bench`` (restorer.quality.bench)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from restorer.cli import main
from restorer.quality import bench

# Three inputs of 0.6 + 0.2 + 0.4 = 1.2 megapixels (width x height), and one file that is not
# an image, which the listing skips.
SIZES = [(1000, 600), (500, 400), (400, 1000)]


def _dry_run(tmp_path, *flags):
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "out"),
                                       "--dry-run", "--json", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_dry_run_counts_and_estimates_from_the_calibration(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CALIBRATION", tmp_path / "bench.json")
    (tmp_path / "in" / "sub").mkdir(parents=True)
    paths = [tmp_path / "in" / "a.png", tmp_path / "in" / "sub" / "b.png",
             tmp_path / "in" / "c.jpg"]
    for path, (width, height) in zip(paths, SIZES):
        Image.fromarray(np.zeros((height, width), np.uint8)).save(path)
    (tmp_path / "in" / "notes.txt").write_text("not an image")

    plan = _dry_run(tmp_path)
    assert (plan["images"], plan["sampled"]) == (3, 3)
    assert plan["input_bytes"] == sum(p.stat().st_size for p in paths)
    assert plan["mean_megapixels"] == pytest.approx(0.4)
    assert plan["megapixels"] == pytest.approx(1.2)
    assert "quick timing" in plan["calibration_from"]  # no calibration: the model timed here

    # 1.2 MP at 1e-4 MP/s on each of 2 workers: 6000 s (+ 10 s of start-up), 1.67 h, 3.34
    # GPU-hours.
    key = {"model_sha256": plan["model_sha256"], "tile": plan["tile"]}
    bench.save_calibration({"megapixels_per_second_per_worker": 1e-4, "machine": "m",
                            "date": "d", "device": "cuda", **key})
    plan = _dry_run(tmp_path, "--workers", "2", "--gpus-per-worker", "1")
    assert plan["workers"] == 2
    assert plan["work_seconds"] == pytest.approx(6000, abs=0.1)
    assert plan["estimated_seconds"] == pytest.approx(6000 + plan["startup_seconds"], abs=0.1)
    assert plan["estimated_hours"] == pytest.approx(1.67)
    assert plan["gpu_hours"] == pytest.approx(3.34)
    assert plan["calibration_from"] == "m on d (cuda)"
    # A CPU calibration costs no GPU-hours; one worker takes twice as long.
    bench.save_calibration({"megapixels_per_second_per_worker": 1e-4, "machine": "m",
                            "date": "d", "device": "cpu", **key})
    plan = _dry_run(tmp_path, "--gpus-per-worker", "0")
    assert plan["work_seconds"] == pytest.approx(12000, abs=0.1)
    assert plan["gpu_hours"] == 0.0
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


@pytest.mark.slow
def test_bench_runs_the_three_measurements_side_by_side(ray_session, tmp_path, monkeypatch):
    """The three figures are the ceiling, the naive loop and the restore job measured on the
    same 96 images in this run, and the ratios and calibration are made from those."""
    monkeypatch.setattr(bench, "CALIBRATION", tmp_path / "bench.json")
    seen: dict[str, list] = {"ceiling": [], "naive": [], "restore": []}
    real_ceiling, real_naive = bench.ceiling, bench.naive

    def spy_ceiling(net, arrays, batch_size, precision):
        value = real_ceiling(net, arrays, batch_size, precision)
        seen["ceiling"].append(({a.shape for a in arrays}, len(arrays), value, precision))
        return value

    def spy_naive(net, paths, out):
        value = real_naive(net, paths, out)
        seen["naive"].append(([p.name for p in paths], value))
        return value

    import restorer.pipeline.driver

    real_restore = restorer.pipeline.driver.restore

    def spy_restore(input, output, **options):
        summary = real_restore(input, output, **options)
        seen["restore"].append((input, summary))
        return summary

    monkeypatch.setattr(bench, "ceiling", spy_ceiling)
    monkeypatch.setattr(bench, "naive", spy_naive)
    monkeypatch.setattr(restorer.pipeline.driver, "restore", spy_restore)
    result = bench.run_bench(count=96, size=32, batch_size=4)  # 3 blocks of 32

    assert len(seen["ceiling"]) == 3  # best of three
    for shapes, count, _, precision in seen["ceiling"]:  # 96 images of one 32 x 32 shape
        assert count == 96 and len(shapes) == 1 and next(iter(shapes))[:2] == (32, 32)
    [(names, naive)] = seen["naive"]
    [(folder, summary)] = seen["restore"]
    # the ceiling at the precision the job's actors ran, which its fingerprint records
    assert {p for *_, p in seen["ceiling"]} == {result["precision"]} \
        == {summary["fingerprint"]["precision"]}
    assert len(names) == 96 and summary["succeeded"] == 96 and summary["failed"] == 0
    assert folder.endswith("/in")  # the naive loop's images, restored by the job

    ceiling = max(value for _, _, value, _ in seen["ceiling"])
    # 96 tiny images reach the driver in one burst: no steady rate, so the end-to-end one
    restorer_ips = summary["steady_images_per_second"] or summary["images_per_second"]
    assert result["restorer_rate"] == ("steady" if summary["steady_images_per_second"]
                                       else "end-to-end")
    assert result["ceiling_images_per_second"] == pytest.approx(ceiling, abs=1e-3)
    assert result["naive_images_per_second"] == pytest.approx(naive["images_per_second"],
                                                              abs=1e-3)
    assert result["restorer_images_per_second"] == pytest.approx(restorer_ips, abs=1e-3)
    assert result["restorer_end_to_end_images_per_second"] == summary["images_per_second"]
    assert result["efficiency"] == pytest.approx(restorer_ips / ceiling, abs=1e-3)
    assert result["speedup"] == pytest.approx(restorer_ips / naive["images_per_second"],
                                              abs=1e-3)
    stages = {k.removesuffix("_ms_per_image"): v for k, v in naive.items()
              if k != "images_per_second"}
    assert result["slowest_stage"] == max(stages, key=stages.get)
    # 32 x 32 pixels = 0.001024 MP per image, at the steady rate of the one local worker
    assert result["megapixels_per_second_per_worker"] == pytest.approx(restorer_ips * 0.001024,
                                                                       abs=1e-4)
    assert bench.load_calibration(result["model_sha256"], result["device"], result["tile"]) \
        == result
