"""End-to-end restore jobs on the shared local Ray (2 CPUs, 300 MB object store)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from restorer.errors import JobError
from restorer.io.samples import write_samples
from restorer.pipeline import RestoreActor, restore
from restorer.pipeline.graph import source_config
from restorer.pipeline.sources import expand, listing_tasks


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


def test_mixed_folder_gives_every_output_one_error_and_a_summary(ray_session, mixed_folder,
                                                                 tmp_path, tiny_model):
    source, expected = mixed_folder
    out = tmp_path / "out"
    summary = restore(str(source), str(out), model=tiny_model, tile=64)
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (6, 5, 1)
    assert summary["errors_by_class"] == {"ImageError": 1}
    for key, outcome in expected.items():
        assert (out / key).exists() == (outcome == "ok"), key
    # modes, depths and sizes are kept
    assert Image.open(out / "gray.png").mode == "L"
    assert Image.open(out / "g16.png").mode in ("I;16", "I")
    assert np.asarray(Image.open(out / "g16.png")).dtype == np.uint16
    rgba = Image.open(out / "sub dir" / "rgba é.png")
    assert rgba.mode == "RGBA" and rgba.size == (41, 50)
    np.testing.assert_array_equal(np.asarray(rgba)[..., 3],
                                  np.asarray(Image.open(source / "sub dir" / "rgba é.png"))[..., 3])
    assert Image.open(out / "thin.webp").size == (700, 3)
    assert Image.open(out / "rgb.jpg").size == (280, 300)
    errors = pq.read_table(out / "_restorer" / "errors.parquet").to_pylist()
    assert [(e["key"], e["stage"], e["error_class"]) for e in errors] == [
        ("corrupt.jpg", "decode", "ImageError")]
    assert "corrupt" in errors[0]["message"] or "not an image" in errors[0]["message"]
    written = json.loads((out / "_restorer" / "summary.json").read_text())
    for field in ("succeeded", "failed", "skipped", "images_per_second", "model", "model_sha256",
                  "spec"):
        assert field in written
    ledger = pq.read_table(out / "_restorer" / "ledger").to_pylist()
    assert sorted(r["key"] for r in ledger) == sorted(expected)
    assert all(len(r["sha256"]) == 64 for r in ledger if r["status"] == "ok")

    # a rerun of the same command skips every committed unit and writes nothing new
    again = restore(str(source), str(out), model=tiny_model, tile=64)
    assert (again["succeeded"], again["failed"], again["skipped"]) == (0, 0, 6)
    assert again["job"] == {"records": 6, "succeeded": 5, "failed": 1}
    # a different pixel-changing setting into the same output is refused, naming it
    with pytest.raises(JobError, match=r"tile: 64 -> 128"):
        restore(str(source), str(out), model=tiny_model, tile=128)


def test_default_model_measurably_restores_noisy_samples(ray_session, tmp_path):
    noisy, clean, out = tmp_path / "noisy", tmp_path / "clean", tmp_path / "out"
    keys = write_samples(str(noisy), sigma=25, clean_folder=str(clean))
    summary = restore(str(noisy), str(out))
    assert summary["succeeded"] == len(keys) and summary["failed"] == 0
    gains = []
    for key in ["street-gray.png", "garden-rgb.png", "nested/odd-size.png"]:
        reference = np.asarray(Image.open(clean / key))
        before = _psnr(np.asarray(Image.open(noisy / key)), reference)
        after = _psnr(np.asarray(Image.open(out / key)), reference)
        gains.append(after - before)
    assert min(gains) > 3.0, gains  # clipped sigma-25 noise on synthetic scenes


def test_tiled_and_untiled_jobs_agree(ray_session, tmp_path, tiny_model):
    noisy = tmp_path / "noisy"
    write_samples(str(noisy))
    restore(str(noisy), str(tmp_path / "tiled"), model=tiny_model, tile=48, format="png")
    restore(str(noisy), str(tmp_path / "whole"), model=tiny_model, tile=0, format="png")
    for key in ["street-gray.png", "garden-rgb.png", "photo.png"]:
        a = np.asarray(Image.open(tmp_path / "tiled" / key)).astype(int)
        b = np.asarray(Image.open(tmp_path / "whole" / key)).astype(int)
        assert np.abs(a - b).max() <= 1, key


def test_each_job_ends_its_registry_actor_in_a_ray_it_did_not_start(ray_session, tmp_path,
                                                                     tiny_model, monkeypatch):
    """In a long-lived Ray (a cluster) every job used to leave its registry process behind."""
    import restorer.pipeline.driver

    made = []
    real = restorer.pipeline.driver.poison_registry

    def spy():
        made.append(real())
        return made[-1]

    monkeypatch.setattr(restorer.pipeline.driver, "poison_registry", spy)
    noisy = tmp_path / "noisy"
    write_samples(str(noisy))
    for run in range(2):
        summary = restore(str(noisy), str(tmp_path / f"out{run}"), model=tiny_model)
        assert summary["succeeded"] > 0 and ray_session.is_initialized()  # Ray stays up
    assert len(made) == 2
    for registry in made:  # ended: a call fails as on a dead actor
        with pytest.raises(ray_session.exceptions.RayActorError):
            ray_session.get(registry.restored_in_flight.remote(), timeout=30)


def test_colliding_outputs_are_errors_never_overwrites(ray_session, tmp_path, tiny_model):
    source = tmp_path / "in"
    source.mkdir()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(source / "a.png")
    Image.new("RGB", (16, 16), (200, 20, 30)).save(source / "a.bmp")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(source / "b.png")
    summary = restore(str(source), str(tmp_path / "out"), model=tiny_model)
    assert (summary["succeeded"], summary["failed"]) == (1, 2)
    assert summary["errors_by_class"] == {"OutputCollision": 2}
    assert not (tmp_path / "out" / "a.png").exists()


def test_a_rerun_with_the_same_limit_skips_the_committed_part(ray_session, tmp_path, tiny_model):
    source = tmp_path / "in"
    source.mkdir()
    for index in range(20):  # one folder: --limit 3 cuts its first unit short
        Image.fromarray(np.full((8, 8), index, np.uint8)).save(source / f"{index:02d}.png")
    first = restore(str(source), str(tmp_path / "out"), model=tiny_model, limit=3)
    again = restore(str(source), str(tmp_path / "out"), model=tiny_model, limit=3)
    assert (first["succeeded"], again["succeeded"], again["skipped"]) == (3, 0, 3)
    assert again["job"] == {"records": 3, "succeeded": 3, "failed": 0}


def test_non_empty_foreign_output_and_input_as_output_are_refused(tmp_path, tiny_model):
    source = tmp_path / "in"
    source.mkdir()
    Image.new("L", (8, 8)).save(source / "x.png")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(JobError, match="not empty"):
        restore(str(source), str(foreign), model=tiny_model)
    with pytest.raises(JobError, match="is the input"):
        restore(str(source), str(source), model=tiny_model)


def test_units_are_deterministic_and_bounded(tmp_path):
    from restorer.job.specs import RestoreSpec, spec_from_flags

    for i in range(150):
        (tmp_path / f"img{i:03d}.png").write_bytes(b"x")
    spec: RestoreSpec = spec_from_flags(RestoreSpec, input=str(tmp_path), output="o")
    config = source_config(spec, "files")

    def units(done=frozenset()):
        return [(u[0]["unit"], [r["key"] for r in u]) for task in listing_tasks(str(tmp_path),
                                                                                config)
                for u in expand(task, config, done)]

    first = units()
    assert first == units()
    assert sum(len(keys) for _, keys in first) == 150
    assert all(1 <= len(keys) <= 64 for _, keys in first)
    # committed units come back as one skipped marker each
    skipped = units(frozenset({first[0][0]}))
    assert skipped[0] == (first[0][0], [""]) and skipped[1:] == first[1:]


def test_actor_class_in_a_users_own_pipeline(ray_session, tmp_path, tiny_model):
    import ray.data
    from ray.data import ActorPoolStrategy

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    ds = ray.data.read_images(str(folder))
    ds = ds.map_batches(RestoreActor, fn_constructor_kwargs={"model": tiny_model, "tile": 32},
                        compute=ActorPoolStrategy(size=1), num_cpus=1, batch_size=2)
    images = [row["image"] for row in ds.take_all()]
    assert len(images) == 3 and all(i.shape == (40, 50, 3) and i.dtype == np.uint8
                                    for i in images)
    direct = RestoreActor(model=tiny_model, tile=32)
    expected, _ = direct.restore_arrays([np.asarray(Image.open(folder / "0.png"))])
    assert any(np.array_equal(expected[0], i) for i in images)


def test_jpeg_outputs_match_their_sources_settings(ray_session, tmp_path):
    """A q75 4:2:0 photo comes back as a 4:2:0 JPEG near its own size, within 40 dB of the
    restored pixels (the PNG job's output is those pixels, losslessly); --quality chooses."""
    from restorer.io import codec
    from restorer.io.samples import noisy, scene

    source = tmp_path / "in"
    source.mkdir()
    photo = np.round(noisy(scene(256, 256, 3, seed=7), 4.0, seed=8) * 255).astype(np.uint8)
    Image.fromarray(photo).save(source / "photo.jpg", quality=75, subsampling="4:2:0")
    in_bytes = (source / "photo.jpg").stat().st_size

    restore(str(source), str(tmp_path / "png"), model="jpeg", format="png")
    restored = np.asarray(Image.open(tmp_path / "png" / "photo.png"))
    restore(str(source), str(tmp_path / "jpg"), model="jpeg")
    data = (tmp_path / "jpg" / "photo.jpg").read_bytes()
    written = codec.decode(data)
    assert written.jpeg.subsampling == "4:2:0"
    assert written.jpeg.quality == codec.matched_quality(75)
    assert len(data) <= 1.5 * in_bytes, (len(data), in_bytes)
    assert _psnr(written.pixels, restored) >= 40.0

    restore(str(source), str(tmp_path / "q60"), model="jpeg", jpeg_quality=60,
            jpeg_subsampling="4:4:4")
    assert codec.decode((tmp_path / "q60" / "photo.jpg").read_bytes()).jpeg == \
        codec.JpegSettings(60, "4:4:4")
