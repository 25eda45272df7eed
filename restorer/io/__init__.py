"""Bytes in and out: storage URIs (local paths and ``s3://``), image codecs, Parquet shards of
encoded images, and the sample images of the first run.

Modules: ``storage`` (listing, reads, atomic and create-only writes) < ``codec`` (bytes <->
arrays, modes, EXIF, limits) < ``shards`` (pack / unpack); ``samples`` (synthetic photos).
"""

from restorer import faces

HOMES = {
    "StorageOptions": "storage",
    "decode": "codec",
    "encode": "codec",
    "pack": "shards",
    "unpack": "shards",
    "write_samples": "samples",
}
__getattr__ = faces(__name__, HOMES)
__all__ = sorted(HOMES)
