"""Shared fixtures: small deterministic images, a tiny model, and one local Ray per session."""

from __future__ import annotations

import os

# Token authentication is Ray's default for local clusters since 2.59; we keep it on, and set it
# deliberately so that the embedded cluster and every subprocess agree (token in ~/.ray).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from restorer.checkpoint import save_model  # noqa: E402
from restorer.nets import build_net  # noqa: E402

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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: 2 CPUs, a 300 MB object store, no dashboard."""
    import ray

    ray.init(num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False,
             configure_logging=False)
    yield ray
    ray.shutdown()
