"""The per-image audit and the report page, on a hand-built job output (no Ray).

The fixture writes what a finished restore job leaves behind: inputs, outputs, ledger parts,
an errors part, ``job.json`` and ``summary.json``, with one image changed far more than the
rest, one whose text a blur took away with the noise (a high residual structure) and keys an
attacker might choose. The browser test renders the page in headless
Chromium (Debian package ``chromium``) and is skipped where it is not installed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import record
from PIL import Image, ImageDraw, ImageFilter

from restorer.image.audit import residual_structure
from restorer.output.ledger import DEFAULT_OPTIONS, ledger_records
from restorer.output.records import ERROR_COLUMNS, RECORD_SCHEMA
from restorer.report import flag_outliers, scan_outliers, write_report
from restorer.report.crops import estimate_noise
from restorer.report.inspection import inspect_output

HOSTILE_KEY = "<script>x.png"
HOSTILE_MESSAGE = "<img src=x onerror=alert(1)> is not an image"
OUTLIER_KEY = "b/outlier.png"
BLURRED_KEY = "b/blurred.png"  # a "denoiser" that blurred the text away with the noise
SECTIONS = ("summary", "throughput", "errors", "flagged", "samples", "provenance")


def _change(source: np.ndarray, restored: np.ndarray) -> tuple[float, float]:
    """(mean, p99) of |restored - source| in 8-bit levels, as the restore actor measures it."""
    peak = 65535.0 if source.dtype == np.uint16 else 255.0
    diff = np.abs(restored.astype(np.float64) - source.astype(np.float64)) / peak * 255.0
    return float(diff.mean()), float(np.quantile(diff, 0.99))


def _structure(source: np.ndarray, restored: np.ndarray) -> float:
    """The residual-structure score, as the restore actor measures it (whole 72x96 image)."""
    def tensor(a):
        a = a[..., None] if a.ndim == 2 else a
        return torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)[None]

    return float(residual_structure(tensor(source), tensor(restored))[0])


@pytest.fixture
def job_output(tmp_path) -> Path:
    """A finished two-unit job: 8 restored images (one outlier, one that lost its text to a
    blur), one decode failure."""
    rng = np.random.default_rng(0)
    inputs, output = tmp_path / "in", tmp_path / "out"
    units = {"a": ["a/cat.png", "a/dog.png", "a/16bit.png", HOSTILE_KEY],
             "b": ["b/sea.png", "b/sky.png", OUTLIER_KEY, BLURRED_KEY, "b/broken.png"]}
    yy, xx = np.mgrid[0:72, 0:96]
    ledgers: dict[str, list[dict]] = {unit: [] for unit in units}
    for unit, keys in units.items():
        for key in keys:
            source_path, target_path = inputs / key, output / key
            source_path.parent.mkdir(parents=True, exist_ok=True)
            if key == "b/broken.png":
                source_path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
                ledgers[unit].append(record(
                    key, unit, uri=str(source_path), status="failed", stage="decode",
                    error_class="ImageError", message=HOSTILE_MESSAGE))
                continue
            clean = (96 + 60 * np.sin(xx / 9.0) * np.cos(yy / 11.0))[..., None].repeat(3, 2)
            if key == BLURRED_KEY:
                text = Image.new("L", (96, 72), 0)
                ImageDraw.Draw(text).text((4, 20), "12 kg net", fill=90)
                clean = np.clip(clean + np.asarray(text, dtype=np.float64)[..., None], 0, 255)
            noisy = np.clip(clean + rng.normal(0, 8, clean.shape), 0, 255)
            restored = clean if key != OUTLIER_KEY else 255 - clean  # the outlier: inverted
            if key == BLURRED_KEY:
                restored = np.asarray(Image.fromarray(noisy.astype(np.uint8)).filter(
                    ImageFilter.GaussianBlur(2)), dtype=np.float64)
            if key == "a/16bit.png":
                source = (noisy[..., 0] * 257).astype(np.uint16)
                output_pixels = (restored[..., 0] * 257).astype(np.uint16)
            else:
                source, output_pixels = noisy.astype(np.uint8), restored.astype(np.uint8)
            Image.fromarray(source).save(source_path)
            target_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(output_pixels).save(target_path)
            mean, p99 = _change(source, output_pixels)
            ledgers[unit].append(record(
                key, unit, uri=str(source_path), status="ok", height=72, width=96,
                channels=1 if source.ndim == 2 else 3, bits=16 if source.dtype == np.uint16
                else 8, src_format="PNG", out_height=72, out_width=96, tiles=1,
                model_seconds=0.01 + 0.002 * len(key), change_mean=mean, change_p99=p99,
                residual_structure=_structure(source, output_pixels),
                out_bytes=target_path.stat().st_size, sha256="0" * 64, write_seconds=0.001))
    meta = output / "_restorer"
    (meta / "ledger").mkdir(parents=True)
    (meta / "errors.parquet").mkdir()
    for offset, (unit, records) in enumerate(ledgers.items()):
        ledger = meta / "ledger" / f"unit-{unit}.parquet"
        pq.write_table(pa.Table.from_pylist(records, schema=RECORD_SCHEMA), ledger)
        os.utime(ledger, (1_700_000_000 + 5 * offset, 1_700_000_000 + 5 * offset))
        failed = [r for r in records if r["status"] != "ok"]
        if failed:
            pq.write_table(pa.Table.from_pylist([{c: r[c] for c in ERROR_COLUMNS}
                                                 for r in failed]),
                           meta / "errors.parquet" / f"unit-{unit}.parquet")
    spec = {"input": {"uri": str(inputs), "layout": "auto"},
            "output": {"uri": str(output), "layout": "files", "format": "same"},
            "model": {"name": "denoise-gray", "tile": 256}}
    (meta / "job.json").write_text(json.dumps({
        "ledger_format_version": 1, "model": "/zoo/denoise-gray.safetensors",
        "fingerprint": {"model_sha256": "ab" * 32, "layout": "files"},
        "fingerprint_sha256": "cd" * 32, "spec": spec, "created": 1_699_999_990.0}))
    (meta / "summary.json").write_text(json.dumps({
        "status": "failed_images", "total": 8, "succeeded": 7, "failed": 1, "skipped": 0,
        "elapsed_seconds": 12.5, "startup_seconds": 4.0, "images_per_second": 0.64,
        "steady_images_per_second": 0.94, "errors_by_class": {"ImageError": 1},
        "model": "/zoo/denoise-gray.safetensors", "model_sha256": "ab" * 32, "spec": spec,
        "job": {"records": 8, "succeeded": 7, "failed": 1}, "output": str(output)}))
    return output


def test_flag_outliers_flags_the_outlier_and_the_blurred_image(job_output):
    records = ledger_records(str(job_output), ["key", "status", "change_mean", "change_p99",
                                               "residual_structure"])
    flagged = flag_outliers(records)
    assert [f["key"] for f in flagged] == [OUTLIER_KEY, BLURRED_KEY]
    assert flagged[0]["change_mean"] > 50 and "change_mean" in flagged[0]["reason"]
    # The blurred image changed about as much as the others on average, but what it lost is
    # the image (its text), not noise.
    assert flagged[1]["change_mean"] < 8 and "residual_structure" in flagged[1]["reason"]
    assert flagged[1]["residual_structure"] > 0.3


def test_flag_outliers_flags_lost_structure_on_its_own_scale():
    records = [{"key": f"{i}.png", "change_mean": 5.0 + 0.01 * i, "change_p99": 15.0,
                "residual_structure": 0.05 + 0.002 * i} for i in range(30)]
    records += [{"key": "lost.png", "change_mean": 5.1, "change_p99": 15.0,
                 "residual_structure": 0.6},
                {"key": "tiny.png", "change_mean": 0.3, "change_p99": 1.0,  # invisible change
                 "residual_structure": 0.9},
                {"key": "old.png", "change_mean": 5.0, "change_p99": 15.0}]  # older ledger
    flagged, stats = scan_outliers(records)
    assert [f["key"] for f in flagged] == ["lost.png"]
    assert flagged[0]["reason"].startswith("residual_structure 0.600 > typical")
    assert "change" not in flagged[0]["reason"]
    assert stats["residual_structure"]["cutoff"] == pytest.approx(
        stats["residual_structure"]["median"] + 5 * 0.05, abs=0.02)
    # A ledger written before the score: no statistics for it, flags from the change alone.
    old = [{k: v for k, v in r.items() if k != "residual_structure"} for r in records]
    flagged, stats = scan_outliers(old)
    assert flagged == [] and stats["residual_structure"] is None


def test_flag_outliers_streams_and_has_a_floor():
    def stream():  # a generator: consumed once, never held in memory
        for i in range(50_000):
            yield {"key": f"{i}.png", "status": "ok", "change_mean": 3.0 + (i % 7) * 0.01,
                   "change_p99": 9.0}
        yield {"key": "odd.png", "status": "ok", "change_mean": 40.0, "change_p99": 90.0}
        yield {"key": "failed.png", "status": "failed", "change_mean": 0.0, "change_p99": 0.0}

    assert [f["key"] for f in flag_outliers(stream())] == ["odd.png"]
    # Identical changes (MAD = 0): the floor keeps a fraction of a level from being flagged.
    same = [{"key": f"{i}", "change_mean": 2.0 + 0.2 * (i == 0), "change_p99": 5.0}
            for i in range(10)]
    assert flag_outliers(same) == []
    # An absolute threshold flags on its own, even below MIN_RECORDS images.
    assert [f["key"] for f in flag_outliers(same[:2], threshold=2.1)] == ["0"]
    for bad, match in (({"k": 0}, r"k = 0, .*need k > 0"),
                       ({"min_spread": -1.0}, r"min_spread = -1.0, .*min_spread >= 0"),
                       ({"limit": 0}, r"limit = 0: .*limit >= 1")):
        with pytest.raises(ValueError, match=match):
            flag_outliers([], **bad)


def test_estimate_noise_finds_the_added_noise():
    rng = np.random.default_rng(1)
    flat = np.full((256, 256), 128.0)
    assert estimate_noise(flat) == pytest.approx(0.0)
    assert estimate_noise(flat + rng.normal(0, 10, flat.shape)) == pytest.approx(10, rel=0.05)


@pytest.mark.parametrize("dtype, shape", [(np.uint8, (300, 280, 3)), (np.uint16, (40, 52, 1))])
def test_report_noise_is_the_actors_noise_in(tmp_path, dtype, shape):
    """One noise estimator: the input noise the report shows for an image is the ledger's
    ``noise_in``, as the restore actor measured it (central crop, first plane, 8-bit levels)."""
    from restorer.io import codec
    from restorer.nets import build_net
    from restorer.pipeline import RestoreActor
    from restorer.report.crops import crops
    from restorer.weights.checkpoint import save_model

    torch.manual_seed(0)
    model = tmp_path / "net.safetensors"
    save_model(str(model), build_net({"arch": "dncnn", "channels": 1, "num_features": 8,
                                      "num_layers": 3}).eval())
    peak = np.iinfo(dtype).max
    rng = np.random.default_rng(5)
    ramp = np.linspace(0.2, 0.8, shape[1])[None, :, None] * np.ones(shape)
    image = np.clip((ramp + rng.normal(0, 10 / 255, shape)) * peak, 0, peak).astype(dtype)
    (restored,), (stats,) = RestoreActor(model=str(model), tile=0).restore_arrays([image])
    extension = "png"  # 16-bit stays 16-bit in PNG
    for name, pixels in (("in", image), ("out", restored)):
        (tmp_path / f"{name}.{extension}").write_bytes(codec.encode(pixels, None, "png"))
    record = {"key": "x", "uri": str(tmp_path / f"in.{extension}"), "out_key": f"out.{extension}"}
    shown = crops(str(tmp_path), record, "files", DEFAULT_OPTIONS)["noise"]
    assert stats["noise_in"] > 5  # the noise added (sigma 10 levels) is there to measure
    assert shown == pytest.approx(stats["noise_in"], abs=1e-4)


def test_report_has_sections_crops_and_escaped_keys(job_output):
    uri = write_report(str(job_output))
    assert uri == str(job_output / "_restorer" / "report.html")
    page = Path(uri).read_text("utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    crops = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(crops) >= 6 and len(crops) % 3 == 0  # input, output, residual
    assert page.count('alt="residual crop"') == len(crops) // 3
    assert 'aria-label="residual structure per image' in page  # its histogram
    # The blurred image is shown, and its residual holds the text it lost: far from flat.
    blurred = page.index(f'<h3 class="key">{BLURRED_KEY}</h3>')
    residual = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"[^>]*'
                         r'alt="residual crop"', page[blurred:]).group(1)
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(residual))), dtype=float)
    assert pixels.std() > 10
    for crop in crops:
        assert Image.open(io.BytesIO(base64.b64decode(crop))).size[0] > 0
    assert OUTLIER_KEY in page and "ImageError" in page and "ab" * 32 in page
    assert "<svg" in page and "<polyline" in page  # throughput from the ledger's commit times
    # Hostile strings only ever appear escaped.
    assert "<script>x.png" not in page and "&lt;script&gt;x.png" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "http://" not in page and "https://" not in page  # nothing from the network
    assert page.count("<script>") == 1


def test_report_takes_crops_from_parquet_output_shards(job_output):
    """Parquet output layout: outputs come from part-<unit>.parquet; shard-row inputs are noted."""
    job = json.loads((job_output / "_restorer" / "job.json").read_text())
    job["spec"]["output"]["layout"] = "parquet"
    (job_output / "_restorer" / "job.json").write_text(json.dumps(job))
    for ledger in sorted((job_output / "_restorer" / "ledger").iterdir()):
        table = pq.read_table(ledger)
        unit = table.column("unit")[0].as_py()
        keys = table.column("out_key").to_pylist()
        blobs = [(job_output / k).read_bytes() if (job_output / k).exists() else b""
                 for k in keys]
        pq.write_table(pa.table({"key": keys, "bytes": pa.array(blobs, pa.large_binary())}),
                       job_output / f"part-{unit}.parquet")
        if unit == "a":  # inputs that were rows of an input shard cannot be read back by uri
            uris = [f"in-{unit}.parquet#{i}" for i in range(table.num_rows)]
            table = table.set_column(table.schema.get_field_index("uri"), "uri", pa.array(uris))
            pq.write_table(table, ledger)
    shutil.rmtree(job_output / "a")
    shutil.rmtree(job_output / "b")
    page = Path(write_report(str(job_output), sample=8)).read_text("utf-8")
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 3 * 4  # unit b's 4
    assert page.count("input is a row of a Parquet shard; no crop") == 4  # unit a's 4


def test_inspect_output_lists_flagged_and_the_report(job_output):
    before = inspect_output(str(job_output))
    assert before["records"] == 9 and before["failed"] == 1
    assert [f["key"] for f in before["flagged"]] == [OUTLIER_KEY, BLURRED_KEY]
    assert before["sort"] == "change_mean"
    assert [r["key"] for r in before["most_changed"][:3]] == [OUTLIER_KEY, BLURRED_KEY,
                                                              "a/dog.png"]
    lost = inspect_output(str(job_output), top=3, sort="residual_structure")
    assert [r["key"] for r in lost["most_changed"]] == [OUTLIER_KEY, BLURRED_KEY, "b/sea.png"]
    assert lost["most_changed"][1]["residual_structure"] > 0.3
    with pytest.raises(ValueError, match="residual_structure"):
        inspect_output(str(job_output), sort="noise_in")
    assert before["report"] is None
    write_report(str(job_output))
    assert inspect_output(str(job_output))["report"].endswith("report.html")


def test_inspect_command_sorts_by_residual_structure(job_output):
    from click.testing import CliRunner

    from restorer.cli import main

    result = CliRunner().invoke(main, ["inspect", str(job_output), "--top", "2",
                                       "--sort", "residual_structure"])
    assert result.exit_code == 0, result.output
    ranked = result.output.split("top 2 by residual_structure")[1].splitlines()[1:3]
    assert ranked[0].strip().startswith(OUTLIER_KEY) and ranked[1].strip().startswith(BLURRED_KEY)
    assert "residual structure 0.4" in ranked[1]
    bad = CliRunner().invoke(main, ["inspect", str(job_output), "--sort", "noise"])
    assert bad.exit_code == 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Skipped on a developer machine without Chromium; in CI (CI=true, .ci/run installs it) a
# missing browser fails instead of skipping, so the page is always proven to render there.
@pytest.mark.skipif(_chromium() is None and os.environ.get("CI") != "true",
                    reason="headless browser test needs Chromium (apt-get install chromium); "
                           "not found on PATH")
def _text(html: str) -> str:
    """What a reader sees of a page: its text, tags and the script left out."""
    html = re.sub(r"<script>.*?</script>|<style>.*?</style>", " ", html, flags=re.DOTALL)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_report_reads_in_words_with_a_verdict_zoomed_crops_and_links(job_output):
    summary = json.loads((job_output / "_restorer" / "summary.json").read_text())
    summary["steady_images_per_second"] = None  # every result came in one batch
    (job_output / "_restorer" / "summary.json").write_text(json.dumps(summary))
    page = Path(write_report(str(job_output))).read_text("utf-8")
    text = _text(page)
    verdict = re.search(r'<p class="verdict" id="verdict">(.*?)</p>', page, re.DOTALL).group(1)
    assert verdict.startswith("8 of 9 images restored, 1 failed")
    assert "typical change" in verdict and "2 images flagged to check" in verdict
    assert re.search(r"noise \d+\.\d → \d+\.\d levels \(median over the 6 images", verdict)
    # labels in words, rates that say what is not known; no raw field names, no "None"
    for raw in ("steady_images_per_second", "images_per_second", "startup_seconds",
                "elapsed_seconds", "change_mean", "change_p99", "residual_structure", "None",
                "failed_images"):
        assert raw not in text, raw
    assert "rate after start-up" in text and "not measured (every result came at once)" in text
    assert "time taken 12.5 s" in text and "0.64 images/s overall" in text
    # the spec as a table of TOML keys, not JSON
    assert "<pre>" not in page and "<td>model.tile</td><td" in page and "output.format" in text
    # 1:1 crops, a zoomed before/after slider and links to the full-size images, per sample
    samples = page.count('alt="residual crop"')
    assert samples == 6 and page.count('class="slider" type="range"') == samples
    assert page.count('alt="input, enlarged"') == page.count('alt="output, enlarged"') == samples
    assert f'<a href="../{OUTLIER_KEY}">output</a>' in page
    assert f'href="{(job_output.parent / "in" / OUTLIER_KEY).as_uri()}">input</a>' in page
    assert "&lt;script&gt;x.png" in page and '<a href="../%3Cscript%3Ex.png">' in page
    # the residual-structure score explained beside its histogram, JPEG's case said
    structure = page.index('aria-label="residual structure per image')
    explained = page[structure:page.index("</div>\n</div>", structure)]
    assert "JPEG artifacts are not noise-like" in explained


def _shoot(page: Path, tmp_path: Path, width: int, height: int) -> tuple[str, np.ndarray]:
    """The DOM after the page's script ran, and a screenshot, at one window size."""
    screenshot = tmp_path / f"report-{width}.png"
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
            f"--window-size={width},{height}", "--virtual-time-budget=5000"]
    env = dict(os.environ, HOME=str(tmp_path))
    shot = subprocess.run([*base, f"--screenshot={screenshot}", page.as_uri()], check=False,
                          capture_output=True, text=True, timeout=60, env=env)
    assert shot.returncode == 0, shot.stderr[-2000:]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], check=False,
                         capture_output=True, text=True, timeout=60, env=env)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout, np.asarray(Image.open(screenshot).convert("RGB"))


# Skipped on a developer machine without Chromium; in CI (CI=true, .ci/run installs it) a
# missing browser fails instead of skipping, so the page is always proven to render there.
@pytest.mark.skipif(_chromium() is None and os.environ.get("CI") != "true",
                    reason="headless browser test needs Chromium (apt-get install chromium); "
                           "not found on PATH")
@pytest.mark.parametrize("width", [1400, 420])
def test_report_renders_in_headless_chromium(job_output, tmp_path, width):
    page = Path(write_report(str(job_output)))
    dom, image = _shoot(page, tmp_path, width, 2000)

    body = re.search(r"<body[^>]*>", dom).group(0)
    images = len(re.findall(r"<img ", dom))
    assert images >= 6
    assert 'data-loaded="true"' in body and f'data-images="{images}"' in body, body
    # nothing wider than the window (tables scroll in their own box) and no chart label cut
    # off at its chart's edge, at a desktop width and a phone's
    assert 'data-overflow="0"' in body and 'data-clipped="0"' in body, body
    residuals = len(re.findall(r'alt="residual crop"', dom))
    # input, output, residual at 1:1, and the enlarged input and output under a slider
    assert residuals >= 2 and images == 5 * residuals
    assert len(re.findall(r'<img class="before"[^>]*style="clip-path: inset\(0px 50% 0px 0px\)',
                          dom)) == residuals  # the sliders' script ran: half input, half output
    assert re.search(r'<svg[^>]*aria-label="residual structure per image', dom)
    for section in SECTIONS:
        assert f'id="{section}"' in dom
    assert 'id="verdict"' in dom
    assert "&lt;script&gt;x.png" in dom

    assert image.shape[:2] == (2000, width)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # text, charts, crops: not blank
