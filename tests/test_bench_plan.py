import json

import pytest
from click.testing import CliRunner

from restorer import bench
from restorer.cli import main
from restorer.samples import write_samples


def test_dry_run_counts_and_estimates_from_the_calibration(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CALIBRATION", tmp_path / "bench.json")
    write_samples(str(tmp_path / "in"))
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "out"),
                                       "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["images"] == 6 and plan["sampled"] == 6
    assert "quick timing" in plan["calibration_from"]  # no calibration: timed here
    bench.save_calibration({"megapixels_per_second_per_worker": 0.5, "machine": "m",
                            "date": "d", "device": "cuda"})
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "out"),
                                       "--dry-run", "--json", "--workers", "2"])
    plan = json.loads(result.output)
    expected = plan["mean_megapixels"] * 6 / (0.5 * 2)
    assert plan["estimated_seconds"] == pytest.approx(expected, rel=0.05, abs=0.1)
    assert plan["gpu_hours"] == pytest.approx(plan["estimated_seconds"] / 3600 * 2, abs=0.01)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


@pytest.mark.ray
@pytest.mark.slow
def test_bench_runs_the_three_measurements_side_by_side(ray_session, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CALIBRATION", tmp_path / "bench.json")
    result = bench.run_bench(count=96, size=32, batch_size=4)  # 3 blocks of 32
    for key in ("ceiling_images_per_second", "naive_images_per_second",
                "restorer_images_per_second"):
        assert result[key] > 0
    assert result["efficiency"] == pytest.approx(
        result["restorer_images_per_second"] / result["ceiling_images_per_second"], rel=0.01)
    assert (tmp_path / "bench.json").exists()
