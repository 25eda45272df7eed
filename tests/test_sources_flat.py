"""Flat folders and prefixes listed page by page: stable units, collisions across pages."""

from __future__ import annotations

import dataclasses
import random

import boto3
import pytest

from restorer.io import storage
from restorer.job.specs import RestoreSpec, spec_from_flags
from restorer.pipeline import sources
from restorer.pipeline.graph import source_config
from restorer.pipeline.sources import expand, listing_tasks, units

NAMES = [f"img{i:04d}.png" for i in range(300)] + ["a.png", "A.bmp", "b.PNG", "b.png"]


def _config(uri: str, page_size: int, partition_keys: int, **flags):
    spec = spec_from_flags(RestoreSpec, input=uri, output="out", **flags)
    return dataclasses.replace(source_config(spec, "files"), page_size=page_size,
                               partition_keys=partition_keys)


def _rows(uri: str, config, done=frozenset()):
    """(unit id, key, status, error class) of every row, in listing order, and the tasks."""
    tasks = listing_tasks(uri, config)
    rows = [(r["unit"], r["key"], r["status"], r["error_class"])
            for task in tasks for unit in expand(task, config, done) for r in unit]
    return rows, tasks


def _shuffled_scan(seed: int):
    """storage.scan_folder as a file system with another entry order would list."""
    real = storage.scan_folder

    def scan(uri, options=None, page_size=storage.LIST_PAGE_SIZE):
        entries = [e for page in real(uri, options or storage.StorageOptions(), 10**9)
                   for e in page]
        random.Random(seed).shuffle(entries)
        for start in range(0, len(entries), page_size):
            yield entries[start:start + page_size]

    return scan


def test_flat_folder_units_do_not_depend_on_listing_order(tmp_path, monkeypatch):
    for name in NAMES:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.png").write_bytes(b"x")
    config = _config(str(tmp_path), page_size=7, partition_keys=40)
    first, tasks = _rows(str(tmp_path), config)
    assert [t.partitions for t in tasks if not t.recursive] == [8] * 8  # 304 files / 40 -> 8
    assert sorted(k for _, k, _, _ in first) == sorted(NAMES + ["sub/c.png"])  # each once
    for seed in (1, 2):
        monkeypatch.setattr(storage, "scan_folder", _shuffled_scan(seed))
        assert _rows(str(tmp_path), config)[0] == first
    # a committed unit comes back as one skipped marker, the others unchanged
    unit = first[0][0]
    again, _ = _rows(str(tmp_path), config, frozenset({unit}))
    assert again[0] == (unit, "", "skipped", "")
    assert again[1:] == [r for r in first if r[0] != unit]


def test_small_flat_folder_makes_the_units_of_one_sorted_listing(tmp_path):
    """Up to partition_keys files, a flat folder is one partition: the units ledger format 1
    made (one sorted listing of the folder), so older outputs resume unchanged."""
    for name in NAMES:
        (tmp_path / name).write_bytes(b"x")
    config = _config(str(tmp_path), page_size=7, partition_keys=1000)
    rows, tasks = _rows(str(tmp_path), config)
    assert [(t.partition, t.partitions) for t in tasks] == [(0, 1)]
    keys = [k for _, k, _, _ in rows]
    assert keys == sorted(NAMES)
    old = [dict(r) for r in (units.input_row(e.key, e.uri, config, e.size) for e in next(
        storage.walk_files(str(tmp_path), recursive=False)))]
    units.mark_collisions(old)
    assert [r[0] for r in rows] == [r["unit"] for u in units.cut_units(old, frozenset())
                                    for r in u]


def test_collisions_are_caught_across_pages_and_partitions(tmp_path):
    for name in NAMES:
        (tmp_path / name).write_bytes(b"x")
    config = _config(str(tmp_path), page_size=1, partition_keys=16, format="png")
    rows, tasks = _rows(str(tmp_path), config)
    assert len(tasks) == 32
    failed = {k: cls for _, k, status, cls in rows if status == "failed"}
    assert failed == {"a.png": "OutputCollision", "A.bmp": "OutputCollision",
                      "b.PNG": "OutputCollision", "b.png": "OutputCollision"}


def test_folders_differing_only_in_case_are_compared_and_keep_their_units(tmp_path):
    """``Raw/a.png`` and ``raw/a.jpg`` would write one output (``raw/a.png`` ignoring case):
    both fail, whichever folder they are in; the folders are listed by one task, and every
    unit is the one a task of each folder would cut alone."""
    for name in ("Raw/a.png", "Raw/x/p.png", "raw/a.jpg", "raw/b.png", "raw/X/p.png",
                 "RAW/c.png", "other/a.png", "top.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    config = _config(str(tmp_path), page_size=100, partition_keys=40, format="png")
    rows, tasks = _rows(str(tmp_path), config)
    assert [(t.key_prefix, tuple(t.variants)) for t in tasks if t.key_prefix] == [
        ("RAW/", ("Raw", "raw")), ("other/", ())]
    failed = {k for _, k, status, _ in rows if status == "failed"}
    assert failed == {"Raw/a.png", "raw/a.jpg", "Raw/x/p.png", "raw/X/p.png"}
    assert sorted(k for _, k, _, _ in rows) == sorted(
        ["Raw/a.png", "Raw/x/p.png", "raw/a.jpg", "raw/b.png", "raw/X/p.png", "RAW/c.png",
         "other/a.png", "top.png"])  # each once
    alone = [(r["unit"], r["key"]) for name in ("RAW", "Raw", "raw")
             for unit in expand(sources.ListingTask("files", str(tmp_path / name),
                                                    key_prefix=name + "/"), config)
             for r in unit]
    assert sorted(alone) == sorted((u, k) for u, k, _, _ in rows if k.lower().startswith("raw/"))


def test_partitions_are_a_power_of_two_of_bounded_size():
    assert [sources.flat_partitions(n, 100) for n in (0, 1, 100, 101, 400, 401)] == \
        [1, 1, 1, 2, 4, 8]
    counts = [0] * 8
    for i in range(8000):
        counts[sources.partition_of(f"img{i:05d}.png", 8)] += 1
    assert max(counts) < 1.1 * 1000  # crc32 spreads names evenly
    assert sources.partition_of("Photo.JPG", 8) == sources.partition_of("photo.png", 8)


def test_detect_layout_reads_only_the_first_page(tmp_path, monkeypatch):
    for name in NAMES:
        (tmp_path / name).write_bytes(b"x")
    pages = []
    real = storage.scan_folder

    def scan(*args, **kwargs):
        for page in real(*args, **kwargs):
            pages.append(len(page))
            yield page

    monkeypatch.setattr(storage, "scan_folder", scan)
    assert sources.detect_layout(str(tmp_path), "auto", storage.StorageOptions()) == "files"
    assert len(pages) == 1


def _put(client, bucket: str, names) -> None:
    for name in names:
        client.put_object(Bucket=bucket, Key=f"raw/{name}", Body=b"x")


# Names that would write one output, far apart in key order (uppercase sorts before lowercase):
# more than 30 pages of 9 keys lie between Photo.JPG and photo.png.
FAR = ["Photo.JPG", "photo.png", "zz.png", "ZZ.bmp"]


def test_s3_flat_prefix_streams_units_of_its_key_order(s3_server, bucket, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    _put(client, bucket, NAMES + FAR + ["sub/c.png", "sub/C.png", ".hidden.png"])
    for name in NAMES + FAR:
        (tmp_path / name).write_bytes(b"x")
    uri = f"s3://{bucket}/raw"
    config = _config(uri, page_size=9, partition_keys=40, format="png")
    rows, tasks = _rows(uri, config)
    # the top level is longer than a page: one stream, which lists the folder it meets too
    assert [(t.stream, t.folders, t.partitions) for t in tasks] == [(True, True, 0)]
    assert rows == _rows(uri, config)[0]  # a rerun makes the same units
    # the units of one sorted listing (ledger format 1; format 2 up to partition_keys keys)
    flat = [(u, k) for u, k, _, _ in rows if "/" not in k]
    local = _config(str(tmp_path), page_size=1000, partition_keys=10**6, format="png")
    assert flat == [(u, k) for u, k, _, _ in _rows(str(tmp_path), local)[0]]
    assert [k for _, k in flat] == sorted(NAMES + FAR)
    # whatever the page size, and whether the driver saw the folder or the stream met it
    whole, whole_tasks = _rows(uri, dataclasses.replace(config, page_size=1000))
    assert [(t.stream, t.folders) for t in whole_tasks] == [(True, False), (False, False)]
    assert sorted(whole) == sorted(rows)
    # collisions across pages: the first key in key order writes the output, later ones fail
    failed = {k: cls for _, k, status, cls in rows if status == "failed"}
    assert failed == {"a.png": "OutputCollision", "b.png": "OutputCollision",
                      "photo.png": "OutputCollision", "zz.png": "OutputCollision",
                      "sub/c.png": "OutputCollision", "sub/C.png": "OutputCollision"}
    message = next(m for m in (r for task in tasks for unit in expand(task, config)
                               for r in unit) if m["key"] == "photo.png")["message"]
    assert "'Photo.JPG' (listed before it)" in message
    # a committed unit comes back as one marker; a collision with its keys is still caught
    photo = next(u for u, k, _, _ in rows if k == "Photo.JPG")
    again, _ = _rows(uri, config, frozenset({photo}))
    assert (photo, "", "skipped", "") in again
    assert "photo.png" in {k for _, k, s, _ in again if s == "failed"}
    assert [r for r in again if r[0] != photo] == [r for r in rows if r[0] != photo]


def test_s3_flat_prefix_yields_its_first_unit_after_its_first_pages(s3_server, bucket,
                                                                    monkeypatch):
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    _put(client, bucket, NAMES)
    fetched = []
    real = storage.scan_folder

    def scan(*args, **kwargs):  # counts the pages (list requests) as they are fetched
        for page in real(*args, **kwargs):
            fetched.append(len(page))
            yield page

    monkeypatch.setattr(storage, "scan_folder", scan)
    from moto.s3.models import S3Backend

    requests = []  # max_keys of every list request the (in-process) moto server answers
    real_list = S3Backend.list_objects_v2

    def list_objects_v2(self, *args, **kwargs):
        requests.append(kwargs["max_keys"] if "max_keys" in kwargs else args[5])
        return real_list(self, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "list_objects_v2", list_objects_v2)
    uri = f"s3://{bucket}/raw"
    config = _config(uri, page_size=9, partition_keys=40)
    tasks = listing_tasks(uri, config)
    assert len(fetched) == 2  # the driver: two pages, not the whole prefix
    assert requests == [1, 9, 9]  # ... and one key for "is it a prefix": no pass over it
    units = expand(tasks[0], config)
    first = next(units)
    # the stream has fetched the pages that hold its first unit's keys, and no more
    assert len(fetched) == 2 + -(-len(first) // 9) <= 2 + -(-sources.UNIT_MAX_KEYS // 9)
    rest = sum(1 for _ in units)
    assert rest > 5 and len(fetched) == 2 + -(-len(NAMES) // 9)  # 34 pages in the stream


def test_s3_prefix_of_one_page_lists_its_folders_in_their_own_tasks(s3_server, bucket):
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    _put(client, bucket, ["a.png", "b/c.png", "d/e.png", "_restorer/x.png"])
    uri = f"s3://{bucket}/raw"
    tasks = listing_tasks(uri, _config(uri, page_size=100, partition_keys=40))
    assert [(t.uri.rsplit("/", 1)[-1], t.stream, t.key_prefix) for t in tasks] == [
        ("raw", True, ""), ("b", False, "b/"), ("d", False, "d/")]
    client.delete_object(Bucket=bucket, Key="raw/a.png")  # no files: no stream task
    assert [t.stream for t in listing_tasks(uri, _config(uri, 100, 40))] == [False, False]


def test_s3_folders_differing_only_in_case_share_a_task(s3_server, bucket):
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    _put(client, bucket, ["Raw/a.png", "raw/a.png", "raw/b.png"])
    uri = f"s3://{bucket}/raw"
    config = _config(uri, page_size=100, partition_keys=40)
    rows, tasks = _rows(uri, config)
    assert [(t.uri, tuple(t.variants)) for t in tasks] == [(f"{uri}/Raw", ("raw",))]
    assert {k: cls for _, k, _, cls in rows} == {
        "Raw/a.png": "OutputCollision", "raw/a.png": "OutputCollision", "raw/b.png": ""}


def test_an_older_ledger_is_refused_only_where_its_units_differ(tmp_path):
    from restorer.errors import JobError
    from restorer.pipeline.sources import ListingTask
    from restorer.pipeline.sources import refuse_older_units as _refuse_older_units

    out = tmp_path / "out"
    (out / "_restorer").mkdir(parents=True)
    spec = spec_from_flags(RestoreSpec, input=str(tmp_path / "in"), output=str(out))
    config = _config(str(tmp_path / "in"), page_size=10, partition_keys=40)
    one = [ListingTask("files", "in", recursive=False, partition=0, partitions=1)]
    many = [ListingTask("files", "in", recursive=False, partition=p, partitions=2)
            for p in range(2)]
    _job(out, 1)
    _refuse_older_units(spec, one, config)  # a folder of one partition: the units of format 1
    with pytest.raises(JobError, match="ledger format 1.*sorted listing.*--overwrite"):
        _refuse_older_units(spec, many, config)
    for version in (2, 3):
        _job(out, version)
        _refuse_older_units(spec, many, config)


def _job(out, version: int) -> None:
    import json

    (out / "_restorer" / "job.json").write_text(json.dumps({"ledger_format_version": version}))


def test_an_older_ledger_of_a_big_s3_prefix_is_refused(s3_server, bucket, tmp_path):
    from restorer.errors import JobError
    from restorer.pipeline.sources import refuse_older_units as _refuse_older_units

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    _put(client, bucket, NAMES)
    uri = f"s3://{bucket}/raw"
    big = _config(uri, page_size=50, partition_keys=40)  # format 2 cut 304 keys by partition
    small = _config(uri, page_size=50, partition_keys=400)  # ... but not up to 400
    tasks = listing_tasks(uri, big)
    assert sources.units_changed(1, tasks, big) == ""  # format 1: one sorted listing
    assert "hash partitions" in sources.units_changed(2, tasks, big)
    assert sources.units_changed(2, tasks, small) == ""
    assert sources.units_changed(3, tasks, big) == ""
    out = tmp_path / "out"
    (out / "_restorer").mkdir(parents=True)
    spec = spec_from_flags(RestoreSpec, input=uri, output=str(out))
    _job(out, 2)
    with pytest.raises(JobError, match="ledger format 2: its units of a flat S3 prefix"):
        _refuse_older_units(spec, tasks, big)
    _refuse_older_units(spec, tasks, small)


def test_s3_rows_leave_the_listing_task_while_it_still_lists(ray_session, s3_server, bucket,
                                                             monkeypatch):
    """In Ray: the listing stage hands the first rows of a flat S3 prefix on while its listing
    task is held at a later page (the moto server runs in this process: its page requests wait
    on a gate here), so rows flow before the prefix is listed. Blocks of 4 KiB (some 30 rows of
    these short keys) stand for the job's 8 MiB (some 60,000 rows of keys this short), so that
    a few hundred keys show it: with Ray's default 128 MiB no row leaves before the end. (Ray
    hands a task's blocks on some three blocks behind the task: held at its 13th page, none
    had come; hence the 25th.)"""
    import threading

    from moto.s3.models import S3Backend

    from restorer.pipeline import graph
    from restorer.pipeline.graph import listing_dataset

    monkeypatch.setattr(graph, "BLOCK_BYTES", 4096)

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    _put(client, bucket, NAMES)
    uri = f"s3://{bucket}/raw"
    config = _config(uri, page_size=9, partition_keys=40)
    tasks = listing_tasks(uri, config)
    gate, pages, held = threading.Event(), [], threading.Event()
    real = S3Backend.list_objects_v2

    def list_objects_v2(self, *args, **kwargs):
        pages.append(1)
        if len(pages) > 24:  # the stream's 25th page (of 34) waits until the test has rows
            held.set()
            gate.wait(90)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "list_objects_v2", list_objects_v2)
    first: list = []
    got_rows = threading.Event()

    def consume():
        for row in listing_dataset(tasks, config, frozenset()).iter_rows():
            first.append(row["key"])
            got_rows.set()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        assert held.wait(60), "the listing never reached its 25th page"
        assert got_rows.wait(60), "no row came while the listing task was held"
        assert len(pages) == 25 and len(first) <= 25 * 9  # ... at its 25th page: mid-listing
    finally:
        gate.set()
    consumer.join(120)
    assert sorted(first) == sorted(NAMES)
    # the 32-row cut runs in the listing task (fused: same resources), not in 1-CPU tasks
    dag = listing_dataset(tasks, config, frozenset())._logical_plan.dag
    assert dag.target_num_rows_per_block == 32
    assert dag.ray_remote_args == {"num_cpus": graph.LISTING_CPUS}
