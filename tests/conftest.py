"""Shared fixtures: small deterministic images, a tiny model, and one local Ray per session."""

from __future__ import annotations

import os

# Token authentication is Ray's default for local clusters since 2.59; we keep it on, and set it
# deliberately so that the embedded cluster and every subprocess agree (token in ~/.ray).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# S3 tests talk to a moto server on 127.0.0.1 through s3fs, exactly as production talks to S3:
# endpoint and credentials come from the standard AWS environment, set here before Ray starts
# so that Ray's workers inherit them.
MOTO_PORT = _free_port()
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1",
                  AWS_ENDPOINT_URL=f"http://127.0.0.1:{MOTO_PORT}")
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_name, None)

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from restorer.checkpoint import save_model
from restorer.nets import build_net

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random 4-layer gray DnCNN saved as a restorer model file."""
    torch.manual_seed(0)
    net = build_net({"arch": "dncnn", "channels": 1, "num_features": 8, "num_layers": 4,
                     "batch_norm": False}).eval()
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_model(str(path), net, {"purpose": "tests"})
    return str(path)


def write_mixed_folder(root: Path) -> dict[str, str]:
    """A folder of mixed inputs; returns key -> expected outcome ("ok" or an error stage)."""
    rng = np.random.default_rng(0)
    (root / "sub dir").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (64, 80), dtype=np.uint8)).save(root / "gray.png")
    Image.fromarray(rng.integers(0, 255, (300, 280, 3), dtype=np.uint8)).save(
        root / "rgb.jpg", quality=90)
    Image.fromarray(rng.integers(0, 255, (50, 41, 4), dtype=np.uint8)).save(
        root / "sub dir" / "rgba é.png")
    Image.fromarray(rng.integers(0, 65535, (30, 21), dtype=np.uint16)).save(root / "g16.png")
    Image.fromarray(rng.integers(0, 255, (3, 700, 3), dtype=np.uint8)).save(root / "thin.webp",
                                                                             lossless=True)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image, not listed")
    return {"gray.png": "ok", "rgb.jpg": "ok", "sub dir/rgba é.png": "ok", "g16.png": "ok",
            "thin.webp": "ok", "corrupt.jpg": "decode"}


@pytest.fixture
def mixed_folder(tmp_path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "in"
    return root, write_mixed_folder(root)


@pytest.fixture
def ray_session(_shared_ray):
    """The shared local Ray (2 CPUs, 300 MB object store, no dashboard), started on first use.

    Tests that need their own cluster (a real head, a multi-node cluster) take
    ``exclusive_ray`` instead, which stops this one first; the next test that asks for
    ``ray_session`` starts it again. So there is only ever one Ray cluster at a time.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False,
                 configure_logging=False)
    return ray


@pytest.fixture(scope="session")
def _shared_ray():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def exclusive_ray():
    """No Ray running in this process: the test starts (and stops) its own cluster."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (region us-east-1); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=MOTO_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket for one test; yields its name."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield name


def upload_folder(client, folder: Path, bucket: str, prefix: str) -> list[str]:
    keys = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = prefix + path.relative_to(folder).as_posix()
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            keys.append(key)
    return keys
