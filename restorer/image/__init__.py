"""Image maths on arrays, no I/O and no Ray: pixel conventions, the audit's measures, the
flat-region fill, tiling, quality metrics and synthetic degradations (numpy / torch only).

Modules: ``pixels`` (dtype and range conventions) < ``audit`` (noise and residual measures) <
``flat`` (flat-region fill); ``tiling`` (split / stitch any size), ``metrics`` (PSNR, SSIM),
``degrade`` (noise, JPEG, blur, resizing, camera pipelines; seeded).
"""

from restorer import faces

HOMES = {
    "to_float": "pixels",
    "to_8bit": "pixels",
    "float_to_uint8": "pixels",
    "noise_sigma": "audit",
    "residual_structure": "audit",
    "fill_flat": "flat",
    "run_tiled": "tiling",
    "plan_tiles": "tiling",
    "pad_reflect": "tiling",
    "psnr": "metrics",
    "ssim": "metrics",
    "random_degradation": "degrade",
}
__getattr__ = faces(__name__, HOMES)
__all__ = sorted(HOMES)
