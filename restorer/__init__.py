"""restorer: distributed batch image restoration with CNNs on Ray.

Ray reads ``RAY_AUTH_MODE`` once, when it is first imported, and the clusters this package
starts must agree with the driver; so the mode is set here, before any submodule imports Ray.
Token authentication (Ray's default for local clusters since 2.59) stays on unless the caller
set the variable already, or imported Ray before restorer.
"""

import os
import sys

# If Ray was imported first, it has already read the variable: changing it now would make the
# clusters Ray starts disagree with this driver, so leave it as it is.
if "ray" not in sys.modules:
    os.environ.setdefault("RAY_AUTH_MODE", "token")

__version__ = "0.1.0"

# The public API: ``restorer.restore("photos/", "restored/", model="denoise-gray")``; the
# driver lives in ``restorer.pipeline``, the actor class in ``restorer.actor`` (also importable
# from ``restorer.pipeline``).
# Imported on first use, so that the Ray-free parts (nets, training steps, checkpoints) import
# where Ray is not installed (a bare GPU box that runs ``python -m restorer.recipes``).


def __getattr__(name):
    if name == "restore":
        from restorer.pipeline import restore

        return restore
    raise AttributeError(f"module 'restorer' has no attribute {name!r}")


__all__ = ["__version__", "restore"]
