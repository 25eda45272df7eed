"""Benchmark: candidate residual-structure scores compared by ROC AUC (the figures in
restorer/image/audit.py's docstring).

Run:  python tests/benchmarks/bench_audit_candidates.py [--data ../shared/data] [--size 128]

Cases, on central ``--size`` crops of Set12 + classic5 (gray) and Set5 (colour):
- noise-like: noisy (sigma 15, 25, 50) restored by denoise-gray (gray) or restore-default
  (colour); noisy text (sigma 15) denoised;
- detail-destroying: Gaussian blur sigma 2 of clean and sigma-25 images, blur 1.5 of the
  denoised sigma-25 image, 5x5 median of clean and sigma-15 images, JPEG q5 of clean images,
  text and period-3/4 textures (clean and sigma 15) blurred by 1.5 (also after denoising).
Prints, per candidate, the AUC (rank formula) and the median of each group, and per case kind
the median of the shipped score.
"""

import argparse
import glob
import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from restorer.image import audit
from restorer.weights.zoo import get_model


def cases(data: str, size: int):
    rng = np.random.default_rng(0)

    def load(path):
        a = np.asarray(Image.open(path)).astype(np.float32)
        a = a[..., None] if a.ndim == 2 else a
        top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
        return a[top:top + size, left:left + size]

    gray = [load(p) for p in sorted(glob.glob(os.path.join(data, "set12/*.png")))
            + sorted(glob.glob(os.path.join(data, "classic5/*.bmp")))]
    colour = [load(p) for p in sorted(glob.glob(os.path.join(data, "set5/*.bmp")))]
    if not gray or not colour:
        raise SystemExit(f"no Set12/classic5/Set5 under {data}")
    nets = {1: get_model("denoise-gray").net.eval(), 3: get_model("restore-default").net.eval()}

    @torch.inference_mode()
    def denoise(a):
        x = torch.from_numpy(a / 255).permute(2, 0, 1)[None].float()
        return nets[a.shape[2]](x)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255

    def noisy(a, s):
        return q8(a + rng.normal(0, s, a.shape))

    def q8(a):
        return np.round(np.clip(a, 0, 255))

    def blur(a, s):
        return ndimage.gaussian_filter(a, (s, s, 0))

    def jpeg(a, q):
        pixels = q8(a).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., 0] if a.shape[2] == 1 else pixels).save(buffer, "JPEG",
                                                                           quality=q)
        out = np.asarray(Image.open(buffer)).astype(np.float32)
        return out[..., None] if out.ndim == 2 else out

    text = Image.new("L", (size, size), 200)
    for i in range(size // 12):
        ImageDraw.Draw(text).text((2, 2 + 12 * i), "The quick brown fox 0123", fill=30,
                                  font=ImageFont.load_default())
    text = np.asarray(text).astype(np.float32)[..., None]
    yy, xx = np.mgrid[0:size, 0:size]

    def texture(p):
        return (128 + 60 * np.sign(np.sin(2 * np.pi * xx / p) * np.sin(2 * np.pi * yy / (p + 1)))
                )[..., None].astype(np.float32)

    low, high = [], []
    for a in gray + colour:
        for s in (15, 25, 50):
            n = noisy(a, s)
            low.append((f"denoised sigma {s}", n, q8(denoise(n))))
    for a in gray + colour:
        n, n15 = noisy(a, 25), noisy(a, 15)
        high += [("clean, blur 2", a, blur(a, 2)), ("sigma 25, blur 2", n, blur(n, 2)),
                 ("sigma 25, denoised + blur 1.5", n, blur(denoise(n), 1.5)),
                 ("clean, median 5", a, ndimage.median_filter(a, (5, 5, 1))),
                 ("sigma 15, median 5", n15, ndimage.median_filter(n15, (5, 5, 1))),
                 ("clean, jpeg q5", a, jpeg(a, 5))]
    tn = noisy(text, 15)
    low.append(("text sigma 15, denoised", tn, q8(denoise(tn))))
    for s, t in ((0, text), (15, tn)):
        high += [(f"text sigma {s}, blur 1.5", t, blur(t, 1.5)),
                 (f"text sigma {s}, denoised + blur 1.5", t, blur(denoise(t), 1.5))]
        for p in (3, 4):
            x = noisy(texture(p), s) if s else texture(p)
            high.append((f"texture {p} sigma {s}, blur 1.5", x, blur(x, 1.5)))
    return [(n, x, q8(y), 0) for n, x, y in low] + [(n, x, q8(y), 1) for n, x, y in high]


def gradient_magnitude_local_correlation(r, o, k=7):
    def grad(x):
        gx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))
        gy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
        return (gx * gx + gy * gy).sqrt()

    def box(x):
        return F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)

    gr, go = grad(r), grad(o)
    cov = box(gr * go) - box(gr) * box(go)
    var = (box(gr * gr) - box(gr) ** 2) * (box(go * go) - box(go) ** 2)
    return cov.flatten(1).sum(1) / var.clamp_min(0).sqrt().flatten(1).sum(1).clamp_min(1e-12)


def laplacian_r2(r, o):
    kernel = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float32)[None, None]

    def lap(x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)

    def box(x, k):
        return F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)

    f = torch.cat([lap(o), lap(box(o, 3)), lap(box(o, 5))], 1).flatten(2)
    f = f - f.mean(2, keepdim=True)
    y = (r - r.mean((2, 3), keepdim=True)).flatten(2)
    w = torch.linalg.solve(f @ f.transpose(1, 2) + 1e-9 * torch.eye(3), f @ y.transpose(1, 2))
    pred = w.transpose(1, 2) @ f
    return (pred * pred).sum((1, 2)) / (y * y).sum((1, 2)).clamp_min(1e-12)


def lag1(r, o):
    r = r - r.mean((2, 3), keepdim=True)
    energy = (r * r).mean((1, 2, 3)).clamp_min(1e-12)
    return ((r[..., :, 1:] * r[..., :, :-1]).mean((1, 2, 3))
            + (r[..., 1:, :] * r[..., :-1, :]).mean((1, 2, 3))) / 2 / energy


CANDIDATES = {
    "lag-1 autocorrelation": lag1,
    "whiteness defect, 12 lags": lambda r, o: audit.whiteness_defect(r),
    "gradient-magnitude local correlation 7x7": gradient_magnitude_local_correlation,
    "Laplacian R^2 (3 scales)": laplacian_r2,
    "energy co-location 9x9": lambda r, o: audit.energy_colocation(r, o, 9, 1),
    "energy co-location 9x9 stride 3": lambda r, o: audit.energy_colocation(r, o, 9, 3),
    "energy co-location 15x15": lambda r, o: audit.energy_colocation(r, o, 15, 1),
}


def auc(negatives, positives):
    values = np.concatenate([negatives, positives])
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        ranks[values == value] = ranks[values == value].mean()
    n = len(positives)
    return (ranks[len(negatives):].sum() - n * (n + 1) / 2) / (n * len(negatives))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=os.environ.get("RESTORER_DATA", "../shared/data"))
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    made = cases(args.data, args.size)
    labels = np.array([g for *_, g in made])
    scores = {name: [] for name in [*CANDIDATES, "shipped: restorer.image.audit.residual_structure"]}
    for _, x, y, _ in made:
        source = torch.from_numpy(x / 255).permute(2, 0, 1)[None].float()
        output = torch.from_numpy(y / 255).permute(2, 0, 1)[None].float()
        r, o = source.mean(1, keepdim=True) - output.mean(1, keepdim=True), output.mean(
            1, keepdim=True)
        for name, fn in CANDIDATES.items():
            scores[name].append(float(fn(r, o)[0]))
        scores["shipped: restorer.image.audit.residual_structure"].append(
            float(audit.residual_structure(source, output)[0]))
    print(f"{(labels == 0).sum()} noise-like, {(labels == 1).sum()} detail-destroying cases, "
          f"{args.size}px crops")
    print(f"{'score':48s} {'AUC':>6s} {'noise-like median (max)':>24s} "
          f"{'detail median (min)':>20s}")
    for name, values in scores.items():
        v = np.array(values)
        low, high = v[labels == 0], v[labels == 1]
        print(f"{name:48s} {auc(low, high):6.3f} {np.median(low):15.3f} ({low.max():6.3f}) "
              f"{np.median(high):11.3f} ({high.min():6.3f})")
    shipped = np.array(scores["shipped: restorer.image.audit.residual_structure"])
    print("\nshipped score by case kind: median [min, max]")
    for kind in sorted({n for n, *_ in made}):
        v = shipped[[i for i, (n, *_) in enumerate(made) if n == kind]]
        print(f"  {kind:40s} {np.median(v):.3f} [{v.min():.3f}, {v.max():.3f}]")


if __name__ == "__main__":
    main()
