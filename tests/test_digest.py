"""Run digests: the job's counts and outliers without reading every ledger unit file (no Ray)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from test_report import BLURRED_KEY, OUTLIER_KEY, job_output  # noqa: F401 - the fixture

from restorer.output import digest
from restorer.output.digest import MIN_SPREAD_STRUCTURE
from restorer.output.ledger import ledger_records
from restorer.report import MIN_RECORDS, MIN_SPREAD, OUTLIER_K, flag_outliers, write_report
from restorer.report.inspection import inspect_output
from restorer.report.stats import _robust


def _ok(key: str, unit: str, mean: float, p99: float | None = None) -> dict:
    return {"key": key, "unit": unit, "status": "ok", "change_mean": mean,
            "change_p99": mean * 3 if p99 is None else p99, "model_seconds": 0.01}


def test_histogram_median_and_spread_match_the_exact_ones():
    rng = np.random.default_rng(0)
    for values in (rng.normal(4, 1, 5001).clip(0), rng.gamma(2, 2, 2000), [2.0] * 10):
        run = digest.Digest()
        for i, value in enumerate(values):
            run.add(_ok(str(i), "u", float(value)))
        mine = digest.robust(run.change_mean, OUTLIER_K, MIN_SPREAD)
        exact = _robust([round(float(v), 3) for v in values], OUTLIER_K, MIN_SPREAD)
        for name in ("median", "spread", "cutoff"):
            assert mine[name] == pytest.approx(exact[name], abs=0.05), name


def test_top_candidates_are_the_most_changed():
    run = digest.Digest()
    values = [random.Random(1).random() * 10 for _ in range(3000)]
    for i, value in enumerate(values):
        run.add(_ok(f"k{i}", "u", value))
    assert sorted(e["change_mean"] for e in run.top_mean) == \
        sorted(round(v, 3) for v in values)[-digest.TOP:]
    again = digest.Digest.from_json(run.to_json())
    assert again.top_mean == run.top_mean and again.change_mean == run.change_mean


def test_a_redone_unit_retracts_its_earlier_records():
    first = digest.Digest(run="1", started=1.0)
    old = [_ok("a.png", "u1", 90.0), {"key": "b.png", "unit": "u1", "status": "failed",
                                      "error_class": "ImageError"}]
    for record in old + [_ok(f"{i}.png", "u2", 1.0 + i * 0.01) for i in range(20)]:
        first.add(record)
    first.commit("u1", 2)
    first.commit("u2", 20)
    second = digest.Digest(run="2", started=2.0)
    second.retract(old, "u1")
    for record in (_ok("a.png", "u1", 1.1), _ok("b.png", "u1", 1.2)):
        second.add(record)
    second.commit("u1", 2)
    job = digest.merge([first, second])
    assert (job.records, job.succeeded, job.failed) == (22, 22, 0)
    assert job.errors_by_class == {}
    flagged, _ = digest.flag(job, OUTLIER_K, MIN_SPREAD, MIN_RECORDS)
    assert flagged == []  # the 90-level change of the first run's a.png is gone
    assert [f["key"] for f in digest.flag(first, OUTLIER_K, MIN_SPREAD,
                                          MIN_RECORDS)[0]] == ["a.png"]


def test_job_digest_reads_uncovered_units_once_and_flags_as_the_ledger_scan(
        job_output, monkeypatch):  # noqa: F811 - the fixture imported above
    output = str(job_output)
    scanned = inspect_output(output, top=3, sort="residual_structure")  # no digests yet
    scanned_page = Path(write_report(output)).read_text("utf-8")
    job = digest.job_digest(output, digest.storage.StorageOptions())
    assert (job.records, job.succeeded, job.failed) == (9, 8, 1)
    assert job.errors_by_class == {"ImageError": 1}
    assert sum(job.residual_structure.values()) == 8
    flagged, stats = digest.flag(job, OUTLIER_K, MIN_SPREAD, MIN_RECORDS)
    assert [f["key"] for f in flagged] == [f["key"] for f in scanned["flagged"]] == [
        OUTLIER_KEY, BLURRED_KEY]
    assert [f["reason"].split(" ")[0] for f in flagged] == [
        f["reason"].split(" ")[0] for f in scanned["flagged"]]
    assert "residual_structure" in flagged[1]["reason"]
    assert stats["change_mean"]["cutoff"] < flagged[0]["change_mean"]
    assert stats["residual_structure"]["cutoff"] < flagged[1]["residual_structure"]
    exact = _robust([f for f in [r["residual_structure"] for r in ledger_records(
        output, ["residual_structure", "status"]) if r.get("residual_structure") is not None]],
        OUTLIER_K, MIN_SPREAD_STRUCTURE)
    assert stats["residual_structure"]["median"] == pytest.approx(exact["median"], abs=0.001)

    def no_reads(*args, **kwargs):
        raise AssertionError("a ledger unit file was read")

    # The recovered units were saved as a digest: from now on no unit file is read.
    monkeypatch.setattr(digest, "unit_records", no_reads)
    monkeypatch.setattr("restorer.report.page.ledger_records", no_reads)
    monkeypatch.setattr("restorer.report.inspection.ledger_records", no_reads)
    again = digest.job_digest(output, digest.storage.StorageOptions())
    assert (again.records, again.failed) == (9, 1)
    page = Path(write_report(output)).read_text("utf-8")
    assert OUTLIER_KEY in page and BLURRED_KEY in page and "Errors (1)" in page
    for text in ("<b>Residual structure</b>: what the model removed", "(input - output)"):
        assert text in page and text in scanned_page
    seen = inspect_output(output)
    assert (seen["records"], seen["failed"]) == (9, 1)
    assert [f["key"] for f in seen["flagged"]] == [OUTLIER_KEY, BLURRED_KEY]
    assert seen["most_changed"][0]["key"] == OUTLIER_KEY
    assert seen["errors"][0]["error_class"] == "ImageError"
    lost = inspect_output(output, top=3, sort="residual_structure")
    assert lost["sort"] == "residual_structure"
    assert [r["key"] for r in lost["most_changed"]] == [r["key"] for r in scanned["most_changed"]]
    assert lost["most_changed"][1]["residual_structure"] == pytest.approx(
        scanned["most_changed"][1]["residual_structure"], abs=0.001)


def test_inspect_top_beyond_what_digests_keep_scans_the_ledger(job_output, monkeypatch):  # noqa: F811
    output = str(job_output)
    monkeypatch.setattr(digest, "TOP", 2)  # digests keep the 2 most changed images per column
    digest.job_digest(output, digest.storage.StorageOptions())  # saved: 8 succeeded, 1 failed
    assert len(inspect_output(output, top=2)["most_changed"]) == 2
    five = inspect_output(output, top=5)
    assert len(five["most_changed"]) == 5 and five["most_changed"][0]["key"] == OUTLIER_KEY
    assert (five["records"], five["failed"]) == (9, 1)


def test_a_digest_of_a_newer_format_is_refused(job_output):  # noqa: F811
    from restorer.errors import JobError

    output = str(job_output)
    job = digest.job_digest(output, digest.storage.StorageOptions())  # saved: format 1
    assert inspect_output(output)["records"] == job.records == 9
    newer = digest.Digest(run="newer", version=digest.DIGEST_VERSION + 1)
    folder = Path(output) / "_restorer" / digest.DIGEST_DIR
    (folder / "run-newer.json").write_bytes(newer.to_json())
    with pytest.raises(JobError, match="run digest of format 2.*upgrade restorer"):
        inspect_output(output)


def test_structure_candidates_need_a_visible_change():
    """As the ledger scan: lost structure in an image changed by under MIN_STRUCTURE_CHANGE
    levels is counted in the typical values but never flagged; above it, it is."""
    run = digest.Digest()
    records = [dict(_ok(f"{i}.png", "u", 2.0 + 0.01 * i), residual_structure=0.06 + 0.001 * i)
               for i in range(40)]
    records.append(dict(_ok("faint.png", "u", 0.5), residual_structure=0.9))
    records.append(dict(_ok("text.png", "u", 2.1), residual_structure=0.8))
    for record in records:
        run.add(record)
    flagged, _ = digest.flag(run, OUTLIER_K, MIN_SPREAD, MIN_RECORDS)
    scanned = flag_outliers(records)
    assert [f["key"] for f in flagged] == [f["key"] for f in scanned] == ["text.png"]
    assert digest.most_changed(run, 2, "residual_structure")[0]["key"] == "faint.png"


@pytest.mark.ray
def test_job_counts_from_digests_follow_a_retry_and_match_the_ledger(ray_session, tmp_path,
                                                                     tiny_model):
    import json

    import pyarrow.parquet as pq
    from PIL import Image

    from restorer.pipeline import restore

    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (40 * i, 20, 30)).save(source / f"img{i}.png")
    (source / "bad.png").write_bytes(b"not an image")
    first = restore(str(source), str(out), model=tiny_model)
    assert first["job"] == {"records": 6, "succeeded": 5, "failed": 1}
    Image.new("RGB", (16, 16), (1, 2, 3)).save(source / "bad.png")
    again = restore(str(source), str(out), model=tiny_model, retry_failed=True)
    ledger = pq.read_table(out / "_restorer" / "ledger").to_pylist()
    assert again["job"] == {"records": len(ledger), "succeeded": 6, "failed": 0}
    assert len(list((out / "_restorer" / "digests").glob("run-*.json"))) == 2
    assert json.loads((out / "_restorer" / "summary.json").read_text())["job"] == again["job"]
