"""The residual-structure score (restorer.image.audit): its maths, and that it tells noise removed
from detail removed, on images made at run time.

Noise-like group: noisy crops (sigma 15-50, gray and colour) restored by the zoo's denoisers
through :class:`RestoreActor` (the score is the one the actor puts in the ledger). Detail-
destroying group: clean and noisy crops through Gaussian blur, a median filter, JPEG q5 and
blur of the denoised output; text and fine textures blurred away. Crops come from
``../shared/data`` (Set12, Set5; or ``$RESTORER_DATA``) when present, else from generated
scenes (:func:`restorer.io.samples.scene`). ROC AUC by the rank (Mann-Whitney) formula must be >=
0.95.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from restorer.image.audit import energy_colocation, residual_structure, whiteness_defect
from restorer.io.samples import scene
from restorer.pipeline import RestoreActor

DATA = Path(os.environ.get("RESTORER_DATA", Path(__file__).parents[1].parent / "shared" / "data"))
SIZE = 128  # crop side: small enough for a CPU test, large enough for the statistics


# --- the maths -------------------------------------------------------------------------------

def test_white_noise_scores_low_and_smooth_residuals_score_high():
    torch.manual_seed(0)
    noise = torch.randn(4, 1, 96, 96) * 0.1
    assert whiteness_defect(noise).max() < 0.1  # each of 12 terms ~N(0, 1/9216)
    smooth = torch.nn.functional.avg_pool2d(noise, 5, 1, 2)  # correlated over 5 px
    assert whiteness_defect(smooth).min() > 1.0
    # A fine grating: lag-1 correlation alone is ~-0.5 for period 3, but squares add up.
    xx = torch.arange(96.0)
    grating = torch.sin(2 * torch.pi * xx / 3).expand(1, 1, 96, 96)
    assert whiteness_defect(grating)[0] > 1.0

    clean = torch.nn.functional.interpolate(torch.rand(4, 3, 12, 12), size=(96, 96),
                                            mode="bicubic")
    noisy = clean + noise  # the model takes exactly the noise away: output = clean
    assert residual_structure(noisy, clean).max() < 0.15
    edges = torch.zeros(1, 1, 96, 96)
    edges[..., 40:60, 30:70] = 1.0
    blurred = torch.nn.functional.avg_pool2d(edges, 7, 1, 3, count_include_pad=False)
    assert energy_colocation(edges - blurred, blurred)[0] > 0.5
    assert residual_structure(edges, blurred)[0] > 0.5


def test_score_is_per_image_bounded_and_zero_for_degenerate_inputs():
    torch.manual_seed(1)
    source = torch.rand(3, 2, 40, 33)
    output = torch.nn.functional.avg_pool2d(source, 3, 1, 1)
    batch = residual_structure(source, output)
    assert batch.shape == (3,) and batch.dtype == torch.float32
    single = torch.cat([residual_structure(source[i:i + 1], output[i:i + 1]) for i in range(3)])
    assert torch.allclose(batch, single, atol=1e-6)  # no cross-talk between images
    assert ((batch >= 0) & (batch <= 1)).all()
    assert residual_structure(source, source).abs().max() == 0  # nothing removed
    flat = torch.full((1, 1, 32, 32), 0.5)
    assert residual_structure(flat, flat)[0] == 0
    tiny = torch.rand(2, 3, 3, 5)
    assert residual_structure(tiny, tiny * 0.5).tolist() == [0.0, 0.0]  # too small to say
    with pytest.raises(ValueError, match="one shape"):
        residual_structure(source, output[:, :1])


# --- validation on images made at run time ---------------------------------------------------

def _crop(image: Image.Image) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    array = array[..., None] if array.ndim == 2 else array
    top, left = (array.shape[0] - SIZE) // 2, (array.shape[1] - SIZE) // 2
    return array[top:top + SIZE, left:left + SIZE]


def _images() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(gray, colour) SIZE x SIZE uint8 HWC crops: Set12 / Set5 when present, else generated
    scenes (gradients, discs, stripes, a checker patch)."""
    gray_files = sorted((DATA / "set12").glob("*.png"))[:8]
    colour_files = sorted((DATA / "set5").glob("*.bmp"))[:4]
    if gray_files and colour_files:
        return ([_crop(Image.open(p).convert("L")) for p in gray_files],
                [_crop(Image.open(p).convert("RGB")) for p in colour_files])
    def generated(channels: int, seed: int) -> np.ndarray:
        return (scene(SIZE, SIZE, channels, seed) * 255).round().astype(np.uint8)

    return ([generated(1, seed) for seed in range(8)],
            [generated(3, seed) for seed in range(8, 12)])


def _text() -> np.ndarray:
    image = Image.new("L", (SIZE, SIZE), 205)
    draw = ImageDraw.Draw(image)
    for row in range(10):
        draw.text((2, 2 + 12 * row), "Invoice 0427: 13.5 kg", fill=25,
                  font=ImageFont.load_default())
    return np.asarray(image)[..., None]


def _texture(period: int) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    pattern = np.sign(np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / (period + 1)))
    return (128 + 60 * pattern)[..., None].astype(np.uint8)


def _noisy(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).round().astype(np.uint8)


def _filtered(image: np.ndarray, how: str) -> np.ndarray:
    """A detail-destroying "model": PIL's Gaussian blur (radius), median filter or JPEG q5."""
    pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    kind, value = how.split(":")
    if kind == "blur":
        pil = pil.filter(ImageFilter.GaussianBlur(float(value)))
    elif kind == "median":
        pil = pil.filter(ImageFilter.MedianFilter(int(value)))
    else:
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=int(value))
        pil = Image.open(buffer)
    array = np.asarray(pil)
    return array[..., None] if array.ndim == 2 else array


def _score(source: np.ndarray, output: np.ndarray) -> float:
    def tensor(a):
        return torch.from_numpy(a.astype(np.float32) / 255).permute(2, 0, 1)[None]

    return float(residual_structure(tensor(source), tensor(output))[0])


def _auc(negatives: list[float], positives: list[float]) -> float:
    """ROC AUC by the rank formula: (rank sum of positives - n(n+1)/2) / (n_pos n_neg), with
    tied values given their mean rank."""
    values = np.array(negatives + positives)
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):  # ties share their mean rank
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = len(positives), len(negatives)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auc_rank_formula():
    assert _auc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert _auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert _auc([0.1, 0.3], [0.2, 0.4]) == 0.75
    assert _auc([0.5], [0.5]) == 0.5


def test_score_separates_noise_removed_from_detail_removed():
    rng = np.random.default_rng(0)
    gray, colour = _images()
    text = _text()
    noise_like: dict[str, float] = {}
    detail: dict[str, float] = {}

    # Our denoisers on noisy images: the ledger's score, from the actor itself.
    jobs = {"denoise-gray": [(f"gray{i} sigma {s}", _noisy(img, s, rng))
                             for i, img in enumerate(gray) for s in (15, 30, 50)]
            + [("text sigma 25", _noisy(text, 25, rng))],
            "restore-default": [(f"colour{i} sigma {s}", _noisy(img, s, rng))
                                for i, img in enumerate(colour) for s in (15, 50)]
            + [(f"gray{i} sigma 25 (colour net)", _noisy(img, 25, rng))
               for i, img in enumerate(gray[:3])]}
    denoised: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for model, cases in jobs.items():
        actor = RestoreActor(model=model, tile=0)
        outputs, stats = actor.restore_arrays([noisy for _, noisy in cases])
        for (name, noisy), output, stat in zip(cases, outputs, stats):
            noise_like[f"{model}: {name}"] = stat["residual_structure"]
            denoised[name] = (noisy, output)

    # Detail destroyers.
    for i, img in enumerate(gray + colour):
        kind = "gray" if i < len(gray) else "colour"
        noisy = _noisy(img, 25, rng)
        detail[f"{kind}{i} clean, blur 2"] = _score(img, _filtered(img, "blur:2"))
        detail[f"{kind}{i} sigma 25, blur 2"] = _score(noisy, _filtered(noisy, "blur:2"))
        detail[f"{kind}{i} clean, median 5"] = _score(img, _filtered(img, "median:5"))
        detail[f"{kind}{i} clean, jpeg q5"] = _score(img, _filtered(img, "jpeg:5"))
    for name, (noisy, output) in denoised.items():
        if "sigma 15" in name or "sigma 25" in name:  # a denoiser that then blurs
            detail[f"{name}, denoised + blur 1.5"] = _score(noisy, _filtered(output, "blur:1.5"))
    blurred_away = {}
    for name, image in (("text", text), ("texture period 3", _texture(3)),
                        ("texture period 4", _texture(4))):
        for sigma in (0, 15):
            source = _noisy(image, sigma, rng) if sigma else image
            blurred_away[f"{name} sigma {sigma}, blur 1.5"] = _score(
                source, _filtered(source, "blur:1.5"))
    detail.update(blurred_away)

    low, high = list(noise_like.values()), list(detail.values())
    auc = _auc(low, high)
    message = (f"AUC {auc:.3f} over {len(low)} noise-like and {len(high)} detail-destroying "
               f"cases (data: {'shared' if (DATA / 'set12').is_dir() else 'generated'}); "
               f"noise-like median {np.median(low):.3f} max {max(low):.3f} "
               f"({max(noise_like, key=noise_like.get)}); detail median {np.median(high):.3f} "
               f"min {min(high):.3f} ({min(detail, key=detail.get)})")
    print(message)
    assert auc >= 0.95, message
    # Text and fine texture blurred away: above nearly every noise-like case.
    ceiling = float(np.quantile(low, 0.9))
    assert min(blurred_away.values()) > ceiling, (blurred_away, ceiling)


def test_score_on_cuda_matches_cpu(cuda):
    torch.manual_seed(2)
    source = torch.rand(4, 3, 256, 256)
    output = torch.nn.functional.avg_pool2d(source, 5, 1, 2)
    on_cuda = residual_structure(source.to(cuda), output.to(cuda))
    assert on_cuda.device.type == "cuda"
    assert torch.allclose(on_cuda.cpu(), residual_structure(source, output), atol=1e-4)
