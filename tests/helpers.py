"""Plain helpers shared by the tests (fixtures live in conftest.py): free ports, ledger records,
the shared data beside the checkout, and a MATLAB ``imresize`` reference written from its
formulas.

Test modules import these as ``from helpers import ...`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


# --- ports -----------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- ledger records --------------------------------------------------------------------------

def record(key: str, unit: str, **values) -> dict:
    """One row of ``restorer.pipeline.driver.RECORD_SCHEMA``: every field empty or zero, then
    ``key`` (also the output key), ``unit``, ``status="ok"``, ``unit_size=1``, ``format="png"`` and
    ``values`` (which override any of them)."""
    import pyarrow as pa

    from restorer.output.records import RECORD_SCHEMA

    row = {f.name: ("" if pa.types.is_string(f.type) else b"" if pa.types.is_binary(f.type)
                    or pa.types.is_large_binary(f.type) else 0) for f in RECORD_SCHEMA}
    row.update(key=key, out_key=key, unit=unit, status="ok", unit_size=1, format="png")
    row.update(values)
    return row


# --- S3 ------------------------------------------------------------------------------------

def upload_folder(client, folder: Path, bucket: str, prefix: str) -> list[str]:
    """Put every file under ``folder`` into ``bucket`` under ``prefix``; returns the keys."""
    keys = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = prefix + path.relative_to(folder).as_posix()
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            keys.append(key)
    return keys


# --- ../shared: the data and CRDs kept beside the checkout -----------------------------------

SHARED_ENV = "RESTORER_SHARED_DIR"


def shared_dir() -> Path:
    """``$RESTORER_SHARED_DIR``, or ``shared/`` beside the checkout (``../shared``)."""
    return Path(os.environ.get(SHARED_ENV) or REPO.parent / "shared")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def shared_path(*parts: str) -> Path:
    """A path inside the shared folder; a test that needs it and does not find it is skipped
    with the reason, except in CI (``CI=true``), where a missing shared folder fails the test:
    CI must not pass by silently skipping what it was meant to check."""
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        message = (f"{path} not found: the shared data is expected in ../shared beside the "
                   f"checkout, or where ${SHARED_ENV} points")
        if in_ci():
            pytest.fail(f"{message} (CI=true: a missing shared folder is a failure)",
                        pytrace=False)
        pytest.skip(message)
    return path


# --- MATLAB imresize, bicubic, from its formulas ---------------------------------------------

def _matlab_cubic(x: np.ndarray) -> np.ndarray:
    """MATLAB's ``cubic`` kernel (Keys, a = -0.5)."""
    ax = np.abs(x)
    return ((1.5 * ax ** 3 - 2.5 * ax ** 2 + 1) * (ax <= 1)
            + (-0.5 * ax ** 3 + 2.5 * ax ** 2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _matlab_contributions(in_length: int, out_length: int, scale: float) -> np.ndarray:
    """The (out_length x in_length) weight matrix of MATLAB ``imresize``'s ``contributions``
    for the bicubic kernel, with antialiasing when shrinking and symmetric edge indices."""
    kernel_width = 4.0
    if scale < 1:  # antialiasing: the kernel stretched by 1/scale, its height scaled down
        kernel_width /= scale
    matrix = np.zeros((out_length, in_length))
    for i in range(1, out_length + 1):  # 1-based, as in MATLAB
        u = i / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - kernel_width / 2)
        for j in range(left, left + math.ceil(kernel_width) + 2):  # P = ceil(width) + 2 taps
            distance = u - j
            weight = (scale * _matlab_cubic(np.array(scale * distance)) if scale < 1
                      else _matlab_cubic(np.array(distance)))
            # mirror out-of-range indices: aux = [1:in_length, in_length:-1:1]
            k = (j - 1) % (2 * in_length)
            k = k if k < in_length else 2 * in_length - 1 - k
            matrix[i - 1, k] += float(weight)
    return matrix / matrix.sum(axis=1, keepdims=True)


def matlab_imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(img, scale)`` (bicubic, antialiased) of a float HW image, float64,
    neither clipped nor rounded. Slow and plain: for checking small images only."""
    img = np.asarray(img, np.float64)
    rows = _matlab_contributions(img.shape[0], math.ceil(img.shape[0] * scale), scale)
    cols = _matlab_contributions(img.shape[1], math.ceil(img.shape[1] * scale), scale)
    return rows @ img @ cols.T
