import errno
import os

import pytest

from restorer.errors import StorageError
from restorer.io import storage


@pytest.mark.parametrize("key", ["../x.png", "a/../../x.png", "/etc/passwd", "a\\b.png",
                                 "a\x00b.png", "", "a//b.png", "./a.png", "C:/x.png"])
def test_hostile_keys_are_refused(key, tmp_path):
    with pytest.raises(StorageError, match="Unsafe key"):
        storage.join(str(tmp_path), key)


def test_safe_keys_join_under_root(tmp_path):
    assert storage.join(str(tmp_path), "a b/é.png") == os.path.join(tmp_path, "a b", "é.png")
    assert storage.join("s3://bucket/out/", "x/y.png") == "s3://bucket/out/x/y.png"


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "deep" / "file.bin"
    storage.write_bytes(str(target), b"one")
    storage.write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["file.bin"]


def test_walk_files_streams_sorted_folders_with_filters(tmp_path):
    for key in ["b.png", "a.JPG", "sub/c.webp", "sub/d.txt", ".hidden.png", "_restorer/x.png",
                "sub/skip.png"]:
        path = tmp_path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    folders = list(storage.walk_files(str(tmp_path), exclude=["*/skip.png"]))
    assert [[e.key for e in entries] for entries in folders] == [["a.JPG", "b.png"],
                                                                ["sub/c.webp"]]
    only = list(storage.walk_files(str(tmp_path), include=["sub/*"]))
    assert [e.key for entries in only for e in entries] == ["sub/c.webp", "sub/skip.png"]


def test_missing_input_folder_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        list(storage.walk_files(str(tmp_path / "nope")))
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes(str(tmp_path / "nope.png"))


def test_create_only_write_never_replaces_other_bytes(tmp_path):
    target = tmp_path / "ledger" / "unit-a.parquet"
    storage.write_bytes(str(target), b"one", create=True)
    storage.write_bytes(str(target), b"one", create=True)  # the same bytes: already written
    with pytest.raises(StorageError, match="already exists with other contents"):
        storage.write_bytes(str(target), b"two", create=True)
    assert target.read_bytes() == b"one"
    assert os.listdir(target.parent) == ["unit-a.parquet"]  # no temporary file left behind
    storage.write_bytes(str(target), b"two")  # a plain write replaces
    assert target.read_bytes() == b"two"


def test_create_only_write_without_hard_links_checks_then_replaces(tmp_path, monkeypatch, caplog):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(storage, "_WARNED_NO_CREATE", set())
    target = tmp_path / "unit-a.parquet"
    storage.write_bytes(str(target), b"one", create=True)
    assert target.read_bytes() == b"one" and "not enforced" in caplog.text
    with pytest.raises(StorageError, match="already exists with other contents"):
        storage.write_bytes(str(target), b"two", create=True)
    assert os.listdir(tmp_path) == ["unit-a.parquet"]


def test_create_only_write_on_s3_is_a_conditional_put(bucket):
    """moto honours ``If-None-Match: *`` as S3 does; nothing is checked before the PUT, so the
    refusal can only come from the store."""
    uri = f"s3://{bucket}/out/_restorer/ledger/unit-a.parquet"
    storage.write_bytes(uri, b"one", create=True)
    storage.write_bytes(uri, b"one", create=True)  # a retried PUT that had succeeded
    with pytest.raises(StorageError, match="already exists with other contents"):
        storage.write_bytes(uri, b"two", create=True)
    assert storage.read_bytes(uri) == b"one"
    storage.write_bytes(uri, b"two")
    assert storage.read_bytes(uri) == b"two"
