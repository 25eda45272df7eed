"""One storage layer for local paths, ``file://`` and ``s3://`` URIs.

Keys are relative POSIX paths ("a/b.png") under a root URI. Every key that comes from outside
(a listing, a shard, a manifest) goes through :func:`check_key` before it is joined to an output
root, so nothing is ever written outside it. Writes are atomic: a local file is written to a
temporary name beside its final one and renamed into place; an S3 object is one PUT, which S3
publishes whole. A reader never sees a truncated file at a final key. Writes that must never
replace anything (a job's ledger entries) can be create-only: a hard link locally, a conditional
PUT (``If-None-Match: *``) on S3.

Credentials come from the standard AWS environment (``AWS_ACCESS_KEY_ID``, profiles,
``AWS_ENDPOINT_URL``) or from :class:`StorageOptions`; neither is ever logged.

Size: the one storage layer (local and S3: listing, paging, atomic and create-only writes,
error translation); splitting local from S3 would duplicate every operation's contract.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import fsspec

from restorer.errors import StorageError

log = logging.getLogger(__name__)

S3_MAX_ATTEMPTS = 5  # botocore tries per S3 request (first + retries); s3fs repeats a failed
# call up to 5 times more on connection errors and SlowDown, so one call rides out about a minute

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif",
)
META_DIR = "_restorer"  # a job's records under its output (restorer.output.ledger); not listed


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage; no secrets here (they stay in the environment)."""

    endpoint_url: str | None = None  # e.g. a MinIO or moto server; default: AWS_ENDPOINT_URL
    region: str | None = None
    anon: bool = False  # unsigned requests, for public buckets


@dataclass(frozen=True)
class Entry:
    key: str  # relative POSIX path under the listed root
    uri: str  # full URI or local path to read it from
    size: int  # bytes


# Where botocore (through s3fs) reads credentials, in its order; named in every access error.
CREDENTIALS_HINT = (" (read, in order, from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY[/AWS_SESSION_TOKEN], "
                    "AWS_PROFILE or the default profile in ~/.aws/credentials and ~/.aws/config, "
                    "then the instance or container role; endpoint from AWS_ENDPOINT_URL or "
                    "storage.endpoint_url)")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri.removeprefix("file://")


@lru_cache(maxsize=8)
def _s3(options: StorageOptions) -> fsspec.AbstractFileSystem:
    import s3fs

    client_kwargs = {}
    if options.endpoint_url:
        client_kwargs["endpoint_url"] = options.endpoint_url
    if options.region:
        client_kwargs["region_name"] = options.region
    # No listing cache: a job lists its output's ledger after writing to it. Retries: botocore's
    # adaptive mode (exponential backoff with jitter, client-side rate limiting on throttling)
    # retries 5xx, SlowDown, timeouts and dropped connections, S3_MAX_ATTEMPTS tries in all.
    return s3fs.S3FileSystem(anon=options.anon, client_kwargs=client_kwargs,
                             use_listings_cache=False,
                             config_kwargs={"retries": {"mode": "adaptive",
                                                        "max_attempts": S3_MAX_ATTEMPTS},
                                            "connect_timeout": 10, "read_timeout": 60})


def filesystem(uri: str, options: StorageOptions = StorageOptions()):
    """The fsspec filesystem for ``uri`` and the path to hand it."""
    if uri.startswith("s3://"):
        return _s3(options), uri[len("s3://"):]
    if is_remote(uri):
        raise StorageError(f"Unsupported URI scheme in {uri!r}; use a local path, file:// or s3://")
    return fsspec.filesystem("file"), os.path.abspath(local_path(uri))


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative POSIX path, else raise ``StorageError``.

    Refused: empty keys, absolute paths, ``..`` or ``.`` components, backslashes, NUL and other
    control characters. Such keys come from hostile shards or manifests and would write outside
    the output root.
    """
    if not key or key.startswith("/") or "\\" in key or any(ord(c) < 32 for c in key):
        raise StorageError(f"Unsafe key {key!r}: keys must be relative paths without control "
                           "characters or backslashes")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts) or (len(parts[0]) == 2 and parts[0][1] == ":"):
        raise StorageError(f"Unsafe key {key!r}: '..', '.', empty and drive components are refused")
    return key


def join(root: str, key: str) -> str:
    """The URI of ``key`` under ``root``, refusing keys that would escape it."""
    check_key(key)
    if is_remote(root) or root.startswith("file://"):
        return root.rstrip("/") + "/" + key
    return os.path.join(root, *key.split("/"))


def read_bytes(uri: str, options: StorageOptions = StorageOptions()) -> bytes:
    try:
        if not is_remote(uri):
            with open(local_path(uri), "rb") as f:
                return f.read()
        fs, path = filesystem(uri, options)
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise StorageError(f"{uri} does not exist") from e
    except PermissionError as e:
        raise StorageError(f"No permission to read {uri}; check its mode or your credentials") from e


def write_bytes(uri: str, data: bytes, options: StorageOptions = StorageOptions(),
                create: bool = False) -> None:
    """Publish ``data`` at ``uri`` atomically (temp + rename locally, one PUT on S3).

    ``create=True`` only creates: an object already at ``uri`` with other bytes is left as it
    is and ``StorageError`` is raised (one with these very bytes counts as written, so a
    retried request whose first attempt had in fact succeeded is not an error). Locally the
    temporary file is hard-linked to its final name, which fails if the name exists; on S3 the
    PUT is conditional (``If-None-Match: *``: AWS S3, MinIO, R2 and moto honour it). Where the
    store cannot do that (no hard links; an S3 store answering 501 Not Implemented), the write
    falls back to a plain replace after a warning.
    """
    if is_remote(uri):
        fs, path = filesystem(uri, options)
        try:
            if not create:
                fs.pipe_file(path, data)  # one PUT: S3 publishes the object whole, or not at all
                return
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                _refuse_other_bytes(uri, data, fs.cat_file(path))
            except OSError as e:
                if e.errno != errno.ENOSYS:
                    raise
                _warn_no_create(uri, "the store does not implement conditional PUTs")
                fs.pipe_file(path, data)
        except PermissionError as e:
            raise StorageError(f"No permission to write {uri}; check your credentials"
                               + CREDENTIALS_HINT) from e
        except FileNotFoundError as e:
            raise StorageError(f"Cannot write {uri}: the bucket does not exist") from e
        return
    path = local_path(uri)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not create:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # atomic, and refused if the name exists
        except FileExistsError:
            with open(path, "rb") as f:
                _refuse_other_bytes(uri, data, f.read())
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            _warn_no_create(uri, "the file system has no hard links")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    _refuse_other_bytes(uri, data, f.read())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def create_only_honoured(folder: str, options: StorageOptions = StorageOptions()) -> bool:
    """Whether the store under ``folder`` refuses a second create-only write of one name (a
    probe: two create-only writes of a hidden object, which is then removed). False where the
    second write replaced the first (an S3-compatible store that ignores ``If-None-Match``) or
    where create-only writes are not implemented (501; no hard links)."""
    probe = join(folder, f".create-probe-{uuid.uuid4().hex}")
    try:
        if is_remote(probe):
            fs, path = filesystem(probe, options)
            try:
                fs.pipe_file(path, b"first", mode="create")
                fs.pipe_file(path, b"second", mode="create")
            except FileExistsError:
                return True
            except OSError as e:
                if e.errno == errno.ENOSYS:
                    return False
                raise StorageError(f"Cannot write {probe}: {e}") from e
            return False
        path = local_path(probe)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        source = f"{path}.src"
        with open(source, "wb") as f:
            f.write(b"first")
        try:
            os.link(source, path)
            os.link(source, path)
        except FileExistsError:
            return True
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
                return False
            raise StorageError(f"Cannot write {probe}: {e}") from e
        finally:
            os.unlink(source)
        return False
    finally:
        try:
            delete(probe, options)
        except StorageError as e:
            log.debug("could not remove the probe %s: %s", probe, e)


class VersionChanged(StorageError):
    """A conditional replace found another version of the object than the one it expected."""


def replace_if(uri: str, data: bytes, options: StorageOptions = StorageOptions(),
               version: str | None = None) -> str:
    """Replace the object at ``uri`` with ``data`` only if it is still ``version`` (the value
    a previous call returned; None: whatever is there, or nothing); return its new version.

    On S3 a conditional PUT (``If-Match`` on the ETag; AWS S3, MinIO and moto honour it); a
    store answering 501 gets a compare (HEAD) then a plain PUT, after a warning. Locally the
    version is the content's sha256, compared and replaced under an exclusive ``flock`` of
    ``.<name>.lock`` beside it (every writer through this function takes it). Raises
    :class:`VersionChanged` when another writer replaced (or removed) the object.
    """
    import hashlib

    if is_remote(uri):
        fs, path = filesystem(uri, options)
        bucket, _, key = path.partition("/")
        request = {"Bucket": bucket, "Key": key, "Body": data}
        if version is not None:
            request["IfMatch"] = version
        try:
            return fs.call_s3("put_object", **request)["ETag"]
        except FileNotFoundError as e:  # If-Match on a removed object: NoSuchKey
            raise VersionChanged(f"{uri} was removed by another writer") from e
        except OSError as e:
            if e.errno == errno.EINVAL and version is not None:  # 412 PreconditionFailed
                raise VersionChanged(f"{uri} was replaced by another writer") from e
            if e.errno != errno.ENOSYS or version is None:
                raise StorageError(f"Cannot write {uri}: {e}") from e
            _warn_no_create(uri, "the store does not implement conditional PUTs (If-Match)")
            if fs.info(path).get("ETag") != version:
                raise VersionChanged(f"{uri} was replaced by another writer") from e
            return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data)["ETag"]
    import fcntl

    path = local_path(uri)
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f".{name}.lock"), "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks (some NFS mounts)
            _warn_no_create(uri, f"the file system refuses locks ({e})")
        if version is not None:
            try:
                with open(path, "rb") as f:
                    current = hashlib.sha256(f.read()).hexdigest()
            except FileNotFoundError as e:
                raise VersionChanged(f"{uri} was removed by another writer") from e
            if current != version:
                raise VersionChanged(f"{uri} was replaced by another writer")
        write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


def _refuse_other_bytes(uri: str, data: bytes, existing: bytes) -> None:
    if existing != data:
        raise StorageError(f"{uri} already exists with other contents and was not replaced (a "
                           "create-only write): is another job writing to the same place?")


_WARNED_NO_CREATE: set[str] = set()


def _warn_no_create(uri: str, why: str) -> None:
    """Log once per reason that create-only writes fall back to replacing."""
    if why not in _WARNED_NO_CREATE:
        _WARNED_NO_CREATE.add(why)
        log.warning("create-only writes are not enforced (first seen at %s): %s; existing "
                    "objects are replaced instead", uri, why)


def exists(uri: str, options: StorageOptions = StorageOptions()) -> bool:
    """Whether ``uri`` is an existing file, folder or S3 object (or prefix)."""
    if not is_remote(uri):
        return os.path.exists(local_path(uri))
    return _ask(uri, options, lambda fs, path: fs.exists(path))


def _ask(uri: str, options: StorageOptions, question, verb: str = "read") -> Any:
    """``question(fs, path)`` about a remote ``uri``, its failures as :class:`StorageError`
    naming the URI, what was refused (``verb``) and where credentials come from."""
    fs, path = filesystem(uri, options)
    try:
        return question(fs, path)
    except PermissionError as e:
        raise StorageError(f"No permission to {verb} {uri}; check your AWS credentials"
                           + CREDENTIALS_HINT) from e
    except OSError as e:
        raise StorageError(f"Cannot reach {uri}: {e}; check the bucket name, endpoint and "
                           "credentials" + CREDENTIALS_HINT) from e


def list_names(uri: str, options: StorageOptions = StorageOptions()) -> list[str]:
    """Names of the files directly under the folder/prefix ``uri`` (empty if it is missing)."""
    if not is_remote(uri):
        path = local_path(uri)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = filesystem(uri, options)
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path.rstrip("/"),
                                                                       detail=False, refresh=True))
    except FileNotFoundError:
        return []
    except PermissionError as e:
        raise StorageError(f"No permission to list {uri}; check your AWS credentials" + CREDENTIALS_HINT) from e


LIST_PAGE_SIZE = 1000  # entries per listing page (S3's ListObjectsV2 maximum)


@dataclass(frozen=True)
class FolderEntry:
    name: str  # the name directly under the listed folder/prefix
    uri: str  # full URI or local path
    is_dir: bool
    size: int = -1  # bytes (S3 gives it with the listing; locally -1: stat it when needed)


def scan_folder(uri: str, options: StorageOptions = StorageOptions(),
                page_size: int = LIST_PAGE_SIZE) -> Iterator[list[FolderEntry]]:
    """The entries directly under the folder/prefix ``uri``, in pages of up to ``page_size``,
    streaming: only one page is held at a time, however many entries the folder has.

    Locally the pages come from ``os.scandir`` in the file system's order (not sorted: no
    full listing is ever built); on S3 from ``ListObjectsV2`` with a ``/`` delimiter, in key
    order, sub-prefixes as folders. Hidden entries (``.name``) are left out. A missing folder
    yields nothing.
    """
    if page_size < 1:
        raise ValueError(f"page_size = {page_size}; need 1 or more")
    page: list[FolderEntry] = []
    if not is_remote(uri):
        path = local_path(uri)
        if not os.path.isdir(path):
            return
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                is_dir = entry.is_dir()
                if not is_dir and not entry.is_file():
                    continue  # sockets, broken links
                page.append(FolderEntry(entry.name, entry.path, is_dir))
                if len(page) >= page_size:
                    yield page
                    page = []
        if page:
            yield page
        return
    fs, path = filesystem(uri, options)
    bucket, _, prefix = path.rstrip("/").partition("/")
    prefix = prefix + "/" if prefix else ""
    scheme = uri.split("://", 1)[0]
    token = None
    try:
        while True:
            request = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/",
                       "MaxKeys": page_size}
            if token:
                request["ContinuationToken"] = token
            answer = fs.call_s3("list_objects_v2", **request)
            for common in answer.get("CommonPrefixes", []):
                name = common["Prefix"][len(prefix):].rstrip("/")
                if name and not name.startswith("."):
                    page.append(FolderEntry(name, f"{scheme}://{bucket}/{prefix}{name}", True))
            for item in answer.get("Contents", []):
                name = item["Key"][len(prefix):]
                if name and not name.startswith(".") and not name.endswith("/"):
                    page.append(FolderEntry(name, f"{scheme}://{bucket}/{item['Key']}", False,
                                            int(item.get("Size") or 0)))
            if page:
                yield page
                page = []
            token = answer.get("NextContinuationToken")
            if not answer.get("IsTruncated") or not token:
                return
    except FileNotFoundError:
        return
    except PermissionError as e:
        raise StorageError(f"No permission to list {uri}; check your AWS credentials"
                           + CREDENTIALS_HINT) from e


def matches(key: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether ``key`` matches an ``include`` glob (if any) and no ``exclude`` glob."""
    if include and not any(fnmatch.fnmatchcase(key, pattern) for pattern in include):
        return False
    return not any(fnmatch.fnmatchcase(key, pattern) for pattern in exclude)


def walk_files(
    root: str,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    skip_dirs: Sequence[str] = (META_DIR,),
    options: StorageOptions = StorageOptions(),
    recursive: bool = True,
) -> Iterator[list[Entry]]:
    """Yield the image files under ``root``, one sorted list per folder, streaming.

    Folders are visited in sorted order and yielded as soon as they are listed, so work starts
    before a huge tree is fully listed. Files are kept if their extension (case-insensitive) is in
    ``extensions`` and their key matches an ``include`` glob (if any) and no ``exclude`` glob.
    Hidden files and folders (".name") and ``skip_dirs`` are not visited. ``recursive=False``
    lists only the files directly under ``root``.
    """
    extensions = tuple(e.lower() for e in extensions)

    def keep(key: str) -> bool:
        name = posixpath.basename(key)
        return (not name.startswith(".") and name.lower().endswith(extensions)
                and matches(key, include, exclude))

    if not is_remote(root):
        base = local_path(root)
        if not os.path.isdir(base):
            raise StorageError(f"Input folder {root} does not exist or is not a folder")
        for directory, dirnames, filenames in os.walk(base):
            if not recursive:
                dirnames[:] = []
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs)
            rel = os.path.relpath(directory, base)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            entries = []
            for name in sorted(filenames):
                key = prefix + name
                path = os.path.join(directory, name)
                if keep(key) and os.path.isfile(path):
                    entries.append(Entry(key, path, os.path.getsize(path)))
            if entries:
                yield entries
        return

    fs, base = filesystem(root, options)
    base = base.rstrip("/")
    scheme = root.split("://", 1)[0]
    try:
        walker = fs.walk(base, detail=True, maxdepth=None if recursive else 1)
        for directory, dirs, files in walker:
            for d in list(dirs):
                if d.startswith(".") or d in skip_dirs:
                    del dirs[d]
            rel = directory[len(base):].strip("/")
            prefix = rel + "/" if rel else ""
            entries = []
            for name in sorted(files):
                key = prefix + name
                if keep(key):
                    entries.append(Entry(key, f"{scheme}://{directory}/{name}",
                                         int(files[name].get("size") or 0)))
            if entries:
                yield entries
    except FileNotFoundError as e:
        raise StorageError(f"Input prefix {root} does not exist") from e
    except PermissionError as e:
        raise StorageError(f"No permission to list {root}; check your AWS credentials" + CREDENTIALS_HINT) from e


def is_file(uri: str, options: StorageOptions = StorageOptions()) -> bool:
    """Whether ``uri`` is an existing file (or S3 object)."""
    if not is_remote(uri):
        return os.path.isfile(local_path(uri))
    return _ask(uri, options, lambda fs, path: fs.isfile(path))


def has_local_file(root: str, extensions: Sequence[str], skip_dirs: Sequence[str] = ()) -> bool:
    """Whether the local folder ``root`` holds a file with one of ``extensions`` anywhere below
    it (hidden entries and ``skip_dirs`` aside); stops at the first one, so it is cheap on huge
    trees that hold images and on empty ones."""
    extensions = tuple(e.lower() for e in extensions)
    pending = [local_path(root)]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or entry.name in skip_dirs:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.name.lower().endswith(extensions):
                        return True
        except OSError:
            continue
    return False


def is_dir(uri: str, options: StorageOptions = StorageOptions()) -> bool:
    """Whether ``uri`` is an existing folder (or an S3 prefix with objects below it).

    Raises ``StorageError`` when the store refuses to answer (no such bucket, bad credentials).
    """
    if not is_remote(uri):
        return os.path.isdir(local_path(uri))
    def one_key(fs, path: str) -> bool:  # one request (s3fs's isdir lists the whole prefix)
        bucket, _, prefix = path.strip("/").partition("/")
        request = {"Bucket": bucket, "MaxKeys": 1, **({"Prefix": prefix + "/"} if prefix else {})}
        try:
            answer = fs.call_s3("list_objects_v2", **request)
        except FileNotFoundError:
            return False
        return not prefix or bool(answer.get("Contents") or answer.get("CommonPrefixes"))

    return _ask(uri, options, one_key, "list")


def list_dirs(uri: str, options: StorageOptions = StorageOptions()) -> list[str]:
    """Names of the folders (or common prefixes) directly under ``uri``, sorted."""
    if not is_remote(uri):
        path = local_path(uri)
        return sorted(e.name for e in os.scandir(path) if e.is_dir()) if os.path.isdir(path) else []
    fs, path = filesystem(uri, options)
    try:
        entries = fs.ls(path.rstrip("/"), detail=True)
    except FileNotFoundError:
        return []
    except PermissionError as e:
        raise StorageError(f"No permission to list {uri}; check your AWS credentials" + CREDENTIALS_HINT) from e
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries
                  if e.get("type") == "directory")


def delete(uri: str, options: StorageOptions = StorageOptions(), recursive: bool = False) -> None:
    """Remove a file (or a whole folder/prefix with ``recursive``); missing is not an error."""
    fs, path = filesystem(uri, options)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass
    except PermissionError as e:
        raise StorageError(f"No permission to delete {uri}; check your AWS credentials" + CREDENTIALS_HINT) from e
