import os

import pytest

from restorer import storage
from restorer.errors import StorageError


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
