"""Restore jobs against a real S3 endpoint: moto's server on 127.0.0.1, spoken to over HTTP
by s3fs and boto3 exactly as in production (no mocking)."""

import io
import json
import os

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import upload_folder
from PIL import Image

from restorer.cli import main
from restorer.errors import StorageError
from restorer.pipeline import restore


@pytest.fixture
def s3(s3_server):
    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


def _keys(s3, bucket, prefix):
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _image(s3, bucket, key):
    return Image.open(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))


def test_s3_to_s3_and_s3_to_local(ray_session, s3, bucket, mixed_folder, tmp_path, tiny_model):
    source, expected = mixed_folder
    upload_folder(s3, source, bucket, "raw/")
    summary = restore(f"s3://{bucket}/raw/", f"s3://{bucket}/restored/", model=tiny_model,
                      tile=64)
    assert (summary["succeeded"], summary["failed"]) == (5, 1)
    # the prefix's non-image objects are counted and named, as a local folder's
    assert (summary["skipped_non_images"], summary["non_image_examples"]) == (1, ["notes.txt"])
    written = _keys(s3, bucket, "restored/")
    for key, outcome in expected.items():
        assert (f"restored/{key}" in written) == (outcome == "ok"), key
    assert _image(s3, bucket, "restored/sub dir/rgba é.png").mode == "RGBA"
    assert any(k.startswith("restored/_restorer/ledger/unit-") for k in written)
    errors = pq.read_table(io.BytesIO(s3.get_object(
        Bucket=bucket, Key=next(k for k in written if "errors.parquet/" in k))["Body"].read()))
    assert errors.column("key").to_pylist() == ["corrupt.jpg"]
    # a rerun skips everything; summary.json on S3 says so
    again = restore(f"s3://{bucket}/raw/", f"s3://{bucket}/restored/", model=tiny_model,
                    tile=64)
    assert again["skipped"] == 6 and again["succeeded"] == 0
    summary_json = json.loads(s3.get_object(Bucket=bucket, Key="restored/_restorer/summary.json")
                              ["Body"].read())
    assert summary_json["skipped"] == 6

    local = restore(f"s3://{bucket}/raw/", str(tmp_path / "local"), model=tiny_model, tile=64)
    assert local["succeeded"] == 5
    assert Image.open(tmp_path / "local" / "g16.png").mode in ("I;16", "I")


def test_shards_pack_restore_parquet_unpack(ray_session, s3, bucket, mixed_folder, tmp_path,
                                            tiny_model):
    source, expected = mixed_folder
    runner = CliRunner()
    result = runner.invoke(main, ["shard", "pack", str(source), f"s3://{bucket}/shards/",
                                  "--rows-per-shard", "4"])
    assert result.exit_code == 0, result.output
    assert "packed 6 images" in result.output and "into 2 shards" in result.output
    result = runner.invoke(main, ["restore", f"s3://{bucket}/shards/",
                                  f"s3://{bucket}/out-shards/", "--layout", "parquet",
                                  "--model", tiny_model, "--tile", "64"])
    assert result.exit_code == 3, result.output  # one corrupt image
    shards = [k for k in _keys(s3, bucket, "out-shards/") if k.endswith(".parquet")
              and "/_restorer/" not in k]
    table = pa.concat_tables(pq.read_table(io.BytesIO(s3.get_object(
        Bucket=bucket, Key=k)["Body"].read())) for k in shards)
    status = dict(zip(table.column("key").to_pylist(), table.column("status").to_pylist()))
    assert status == {k: ("ok" if v == "ok" else "failed") for k, v in expected.items()}
    result = runner.invoke(main, ["shard", "unpack", f"s3://{bucket}/out-shards/",
                                  str(tmp_path / "unpacked")])
    assert result.exit_code == 0, result.output
    assert "unpacked 5 images" in result.output
    assert Image.open(tmp_path / "unpacked" / "sub dir" / "rgba é.png").mode == "RGBA"


def test_manifest_with_a_missing_object(ray_session, s3, bucket, mixed_folder, tiny_model):
    source, _ = mixed_folder
    upload_folder(s3, source, bucket, "pool/")
    uris = [f"s3://{bucket}/pool/gray.png", f"s3://{bucket}/pool/rgb.jpg",
            f"s3://{bucket}/pool/gone.png"]
    sink = io.BytesIO()
    pq.write_table(pa.table({"uri": uris}), sink)
    s3.put_object(Bucket=bucket, Key="todo.parquet", Body=sink.getvalue())
    args = ["restore", "--manifest", f"s3://{bucket}/todo.parquet", f"s3://{bucket}/restored/",
            "--model", tiny_model, "--json"]
    # a missing object may come back (a late upload): its unit stays open for two runs
    # (incomplete, exit 5), and the third run quarantines it
    for _ in range(2):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 5, result.output
        summary = json.JSONDecoder().raw_decode(result.output, result.output.index("{"))[0]
        assert summary["missing_inputs"] == 1 and summary["failed"] == 0, summary
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3, result.output
    summary = json.JSONDecoder().raw_decode(result.output, result.output.index("{"))[0]
    assert summary["failed"] == 1, summary
    errors = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=next(
        k for k in _keys(s3, bucket, "restored/_restorer/errors.parquet/")))["Body"].read()))
    assert "missing in 3 runs" in errors.column("message")[0].as_py()
    written = _keys(s3, bucket, "restored/")
    assert "restored/pool/gray.png" in written and "restored/pool/rgb.jpg" in written

    # a text manifest with explicit keys is not needed: keys default to the path after the
    # bucket; a hostile key in a Parquet manifest is refused and nothing escapes the output
    sink = io.BytesIO()
    pq.write_table(pa.table({"uri": [f"s3://{bucket}/pool/gray.png"] * 2,
                             "key": ["../../escape.png", "ok/fine.png"]}), sink)
    s3.put_object(Bucket=bucket, Key="hostile.parquet", Body=sink.getvalue())
    summary = restore(f"s3://{bucket}/hostile.parquet", f"s3://{bucket}/hostile-out/",
                      model=tiny_model, input_layout="manifest")
    assert (summary["succeeded"], summary["failed"]) == (1, 1)
    assert _keys(s3, bucket, "hostile-out/ok/") == ["hostile-out/ok/fine.png"]
    assert not any("escape" in k for k in _keys(s3, bucket, ""))


def test_wrong_bucket_is_one_clear_error_before_any_work(s3_server, bucket, tmp_path,
                                                         tiny_model):
    with pytest.raises(StorageError, match="no-such-bucket-x"):
        restore("s3://no-such-bucket-x/raw/", str(tmp_path / "out"), model=tiny_model)
    assert not (tmp_path / "out").exists()
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    result = CliRunner().invoke(main, ["restore", str(folder), "s3://no-such-bucket-y/out/",
                                       "--model", tiny_model])
    assert result.exit_code == 1 and "no-such-bucket-y" in result.output


def test_bad_credentials_are_one_clear_error_before_any_work(signing_s3_server, tmp_path,
                                                            tiny_model):
    """Against a moto server that checks signatures, unknown keys are refused as S3 refuses
    them, before the job lists or writes anything."""
    import subprocess
    import sys

    env = dict(os.environ, AWS_ENDPOINT_URL=signing_s3_server,
               AWS_ACCESS_KEY_ID="AKIANOTAREALKEY00000", AWS_SECRET_ACCESS_KEY="wrong")
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    for args in (["s3://private-bucket/raw/", str(tmp_path / "out")],
                 [str(folder), "s3://private-bucket/out/"]):
        result = subprocess.run(  # noqa: PLW1510 - the test reads returncode
            [sys.executable, "-m", "restorer", "restore", *args, "--model", tiny_model],
            capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "credentials" in result.stderr and "Traceback" not in result.stderr
        assert "AWS_ACCESS_KEY_ID" in result.stderr  # where credentials are read from
        assert "wrong" not in result.stderr  # the secret never appears
    assert not (tmp_path / "out").exists()
